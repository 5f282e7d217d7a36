"""The links a worker opens to other workers (a prefill worker to its decode workers).

ZeroMQ reconnects a DEALER by itself when its peer comes back on the same address, so a socket that
greeted one decode process would stream KV to its successor, which never met us and refuses it.
So a link belongs to one peer *incarnation* (the `instance_id` of its `HelloAck`):
1. the first message for an address opens a fresh DEALER, sends `Hello` and holds messages back;
2. `HelloAck` names the incarnation: held messages meant for it (or for any) go out, in order; those
   meant for another incarnation are dropped and that incarnation reported lost;
3. a message meant for an incarnation the link has not met (the coordinator saw a restart first)
   retires the link, reports the old incarnation lost, and starts again at 1;
4. `Error(no-hello)` on a link (its socket reconnected to a successor unseen) retires the link and
   reports its incarnation lost; `Refuse` does the same with the refusal; no `HelloAck` within
   `greet_timeout_s` reports the held messages' incarnations unreachable.
"Lost" reaches the role as a `PeerLost` event: it fails every request it streamed there, so each
coordinator retries them at once, whichever of the refused messages arrived first.

Owned by the I/O thread; nothing here is thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from disagg_cli.keys import Keys
from disagg_cli.protocol import Error, Hello, HelloAck, Message, Refuse, encode_message

GREET_TIMEOUT_S = 10.0
_LINGER_MS = 2000


@dataclass(frozen=True, slots=True)
class PeerLost:
    """Everything sent to `instance` at `address` is gone (`instance` "" means: whichever)."""

    address: str
    instance: str
    reason: str  # "peer-restarted", "peer-unreachable" or "peer-refused"
    message: str


@dataclass(eq=False)
class _Link:
    address: str
    sock: zmq.Socket
    opened_s: float
    instance: str | None = None  # the incarnation that acknowledged us; None while greeting
    backlog: list[tuple[str, Message]] = field(default_factory=list)  # (meant for, message)


class PeerLinks:
    def __init__(self, ctx: zmq.Context, hello: Callable[[], Hello], on_lost: Callable[[PeerLost], None],
                 register: Callable[[zmq.Socket, bool], None], keys: Keys | None = None,
                 greet_timeout_s: float = GREET_TIMEOUT_S) -> None:
        """`register(sock, on)` adds a socket to (or removes it from) the I/O thread's poller."""
        self._ctx = ctx
        self._hello = hello
        self._on_lost = on_lost
        self._register = register
        self._keys = keys
        self._greet_timeout_s = greet_timeout_s
        self._links: dict[str, _Link] = {}
        self._retired: dict[str, set[str]] = {}  # address → incarnations met and gone

    def owns(self, sock: zmq.Socket) -> bool:
        return any(link.sock is sock for link in self._links.values())

    def send(self, address: str, instance: str, msg: Message) -> None:
        """Send `msg` to incarnation `instance` of the worker at `address` ("" for whichever is there)."""
        if instance and instance in self._retired.get(address, set()):
            self._lost(address, instance, "peer-restarted", f"decode worker {address} restarted (was {instance})")
            return
        link = self._links.get(address)
        if link is not None and instance and link.instance is not None and instance != link.instance:
            self._retire(link, "peer-restarted", f"decode worker {address} restarted (was {link.instance})")
            link = None
        if link is None:
            link = self._open(address)
        if link.instance is None:
            link.backlog.append((instance, msg))
        else:
            link.sock.send_multipart(encode_message(msg), copy=False)

    def receive(self, sock: zmq.Socket, msg: Message) -> tuple[str, Message] | None:
        """Handle the link's own messages; return the rest (errors about requests) for the role,
        with the peer's address."""
        link = next(link for link in self._links.values() if link.sock is sock)
        if isinstance(msg, HelloAck):
            if link.instance is None:
                self._acked(link, msg.instance_id)
            return None
        if isinstance(msg, Refuse):
            self._retire(link, "peer-refused", f"decode worker {link.address} refused us: {msg.message}")
            return None
        if isinstance(msg, Error) and msg.reason == "no-hello":
            # The socket reconnected to a process that never met us: whatever we sent is gone.
            self._retire(link, "peer-restarted", f"decode worker {link.address} restarted and lost the KV "
                                                 "sent to it")
            return None
        return link.address, msg

    def check(self, now: float | None = None) -> None:
        """Give up on links whose peer has not answered hello in time (it is down)."""
        now = time.monotonic() if now is None else now
        for link in list(self._links.values()):
            if link.instance is None and link.backlog and now - link.opened_s > self._greet_timeout_s:
                self._retire(link, "peer-unreachable", f"decode worker {link.address} did not answer hello "
                                                       f"within {self._greet_timeout_s:g} s")

    def close(self) -> None:
        for link in self._links.values():
            link.sock.close()
        self._links.clear()

    # --- internals ----------------------------------------------------------------------------------

    def _open(self, address: str) -> _Link:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, _LINGER_MS)
        if self._keys:  # the only workers a worker connects to are decode workers
            self._keys.make_client(sock, "decode")
        sock.connect(address)
        # zmq keeps order on a connection: Hello is read before anything sent after it.
        sock.send_multipart(encode_message(self._hello()))
        self._register(sock, True)
        link = _Link(address, sock, time.monotonic())
        self._links[address] = link
        return link

    def _acked(self, link: _Link, instance: str) -> None:
        link.instance = instance
        held, link.backlog = link.backlog, []
        lost: set[str] = set()
        for meant, msg in held:
            if not meant or meant == instance:
                link.sock.send_multipart(encode_message(msg), copy=False)
            else:
                lost.add(meant)
        for meant in sorted(lost):
            self._retired.setdefault(link.address, set()).add(meant)
            self._lost(link.address, meant, "peer-restarted",
                       f"decode worker {link.address} restarted (was {meant}, now {instance})")

    def _retire(self, link: _Link, reason: str, message: str) -> None:
        self._links.pop(link.address, None)
        self._register(link.sock, False)
        link.sock.close(linger=0)
        lost = {meant for meant, _ in link.backlog}
        if link.instance is not None:
            lost.add(link.instance)
            self._retired.setdefault(link.address, set()).add(link.instance)
        for meant in sorted(lost) or [""]:
            self._lost(link.address, meant, reason, message)

    def _lost(self, address: str, instance: str, reason: str, message: str) -> None:
        self._on_lost(PeerLost(address, instance, reason, message))
