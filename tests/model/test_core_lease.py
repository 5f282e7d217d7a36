"""A lease of cores in the C kernel (`core_lease.py`): what a job runs on as workers' slots turn
idle and busy."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_cli import core_lease
from disagg_cli.core_lease import CoreLease, LendConfig
from disagg_cli.model.quant.kernels import Kernel


def test_a_job_runs_on_its_own_threads_and_those_of_idle_workers(tmp_path: Path, kernel: Kernel) -> None:
    path = tmp_path / "cores.lease"
    core_lease.create(path, 3)
    mine, second, third = (CoreLease(LendConfig(str(path), i, (1, 2, 1), (0, 1, 2, 3))) for i in range(3))
    assert mine.busy() == [True, True, True]  # made busy: a loading worker lends nothing
    assert path.stat().st_size == 3 * core_lease.SLOT_BYTES
    lib = kernel.lib
    mine.attach(lib)
    try:
        assert CoreLease.attached() is mine
        assert lib.dq_lease_threads(1) == 1
        second.set_busy(False)  # another process's slot, through its own map of the file
        assert lib.dq_lease_threads(1) == 3
        third.set_busy(False)
        mine.set_busy(False)  # its own slot never counts
        assert (lib.dq_lease_threads(1), mine.busy()) == (4, [False, False, False])
        second.set_busy(True)
        assert lib.dq_lease_threads(1) == 2
    finally:
        CoreLease.detach(lib)
    assert lib.dq_lease_threads(1) == 1 and CoreLease.attached() is None
    with pytest.raises(ValueError, match="not a lease"):
        LendConfig(str(path), 3, (1, 1, 1), (0,))
