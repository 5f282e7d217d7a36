"""What every worker process shares: its socket, the I/O thread, the handshake, one exit path.

Threads:
- the **engine thread** (the main thread) owns the model and the pool; it never touches a socket.
  Between engine steps it drains the inbox; it sends by putting messages in the outbox.
- the **I/O thread** owns every zmq socket: the worker's ROUTER (peers connect to it) and the
  DEALERs it opens to other workers. It checks and decodes what arrives (size limits, version,
  handshake; a role may decode payloads here, e.g. KV, so the engine only places tensors), answers
  `Hello` and `Heartbeat` itself, and sends what the engine queued. A pipe wakes it for sends.
  What it sees that the engine must act on, it posts to the inbox (`CoordinatorGone`, `PeerLost`).
- between them, only queues, and two guarded hand-offs: the heartbeat figures (`publish_stats`,
  under a lock) and a decode worker's `ReservedKV` (`workers/checks.py`, under its lock).

Life of a connection: the peer's first message is `Hello`; it is answered with `HelloAck`, or
`Refuse` when its model fingerprint differs from ours (the message names both). Anything before
`Hello` is answered with `Error(reason="no-hello")`; a malformed message is dropped with a logged
reason and an `Error` back; the worker keeps serving either way. Greeted peers are remembered
within a bound (`workers/greeted.py`), so a flood of hellos cannot grow memory without end.

Shutdown: SIGINT or SIGTERM sets a flag (`workers/stop.py`); the engine thread aborts what is in
flight (each request's coordinator gets `Error(reason="shutdown")`), frees every block, the I/O
thread flushes and closes the sockets, and the process exits 0.
"""

from __future__ import annotations

import os
import queue
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import zmq

from disagg_cli.errors import UsageError
from disagg_cli.keys import Keys
from disagg_cli.protocol import (
    PROTOCOL_VERSION,
    Error,
    Heartbeat,
    Hello,
    HelloAck,
    KVLayout,
    Message,
    Refuse,
    WireError,
    WorkerCapacity,
    WorkerStats,
    decode_message,
    encode_message,
)
from disagg_cli.workers.greeted import GreetedPeers
from disagg_cli.workers.peers import PeerLinks

# Where a message goes: ("router", identity) for a peer connected to us, ("peer", (address,
# instance)) for one incarnation of a worker we connect to ourselves (`workers/peers.py`).
Dest = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    role: str
    address: str
    fingerprint: str
    kv_layout: KVLayout
    capacity: WorkerCapacity
    runtime: dict[str, str] = field(default_factory=dict)  # resolved dtype/quantization and why
    # This process's incarnation, new at every start: peers tell a restart from a reconnect by it.
    instance_id: str = field(default_factory=lambda: secrets.token_hex(8))


def log(role: str, message: str) -> None:
    sys.stderr.write(f"[{role} {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


@dataclass(frozen=True, slots=True)
class CoordinatorGone:
    """Posted by the I/O thread: a coordinator said nothing (coordinators heartbeat every second)
    for `silent_s`, past the worker's `client_timeout_s`; its requests are to be aborted, so a
    vanished client holds no blocks."""

    who: bytes
    silent_s: float


class WorkerIO:
    """The I/O thread and the queues between it and the engine thread."""

    def __init__(self, ident: WorkerIdentity, bind_host: str, port: int,
                 preprocess: Callable[[Dest, Message], Any] | None = None,
                 prepare: Callable[[Any], Message | None] | None = None,
                 keys: Keys | None = None, client_timeout_s: float = 30.0) -> None:
        self.ident = ident
        self.inbox: queue.Queue[tuple[Dest, Any]] = queue.Queue()
        # Messages, or work items that `prepare` turns into messages on the I/O thread (e.g. KV to
        # encode), so encoding overlaps the engine's next layer instead of stalling it.
        self._outbox: queue.Queue[tuple[Dest, Any] | None] = queue.Queue()
        self._prepare = prepare
        self._wake_r, self._wake_w = os.pipe()
        self._preprocess = preprocess
        self._ctx: zmq.Context = zmq.Context.instance()
        self._keys = keys
        self._auth = keys.start_authenticator(self._ctx) if keys else None
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 2000)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer raises, not drops
        if keys:
            keys.make_server(self._router)
        try:
            self._router.bind(f"tcp://{bind_host}:{port}")
        except zmq.ZMQError as e:
            raise UsageError(f"cannot listen on {bind_host}:{port}: {e}") from None
        self._poller = zmq.Poller()
        self._links = PeerLinks(self._ctx, self._hello, lambda lost: self.inbox.put((("peer", lost.address), lost)),
                                self._register, keys)
        self._greeted = GreetedPeers()
        # When each coordinator was last heard; this thread's own (one silent too long is posted).
        self._coordinator_seen: dict[bytes, float] = {}
        self._client_timeout_s = client_timeout_s
        # The engine thread's latest figures, answered to heartbeats here: a hand-off between the
        # two threads (the engine publishes, this thread reads), so under a lock.
        self._stats_lock = threading.Lock()
        self._stats: WorkerStats | None = None
        self._thread = threading.Thread(target=self._run, name="worker-io", daemon=True)
        self._running = True

    def start(self) -> None:
        self._thread.start()

    def send(self, dest: Dest, msg: Any) -> None:
        """Queue `msg` for the I/O thread (any thread may call this)."""
        self._outbox.put((dest, msg))
        os.write(self._wake_w, b"\0")

    def publish_stats(self, stats: WorkerStats) -> None:
        """Replace the figures heartbeats are answered with (the engine thread, between steps)."""
        with self._stats_lock:
            self._stats = stats

    def rebind(self, ident: WorkerIdentity, preprocess: Callable[[Dest, Message], Any] | None,
               prepare: Callable[[Any], Message | None] | None) -> None:
        """A role switch: answer hellos as `ident` (same instance) and hand work to the new role's
        hooks. Called after `flush`, so nothing the old role queued is left for them."""
        self.ident = ident
        self._preprocess = preprocess
        self._prepare = prepare

    def flush(self, timeout_s: float) -> bool:
        """Wait until the I/O thread has sent (or dropped) everything queued before this call; False
        at `timeout_s`."""
        done = threading.Event()
        self._outbox.put((("flush", None), done))
        os.write(self._wake_w, b"\0")
        return done.wait(timeout_s)

    def stop(self) -> None:
        self._outbox.put(None)
        os.write(self._wake_w, b"\0")
        self._thread.join(timeout=10)

    # --- the I/O thread ----------------------------------------------------------------------

    def _register(self, sock: zmq.Socket, on: bool) -> None:
        if on:
            self._poller.register(sock, zmq.POLLIN)
        else:
            self._poller.unregister(sock)

    def _run(self) -> None:
        poller = self._poller
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while self._running:
            for sock, _ in poller.poll(timeout=500):
                try:
                    if sock is self._router:
                        self._receive_router()
                    elif sock == self._wake_r:
                        os.read(self._wake_r, 4096)
                        self._flush_outbox()
                    elif self._links.owns(sock):
                        self._receive_peer(sock)
                except Exception:  # a bug met by one message must not silence the worker's sockets
                    log(self.ident.role, f"I/O thread: {traceback.format_exc(limit=-3)}")
            self._links.check()
            self._check_coordinators()
        self._links.close()
        self._router.close()
        if self._auth is not None:
            self._auth.stop()

    def _check_coordinators(self) -> None:
        now = time.monotonic()
        for who, seen in list(self._coordinator_seen.items()):
            if now - seen > self._client_timeout_s:
                del self._coordinator_seen[who]
                self.inbox.put((("router", who), CoordinatorGone(who, now - seen)))

    def _flush_outbox(self) -> None:
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._running = False
                return
            (kind, where), msg = item
            if isinstance(msg, threading.Event):  # `flush`: everything before it has gone
                msg.set()
                continue
            if not isinstance(msg, Message):
                assert self._prepare is not None
                try:
                    msg = self._prepare(msg)
                except Exception as e:  # e.g. KV that would not encode: fail its request, on the engine thread
                    rid = getattr(msg, "request_id", None)
                    log(self.ident.role, f"could not prepare a message of request {rid!r}: {type(e).__name__}: {e}")
                    self.inbox.put(((kind, where), Error(rid, "internal-error", f"{type(e).__name__}: {e}")))
                    continue
                if msg is None:
                    continue
            try:
                if kind == "router":
                    self._router.send_multipart([where, *encode_message(msg)], copy=False)
                else:
                    address, instance = where
                    self._links.send(address, instance, msg)
            except Exception as e:  # the peer went away (its requests time out on their side), or a bug
                log(self.ident.role, f"could not send {msg.kind} to {where!r:.80}: {type(e).__name__}: {e}")

    def _hello(self) -> Hello:
        i = self.ident
        return Hello(PROTOCOL_VERSION, i.role, i.fingerprint, i.kv_layout, i.capacity, i.runtime)

    def _receive_peer(self, sock: zmq.Socket) -> None:
        frames = sock.recv_multipart(copy=False)
        try:
            msg = decode_message([f.buffer for f in frames])
        except WireError as e:
            log(self.ident.role, f"dropped a message from a peer: {e}")
            return
        rest = self._links.receive(sock, msg)
        if rest is not None:
            self.inbox.put((("peer", rest[0]), rest[1]))

    def _receive_router(self) -> None:
        identity, *frames = self._router.recv_multipart(copy=False)
        who = identity.bytes
        dest: Dest = ("router", who)
        try:
            msg = decode_message([f.buffer for f in frames])
        except WireError as e:
            log(self.ident.role, f"dropped a message: {e}")
            self._reply(who, Error(e.request_id, e.reason, str(e)))
            return
        if isinstance(msg, Hello):
            self._greet(who, msg)
            if msg.role == "coordinator":
                self._coordinator_seen[who] = time.monotonic()
            return
        if who in self._coordinator_seen:
            self._coordinator_seen[who] = time.monotonic()
        if not self._greeted.heard(who):
            self._reply(who, Error(getattr(msg, "request_id", None), "no-hello",
                                   f"{msg.kind} before hello; say hello first"))
            return
        if isinstance(msg, Heartbeat):
            with self._stats_lock:
                stats = self._stats
            if stats is not None:
                stats = replace(stats, greeted_peers=len(self._greeted))
            self._reply(who, Heartbeat(msg.seq, stats))
            return
        item: Any = msg
        if self._preprocess is not None:
            try:
                item = self._preprocessed(dest, msg)
            except WireError as e:
                # The sender learns (a prefill worker then fails the request at its coordinator),
                # and so does the engine thread, which frees what the request held here.
                log(self.ident.role, f"dropped {msg.kind}: {e}")
                self._reply(who, Error(e.request_id, e.reason, str(e)))
                self.inbox.put((dest, Error(e.request_id, e.reason, str(e))))
                return
        self.inbox.put((dest, item))

    def _preprocessed(self, dest: Dest, msg: Message) -> Any:
        """The role's `preprocess(dest, msg)`; whatever goes wrong in it, a `WireError`."""
        assert self._preprocess is not None
        try:
            return self._preprocess(dest, msg)
        except WireError:
            raise
        except Exception as e:  # a decoder's bug or an input it did not foresee
            raise WireError("bad-payload", f"{type(e).__name__}: {e}", getattr(msg, "request_id", None)) from e

    def _greet(self, who: bytes, hello: Hello) -> None:
        i = self.ident
        peer_fp = hello.model_fingerprint
        if peer_fp and peer_fp != i.fingerprint:
            text = (f"{hello.role} peer serves model {peer_fp} but this {i.role} worker at {i.address} "
                    f"serves {i.fingerprint}")
            log(i.role, f"refused a {hello.role}: {text}")
            self._reply(who, Refuse("fingerprint-mismatch", text))
            return
        self._greeted.greet(who)
        self._reply(who, HelloAck(i.role, i.fingerprint, i.kv_layout, i.capacity, i.runtime, i.instance_id))

    def _reply(self, who: bytes, msg: Message) -> None:
        try:
            self._router.send_multipart([who, *encode_message(msg)], copy=False)
        except zmq.ZMQError as e:
            log(self.ident.role, f"could not answer a peer: {e}")
