"""Each worker role by name: the table the worker commands (and anything hosting a worker) use.

Apart from `workers/worker.py`, which the roles subclass, so the base never imports its roles.
"""

from __future__ import annotations

from typing import Any

from disagg_cli.config import WorkerConfig
from disagg_cli.workers.base import StopFlag
from disagg_cli.workers.colocated import ColocatedWorker
from disagg_cli.workers.decode import DecodeWorker
from disagg_cli.workers.prefill import PrefillWorker
from disagg_cli.workers.worker import Worker

ROLE_CLASSES: dict[str, type[Worker]] = {"prefill": PrefillWorker, "decode": DecodeWorker,
                                         "colocated": ColocatedWorker}


def serve_worker(config: WorkerConfig, cache_dir: Any) -> int:
    """Build the worker of `config.role` and serve until SIGINT/SIGTERM; the exit code. For a
    process's main thread: hosts of a worker in a thread build it and call `serve`, `request_stop`."""
    stop = StopFlag()
    stop.on_signals()  # before the weights load, so a SIGTERM then still drains and exits 0
    return ROLE_CLASSES[config.role](config, cache_dir, stop).serve()
