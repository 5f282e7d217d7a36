"""Dead, stopped and restarted workers: SIGKILL a decode or prefill worker mid-request and every request
is still answered (retried elsewhere, re-prefilled since its KV died), or failed with a clear reason
when no worker of that role comes back in time; SIGSTOP one and its requests are retried elsewhere
once their progress deadline passes; restart one and requests wait for it. Survivors end with every
KV block free.

Tests on the same topology share its cluster (`clusters`): a worker a test killed is restarted
before the next test on that topology, a model load instead of a whole cluster's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from disagg_cli.config import Deadlines, EngineConfig, SamplingParams
from disagg_cli.coordinator.cluster import LocalCluster
from disagg_cli.coordinator.coordinator import Coordinator, CoordinatorConfig
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
# float32 pinned: the texts are checked against the float32 reference, and `--dtype auto` picks
# bfloat16 for prefill workers on CPUs that compute it natively
PREFILL = WorkerSpec("prefill", dtype="float32", quantization="none", kv_codec="none", kv_cache_tokens=1024, threads=1)
DECODE = WorkerSpec("decode", dtype="float32", quantization="none", kv_cache_tokens=1024, threads=1)


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


@pytest.fixture(scope="module")
def clusters(default_gguf: Path) -> Iterator[Callable[[ClusterConfig], LocalCluster]]:
    """`clusters(topology)`: that topology's running cluster, started the first time, and with every worker
    that exited since (killed by the test before) started again on its port."""
    running: dict[ClusterConfig, LocalCluster] = {}

    def get(topology: ClusterConfig) -> LocalCluster:
        cluster = running.get(topology)
        if cluster is None:
            cluster = running[topology] = LocalCluster(topology, str(default_gguf))
            cluster.start()
        for i, worker in enumerate(cluster.workers):
            if worker.process.poll() is not None:
                cluster.restart(i)
        return cluster

    try:
        yield get
    finally:
        for cluster in running.values():
            cluster.stop()


def run_with_kill(cluster: LocalCluster, tokenizer: Tokenizer, victim: int,
                  kill_after_tokens: int = 0, kill_while_prefilling: bool = False, prompts: list[str] = PROMPTS,
                  config: CoordinatorConfig = CoordinatorConfig(worker_timeout_s=2.0, heartbeat_interval_s=0.5),
                  signum: int = signal.SIGKILL, then: Callable[[LocalCluster], Awaitable[None]] | None = None,
                  after: Callable[[LocalCluster], None] | None = None, sampling: SamplingParams = SAMPLING,
                  ) -> tuple[list[RequestOutput], dict[str, dict[str, float]]]:
    """Run every prompt at once; send `signum` to worker `victim` once some request has that many
    tokens, or (`kill_while_prefilling`) while the victim is prefilling one; then await `then`;
    call `after` once every request ended, before the workers' final stats are read."""
    outs = [RequestOutput(f"r{i}", p, tokenizer.encode(p), sampling, tokenizer) for i, p in enumerate(prompts)]

    async def run(cluster: LocalCluster) -> dict[str, dict[str, float]]:
        async with Coordinator(cluster.addresses(), tokenizer.eos_token_ids, config) as coordinator:
            await asyncio.wait_for(coordinator.connect(cluster.check), 150)
            tasks = [asyncio.create_task(coordinator.run_request(o)) for o in outs]
            address = cluster.workers[victim].address

            def ready() -> bool:
                if kill_while_prefilling:
                    return any(o.state == "prefilling" and o.workers.get("prefill") == address for o in outs)
                return max(len(o.token_ids) for o in outs) >= kill_after_tokens

            while not ready():
                # A moment that never comes (every request ended first) fails here, never hangs.
                assert not all(t.done() for t in tasks), "every request ended before the kill point"
                await asyncio.sleep(0.005)
            cluster.workers[victim].process.send_signal(signum)
            if then is not None:
                await then(cluster)
            await asyncio.wait_for(asyncio.gather(*tasks), 180)
            if after is not None:
                after(cluster)
            return await coordinator.connections.wait_idle(timeout_s=20)

    return outs, asyncio.run(run(cluster))


def assert_free(stats: dict[str, dict[str, float]]) -> None:
    for address, s in stats.items():
        assert s["free_blocks"] == s["num_blocks"] and s["reserved_blocks"] == 0, (address, s)


def test_decode_worker_killed_mid_stream(default_gguf: Path, default_tokenizer: Tokenizer, expected, clusters) -> None:
    cluster = clusters(ClusterConfig(str(default_gguf), (PREFILL, DECODE, DECODE)))
    outs, stats = run_with_kill(cluster, default_tokenizer, victim=1, kill_after_tokens=8)
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
    few = SamplingParams(max_tokens=8, ignore_eos=True)  # what is tested here ends with the prefill
    with LocalCluster(topology, str(default_gguf)) as cluster:  # the only test on this topology
        outs, stats = run_with_kill(cluster, default_tokenizer, victim=0, kill_while_prefilling=True,
                                    prompts=long_prompts, sampling=few)
    assert all(o.state == "done" and len(o.token_ids) == few.max_tokens for o in outs), \
        [(o.request_id, o.error) for o in outs]
    retried = [o for o in outs if o.kv.get("retries")]
    assert retried  # those the victim was prefilling went to the other prefill worker
    assert len(stats) == 2
    assert_free(stats)


def test_last_decode_worker_killed_fails_with_reason(default_gguf: Path, default_tokenizer: Tokenizer,
                                                    clusters) -> None:
    """No decode worker comes back within the request deadline: each request fails, saying why."""
    cluster = clusters(ClusterConfig(str(default_gguf), (PREFILL, DECODE)))
    config = CoordinatorConfig(worker_timeout_s=2.0, heartbeat_interval_s=0.5, deadlines=Deadlines(request_s=8.0))
    outs, stats = run_with_kill(cluster, default_tokenizer, victim=1, kill_after_tokens=4, config=config)
    for o in outs:
        assert o.state == "failed" and o.finish_reason == "no-worker", (o.request_id, o.state, o.error)
        assert "no live decode worker" in (o.error or "") and "--request-timeout 8 s" in (o.error or "")
    assert_free(stats)


def test_last_decode_worker_restarted_requests_wait(default_gguf: Path, default_tokenizer: Tokenizer,
                                                    expected: list[list[int]], clusters) -> None:
    """The only decode worker dies mid-stream and comes back: requests wait for it instead of
    failing, and are all answered."""
    cluster = clusters(ClusterConfig(str(default_gguf), (PREFILL, DECODE)))

    async def restart_later(cluster: LocalCluster) -> None:
        await asyncio.to_thread(cluster.workers[1].process.wait)
        await asyncio.sleep(3.0)  # long enough for the coordinator to see it dead
        cluster.restart(1)

    outs, stats = run_with_kill(cluster, default_tokenizer, victim=1, kill_after_tokens=4, then=restart_later)
    assert all(o.state == "done" and len(o.token_ids) == NUM_TOKENS for o in outs), \
        [(o.request_id, o.error) for o in outs]
    assert all(o.kv.get("retries", 0) >= 1 for o in outs)
    for o, ref in zip(outs, expected, strict=True):
        assert sum(a == b for a, b in zip(o.token_ids, ref, strict=True)) >= NUM_TOKENS - 4, o.request_id
    assert len(stats) == 2
    assert_free(stats)


def test_stopped_worker_stalls_and_requests_move(default_gguf: Path, default_tokenizer: Tokenizer,
                                                 expected: list[list[int]], clusters) -> None:
    """A decode worker that stops answering without dying (SIGSTOP), with heartbeats too patient
    to call it dead: once the token deadline passes, its requests are aborted there and retried on
    the other decode worker. Resumed, it frees every block the aborts named."""
    cluster = clusters(ClusterConfig(str(default_gguf), (PREFILL, DECODE, DECODE)))
    config = CoordinatorConfig(worker_timeout_s=120.0, heartbeat_interval_s=0.5, deadlines=Deadlines(token_s=4.0))
    pids: list[int] = []
    survivor: list[str] = []

    async def note(cluster: LocalCluster) -> None:
        pids.append(cluster.workers[1].process.pid)
        survivor.append(cluster.workers[2].address)

    def resume(cluster: LocalCluster) -> None:
        os.kill(cluster.workers[1].process.pid, signal.SIGCONT)

    try:
        outs, stats = run_with_kill(cluster, default_tokenizer, victim=1, kill_after_tokens=6, config=config,
                                    signum=signal.SIGSTOP, then=note, after=resume)
    finally:
        for pid in pids:  # never leave a stopped process behind, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert all(o.state == "done" and len(o.token_ids) == NUM_TOKENS for o in outs), \
        [(o.request_id, o.error) for o in outs]
    moved = [o for o in outs if o.kv.get("retries")]
    assert moved and all(o.workers["decode"] == survivor[0] for o in moved)
    for o, ref in zip(outs, expected, strict=True):
        assert sum(a == b for a, b in zip(o.token_ids, ref, strict=True)) >= NUM_TOKENS - 4, o.request_id
    assert len(stats) == 3  # the stopped worker too, resumed: the aborts it was sent freed its blocks
    assert_free(stats)


def test_restarted_worker_rejoins(default_gguf: Path, default_tokenizer: Tokenizer, clusters) -> None:
    cluster = clusters(ClusterConfig(str(default_gguf), (PREFILL, DECODE)))
    (_, paddr), (_, daddr) = cluster.addresses()
    prefill_log = cluster.workers[0].log_path
    log_start = prefill_log.stat().st_size  # what this test adds to the shared prefill worker's log
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def request(rid: str) -> RequestOutput:
        return RequestOutput(rid, PROMPTS[0], default_tokenizer.encode(PROMPTS[0]), params, default_tokenizer)

    async def until(predicate, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
        for _ in range(int(timeout_s / 0.1)):
            if predicate():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s:g} s")

    async def run() -> tuple[RequestOutput, RequestOutput]:
        config = CoordinatorConfig(worker_timeout_s=2.0, heartbeat_interval_s=0.3)
        async with Coordinator([("prefill", paddr), ("decode", daddr)], default_tokenizer.eos_token_ids,
                               config) as coordinator:
            await asyncio.wait_for(coordinator.connect(cluster.check), 150)
            before = request("before")
            await coordinator.run_request(before)
            cluster.workers[1].process.kill()
            cluster.workers[1].process.wait()
            record = coordinator.router.get(daddr)
            await until(lambda: not record.is_alive, 15)
            cluster.restart(1)  # a new process on the same port
            await until(lambda: record.is_alive, 240)  # a fresh process loads the model: slow on a loaded box
            after = request("after")
            await coordinator.run_request(after)
            return before, after

    before, after = asyncio.run(run())
    assert before.state == after.state == "done", (before.error, after.error)
    assert after.token_ids == before.token_ids
    # The prefill worker greeted the new decode process before streaming to it: no KV was
    # refused, so the request needed no retry (it used to be refused, then hang or retry).
    assert "retries" not in after.kv, after.kv
    with prefill_log.open("rb") as log:
        log.seek(log_start)
        assert b"no-hello" not in log.read()
