"""Supervision for real: SIGKILL the prefill worker of a running `disagg serve`; it is started again on
its address, the coordinator takes it back, a greedy request sent while it is down waits for it and
answers exactly what the in-process engine does, every KV block is free again, and `/metrics` counts
one prefill restart. (The policy: back-off, cap, stop: `test_supervisor.py`.)"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from disagg_cli.config import SamplingParams
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer
from tests.server.conftest import HTTP_TIMEOUT_S, Server, engine_output, running_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers in /proc")]

MODEL = "smollm2"  # --served-model-name
PROMPT = "The old lighthouse keeper climbed the stairs every evening because"
BACK_S = 90.0  # the supervisor's 1 s back-off, then a worker loading its model on a loaded 2-core machine


def worker_pids(parent: int) -> dict[str, int]:
    """The worker processes `disagg serve` (pid `parent`) started, by role (from their config argument)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        if ppid == parent and b"run-worker" in argv:
            found[json.loads(argv[-1])["role"]] = int(stat.parent.name)
    return found


def sample(server: Server, name: str, role: str) -> float | None:
    for (metric, labels), value in server.metrics().items():
        if metric == name and dict(labels).get("role") == role:
            return value
    return None


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.25)


def test_a_killed_prefill_worker_is_started_again(default_gguf: Path, default_model: LoadedModel,
                                                  default_tokenizer: Tokenizer, tmp_path: Path) -> None:
    with running_server(tmp_path, default_gguf, "--kv-codec", "none", "--dtype", "float32", "--quantization", "none",
                        "--no-colocated", "--served-model-name", MODEL) as server:
        before = worker_pids(server.process.pid)
        assert set(before) == {"prefill", "decode"}, before
        assert sample(server, "disagg:worker_restarts_total", "prefill") == 0

        ids = default_tokenizer.encode(PROMPT)
        ref = engine_output(default_model, default_tokenizer, ids, SamplingParams(max_tokens=16, ignore_eos=True))
        os.kill(before["prefill"], signal.SIGKILL)
        wait_until(lambda: sample(server, "disagg:worker_up", "prefill") == 0, "the dead worker noticed", BACK_S)
        # Sent while the only prefill worker is down: it waits for the restart instead of a 503.
        got = httpx.post(f"{server.url}/v1/completions", timeout=HTTP_TIMEOUT_S, json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == ref.text
        assert sample(server, "disagg:worker_restarts_total", "prefill") == 1
        assert sample(server, "disagg:worker_up", "prefill") == 1
        after = worker_pids(server.process.pid)
        assert after["decode"] == before["decode"] and after["prefill"] != before["prefill"]
        wait_until(lambda: all(sample(server, "disagg:kv_cache_usage_perc", r) == 0 for r in ("prefill", "decode")),
                   "every KV block free", 20.0)
        assert sample(server, "disagg:worker_restarts_total", "prefill") == 1
        assert sample(server, "disagg:worker_restarts_total", "decode") == 0
        (line,) = [ln for ln in server.log_text().splitlines() if "started again on the same address" in ln]
        assert "prefill worker tcp://127.0.0.1:" in line and "exited with code -9 (SIGKILL)" in line, line
        assert "(last log line: " in line
