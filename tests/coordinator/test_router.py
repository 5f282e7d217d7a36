"""Routing policies, exactly: which worker each pick lands on."""

from __future__ import annotations

import pytest

from disagg_cli.coordinator.router import NoWorkerError, Router, WorkerRecord
from disagg_cli.errors import UsageError


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
    router.update_stats("tcp://127.0.0.1:5000", {"waiting": 2, "free_blocks": 100})
    router.update_stats("tcp://127.0.0.1:5001", {"waiting": 0, "free_blocks": 10})
    router.update_stats("tcp://127.0.0.1:5002", {"waiting": 0, "free_blocks": 50})
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
