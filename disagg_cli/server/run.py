"""`disagg serve`: the coordinator service behind uvicorn, from start to a clean exit.

1. bind the HTTP port first (a port in use is one line, before any worker starts);
2. start the service (the local cluster, or connect to running workers) and wait for every
   worker's hello; SIGTERM meanwhile stops what was started;
3. serve; print the ready line with the URL; on a terminal, a live table of workers and
   requests in flight, else one access-log line per request;
4. SIGINT/SIGTERM: the service drains (health turns 503, new requests are refused), uvicorn
   waits for in-flight responses, the workers are stopped; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import sys
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from disagg_cli import timing_table, ui
from disagg_cli.coordinator.service import CoordinatorService, ServiceConfig
from disagg_cli.errors import UsageError
from disagg_cli.server.app import ServerConfig, create_app

if TYPE_CHECKING:
    from disagg_cli.engine.request import RequestOutput

READY_POLL_S = 0.05
GRACEFUL_SHUTDOWN_S = 30  # how long uvicorn lets in-flight responses finish after SIGINT/SIGTERM
LEFTOVER_DRAIN_S = 5.0  # then: requests whose client is gone are aborted after this


def run_server(service_config: ServiceConfig, config: ServerConfig) -> None:
    sock = bind(config.host, config.port)
    try:
        asyncio.run(_serve(service_config, config, sock))
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use; stop what listens there or pass --port") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, except that a signal drains the service and ends in exit 0 (uvicorn re-raises it)."""

    def __init__(self, config: uvicorn.Config, service: CoordinatorService) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


async def _serve(service_config: ServiceConfig, config: ServerConfig, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    # Until uvicorn takes over the signals: SIGTERM while workers start must still stop them.
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    interactive = ui.is_interactive()
    service = CoordinatorService(service_config)
    try:
        await service.start()
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    try:
        config = replace(config, access_log=config.access_log and not interactive)
        app = create_app(service, config, service_config.model)
        host, port = sock.getsockname()[:2]
        uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        server = _Server(uv, service)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(READY_POLL_S)
        if server.started:
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
            roles = [v.role for v in service.workers()]
            summary = ", ".join(f"{roles.count(r)} {r}" for r in dict.fromkeys(roles))
            sys.stderr.write(f"disagg serve: ready at {url} (OpenAI API under /v1, model "
                             f"{app.state.metrics.model_name!r}; {summary} worker(s))\n")
            sys.stderr.flush()
        if interactive:
            await _live_table(service, serving)
        await serving
    finally:
        # uvicorn has put the default handlers back by now: a second SIGTERM/SIGINT while the
        # service stops must not kill this process and orphan the workers it started.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: None)
        try:
            await service.stop(LEFTOVER_DRAIN_S)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _live_table(service: CoordinatorService, serving: asyncio.Task[None]) -> None:
    """Workers and the requests in flight, redrawn until the server stops."""
    requests: list[RequestOutput] = []  # the table holds this list; refilled in place
    with timing_table.live_table(requests, enabled=True, redirect_stdout=False) as table:
        while not serving.done():
            requests[:] = [out for out, _ in list(service.in_flight.values())]
            table.workers = {w.address: (w.role, w.stats) for w in service.workers()}
            table.planner = service.planner.reasons() if service.planner is not None else {}
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(serving), 0.5)
