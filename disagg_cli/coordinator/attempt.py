"""One attempt at a request, as the `Coordinator` (`coordinator.py`) drives it: the id it has on
the wire, the prompt it prefills, where its replies arrive and which workers still hold it; and
which failures another attempt may mend (`RETRYABLE`), after what pause (`BACKOFF_S`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.router import WorkerRecord
from disagg_cli.coordinator.worker_link import WorkerGone, WorkerLink
from disagg_cli.engine.request import RequestOutput
from disagg_cli.protocol import Message

# Failures another worker can mend: the worker (and the request's KV there) is gone, not the request.
RETRYABLE = frozenset({"worker-dead", "shutdown", "draining", "truncated", "no-hello", "peer-restarted",
                       "peer-unreachable", "stalled"})
BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)  # pause before retry n, so a failing worker is not hammered

@dataclass(eq=False)
class Attempt:
    """One attempt at a request: its id on the wire, and the prompt it prefills (a retry's prompt
    includes the tokens produced before the failure)."""

    out: RequestOutput
    on_text: Callable[[str], None] | None
    queue: asyncio.Queue[tuple[WorkerLink, Message | WorkerGone]]
    wire_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    deadline: float  # time.monotonic() by which the whole request (all attempts) must end
    avoid: set[str]  # addresses that stalled an earlier attempt (shared by all attempts)
    active: list[WorkerLink] = field(default_factory=list)  # workers still holding the request
    got_first: bool = False
    decode: WorkerRecord | None = None  # the decode worker of a disaggregated attempt
    queued: tuple[WorkerRecord, int] | None = None  # prompt tokens counted as queued at a prefill worker
    ended: bool = False  # its workers were told to abort: a role switch must not add one any more

    @property
    def produced(self) -> tuple[int, ...]:
        """The tokens this attempt's workers produced so far (a retry's prompt holds the earlier ones)."""
        return tuple(self.out.token_ids[len(self.prompt_ids) - len(self.out.prompt_token_ids):])

    def emit(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text)
