"""One request's stream as the service hands it out: `Delta`s, the output that makes them, and
the `RequestStream` a front end iterates (closing it early aborts the request on its workers).

Life of one stream: a `Delta` per sampled token (its id, the text it made printable, possibly
empty, and its logprobs when asked for), then one last `Delta` with `finish_reason` ("stop",
"length") or `error` (the failure's reason code and message) and the request's `result`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from disagg_cli.engine.logprobs import TokenLogprobs
from disagg_cli.engine.request import RequestOutput


@dataclass(frozen=True, slots=True)
class Delta:
    """What one step of a request adds; the last one has `finish_reason` or `error`, and `result`."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length" on success
    error: str | None = None  # a failure's reason code ("aborted", "timeout", "no-worker", …)
    error_message: str | None = None
    result: dict[str, Any] | None = None  # RequestOutput.result(): timings, KV, workers
    logprobs: tuple[TokenLogprobs, ...] = ()  # beside `token_ids`, when the request asked for them

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class StreamingOutput(RequestOutput):
    """A RequestOutput that puts a Delta on its queue for every token and stamps its arrival."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deltas: asyncio.Queue[Delta] = asyncio.Queue()
        self.token_times_s: list[float] = []
        self.roles: dict[str, str] = {}  # every worker's role (address → role) when the service took it

    def result(self) -> dict[str, Any]:
        return super().result() | {"roles": dict(self.roles)}

    def append(self, token_id: int, logprobs: TokenLogprobs | None = None) -> str:
        self.token_times_s.append(time.perf_counter())
        text = super().append(token_id, logprobs)
        self.deltas.put_nowait(Delta((token_id,), text, logprobs=(logprobs,) if logprobs is not None else ()))
        return text

    def last_delta(self) -> Delta:
        if self.state == "done":
            return Delta(finish_reason=self.finish_reason, result=self.result())
        return Delta(error=self.finish_reason or "error", error_message=self.error or "ended without an answer",
                     result=self.result())


class RequestStream(AsyncIterator[Delta]):
    """The deltas of one submitted request; `aclose()` before the end aborts it on its workers."""

    def __init__(self, out: StreamingOutput, task: asyncio.Task[None]) -> None:
        self.out = out
        self._task = task
        self._ended = False

    @property
    def request_id(self) -> str:
        return self.out.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self._ended:
            raise StopAsyncIteration
        delta = await self.out.deltas.get()
        self._ended = delta.is_last
        return delta

    async def wait(self) -> StreamingOutput:
        """Read the deltas to the last one and return the output; cancelled first (Ctrl-C), the
        stream is closed, which aborts the request on its workers."""
        try:
            async for _ in self:
                pass
        finally:
            await self.aclose()
        return self.out

    def cancel(self) -> None:
        """Abort the request if it still runs, without waiting (safe inside a cancelled scope)."""
        if not self._task.done():
            self._task.cancel()

    async def aclose(self) -> None:
        self.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._ended = True
