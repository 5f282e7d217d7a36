"""Routing policies, exactly: which worker each pick lands on."""

from __future__ import annotations

import pytest

from disagg_cli.coordinator.router import NoWorkerError, Router, WorkerRecord
from disagg_cli.errors import UsageError
from disagg_cli.protocol import WorkerStats


def figures(**given: float) -> WorkerStats:
    """A heartbeat's figures: zeros except those given."""
    zero = {f: 0 for f in WorkerStats.__dataclass_fields__ if f not in ("queued_reservations", "incoming")}
    return WorkerStats(**{**zero, **given})  # type: ignore[arg-type]


def workers(role: str, n: int) -> list[WorkerRecord]:
    return [WorkerRecord(f"tcp://127.0.0.1:{5000 + i}", role) for i in range(n)]


def ports(picks: list[WorkerRecord]) -> list[int]:
    return [int(w.address.rsplit(":", 1)[1]) for w in picks]


def test_round_robin_cycles_per_role() -> None:
    router = Router(workers("prefill", 3) + [WorkerRecord("tcp://h:1", "decode")], "round-robin")
    assert ports([router.pick("prefill") for _ in range(7)]) == [5000, 5001, 5002, 5000, 5001, 5002, 5000]
    assert router.pick("decode").address == "tcp://h:1"
    assert [w.num_inflight for w in router.by_role("prefill")] == [3, 2, 2]


def test_round_robin_skips_dead_workers() -> None:
    router = Router(workers("decode", 3), "round-robin")
    router.mark_dead("tcp://127.0.0.1:5001")
    assert ports([router.pick("decode") for _ in range(4)]) == [5000, 5002, 5000, 5002]


def test_least_loaded_counts_inflight_and_waiting() -> None:
    router = Router(workers("decode", 3), "least-loaded")
    router.note_stats("tcp://127.0.0.1:5000", figures(waiting=2, free_blocks=100))
    router.note_stats("tcp://127.0.0.1:5001", figures(waiting=0, free_blocks=10))
    router.note_stats("tcp://127.0.0.1:5002", figures(waiting=0, free_blocks=50))
    # loads (2, 0, 0) → 5002 (more free blocks); (2, 0, 1) → 5001; (2, 1, 1) → 5002 (blocks); (2, 1, 2) → 5001
    assert ports([router.pick("decode") for _ in range(4)]) == [5002, 5001, 5002, 5001]


def test_least_loaded_ties_go_to_the_first_listed() -> None:
    router = Router(workers("prefill", 2), "least-loaded")
    assert ports([router.pick("prefill") for _ in range(3)]) == [5000, 5001, 5000]


def test_release_returns_capacity() -> None:
    router = Router(workers("prefill", 2), "least-loaded")
    first = router.pick("prefill")
    router.pick("prefill")
    router.release(first)
    assert router.pick("prefill") is first


def test_no_live_worker_names_the_role() -> None:
    router = Router(workers("decode", 1), "least-loaded")
    router.mark_dead("tcp://127.0.0.1:5000")
    with pytest.raises(NoWorkerError, match="no live decode worker left .*tcp://127.0.0.1:5000"):
        router.pick("decode")
    with pytest.raises(NoWorkerError, match="no live prefill worker left .known: none configured"):
        router.pick("prefill")


def test_unknown_policy_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--router must be one of round-robin, least-loaded"):
        Router([], "random")


def _with_views(role: str, n: int, block_size: int = 4) -> list[WorkerRecord]:
    from disagg_cli.coordinator.router import PrefixView

    ws = workers(role, n)
    for w in ws:
        w.prefix = PrefixView(block_size, capacity=64)
    return ws


def test_cache_aware_prefill_weighs_cached_prefix_against_queued_work() -> None:
    router = Router(_with_views("prefill", 3), "cache-aware")
    a, b, c = router.by_role("prefill")
    prompt = list(range(40))
    b.prefix.insert(b.prefix.hashes(prompt[:32]))  # b holds 32 of the 40 tokens
    assert router.pick("prefill", prompt_ids=prompt) is b  # cost 8 against 40
    b.queued_tokens = 33  # b is busy: 33 + 8 = 41 > 40 at the idle a
    assert router.pick("prefill", prompt_ids=prompt) is a
    a.queued_tokens, c.queued_tokens = 100, 100
    assert router.pick("prefill", prompt_ids=prompt) is b
    # No overlap anywhere: the least queued work wins, as least-loaded would.
    assert router.pick("prefill", prompt_ids=list(range(500, 540))) is b


def test_cache_aware_decode_balances_first_then_prefers_the_longest_prefix() -> None:
    router = Router(_with_views("decode", 3), "cache-aware")
    a, b, c = router.by_role("decode")
    prompt = list(range(20))
    c.prefix.insert(c.prefix.hashes(prompt[:16]))
    c.num_inflight = 1  # within one request of the least loaded: still wins on its prefix
    assert router.pick("decode", prompt_ids=prompt) is c
    assert c.num_inflight == 2
    assert router.pick("decode", prompt_ids=prompt) is a  # c is now two ahead: balance wins


def test_prefix_view_forgets_oldest_beyond_capacity_and_on_restart() -> None:
    from disagg_cli.coordinator.router import PrefixView

    view = PrefixView(block_size=2, capacity=3)
    view.insert(view.hashes([1, 2, 3, 4, 5, 6]))
    assert view.match_tokens(view.hashes([1, 2, 3, 4, 5, 6, 7])) == 6
    view.insert(view.hashes([9, 9]))  # a fourth block: the oldest (the head [1, 2]) goes
    assert len(view) == 3 and view.match_tokens(view.hashes([1, 2, 3, 4])) == 0
    router = Router(_with_views("prefill", 1), "cache-aware")
    (w,) = router.by_role("prefill")
    w.prefix.insert(w.prefix.hashes([1, 2, 3, 4]))
    router.mark_dead(w.address)
    router.mark_alive(w.address)
    assert len(w.prefix) == 0


def test_auto_threshold_prefills_locally_only_when_sooner_and_short() -> None:
    from disagg_cli.coordinator.router import AUTO_THRESHOLD_FALLBACK, local_prefill_pays

    (decode,) = workers("decode", 1)
    prefill = WorkerRecord("tcp://p:1", "prefill")
    # Nothing measured yet: the fallback threshold.
    assert local_prefill_pays(AUTO_THRESHOLD_FALLBACK, decode, [prefill])
    assert not local_prefill_pays(AUTO_THRESHOLD_FALLBACK + 1, decode, [prefill])
    prefill.last_stats = figures(prefill_tokens_per_s=200.0, threads=1)
    decode.last_stats = figures(decode_step_ms=50.0, threads=1)  # budget: max(0.1, 4 x 0.05) = 0.2 s
    assert local_prefill_pays(40, decode, [prefill])  # 0.2 s here, 0.22 s there
    assert not local_prefill_pays(41, decode, [prefill])  # 0.205 s: past the stall budget
    prefill.queued_tokens = 1000  # the prefill worker is 5 s behind: still only a short stall here
    assert local_prefill_pays(40, decode, [prefill]) and not local_prefill_pays(60, decode, [prefill])
    # measured on the decode worker itself
    decode.last_stats = figures(decode_step_ms=50.0, threads=1, prefill_tokens_per_s=1000.0)
    assert local_prefill_pays(200, decode, [prefill]) and not local_prefill_pays(201, decode, [prefill])
    assert local_prefill_pays(100, decode, [])  # no prefill worker alive: the budget alone decides
