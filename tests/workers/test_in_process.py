"""Workers hosted in threads of one process (as a test, a Ray actor or any host runs them): the
same role code as the worker processes, started and stopped by method calls, serving the coordinator
over real sockets; greedy output equals the in-process engine and every block ends free."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams, WorkerConfig
from disagg_cli.coordinator.coordinator import Coordinator
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.request import RequestOutput
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer
from disagg_cli.workers.roles import ROLE_CLASSES
from disagg_cli.workers.worker import Worker
from tests.workers.peer import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 4, 5,"]
SAMPLING = SamplingParams(max_tokens=12, ignore_eos=True)


def test_prefill_and_decode_in_threads(default_gguf: Path, default_model: LoadedModel,
                                       default_tokenizer: Tokenizer) -> None:
    engine = LLMEngine(default_model, EngineConfig(kv_cache_tokens=1024))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), default_tokenizer.encode(p), SAMPLING)
    expected: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for ev in engine.step():
            expected[ev.request_id].append(ev.token_id)

    def config(role: str) -> WorkerConfig:
        return WorkerConfig(role=role, model=str(default_gguf), host="127.0.0.1", port=free_port(),
                            runtime=RuntimeConfig(dtype="float32", threads=1),
                            engine=EngineConfig(kv_cache_tokens=1024), kv_codec="none")

    workers: list[Worker] = [ROLE_CLASSES[role](config(role), None) for role in ("prefill", "decode")]
    codes: list[int] = []
    threads = [threading.Thread(target=lambda w=w: codes.append(w.serve()), name=w.config.role) for w in workers]
    for t in threads:
        t.start()
    outs = [RequestOutput(f"r{i}", p, default_tokenizer.encode(p), SAMPLING, default_tokenizer)
            for i, p in enumerate(PROMPTS)]

    async def run() -> dict[str, dict[str, float]]:
        addresses = [(w.config.role, w.address) for w in workers]
        async with Coordinator(addresses, default_tokenizer.eos_token_ids) as coordinator:
            await asyncio.wait_for(coordinator.connect(), 60)
            await asyncio.wait_for(asyncio.gather(*(coordinator.run_request(o) for o in outs)), 120)
            return await coordinator.connections.wait_idle()

    try:
        stats = asyncio.run(run())
    finally:
        for w in workers:
            w.request_stop()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert codes == [0, 0]
    assert [o.token_ids for o in outs] == [expected[str(i)] for i in range(len(PROMPTS))]
    assert all(s["free_blocks"] == s["num_blocks"] for s in stats.values()), stats
    assert all(w.engine.pool.num_free == w.engine.pool.num_blocks for w in workers)
