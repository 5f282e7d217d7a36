"""A real request's KV across processes over tcp://127.0.0.1, restored bit-exactly; a corrupted
frame in flight refused on the receiving side, which keeps serving.

The receiver is a spawned child process: it decodes every `KVLayers` message it is sent and, once
a request's layers are all in, echoes the restored KV back raw (`none`, one message), so this
process can compare bytes. A message it refuses comes back as an `Error` naming the request.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from disagg_cli.bench.codec import prefill, prompt_ids
from disagg_cli.config import RuntimeConfig
from disagg_cli.kv.codec import NoneCodec, raw_bytes
from disagg_cli.kv.registry import get_codec
from disagg_cli.kv.transfer import decode_kv_layers, encode_request_kv
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.tokenizer import Tokenizer
from disagg_cli.protocol import (
    Error,
    Frame,
    Heartbeat,
    KVLayers,
    Message,
    WireError,
    decode_message,
    encode_message,
)

pytestmark = pytest.mark.slow

TIMEOUT_MS = 30_000
HOST = "tcp://127.0.0.1"
STOP = -1


def _echo_receiver(data_addr: str, reply_addr: str, num_layers: int) -> None:
    torch.set_num_threads(1)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)  # a silent parent ends the child, never hangs it
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 1000)
    pull.connect(data_addr)
    push.connect(reply_addr)
    push.send_multipart(encode_message(Heartbeat(0)))  # ready
    layers: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    failed: set[str] = set()
    try:
        while True:
            try:
                frames = pull.recv_multipart(copy=False)
            except zmq.Again:
                return
            try:
                msg = decode_message(frames)
                if isinstance(msg, Heartbeat) and msg.seq == STOP:
                    return
                assert isinstance(msg, KVLayers), msg
                if msg.request_id in failed:
                    continue
                k, v = decode_kv_layers(msg)
            except WireError as e:
                assert e.request_id is not None, e
                failed.add(e.request_id)
                layers.pop(e.request_id, None)
                push.send_multipart(encode_message(Error(e.request_id, e.reason, str(e))))
                continue
            got = layers.setdefault(msg.request_id, {})
            for i in range(msg.layer_end - msg.layer_start):
                got[msg.layer_start + i] = (k[i], v[i])
            if len(got) == num_layers:
                del layers[msg.request_id]
                ks = [got[i][0] for i in range(num_layers)]
                vs = [got[i][1] for i in range(num_layers)]
                for back in encode_request_kv(NoneCodec(), msg.request_id, msg.model_fingerprint, ks, vs,
                                              layers_per_message=num_layers):
                    push.send_multipart(encode_message(back))
    finally:
        pull.close()
        push.close()
        ctx.term()


class Peer:
    """This process's end: PUSH KV out, PULL replies in, and the spawned receiver."""

    def __init__(self, num_layers: int) -> None:
        self.ctx = zmq.Context()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        for s in (self.push, self.pull):
            s.setsockopt(zmq.LINGER, 0)
        data_port, reply_port = self.push.bind_to_random_port(HOST), self.pull.bind_to_random_port(HOST)
        self.child = multiprocessing.get_context("spawn").Process(
            target=_echo_receiver, args=(f"{HOST}:{data_port}", f"{HOST}:{reply_port}", num_layers), daemon=True)
        self.child.start()
        assert isinstance(self.recv(), Heartbeat)

    def recv(self) -> Message:
        for _ in range(TIMEOUT_MS // 200):
            if self.pull.poll(200):
                return decode_message(self.pull.recv_multipart())
            assert self.child.is_alive(), f"receiver exited with code {self.child.exitcode}"
        raise TimeoutError(f"no reply from the receiver within {TIMEOUT_MS} ms")

    def send(self, msg: KVLayers, payloads: tuple[Frame, ...] | None = None) -> None:
        frames = encode_message(msg)
        self.push.send_multipart(frames if payloads is None else [frames[0], *payloads])

    def close(self) -> None:
        if self.child.is_alive():
            self.push.send_multipart(encode_message(Heartbeat(STOP)))
        self.child.join(10)
        if self.child.is_alive():
            self.child.terminate()
        self.push.close()
        self.pull.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def peer(default_model: LoadedModel) -> Iterator[Peer]:
    p = Peer(default_model.config.num_layers)
    yield p
    p.close()


@pytest.fixture(scope="module")
def bf16_model(default_gguf: Path) -> LoadedModel:
    return load_model(default_gguf, RuntimeConfig(dtype="bfloat16", threads=2))


def request_kv(lm: LoadedModel, tokenizer: Tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv, _ = prefill(lm, prompt_ids(tokenizer.encode, 100))
    assert kv[0][0].shape == (100, lm.config.num_kv_heads, lm.config.head_dim) and kv[0][0].dtype == lm.dtype
    return kv


def echo(peer: Peer, msgs: list[KVLayers]) -> KVLayers:
    for msg in msgs:
        peer.send(msg)
    back = peer.recv()
    assert isinstance(back, KVLayers), back
    return back


def assert_bit_exact(back: KVLayers, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    k, v = decode_kv_layers(back)
    assert k.dtype == kv[0][0].dtype and k.shape[0] == len(kv)
    for layer, (ek, ev) in enumerate(kv):
        assert raw_bytes(k[layer].contiguous()).tobytes() == raw_bytes(ek).tobytes(), f"k of layer {layer}"
        assert raw_bytes(v[layer].contiguous()).tobytes() == raw_bytes(ev).tobytes(), f"v of layer {layer}"


@pytest.mark.parametrize("codec", ["none", "shuffle-lz4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_kv_crosses_processes_bit_exactly(
    peer: Peer, default_model: LoadedModel, bf16_model: LoadedModel, default_tokenizer: Tokenizer,
    dtype: str, codec: str,
) -> None:
    lm = default_model if dtype == "float32" else bf16_model
    kv = request_kv(lm, default_tokenizer)
    rid = f"tcp-{dtype}-{codec}"
    msgs = list(encode_request_kv(get_codec(codec), rid, lm.fingerprint, [k for k, _ in kv], [v for _, v in kv]))
    if codec == "shuffle-lz4":
        assert sum(m.kv.wire_bytes for m in msgs) < sum(m.kv.raw_bytes for m in msgs)
    back = echo(peer, msgs)
    assert back.request_id == rid
    assert_bit_exact(back, kv)


def test_corrupted_frame_is_refused_and_receiver_keeps_serving(
    peer: Peer, default_model: LoadedModel, default_tokenizer: Tokenizer,
) -> None:
    lm = default_model
    kv = request_kv(lm, default_tokenizer)
    ks, vs = [k for k, _ in kv], [v for _, v in kv]
    msgs = list(encode_request_kv(NoneCodec(), "corrupt", lm.fingerprint, ks, vs))
    bad = bytearray(msgs[3].payloads[0])
    bad[len(bad) // 2] ^= 0x40  # one bit flipped in flight, sizes untouched
    for i, msg in enumerate(msgs):
        peer.send(msg, (bytes(bad), *msgs[3].payloads[1:]) if i == 3 else None)
    refused = peer.recv()
    assert isinstance(refused, Error), refused
    assert (refused.request_id, refused.reason) == ("corrupt", "bad-checksum")

    back = echo(peer, list(encode_request_kv(NoneCodec(), "after", lm.fingerprint, ks, vs)))
    assert back.request_id == "after"
    assert_bit_exact(back, kv)
