"""Names the wire and the configuration share, each defined once: worker roles, codec names, the
float dtypes KV may travel in (with their sizes) and the finish reasons of a request."""

from __future__ import annotations

# Bytes per element of the float dtypes KV may travel in (names as torch spells them): config's one table.
from disagg_cli.config import DTYPE_BYTES as DTYPE_BYTES

# Who speaks on the wire (`Hello.role`): the three worker roles, and coordinators.
WORKER_ROLES = ("prefill", "decode", "colocated")
PEER_ROLES = ("coordinator", *WORKER_ROLES)
# The roles that compute prompts, and those that decode (a colocated worker does both).
CAN_PREFILL = ("prefill", "colocated")
CAN_DECODE = ("decode", "colocated")
# The `HelloAck.runtime` key an elastic worker (`--elastic`) sets: its role may differ from the one
# it was started in, and a coordinator meeting it routes it by the role its hello says.
ELASTIC_RUNTIME_KEY = "elastic"

# The KV codecs, by the name `KVMeta.codec` and `--kv-codec` spell them, in the order `disagg bench
# codec` reports them (`kv/registry.py` maps each to its class).
CODEC_NAMES = ("none", "lz4", "shuffle-lz4", "auto", "int8", "int4")

# Why a request ended, as workers report it and the OpenAI API spells it ("prefilled": a prefill
# engine's request after its first token; "abort": stopped by the caller).
COMPLETED_REASONS = ("stop", "length")  # ended by the model: EOS or a stop string, or max_tokens
FINISH_REASONS = (*COMPLETED_REASONS, "prefilled", "abort")
