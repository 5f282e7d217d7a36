"""`disagg bench engine` as a person runs it: a real process on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_engine_json_counts_exact_tokens() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "disagg_cli", "bench", "engine", "--prompt-lens", "16", "--batch-sizes", "1,2",
         "--decode-tokens", "4", "--reps", "1", "--no-baseline", "--json", "--threads", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["dtype"] == "float32" and result["threads"] == 2 and result["reps"] == 1
    assert result["decode_step"] == "fused: one C call per decode step"  # float32 on the kernel's GEMM
    runtime = result["runtime"]  # the backend --kernel auto chose, and why
    assert result["kernel"] == runtime["kernel"] == "c" and runtime["kernel_reason"].startswith("auto: ")
    assert result["weight_bytes_per_forward"] > 0 and result["kv_bytes_per_token"] > 0
    points = {(p["phase"], p["batch_size"]): p for p in result["points"]}
    assert set(points) == {("prefill", 1), ("decode", 1), ("decode", 2)}
    assert all(p["engine"] == "disagg" for p in points.values())
    prefill = points["prefill", 1]
    assert (prefill["context_len"], prefill["num_tokens"], prefill["num_steps"]) == (16, 16, 1)
    assert prefill["kv_gb_per_s"] == 0.0  # a fresh prompt reads no cached KV
    for b in (1, 2):
        decode = points["decode", b]
        # exactly B sequences × 4 timed decode steps; the prefill step's first token is not counted
        assert (decode["num_tokens"], decode["num_steps"], decode["context_len"]) == (b * 4, 4, 128)
        assert decode["kv_gb_per_s"] > 0
    for p in points.values():
        assert len(p["times_s"]) == 1 and p["time_s"] > 0
        for key in ("tokens_per_s", "ms_per_token_per_seq", "weight_gb_per_s", "gflop_per_s"):
            assert p[key] > 0, key
        assert p["tokens_per_s"] == pytest.approx(p["num_tokens"] / p["time_s"])


@pytest.mark.slow
def test_bench_engine_int4_reports_capability_perplexity_and_llama_cpp_hint() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "disagg_cli", "bench", "engine", "--prompt-lens", "16", "--batch-sizes", "2",
         "--decode-tokens", "2", "--reps", "1", "--no-baseline", "--json", "--threads", "2",
         "--quantization", "int4", "--against", "llama-cpp"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["quantization"] == "int4" and result["cpu_capability"]
    assert result["runtime"]["quantization_reason"] == "--quantization int4 as asked"
    assert result["decode_step"] == "fused: one C call per decode step"
    # int4 blocks of the 30 layers plus the Q8_0 head: well under the float32 weights' 538 MB
    assert 60e6 < result["weight_bytes_per_forward"] < 150e6
    assert result["perplexity"]["tokens"] > 200 and 1 < result["perplexity"]["float32+int4"] < 100
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert any("pip install 'llama-cpp-python" in note for note in result["notes"])
        assert {p["engine"] for p in result["points"]} == {"disagg"}
    else:  # llama.cpp measured prefill only here: it decodes one sequence at a time, and b is 2
        assert {(p["engine"], p["phase"]) for p in result["points"] if p["engine"] != "disagg"} == {
            ("llama.cpp", "prefill")}
