"""Workers hosted in threads of one process (as a test, a Ray actor or any host runs them): the
same role code as the worker processes, started and stopped by method calls, serving the coordinator
over real sockets; greedy output equals the in-process engine and every block ends free."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from disagg_cli import core_lease
from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams, WorkerConfig
from disagg_cli.coordinator.coordinator import Coordinator
from disagg_cli.core_lease import CoreLease, LendConfig
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


def test_a_worker_marks_its_lease_busy_while_it_steps_and_idle_while_it_waits(
        default_gguf: Path, default_model: LoadedModel, default_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """The worker loop's part of a lease of cores (`core_lease.py`): its slot reads busy while a
    request is stepped and idle (lent) once there is nothing to step. The other slot stays busy, so
    this process's kernel borrows nothing meanwhile."""
    kernel = default_model.execution.backend.kernel
    if kernel is None:
        pytest.skip("the lease is the C kernel's; this model runs on torch")
    path = tmp_path / "cores.lease"
    core_lease.create(path, 2)
    lease = CoreLease(LendConfig(str(path), 0, (1, 1), (0, 1)))
    config = WorkerConfig(role="colocated", model=str(default_gguf), host="127.0.0.1", port=free_port(),
                          runtime=RuntimeConfig(dtype="float32", threads=1), engine=EngineConfig(kv_cache_tokens=1024))
    lease.attach(kernel.lib)
    worker = ROLE_CLASSES["colocated"](config, None, lm=default_model)
    host = threading.Thread(target=worker.serve, name="colocated")
    seen: list[bool] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            seen.append(lease.busy()[0])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, name="sampler")
    out = RequestOutput("r", PROMPTS[0], default_tokenizer.encode(PROMPTS[0]),
                        SamplingParams(max_tokens=48, ignore_eos=True), default_tokenizer)

    def until_idle() -> None:
        deadline = time.monotonic() + 30
        while lease.busy()[0]:  # nothing to step: lent (the file was made with every slot busy)
            assert time.monotonic() < deadline, "the worker never marked itself idle"
            time.sleep(0.01)

    async def run() -> None:
        async with Coordinator([("colocated", worker.address)], default_tokenizer.eos_token_ids) as coordinator:
            await asyncio.wait_for(coordinator.connect(), 60)
            until_idle()
            sampler.start()
            await asyncio.wait_for(coordinator.run_request(out), 120)

    host.start()
    try:
        asyncio.run(run())
        until_idle()
    finally:
        sampling.set()
        worker.request_stop()
        host.join(timeout=30)
        if sampler.is_alive():
            sampler.join(timeout=10)
        CoreLease.detach(kernel.lib)
    assert len(out.token_ids) == 48 and not host.is_alive()
    assert True in seen, "never busy while it stepped the request"
    assert lease.busy() == [False, True]
