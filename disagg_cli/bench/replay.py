"""Sending a workload at its times, respecting multi-turn dependencies; shared by the in-process
benchmark (`bench/serve.py`, a coordinator) and the HTTP one (`bench/http_client.py`, a server).

1. the workload is cut into chains (`workload.conversations`): a plain request is a chain of one,
   a conversation is its turns in order;
2. one task per chain waits for the chain's send time, then sends its requests one after the
   other (at most `max_concurrency` requests in flight over all chains): a follow-up turn's prompt
   is the previous turn's prompt ids + the ids that turn generated + its new message, and it is
   sent as soon as the previous answer is complete;
3. a failed turn ends its conversation: every later turn is failed too, without being sent, so
   each workload request has exactly one output, in workload order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

from disagg_cli import ui
from disagg_cli.bench.workload import BenchRequest, conversations, next_prompt
from disagg_cli.engine.request import Timings

SKIPPED = "previous-turn-failed"  # the failure reason of turns never sent


class ReplayOutput(Protocol):
    """What the driver needs of one request's output (`TimedOutput`, `HttpOutput`)."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    state: str
    timings: Timings

    def fail(self, reason: str, message: str) -> None: ...


Out = TypeVar("Out", bound=ReplayOutput)


async def replay(workload: list[BenchRequest], make: Callable[[int, list[int]], Out],
                 send: Callable[[Out], Awaitable[None]], label: str,
                 max_concurrency: int | None) -> tuple[list[Out], float, float]:
    """Send every request (`make(index, prompt_ids)` builds its output, `send` drives it to the end);
    returns the outputs in workload order, the duration (s) and the start (perf_counter)."""
    outputs: list[Out | None] = [None] * len(workload)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    with ui_progress(len(workload), label, enabled=ui.is_interactive()) as advance:
        start_s = time.perf_counter()

        async def chain(indices: list[int]) -> None:
            delay = start_s + workload[indices[0]].send_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            previous: Out | None = None
            for turn, i in enumerate(indices, start=1):
                prompt_ids = (list(workload[i].prompt_ids) if previous is None else
                              next_prompt(previous.prompt_token_ids, previous.token_ids, workload[i]))
                out = outputs[i] = make(i, prompt_ids)
                if previous is not None and previous.state != "done":
                    out.timings.arrival_s = time.perf_counter()
                    out.fail(SKIPPED, f"not sent: turn {turn - 1} of its conversation failed")
                else:
                    async with limit if limit is not None else contextlib.nullcontext():
                        out.timings.arrival_s = time.perf_counter()  # vLLM's clock starts when it is sent
                        await send(out)
                previous = out
                advance()

        await asyncio.gather(*(chain(indices) for indices in conversations(workload)))
        duration_s = time.perf_counter() - start_s
    assert all(o is not None for o in outputs), "every request has an output"
    return [o for o in outputs if o is not None], duration_s, start_s


@contextlib.contextmanager
def ui_progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A requests-done bar on stderr (a terminal only); yields the function that advances it."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=ui.err_console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
