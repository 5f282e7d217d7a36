"""CurveZMQ: with keys, a worker talks only to allowed peers, and every byte between them is encrypted."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from disagg_cli.keys import Keys, generate_keys
from disagg_cli.protocol import HelloAck
from tests.workers.peer import Peer, free_port, start_worker

pytestmark = pytest.mark.slow


def test_only_allowed_keys_get_in(default_gguf: Path, tmp_path: Path) -> None:
    keys_dir, strangers = tmp_path / "keys", tmp_path / "strangers"
    generate_keys(keys_dir)
    generate_keys(strangers)  # valid CurveZMQ keys, just not allowed
    port = free_port()
    worker = start_worker("decode", port, default_gguf, "--keys", str(keys_dir), log=tmp_path / "d.log")
    address = f"tcp://127.0.0.1:{port}"
    try:
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
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    assert "CurveZMQ: encrypted" in (tmp_path / "d.log").read_text()


def test_keys_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "disagg_cli", "keys", "generate", str(tmp_path / "k")]
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and again.stderr.startswith("error: ") and "already holds keys" in again.stderr
    assert zmq.has("curve")


def test_generate_through_keyed_workers(default_gguf: Path, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    generate_keys(keys_dir)
    pp, dp = free_port(), free_port()
    workers = [start_worker("prefill", pp, default_gguf, "--keys", str(keys_dir), log=tmp_path / "p.log"),
               start_worker("decode", dp, default_gguf, "--keys", str(keys_dir), log=tmp_path / "d.log")]
    try:
        cmd = [sys.executable, "-m", "disagg_cli", "generate", "The capital of France is", "--max-tokens", "4",
               "--model", str(default_gguf), "--prefill", f"127.0.0.1:{pp}", "--decode", f"127.0.0.1:{dp}"]
        with_keys = subprocess.run([*cmd, "--keys", str(keys_dir)], capture_output=True, text=True, timeout=120)
        assert with_keys.returncode == 0, with_keys.stderr
        assert with_keys.stdout.startswith(" Paris.")
        without = subprocess.run([*cmd, "--connect-timeout", "3"], capture_output=True, text=True, timeout=120)
        assert without.returncode != 0 and "no answer to hello" in without.stderr
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        assert all(w.wait(timeout=30) == 0 for w in workers)
