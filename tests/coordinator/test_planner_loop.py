"""The planner loop over a real router: the snapshot it builds, and each decision applied with
`switch_role` (here a stand-in with the signature branch elastic-roles implements), counted, and
kept with its reason; a failed switch is logged and kept, never the loop's end."""

from __future__ import annotations

import asyncio
import logging

import pytest

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.planner import PlannerConfig
from disagg_cli.coordinator.planner_loop import PlannerLoop
from disagg_cli.coordinator.role_switch import SwitchOutcome
from disagg_cli.coordinator.router import Router, WorkerRecord
from disagg_cli.engine.request import RequestOutput
from disagg_cli.errors import DisaggError
from disagg_cli.protocol import WorkerStats

P, D = "tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"
CONFIG = PlannerConfig(mode="slo", slo_ttft_ms=1000, slo_tpot_ms=50, hold_ticks=2, min_dwell_s=0, interval_s=0.01)


def figures(**given: float) -> WorkerStats:
    zero = {f: 0 for f in WorkerStats.__dataclass_fields__ if f not in ("queued_reservations", "incoming")}
    return WorkerStats(**{**zero, "threads": 1, **given})  # type: ignore[arg-type]


class FakeCoordinator:
    """A router and `switch_role(address, role)` that relabels the record, as the real one ends."""

    def __init__(self, fail: bool = False) -> None:
        self.router = Router([WorkerRecord(P, "prefill"), WorkerRecord(D, "decode")])
        self.fail = fail
        self.calls: list[tuple[str, str]] = []

    async def switch_role(self, address: str, role: str) -> SwitchOutcome:
        self.calls.append((address, role))
        if self.fail:
            raise DisaggError(f"{address} refused the switch")
        record = self.router.get(address)
        old, record.role = record.role, role
        return SwitchOutcome(address, old, role, moved=2, finished=0, kept=0, failed_over=0, elapsed_s=0.25,
                             worker_ms=5.0, max_pause_s=0.04)


class Tok:
    eos_token_ids = frozenset({0})

    def decode(self, ids: list[int]) -> str:  # what the incremental detokenizer asks for
        return ""


def output(rid: str, tokens: int, state: str, workers: dict[str, str]) -> RequestOutput:
    out = RequestOutput(rid, "", list(range(1, tokens + 1)), SamplingParams(max_tokens=4), Tok())  # type: ignore[arg-type]
    out.state, out.workers = state, workers
    return out


def loaded(coordinator: FakeCoordinator) -> list[RequestOutput]:
    """3,000 prompt tokens queued at a 1,000 tok/s prefill worker, nothing decoding: TTFT missed."""
    router = coordinator.router
    router.note_stats(P, figures(prefill_tokens_per_s=1000.0))
    router.note_stats(D, figures(running=0, decode_step_ms=20.0))
    router.queue_prefill(router.get(P), list(range(2000)))
    return [output("a", 1000, "reserving", {})]


def test_snapshot_reads_the_router_heartbeats_and_requests() -> None:
    coordinator = FakeCoordinator()
    outs = loaded(coordinator)
    outs.append(output("b", 500, "prefilling", {"decode": D}))  # prefilled on its decode worker
    coordinator.router.note_stats(D, figures(running=3, decode_step_ms=20.0))
    loop = PlannerLoop(CONFIG, coordinator, lambda: outs, clock=lambda: 100.0)
    snap = loop.snapshot()
    p, d = snap.workers
    assert (p.address, p.role, p.queued_prefill_tokens, p.prefill_tokens_per_s, p.running_decodes) == \
        (P, "prefill", 2000, 1000.0, 0)
    assert (d.role, d.queued_prefill_tokens, d.running_decodes, d.decode_step_ms) == ("decode", 500, 3, 20.0)
    assert snap.pending_prompt_tokens == 1000 and snap.now_s == 100.0
    assert not p.lends_cores and not d.lends_cores
    lent = PlannerLoop(CONFIG, coordinator, lambda: outs, lenders=frozenset({D})).snapshot()
    assert [w.lends_cores for w in lent.workers] == [False, True]


def test_decisions_are_held_then_switched_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    coordinator = FakeCoordinator()
    outs = loaded(coordinator)
    loop = PlannerLoop(CONFIG, coordinator, lambda: outs)

    async def run() -> None:
        first = await loop.tick()
        assert first.changes == () and coordinator.calls == []
        assert first.reasons[D].startswith("would become colocated (1/2 ticks)")
        second = await loop.tick()
        assert [c.new_role for c in second.changes] == ["colocated"]

    with caplog.at_level(logging.WARNING, "disagg_cli.coordinator.planner_loop"):
        asyncio.run(asyncio.wait_for(run(), 10))
    assert coordinator.calls == [(D, "colocated")]
    assert coordinator.router.get(D).role == "colocated"
    assert loop.switches == {("decode", "colocated"): 1}
    [change] = loop.changes
    assert (change.ok, change.requests_moved, change.seconds, change.longest_pause_s) == (True, 2, 0.25, 0.04)
    assert change.as_dict()["from"] == "decode" and "TTFT missed" in change.reason
    assert f"planner: {D} decode → colocated: TTFT missed" in caplog.text
    assert "is colocated now (2 requests moved, 0 kept, 0.25 s, longest pause 40 ms)" in caplog.text
    assert loop.roles() == {P: "prefill", D: "colocated"}


def test_a_failed_switch_is_kept_and_the_loop_goes_on() -> None:
    coordinator = FakeCoordinator(fail=True)
    outs = loaded(coordinator)
    loop = PlannerLoop(CONFIG, coordinator, lambda: outs)

    async def run() -> None:
        loop.start()
        for _ in range(500):
            if len(coordinator.calls) >= 2:
                break
            await asyncio.sleep(0.01)
        await loop.stop()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert len(coordinator.calls) >= 2  # held again, tried again: the loop survived the failure
    assert not loop.switches and all(not c.ok for c in loop.changes)
    assert loop.changes[0].error == f"{D} refused the switch"
    assert coordinator.router.get(D).role == "decode"


def test_recent_requests_leave_the_window() -> None:
    now = [0.0]
    coordinator = FakeCoordinator()
    loop = PlannerLoop(CONFIG, coordinator, lambda: [], clock=lambda: now[0])
    done = output("c", 10, "done", {})
    done.timings.arrival_s, done.timings.first_token_s, done.timings.finish_s = 0.0, 1.5, 1.7
    done.token_ids = [5, 6, 7]
    loop.note_finished(done)
    assert loop.snapshot().recent_ttft_ms == (1500.0,) and loop.snapshot().recent_tpot_ms == (pytest.approx(100.0),)
    now[0] = CONFIG.window_s + 1
    assert loop.snapshot().recent_ttft_ms == ()


def test_health_counts_a_colocated_worker_for_both_phases() -> None:
    from disagg_cli.coordinator.refusals import WorkerView
    from disagg_cli.coordinator.service_health import _dead_roles

    def views(*given: tuple[str, bool]) -> list[WorkerView]:
        return [WorkerView(role, f"tcp://h:{i}", alive, {}) for i, (role, alive) in enumerate(given)]

    # After the planner turned the decode worker colocated, nothing is missing.
    assert _dead_roles(views(("prefill", True), ("colocated", True))) == []
    assert _dead_roles(views(("prefill", True), ("colocated", False))) == ["decode"]
    assert _dead_roles(views(("prefill", False), ("colocated", True))) == []  # it prefills too
    assert _dead_roles(views(("prefill", True), ("decode", False))) == ["decode"]
    assert _dead_roles(views(("colocated", False))) == ["colocated"]
    assert _dead_roles(views(("colocated", True))) == []
