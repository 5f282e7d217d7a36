"""What the coordinator service says of itself: its requests waiting and running, its view of the
workers, and whether it is healthy (a role with no live worker, or draining, is not).

The health route, the metrics and the live table read these, and `submit` refuses a request while
the service is unhealthy and will not recover. `ServiceHealth` only reads the state that
`CoordinatorService` (`service.py`, which this is a part of) keeps, so it lives apart from the
service's life and its requests.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from disagg_cli.coordinator.refusals import WorkerView
from disagg_cli.coordinator.stream import StreamingOutput
from disagg_cli.protocol.names import CAN_DECODE, CAN_PREFILL

if TYPE_CHECKING:
    from disagg_cli.coordinator.cluster import LocalCluster
    from disagg_cli.coordinator.coordinator import Coordinator

WAITING_STATES = ("queued", "reserving")  # not yet past the decode worker's memory check


class ServiceHealth:
    """Counts, workers and health of a `CoordinatorService`; see the module docstring."""

    # Set by `CoordinatorService`, which this is a part of.
    draining: bool
    in_flight: dict[str, tuple[StreamingOutput, asyncio.Task[None]]]
    coordinator: Coordinator | None
    cluster: LocalCluster | None

    def counts(self) -> dict[str, int]:
        outs = [out for out, _ in self.in_flight.values()]
        waiting = sum(out.state in WAITING_STATES for out in outs)
        return {"waiting": waiting, "running": len(outs) - waiting}

    def workers(self) -> list[WorkerView]:
        if self.coordinator is None:
            return []
        return [WorkerView(w.role, w.address, w.is_alive, dict(w.stats)) for w in self.coordinator.router.workers]

    def health(self) -> tuple[bool, str]:
        """(healthy, why): unhealthy while draining or while a needed role has no live worker."""
        if self.draining:
            return False, "draining"
        views = self.workers()
        if not views:
            return False, "not connected to any worker"
        dead = _dead_roles(views)
        if dead:
            return False, "no live " + " or ".join(dead) + " worker"
        return True, "ok"

    def _will_recover(self) -> bool:
        """Every role without a live worker has one that supervision is starting again: a new request
        waits for it, as the ones in flight do, instead of a 503."""
        dead = _dead_roles(self.workers())
        return (bool(dead) and not self.draining and self.cluster is not None
                and set(dead) <= self.cluster.returning_roles())


def _dead_roles(views: list[WorkerView]) -> list[str]:
    """The roles the service needs that have no live worker among `views`. A colocated worker does
    both phases, so one among prefill and decode workers (the planner made it so) stands for either."""
    roles = {v.role for v in views}
    if roles == {"colocated"}:
        return [] if any(v.is_alive for v in views) else ["colocated"]
    able = {"prefill": CAN_PREFILL, "decode": CAN_DECODE}
    return [role for role, who in able.items() if not any(v.is_alive for v in views if v.role in who)]
