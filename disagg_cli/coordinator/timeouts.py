"""Waits with a time limit that never lose a cancellation: the coordinator's `wait_for`.

Python 3.11's `asyncio.wait_for` (CPython gh-86296, fixed in 3.12) returns the awaited result and
drops the cancellation when a task is cancelled just after what it awaits has finished but before
the task resumed. A request task reading a queue that always holds a message (the coordinator
behind its workers' token stream, as on a loaded machine) is nearly always in that state, so
Ctrl-C's cancel was swallowed: the request decoded on to its last token while the front end
waited for it to end. `wait_within` waits with `asyncio.wait`, which re-raises every cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_within(aw: Awaitable[T], timeout_s: float) -> T:
    """`aw`'s result, or `asyncio.TimeoutError` after `timeout_s` (then `aw` is cancelled).

    Cancelled meanwhile, it cancels `aw` and raises `CancelledError`, even when `aw` had already
    finished (what it returned, e.g. a message taken from a queue, is dropped: the caller is on
    its way out)."""
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=max(0.0, timeout_s))
    except BaseException:
        fut.cancel()
        raise
    if not done:
        fut.cancel()  # not awaited: awaiting it could take (and hide) a cancellation meant for us
        raise asyncio.TimeoutError
    return fut.result()
