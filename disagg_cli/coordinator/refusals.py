"""What the coordinator service answers besides a stream: why it refused a request (each error
maps to one HTTP status in `server/errors.py`), and its view of one worker for health, metrics and
the live table."""

from __future__ import annotations

from dataclasses import dataclass

from disagg_cli.errors import DisaggError, UsageError


class QueueFullError(DisaggError):
    """More requests wait than `max_queued_requests` allows; try again later."""


class OverloadedError(DisaggError):
    """Admission by load (`--admission slo`): the planner predicts this request would miss its TTFT
    target behind the prompts already queued; try again in about `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(DisaggError):
    """A role has no live worker: a new request is refused at once (the client may retry), while
    requests already in flight wait for a worker to come back, up to their deadline."""


class DrainingError(DisaggError):
    """The service is shutting down and takes no new requests."""


class InvalidPromptError(UsageError):
    """A prompt that cannot be served (empty, or token ids outside the vocabulary)."""


@dataclass(frozen=True, slots=True)
class WorkerView:
    role: str
    address: str
    is_alive: bool
    stats: dict[str, float]  # the last heartbeat's figures: waiting, running, free_blocks, num_blocks, …

    @property
    def kv_usage(self) -> float | None:
        num, free = self.stats.get("num_blocks"), self.stats.get("free_blocks")
        return None if not num or free is None else 1.0 - free / num
