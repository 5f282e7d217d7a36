"""Links to peer workers, one per incarnation, on real zmq sockets with a scripted peer: a restarted
decode worker is greeted before anything else reaches it, and whatever was meant for the process
that died is reported lost (so its requests are failed over), whichever message shows it first."""

from __future__ import annotations

import time

import pytest
import zmq

from disagg_cli.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Error,
    Hello,
    HelloAck,
    KVLayout,
    Message,
    WorkerCapacity,
    decode_message,
    encode_message,
)
from disagg_cli.workers.peers import PeerLinks, PeerLost
from tests.workers.peer import free_port

LAYOUT = KVLayout(2, 1, 4, "float32", 16)
CAPACITY = WorkerCapacity(64, 16, 8, 256, False, False, 1)
pytestmark = pytest.mark.timeout(60)


class ScriptedDecode:
    """A decode worker's ROUTER that acks hello as `instance` and refuses anything before it."""

    def __init__(self, ctx: zmq.Context, port: int, instance: str) -> None:
        self.instance = instance
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + 5.0
        while True:  # a closed predecessor frees the port on zmq's own thread, a moment later
            try:
                self.sock.bind(f"tcp://127.0.0.1:{port}")
                break
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.greeted: set[bytes] = set()
        self.seen: list[Message] = []  # in arrival order, hellos included

    def serve(self, timeout_s: float = 5.0, until: int = 1) -> None:
        """Answer what arrives until `until` messages were seen in all (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < until and time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            who, *frames = self.sock.recv_multipart()
            msg = decode_message(frames)
            self.seen.append(msg)
            if isinstance(msg, Hello):
                self.greeted.add(who)
                reply: Message = HelloAck("decode", "fp", LAYOUT, CAPACITY, instance_id=self.instance)
            elif who not in self.greeted:
                reply = Error(getattr(msg, "request_id", None), "no-hello", f"{msg.kind} before hello")
            else:
                continue
            self.sock.send_multipart([who, *encode_message(reply)])

    def close(self) -> None:
        self.sock.close(linger=0)


class Harness:
    """PeerLinks driven by hand, as the I/O thread drives it."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.lost: list[PeerLost] = []
        self.poller = zmq.Poller()
        self.links = PeerLinks(ctx, lambda: Hello(PROTOCOL_VERSION, "prefill", "fp", LAYOUT), self.lost.append,
                               self._register, greet_timeout_s=1.0)

    def _register(self, sock: zmq.Socket, on: bool) -> None:
        if on:
            self.poller.register(sock, zmq.POLLIN)
        else:
            self.poller.unregister(sock)

    def pump(self, seconds: float = 0.5) -> list[tuple[str, Message]]:
        """Receive on the links for a while; return what they pass on to the role."""
        passed = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for sock, _ in self.poller.poll(50):
                msg = decode_message(sock.recv_multipart())
                rest = self.links.receive(sock, msg)
                if rest is not None:
                    passed.append(rest)
            self.links.check()
        return passed


@pytest.fixture
def ctx():  # type: ignore[no-untyped-def]
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_messages_wait_for_the_ack_of_their_incarnation(ctx: zmq.Context) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    first = ScriptedDecode(ctx, port, "aaaa")
    h = Harness(ctx)
    h.links.send(address, "aaaa", Abort("r1"))
    first.serve(until=1)  # the hello only: r1 is held back until the ack comes back
    h.pump(0.3)
    first.serve(until=2)
    assert [m.kind for m in first.seen] == ["hello", "abort"]
    assert h.lost == []

    # The decode worker restarts on the same port; the coordinator reserved r2 on the new process.
    first.close()
    second = ScriptedDecode(ctx, port, "bbbb")
    time.sleep(0.3)  # zmq's own reconnect of the old socket has happened by now
    h.links.send(address, "bbbb", Abort("r2"))
    second.serve(until=1)
    h.pump(0.3)
    second.serve(until=2)
    # A fresh socket: the new process hears hello before anything else, so it refuses nothing.
    assert [m.kind for m in second.seen] == ["hello", "abort"]
    assert second.seen[1] == Abort("r2")
    assert [(x.address, x.instance, x.reason) for x in h.lost] == [(address, "aaaa", "peer-restarted")]

    # A request still meant for the dead process is not sent to its successor, and is reported lost.
    h.links.send(address, "aaaa", Abort("r3"))
    second.serve(until=3, timeout_s=0.5)
    assert len(second.seen) == 2
    assert [(x.instance, x.reason) for x in h.lost[1:]] == [("aaaa", "peer-restarted")]
    h.links.close()
    second.close()


def test_a_silent_reconnect_is_caught_by_the_refusal(ctx: zmq.Context) -> None:
    """The prefill side has not heard of the restart: zmq reconnects its socket to the new process,
    which refuses the KV; the first refusal reports the old incarnation lost, once."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    first = ScriptedDecode(ctx, port, "aaaa")
    h = Harness(ctx)
    h.links.send(address, "aaaa", Abort("r1"))
    first.serve(until=1)
    h.pump(0.3)
    first.serve(until=2)
    first.close()
    second = ScriptedDecode(ctx, port, "bbbb")
    time.sleep(0.5)
    for rid in ("r2", "r3", "r4"):
        h.links.send(address, "aaaa", Abort(rid))
    second.serve(until=3)
    passed = h.pump(0.5)
    assert [m.kind for m in second.seen] == ["abort", "abort", "abort"]  # never greeted: refused
    assert passed == []  # the refusals are the link's business, not the role's
    assert [(x.address, x.instance, x.reason) for x in h.lost] == [(address, "aaaa", "peer-restarted")]
    # The next message, for the new process, goes out on a fresh, greeted socket.
    h.links.send(address, "bbbb", Abort("r5"))
    second.serve(until=4)
    h.pump(0.3)
    second.serve(until=5)
    assert [m.kind for m in second.seen[3:]] == ["hello", "abort"]
    h.links.close()
    second.close()


def test_a_peer_that_never_answers_is_reported_unreachable(ctx: zmq.Context) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens
    h = Harness(ctx)
    h.links.send(address, "aaaa", Abort("r1"))
    h.pump(1.5)
    assert [(x.address, x.instance, x.reason) for x in h.lost] == [(address, "aaaa", "peer-unreachable")]
    h.links.close()
