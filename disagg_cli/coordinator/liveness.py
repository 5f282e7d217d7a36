"""Which workers are alive: the heartbeat loop, deaths, restarts and rejoins (steps 2-4 of a link's
life in `membership.py`).

`Liveness` is the part of `WorkerConnections` that decides, from heartbeats and hello answers,
whether a worker is routable: it beats every live worker, takes a silent (or gone, or restarted)
one as dead and fails its requests over (`WorkerGone`), greets it again, lets it rejoin when it
answers with the same model, follows the role a worker reports, and wakes requests waiting for a
worker. It is kept apart from the sockets, the handshake and the reply routing (`membership.py`),
which call into it; `WorkerConnections` sets the state it reads (listed on the class).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import cast

import zmq

from disagg_cli.coordinator.channels import SwitchChannels
from disagg_cli.coordinator.options import CoordinatorConfig
from disagg_cli.coordinator.router import Router
from disagg_cli.coordinator.timeouts import wait_within
from disagg_cli.coordinator.worker_link import RequestFailed, WorkerGone, WorkerLink
from disagg_cli.protocol import PROTOCOL_VERSION, Heartbeat, Hello, HelloAck, Message, encode_message

log = logging.getLogger(__name__)


class Liveness:
    """Who is alive among a `WorkerConnections`' workers; see the module docstring."""

    # Set by `WorkerConnections`, which this is a part of.
    config: CoordinatorConfig
    router: Router
    channels: SwitchChannels
    _probe: Callable[[str], bool] | None
    _alive_changed: asyncio.Event
    _conns: dict[str, WorkerLink]
    _queues: dict[str, asyncio.Queue[tuple[WorkerLink, Message | WorkerGone]]]
    send: Callable[[WorkerLink, Message], Awaitable[None]]

    async def _beat(self) -> None:
        timeout = self.config.worker_timeout_s
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            now = time.monotonic()
            for conn in self._conns.values():
                if not conn.record.is_alive:
                    # A restarted worker at the same address knows nobody: greet it again.
                    with contextlib.suppress(RequestFailed):
                        await self.send(conn, Hello(PROTOCOL_VERSION, "coordinator", ""))
                    continue
                if self._probe is not None and self._probe(conn.record.address):
                    self._mark_dead(conn, f"{conn.name}'s process is gone")
                    continue
                if now - conn.last_seen_s > timeout and cast(int, conn.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    conn.last_seen_s = now  # answers wait unread: this loop was late, not the worker
                if now - conn.last_seen_s > timeout:
                    self._mark_dead(conn, f"{conn.name} sent nothing for {now - conn.last_seen_s:.0f} s "
                                          f"(--worker-timeout {timeout:g} s); it is taken as dead")
                    continue
                conn.seq += 1
                # A beat that cannot go out is left to the silence check above.
                with contextlib.suppress(RequestFailed):
                    await self.send(conn, Heartbeat(conn.seq))

    def _follow_role(self, conn: WorkerLink, role: str, switching_to: str) -> None:
        """Take the worker's word on its role, unless a switch of ours is under way (it knows)."""
        was, address = conn.name, conn.record.address
        if not self.channels.switching(address) and self.router.follow(address, role, switching_to):
            log.warning("%s says it is a %s worker%s; routing by that", was, role,
                        f", switching to {switching_to}" if switching_to else "")
            if conn.ack is not None:
                conn.ack = replace(conn.ack, role=role)
            self._alive_changed.set()

    @property
    def model_fingerprint(self) -> str | None:
        return next((c.ack.model_fingerprint for c in self._conns.values() if c.ack), None)

    def _rejoin(self, conn: WorkerLink, ack: HelloAck) -> None:
        expected = self.model_fingerprint
        if expected and ack.model_fingerprint != expected:
            log.warning("%s came back as a %s worker of model %s; not routing to it", conn.name, ack.role,
                        ack.model_fingerprint)
            return
        self._follow_role(conn, ack.role, "")  # an elastic worker restarts in its configured role
        conn.ack = ack
        conn.rehello = False
        conn.last_seen_s = time.monotonic()
        self.router.mark_alive(conn.record.address)
        self._alive_changed.set()
        log.warning("%s is back and takes requests again", conn.name)

    def note_switch(self, address: str, role: str | None) -> None:
        """A worker's role switch ended (None: it failed): route by its new role, and wake requests
        waiting for a worker."""
        self.router.end_switch(address, role)
        conn = self._conns.get(address)
        if role is not None and conn is not None and conn.ack is not None:
            conn.ack = replace(conn.ack, role=role)
        self._alive_changed.set()

    async def wait_for_worker(self, role: str, deadline: float) -> None:
        """Return once a worker of `role` is routable; raise `NoWorkerError` at `deadline` (monotonic),
        and `RequestFailed("draining")` (retried, routed anew) when no worker has that role any more
        (they switched roles)."""
        while not any(w.routable for w in self.router.by_role(role)):
            if not self.router.by_role(role):
                raise RequestFailed("draining", f"no worker is a {role} worker any more (roles switched)")
            left = deadline - time.monotonic()
            if left <= 0:
                self.router.pick(role)  # raises NoWorkerError naming the role and the known workers
            self._alive_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_within(self._alive_changed.wait(), min(left, 1.0))

    def _restarted(self, conn: WorkerLink) -> None:
        """The worker answered as if it never met us: it restarted faster than the heartbeat noticed.
        What it held is gone; fail those requests over (they retry) and greet it again."""
        if conn.rehello:
            return
        conn.rehello = True
        self._mark_dead(conn, f"{conn.name} restarted and lost its requests")
        conn.sock.send_multipart(encode_message(Hello(PROTOCOL_VERSION, "coordinator", "")))

    def _mark_dead(self, conn: WorkerLink, reason: str) -> None:
        log.warning("%s", reason)
        self.router.mark_dead(conn.record.address)
        for rid in conn.request_ids:
            if rid in self._queues:
                self._queues[rid].put_nowait((conn, WorkerGone(reason)))
        self.channels.lose(conn, reason)
