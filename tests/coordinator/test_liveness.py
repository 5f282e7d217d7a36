"""Worker liveness as the coordinator judges it, against scripted workers on real zmq sockets (no
model): a worker that answered hello early is not taken as dead because another took long to answer
(the silence clock starts with the heartbeats, not at the handshake), and one that stops answering
heartbeats is."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import zmq

from disagg_cli.coordinator.coordinator import Coordinator, CoordinatorConfig
from disagg_cli.protocol import (
    Heartbeat,
    Hello,
    HelloAck,
    KVLayout,
    WorkerCapacity,
    decode_message,
    encode_message,
)
from tests.workers.peer import free_port

LAYOUT = KVLayout(2, 1, 4, "float32", 16)
CAPACITY = WorkerCapacity(64, 16, 8, 256, False, False, 1)
CONFIG = CoordinatorConfig(worker_timeout_s=1.0, heartbeat_interval_s=0.2)
pytestmark = pytest.mark.timeout(60)


class ScriptedWorker(threading.Thread):
    """A worker's ROUTER in a thread: acks hello as `role` once `answer_after_s` passed, and answers
    hellos and heartbeats until `mute` is set (then it is silent, as a hung process is)."""

    def __init__(self, role: str, answer_after_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.role, self.answer_after_s = role, answer_after_s
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.mute, self.done = threading.Event(), threading.Event()
        self.beats = 0
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)

    def run(self) -> None:
        start = time.monotonic()
        held: list[bytes] = []  # who said hello before we answer
        while not self.done.is_set():
            if held and time.monotonic() - start >= self.answer_after_s:
                for who in held:
                    self._send(who, HelloAck(self.role, "fp", LAYOUT, CAPACITY, instance_id=self.role))
                held = []
            if not self.sock.poll(20):
                continue
            who, *frames = self.sock.recv_multipart()
            msg = decode_message(frames)
            if self.mute.is_set():
                continue
            if isinstance(msg, Hello):
                held.append(who)
            elif isinstance(msg, Heartbeat):
                self.beats += 1
                self._send(who, Heartbeat(msg.seq))
        self.sock.close(linger=0)

    def _send(self, who: bytes, msg: HelloAck | Heartbeat) -> None:
        self.sock.send_multipart([who, *encode_message(msg)])


@pytest.fixture
def workers() -> list[ScriptedWorker]:
    # The decode worker answers hello 2 worker-timeouts after the prefill worker did.
    started = [ScriptedWorker("prefill"), ScriptedWorker("decode", answer_after_s=2 * CONFIG.worker_timeout_s)]
    for w in started:
        w.start()
    yield started
    for w in started:
        w.done.set()
        w.join(timeout=5)


def alive(coordinator: Coordinator) -> dict[str, bool]:
    return {w.address: w.is_alive for w in coordinator.router.workers}


def test_an_early_worker_is_not_dead_for_waiting_on_a_late_one(workers: list[ScriptedWorker],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    prefill, decode = workers

    def dead() -> list[str]:
        return [r.getMessage() for r in caplog.records if "taken as dead" in r.getMessage()]

    async def run() -> tuple[list[str], dict[str, bool], dict[str, bool]]:
        async with Coordinator([("prefill", prefill.address), ("decode", decode.address)], [0], CONFIG) as c:
            await asyncio.wait_for(c.connect(), 30)
            await asyncio.sleep(2 * CONFIG.worker_timeout_s)  # 10 beats
            before, both = dead(), alive(c)
            prefill.mute.set()  # it stops answering: dead within a timeout and a beat or two
            await asyncio.sleep(CONFIG.worker_timeout_s + 3 * CONFIG.heartbeat_interval_s)
            return before, both, alive(c)

    with caplog.at_level(logging.WARNING):
        before, both, after_mute = asyncio.run(run())
    assert before == [] and both == {prefill.address: True, decode.address: True}, caplog.text
    assert prefill.beats >= 5 and decode.beats >= 5
    assert after_mute == {prefill.address: False, decode.address: True}
    [line] = dead()
    assert line.startswith(f"prefill worker {prefill.address} sent nothing for 1 s (--worker-timeout 1 s)"), line
