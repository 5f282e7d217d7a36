"""Each worker role by name: the table the worker commands (and anything hosting a worker) use.

Apart from `workers/worker.py`, which the roles subclass, so the base never imports its roles.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import Any

from disagg_cli.config import WorkerConfig
from disagg_cli.core_lease import CoreLease
from disagg_cli.workers.colocated import ColocatedWorker
from disagg_cli.workers.decode import DecodeWorker
from disagg_cli.workers.prefill import PrefillWorker
from disagg_cli.workers.stop import StopFlag
from disagg_cli.workers.worker import Worker

ROLE_CLASSES: dict[str, type[Worker[Any]]] = {"prefill": PrefillWorker, "decode": DecodeWorker,
                                         "colocated": ColocatedWorker}


def serve_worker(config: WorkerConfig, cache_dir: Any) -> int:
    """Build the worker of `config.role` and serve until SIGINT/SIGTERM; the exit code. For a
    process's main thread: hosts of a worker in a thread build it and call `serve`, `request_stop`."""
    stop = StopFlag()
    stop.on_signals()  # before the weights load, so a SIGTERM then still drains and exits 0
    if config.lend is not None:  # loading (or restarted on its slot): its cores are not free
        CoreLease.open(config.lend).set_busy(True)
    worker = ROLE_CLASSES[config.role](config, cache_dir, stop)
    kernel = worker.lm.execution.backend.kernel
    if config.lend is not None and kernel is not None:  # every lender's cores; borrowing while they idle
        pin_threads(config.lend.cpus)
        CoreLease.open(config.lend).attach(kernel.lib)
        worker.log(f"cores lent and borrowed: {len(config.lend.threads)} workers on cpus "
                   f"{list(config.lend.cpus)}, {config.lend.threads[config.lend.slot]} thread(s) of its own")
    elif config.cpus:
        pin_threads(config.cpus)
    return serve_roles(worker, cache_dir)


def serve_roles(worker: Worker[Any], cache_dir: Any) -> int:
    """Serve `worker`, and after each role switch it finishes (`SwitchRole`), the worker of the new
    role built in place on its model, pool and I/O thread; the exit code."""
    while True:
        code = worker.serve()
        switch = worker.switch
        if switch is None or not switch.done:
            return code
        config = replace(worker.config, role=switch.role)
        worker = ROLE_CLASSES[switch.role](config, cache_dir, worker.stop, carry=worker.carry())
        worker.announce()


def pin_threads(cpus: tuple[int, ...]) -> None:
    """Set this process's CPU affinity on each of its threads (Linux applies it per thread; threads
    started later inherit it from the one that starts them). Where that is not possible, nothing."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(tid, set(cpus))
