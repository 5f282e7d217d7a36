"""What every worker process shares: its socket, the I/O thread, the handshake, one exit path.

Threads:
- the **engine thread** (the main thread) owns the model and the pool; it never touches a socket.
  Between engine steps it drains the inbox; it sends by putting messages in the outbox.
- the **I/O thread** owns every zmq socket: the worker's ROUTER (peers connect to it) and the
  DEALERs it opens to other workers. It checks and decodes what arrives (size limits, version,
  handshake; a role may decode payloads here, e.g. KV, so the engine only places tensors), answers
  `Hello` and `Heartbeat` itself, and sends what the engine queued. A pipe wakes it for sends.

Life of a connection: the peer's first message is `Hello`; it is answered with `HelloAck`, or
`Refuse` when its model fingerprint differs from ours (the message names both). Anything before
`Hello` is answered with `Error(reason="no-hello")`; a malformed message is dropped with a logged
reason and an `Error` back; the worker keeps serving either way.

Shutdown: SIGINT or SIGTERM sets a flag; the engine thread aborts what is in flight (each
request's coordinator gets `Error(reason="shutdown")`), frees every block, the I/O thread flushes
and closes the sockets, and the process exits 0.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from disagg_cli.errors import UsageError
from disagg_cli.keys import Keys
from disagg_cli.kv.wire import (
    PROTOCOL_VERSION,
    Error,
    Heartbeat,
    Hello,
    HelloAck,
    KVLayout,
    Message,
    Refuse,
    WireError,
    decode_message,
    encode_message,
)

# Where a message goes: ("router", identity) for a peer connected to us, ("peer", address) for a
# worker we connect to ourselves.
Dest = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    role: str
    address: str
    fingerprint: str
    kv_layout: KVLayout
    capacity: dict[str, int]
    runtime: dict[str, str] = field(default_factory=dict)  # resolved dtype/quantization and why


def log(role: str, message: str) -> None:
    sys.stderr.write(f"[{role} {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


class WorkerIO:
    """The I/O thread and the queues between it and the engine thread."""

    def __init__(self, ident: WorkerIdentity, bind_host: str, port: int,
                 preprocess: Callable[[Dest, Message], Any] | None = None,
                 prepare: Callable[[Any], Message | None] | None = None,
                 keys: Keys | None = None) -> None:
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
        self._peers: dict[str, zmq.Socket] = {}
        self._greeted: set[bytes] = set()
        # When each coordinator was last heard (coordinators heartbeat every second): the engine
        # thread aborts the requests of one gone silent, so a vanished client holds no blocks.
        self.coordinator_seen: dict[bytes, float] = {}
        self._regreeted: set[str] = set()  # peers greeted again after they forgot us, until they ack
        self.peer_refusals: queue.Queue[tuple[str, str]] = queue.Queue()  # (address, message)
        self.stats: dict[str, int | float] = {}  # replaced whole by the engine thread
        self._thread = threading.Thread(target=self._run, name="worker-io", daemon=True)
        self._running = True

    def start(self) -> None:
        self._thread.start()

    def send(self, dest: Dest, msg: Any) -> None:
        """Queue `msg` for the I/O thread (any thread may call this)."""
        self._outbox.put((dest, msg))
        os.write(self._wake_w, b"\0")

    def stop(self) -> None:
        self._outbox.put(None)
        os.write(self._wake_w, b"\0")
        self._thread.join(timeout=10)

    # --- the I/O thread ----------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while self._running:
            for sock, _ in poller.poll(timeout=1000):
                if sock is self._router:
                    self._receive_router()
                elif sock == self._wake_r:
                    os.read(self._wake_r, 4096)
                    self._flush_outbox(poller)
                else:
                    self._receive_peer(sock)
        for s in (self._router, *self._peers.values()):
            s.close()
        if self._auth is not None:
            self._auth.stop()

    def _flush_outbox(self, poller: zmq.Poller) -> None:
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._running = False
                return
            (kind, where), msg = item
            if not isinstance(msg, Message):
                assert self._prepare is not None
                msg = self._prepare(msg)
                if msg is None:
                    continue
            frames = encode_message(msg)
            try:
                if kind == "router":
                    self._router.send_multipart([where, *frames], copy=False)
                else:
                    self._peer(where, poller).send_multipart(frames, copy=False)
            except zmq.ZMQError as e:  # the peer went away; its requests time out on their side
                log(self.ident.role, f"could not send {msg.kind} to {where!r}: {e}")

    def _peer(self, address: str, poller: zmq.Poller) -> zmq.Socket:
        sock = self._peers.get(address)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 2000)
            if self._keys:  # the only workers a worker connects to are decode workers
                self._keys.make_client(sock, "decode")
            sock.connect(address)
            # zmq keeps order on a connection: Hello is read before anything sent after it.
            sock.send_multipart(encode_message(self._hello()))
            poller.register(sock, zmq.POLLIN)
            self._peers[address] = sock
        return sock

    def _hello(self) -> Hello:
        i = self.ident
        return Hello(PROTOCOL_VERSION, i.role, i.fingerprint, i.kv_layout, i.capacity, i.runtime)

    def _receive_peer(self, sock: zmq.Socket) -> None:
        address = next(a for a, s in self._peers.items() if s is sock)
        frames = sock.recv_multipart(copy=False)
        try:
            msg = decode_message([f.buffer for f in frames])
        except WireError as e:
            log(self.ident.role, f"dropped a message from {address}: {e}")
            return
        if isinstance(msg, Refuse):
            log(self.ident.role, f"{address} refused us: {msg.message}")
            self.peer_refusals.put((address, msg.message))
        elif isinstance(msg, Error):
            if msg.reason == "no-hello":  # the peer restarted and forgot us: greet it again
                if address not in self._regreeted:
                    log(self.ident.role, f"{address} restarted; saying hello again")
                    sock.send_multipart(encode_message(self._hello()))
                    self._regreeted.add(address)
            else:
                self._regreeted.discard(address)
            self.inbox.put((("peer", address), msg))
        elif isinstance(msg, HelloAck):
            self._regreeted.discard(address)

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
                self.coordinator_seen[who] = time.monotonic()
            return
        if who in self.coordinator_seen:
            self.coordinator_seen[who] = time.monotonic()
        if who not in self._greeted:
            self._reply(who, Error(getattr(msg, "request_id", None), "no-hello",
                                   f"{msg.kind} before hello; say hello first"))
            return
        if isinstance(msg, Heartbeat):
            self._reply(who, Heartbeat(msg.seq, dict(self.stats)))
            return
        item: Any = msg
        if self._preprocess is not None:
            try:
                item = self._preprocess(dest, msg)
            except WireError as e:
                log(self.ident.role, f"dropped {msg.kind}: {e}")
                self.inbox.put((dest, Error(e.request_id, e.reason, str(e))))
                return
        self.inbox.put((dest, item))

    def _greet(self, who: bytes, hello: Hello) -> None:
        i = self.ident
        peer_fp = hello.model_fingerprint
        if peer_fp and peer_fp != i.fingerprint:
            text = (f"{hello.role} peer serves model {peer_fp} but this {i.role} worker at {i.address} "
                    f"serves {i.fingerprint}")
            log(i.role, f"refused a {hello.role}: {text}")
            self._reply(who, Refuse("fingerprint-mismatch", text))
            return
        self._greeted.add(who)
        self._reply(who, HelloAck(i.role, i.fingerprint, i.kv_layout, i.capacity, i.runtime))

    def _reply(self, who: bytes, msg: Message) -> None:
        try:
            self._router.send_multipart([who, *encode_message(msg)], copy=False)
        except zmq.ZMQError as e:
            log(self.ident.role, f"could not answer a peer: {e}")


class StopFlag:
    """Counts SIGINT/SIGTERM; the engine loop checks it between steps (first: drain, second: now)."""

    def __init__(self) -> None:
        self.count = 0
        signal.signal(signal.SIGINT, self._set)
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum: int, frame: object) -> None:
        self.count += 1
