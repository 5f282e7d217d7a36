"""`disagg bench serve` end to end: real worker processes of both modes, run as the CLI a user
types, checked through its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_both_modes_short_run() -> None:
    cmd = [sys.executable, "-m", "disagg_cli", "bench", "serve", "--mode", "both", "--num-prompts", "4",
           "--random-input-len", "32", "--random-output-len", "8", "--ignore-eos", "--json",
           "--goodput", "ttft:60000", "--goodput", "tpot:60000", "--metadata", "run=test"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["mode"] == "both" and set(doc["runs"]) == {"disagg", "colocated"}
    for mode, result in doc["runs"].items():
        assert result["backend"] == f"disagg-{mode}" and result["run"] == "test"
        assert (result["num_prompts"], result["completed"], result["total_input_tokens"]) == (4, 4, 128)
        assert result["output_lens"] == [8] * 4 and len(result["ttfts"]) == 4
        assert all(len(gaps) == 7 for gaps in result["itls"])
        assert result["request_goodput"] == result["request_throughput"]
        for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "std_ttft_ms"):
            assert result[key] > 0
        d = result["disagg"]
        assert d["mode"] == mode and d["requests"]["lost"] == 0 and d["requests"]["answered"] == 4
        assert {w["role"] for w in d["topology"]} == ({"colocated"} if mode == "colocated" else {"prefill", "decode"})
        assert d["num_cores"] == doc["runs"]["disagg"]["disagg"]["num_cores"]  # same cores for both modes
        blocks = d["kv_blocks_at_end"]
        assert len(blocks) == len(d["topology"]) and all(b["free"] == b["total"] > 0 for b in blocks.values())
    assert doc["runs"]["disagg"]["disagg"]["kv"]["raw_bytes"] > 0
    assert doc["ratios"]["Mean TTFT (ms)"] > 0


def test_bad_flags_are_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "disagg_cli", "bench", "serve", "--sweep-rates", "1,2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip() == "error: --sweep-rates needs both SLOs: --goodput ttft:MS tpot:MS"
