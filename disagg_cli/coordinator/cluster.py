"""A local cluster: worker processes started on this machine for `generate` and `bench`.

Life of a cluster:
1. `start()`: each `WorkerSpec` becomes `python -m disagg_cli <role>-worker …` on a free
   127.0.0.1 port (or the spec's own), its stderr going to a log file in a temporary folder, in a
   session of its own so the terminal's Ctrl-C reaches the coordinator only (which aborts the
   in-flight requests, then stops the workers);
2. readiness is the coordinator's handshake succeeding (zmq holds the hello until the worker
   binds), while `check()` turns a worker that exits during start into one line quoting the last
   line of its log;
3. `supervise()` (the service calls it once every worker answered): a worker that exits from then
   on is started again on its address, with back-off and a cap (`supervisor.py`); `restart(i)`
   does the same on demand (tests that kill workers on purpose restart them themselves);
4. `stop()`: supervision ends first (nothing is restarted while stopping), then SIGTERM (a
   worker's one exit path), wait, then SIGKILL what is left.

Placement: a spec without `threads` gets an even share of the cores this process may use (at
least one), and without `cpus` a run of that many cores, round-robin. The worker sets that
affinity itself, on every thread, once its model is loaded (`WorkerConfig.cpus`, Linux only;
elsewhere the `cpus` are ignored): loading on any core, three workers on two cores were ready in
~10 s instead of the ~15 s that two loading on one pinned core took. Workers with cores of their
own share a lease of them (`core_lease.py`, unless the topology says `lend_cores = false`): each
may run on all their cores, and one with no work lends its threads to the others' kernel jobs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from disagg_cli import core_lease
from disagg_cli.coordinator.supervisor import RestartPolicy, Supervisor
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec
from disagg_cli.coordinator.worker_process import WorkerProcess
from disagg_cli.core_lease import LendConfig
from disagg_cli.errors import DisaggError, UsageError

STOP_TIMEOUT_S = 10.0


def available_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def place(workers: tuple[WorkerSpec, ...], cpus: list[int]) -> list[WorkerSpec]:
    """Fill in `threads` and `cpus` where a spec leaves them open (pure, for tests)."""
    share = max(1, len(cpus) // max(1, len(workers)))
    placed, cursor = [], 0
    for spec in workers:
        threads = spec.threads or share
        own = spec.cpus
        if own is None:
            own = tuple(cpus[(cursor + i) % len(cpus)] for i in range(min(threads, len(cpus))))
            cursor += len(own)
        missing = sorted(set(own) - set(cpus))
        if missing:
            raise UsageError(f"{spec.role} worker asks for cpus {list(own)}, but {missing} are not available "
                             f"to this process (available: {cpus})")
        placed.append(replace(spec, threads=threads, cpus=tuple(own)))
    return placed


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_command(spec: WorkerSpec, model: str, lend: LendConfig | None = None) -> list[str]:
    """The child's command line: its whole `WorkerConfig` as JSON, not rebuilt flag by flag."""
    config = replace(spec.worker_config(model), lend=lend)
    return [sys.executable, "-m", "disagg_cli", "run-worker", config.to_json()]


def leases(specs: list[WorkerSpec], path: Path) -> list[LendConfig | None]:
    """Each placed worker's part of one lease at `path` where they can share their cores (see
    `core_lease.lendable`), else none (pure, for tests)."""
    threads = [spec.threads or 1 for spec in specs]
    cpus = [spec.cpus or () for spec in specs]
    if not core_lease.lendable(threads, cpus):
        return [None] * len(specs)
    every = tuple(sorted(c for own in cpus for c in own))
    return [LendConfig(str(path), i, tuple(threads), every) for i in range(len(specs))]


class LocalCluster:
    """Worker processes for `config`, with `model` as a local path (so workers never fetch)."""

    def __init__(self, config: ClusterConfig, model: str, log_dir: Path | None = None) -> None:
        if config.backend != "local":
            raise UsageError(f"this topology runs on {config.backend} ([cluster] backend = {config.backend!r}); "
                             "serve it with `disagg serve --config FILE`, or set backend = \"local\"")
        self.config = config
        self.model = model
        self._own_log_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="disagg-cluster-")) if log_dir is None else log_dir
        self.workers: list[WorkerProcess] = []
        self.keep_logs = False  # set when a worker failed, so the quoted log path stays valid
        self.supervisor: Supervisor | None = None
        self._restarting = threading.Lock()  # the supervisor's thread and a caller's may restart at once
        self.leases: list[LendConfig | None] = []  # by worker: its part of the cores' lease, if any

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            placed = place(self.config.workers, available_cpus())
            lease_path = self.log_dir / "cores.lease"
            self.leases = leases(placed, lease_path) if self.config.lend_cores else [None] * len(placed)
            if any(self.leases):
                core_lease.create(lease_path, len(placed))
            for i, spec in enumerate(placed):
                if spec.port == 0:
                    spec = replace(spec, port=free_port(spec.host))
                log_path = self.log_dir / f"{i}-{spec.role}-{spec.port}.log"
                process = self._spawn(spec, log_path, self.leases[i])
                self.workers.append(WorkerProcess(spec, f"tcp://{spec.host}:{spec.port}", process, log_path))
        except BaseException:
            self.stop()
            raise

    def restart(self, index: int) -> WorkerProcess:
        """Start worker `index` again with the same spec and port (SIGKILLing it first if it still
        runs), so a coordinator that knew its address can find it again; its log gets a suffix."""
        with self._restarting:
            return self._restart(index)

    def restart_exited(self, exited: WorkerProcess) -> WorkerProcess | None:
        """`restart` the worker whose process `exited` was; None if it has been restarted (or the
        cluster stopped) since."""
        with self._restarting:
            index = next((i for i, w in enumerate(self.workers) if w is exited), None)
            return None if index is None else self._restart(index)

    def _restart(self, index: int) -> WorkerProcess:
        old = self.workers[index]
        if old.process.poll() is None:
            old.process.kill()
        old.process.wait()
        self.keep_logs |= old.process.returncode not in (0, -signal.SIGKILL)
        # Named from the spec, not the last log's name: a name grown by every restart outgrows the file system's.
        log_path = self.log_dir / f"{index}-{old.spec.role}-{old.spec.port}.r{time.monotonic_ns()}.log"
        spawned = self._spawn(old.spec, log_path, self.leases[index])
        self.workers[index] = WorkerProcess(old.spec, old.address, spawned, log_path)
        return self.workers[index]

    def _spawn(self, spec: WorkerSpec, log_path: Path, lend: LendConfig | None) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as log:
            return subprocess.Popen(worker_command(spec, self.model, lend), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True)

    def supervise(self, policy: RestartPolicy | None = None) -> None:
        """From now until `stop()`, start again every worker that exits (see `supervisor.py`)."""
        if self.supervisor is None:
            self.supervisor = Supervisor(self, policy or RestartPolicy())
            self.supervisor.start()

    def returning_roles(self) -> set[str]:
        """Roles with a worker running or that supervision will start again: requests may wait for it."""
        return self.supervisor.returning_roles() if self.supervisor is not None else set()

    def restarts(self) -> dict[str, int]:
        """How many times supervision started a worker of each role again."""
        return dict(self.supervisor.restarts) if self.supervisor is not None else {}

    def addresses(self) -> list[tuple[str, str]]:
        """(role, address) of every worker, in the topology's order."""
        return [(w.spec.role, w.address) for w in self.workers]

    def is_gone(self, address: str) -> bool:
        """Whether the process serving `address` has exited (a restarted one counts as there)."""
        return any(w.address == address and w.process.poll() is not None for w in self.workers)

    def check(self) -> None:
        """Raise if a worker process has exited (called while waiting for the handshake)."""
        for w in self.workers:
            code = w.process.poll()
            if code is not None:
                last = w.last_log_line() or "(nothing logged)"
                self.keep_logs = True
                raise DisaggError(f"{w.name} exited with code {code} while starting: {last} (log: {w.log_path})")

    def stop(self) -> None:
        if self.supervisor is not None:  # first: a worker stopped below must not be started again
            self.supervisor.stop()
        for w in self.workers:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self.workers:
            try:
                w.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            self.keep_logs |= w.process.returncode != 0
        self.workers.clear()
        if self._own_log_dir and not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)
