"""Which workers the coordinator has and which are alive: handshake, heartbeats, joins and leaves.

`WorkerConnections` owns one `WorkerLink` per worker (`worker_link.py`: its DEALER socket and
state), the `Router` whose records say who is alive (changed only through the router's methods),
and a reader task per socket that routes each reply by request id to that request's queue
(`open_queue`); its settings are `CoordinatorConfig` (`options.py`). The `Coordinator`
(`coordinator.py`) holds one and drives requests over it. Steps 2-4, who is alive, are
`Liveness`'s (`liveness.py`), a part of `WorkerConnections`. Life of a worker's link:
1. `connect`: `Hello` to every worker, all answers awaited (a worker still loading its weights just
   answers later); fingerprints must agree;
2. a heartbeat every second; the answers carry the worker's queues and free KV blocks, which the
   router and the live table read;
3. a worker silent for `worker_timeout_s` is taken as dead: its requests get `WorkerGone`; it is
   greeted again every beat, and rejoins when it answers (restarted on the same address). Workers
   answer heartbeats on their I/O thread, so a busy engine does not look silent; and a beat that
   is only unread here (this loop was late) does not count as silence;
4. a worker that answers "no-hello", or acks with a new `instance_id`, restarted faster than that:
   the same, at once. `probe(address)`, when given (a local cluster knows its processes), says
   at once that a worker's process is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from disagg_cli.coordinator.channels import SwitchChannels
from disagg_cli.coordinator.liveness import Liveness
from disagg_cli.coordinator.options import CoordinatorConfig
from disagg_cli.coordinator.router import Router, WorkerRecord
from disagg_cli.coordinator.timeouts import wait_within
from disagg_cli.coordinator.worker_link import RequestFailed, WorkerGone, WorkerLink, same_model
from disagg_cli.errors import DisaggError
from disagg_cli.keys import Keys
from disagg_cli.protocol import (
    PROTOCOL_VERSION,
    Error,
    Heartbeat,
    Hello,
    HelloAck,
    Message,
    Refuse,
    WireError,
    decode_message,
    encode_message,
)

log = logging.getLogger(__name__)
_SEND_LINGER_MS = 500  # on close, how long queued messages (aborts) may still go out
JOIN_GRACE_S = 5.0  # for workers started elsewhere: how long connect() waits for stragglers


class WorkerConnections(Liveness):
    """Connections to a set of workers; see the module docstring for their life."""

    def __init__(self, workers: list[tuple[str, str]], eos_ids: frozenset[int],
                 config: CoordinatorConfig = CoordinatorConfig(),
                 probe: Callable[[str], bool] | None = None) -> None:
        """`workers`: (role, address) pairs, addresses as `tcp://host:port` (or `ipc://…`);
        `eos_ids`: the tokenizer's end-of-sequence ids, which workers stop on; `probe(address)`
        True means the worker's process is known to be gone (a local cluster's child exited)."""
        self.config = config
        self._probe = probe
        self._alive_changed = asyncio.Event()  # set whenever a worker is marked alive
        self.eos_ids = tuple(sorted(eos_ids))
        self.router = Router([WorkerRecord(addr, role) for role, addr in workers], config.policy)
        self._ctx: zmq.asyncio.Context | None = None
        self._conns: dict[str, WorkerLink] = {}
        self._queues: dict[str, asyncio.Queue[tuple[WorkerLink, Message | WorkerGone]]] = {}
        self.channels = SwitchChannels()  # a role switch's, routed ahead of the request queues
        self._heartbeat: asyncio.Task[None] | None = None
        self._keys: Keys | None = None
        self._connected = False  # connect() returned: later hello answers are workers joining

    # --- connections ----------------------------------------------------------------------------

    async def connect(self, check: Callable[[], None] | None = None, join_grace_s: float | None = None) -> None:
        """Greet every worker; return once all answered or, with `join_grace_s`, once every role has
        a worker and the rest had that long more: those are greeted again every beat and join when
        they answer (a worker down at start). A role with no worker answering within
        `handshake_timeout_s` is an error naming its addresses. `check` (called while waiting)
        may raise to fail early, e.g. when a locally started worker process exited. Workers this
        process started itself are all awaited (None): each is coming, or `check` says why not."""
        self._ctx = zmq.asyncio.Context()
        self._keys = Keys.load(self.config.keys_dir, "coordinator") if self.config.keys_dir else None
        for record in self.router.workers:
            await self._open(record)
        timeout = self.config.handshake_timeout_s
        deadline = time.monotonic() + timeout
        roles = {r.role for r in self.router.workers}
        all_roles_at: float | None = None
        while True:
            if check is not None:
                check()
            for conn in self._conns.values():
                if conn.ack is None and conn.hello.done():
                    ack = conn.accept(conn.hello.result())  # a refusal is an error at once
                    self.router.note_capacity(conn.record.address, ack.capacity)
                    self._follow_role(conn, ack.role, "")  # elastic, switched before we met
            pending = {c.hello for c in self._conns.values() if not c.hello.done()}
            if not pending:
                break
            now = time.monotonic()
            have = {c.record.role for c in self._conns.values() if c.ack is not None}
            if roles <= have:
                all_roles_at = all_roles_at or now
                if join_grace_s is not None and now - all_roles_at >= join_grace_s:
                    break
            if now >= deadline:
                if join_grace_s is not None and roles <= have:
                    break
                silent = [c.name for c in self._conns.values() if c.ack is None]
                raise DisaggError(f"no answer to hello from {', '.join(silent)} within {timeout:.0f} s; "
                                  "is a worker of that role listening at that address?")
            await asyncio.wait(pending, timeout=0.25)
        for conn in self._conns.values():
            if conn.ack is None:
                log.warning("%s has not answered yet; it is greeted again and joins when it does", conn.name)
                self.router.mark_dead(conn.record.address)
        same_model(self._conns.values())
        self._connected = True
        # The silence clock starts with the beats: a worker that answered hello early was asked
        # nothing while the slowest was awaited, and would otherwise be taken as dead at the first beat.
        now = time.monotonic()
        for conn in self._conns.values():
            conn.last_seen_s = max(conn.last_seen_s, now)
        self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")

    async def add_worker(self, role: str, address: str) -> None:
        """Take a worker that started after the service did: greeted now, routed to once it answers."""
        if address in self._conns:
            raise DisaggError(f"{address} is already a worker of this coordinator")
        record = WorkerRecord(address, role, is_alive=False)
        self.router.add(record)
        await self._open(record)

    async def remove_worker(self, address: str, reason: str = "removed") -> None:
        """Stop routing to a worker that left; its requests are retried on the others."""
        conn = self._conns.pop(address)
        self._mark_dead(conn, f"{conn.name} left ({reason})")
        if conn.reader is not None:
            conn.reader.cancel()
            await asyncio.gather(conn.reader, return_exceptions=True)
        conn.sock.close()
        self.router.remove(address)

    async def _open(self, record: WorkerRecord) -> None:
        assert self._ctx is not None, "connect() first"
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, _SEND_LINGER_MS)
        if self._keys is not None:
            self._keys.make_client(sock, record.role)
        sock.connect(record.address)  # zmq queues the hello until the worker is bound
        conn = WorkerLink(record, sock, asyncio.get_running_loop().create_future())
        conn.reader = asyncio.create_task(self._read(conn), name=f"read {record.address}")
        self._conns[record.address] = conn
        await self.send(conn, Hello(PROTOCOL_VERSION, "coordinator", ""))

    def capacity(self, address: str) -> dict[str, float]:
        ack = self._conns[address].ack
        return ack.capacity.as_dict() if ack else {}

    async def poll_stats(self, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
        """Fresh heartbeat stats of every live worker, by address (a beat sent now, answered)."""
        async def one(conn: WorkerLink) -> None:
            conn.seq += 1
            want = conn.seq
            await self.send(conn, Heartbeat(want))
            while conn.acked_seq < want:
                conn.beat.clear()
                await conn.beat.wait()

        live = [c for c in self._conns.values() if c.record.is_alive]
        try:
            await wait_within(asyncio.gather(*(one(c) for c in live)), timeout_s)
        except asyncio.TimeoutError:
            raise DisaggError(f"no heartbeat answer within {timeout_s:.0f} s") from None
        return {c.record.address: dict(c.record.stats) for c in live}

    async def wait_idle(self, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
        """Fresh stats once every live worker reports all its KV blocks free (or at `timeout_s`).

        A worker publishes stats between engine steps, so the beat answered right after a
        request's last token may predate the release of its blocks."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = await self.poll_stats()
            if all(s.get("free_blocks") == s.get("num_blocks") for s in stats.values()) \
                    or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        tasks = [t for t in [self._heartbeat, *(c.reader for c in self._conns.values())] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in self._conns.values():
            conn.sock.close()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def link(self, address: str) -> WorkerLink:
        return self._conns[address]

    def open_queue(self, request_id: str) -> asyncio.Queue[tuple[WorkerLink, Message | WorkerGone]]:
        """Where the replies for `request_id` (and `WorkerGone` from a dying worker) will go."""
        queue: asyncio.Queue[tuple[WorkerLink, Message | WorkerGone]] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close_queue(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def queue_of(self, request_id: str) -> asyncio.Queue[tuple[WorkerLink, Message | WorkerGone]] | None:
        return self._queues.get(request_id)

    async def send(self, conn: WorkerLink, msg: Message) -> None:
        try:
            await wait_within(conn.sock.send_multipart(encode_message(msg)), self.config.send_timeout_s)
        except asyncio.TimeoutError:
            raise RequestFailed("timeout", f"could not send {msg.kind} to {conn.name} within "
                          f"{self.config.send_timeout_s:.0f} s") from None

    async def _read(self, conn: WorkerLink) -> None:
        # Runs for the connection's life; liveness is the heartbeat task's job.
        while True:
            frames = await conn.sock.recv_multipart()
            conn.last_seen_s = time.monotonic()
            try:
                msg = decode_message(frames)
            except WireError as e:
                log.warning("dropped a message from %s: %s", conn.name, e)
                continue
            self._dispatch(conn, msg)

    def _dispatch(self, conn: WorkerLink, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            self.router.note_stats(conn.record.address, msg.stats)
            if msg.stats is not None and msg.stats.role:
                self._follow_role(conn, msg.stats.role, msg.stats.switching_to)
            conn.acked_seq = max(conn.acked_seq, msg.seq)
            conn.beat.set()
            return
        rid = getattr(msg, "request_id", None)
        if isinstance(msg, HelloAck | Refuse) or (isinstance(msg, Error) and rid is None):
            if not conn.hello.done():
                conn.hello.set_result(msg)
                if self._connected and isinstance(msg, HelloAck):
                    self._rejoin(conn, msg)  # down (or not yet added) when connect() returned
                elif self._connected:
                    log.warning("%s refused this coordinator: %s", conn.name, msg)
            elif isinstance(msg, HelloAck):
                if conn.record.is_alive and not conn.rehello and conn.ack is not None \
                        and msg.instance_id != conn.ack.instance_id:
                    self._mark_dead(conn, f"{conn.name} restarted (a new instance answered) and lost its requests")
                if not conn.record.is_alive or conn.rehello:
                    self._rejoin(conn, msg)
            elif isinstance(msg, Error) and msg.reason == "no-hello":
                self._restarted(conn)
            else:
                log.warning("%s: %s after the handshake: %s", conn.name, msg.kind, msg)
            return
        if self.channels.route(conn, msg):
            return
        queue = self._queues.get(rid) if isinstance(rid, str) else None
        if queue is None:  # a late message for a request that already ended here
            log.debug("%s: %s for unknown request %r", conn.name, msg.kind, rid)
            return
        queue.put_nowait((conn, msg))
