"""A minimal synchronous peer for worker tests: real zmq sockets, real messages, timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import zmq

from disagg_cli.keys import Keys
from disagg_cli.protocol import PROTOCOL_VERSION, Hello, Message, decode_message, encode_message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(role: str, port: int, model: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the process
    # float32 unless a test asks otherwise: `--dtype auto` would pick bfloat16 on a CPU with native
    # bf16, and the golden tests compare against float32 references.
    dtype = () if "--dtype" in extra else ("--dtype", "float32")
    if "--quantization" not in extra:  # float weights too: the exact path (auto keeps the GGUF's int4)
        dtype += ("--quantization", "none")
    return subprocess.Popen([sys.executable, "-m", "disagg_cli", f"{role}-worker", "--port", str(port),
                             "--model", str(model), "--threads", "1", *dtype, *extra],
                            stdout=out, stderr=out, env={**os.environ})


class Peer:
    def __init__(self, address: str, role: str = "coordinator", fingerprint: str = "", timeout_s: float = 120,
                 keys: Keys | None = None, server_role: str = "decode") -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.make_client(self.sock, server_role)
        self.sock.connect(address)
        self.address = address
        self.role = role
        self.fingerprint = fingerprint
        self.timeout_s = timeout_s

    def hello(self) -> Message:
        self.send(Hello(PROTOCOL_VERSION, self.role, self.fingerprint))
        return self.recv()

    def send(self, msg: Message) -> None:
        self.sock.send_multipart(encode_message(msg))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float | None = None) -> Message:
        if not self.sock.poll(int(1000 * (timeout_s or self.timeout_s))):
            raise TimeoutError(f"nothing from {self.address} in {timeout_s or self.timeout_s} s")
        return decode_message(self.sock.recv_multipart())

    def recv_until(self, predicate, timeout_s: float = 60) -> list[Message]:  # type: ignore[no-untyped-def]
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            got.append(msg)
            if predicate(msg):
                return got

    def close(self) -> None:
        self.sock.close()
