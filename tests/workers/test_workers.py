"""Prefill and decode workers as separate processes on real tcp sockets, driven message by message."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer
from disagg_cli.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Error,
    FirstToken,
    Heartbeat,
    HelloAck,
    Prefill,
    Refuse,
    Reserve,
    Reserved,
    Tokens,
)
from tests.workers.peer import Peer, free_port, start_worker

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, in a small village,",
           "1, 2, 3, 4, 5,", "Les élèves ont visité le musée"]


@pytest.fixture(scope="module")
def cluster(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("logs")
    pp, dp, dp2 = free_port(), free_port(), free_port()
    procs = [
        start_worker("prefill", pp, default_gguf, "--kv-codec", "shuffle-lz4", log=logs / "p.log"),
        # float32 prefill (float weights: a float32 pool) into a bfloat16 pool (int4 weights: auto)
        start_worker("decode", dp, default_gguf, "--block-size", "16", "--quantization", "auto", log=logs / "d.log"),
        # bfloat16 prefill into float32 decode with another block size, and a tiny pool (backpressure)
        start_worker("prefill", free_port(), default_gguf, "--dtype", "bfloat16", log=logs / "p16.log"),
        start_worker("decode", dp2, default_gguf, "--block-size", "5", "--kv-cache-tokens", "100",
                     "--kv-cache-dtype", "float32", log=logs / "d2.log"),
    ]
    info = {"prefill": f"tcp://127.0.0.1:{pp}", "decode": f"tcp://127.0.0.1:{dp}",
            "prefill16": procs[2].args[procs[2].args.index("--port") + 1], "decode2": f"tcp://127.0.0.1:{dp2}",
            "procs": procs, "logs": logs}
    info["prefill16"] = f"tcp://127.0.0.1:{info['prefill16']}"
    for role in ("prefill", "decode", "prefill16", "decode2"):  # ready (weights loaded) before any test
        ready = Peer(info[role])
        assert isinstance(ready.hello(), HelloAck), role
        ready.close()
    yield info
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        assert p.wait(timeout=20) == 0, (logs / "d.log").read_text()[-2000:]


def run_disaggregated(cluster: dict, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams,
                      prefill: str = "prefill", decode: str = "decode") -> dict[str, list[int]]:
    """Several requests in flight at once: all reserved, all prefilled, then tokens collected."""
    cp, cd = Peer(cluster[prefill]), Peer(cluster[decode])
    assert isinstance(cp.hello(), HelloAck) and isinstance(cd.hello(), HelloAck)
    ids = {f"{prefill}-{decode}-{i}": tokenizer.encode(p) for i, p in enumerate(prompts)}
    for rid, prompt in ids.items():
        cd.send(Reserve(rid, tuple(prompt), params, tuple(tokenizer.eos_token_ids)))
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    sent: set[str] = set()
    done: set[str] = set()
    while len(done) < len(ids):  # answers from either worker, in whatever order they come
        for peer in (cd, cp):
            if not peer.sock.poll(50):
                continue
            msg = peer.recv(1)
            if isinstance(msg, Reserved):  # reserved: only now may the prefill worker send KV
                cp.send(Prefill(msg.request_id, tuple(ids[msg.request_id]), params, cluster[decode]))
                sent.add(msg.request_id)
            elif isinstance(msg, FirstToken):
                out[msg.request_id].insert(0, msg.token_id)
            elif isinstance(msg, Tokens):
                out[msg.request_id] += list(msg.token_ids)
                if msg.finish_reason:
                    done.add(msg.request_id)
            else:
                raise AssertionError(msg)
    cp.close()
    cd.close()
    return out


def in_process(lm: LoadedModel, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    engine = LLMEngine(lm, EngineConfig(kv_cache_tokens=4096))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), tokenizer.encode(p), params, tokenizer.eos_token_ids)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    return [out[str(i)] for i in range(len(prompts))]


def pool_stats(address: str) -> dict:
    peer = Peer(address)
    peer.hello()
    peer.send(Heartbeat(7))
    (beat,) = peer.recv_until(lambda m: isinstance(m, Heartbeat), 10)
    peer.close()
    return beat.stats.as_dict()


def test_disaggregated_equals_in_process(cluster: dict, default_model: LoadedModel,
                                         default_tokenizer: Tokenizer) -> None:
    # The prefill worker's float32 KV lands in the decode worker's bfloat16 pool (cast on arrival);
    # 16 greedy tokens of these prompts still equal the float32 reference's.
    params = SamplingParams(max_tokens=16)
    got = run_disaggregated(cluster, default_tokenizer, PROMPTS, params)
    expected = in_process(default_model, default_tokenizer, PROMPTS, params)
    assert list(got.values()) == expected
    stats = pool_stats(cluster["decode"])
    assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == 0


def test_bfloat16_prefill_into_float32_decode_with_other_block_size_and_backpressure(
        cluster: dict, default_model: LoadedModel, default_tokenizer: Tokenizer) -> None:
    # The decode pool holds 100 tokens: five requests of ~10 + 24 tokens cannot all fit at once.
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    got = run_disaggregated(cluster, default_tokenizer, PROMPTS, params, "prefill16", "decode2")
    expected = in_process(default_model, default_tokenizer, PROMPTS, params)
    for tokens, ref in zip(got.values(), expected, strict=True):
        assert len(tokens) == 24
        assert sum(a == b for a, b in zip(tokens, ref, strict=True)) >= 12  # bfloat16 KV drifts, not garbage
    stats = pool_stats(cluster["decode2"])
    assert stats["free_blocks"] == stats["num_blocks"] == 20 and stats["queued_reservations"] == 0


def test_hello_says_the_resolved_dtype_and_quantization(cluster: dict) -> None:
    ack = Peer(cluster["decode"]).hello()
    # --quantization auto is int4 for decode; under it --kv-cache-dtype auto is a bfloat16 pool
    assert isinstance(ack, HelloAck) and ack.kv_layout.dtype == ack.runtime["kv_cache_dtype"] == "bfloat16"
    assert ack.runtime["dtype"] == "float32" and ack.runtime["quantization"] == "int4"
    assert ack.runtime["dtype_reason"] == "--dtype float32 as asked"
    assert "decode" in ack.runtime["quantization_reason"]
    assert ack.runtime["kv_cache_dtype_reason"].startswith("auto: bfloat16 KV under int4 weights")
    prefill = Peer(cluster["prefill"]).hello()  # float weights: the exact path keeps a float32 pool
    assert isinstance(prefill, HelloAck) and prefill.kv_layout.dtype == "float32"
    asked = Peer(cluster["decode2"]).hello()
    assert isinstance(asked, HelloAck) and asked.kv_layout.dtype == "float32"
    assert asked.runtime["kv_cache_dtype_reason"] == "--kv-cache-dtype float32 as asked"


def test_wrong_fingerprint_is_refused_naming_both(cluster: dict) -> None:
    peer = Peer(cluster["decode"], role="prefill", fingerprint="0123456789abcdef")
    reply = peer.hello()
    assert isinstance(reply, Refuse) and reply.reason == "fingerprint-mismatch"
    assert "0123456789abcdef" in reply.message and "50fc796a90ba1ab3" in reply.message


def test_bad_messages_get_errors_and_the_worker_keeps_serving(cluster: dict, default_tokenizer: Tokenizer) -> None:
    peer = Peer(cluster["decode"])
    peer.send_raw([b"\xc1 not msgpack"])
    assert isinstance(err := peer.recv(10), Error) and err.reason == "bad-msgpack"
    peer.send(Heartbeat(1))  # before hello
    assert isinstance(err := peer.recv(10), Error) and err.reason == "no-hello"
    peer.hello()
    peer.send_raw([msgpack.packb({"v": 99, "kind": "reserve"})])
    assert isinstance(err := peer.recv(10), Error) and err.reason == "bad-version"
    peer.send_raw([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "launch_missiles"})])
    assert isinstance(err := peer.recv(10), Error) and err.reason == "unknown-kind"
    peer.send_raw([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "reserve", "request_id": "x", "prompt_ids": "abc"})])
    assert isinstance(err := peer.recv(10), Error) and err.reason == "bad-field" and err.request_id == "x"
    peer.close()
    params = SamplingParams(max_tokens=4)
    assert len(run_disaggregated(cluster, default_tokenizer, PROMPTS[:1], params)["prefill-decode-0"]) == 4


def test_abort_frees_a_reservation(cluster: dict, default_tokenizer: Tokenizer) -> None:
    peer = Peer(cluster["decode"])
    peer.hello()
    ids = default_tokenizer.encode("word " * 40)
    peer.send(Reserve("abort-me", tuple(ids), SamplingParams(max_tokens=8)))
    assert isinstance(peer.recv(10), Reserved)
    assert pool_stats(cluster["decode"])["reserved_blocks"] == 3
    peer.send(Abort("abort-me"))
    peer.send(Abort("abort-me"))  # twice: idempotent
    peer.close()
    stats = pool_stats(cluster["decode"])
    assert stats["reserved_blocks"] == 0 and stats["free_blocks"] == stats["num_blocks"]


_kinds = st.sampled_from(["hello", "reserve", "prefill", "kv_layers", "kv_done", "tokens", "abort", "heartbeat",
                          "generate", "error", "nonsense"])
_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
                       | st.binary(max_size=40), lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
_headers = st.builds(lambda v, kind, fields: msgpack.packb({"v": v, "kind": kind, **fields}),
                     st.sampled_from([1, 1, 1, 0, 2, "1"]), _kinds,
                     st.dictionaries(st.sampled_from(["request_id", "prompt_ids", "sampling", "layer_start",
                                                      "kv", "num_tokens", "seq", "token_ids", "role"]),
                                     _values, max_size=6))
_frames = st.lists(st.one_of(_headers, st.binary(max_size=200)), min_size=1, max_size=4)


def test_fuzzed_frames_never_stop_a_worker(cluster: dict, default_model: LoadedModel,
                                           default_tokenizer: Tokenizer) -> None:
    """Random bytes and random msgpack at a live decode worker, greeted and not: it answers
    what it can, drops the rest, and still serves a real request exactly, with no leaked block."""
    greeted = Peer(cluster["decode"])
    greeted.hello()
    stranger = Peer(cluster["decode"])

    @settings(max_examples=150, deadline=None, database=None)
    @given(frames=_frames, hello_first=st.booleans())
    def throw(frames: list[bytes], hello_first: bool) -> None:
        (greeted if hello_first else stranger).send_raw(frames)

    throw()
    for peer in (greeted, stranger):  # drain whatever errors came back, without waiting long
        while peer.sock.poll(200):
            peer.sock.recv_multipart()
        peer.close()
    params = SamplingParams(max_tokens=12)
    got = run_disaggregated(cluster, default_tokenizer, PROMPTS[:2], params)
    assert list(got.values()) == in_process(default_model, default_tokenizer, PROMPTS[:2], params)
    stats = pool_stats(cluster["decode"])
    assert stats["free_blocks"] == stats["num_blocks"] and stats["reserved_blocks"] == 0
    assert stats["running"] == 0 and stats["queued_reservations"] == 0
