"""Hypothesis feeds every message kind a worker takes, each with fields out of range (huge and
negative ints, NaN and infinite floats, wrong lengths, token ids past the vocabulary, unknown
request ids), to live prefill, decode and colocated worker processes on a tiny model. Whatever it
sends, each worker answers what it can and goes on: afterwards all three serve a normal request
exactly and every KV block is free."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagg_cli.config import SamplingParams
from disagg_cli.protocol import PROTOCOL_VERSION, Abort, Reserve, Reserved
from disagg_cli.protocol.schema import to_wire
from tests.workers.peer import Peer
from tests.workers.tiny_cluster import CONTEXT, LAYERS, ROLES, VOCAB, TinyCluster, kv_layers, replies, tiny_cluster

pytestmark = pytest.mark.timeout(300)

TOKEN = st.sampled_from([-(2**63), -1, VOCAB, VOCAB + 1, 2**31, 2**63 - 1, 2**64 - 1]) | st.integers(-(2**63),
                                                                                                      2**64 - 1)
COUNT = st.sampled_from([-(2**63), -1, 0, 1, LAYERS, CONTEXT, CONTEXT + 1, 1 << 20, 2**63 - 1, 2**64 - 1]) \
    | st.integers(-(2**63), 2**64 - 1)
FLOAT = st.sampled_from([math.nan, math.inf, -math.inf, 1e-40, 5e-324, 0.0, -0.0, 1e308, -1.0]) | st.floats()
TEXT = st.text(max_size=40) | st.sampled_from(["", "x" * 5000, "tcp://127.0.0.1:1", "ipc:///nonexistent", "udp://a b"])
ANY = st.one_of(TOKEN, FLOAT, st.none(), st.booleans(), TEXT, st.binary(max_size=64), st.lists(TOKEN, max_size=5))
IDS = st.lists(TOKEN | st.integers(0, VOCAB - 1), max_size=300)
SAMPLING = {f"sampling.{k}": v for k, v in {"max_tokens": COUNT, "temperature": FLOAT, "top_p": FLOAT, "top_k": COUNT,
                                             "seed": COUNT, "logprobs": COUNT, "stop": st.lists(TEXT, max_size=3),
                                             "ignore_eos": ANY}.items()}
PROMPT = {"prompt_ids": IDS, "prompt_ids[]": TOKEN, "eos_ids": IDS, "request_id": ANY, **SAMPLING}
# Per kind: the worker it goes to, and each field it may spoil with what.
KINDS: dict[str, tuple[str | None, dict[str, st.SearchStrategy[Any]]]] = {
    "reserve": ("decode", PROMPT),
    "generate": ("colocated", PROMPT),
    "prefill": ("prefill", {**PROMPT, "decode_cached_tokens": COUNT, "decode_addr": TEXT, "decode_instance": TEXT}),
    "prefill_here": ("decode", {"request_id": ANY}),
    "kv_done": ("decode", {"first_token": TOKEN, "num_tokens": COUNT, "num_layers": COUNT, "request_id": ANY,
                           "sampler_state": st.binary(max_size=6000) | st.binary(min_size=5056, max_size=5056),
                           "stats": ANY}),
    "kv_layers": ("decode", {"layer_start": COUNT, "layer_end": COUNT, "num_tokens": COUNT, "token_start": COUNT,
                             "kv.shape": st.lists(COUNT, max_size=5), "kv.dtype": TEXT | st.just("bfloat16"),
                             "kv.raw_bytes": COUNT, "kv.codec": TEXT | st.sampled_from(["lz4", "int8", "int4"]),
                             "kv.checksum": COUNT, "kv.frame_bytes": st.lists(COUNT, max_size=3),
                             "model_fingerprint": TEXT, "request_id": ANY}),
    "abort": (None, {"request_id": ANY, "reason": ANY}),
    "error": (None, {"request_id": ANY, "reason": ANY, "message": ANY}),
    "heartbeat": (None, {"seq": COUNT, "stats": ANY}),
}
KNOWN = {f"known-{i}": (90, 91, 92, 93, 94, 95, i + 1) for i in range(3)}  # reserved before the fuzz starts
GREEDY = SamplingParams(max_tokens=6)


def _base(kind: str, rid: str, cluster: TinyCluster) -> tuple[dict[str, Any], list[bytes]]:
    """A well-formed message of `kind` as a wire map, and its payload frames."""
    prompt = list(KNOWN.get(rid, (1, 2, 3, 4, 5)))
    sampling = to_wire(GREEDY)
    if kind in ("reserve", "generate"):
        return {"request_id": rid, "prompt_ids": prompt, "sampling": sampling, "eos_ids": [2]}, []
    if kind == "prefill":
        return {"request_id": rid, "prompt_ids": prompt, "sampling": sampling, "decode_instance": "",
                "decode_addr": cluster.addresses["decode"], "decode_cached_tokens": 0}, []
    if kind == "kv_done":
        return {"request_id": rid, "first_token": 5, "num_tokens": len(prompt), "num_layers": LAYERS,
                "sampler_state": None, "stats": {}}, []
    if kind == "kv_layers":
        msg = kv_layers(rid, cluster.fingerprint, 0, len(prompt))
        return to_wire(msg), [bytes(memoryview(p)) for p in msg.payloads]
    return {"prefill_here": {"request_id": rid}, "abort": {"request_id": rid, "reason": "fuzz"},
            "error": {"request_id": rid, "reason": "fuzz", "message": "fuzz"}, "heartbeat": {"seq": 1}}[kind], []


def _spoil(fields: dict[str, Any], path: str, value: Any, index: int) -> None:
    if path == "prompt_ids[]":
        ids = fields["prompt_ids"]
        if not isinstance(ids, list):  # `prompt_ids` itself was spoiled first, into something else
            return
        if ids:
            ids[index % len(ids)] = value
        else:  # spoiled into [] first: the bad id becomes the whole prompt
            ids.append(value)
        return
    *outer, name = path.split(".")
    target = fields[outer[0]] if outer else fields
    if isinstance(target, dict):
        target[name] = value


@st.composite
def _messages(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    kind = draw(st.sampled_from(sorted(KINDS)))
    role, spoilable = KINDS[kind]
    rid = draw(st.sampled_from(sorted(KNOWN)) | st.integers(0, 10**6).map(lambda i: f"fz-{i}"))
    spoils = draw(st.lists(st.sampled_from(sorted(spoilable)), min_size=1, max_size=2, unique=True))
    values = {path: draw(spoilable[path]) for path in spoils}
    return kind, role or draw(st.sampled_from(ROLES)), {"rid": rid, "values": values, "index": draw(st.integers(0, 9))}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyCluster]:
    with tiny_cluster(tmp_path_factory.mktemp("hostile")) as c:
        yield c


def test_out_of_range_fields_of_every_kind_never_stop_a_worker(cluster: TinyCluster) -> None:
    peers: dict[str, Peer] = {role: cluster.peer(role) for role in ROLES}
    kv_peer = cluster.peer("decode", as_role="prefill")
    for rid, prompt in KNOWN.items():
        peers["decode"].send(Reserve(rid, prompt, GREEDY))
        assert isinstance(peers["decode"].recv(30), Reserved)
    sent_ids: set[str] = set(KNOWN)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(message=_messages())
    def throw(message: tuple[str, str, dict[str, Any]]) -> None:
        kind, role, how = message
        fields, payloads = _base(kind, how["rid"], cluster)
        for path, value in how["values"].items():
            _spoil(fields, path, value, how["index"])
        if isinstance(fields.get("request_id"), str):
            sent_ids.add(fields["request_id"])
        peer = kv_peer if kind.startswith("kv_") else peers[role]
        peer.send_raw([msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, **fields}), *payloads])
        for p in (*peers.values(), kv_peer):  # read what came back, so no queue fills
            while p.sock.poll(0):
                p.sock.recv_multipart()

    throw()
    cluster.alive()
    for peer in peers.values():  # as a coordinator ends what it started
        for rid in sorted(sent_ids):
            peer.send(Abort(rid))
        replies(peer)
        peer.close()
    kv_peer.close()
    cluster.assert_serving("fuzz")
