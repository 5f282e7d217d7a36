"""Role logic in-process: the prefill and decode roles with no socket at all.

Each role is built with a `LocalIO`, which records what the role sends instead of owning a zmq
socket. The test plays the network: it hands a role's messages to the other role (through the
same `prepare` / `preprocess` hooks the I/O thread runs) and the engine steps as the worker loop
would. So every decision a role makes (answer, refuse, queue, place, hand off) is checked message by
message, on a tiny model, in milliseconds; the real-process tests stay as they are.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import pytest

from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams, WorkerConfig
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.protocol import (
    Abort,
    Error,
    FirstToken,
    Heartbeat,
    KVDone,
    KVLayers,
    Prefill,
    PrefillHere,
    Reserve,
    Reserved,
    Tokens,
    WorkerStats,
)
from disagg_cli.workers.base import Dest
from disagg_cli.workers.decode import DecodeWorker
from disagg_cli.workers.prefill import PrefillWorker
from tests.tiny_models import random_weights, write_gguf

COORD: Dest = ("router", b"coordinator")
DECODE_ADDR = "tcp://127.0.0.1:1"
BLOCK = 4
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


class LocalIO:
    """What a role needs of its I/O: an outbox (recorded here), the inbox, the published stats."""

    def __init__(self) -> None:
        self.sent: list[tuple[Dest, Any]] = []
        self.inbox: queue.Queue[tuple[Dest, Any]] = queue.Queue()
        self.stats: WorkerStats | None = None

    def send(self, dest: Dest, msg: Any) -> None:
        self.sent.append((dest, msg))

    def publish_stats(self, stats: WorkerStats) -> None:
        self.stats = stats

    def take(self) -> list[tuple[Dest, Any]]:
        out, self.sent = self.sent, []
        return out

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    d = tmp_path_factory.mktemp("tiny")
    path = write_gguf(d / "tiny.gguf", random_weights(seed=5))
    return path, load_model(path, RuntimeConfig(dtype="float32", threads=1), cache_dir=d)


def _role(cls: type, tiny: tuple[Path, LoadedModel], tmp_path: Path, tokens: int = 64) -> Any:
    path, lm = tiny
    config = WorkerConfig(role="prefill" if cls is PrefillWorker else "decode", model=str(path), host="127.0.0.1",
                          port=1, runtime=RuntimeConfig(dtype="float32", threads=1), kv_codec="none",
                          engine=EngineConfig(block_size=BLOCK, kv_cache_tokens=tokens, enable_prefix_caching=False))
    return cls(config, tmp_path, lm=lm, io=LocalIO())


def _expected(lm: LoadedModel, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    engine = LLMEngine(lm, EngineConfig(block_size=BLOCK, kv_cache_tokens=64, enable_prefix_caching=False))
    engine.add_request("x", prompt, params)
    out = []
    while engine.has_unfinished():
        out += [e.token_id for e in engine.step()]
    return out


def _run(worker: Any) -> None:
    """Engine steps as the worker loop runs them, until the engine is idle."""
    while worker.engine.has_unfinished():
        worker.on_events(worker.step())


def _deliver(prefill: PrefillWorker, decode: DecodeWorker) -> list[tuple[Dest, Any]]:
    """Hand the prefill role's output to the decode role as the I/O threads would; return what
    went elsewhere (to the coordinator)."""
    rest = []
    for dest, item in prefill.io.take():
        if dest[0] == "peer":
            msg = prefill.prepare(item)  # the prefill I/O thread: encode KV, build KVDone
            if msg is not None:
                decode.handle(COORD, decode.preprocess(("router", b"prefill"), msg))
        else:
            rest.append((dest, item))
    return rest


def test_a_request_crosses_both_roles_and_equals_the_engine(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    prefill, decode = _role(PrefillWorker, tiny, tmp_path), _role(DecodeWorker, tiny, tmp_path)
    prompt = [3, 14, 15, 92, 65, 35, 8, 9, 79]  # 9 tokens: 3 blocks of 4
    decode.handle(COORD, Reserve("r1", tuple(prompt), GREEDY))
    [(to, reserved)] = decode.io.take()
    assert to == COORD and reserved == Reserved("r1", 3, reserved.queued_ms, 0)
    prefill.handle(COORD, Prefill("r1", tuple(prompt), GREEDY, DECODE_ADDR))
    _run(prefill)
    kinds = [type(item).__name__ for _, item in prefill.io.sent]
    # one KV message per layer to the decode worker, the first token to the coordinator, then KVDone
    assert kinds == ["EncodeLayer", "EncodeLayer", "FirstToken", "Done"]
    assert [d for d, _ in prefill.io.sent] == [("peer", (DECODE_ADDR, ""))] * 2 + [COORD, ("peer", (DECODE_ADDR, ""))]
    [(_, first)] = _deliver(prefill, decode)
    assert isinstance(first, FirstToken) and first.stats.prefix_cached_tokens == 0
    assert first.stats.batch_size == 1 and first.stats.kv_transfer_ms is None  # the prefill worker's only
    assert prefill.engine.pool.num_free == prefill.engine.num_blocks  # freed at hand-off
    _run(decode)
    tokens = [item for _, item in decode.io.take()]
    assert all(isinstance(t, Tokens) for t in tokens) and tokens[-1].finish_reason == "length"
    assert [first.token_id] + [i for t in tokens for i in t.token_ids] == _expected(tiny[1], prompt)
    stats = tokens[0].stats  # the prefill worker's KV figures (from KVDone) merged with the decode worker's
    assert stats is not None and stats.kv_transfer_ms is not None and stats.kv_transfer_ms >= 0
    assert stats.handoff_ms is not None and stats.decode_cached_tokens == 0
    assert stats.raw_bytes is not None and stats.raw_bytes > 0 and stats.kv_stream_ms is not None
    assert all(t.stats is None for t in tokens[1:])
    assert decode.requests == {} and decode.engine.pool.num_free == decode.engine.num_blocks


def test_decode_refuses_duplicates_misfits_and_strays(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    decode = _role(DecodeWorker, tiny, tmp_path)
    decode.handle(COORD, Reserve("a", (1, 2, 3), GREEDY))
    decode.handle(COORD, Reserve("a", (1, 2, 3), GREEDY))
    decode.handle(COORD, Reserve("big", tuple(range(1, 60)), SamplingParams(max_tokens=20)))  # 79 tokens > 64
    decode.handle(COORD, PrefillHere("nobody"))
    decode.handle(COORD, Heartbeat(1))  # the I/O thread answers these; one reaching a role is a stray
    sent = [m for _, m in decode.io.take()]
    assert isinstance(sent[0], Reserved)
    assert [(type(m), m.request_id, m.reason) for m in sent[1:]] == [
        (Error, "a", "duplicate"), (Error, "big", "rejected"), (Error, "nobody", "unknown"),
        (Error, None, "unexpected")]
    assert "KV blocks" in sent[2].message and "heartbeat" in sent[4].message
    assert decode.engine.blocks_held("a") == 1 and decode.engine.blocks_held("big") == 0


def test_reservations_wait_in_order_for_blocks(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    decode = _role(DecodeWorker, tiny, tmp_path, tokens=24)  # 6 blocks
    decode.handle(COORD, Reserve("a", tuple(range(1, 12)), GREEDY))  # 11 tokens: 3 blocks
    decode.handle(COORD, Reserve("b", tuple(range(1, 14)), GREEDY))  # 13 tokens: 4, must wait for a
    decode.handle(COORD, Reserve("c", (5,), GREEDY))  # 1 would fit, but waits behind b (FIFO)
    assert [(m.request_id, type(m)) for _, m in decode.io.take()] == [("a", Reserved)]
    assert decode.extra_stats() == {"queued_reservations": 2, "incoming": 1}
    decode.abort("a", notify=False)  # as an `Abort` from the coordinator does
    assert [(m.request_id, m.num_blocks) for _, m in decode.io.take()] == [("b", 4), ("c", 1)]
    decode.abort("b", notify=True, reason="stalled", message="gave up")
    [(to, err)] = decode.io.take()
    assert to == COORD and err == Error("b", "stalled", "gave up")
    decode.abort("c", notify=False)
    assert decode.engine.pool.num_free == decode.engine.num_blocks


def test_decode_fails_a_request_whose_kv_is_incomplete(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    prefill, decode = _role(PrefillWorker, tiny, tmp_path), _role(DecodeWorker, tiny, tmp_path)
    prompt = [7, 8, 9, 10, 11]
    decode.handle(COORD, Reserve("r", tuple(prompt), GREEDY))
    decode.io.take()
    prefill.handle(COORD, Prefill("r", tuple(prompt), GREEDY, DECODE_ADDR))
    _run(prefill)
    sent = prefill.io.take()
    layer0 = prefill.prepare(sent[0][1])  # deliver layer 0 only, then KVDone
    done = next(prefill.prepare(item) for d, item in sent if type(item).__name__ == "Done")
    assert isinstance(layer0, KVLayers) and isinstance(done, KVDone) and done.num_layers == 1  # layers sent
    decode.handle(COORD, decode.preprocess(("router", b"p"), layer0))
    decode.handle(COORD, done)
    [(to, err)] = decode.io.take()
    assert to == COORD and (err.request_id, err.reason) == ("r", "truncated") and "[1]" in err.message
    assert decode.engine.pool.num_free == decode.engine.num_blocks and decode.requests == {}


def test_prefill_here_computes_on_the_decode_worker(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    decode = _role(DecodeWorker, tiny, tmp_path)
    prompt = [21, 22, 23, 24, 25, 26]
    decode.handle(COORD, Reserve("h", tuple(prompt), GREEDY))
    decode.handle(COORD, PrefillHere("h"))
    _run(decode)
    sent = [m for _, m in decode.io.take()]
    assert isinstance(sent[0], Reserved) and isinstance(sent[1], FirstToken)
    assert sent[1].stats.prefix_cached_tokens == sent[1].stats.decode_cached_tokens == 0
    assert all(isinstance(m, Tokens) for m in sent[2:]) and sent[-1].finish_reason == "length"
    assert [sent[1].token_id] + [i for m in sent[2:] for i in m.token_ids] == _expected(tiny[1], prompt)
    assert decode.engine.pool.num_free == decode.engine.num_blocks


def test_prefill_refuses_duplicates_and_misfits(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    prefill = _role(PrefillWorker, tiny, tmp_path)
    prefill.handle(COORD, Prefill("p", (1, 2), GREEDY, DECODE_ADDR))
    prefill.handle(COORD, Prefill("p", (1, 2), GREEDY, DECODE_ADDR))
    prefill.handle(COORD, Prefill("huge", tuple(range(1, 90)), GREEDY, DECODE_ADDR))
    prefill.handle(COORD, Reserve("x", (1,), GREEDY))
    assert [(m.request_id, m.reason) for _, m in prefill.io.take()] == [
        ("p", "duplicate"), ("huge", "rejected"), ("x", "unexpected")]
    prefill.abort("p", notify=False)
    assert not prefill.engine.has_unfinished() and prefill.engine.pool.num_free == prefill.engine.num_blocks


def test_a_draining_worker_refuses_new_work_and_serves_aborts(tiny: tuple[Path, LoadedModel],
                                                              tmp_path: Path) -> None:
    decode = _role(DecodeWorker, tiny, tmp_path)
    decode.handle(COORD, Reserve("kept", (1, 2), GREEDY))
    decode.io.take()
    decode.request_stop()
    decode.io.inbox.put((COORD, Reserve("late", (3,), GREEDY)))
    decode.io.inbox.put((COORD, Abort("kept")))
    decode._drain(block=False)
    [(to, err)] = decode.io.take()
    assert to == COORD and (err.request_id, err.reason) == ("late", "draining")
    assert decode.engine.blocks_held("kept") == 0 and decode.requests == {}
