"""`disagg bench serve --base-url` on the cache workloads against a real `disagg serve`: prompts go
as token ids, a later turn carries the ids the server generated, and every turn is one request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import running_server

pytestmark = pytest.mark.slow


@pytest.mark.timeout(540)
def test_multi_turn_and_prefix_over_http(tmp_path: Path, default_gguf: Path) -> None:
    common = ["--model", "smollm2", "--tokenizer", str(default_gguf), "--random-input-len", "8",
              "--random-output-len", "4", "--prefix-len", "24", "--json"]
    with running_server(tmp_path, default_gguf, "--served-model-name", "smollm2") as server:
        base = [sys.executable, "-m", "disagg_cli", "bench", "serve", "--base-url", server.url]
        turns = subprocess.run([*base, "--workload", "multi-turn", "--num-prompts", "2", "--num-turns", "2", *common],
                               capture_output=True, text=True, timeout=240)
        prefix = subprocess.run([*base, "--workload", "prefix", "--num-prompts", "3", "--num-prefixes", "2", *common],
                                capture_output=True, text=True, timeout=240)
        chat = subprocess.run([*base, "--workload", "prefix", "--backend", "openai-chat", *common],
                              capture_output=True, text=True, timeout=60)
    assert turns.returncode == 0, turns.stderr[-2000:]
    doc = json.loads(turns.stdout)
    assert doc["completed"] == 4, doc["errors"]
    assert doc["output_lens"] == [4] * 4 and doc["disagg"]["kinds"] == ["turn1", "turn2"] * 2
    # 24 + 8 tokens, then those 32 + the answer's ids + 8 new ones. `disagg serve` streams no ids, so
    # the answer is its text tokenized again: about, not exactly, its 4 tokens.
    lens = doc["input_lens"]
    assert lens[0] == lens[2] == 32 and all(32 + 8 < n <= 32 + 8 + 8 for n in (lens[1], lens[3]))
    later = doc["disagg"]["cache"]["later_turns"]
    assert (later["requests"], later["prompt_tokens"]) == (2, lens[1] + lens[3])
    assert later["new_tokens"] == lens[1] + lens[3] - 2 * 32
    assert prefix.returncode == 0, prefix.stderr[-2000:]
    doc = json.loads(prefix.stdout)
    assert (doc["completed"], doc["input_lens"], doc["disagg"]["cache"]["prompt_tokens"]) == (3, [32] * 3, 96)
    assert chat.returncode != 0 and "use --backend openai" in chat.stderr
