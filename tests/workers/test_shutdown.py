"""SIGTERM drains: in-flight requests finish, new ones are refused, blocks are freed, exit 0."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from disagg_cli.config import SamplingParams
from disagg_cli.model.tokenizer import Tokenizer
from disagg_cli.protocol import Error, FirstToken, HelloAck, Prefill, Reserve, Reserved, Tokens
from tests.workers.peer import Peer, free_port, start_worker

pytestmark = pytest.mark.slow


def test_sigterm_lets_in_flight_requests_finish(default_gguf: Path, default_tokenizer: Tokenizer,
                                                tmp_path: Path) -> None:
    pp, dp = free_port(), free_port()
    prefill = start_worker("prefill", pp, default_gguf, log=tmp_path / "p.log")
    decode = start_worker("decode", dp, default_gguf, log=tmp_path / "d.log")
    try:
        cp, cd = Peer(f"tcp://127.0.0.1:{pp}"), Peer(f"tcp://127.0.0.1:{dp}")
        assert isinstance(cp.hello(), HelloAck) and isinstance(cd.hello(), HelloAck)
        ids = tuple(default_tokenizer.encode("Count slowly: one, two, three,"))
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        cd.send(Reserve("inflight", ids, params))
        assert isinstance(cd.recv(30), Reserved)
        cp.send(Prefill("inflight", ids, params, f"tcp://127.0.0.1:{dp}"))
        assert isinstance(cp.recv(30), FirstToken)
        first = cd.recv(30)
        assert isinstance(first, Tokens) and first.finish_reason is None
        decode.send_signal(signal.SIGTERM)  # mid-stream
        cd.send(Reserve("late", ids, params))
        tokens = list(first.token_ids)
        refused = None
        while True:
            msg = cd.recv(30)
            if isinstance(msg, Error):
                refused = msg
                continue
            assert isinstance(msg, Tokens) and msg.request_id == "inflight"
            tokens += msg.token_ids
            if msg.finish_reason:
                break
        assert len(tokens) == 39 and msg.finish_reason == "length"  # all but the prefill's first token
        if refused is None:
            refused = cd.recv(10)
        assert isinstance(refused, Error) and refused.request_id == "late" and refused.reason == "draining"
        assert decode.wait(timeout=30) == 0
        log = (tmp_path / "d.log").read_text()
        assert "draining: 1 in-flight request(s)" in log and "failing 0 in-flight" in log
    finally:
        for p in (prefill, decode):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        assert prefill.wait(timeout=30) == 0
