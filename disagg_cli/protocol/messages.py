"""Every message kind that crosses a process boundary, as frozen dataclasses.

Each kind is registered with `@_message`; its type hints are the schema (checked by
`protocol/schema.py`), and `protocol/frames.py` turns messages into frames and back. Pure: no
zmq, no torch (the coordinator imports it without loading torch). The tensor side of `KVLayers`
(codecs, checksums) lives in `kv/codec.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from disagg_cli.config import SamplingParams
from disagg_cli.engine.logprobs import TokenLogprobs
from disagg_cli.protocol.errors import WireError, bad_field
from disagg_cli.protocol.names import DTYPE_BYTES
from disagg_cli.protocol.schema import frames_field
from disagg_cli.protocol.stats import RequestStats, WorkerCapacity, WorkerStats

# 2: HelloAck names the worker's instance and Prefill the decode instance it streams to.
# 3: prefix caching: `Reserved` says how many leading prompt tokens the decode worker holds,
#    `Prefill` passes that on, `KVLayers` carry the position of their first token, and
#    `PrefillHere` has a decode worker compute a short prompt itself (selective disaggregation).
# 4: per-request figures travel as a typed `RequestStats`, no longer a map of floats.
# 5: a worker's capacity (`Hello`, `HelloAck`) and heartbeat figures travel as typed `WorkerCapacity`
#    and `WorkerStats` (None where there are none), no longer maps; `LinkAck` answers `bench link`.
# 6: elastic roles: `SwitchRole` changes a worker's role in place, `Parked` lists the decoding
#    requests it holds for moving, `MoveOut` ships one with its KV to another decode worker,
#    `RoleSwitched` says the switch is done; `WorkerStats.role` is the worker's role now.
# 7: `WorkerCapacity.max_step_ms`, the step time a worker cuts prompt chunks to while it decodes.
PROTOCOL_VERSION = 7

# Anything exposing the buffer protocol: bytes, memoryview, numpy arrays, zmq.Frame.
Frame = Any


@dataclass(frozen=True, slots=True)
class KVMeta:
    """How one (k, v) pair of shape `shape` was encoded; written by a codec, read by its decoder.

    `checksum` is crc32 of the raw tensor bytes (k then v) for lossless codecs and of the
    quantized bytes for lossy ones (their originals cannot be rebuilt to compare against).
    `frame_bytes` is the length of each payload frame, in order; `params` is codec-specific.
    """

    codec: str
    dtype: str
    shape: tuple[int, ...]
    raw_bytes: int
    wire_bytes: int
    checksum: int
    frame_bytes: tuple[int, ...]
    params: dict[str, str | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            bad_field(f"KV dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if not 3 <= len(self.shape) <= 4 or min(self.shape) < 1:
            bad_field(f"KV shape {self.shape} is not ([layers,] tokens, kv_heads, head_dim) with sizes >= 1")
        expected = 2 * math.prod(self.shape) * DTYPE_BYTES[self.dtype]
        if self.raw_bytes != expected:
            bad_field(f"raw_bytes {self.raw_bytes} != 2 x {self.shape} x {self.dtype} = {expected}")
        if self.wire_bytes != sum(self.frame_bytes) or min(self.frame_bytes, default=0) < 0:
            bad_field(f"wire_bytes {self.wire_bytes} != sum of frame_bytes {self.frame_bytes}")
        if not 0 <= self.checksum < 2**32:
            bad_field(f"checksum {self.checksum} is not a 32-bit crc")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of a worker's KV cache, exchanged in the handshake."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int


class Message:
    """Base of all message kinds; `kind` names the class on the wire."""

    __slots__ = ()
    kind: ClassVar[str]


M = TypeVar("M", bound=Message)
_KINDS: dict[str, type[Message]] = {}


def _message(kind: str) -> Callable[[type[M]], type[M]]:
    """Register a message class under `kind`; adding a kind is a dataclass plus this line."""

    def register(cls: type[M]) -> type[M]:
        assert kind not in _KINDS, f"kind {kind!r} registered twice"
        cls.kind = kind
        _KINDS[kind] = cls
        return cls

    return register


@_message("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on every connection: who I am and what KV I hold."""

    protocol_version: int
    role: str  # "coordinator", "prefill", "decode", "colocated"
    model_fingerprint: str  # "" from a coordinator, which holds no weights
    kv_layout: KVLayout | None = None
    capacity: WorkerCapacity | None = None  # None from a coordinator
    # A worker's resolved dtype and weight quantization, with the reasons (`--dtype auto` etc.).
    runtime: dict[str, str] = field(default_factory=dict)


@_message("hello_ack")
@dataclass(frozen=True, slots=True)
class HelloAck(Message):
    """The peer accepted a `Hello`; carries the acceptor's own identity."""

    role: str
    model_fingerprint: str
    kv_layout: KVLayout
    capacity: WorkerCapacity
    runtime: dict[str, str] = field(default_factory=dict)
    # Random per worker process: a peer that sees a new one knows the worker restarted and forgot
    # every greeting, reservation and KV it held.
    instance_id: str = ""


@_message("refuse")
@dataclass(frozen=True, slots=True)
class Refuse(Message):
    """The peer refused a `Hello`; `message` names both sides of the mismatch."""

    reason: str
    message: str


@_message("kv_layers")
@dataclass(frozen=True, slots=True)
class KVLayers(Message):
    """KV of layers [layer_start, layer_end) of one request's tokens token_start.. (the ones
    before were cached on the receiver), shape (layers, tokens, heads, dim)."""

    request_id: str
    model_fingerprint: str
    layer_start: int
    layer_end: int
    num_tokens: int
    kv: KVMeta
    payloads: tuple[Frame, ...] = frames_field()
    token_start: int = 0

    def __post_init__(self) -> None:
        rid = self.request_id
        if not 0 <= self.layer_start < self.layer_end:
            bad_field(f"layer range [{self.layer_start}, {self.layer_end}) is empty or negative", rid)
        if self.token_start < 0:
            bad_field(f"token_start {self.token_start} is negative", rid)
        want = (self.layer_end - self.layer_start, self.num_tokens)
        if len(self.kv.shape) != 4 or tuple(self.kv.shape[:2]) != want:
            bad_field(f"KV shape {self.kv.shape} does not start with (layers, tokens) = {want}", rid)
        sizes, declared = tuple(memoryview(p).nbytes for p in self.payloads), self.kv.frame_bytes
        if sizes != declared:
            short = len(sizes) < len(declared) or any(a < d for a, d in zip(sizes, declared, strict=False))
            why = "truncated" if short else "oversized"
            raise WireError(why, f"payload frames of {sizes} bytes, header declares {declared}", request_id=rid)


@_message("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A request (or, with request_id None, the connection) failed; `reason` is a short code."""

    request_id: str | None
    reason: str
    message: str


@_message("heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """I am alive; `seq` increases by one per beat so a peer can count missed ones."""

    seq: int
    stats: WorkerStats | None = None  # a worker's answer to a coordinator's beat; None in the beat


@_message("link_ack")
@dataclass(frozen=True, slots=True)
class LinkAck(Message):
    """`bench link`'s receiver: round `seq` arrived whole (seq 0: ready), decoded in `decode_s`."""

    seq: int
    decode_s: float = 0.0


# --- serving: the life of one disaggregated request ------------------------------------------
#
# Every worker binds one ROUTER socket; coordinators and prefill workers connect DEALERs to it and
# say `Hello` first. Then, per request:
# 1. coordinator → decode worker: `Reserve` (prompt, sampling). The decode worker sets blocks aside
#    for the prompt's KV (sharing the leading blocks its prefix cache holds), or queues the
#    reservation until blocks free up, then answers `Reserved` (with the cached token count).
# 2. coordinator → prefill worker: `Prefill` (prompt, sampling, the decode worker's address and
#    cached token count). The prefill worker batches prompts, computing only what its own prefix
#    cache lacks; as each layer is computed it sends `KVLayers` of the tokens the decode worker
#    lacks straight to it; then `FirstToken` to the coordinator (the user's TTFT) and `KVDone`
#    (first token, sampler state, timings) to the decode worker.
#    Or, for a prompt whose uncached part is short (selective disaggregation), coordinator →
#    decode worker: `PrefillHere`; the decode worker computes it in the reserved blocks and
#    answers `FirstToken` itself.
# 3. decode worker: places each layer into the reserved blocks, joins the request to its running
#    batch on `KVDone`, and streams `Tokens` to the coordinator until EOS or max_tokens.
# 4. coordinator → any worker: `Abort` (a stop string, Ctrl-C, a client gone) frees the request's
#    blocks there. Any side may answer `Error` with a reason code instead.
# Colocated workers take `Generate` and answer `FirstToken` then `Tokens`, all in one process.


@_message("reserve")
@dataclass(frozen=True, slots=True)
class Reserve(Message):
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    eos_ids: tuple[int, ...] = ()


@_message("reserved")
@dataclass(frozen=True, slots=True)
class Reserved(Message):
    request_id: str
    num_blocks: int
    queued_ms: float  # how long the reservation waited for free blocks
    cached_tokens: int = 0  # leading prompt tokens whose KV the decode worker already holds


@_message("prefill")
@dataclass(frozen=True, slots=True)
class Prefill(Message):
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    decode_addr: str  # where to stream the KV (the decode worker's ROUTER)
    # The decode process that holds the reservation (its HelloAck's instance_id): KV goes only to
    # that process, never to a successor that restarted on the same address and knows nothing.
    decode_instance: str = ""
    decode_cached_tokens: int = 0  # from `Reserved`: send the KV of prompt tokens from here on


@_message("prefill_here")
@dataclass(frozen=True, slots=True)
class PrefillHere(Message):
    """To a decode worker holding a reservation: compute its prompt yourself (no transfer)."""

    request_id: str


@_message("generate")
@dataclass(frozen=True, slots=True)
class Generate(Message):
    """Both phases in one (colocated) worker."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    eos_ids: tuple[int, ...] = ()


@_message("first_token")
@dataclass(frozen=True, slots=True)
class FirstToken(Message):
    request_id: str
    token_id: int
    stats: RequestStats = RequestStats()  # queue_ms, prefill_ms, batch_size, …
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@_message("kv_done")
@dataclass(frozen=True, slots=True)
class KVDone(Message):
    """Sent after the last `KVLayers` of a request (same connection, so it arrives after them)."""

    request_id: str
    first_token: int
    num_tokens: int
    num_layers: int
    sampler_state: bytes | None = None  # the sampler's RNG state after drawing the first token
    stats: RequestStats = RequestStats()  # kv_encode_ms, bytes, kv_stream_ms, …


@_message("tokens")
@dataclass(frozen=True, slots=True)
class Tokens(Message):
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    stats: RequestStats | None = None  # the first Tokens of a request only: KVDone's and the decode worker's
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, when the request asked for them


@_message("abort")
@dataclass(frozen=True, slots=True)
class Abort(Message):
    request_id: str
    reason: str = "abort"
