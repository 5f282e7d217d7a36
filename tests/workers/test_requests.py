"""One record per request on each worker: its state moves forward only, and `abort` from every state
frees everything the request held (exact block counts), on the tiny model with no socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_cli.config import RuntimeConfig
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.protocol import Error, FirstToken, KVDone, KVLayers, Prefill, PrefillHere, Reserve, Reserved
from disagg_cli.workers.decode import DecodeState, DecodeWorker
from disagg_cli.workers.prefill import PrefillState, PrefillWorker
from tests.tiny_models import random_weights, write_gguf
from tests.workers.test_role_logic import COORD, DECODE_ADDR, GREEDY, _deliver, _role


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    d = tmp_path_factory.mktemp("tiny")
    path = write_gguf(d / "tiny.gguf", random_weights(seed=5))
    return path, load_model(path, RuntimeConfig(dtype="float32", threads=1), cache_dir=d)

QUEUED, RESERVED, HERE, RUNNING = (DecodeState.QUEUED, DecodeState.RESERVED, DecodeState.PREFILLING_HERE,
                                   DecodeState.RUNNING)


def states(decode: DecodeWorker) -> dict[str, DecodeState]:
    return {rid: r.state for rid, r in decode.requests.items()}


def all_free(worker: DecodeWorker | PrefillWorker) -> bool:
    return worker.engine.pool.num_free == worker.engine.num_blocks == 6 and not worker.engine.has_unfinished()


def test_abort_from_queued_and_reserved_frees_exactly(tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    decode = _role(DecodeWorker, tiny, tmp_path, tokens=24)  # 6 blocks of 4
    decode.handle(COORD, Reserve("a", tuple(range(1, 12)), GREEDY))  # 11 tokens: 3 blocks
    decode.handle(COORD, Reserve("b", tuple(range(1, 14)), GREEDY))  # 13 tokens: 4, waits for a
    assert states(decode) == {"a": RESERVED, "b": QUEUED}
    assert decode.engine.pool.num_free == 3 and len(decode.reserved_kv) == 1
    decode.handle(COORD, KVDone("b", 5, 13, 2))  # KV of a request that is not RESERVED: ignored
    decode.handle(COORD, PrefillHere("b"))
    [(_, err)] = [m for m in decode.io.take() if isinstance(m[1], Error)]
    assert (err.request_id, err.reason) == ("b", "unknown") and states(decode)["b"] is QUEUED
    decode.abort("b", notify=True, reason="abort", message="gone")  # QUEUED: held no blocks
    assert states(decode) == {"a": RESERVED} and decode.engine.pool.num_free == 3
    assert decode.io.take() == [(COORD, Error("b", "abort", "gone"))]
    decode.abort("a", notify=False)  # RESERVED: its 3 blocks and its KV window
    assert decode.requests == {} and all_free(decode) and len(decode.reserved_kv) == 0


def test_abort_while_prefilling_here_and_running_frees_exactly(tiny: tuple[Path, LoadedModel],
                                                               tmp_path: Path) -> None:
    decode = _role(DecodeWorker, tiny, tmp_path, tokens=24)
    for rid in ("h", "r"):
        decode.handle(COORD, Reserve(rid, (21, 22, 23, 24, 25, 26), GREEDY))  # 6 tokens: 2 blocks each
        decode.handle(COORD, PrefillHere(rid))
    assert states(decode) == {"h": HERE, "r": HERE} and decode.engine.pool.num_free == 2
    assert len(decode.reserved_kv) == 0  # PrefillHere closed their KV windows
    decode.abort("h", notify=False)  # PREFILLING_HERE, not yet stepped
    assert states(decode) == {"r": HERE} and decode.engine.pool.num_free == 4
    decode.on_events(decode.step())  # r's prompt: its first token goes out from here
    assert states(decode) == {"r": RUNNING} and decode.engine.blocks_held("r") == 2
    sent = [m for _, m in decode.io.take()]
    assert [type(m) for m in sent] == [Reserved, Reserved, FirstToken]
    decode.on_events(decode.step())
    decode.abort("r", notify=False)  # RUNNING
    assert decode.requests == {} and all_free(decode)


def test_kv_done_runs_the_request_and_its_end_drops_the_record(tiny: tuple[Path, LoadedModel],
                                                               tmp_path: Path) -> None:
    prefill, decode = _role(PrefillWorker, tiny, tmp_path, tokens=24), _role(DecodeWorker, tiny, tmp_path, tokens=24)
    prompt = (7, 8, 9, 10, 11)  # 2 blocks
    decode.handle(COORD, Reserve("k", prompt, GREEDY))
    decode.handle(COORD, Reserve("j", prompt, GREEDY))
    prefill.handle(COORD, Prefill("k", prompt, GREEDY, DECODE_ADDR))
    prefill.on_events(prefill.step())
    assert prefill.requests == {} and prefill.handed_off["k"].state is PrefillState.HANDED_OFF
    assert all_free(prefill)  # freed at the hand-off
    _deliver(prefill, decode)
    assert states(decode) == {"k": RUNNING, "j": RESERVED} and decode.engine.pool.num_free == 2
    decode.abort("k", notify=False)  # RUNNING, joined by KVDone
    assert states(decode) == {"j": RESERVED} and decode.engine.pool.num_free == 4
    decode.abort("j", notify=False)
    assert decode.requests == {} and all_free(decode)
    decode.handle(COORD, Reserve("done", prompt, GREEDY))
    decode.handle(COORD, PrefillHere("done"))
    while decode.engine.has_unfinished():
        decode.on_events(decode.step())
    assert decode.requests == {} and all_free(decode)  # finished: record dropped, blocks freed


def test_prefill_abort_drops_its_queued_kv_and_frees_exactly(tiny: tuple[Path, LoadedModel],
                                                             tmp_path: Path) -> None:
    prefill = _role(PrefillWorker, tiny, tmp_path, tokens=24)
    prefill.handle(COORD, Prefill("w", (1, 2, 3, 4, 5), GREEDY, DECODE_ADDR))
    assert prefill.requests["w"].state is PrefillState.PREFILLING and prefill.engine.has_unfinished()
    prefill.abort("w", notify=False)  # waiting for a step
    assert prefill.requests == {} and all_free(prefill)
    prefill.handle(COORD, Prefill("s", (1, 2, 3, 4, 5), GREEDY, DECODE_ADDR))
    prefill.on_events(prefill.step())
    queued = [item for dest, item in prefill.io.take() if dest[0] == "peer"]
    assert len(queued) == 3 and isinstance(prefill.prepare(queued[0]), KVLayers)  # 2 layers and KVDone
    prefill.abort("s", notify=False)  # handed off, its last layer and KVDone not yet out
    assert [prefill.prepare(item) for item in queued[1:]] == [None, None] and all_free(prefill)
