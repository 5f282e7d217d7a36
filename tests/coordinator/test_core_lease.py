"""Cores lent between local workers (`core_lease.py`): who shares a lease, and the topology switch.
What the kernel's jobs run on is in `tests/model/test_core_lease.py`; workers that attach a lease,
with their affinity over both cores, are in `tests/coordinator/test_config_chain.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_cli.coordinator.cluster import leases, place
from disagg_cli.coordinator.topology import WorkerSpec, load_cluster_config, local_topology
from disagg_cli.core_lease import LendConfig
from disagg_cli.errors import UsageError


def test_workers_with_cores_of_their_own_share_a_lease(tmp_path: Path) -> None:
    path = tmp_path / "cores.lease"
    split = place(local_topology("m", WorkerSpec("prefill")).workers, [0, 1])
    assert leases(split, path) == [LendConfig(str(path), 0, (1, 1), (0, 1)), LendConfig(str(path), 1, (1, 1), (0, 1))]
    three = place((WorkerSpec("prefill", threads=2), WorkerSpec("decode"), WorkerSpec("decode")), [0, 1, 2, 3])
    assert [(w.threads, w.cpus) for w in three] == [(2, (0, 1)), (1, (2,)), (1, (3,))]
    assert [lend.threads if lend else None for lend in leases(three, path)] == [(2, 1, 1)] * 3
    # Nothing to lend: one worker; workers sharing a core (three on two); more threads than cores.
    assert leases(place((WorkerSpec("colocated"),), [0, 1]), path) == [None]
    crowded = place((WorkerSpec("prefill"), WorkerSpec("decode"), WorkerSpec("decode")), [0, 1])
    assert [w.cpus for w in crowded] == [(0,), (1,), (0,)] and leases(crowded, path) == [None] * 3
    assert leases([WorkerSpec("prefill", threads=2, cpus=(0,)), WorkerSpec("decode", cpus=(1,))], path) == [None] * 2


def test_the_topology_may_keep_each_worker_on_its_own_cores(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    workers = '[[workers]]\nrole = "prefill"\n[[workers]]\nrole = "decode"\n'
    path.write_text('model = "m"\n' + workers)
    assert load_cluster_config(path).lend_cores is True
    path.write_text('model = "m"\n[cluster]\nlend_cores = false\n' + workers)
    assert load_cluster_config(path).lend_cores is False
    path.write_text('model = "m"\n[cluster]\nlend_cores = "no"\n' + workers)
    with pytest.raises(UsageError, match=r"\[cluster\]: lend_cores must be a bool, got 'no'"):
        load_cluster_config(path)
