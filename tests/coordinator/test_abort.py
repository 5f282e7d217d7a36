"""Aborts reach every worker: Ctrl-C in `disagg generate`, or a coordinator that vanishes, frees the
request's blocks on the workers it used."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from disagg_cli.protocol import Heartbeat
from tests.workers.peer import Peer, free_port, start_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workers(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("abort")
    pp, dp = free_port(), free_port()
    procs = [start_worker("prefill", pp, default_gguf, log=logs / "p.log"),
             start_worker("decode", dp, default_gguf, "--client-timeout", "3", log=logs / "d.log")]
    yield {"prefill": f"127.0.0.1:{pp}", "decode": f"127.0.0.1:{dp}", "log": str(logs / "d.log")}
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert all(p.wait(timeout=30) == 0 for p in procs)


def decode_stats(address: str) -> dict:
    peer = Peer(f"tcp://{address}")
    peer.hello()
    peer.send(Heartbeat(1))
    (beat,) = peer.recv_until(lambda m: isinstance(m, Heartbeat), 10)
    peer.close()
    return beat.stats.as_dict()


def start_long_generation(workers: dict[str, str], model: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "disagg_cli", "generate", "Count from one to a thousand: one, two,", "--model",
         str(model), "--max-tokens", "2000", "--ignore-eos", "--prefill", workers["prefill"], "--decode",
         workers["decode"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.read(8)  # decoding has begun
    return proc


def wait_free(address: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = decode_stats(address)
        if stats["free_blocks"] == stats["num_blocks"] or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def interrupt(proc: subprocess.Popen, sig: signal.Signals, timeout_s: float) -> tuple[float, str]:
    """Send `sig`; (seconds until the process exited, its stderr). Killed if it outlives `timeout_s`,
    so a hang fails this test alone, not the next one with blocks still taken."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{sig.name} did not end `disagg generate` within {timeout_s:g} s")
    return time.monotonic() - t0, err.decode(errors="replace")


# On a loaded machine the coordinator lags behind the token stream; Ctrl-C's cancel then used to
# be lost (asyncio.wait_for in Python 3.11) and the request decoded on to its 2000th token.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_aborts_on_the_workers(workers: dict[str, str], default_gguf: Path, sig: signal.Signals) -> None:
    proc = start_long_generation(workers, default_gguf)
    assert decode_stats(workers["decode"])["running"] == 1
    took_s, err = interrupt(proc, sig, 15.0)
    assert proc.returncode == 130, err
    assert "aborted on their workers" in err
    stats = wait_free(workers["decode"], 2.0)  # the abort frees at once, well before --client-timeout
    assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == 0, (took_s, err)


def test_vanished_coordinator_is_noticed(workers: dict[str, str], default_gguf: Path) -> None:
    proc = start_long_generation(workers, default_gguf)
    proc.kill()  # no goodbye, no abort: only its heartbeats stop
    proc.wait()
    assert decode_stats(workers["decode"])["running"] == 1
    stats = wait_free(workers["decode"], 15.0)
    assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == 0
    assert "silent for over 3 s; aborting its 1 request(s)" in Path(workers["log"]).read_text()
