"""`bench serve`'s runner on the coordinator service, in this process, on real worker processes: a
request submitted while a role has no live worker waits for it (the benchmark's service does not
refuse it), a chaos kill restarts a worker of the service's own cluster, and after both every
request is answered and every KV block is free."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from disagg_cli.bench.runs import ServeBenchOptions
from disagg_cli.bench.serve import _bench, _chaos, prepare_workloads, service_config, topologies
from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.service import CoordinatorService
from disagg_cli.model.registry import default_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


async def until(condition, what: str, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {what}")


def test_requests_wait_for_a_killed_worker_and_chaos_restarts_it(default_gguf: Path) -> None:
    opts = ServeBenchOptions(str(default_gguf), default_cache_dir(), num_prompts=4, random_input_len=16,
                             random_output_len=8, ignore_eos=True)
    _, [(_, workload)] = prepare_workloads(opts)
    config = service_config(topologies(opts)["disagg"], opts)
    assert config.wait_for_workers

    async def run() -> None:
        async with CoordinatorService(config) as service:
            cluster = service.cluster
            assert cluster is not None and [w.spec.role for w in cluster.workers] == ["prefill", "decode"]
            # This test kills and restarts workers itself; the supervisor, 1 s after a kill, could restart
            # one before the service has seen it dead (test_supervision.py tests the supervisor).
            assert cluster.supervisor is not None
            cluster.supervisor.stop()
            # The only decode worker dies: once the service has noticed, a new request is still taken …
            cluster.workers[1].process.kill()
            await until(lambda: not service.health()[0], "noticed the dead decode worker")
            assert service.health() == (False, "no live decode worker")
            stream = service.submit(list(workload[0].prompt_ids), SamplingParams(max_tokens=8, ignore_eos=True))
            # … and answered once the worker is back on its port.
            cluster.restart(1)
            out = await asyncio.wait_for(stream.wait(), 180)
            assert (out.state, len(out.token_ids)) == ("done", 8), out.error

            # Chaos: kill a random worker of the service's cluster and start it again, then benchmark.
            pids = [w.process.pid for w in cluster.workers]
            kills: list[dict[str, object]] = []
            chaos = asyncio.create_task(_chaos(cluster, 0.2, opts.seed, kills))
            await until(lambda: bool(kills), "killed a worker")
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
            for kill in kills:
                index = kill["index"]
                assert isinstance(index, int)
                assert kill["role"] == cluster.workers[index].spec.role
                assert cluster.workers[index].process.pid != pids[index]  # a new process on the same port
            outputs, _, _ = await asyncio.wait_for(_bench(service, workload, opts, "disagg"), 240)
            assert [(o.request_id, o.state, len(o.token_ids), len(o.token_times_s)) for o in outputs] == [
                (f"disagg-{i}", "done", 8, 8) for i in range(4)], [o.error for o in outputs]
            blocks = await service.kv_blocks(timeout_s=30)
            assert len(blocks) == 2 and all(free == total > 0 for free, total in blocks.values()), blocks
        assert service.cluster is None  # stopped with the service

    asyncio.run(run())
