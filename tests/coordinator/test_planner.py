"""The planner's arithmetic, exactly: predictions (`predictions.py`), which role each worker gets and
why, hysteresis (`planner.py`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from disagg_cli.coordinator.planner import Planner, PlannerConfig, admit
from disagg_cli.coordinator.predictions import (
    FALLBACK_PREFILL_TOK_S,
    Snapshot,
    WorkerSnapshot,
    colocated_step,
    predict_tpot_ms,
    predict_ttft_ms,
    prefill_capacity,
)
from disagg_cli.errors import UsageError

P, D, C = "tcp://p:1", "tcp://d:2", "tcp://c:3"
# Hold one tick, no dwell: each test of the rule sees the decision at once.
AT_ONCE = PlannerConfig(mode="slo", slo_ttft_ms=1000, slo_tpot_ms=50, hold_ticks=1, min_dwell_s=0)


def prefill(queued: int = 0, rate: float = 1000.0, address: str = P) -> WorkerSnapshot:
    return WorkerSnapshot(address, "prefill", queued_prefill_tokens=queued, prefill_tokens_per_s=rate)


def decode(running: int = 0, step_ms: float = 20.0, address: str = D) -> WorkerSnapshot:
    return WorkerSnapshot(address, "decode", running_decodes=running, decode_step_ms=step_ms)


def snap(*workers: WorkerSnapshot, now_s: float = 0.0, **kw: object) -> Snapshot:
    return Snapshot(now_s, tuple(workers), **kw)  # type: ignore[arg-type]


def test_predictions() -> None:
    s = snap(prefill(queued=3000, rate=1000), decode(running=4, step_ms=20), pending_prompt_tokens=1000)
    assert prefill_capacity(s.workers) == 1000
    assert predict_ttft_ms(s) == pytest.approx(4000)  # 4,000 tokens at 1,000 tok/s
    assert predict_ttft_ms(s, extra_tokens=1000) == pytest.approx(5000)
    assert predict_tpot_ms(s) == pytest.approx(20)  # the batch it was measured at
    # Spread over two decode workers, a step of 2 instead of 4: 0.3 fixed + 0.7 × 2/4 of 20 ms.
    two = snap(prefill(), decode(running=4, step_ms=20), decode(running=0, step_ms=0, address=C))
    assert predict_tpot_ms(two) == pytest.approx(20 * (0.3 + 0.7 * 2 / 4))
    # An unmeasured worker counts at the fallback speed; a colocated one that decodes gives half.
    col = snap(WorkerSnapshot(C, "colocated", running_decodes=1))
    assert prefill_capacity(col.workers) == FALLBACK_PREFILL_TOK_S / 2
    assert predict_ttft_ms(snap(prefill(), decode())) == 0.0 and predict_tpot_ms(snap(prefill(), decode())) == 0.0


def test_a_colocated_worker_with_a_step_bound_gives_prompts_what_its_decodes_leave() -> None:
    bounded = WorkerSnapshot(C, "colocated", running_decodes=4, decode_step_ms=20, prefill_tokens_per_s=1000,
                             max_step_ms=80)
    assert colocated_step(bounded, (bounded,), 20.0) == (80.0, 0.75)
    assert prefill_capacity((bounded,)) == 750  # 60 ms of every 80 on prompts
    assert predict_tpot_ms(snap(bounded)) == 20  # nothing waits: decodes alone
    assert predict_tpot_ms(snap(bounded, pending_prompt_tokens=500)) == 80
    tight = replace(bounded, max_step_ms=30)  # 10 ms left: a chunk is still 32 tokens, 32 ms
    assert colocated_step(tight, (tight,), 20.0) == (52.0, 32 / 52)


def test_decode_becomes_colocated_only_where_its_step_bound_keeps_tpot() -> None:
    # Prompts waiting will decode: with no decodes yet, TPOT is predicted at a batch of one.
    for bound, switches in ((120.0, False), (45.0, True)):
        d = WorkerSnapshot(D, "decode", decode_step_ms=10, max_step_ms=bound)
        plan = Planner(AT_ONCE).tick(snap(prefill(queued=3000), d))
        assert [c.new_role for c in plan.changes] == (["colocated"] if switches else []), plan.reasons
        if not switches:
            assert "no decode worker can give up decoding without missing TPOT" in plan.reasons[D]


def test_targets_met_change_nothing() -> None:
    planner = Planner(AT_ONCE)
    plan = planner.tick(snap(prefill(queued=500), decode(running=4, step_ms=30)))
    assert plan.changes == ()
    assert plan.roles == {P: "prefill", D: "decode"}
    assert plan.reasons[P].startswith("keeps prefill: targets met (TTFT 500 ms vs 1,000 ms, TPOT 30 ms vs 50 ms)")


def test_ttft_missed_with_decode_idle_makes_the_decode_worker_colocated() -> None:
    # 1P+1D: the only decode worker cannot become prefill (none would decode); colocated keeps both.
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=3000), decode(running=0)))
    [change] = plan.changes
    assert (change.address, change.old_role, change.new_role) == (D, "decode", "colocated")
    assert plan.roles == {P: "prefill", D: "colocated"}
    assert plan.reasons[D].startswith("decode → colocated: TTFT missed (TTFT 3,000 ms vs 1,000 ms")
    assert "as colocated: TTFT 1,500 ms" in change.reason  # unmeasured there: the prefill worker's speed


def test_an_idle_decode_worker_lending_its_cores_is_not_taken_for_prefill() -> None:
    # Its cores already compute prompts (the prefill worker's kernel borrows them while it idles);
    # once it decodes, it lends nothing and may become colocated as any decode worker.
    lending = replace(decode(running=0), lends_cores=True)
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=3000), lending))
    assert plan.changes == ()
    assert "idle decode worker(s) tcp://d:2 already lend their cores to prefill" in plan.reasons[D], plan.reasons
    busy = replace(decode(running=1, step_ms=10), lends_cores=True)
    assert [c.new_role for c in Planner(AT_ONCE).tick(snap(prefill(queued=3000), busy)).changes] == ["colocated"]


def test_ttft_missed_with_two_decode_workers_makes_the_idler_one_prefill() -> None:
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=3000), decode(running=2, step_ms=20),
                                      decode(running=0, step_ms=10, address=C)))
    [change] = plan.changes
    assert (change.address, change.new_role) == (C, "prefill")
    assert plan.roles == {P: "prefill", D: "decode", C: "prefill"}


def test_ttft_missed_but_decode_needed_changes_nothing() -> None:
    # Taking a decode worker would put its batch on the other and miss TPOT: no change.
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=3000), decode(running=8, step_ms=45),
                                      decode(running=8, step_ms=45, address=C)))
    assert plan.changes == ()
    assert "no decode worker can give up decoding without missing TPOT" in plan.reasons[P]


def test_tpot_missed_gives_more_decode() -> None:
    # Prompt chunks double the colocated worker's steps: it stops prefilling while another worker still does.
    busy_colocated = WorkerSnapshot(C, "colocated", running_decodes=8, decode_step_ms=40, prefill_tokens_per_s=900)
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=200), busy_colocated, decode(running=8, step_ms=40)))
    [change] = plan.changes
    assert (change.address, change.old_role, change.new_role) == (C, "colocated", "decode")
    # 1P+1D with the decode batch too slow: a colocated worker beside the decode one would take every
    # prompt while the decode worker takes none, so the prefill worker stays.
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=0), decode(running=16, step_ms=90)))
    assert plan.changes == ()
    assert plan.reasons[P] == ("keeps prefill: TPOT missed (TTFT 0 ms vs 1,000 ms, TPOT 90 ms vs 50 ms) but no "
                               "worker can take up decoding without missing TTFT, leaving no prefill worker or "
                               "having it switched back")


def test_recent_requests_count_only_while_their_phase_has_work() -> None:
    slow = (5000.0, 6000.0, 7000.0)
    assert Planner(AT_ONCE).tick(snap(prefill(), decode(), recent_ttft_ms=slow)).changes == ()
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=100), decode(), recent_ttft_ms=slow))
    assert [c.new_role for c in plan.changes] == ["colocated"]


def test_a_phase_with_room_lends_before_the_other_misses() -> None:
    # TTFT 600 ms of 1,000 (past half) while TPOT is 10 ms of 50 (within a quarter): the decode worker
    # becomes colocated now; with TPOT at 20 ms (past a quarter) it keeps decoding until TTFT misses.
    lend = Planner(AT_ONCE).tick(snap(prefill(queued=600), decode(running=1, step_ms=10)))
    assert [(c.address, c.new_role) for c in lend.changes] == [(D, "colocated")]
    assert lend.changes[0].reason.startswith("TTFT missed (TTFT 600 ms vs 1,000 ms, TPOT 10 ms vs 50 ms;")
    assert Planner(AT_ONCE).tick(snap(prefill(queued=600), decode(running=1, step_ms=20))).changes == ()


def test_no_change_whose_result_would_lend_it_back() -> None:
    # A slow prefill worker (500 tok/s) beside a colocated one bounded at 40 ms, prompts trickling in:
    # TTFT 238 ms has room, TPOT 42 ms (its steps fill with chunks) is past half of 50, so decode
    # would borrow the colocated worker; but as decode, TTFT (300 tokens at 500 tok/s: 600 ms) is past
    # half of 1,000 with TPOT 10 ms idle, and the decode worker would be made colocated again. The
    # guard holds at both ends of that cycle.
    bounded = WorkerSnapshot(C, "colocated", running_decodes=2, decode_step_ms=10, prefill_tokens_per_s=1000,
                             max_step_ms=40)
    trickle = snap(prefill(queued=300, rate=500), bounded)
    assert (predict_ttft_ms(trickle), predict_tpot_ms(trickle)) == (pytest.approx(300 / (500 + 1000 * 32 / 42) * 1e3),
                                                                  42)
    undone = snap(prefill(queued=300, rate=500), replace(bounded, role="decode"))
    assert (predict_ttft_ms(undone), predict_tpot_ms(undone)) == (600, 10)
    plan = Planner(AT_ONCE).tick(undone)
    assert plan.changes == () and "having it switched back" in plan.reasons[C], plan.reasons
    # Instead the prefill worker takes up decoding too: both colocated, which nothing undoes.
    [change] = Planner(AT_ONCE).tick(trickle).changes
    assert (change.address, change.new_role) == (P, "colocated"), change
    both = snap(WorkerSnapshot(P, "colocated", queued_prefill_tokens=300, prefill_tokens_per_s=500), bounded)
    plan = Planner(AT_ONCE).tick(both)
    assert plan.changes == () and "having it switched back" in plan.reasons[C], plan.reasons
    # Recent requests decoding past the target: TPOT is missed outright, and TTFT cannot lend back
    # (both would count as missed), so the worker goes to decode.
    missed = replace(trickle, recent_tpot_ms=(60.0, 70.0, 80.0))
    assert [(c.address, c.new_role) for c in Planner(AT_ONCE).tick(missed).changes] == [(C, "decode")]


def test_both_missed_changes_nothing() -> None:
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=5000), decode(running=16, step_ms=90)))
    assert plan.changes == () and "both targets missed" in plan.reasons[D]


def test_hysteresis_holds_for_consecutive_ticks_and_dwell() -> None:
    config = PlannerConfig(mode="slo", slo_ttft_ms=1000, slo_tpot_ms=50, hold_ticks=3, min_dwell_s=10)
    planner = Planner(config)
    busy = snap(prefill(queued=3000), decode(running=0))
    calm = snap(prefill(queued=100), decode(running=0))
    assert planner.tick(busy).changes == ()
    assert planner.tick(busy).reasons[D].startswith("would become colocated (2/3 ticks)")
    assert planner.tick(calm).changes == ()  # the streak breaks: start again
    assert planner.tick(busy).changes == () and planner.tick(busy).changes == ()
    [change] = planner.tick(snap(prefill(queued=3000), decode(running=0), now_s=1.0)).changes
    assert change.new_role == "colocated"
    # The other way, 5 s later: held for 3 ticks, then still within the 10 s dwell. Prompt chunks
    # double the colocated worker's steps: it stops prefilling (a prefill worker still does).
    colocated = WorkerSnapshot(D, "colocated", running_decodes=8, decode_step_ms=40, prefill_tokens_per_s=900)
    tpot_bad = [snap(prefill(queued=200), colocated, decode(running=8, step_ms=40, address=C), now_s=t)
                for t in (6.0, 7.0, 8.0, 11.0)]
    assert [planner.tick(s).changes for s in tpot_bad[:3]] == [(), (), ()]
    assert planner.tick(tpot_bad[2]).reasons[D].startswith("would become decode (3.0 s of dwell left)")
    [back] = planner.tick(tpot_bad[3]).changes
    assert (back.address, back.new_role) == (D, "decode")
    assert [d.new_role for d in planner.history] == ["colocated", "decode"]


def test_one_worker_is_colocated() -> None:
    plan = Planner(AT_ONCE).tick(snap(decode(running=3)))
    [change] = plan.changes
    assert (change.new_role, change.reason) == ("colocated", "one worker: it must both prefill and decode")
    plan = Planner(AT_ONCE).tick(snap(WorkerSnapshot(C, "colocated", queued_prefill_tokens=10_000)))
    assert plan.changes == () and plan.reasons[C] == "keeps colocated: one worker, colocated"


def test_never_leaves_a_phase_without_a_worker_and_waits_for_the_dead() -> None:
    # TTFT missed with one decode worker: never → prefill (checked over every tick's decision).
    planner = Planner(AT_ONCE)
    for queued in (1000, 3000, 30_000):
        for change in planner.tick(snap(prefill(queued=queued), decode())).changes:
            assert change.new_role != "prefill"
    down = WorkerSnapshot(C, "decode", is_alive=False)
    plan = Planner(AT_ONCE).tick(snap(prefill(queued=9000), decode(), down))
    assert plan.changes == () and "a worker is down (tcp://c:3)" in plan.reasons[P]


def test_admission() -> None:
    idle = snap(prefill(queued=0, rate=1000), decode())
    assert admit(idle, 5000, 1000) == (True, pytest.approx(5000))  # nothing ahead: always taken
    busy = snap(prefill(queued=800, rate=1000), decode())
    assert admit(busy, 100, 1000) == (True, pytest.approx(900))
    assert admit(busy, 300, 1000) == (False, pytest.approx(1100))


def test_config_is_checked() -> None:
    with pytest.raises(UsageError, match="--planner must be one of off, slo"):
        PlannerConfig(mode="auto")
    with pytest.raises(UsageError, match="--slo-ttft-ms must be positive"):
        PlannerConfig(slo_ttft_ms=0)
    with pytest.raises(UsageError, match="--admission"):
        PlannerConfig(admission="yes")
