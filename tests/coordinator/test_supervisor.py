"""A local cluster's supervisor, on stand-in worker processes (a few lines of Python each, no model):
a worker that exits is started again on its address after a back-off, with one log line and a
count by role; one that keeps dying is left down at the cap; stopping the cluster restarts nothing.
The real thing (a SIGKILLed prefill worker of `disagg serve`) is in `test_supervision.py`."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from disagg_cli.coordinator.cluster import LocalCluster
from disagg_cli.coordinator.supervisor import RestartPolicy
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec

TOPOLOGY = ClusterConfig("stand-in", (WorkerSpec("prefill", threads=1), WorkerSpec("decode", threads=1)))
FAST = RestartPolicy(first_delay_s=0.05, max_delay_s=0.2, max_restarts=5, window_s=60, poll_s=0.02)
SERVES = "import time; print('stand-in ready', flush=True); time.sleep(120)"
DIES = "import sys; print('stand-in failed: boom', flush=True); sys.exit(3)"
WAIT_S = 20.0  # for anything to happen, on a loaded machine


class StandInCluster(LocalCluster):
    """A LocalCluster whose workers run `code(role)` instead of a model; every process it spawned is kept."""

    def __init__(self, code: Callable[[str], str], log_dir: Path) -> None:
        super().__init__(TOPOLOGY, "stand-in", log_dir)
        self.code = code
        self.spawned: list[subprocess.Popen[bytes]] = []
        self.spawned_at: list[float] = []  # time.monotonic() of each spawn

    def _spawn(self, spec: WorkerSpec, log_path: Path, lend: object = None) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-c", self.code(spec.role)], stdout=log, stderr=log)
        self.spawned.append(process)
        self.spawned_at.append(time.monotonic())
        return process


@pytest.fixture
def cluster_of(tmp_path: Path) -> Iterator[Callable[[Callable[[str], str]], StandInCluster]]:
    made: list[StandInCluster] = []

    def make(code: Callable[[str], str]) -> StandInCluster:
        cluster = StandInCluster(code, tmp_path)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
        for process in cluster.spawned:  # whatever a test left behind
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.02)


def wait_logged(cluster: StandInCluster) -> None:
    """Until the stand-ins have written their line (a SIGKILL before it would leave nothing to quote)."""
    wait_until(lambda: all(w.last_log_line() for w in cluster.workers), "the stand-ins started")


def test_the_back_off_doubles_up_to_its_ceiling() -> None:
    assert [RestartPolicy().delay_s(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_worker_that_exits_is_started_again_on_its_address(cluster_of, caplog: pytest.LogCaptureFixture) -> None:
    cluster = cluster_of(lambda role: SERVES)
    wait_logged(cluster)
    cluster.supervise(FAST)
    victim, other = cluster.workers
    with caplog.at_level(logging.WARNING, logger="disagg_cli.coordinator.supervisor"):
        victim.process.send_signal(signal.SIGKILL)
        wait_until(lambda: cluster.workers[0].process is not victim.process, "the prefill stand-in restarted")
        # The supervisor counts and logs the restart once the new process is in place: wait for that too.
        wait_until(lambda: bool(caplog.records), "the restart logged")
    again = cluster.workers[0]
    assert again.address == victim.address and again.process.poll() is None
    assert cluster.workers[1] is other and other.process.poll() is None
    assert cluster.restarts() == {"prefill": 1, "decode": 0}
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"prefill worker {victim.address} exited with code -9 (SIGKILL)" in line
    assert "last log line: stand-in ready" in line and "started again on the same address after 0.05 s" in line
    assert "(restart 1 of at most 5 within 1 min)" in line
    assert not cluster.is_gone(victim.address)  # what the coordinator's probe asks


def test_a_worker_that_keeps_dying_is_left_down_at_the_cap(cluster_of, caplog: pytest.LogCaptureFixture) -> None:
    policy = RestartPolicy(first_delay_s=0.05, max_delay_s=0.2, max_restarts=3, window_s=60, poll_s=0.02)
    cluster = cluster_of(lambda role: DIES if role == "decode" else SERVES)
    with caplog.at_level(logging.WARNING, logger="disagg_cli.coordinator.supervisor"):
        cluster.supervise(policy)
        wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records), "the supervisor gave up")
    time.sleep(0.5)  # time for a restart it should not make
    assert cluster.restarts() == {"prefill": 0, "decode": 3}
    decode_runs = [p for p in cluster.spawned if p.args[-1] == DIES]
    assert len(decode_runs) == 4  # the first start and three restarts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split("same address after ")[1].split(" s ")[0] for w in warnings] == ["0.05", "0.1", "0.2"]
    assert all("exited with code 3 (last log line: stand-in failed: boom" in w for w in warnings)
    assert "restart 3 of at most 3" in warnings[-1]
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "not started again: it was restarted 3 times within 1 min" in error
    assert cluster.workers[0].process.poll() is None  # its neighbour never noticed


def test_the_gaps_between_restarts_double(cluster_of) -> None:
    policy = RestartPolicy(first_delay_s=0.2, max_delay_s=0.8, max_restarts=3, window_s=60, poll_s=0.02)
    cluster = cluster_of(lambda role: DIES if role == "decode" else SERVES)
    cluster.supervise(policy)
    wait_until(lambda: cluster.restarts()["decode"] == 3, "three restarts")
    wait_until(lambda: cluster.spawned[-1].poll() is not None, "the last run ended")
    starts = [t for p, t in zip(cluster.spawned, cluster.spawned_at, strict=True) if p.args[-1] == DIES]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert [g >= d for g, d in zip(gaps, (0.2, 0.4, 0.8), strict=True)] == [True] * 3, gaps


def test_a_worker_restarted_by_someone_else_is_left_alone(cluster_of, caplog: pytest.LogCaptureFixture) -> None:
    """bench serve's chaos soak kills a worker and restarts it at once, beside the supervisor."""
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=1.0, max_restarts=5, window_s=60, poll_s=0.02)
    cluster = cluster_of(lambda role: SERVES)
    wait_logged(cluster)
    cluster.supervise(policy)
    with caplog.at_level(logging.WARNING, logger="disagg_cli.coordinator.supervisor"):
        cluster.workers[0].process.send_signal(signal.SIGKILL)
        cluster.workers[0].process.wait()
        time.sleep(0.2)  # the supervisor has seen it exit: its restart is due in 0.5 s
        mine = cluster.restart(0)
        time.sleep(1.0)  # past that
    assert cluster.workers[0] is mine and mine.process.poll() is None
    assert len(cluster.spawned) == 3 and cluster.restarts() == {"prefill": 0, "decode": 0}
    assert not caplog.records


def test_stopping_the_cluster_restarts_nothing(cluster_of) -> None:
    cluster = cluster_of(lambda role: SERVES)
    wait_logged(cluster)
    cluster.supervise(FAST)
    cluster.workers[0].process.send_signal(signal.SIGKILL)  # a restart falls due while the cluster stops
    spawned = cluster.spawned
    cluster.stop()
    assert cluster.supervisor is not None and not cluster.supervisor._thread.is_alive()
    time.sleep(0.3)  # several polls' time: nothing may start now
    assert all(p.poll() is not None for p in spawned), [p.args for p in spawned if p.poll() is None]
