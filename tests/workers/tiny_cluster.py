"""Real prefill, decode and colocated worker processes on a tiny random model, and what tests ask of
them: a normal request served end to end (checked against the in-process engine), the pool's
counters, a greeted peer of any role. For tests that throw bad messages at live workers."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.kv.registry import get_codec
from disagg_cli.kv.transfer import encode_kv_message
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.protocol import (
    Error,
    FirstToken,
    Generate,
    Heartbeat,
    HelloAck,
    KVLayers,
    Message,
    Prefill,
    Reserve,
    Reserved,
    Tokens,
)
from tests.tiny_models import TINY, random_weights, write_gguf
from tests.workers.peer import Peer, free_port, start_worker

VOCAB, CONTEXT, LAYERS = TINY["vocab_size"], TINY["context"], TINY["num_layers"]
KV_HEADS, HEAD_DIM = TINY["num_kv_heads"], TINY["head_dim"]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
HEALTH_PROMPT = (3, 14, 15, 92, 65, 35, 89, 79, 32, 38)
ROLES = ("prefill", "decode", "colocated")


@dataclass
class TinyCluster:
    model: Path
    lm: LoadedModel  # the same weights in this process: the reference
    addresses: dict[str, str]  # role → tcp address
    procs: dict[str, subprocess.Popen]
    logs: Path
    fingerprint: str = ""

    def peer(self, role: str, as_role: str = "coordinator") -> Peer:
        """A peer greeted by the worker of `role`, saying it is `as_role`."""
        fingerprint = "" if as_role == "coordinator" else self.fingerprint
        peer = Peer(self.addresses[role], role=as_role, fingerprint=fingerprint, timeout_s=30)
        ack = peer.hello()
        assert isinstance(ack, HelloAck), ack
        return peer

    def alive(self) -> None:
        for role, p in self.procs.items():
            assert p.poll() is None, f"the {role} worker died:\n" + (self.logs / f"{role}.log").read_text()[-3000:]

    def expected(self, prompt: tuple[int, ...] = HEALTH_PROMPT, params: SamplingParams = GREEDY) -> list[int]:
        engine = LLMEngine(self.lm, EngineConfig(block_size=4, kv_cache_tokens=256))
        engine.add_request("ref", list(prompt), params)
        out: list[int] = []
        while engine.has_unfinished():
            out += [ev.token_id for ev in engine.step()]
        return out

    def disaggregated(self, requests: dict[str, tuple[int, ...]], params: SamplingParams = GREEDY,
                      decode: str | None = None, timeout_s: float = 60) -> dict[str, list[int] | Error]:
        """Requests in flight at once through the prefill and decode workers: each one's tokens, or
        the `Error` that ended it."""
        decode = decode or self.addresses["decode"]
        cp, cd = self.peer("prefill"), Peer(decode, timeout_s=30)
        assert isinstance(cd.hello(), HelloAck)
        for rid, prompt in requests.items():
            cd.send(Reserve(rid, prompt, params))
        out: dict[str, list[int] | Error] = {rid: [] for rid in requests}
        done: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(requests):
            assert time.monotonic() < deadline, f"requests {set(requests) - done} unanswered in {timeout_s} s"
            for peer in (cd, cp):
                if not peer.sock.poll(20):
                    continue
                msg = peer.recv(1)
                got = out.get(getattr(msg, "request_id", None) or "")
                if isinstance(msg, Reserved):
                    cp.send(Prefill(msg.request_id, requests[msg.request_id], params, decode,
                                    decode_cached_tokens=msg.cached_tokens))
                elif isinstance(msg, FirstToken) and isinstance(got, list):
                    got.insert(0, msg.token_id)
                elif isinstance(msg, Tokens) and isinstance(got, list):
                    got += msg.token_ids
                    if msg.finish_reason:
                        done.add(msg.request_id)
                elif isinstance(msg, Error) and msg.request_id in out and msg.request_id not in done:
                    out[msg.request_id] = msg
                    done.add(msg.request_id)
        cp.close()
        cd.close()
        return out

    def colocated(self, rid: str, prompt: tuple[int, ...] = HEALTH_PROMPT,
                  params: SamplingParams = GREEDY) -> list[int]:
        peer = self.peer("colocated")
        peer.send(Generate(rid, prompt, params))
        msgs = peer.recv_until(lambda m: isinstance(m, Tokens) and m.finish_reason is not None or isinstance(m, Error),
                               30)
        peer.close()
        assert not any(isinstance(m, Error) for m in msgs), msgs
        return [t for m in msgs for t in ([m.token_id] if isinstance(m, FirstToken) else getattr(m, "token_ids", ()))]

    def stats(self, role: str) -> dict[str, int | float]:
        peer = self.peer(role)
        peer.send(Heartbeat(1))
        (*_, beat) = peer.recv_until(lambda m: isinstance(m, Heartbeat), 10)
        peer.close()
        assert isinstance(beat, Heartbeat) and beat.stats is not None
        return beat.stats.as_dict()

    def assert_idle(self, timeout_s: float = 15) -> None:
        """Every worker holds no request and every KV block is free (stats lag an engine loop)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = {role: self.stats(role) for role in ROLES}
            idle = all(s["free_blocks"] == s["num_blocks"] and s["reserved_blocks"] == 0 and s["running"] == 0
                       and s["waiting"] == 0 and s.get("incoming", 0) == 0 and s.get("queued_reservations", 0) == 0
                       for s in stats.values())
            if idle:
                return
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)

    def assert_serving(self, tag: str) -> None:
        """The workers are alive, answer a normal request exactly, and end with every block free."""
        self.alive()
        expected = self.expected()
        got = self.disaggregated({f"health-{tag}": HEALTH_PROMPT})
        assert got == {f"health-{tag}": expected}
        assert self.colocated(f"health-c-{tag}") == expected
        self.assert_idle()
        self.alive()


def kv_layers(rid: str, fingerprint: str, token_start: int, num_tokens: int, layer_start: int = 0,
              layers: int = LAYERS, codec: str = "none", zeros: bool = False) -> KVLayers:
    """A well-formed KVLayers message of random (or zero) KV."""
    shape = (layers, num_tokens, KV_HEADS, HEAD_DIM)
    k, v = (torch.zeros(shape) if zeros else torch.randn(shape) for _ in range(2))
    return encode_kv_message(get_codec(codec), rid, fingerprint, layer_start, k, v, token_start)


@contextmanager
def tiny_cluster(tmp: Path) -> Iterator[TinyCluster]:
    model = write_gguf(tmp / "tiny.gguf", random_weights(seed=5))
    lm = load_model(model, RuntimeConfig(dtype="float32", threads=1), cache_dir=tmp)
    ports = {role: free_port() for role in ROLES}
    extra = ("--block-size", "4", "--kv-cache-tokens", "256", "--client-timeout", "20")
    codec = {"prefill": ("--kv-codec", "none")}
    procs = {role: start_worker(role, ports[role], model, *extra, *codec.get(role, ()), log=tmp / f"{role}.log")
             for role in ROLES}
    cluster = TinyCluster(model, lm, {r: f"tcp://127.0.0.1:{p}" for r, p in ports.items()}, procs, tmp)
    try:
        for role in ROLES:
            peer = Peer(cluster.addresses[role], timeout_s=120)
            ack = peer.hello()
            assert isinstance(ack, HelloAck), ack
            cluster.fingerprint = ack.model_fingerprint
            peer.close()
        yield cluster
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def replies(peer: Peer, quiet_s: float = 0.3) -> list[Message]:
    """Whatever `peer` was sent until it has been quiet for `quiet_s`."""
    out = []
    while peer.sock.poll(int(quiet_s * 1000)):
        out.append(peer.recv(1))
    return out
