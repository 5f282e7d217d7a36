"""The coordinator service on a real local cluster, without HTTP: submit → deltas, closing a stream
or `abort(id)` frees every KV block on both workers, refusals come before any work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.options import ServeOptions
from disagg_cli.coordinator.refusals import QueueFullError
from disagg_cli.coordinator.service import CoordinatorService, ServiceConfig
from disagg_cli.errors import ContextLengthError
from disagg_cli.model.registry import default_cache_dir

pytestmark = pytest.mark.slow

TIMEOUT_S = 240.0
LONG = SamplingParams(max_tokens=2000, ignore_eos=True)


def test_submit_stream_abort_and_refusals(default_gguf: Path) -> None:
    config = ServiceConfig(str(default_gguf), default_cache_dir(), serve=ServeOptions(), max_queued_requests=1)

    async def run() -> None:
        async with CoordinatorService(config) as service:
            assert service.health() == (True, "ok")
            assert {v.role for v in service.workers()} == {"prefill", "decode"}
            # A whole request: one delta per token, then the last with the finish reason and result.
            deltas = [d async for d in service.submit("The capital of France is", SamplingParams(max_tokens=4))]
            assert [len(d.token_ids) for d in deltas] == [1, 1, 1, 1, 0]
            last = deltas[-1]
            assert last.finish_reason == "length" and last.error is None and last.result is not None
            assert "".join(d.text for d in deltas) == last.result["text"]
            # Closing a stream early aborts the request on both workers.
            stream = service.submit([1, 2, 3, 4], LONG)
            assert [len((await stream.__anext__()).token_ids) for _ in range(3)] == [1, 1, 1]
            assert service.counts() == {"waiting": 0, "running": 1}
            await stream.aclose()
            blocks = await service.kv_blocks()
            assert len(blocks) == 2 and all(free == total for free, total in blocks.values()), blocks
            assert service.counts() == {"waiting": 0, "running": 0}
            # abort(id) does the same from outside the stream.
            stream = service.submit([5, 6, 7], LONG, request_id="mine")
            await stream.__anext__()
            assert service.abort("mine") and not service.abort("unknown")
            rest = [d async for d in stream]
            assert rest[-1].error == "aborted" and rest[-1].finish_reason is None
            blocks = await service.kv_blocks()
            assert all(free == total for free, total in blocks.values()), blocks
            # Refusals, before any work: past the context; the waiting queue full (limit 1).
            with pytest.raises(ContextLengthError, match="context is 8192 tokens"):
                service.submit([1] * 8190, SamplingParams(max_tokens=16))
            first = service.submit([1, 2], SamplingParams(max_tokens=1))  # waits until its task first runs
            with pytest.raises(QueueFullError, match="1 requests are waiting already"):
                service.submit([1, 2], SamplingParams(max_tokens=1))
            assert [d async for d in first][-1].finish_reason == "length"
        assert service.draining and service.coordinator is None and service.cluster is None

    asyncio.run(asyncio.wait_for(run(), TIMEOUT_S))
