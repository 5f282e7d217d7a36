"""CurveZMQ: with keys, a worker talks only to allowed peers, and every byte between them is encrypted."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from disagg_cli.keys import Keys, generate_keys
from disagg_cli.protocol import HelloAck
from tests.workers.peer import Peer, free_port, start_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A prefill and a decode worker that take only the keys in one folder, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("auth")
    keys_dir, strangers = tmp / "keys", tmp / "strangers"
    generate_keys(keys_dir)
    generate_keys(strangers)  # valid CurveZMQ keys, just not allowed
    pp, dp = free_port(), free_port()
    workers = [start_worker("prefill", pp, default_gguf, "--keys", str(keys_dir), log=tmp / "p.log"),
               start_worker("decode", dp, default_gguf, "--keys", str(keys_dir), log=tmp / "d.log")]
    try:
        yield {"keys": keys_dir, "strangers": strangers, "prefill": pp, "decode": dp}
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=30) for w in workers]
    assert codes == [0, 0]
    for log in ("p.log", "d.log"):
        assert "CurveZMQ: encrypted" in (tmp / log).read_text(), log


def test_only_allowed_keys_get_in(keyed: dict) -> None:
    keys_dir, strangers = keyed["keys"], keyed["strangers"]
    address = f"tcp://127.0.0.1:{keyed['decode']}"
    friend = Peer(address, keys=Keys.load(keys_dir, "coordinator"))
    assert isinstance(friend.hello(), HelloAck)

    # A stranger who even knows the server's public key, with a key pair that is not allowed:
    # the CurveZMQ handshake fails, so nothing it sends reaches the worker.
    theirs = Keys.load(strangers, "coordinator")
    stranger = Peer(address, keys=Keys(keys_dir, theirs.public, theirs.secret), timeout_s=3)
    with pytest.raises(TimeoutError):
        stranger.hello()  # (Peer.recv times out)

    plain = Peer(address, timeout_s=3)  # no keys at all: the handshake never completes
    with pytest.raises(TimeoutError):
        plain.hello()
    assert isinstance(friend.hello(), HelloAck)  # still serving the allowed peer


def test_keys_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "disagg_cli", "keys", "generate", str(tmp_path / "k")]
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and again.stderr.startswith("error: ") and "already holds keys" in again.stderr
    assert zmq.has("curve")


def test_generate_through_keyed_workers(default_gguf: Path, keyed: dict) -> None:
    pp, dp = keyed["prefill"], keyed["decode"]
    cmd = [sys.executable, "-m", "disagg_cli", "generate", "The capital of France is", "--max-tokens", "4",
           "--model", str(default_gguf), "--prefill", f"127.0.0.1:{pp}", "--decode", f"127.0.0.1:{dp}"]
    with_keys = subprocess.run([*cmd, "--keys", str(keyed["keys"])], capture_output=True, text=True, timeout=120)
    assert with_keys.returncode == 0, with_keys.stderr
    assert with_keys.stdout.startswith(" Paris.")
    without = subprocess.run([*cmd, "--connect-timeout", "3"], capture_output=True, text=True, timeout=120)
    assert without.returncode != 0 and "no answer to hello" in without.stderr
