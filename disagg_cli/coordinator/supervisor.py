"""Supervision of a local cluster's workers: one that exits while the service runs is started again.

The new process binds the same address, so the coordinator takes it back by its usual path
(`membership.py`: a dead worker is greeted again every beat and rejoins when it answers), and
requests wait for it as for any returning worker. A thread per cluster polls the processes.

Life of a supervised worker:
1. it exits (a crash, the OOM killer, a stray signal): its restart falls due after a back-off
   (`RestartPolicy`: 1 s, doubling with each restart it had in the window, at most 30 s);
2. when due, `LocalCluster.restart_exited` starts it again (same spec and port, a fresh log),
   unless someone else did meanwhile (bench serve's chaos soak restarts what it kills); it is
   counted in `restarts[role]` (`disagg:worker_restarts_total` in `/metrics`) and one line is
   logged naming its role, address, exit code and the last line of its log;
3. past `max_restarts` within `window_s` it stays down and an error line says so: a worker that
   dies at every start must not restart forever;
4. `stop()`, the first step of `LocalCluster.stop`, ends the thread (a restart under way finishes
   first) before any worker is stopped: a worker stopped on purpose is never started again.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Protocol

from disagg_cli.coordinator.worker_process import WorkerProcess
from disagg_cli.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    first_delay_s: float = 1.0  # before the first restart: a worker may exit at once again
    max_delay_s: float = 30.0
    max_restarts: int = 5  # per worker within `window_s`; then it is left down
    window_s: float = 600.0
    poll_s: float = 0.2  # how often the processes are looked at

    def __post_init__(self) -> None:
        if min(self.first_delay_s, self.max_delay_s, self.window_s) < 0 or self.poll_s <= 0 \
                or self.max_restarts < 0:
            raise UsageError(f"a restart policy takes non-negative delays and counts, got {self}")

    def delay_s(self, recent_restarts: int) -> float:
        """The back-off before a worker's next restart, given its restarts within the window."""
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** recent_restarts)


def describe_exit(code: int | None) -> str:
    """`-9 (SIGKILL)` for a process a signal ended, else the code itself."""
    if code is not None and code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


class Restartable(Protocol):
    """What supervision needs of a cluster (`LocalCluster`): its workers, and a way to start one again."""

    workers: list[WorkerProcess]
    keep_logs: bool

    def restart_exited(self, exited: WorkerProcess) -> WorkerProcess | None: ...


class Supervisor:
    """Restarts the workers of `cluster` that exit, per `policy`; see the module docstring."""

    def __init__(self, cluster: Restartable, policy: RestartPolicy) -> None:
        self.cluster = cluster
        self.policy = policy
        # Every role at zero from the start, so a scrape shows the series before any restart.
        self.restarts: Counter[str] = Counter({w.spec.role: 0 for w in cluster.workers})
        self._history: dict[int, deque[float]] = {}  # worker index -> monotonic times of its restarts
        self._due: dict[int, tuple[WorkerProcess, float, float]] = {}  # index -> (who exited, when due, back-off)
        self._given_up: set[int] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Restart nothing more; returns once the thread has ended."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def returning_roles(self) -> set[str]:
        """Roles with a worker that runs or will be started again (one not given up on): a worker the
        coordinator counts as dead in such a role is on its way back. Any thread."""
        given_up = set(self._given_up)
        return {w.spec.role for i, w in enumerate(list(self.cluster.workers)) if i not in given_up}

    def _run(self) -> None:
        while not self._stopping.wait(self.policy.poll_s):
            now = time.monotonic()
            for index, worker in enumerate(list(self.cluster.workers)):
                pending = self._due.get(index)
                if pending is not None and pending[0] is not worker:
                    del self._due[index]  # started again by someone else (bench serve's chaos soak)
                    pending = None
                if index in self._given_up or worker.process.poll() is None:
                    continue
                if pending is None:
                    self._exited(index, worker, now)
                elif now >= pending[1] and not self._stopping.is_set():
                    self._restart(index)

    def _recent(self, index: int, now: float) -> deque[float]:
        history = self._history.setdefault(index, deque())
        while history and now - history[0] > self.policy.window_s:
            history.popleft()
        return history

    def _exited(self, index: int, worker: WorkerProcess, now: float) -> None:
        recent = len(self._recent(index, now))
        self.cluster.keep_logs = True  # the log the lines quote must outlive the cluster
        if recent >= self.policy.max_restarts:
            self._given_up.add(index)
            log.error("%s; not started again: it was restarted %d times within %.0f min", _exit_line(worker),
                      recent, self.policy.window_s / 60)
            return
        delay = self.policy.delay_s(recent)
        self._due[index] = (worker, now + delay, delay)

    def _restart(self, index: int) -> None:
        exited, _, delay = self._due.pop(index)
        try:
            # None: restarted by someone else since it was seen to exit.
            worker = self.cluster.restart_exited(exited)
        except OSError as e:  # the interpreter or the log folder went away: trying again will not help
            self._given_up.add(index)
            log.error("%s; could not start it again: %s", _exit_line(exited), e)
            return
        if worker is None:
            return
        recent = self._recent(index, time.monotonic())
        recent.append(time.monotonic())
        self.restarts[worker.spec.role] += 1
        log.warning("%s; started again on the same address after %g s (restart %d of at most %d within %.0f min)",
                    _exit_line(exited), delay, len(recent), self.policy.max_restarts, self.policy.window_s / 60)


def _exit_line(worker: WorkerProcess) -> str:
    return (f"{worker.name} exited with code {describe_exit(worker.process.returncode)} (last log line: "
            f"{worker.last_log_line() or '(nothing logged)'}; log: {worker.log_path})")
