"""Which worker serves the next request: the coordinator's view of its workers and the policies.

Pure: no sockets, no clock of its own. The client (`coordinator/client.py`) owns the records'
life cycle:
1. a `WorkerRecord` per connected worker, made after its handshake;
2. `Router.pick(role)` chooses a live worker and counts the request in flight there;
3. heartbeats refresh `stats` (the worker's own queue and pool figures);
4. `release(record)` when the request ends there; `mark_dead` when the worker falls silent.

Policies: `round-robin` cycles through live workers of the role in the order given;
`least-loaded` takes the smallest in-flight + waiting count, then the most free KV blocks, then
the earliest listed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from disagg_cli.errors import DisaggError, UsageError
from disagg_cli.kv.wire import WORKER_ROLES

POLICIES = ("round-robin", "least-loaded")


class NoWorkerError(DisaggError):
    """No live worker of a role is left to take a request."""


@dataclass
class WorkerRecord:
    address: str
    role: str
    num_inflight: int = 0  # requests this coordinator has routed here and not yet seen end
    stats: dict[str, float] = field(default_factory=dict)  # the last heartbeat's figures
    is_alive: bool = True

    @property
    def load(self) -> float:
        return self.num_inflight + float(self.stats.get("waiting", 0))

    @property
    def free_blocks(self) -> float:
        return float(self.stats.get("free_blocks", 0))


class Router:
    def __init__(self, workers: list[WorkerRecord], policy: str = "round-robin") -> None:
        if policy not in POLICIES:
            raise UsageError(f"--router must be one of {', '.join(POLICIES)}, got {policy!r}")
        for w in workers:
            assert w.role in WORKER_ROLES, w.role
        addresses = [w.address for w in workers]
        assert len(set(addresses)) == len(addresses), f"duplicate worker addresses in {addresses}"
        self.workers = list(workers)
        self.policy = policy
        self._next: dict[str, int] = {}  # role → index into that role's list for round-robin

    def by_role(self, role: str) -> list[WorkerRecord]:
        return [w for w in self.workers if w.role == role]

    def get(self, address: str) -> WorkerRecord:
        for w in self.workers:
            if w.address == address:
                return w
        raise KeyError(address)

    def pick(self, role: str, avoid: Collection[str] = ()) -> WorkerRecord:
        """A live worker of `role`, counted as having one more request in flight; workers whose
        address is in `avoid` (they stalled this request before) only when no other is alive."""
        everyone = self.by_role(role)
        live = [w for w in everyone if w.is_alive]
        if not live:
            known = ", ".join(w.address for w in everyone) or "none configured"
            raise NoWorkerError(f"no live {role} worker left (known: {known})")
        if any(w.address not in avoid for w in live):
            live = [w for w in live if w.address not in avoid]
        if self.policy == "round-robin":
            start = self._next.get(role, 0)
            # Walk from the cursor over the full list so a dead worker's turn passes to the next.
            for step in range(len(everyone)):
                w = everyone[(start + step) % len(everyone)]
                if w in live:
                    self._next[role] = (start + step + 1) % len(everyone)
                    break
        else:
            w = min(live, key=lambda r: (r.load, -r.free_blocks, everyone.index(r)))
        w.num_inflight += 1
        return w

    def add(self, record: WorkerRecord) -> None:
        assert record.role in WORKER_ROLES, record.role
        assert all(w.address != record.address for w in self.workers), record.address
        self.workers.append(record)

    def remove(self, address: str) -> None:
        self.workers.remove(self.get(address))

    def release(self, record: WorkerRecord) -> None:
        assert record.num_inflight > 0, f"release without pick on {record.address}"
        record.num_inflight -= 1

    def update_stats(self, address: str, stats: dict[str, float]) -> None:
        self.get(address).stats = dict(stats)

    def mark_dead(self, address: str) -> None:
        self.get(address).is_alive = False

    def mark_alive(self, address: str) -> None:
        """A worker that was taken as dead answered a new hello (restarted): route to it again."""
        w = self.get(address)
        w.is_alive = True
        w.stats = {}
