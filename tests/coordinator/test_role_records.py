"""The coordinator's records of elastic roles, exactly: a switching worker takes no new request, the
router routes by its new role afterwards, a mix of roles sends requests whole to a colocated worker
only when it is no busier than the decode workers, switches are counted by (from, to), /metrics
shows each worker's role; the `elastic` setting loads the model as colocated does."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.core import Metric

from disagg_cli.config import EngineConfig, RuntimeConfig, WorkerConfig
from disagg_cli.coordinator.coordinator import Coordinator
from disagg_cli.coordinator.role_switch import SwitchLog, SwitchOutcome
from disagg_cli.coordinator.router import NoWorkerError, Router, WorkerRecord
from disagg_cli.coordinator.topology import WorkerSpec
from disagg_cli.protocol.names import WORKER_ROLES
from disagg_cli.server.metrics import _LiveGauges
from disagg_cli.worker_settings import SETTING_NAMES, WorkerSettings


def test_a_switching_worker_takes_no_new_request_then_serves_its_new_role() -> None:
    router = Router([WorkerRecord("a", "decode"), WorkerRecord("b", "decode"), WorkerRecord("p", "prefill")])
    router.begin_switch("a")
    assert [router.pick("decode").address for _ in range(3)] == ["b", "b", "b"]
    router.begin_switch("b")
    with pytest.raises(NoWorkerError):
        router.pick("decode")
    router.end_switch("b", None)  # failed: its role as it was
    router.end_switch("a", "prefill")
    assert router.roles() == {"a": "prefill", "b": "decode", "p": "prefill"}
    assert router.pick("decode").address == "b" and {router.pick("prefill").address for _ in range(2)} == {"a", "p"}


def test_the_router_follows_what_a_worker_says_of_its_role() -> None:
    router = Router([WorkerRecord("a", "decode"), WorkerRecord("p", "prefill")])
    assert not router.follow("a", "decode", "")  # as we thought
    assert router.follow("a", "decode", "prefill")  # a switch we gave up waiting for goes on there
    assert router.get("a").switching and not router.get("a").routable
    assert router.follow("a", "prefill", "") and router.roles() == {"a": "prefill", "p": "prefill"}
    assert not router.follow("a", "janitor", "")


def test_colocated_mode_in_a_mix_of_roles() -> None:
    def mode(*workers: tuple[str, str, int]) -> bool:
        c = Coordinator([(role, addr) for addr, role, _ in workers], frozenset({2}))
        for addr, _, load in workers:
            c.router.get(addr).num_inflight = load
            c.router.get(addr).queued_tokens = 100 * load  # prompt tokens waiting there
        return c._colocated_mode(prompt_tokens=50)

    assert not mode(("p", "prefill", 0), ("d", "decode", 0))
    assert mode(("c", "colocated", 0), ("c2", "colocated", 5))
    assert mode(("c", "colocated", 3), ("d", "decode", 0))  # no prefill worker: colocated it is
    assert mode(("c", "colocated", 1), ("p", "prefill", 0), ("d", "decode", 1))  # as busy: colocated
    assert not mode(("c", "colocated", 2), ("p", "prefill", 0), ("d", "decode", 1))
    # prefill and colocated workers, no decode one: the prompt goes where it waits least (unmeasured
    # speeds: by tokens), else to the prefill worker, and decodes on the colocated one
    assert mode(("c", "colocated", 1), ("p", "prefill", 1))
    assert not mode(("c", "colocated", 2), ("p", "prefill", 1))


def test_switch_log_counts_by_from_and_to() -> None:
    log = SwitchLog()
    for old, new in [("decode", "prefill"), ("decode", "prefill"), ("prefill", "colocated"), ("decode", "decode")]:
        log.note(SwitchOutcome("a", old, new, 0, 0, 0, 0, 0.1, 50.0, 0.0))
    assert log.counts == {("decode", "prefill"): 2, ("prefill", "colocated"): 1}  # a no-op is no switch
    assert len(log.recent) == 3


def test_metrics_show_each_workers_role_and_the_switches() -> None:
    log = SwitchLog()
    log.note(SwitchOutcome("tcp://h:2", "decode", "prefill", 4, 0, 0, 0, 0.3, 120.0, 0.2))
    workers = [SimpleNamespace(role="prefill", address="tcp://h:1", is_alive=True, stats={}, kv_usage=None),
               SimpleNamespace(role="prefill", address="tcp://h:2", is_alive=True, stats={}, kv_usage=None)]
    service = SimpleNamespace(counts=lambda: {"running": 0, "waiting": 0}, workers=lambda: workers, cluster=None,
                              coordinator=SimpleNamespace(switches=log))
    metrics: dict[str, Metric] = {m.name: m for m in _LiveGauges(service, "m").collect()}  # type: ignore[arg-type]
    # a state set: one series per worker and role, 1 for the role it has
    assert [(s.labels["address"], s.labels["role"], s.value) for s in metrics["disagg:worker_role"].samples] == [
        (a, r, 1.0 if r == "prefill" else 0.0) for a in ("tcp://h:1", "tcp://h:2") for r in WORKER_ROLES]
    totals = {(s.labels["from"], s.labels["to"]): s.value
              for s in metrics["disagg:role_switches"].samples if s.name.endswith("_total")}
    assert len(totals) == 6 and totals.pop(("decode", "prefill")) == 1.0 and set(totals.values()) == {0.0}


def test_the_elastic_setting_loads_for_every_role() -> None:
    assert "elastic" in SETTING_NAMES and not WorkerSettings().elastic
    spec = WorkerSpec("decode", port=5000, elastic=True)
    config = spec.worker_config("m")
    assert config.elastic and config.load_role == "colocated"
    assert WorkerConfig.from_json(config.to_json()) == config
    plain = WorkerConfig("prefill", "m", "127.0.0.1", 1, RuntimeConfig(), EngineConfig())
    assert plain.load_role == "prefill"


def test_elastic_reaches_the_workers_front_ends_start() -> None:
    from disagg_cli.coordinator.options import build_topology
    from disagg_cli.coordinator.placement import placement_from_flags

    start = placement_from_flags(prefill_replicas=1, decode_replicas=2)
    made = build_topology("m", start, RuntimeConfig(), EngineConfig(), elastic=True)  # type: ignore[arg-type]
    assert made.counts() == "1 prefill, 2 decode" and all(w.elastic for w in made.workers)
    assert not any(w.elastic for w in build_topology("m", start, RuntimeConfig(), EngineConfig()).workers)  # type: ignore[arg-type]
    on_file = placement_from_flags(config=Path(__file__).parents[2] / "configs" / "ray-2node.toml")
    assert all(w.elastic for w in build_topology("m", on_file, RuntimeConfig(), EngineConfig(), elastic=True).workers)  # type: ignore[arg-type]
