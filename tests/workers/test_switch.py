"""A role switch in-process, message by message, on the tiny model with no socket (as
`test_role_logic.py` plays the network): a decode worker that becomes a prefill worker parks its
decoding requests, ships each one's KV to another decode worker on `MoveOut` and frees it; the
other worker decodes on to the same tokens as one engine; the new role runs on the same engine
and pool; a worker that is not elastic, or is already switching, refuses."""

from __future__ import annotations

import queue
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams, WorkerConfig
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model.loader import LoadedModel
from disagg_cli.protocol import (
    Error,
    KVDone,
    KVLayers,
    MoveOut,
    Parked,
    Prefill,
    Reserve,
    Reserved,
    RoleSwitched,
    SwitchRole,
    Tokens,
)
from disagg_cli.workers.base import Dest
from disagg_cli.workers.colocated import ColocatedWorker
from disagg_cli.workers.decode import DecodeState, DecodeWorker
from disagg_cli.workers.prefill import PrefillWorker
from disagg_cli.workers.worker import Worker
from tests.workers.test_role_logic import BLOCK, COORD, DECODE_ADDR, GREEDY, LocalIO, _deliver, _expected, _run, tiny

__all__ = ["tiny"]  # the module fixture, shared
TARGET = ("router", b"switching worker")  # how the target sees the switching worker's connection


class SwitchIO(LocalIO):
    def rebind(self, ident: Any, preprocess: Any, prepare: Any) -> None:
        self.ident = ident

    def flush(self, timeout_s: float) -> bool:
        return True


def _worker(cls: type, tiny: tuple[Path, LoadedModel], tmp_path: Path, elastic: bool = True,
            io: Any = None) -> Any:
    path, lm = tiny
    role = {PrefillWorker: "prefill", DecodeWorker: "decode", ColocatedWorker: "colocated"}[cls]
    config = WorkerConfig(role=role, model=str(path), host="127.0.0.1",
                          port=1, runtime=RuntimeConfig(dtype="float32", threads=1), kv_codec="none", elastic=elastic,
                          engine=EngineConfig(block_size=BLOCK, kv_cache_tokens=64, enable_prefix_caching=False))
    return cls(config, tmp_path, lm=lm, io=io or SwitchIO())


def _ship(source: Worker[Any], target: DecodeWorker) -> list[tuple[Dest, Any]]:
    """The source's KV items to the target, through both I/O threads' hooks; the rest returned."""
    rest = []
    for dest, item in source.io.take():
        if dest[0] == "peer":
            msg = source.prepare(item)
            assert isinstance(msg, KVLayers | KVDone)
            target.handle(TARGET, target.preprocess(TARGET, msg))
        else:
            rest.append((dest, item))
    return rest


SEEDED = replace(GREEDY, temperature=0.9, top_k=20, seed=7)


@pytest.mark.parametrize(("params", "taker"), [(GREEDY, DecodeWorker), (SEEDED, DecodeWorker),
                                               (GREEDY, ColocatedWorker)], ids=["greedy", "seeded", "to-colocated"])
def test_decode_to_prefill_moves_running_requests_with_their_kv(tiny: tuple[Path, LoadedModel], tmp_path: Path,
                                                                 params: SamplingParams, taker: type) -> None:
    prefill = _worker(PrefillWorker, tiny, tmp_path)
    source, target = _worker(DecodeWorker, tiny, tmp_path), _worker(taker, tiny, tmp_path)
    prompts = {"a": (3, 14, 15, 92, 65, 35, 8, 9, 79), "b": (2, 7, 1, 8, 28)}
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    for rid, prompt in prompts.items():
        source.handle(COORD, Reserve(rid, prompt, params))
        prefill.handle(COORD, Prefill(rid, prompt, params, DECODE_ADDR))
    _run(prefill)
    for _, first in _deliver(prefill, source):
        tokens[first.request_id].append(first.token_id)
    source.io.take()  # Reserved
    source.on_events(source.step())  # one decode step: each has 2 tokens now
    source.handle(COORD, Reserve("q", tuple(range(1, 51)), params))  # queued for memory: refused at the switch
    for _, msg in source.io.take():
        assert isinstance(msg, Tokens)
        tokens[msg.request_id] += msg.token_ids
    source._switch_message(COORD, SwitchRole("prefill", move=True))
    assert source.io.take() == [(COORD, Error("q", "draining", f"decode worker {source.address} is switching role"))]
    assert not source.switch.tick(source.io.flush)  # parks both: not done until they leave
    [(to, parked)] = source.io.take()
    assert to == COORD and isinstance(parked, Parked) and source.requests == {}
    assert {p.request_id: p.token_ids for p in parked.requests} == {r: prompts[r] + tuple(t) for r, t in tokens.items()}
    assert all(p.max_tokens == params.max_tokens - 1 for p in parked.requests)  # 2 made; the last one counts again
    held = source.engine.pool.num_free
    for p in parked.requests:  # the coordinator's part: reserve on the target, then MoveOut
        target.handle(COORD, Reserve(p.request_id, p.token_ids[:-1], replace(params, max_tokens=p.max_tokens)))
        [(_, reserved)] = target.io.take()
        assert isinstance(reserved, Reserved) and reserved.cached_tokens == 0
        source._switch_message(COORD, MoveOut(p.request_id, DECODE_ADDR, "", reserved.cached_tokens))
        assert _ship(source, target) == []
        assert target.requests[p.request_id].state is DecodeState.RUNNING
    assert source.engine.pool.num_free == source.engine.num_blocks > held  # freed as the KV left
    _run(target)
    for _, msg in target.io.take():
        tokens[msg.request_id] += msg.token_ids
    for rid, prompt in prompts.items():  # no token repeated or skipped, none recomputed differently
        assert tokens[rid] == _expected(tiny[1], list(prompt), params), rid
    assert target.engine.pool.num_free == target.engine.num_blocks
    # the switch ends; the new role runs on the same engine (pool, prefix cache) and I/O
    assert source.switch.tick(source.io.flush) and source.switch.done
    engine = source.engine
    new = PrefillWorker(replace(source.config, role="prefill"), tmp_path, source.stop, carry=source.carry())
    new.announce()
    [(to, switched)] = new.io.take()
    assert to == COORD and isinstance(switched, RoleSwitched)
    assert (switched.previous, switched.role, switched.moved, switched.finished, switched.refused) == \
        ("decode", "prefill", 2, 1, "")  # "q" ended here: refused
    assert new.engine is engine and engine.prefill_only and new.io.stats.role == "prefill"
    target.handle(COORD, Reserve("c", prompts["a"], params))
    new.handle(COORD, Prefill("c", prompts["a"], params, DECODE_ADDR))
    _run(new)
    [(_, first)] = _ship(new, target)
    _run(target)
    later = [t for _, m in target.io.take() if isinstance(m, Tokens) for t in m.token_ids]
    assert [first.token_id, *later] == _expected(tiny[1], list(prompts["a"]), params)


def test_without_a_taker_requests_finish_before_the_switch(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    decode = _worker(DecodeWorker, tiny, tmp_path)
    decode.handle(COORD, Reserve("r", (5, 6, 7), GREEDY))
    decode.handle(COORD, Reserve("r2", (5, 6, 7, 8), GREEDY))
    from disagg_cli.protocol import PrefillHere

    decode.handle(COORD, PrefillHere("r"))
    decode._switch_message(COORD, SwitchRole("prefill"))  # no taker (no move): they decode here to the end
    assert not decode.switch.tick(decode.io.flush)
    decode.handle(COORD, PrefillHere("r2"))  # reserved before the switch: it still runs here
    _run(decode)
    assert decode.switch.tick(decode.io.flush)
    done = [m for _, m in decode.io.take() if isinstance(m, Tokens) and m.finish_reason]
    assert sorted(m.request_id for m in done) == ["r", "r2"]
    assert decode.engine.pool.num_free == decode.engine.num_blocks and decode.switch.finished == 2


def test_decode_and_colocated_keep_what_they_decode(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    """decode → colocated → decode with a request decoding throughout: it stays, adopted by each new
    role, and its tokens are the engine's; nothing moved, nothing waited for."""
    from disagg_cli.protocol import PrefillHere

    prompt = (3, 14, 15, 92, 65)
    worker = _worker(DecodeWorker, tiny, tmp_path)
    worker.handle(COORD, Reserve("k", prompt, GREEDY))
    worker.handle(COORD, PrefillHere("k"))
    worker.on_events(worker.step())  # its first token
    tokens = [m.token_id for _, m in worker.io.take() if hasattr(m, "token_id")]
    for role, cls in (("colocated", ColocatedWorker), ("decode", DecodeWorker)):
        worker.on_events(worker.step())
        worker._switch_message(COORD, SwitchRole(role))
        assert worker.switch.tick(worker.io.flush)  # at once: the request stays
        worker = cls(replace(worker.config, role=role), tmp_path, worker.stop, carry=worker.carry())
        worker.announce()
        sent = [m for _, m in worker.io.take()]
        tokens += [t for m in sent if isinstance(m, Tokens) for t in m.token_ids]
        [switched] = [m for m in sent if isinstance(m, RoleSwitched)]
        assert (switched.role, switched.kept, switched.moved, switched.finished) == (role, 1, 0, 0)
        assert set(worker.requests) == {"k"}
    _run(worker)
    tokens += [t for _, m in worker.io.take() if isinstance(m, Tokens) for t in m.token_ids]
    assert tokens == _expected(tiny[1], list(prompt)) and worker.requests == {}
    assert worker.engine.pool.num_free == worker.engine.num_blocks


@pytest.mark.parametrize("elastic", [False, True])
def test_refusals(tiny: tuple[Path, LoadedModel], tmp_path: Path, elastic: bool) -> None:
    decode = _worker(DecodeWorker, tiny, tmp_path, elastic=elastic)
    decode._switch_message(COORD, SwitchRole("prefill"))
    if not elastic:
        [(_, answer)] = decode.io.take()
        assert isinstance(answer, RoleSwitched) and answer.role == "decode" and "--elastic" in answer.refused
        assert decode.switch is None
        return
    decode._switch_message(COORD, SwitchRole("colocated"))
    [(_, answer)] = decode.io.take()
    assert answer.refused == "it is already switching to prefill"
    decode._switch_message(COORD, MoveOut("nobody", DECODE_ADDR))
    [(_, err)] = decode.io.take()
    assert isinstance(err, Error) and err.reason == "unknown"
    decode.io.inbox = queue.Queue()
    decode.io.inbox.put((COORD, Reserve("new", (1, 2, 3), GREEDY)))
    decode._drain(block=False)  # a request that raced the coordinator's routing: retried elsewhere
    [(_, err)] = decode.io.take()
    assert isinstance(err, Error) and err.reason == "draining" and "switching to prefill" in err.message


def test_park_takes_only_decoding_sequences(tiny: tuple[Path, LoadedModel]) -> None:
    engine = LLMEngine(tiny[1], EngineConfig(block_size=BLOCK, kv_cache_tokens=64))
    engine.add_request("p", [1, 2, 3, 4, 5], GREEDY)
    assert engine.park("p") is None and engine.park("missing") is None  # its prompt is not computed
    engine.step()
    seq = engine.park("p")
    assert seq is not None and seq.num_computed_tokens == seq.num_tokens - 1 == 5
    assert not engine.has_unfinished() and engine.blocks_held("p") == 2  # out of the batch, KV kept
    engine.abort("p")
    assert engine.pool.num_free == engine.num_blocks
