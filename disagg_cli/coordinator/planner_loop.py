"""The planner in the service: every `interval_s` a snapshot of what the service measures, the
planner's plan (`planner.py`), and each change applied with the coordinator's `switch_role`.

Owned by the `CoordinatorService` (`service.py`), which makes one when `--planner slo` or
`--admission slo` is given and starts its task only for the planner:
1. `note_finished(out)` for every request that ends (the service's `on_finished`): its TTFT and
   TPOT join the recent window;
2. `snapshot()`: per worker the router's record (role, liveness, prompt tokens routed there and not
   yet computed) and last heartbeat (running decodes, prefill tok/s, decode step ms, threads); the
   prompt tokens of requests not yet at a worker; the recent TTFTs and TPOTs;
3. `tick()`: the plan; each change is a log line and `await coordinator.switch_role(address, role)`,
   whose outcome (or failure) is kept in `changes` for /metrics, the live table and the benchmark;
4. `stop()` cancels the task (the service does it before it closes the coordinator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from disagg_cli.coordinator.planner import Plan, Planner, PlannerConfig, admit
from disagg_cli.coordinator.predictions import Snapshot, WorkerSnapshot
from disagg_cli.coordinator.role_switch import SWITCH_TIMEOUT_S, SwitchOutcome
from disagg_cli.coordinator.router import Router
from disagg_cli.coordinator.timeouts import wait_within
from disagg_cli.engine.request import RequestOutput
from disagg_cli.errors import DisaggError
from disagg_cli.protocol.names import CAN_DECODE

log = logging.getLogger(__name__)
PENDING_STATES = ("queued", "reserving")  # not yet at any worker that computes prompts


class RoleSwitcher(Protocol):
    """The coordinator as the loop uses it: its router (read) and the in-place role switch."""

    @property
    def router(self) -> Router: ...

    async def switch_role(self, address: str, role: str) -> SwitchOutcome: ...


@dataclass(frozen=True, slots=True)
class RoleChange:
    """One applied (or failed) decision, as /metrics, the live table and `bench serve` report it."""

    t_s: float  # the loop's clock (time.perf_counter, as token times), when the switch began
    address: str
    old_role: str
    new_role: str
    reason: str
    ok: bool
    requests_moved: int = 0
    seconds: float = 0.0
    longest_pause_s: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"t_s": round(self.t_s, 3), "address": self.address, "from": self.old_role, "to": self.new_role,
                "reason": self.reason, "ok": self.ok, "requests_moved": self.requests_moved,
                "seconds": round(self.seconds, 3), "longest_pause_s": round(self.longest_pause_s, 3),
                "error": self.error}


class PlannerLoop:
    """See the module docstring."""

    def __init__(self, config: PlannerConfig, coordinator: RoleSwitcher, outputs: Callable[[], Iterable[RequestOutput]],
                 clock: Callable[[], float] = time.perf_counter, lenders: frozenset[str] = frozenset()) -> None:
        """lenders: the addresses of workers that share a lease of cores (`core_lease.py`)."""
        self.config = config
        self.lenders = lenders
        self.coordinator = coordinator
        self.planner = Planner(config)
        self._outputs = outputs  # the requests in flight
        self._clock = clock
        self._recent: deque[tuple[float, float | None, float | None]] = deque()  # (ended, ttft ms, tpot ms)
        self.last_plan: Plan | None = None
        self.changes: list[RoleChange] = []
        self.switches: Counter[tuple[str, str]] = Counter()  # (from, to) → switches made
        self._task: asyncio.Task[None] | None = None

    # --- what it measures ---------------------------------------------------------------------------

    def note_finished(self, out: RequestOutput) -> None:
        t = out.timings
        if out.state == "done":
            self._recent.append((self._clock(), t.ttft_ms(), t.tpot_ms(len(out.token_ids))))

    def snapshot(self) -> Snapshot:
        now = self._clock()
        while self._recent and self._recent[0][0] < now - self.config.window_s:
            self._recent.popleft()
        router = self.coordinator.router
        here: Counter[str] = Counter()  # prompt tokens a decode worker computes itself (selective disaggregation)
        pending = 0
        for out in self._outputs():
            if out.state in PENDING_STATES:
                pending += len(out.prompt_token_ids)
            elif out.state == "prefilling" and "decode" in out.workers and "prefill" not in out.workers:
                here[out.workers["decode"]] += len(out.prompt_token_ids)
        workers = []
        for w in router.workers:
            s = w.last_stats
            workers.append(WorkerSnapshot(
                w.address, w.role, w.is_alive, w.queued_tokens + here[w.address],
                s.running if s is not None and w.role in CAN_DECODE else 0,
                s.prefill_tokens_per_s if s is not None else 0.0, s.decode_step_ms if s is not None else 0.0,
                s.threads if s is not None else 1, w.max_step_ms, w.address in self.lenders))
        return Snapshot(now, tuple(workers), pending,
                        tuple(x for _, x, _ in self._recent if x is not None),
                        tuple(x for _, _, x in self._recent if x is not None))

    def roles(self) -> dict[str, str]:
        return {w.address: w.role for w in self.coordinator.router.workers}

    def admit(self, prompt_tokens: int) -> tuple[bool, float]:
        """Whether a new prompt is predicted to meet the TTFT target behind what is queued; and that TTFT."""
        return admit(self.snapshot(), prompt_tokens, self.config.slo_ttft_ms)

    # --- deciding and switching -----------------------------------------------------------------------

    async def tick(self) -> Plan:
        plan = self.planner.tick(self.snapshot())
        self.last_plan = plan
        log.debug("planner: %s", plan.summary)
        for change in plan.changes:
            log.warning("planner: %s %s → %s: %s", change.address, change.old_role, change.new_role, change.reason)
            t0 = self._clock()
            try:
                # past the switch's own deadline (it fails itself then), a margin for its moves to end
                outcome = await wait_within(self.coordinator.switch_role(change.address, change.new_role),
                                            SWITCH_TIMEOUT_S + 60.0)
            except (DisaggError, asyncio.TimeoutError, KeyError) as e:
                error = str(e) or type(e).__name__
                log.warning("planner: switching %s to %s failed: %s", change.address, change.new_role, error)
                self.changes.append(RoleChange(t0, change.address, change.old_role, change.new_role, change.reason,
                                               False, seconds=self._clock() - t0, error=error))
                continue
            self.switches[(outcome.previous, outcome.role)] += 1
            self.changes.append(RoleChange(t0, change.address, outcome.previous, outcome.role, change.reason,
                                           True, outcome.moved, outcome.elapsed_s, outcome.max_pause_s))
            log.warning("planner: %s is %s now (%d requests moved, %d kept, %.2f s, longest pause %.0f ms)",
                        change.address, outcome.role, outcome.moved, outcome.kept, outcome.elapsed_s,
                        outcome.max_pause_s * 1e3)
        return plan

    async def run(self) -> None:
        """Tick every `interval_s` until cancelled; one tick's error is logged, never the loop's end."""
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the planner must never take the service down
                log.exception("planner tick failed")

    def start(self) -> None:
        assert self._task is None, "the planner loop runs already"
        self._task = asyncio.create_task(self.run(), name="planner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def reasons(self) -> dict[str, str]:
        """address → the last tick's reason for its role (empty before the first tick)."""
        return dict(self.last_plan.reasons) if self.last_plan is not None else {}
