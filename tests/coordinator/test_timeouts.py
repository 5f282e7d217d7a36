"""`wait_within` never loses a cancellation, where Python 3.11's `asyncio.wait_for` did: the cause
of Ctrl-C not ending `disagg generate` on a loaded machine."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from disagg_cli.coordinator.timeouts import wait_within

Wait = Callable[[Awaitable[Any], float], Awaitable[Any]]


async def _read_until(stop: asyncio.Event, wait: Wait, queue: asyncio.Queue[int]) -> None:
    while not stop.is_set():  # a request task's loop: the next message, with a progress deadline
        await wait(queue.get(), 10.0)


async def _cancels_that_end_the_reader(wait: Wait) -> list[bool]:
    """Cancel a reader whose queue always holds a message (the coordinator behind its token
    stream) at each point of its loop; for each, whether that one cancel ended it."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(10_000):
        queue.put_nowait(i)
    ended = []
    for phase in range(8):
        stop = asyncio.Event()
        task = asyncio.create_task(_read_until(stop, wait, queue))
        for _ in range(3 + phase):
            await asyncio.sleep(0)
        task.cancel()
        for _ in range(10):
            await asyncio.sleep(0)
        ended.append(task.done())
        stop.set()  # a reader that swallowed the cancel reads on: end it
        await asyncio.gather(task, return_exceptions=True)
    return ended


def test_a_cancel_always_ends_a_reader_with_a_backlog() -> None:
    assert asyncio.run(_cancels_that_end_the_reader(wait_within)) == [True] * 8


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for keeps cancellations since 3.12")
def test_the_race_is_real_for_asyncio_wait_for() -> None:
    """The scenario above does catch the bug: most cancels are lost with the standard wait_for."""
    assert not all(asyncio.run(_cancels_that_end_the_reader(asyncio.wait_for)))


def test_a_result_a_timeout_and_an_error_as_wait_for() -> None:
    async def main() -> None:
        assert await wait_within(asyncio.sleep(0, "done"), 1.0) == "done"
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await wait_within(never, 0.01)
        await asyncio.sleep(0)
        assert never.cancelled()  # what timed out is cancelled, as wait_for does

        async def fails() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await wait_within(fails(), 1.0)
        with pytest.raises(asyncio.TimeoutError):
            await wait_within(asyncio.sleep(1.0), -1.0)  # a deadline already passed

    asyncio.run(main())
