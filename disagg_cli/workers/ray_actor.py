"""A worker inside a Ray actor: the actor process hosts one `Worker` in a thread of its own.

Ray places the actor (by the worker's `num_cpus`, `num_gpus` and custom resources) and restarts it
when its process dies; `coordinator/ray_cluster.py` creates and follows the actors. Life of one
actor process (Ray runs `__init__` again in every restarted process):
1. `__init__` returns at once and starts the worker thread, so that Ray reports the actor placed
   while the weights still load, and every method below stays callable meanwhile (the actor is
   threaded: `max_concurrency`);
2. the thread binds the worker's ZeroMQ socket on this node's address (the one Ray knows the node
   by; `host = "0.0.0.0"` binds every interface and advertises that address) on a free port, unless
   the spec fixes one, then serves; `address()` answers once it is bound, with the worker's
   instance id;
3. `wait_stopped(instance)` is held open by the driver for the worker's life: it returns when the
   worker stops, at once when the caller names an older instance, and fails (in the driver) the
   moment this process dies, which is how the driver learns of a death without polling;
4. `stop()` drains the worker as SIGTERM does a worker process; a worker thread that dies of an
   error ends the process, so Ray restarts it rather than keeping a husk that serves nothing.

Ray (and torch, which the driver never loads) are imported only inside the methods: the driver
imports this module to name the actor class, and it loads without Ray installed.
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from disagg_cli.coordinator.topology import WorkerSpec
from disagg_cli.errors import DisaggError
from disagg_cli.workers.base import log
from disagg_cli.workers.stop import StopFlag

if TYPE_CHECKING:  # the driver imports this module to name the actor class: no torch there
    from disagg_cli.workers.worker import Worker

BIND_ATTEMPTS = 5  # a free port found here may be taken before the worker binds it
CALLS_AT_ONCE = 4  # wait_stopped, address, stop and info may all be waiting at the same time


class WorkerActor:
    """One worker (`spec` of the model `model`, CurveZMQ keys in `keys_dir` on this node)."""

    def __init__(self, spec: WorkerSpec, model: str, keys_dir: str | None = None) -> None:
        self.spec = spec
        self.model = model
        self.keys_dir = Path(keys_dir) if keys_dir else None
        self.worker: Worker | None = None
        self.error: str | None = None
        self._bound = threading.Event()
        self._stopped = threading.Event()
        self._stop = StopFlag()
        self._thread = threading.Thread(target=self._run, name=f"{spec.role}-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            worker = self._build()
        except BaseException as e:  # reported to the driver by address()
            self.error = str(e) if isinstance(e, DisaggError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, DisaggError):
                traceback.print_exc()
            self._bound.set()
            self._stopped.set()
            return
        self.worker = worker
        self._bound.set()
        from disagg_cli.model.registry import default_cache_dir
        from disagg_cli.workers.roles import serve_roles

        try:
            serve_roles(worker, default_cache_dir())
        except BaseException:  # a dead engine thread: let Ray restart the process
            traceback.print_exc()
            log(self.spec.role, "the worker thread died; ending the actor process so Ray restarts it")
            os._exit(1)
        self._stopped.set()

    def _build(self) -> Worker:
        import ray

        from disagg_cli.coordinator.cluster import free_port
        from disagg_cli.model.registry import default_cache_dir
        from disagg_cli.workers.roles import ROLE_CLASSES

        node_ip = ray.util.get_node_ip_address()
        bind_all = self.spec.host == "0.0.0.0"
        host = "0.0.0.0" if bind_all else node_ip
        spec = self.spec
        if spec.threads is None:  # as many torch threads as CPUs Ray gave the actor
            spec = replace(spec, threads=max(1, int(spec.ray_options()["num_cpus"])))
        for attempt in range(BIND_ATTEMPTS):
            port = spec.port or free_port(node_ip)
            config = replace(replace(spec, host=host, port=port).worker_config(self.model),
                             advertise_host=node_ip if bind_all else None, keys_dir=self.keys_dir)
            try:
                return ROLE_CLASSES[spec.role](config, default_cache_dir(), self._stop)
            except DisaggError as e:
                if spec.port or "cannot listen" not in str(e) or attempt == BIND_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    # --- what the driver calls ----------------------------------------------------------------------

    def address(self, wait_s: float | None = None) -> tuple[str, str] | None:
        """(address peers reach the worker at, its instance id) once bound; None if not yet
        after `wait_s` (None: wait); raises the worker's own error if it could not start."""
        if not self._bound.wait(wait_s):
            return None
        if self.error is not None or self.worker is None:
            raise DisaggError(self.error or "the worker did not start")
        return self.worker.address, self.worker.ident.instance_id

    def wait_stopped(self, instance_id: str) -> str:
        """Return when the worker stops ("stopped"), or at once ("restarted") if `instance_id` is
        not this process's worker (it died and Ray restarted it since the caller last looked)."""
        if self.worker is None or self.worker.ident.instance_id != instance_id:
            return "restarted"
        self._stopped.wait()
        return "stopped"

    def stop(self, timeout_s: float) -> bool:
        """Drain and stop the worker (as SIGTERM does); True if it stopped within `timeout_s`."""
        self._stop.set()
        return self._stopped.wait(timeout_s)

    def info(self) -> dict[str, str | int | None]:
        """Where this actor runs, as Ray sees it, and what it serves."""
        import ray

        context = ray.get_runtime_context()
        return {"role": self.spec.role, "address": self.worker.address if self.worker else None,
                "node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "error": self.error}
