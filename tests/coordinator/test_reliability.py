"""Dead workers: SIGKILL a decode or prefill worker mid-request and every request is still answered
(retried elsewhere, re-prefilled since its KV died), or failed with a clear reason when no worker
of that role is left. Survivors end with every KV block free."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.coordinator.client import Coordinator, CoordinatorConfig
from disagg_cli.coordinator.cluster import LocalCluster
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.request import RequestOutput
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, in a small village,",
           "1, 2, 3, 4, 5,"]
NUM_TOKENS = 40
SAMPLING = SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)
PREFILL = WorkerSpec("prefill", kv_codec="none", kv_cache_tokens=1024, threads=1)
DECODE = WorkerSpec("decode", kv_cache_tokens=1024, threads=1)


@pytest.fixture(scope="module")
def expected(default_model: LoadedModel, default_tokenizer: Tokenizer) -> list[list[int]]:
    engine = LLMEngine(default_model, EngineConfig(kv_cache_tokens=2048))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), default_tokenizer.encode(p), SAMPLING)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for ev in engine.step():
            got[ev.request_id].append(ev.token_id)
    return [got[str(i)] for i in range(len(PROMPTS))]


def run_with_kill(topology: ClusterConfig, model: Path, tokenizer: Tokenizer, victim: int,
                  kill_after_tokens: int = 0, kill_while_prefilling: bool = False, prompts: list[str] = PROMPTS,
                  ) -> tuple[list[RequestOutput], dict[str, dict[str, float]]]:
    """Run every prompt at once; SIGKILL worker `victim` once some request has that many tokens,
    or (`kill_while_prefilling`) while the victim is prefilling one."""
    outs = [RequestOutput(f"r{i}", p, tokenizer.encode(p), SAMPLING, tokenizer) for i, p in enumerate(prompts)]

    async def run(cluster: LocalCluster) -> dict[str, dict[str, float]]:
        config = CoordinatorConfig(worker_timeout_s=2.0, heartbeat_interval_s=0.5)
        async with Coordinator(cluster.addresses(), tokenizer.eos_token_ids, config) as coordinator:
            await asyncio.wait_for(coordinator.connect(cluster.check), 150)
            tasks = [asyncio.create_task(coordinator.run_request(o)) for o in outs]
            address = cluster.workers[victim].address

            def ready() -> bool:
                if kill_while_prefilling:
                    return any(o.state == "prefilling" and o.workers.get("prefill") == address for o in outs)
                return max(len(o.token_ids) for o in outs) >= kill_after_tokens

            while not ready():
                await asyncio.sleep(0.005)
            cluster.workers[victim].process.kill()
            await asyncio.wait_for(asyncio.gather(*tasks), 180)
            return await coordinator.wait_idle()

    with LocalCluster(topology, str(model)) as cluster:
        stats = asyncio.run(run(cluster))
    return outs, stats


def assert_free(stats: dict[str, dict[str, float]]) -> None:
    for address, s in stats.items():
        assert s["free_blocks"] == s["num_blocks"] and s["reserved_blocks"] == 0, (address, s)


def test_decode_worker_killed_mid_stream(default_gguf: Path, default_tokenizer: Tokenizer, expected) -> None:
    topology = ClusterConfig(str(default_gguf), (PREFILL, DECODE, DECODE))
    outs, stats = run_with_kill(topology, default_gguf, default_tokenizer, victim=1, kill_after_tokens=8)
    assert all(o.state == "done" for o in outs), [(o.request_id, o.error) for o in outs]
    assert sum(o.kv.get("retries", 0) for o in outs) >= 1  # the victim held some of them
    for o, ref in zip(outs, expected, strict=True):
        assert len(o.token_ids) == NUM_TOKENS
        # Retried requests re-prefill prompt + tokens so far: the text continues, nothing repeats.
        assert sum(a == b for a, b in zip(o.token_ids, ref, strict=True)) >= NUM_TOKENS - 4, o.request_id
    assert len(stats) == 2  # the dead worker no longer answers; the two survivors are all free
    assert_free(stats)


def test_prefill_worker_killed_while_prefilling(default_gguf: Path, default_tokenizer: Tokenizer) -> None:
    topology = ClusterConfig(str(default_gguf), (PREFILL, PREFILL, DECODE))
    long_prompts = [f"{p} " + "and so the story goes on, " * 40 for p in PROMPTS]  # ~300 tokens: slow prefill
    outs, stats = run_with_kill(topology, default_gguf, default_tokenizer, victim=0, kill_while_prefilling=True,
                                prompts=long_prompts)
    assert all(o.state == "done" and len(o.token_ids) == NUM_TOKENS for o in outs), \
        [(o.request_id, o.error) for o in outs]
    retried = [o for o in outs if o.kv.get("retries")]
    assert retried  # those the victim was prefilling went to the other prefill worker
    assert len(stats) == 2
    assert_free(stats)


def test_last_decode_worker_killed_fails_with_reason(default_gguf: Path, default_tokenizer: Tokenizer) -> None:
    topology = ClusterConfig(str(default_gguf), (PREFILL, DECODE))
    outs, stats = run_with_kill(topology, default_gguf, default_tokenizer, victim=1, kill_after_tokens=4)
    for o in outs:
        assert o.state == "failed" and o.finish_reason == "no-worker", (o.request_id, o.state, o.error)
        assert "decode" in (o.error or "")
    assert_free(stats)


def test_restarted_worker_rejoins(default_gguf: Path, default_tokenizer: Tokenizer, tmp_path: Path) -> None:
    from tests.workers.peer import free_port, start_worker

    pp, dp = free_port(), free_port()
    paddr, daddr = f"tcp://127.0.0.1:{pp}", f"tcp://127.0.0.1:{dp}"
    procs = [start_worker("prefill", pp, default_gguf, log=tmp_path / "p.log"),
             start_worker("decode", dp, default_gguf, log=tmp_path / "d.log")]
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def request(rid: str) -> RequestOutput:
        return RequestOutput(rid, PROMPTS[0], default_tokenizer.encode(PROMPTS[0]), params, default_tokenizer)

    async def until(predicate, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
        for _ in range(int(timeout_s / 0.1)):
            if predicate():
                return
            await asyncio.sleep(0.1)
        raise AssertionError("timed out")

    async def run() -> tuple[RequestOutput, RequestOutput]:
        config = CoordinatorConfig(worker_timeout_s=2.0, heartbeat_interval_s=0.3)
        async with Coordinator([("prefill", paddr), ("decode", daddr)], default_tokenizer.eos_token_ids,
                               config) as coordinator:
            await asyncio.wait_for(coordinator.connect(), 150)
            before = request("before")
            await coordinator.run_request(before)
            procs[1].kill()
            procs[1].wait()
            record = coordinator.router.get(daddr)
            await until(lambda: not record.is_alive, 15)
            procs[1] = start_worker("decode", dp, default_gguf, log=tmp_path / "d2.log")
            await until(lambda: record.is_alive, 120)
            after = request("after")
            await coordinator.run_request(after)
            return before, after

    try:
        before, after = asyncio.run(run())
        assert before.state == after.state == "done", (before.error, after.error)
        assert after.token_ids == before.token_ids
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
