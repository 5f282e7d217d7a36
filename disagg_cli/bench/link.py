"""A real ZeroMQ link for `disagg bench codec`: KV messages from this process to a child process.

Life of one transfer:
1. `KVLink` binds a PUSH socket (KV out) and a PULL socket (acks in) on tcp://127.0.0.1, spawns
   the receiver process, which connects both and says ready (a `LinkAck` of round 0);
2. `transfer` encodes a request's KV layer by layer and sends each `KVLayers` message as soon as it
   is encoded, optionally paced to a link speed (sleeping so bytes sent / elapsed ≤ the rate);
3. the receiver checks and decodes every message as it arrives and, after the last layer, acks
   with a `LinkAck` of the round number and its decode time (an `Error` if a message was refused);
4. the time from the first encode to the ack is the end-to-end transfer time;
5. closing sends a `Heartbeat` with `seq` -1; the receiver exits, and every receive has a timeout.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence

import zmq
from torch import Tensor

from disagg_cli.errors import DisaggError
from disagg_cli.kv.codec import KVCodec
from disagg_cli.kv.transfer import decode_kv_layers, encode_request_kv
from disagg_cli.protocol import Error, Heartbeat, KVLayers, LinkAck, WireError, decode_message, encode_message

HOST = "tcp://127.0.0.1"
TIMEOUT_MS = 60_000
_STOP = -1


class LinkError(DisaggError):
    """The receiver did not answer in time or refused a message."""


def _receive(data_addr: str, ack_addr: str, num_layers: int) -> None:
    """The receiver process: decode every KV message; ack each complete request."""
    import torch

    torch.set_num_threads(1)  # the sender's process has the other core
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.LINGER, 1000)
    pull.connect(data_addr)
    push.connect(ack_addr)
    push.send_multipart(encode_message(LinkAck(0)))
    decode_s, refused = 0.0, None  # refused: the request whose later layers are skipped
    try:
        while pull.poll(TIMEOUT_MS):
            frames = pull.recv_multipart(copy=False)
            try:
                msg = decode_message(frames)
                if isinstance(msg, Heartbeat) and msg.seq == _STOP:
                    return
                if not isinstance(msg, KVLayers):
                    raise WireError("bad-field", f"expected kv_layers, got {msg.kind}")
                if msg.request_id == refused:
                    continue
                start = time.perf_counter()
                decode_kv_layers(msg)
                decode_s += time.perf_counter() - start
            except WireError as e:
                push.send_multipart(encode_message(Error(e.request_id, e.reason, str(e))))
                refused, decode_s = e.request_id, 0.0
                continue
            if msg.layer_end == num_layers:
                rnd = int(msg.request_id.rsplit("#", 1)[1])
                push.send_multipart(encode_message(LinkAck(rnd, decode_s)))
                decode_s = 0.0
    finally:
        pull.close()
        push.close()
        ctx.term()


class KVLink:
    """This process's end of the link; a context manager owning the sockets and the child."""

    def __init__(self, num_layers: int) -> None:
        self.ctx = zmq.Context()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        for s in (self.push, self.pull):
            s.setsockopt(zmq.LINGER, 0)
        data_port = self.push.bind_to_random_port(HOST)
        ack_port = self.pull.bind_to_random_port(HOST)
        self.num_layers = num_layers
        self.rounds = 0
        spawn = multiprocessing.get_context("spawn")
        self.child = spawn.Process(target=_receive, daemon=True,
                                   args=(f"{HOST}:{data_port}", f"{HOST}:{ack_port}", num_layers))
        self.child.start()
        self._expect(LinkAck)  # ready

    def __enter__(self) -> KVLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.child.is_alive():
            self.push.send_multipart(encode_message(Heartbeat(_STOP)))
            self.child.join(10)
            if self.child.is_alive():
                self.child.terminate()
                self.child.join(5)
        self.push.close()
        self.pull.close()
        self.ctx.term()

    def _expect(self, kind: type[LinkAck]) -> LinkAck:
        deadline = time.monotonic() + TIMEOUT_MS / 1e3
        while not self.pull.poll(200):  # in slices, to notice a receiver that died
            if not self.child.is_alive():
                raise LinkError(f"the receiver process exited with code {self.child.exitcode}")
            if time.monotonic() > deadline:
                raise LinkError(f"the receiver process sent nothing within {TIMEOUT_MS / 1e3:.0f} s")
        msg = decode_message(self.pull.recv_multipart())
        if isinstance(msg, Error):
            raise LinkError(f"the receiver refused a message: {msg.message}")
        assert isinstance(msg, kind), msg
        return msg

    def transfer(self, codec: KVCodec, fingerprint: str, k_layers: Sequence[Tensor], v_layers: Sequence[Tensor],
                 pace_bytes_per_s: float | None = None) -> tuple[float, float]:
        """Encode, send, receive and decode one request's KV; (end-to-end s, receiver's decode s)."""
        self.rounds += 1
        start = time.perf_counter()
        sent = 0
        for msg in encode_request_kv(codec, f"bench#{self.rounds}", fingerprint, k_layers, v_layers):
            sent += msg.kv.wire_bytes
            # Hold each message until a link of that speed would have delivered it, so the
            # receiver decodes it no sooner than it would have over the slower link.
            if pace_bytes_per_s is not None and (ahead := sent / pace_bytes_per_s - (time.perf_counter() - start)) > 0:
                time.sleep(ahead)
            self.push.send_multipart(encode_message(msg), copy=False)
        ack = self._expect(LinkAck)
        elapsed = time.perf_counter() - start
        assert ack.seq == self.rounds, (ack.seq, self.rounds)
        return elapsed, ack.decode_s
