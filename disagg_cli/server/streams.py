"""The choices of one HTTP request as the service streams them: submit, merge, collect, SSE.

One HTTP request becomes `prompts × n` service requests ("choices"), submitted all at once so a
refusal (context, queue full) answers before any of them runs. Their deltas are merged in the
order they arrive, tagged with the choice's index. However the merge ends (done, an error, the
client gone), every choice still running is aborted on its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.service import CoordinatorService
from disagg_cli.coordinator.stream import Delta, RequestStream
from disagg_cli.engine.logprobs import TokenLogprobs
from disagg_cli.errors import DisaggError
from disagg_cli.server.errors import from_service_error
from disagg_cli.server.params import choice_params

DISCONNECT_POLL_S = 0.5


def submit_choices(service: CoordinatorService, prompts: Sequence[list[int]], params: SamplingParams,
                   n: int) -> list[RequestStream]:
    """Choice `p * n + j` is sample j of prompt p (vLLM's order); all or none are submitted."""
    streams: list[RequestStream] = []
    try:
        for ids in prompts:
            for j in range(n):
                streams.append(service.submit(ids, choice_params(params, j)))
    except DisaggError as e:
        for s in streams:
            service.abort(s.request_id)
        raise from_service_error(e) from None
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) as they come, until every choice has sent its last delta."""
    queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        async for delta in stream:
            queue.put_nowait((index, delta))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    left = len(streams)
    try:
        while left:
            index, delta = await queue.get()
            left -= delta.is_last
            yield index, delta
    finally:
        # Cancel before any await: when the client hangs up, Starlette cancels this generator's
        # scope, and under anyio every later await in it is cancelled again at once.
        for s in streams:
            s.cancel()  # the request's own task sends Abort to its workers
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


@dataclass
class Choice:
    """What a non-streaming response needs of one choice."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    last: Delta | None = None


async def collect(streams: list[RequestStream], request: Request) -> list[Choice]:
    """Every choice to its end; a client that hangs up meanwhile aborts them all."""
    choices = [Choice() for _ in streams]

    async def consume() -> None:
        async for index, delta in merged(streams):
            c = choices[index]
            c.token_ids.extend(delta.token_ids)
            c.text.append(delta.text)
            c.logprobs.extend(delta.logprobs)
            if delta.is_last:
                c.last = delta

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return choices


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event as OpenAI and vLLM write them."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")
