"""`disagg bench codec` end to end: the real default model, a real link to a child process."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from disagg_cli.protocol import CODEC_NAMES

LOSSLESS = ("none", "lz4", "shuffle-lz4", "auto")


@pytest.fixture(scope="module")
def result(default_gguf: object) -> dict[str, Any]:  # default_gguf: the model is cached first
    cmd = [sys.executable, "-m", "disagg_cli", "bench", "codec", "--prompt-tokens", "64",
           "--agreement-tokens", "8", "--threads", "2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


@pytest.mark.slow
def test_reports_every_codec_with_exact_sizes(result: dict[str, Any]) -> None:
    rows = {r["codec"]: r for r in result["codecs"]}
    assert tuple(rows) == CODEC_NAMES
    assert result["prompt_tokens"] == 64 and result["dtype"] == "bfloat16"
    for name, r in rows.items():
        # 64 tokens × (k, v) × 30 layers × 3 KV heads × 64 dims × 2 bytes of bfloat16
        assert r["raw_bytes"] == 64 * 2 * 30 * 3 * 64 * 2, name
        assert r["ratio"] == r["raw_bytes"] / r["wire_bytes"], name
        assert r["transfer_ms"] > 0 and r["encode_gbps"] > 0 and r["decode_gbps"] > 0, name
    assert rows["none"]["ratio"] == 1.0
    assert rows["int8"]["ratio"] > 1.9 and rows["int4"]["ratio"] > 3.5


@pytest.mark.slow
def test_lossless_codecs_have_no_error_and_lossy_ones_report_agreement(result: dict[str, Any]) -> None:
    rows = {r["codec"]: r for r in result["codecs"]}
    for name in LOSSLESS:
        assert rows[name]["max_abs_error"] == 0.0 and rows[name]["rel_error"] == 0.0, name
        assert "agreement" not in rows[name]
    for name in ("int8", "int4"):
        assert 0 < rows[name]["rel_error"] < 0.2, name
        assert 0.0 <= rows[name]["agreement_prefix"] <= rows[name]["agreement"] <= 1.0, name
    assert result["agreement_tokens"] == 8 and "agreement_definition" in result
