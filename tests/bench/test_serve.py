"""`disagg bench serve` end to end: real worker processes of both modes, run as the CLI a user
types, checked through its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.timeout(300)
def test_multi_turn_conversations_send_their_turns_in_order() -> None:
    cmd = [sys.executable, "-m", "disagg_cli", "bench", "serve", "--workload", "multi-turn", "--num-prompts", "2",
           "--num-turns", "2", "--random-input-len", "8", "--random-output-len", "4", "--prefix-len", "32", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    # Two conversations of two turns, each turn one request: 32 + 8 tokens, then 40 + 4 (the answer) + 8.
    assert (doc["num_prompts"], doc["completed"]) == (4, 4)
    assert doc["input_lens"] == [40, 52, 40, 52] and doc["output_lens"] == [4] * 4  # EOS ignored
    d = doc["disagg"]
    assert d["workload"] == "multi-turn" and d["num_conversations"] == 2
    assert d["kinds"] == ["turn1", "turn2", "turn1", "turn2"]
    assert {kind: k["completed"] for kind, k in d["by_kind"].items()} == {"turn1": 2, "turn2": 2}
    # A later turn is sent only once the turn before it has answered.
    for first, later in ((0, 1), (2, 3)):
        assert d["send_times"][later] >= d["send_times"][first] + doc["ttfts"][first] + sum(doc["itls"][first])
    c = d["cache"]
    assert (c["requests"], c["prompt_tokens"], c["first_turns"]["prompt_tokens"]) == (4, 184, 80)
    later = c["later_turns"]
    assert (later["requests"], later["prompt_tokens"], later["new_tokens"]) == (2, 104, 24)
    assert 0 <= c["prefix_hit_rate"] <= 1 and 0 <= later["kv_sent_per_prompt_token"] <= 1
    assert c["wire_bytes"] == d["kv"]["wire_bytes"] > 0
    assert d["requests"]["lost"] == 0 and all(b["free"] == b["total"] for b in d["kv_blocks_at_end"].values())


def test_shifting_workload_with_the_planner_reports_each_phase(tmp_path: Path) -> None:
    # Workers on their own cores: an idle decode worker that lends its cores is never taken for
    # prefill (they already compute prompts), and this test wants the planner to switch one.
    topology = tmp_path / "own-cores.toml"
    topology.write_text('model = "smollm2-135m-instruct"\n[cluster]\nlend_cores = false\n'
                        '[[workers]]\nrole = "prefill"\n[[workers]]\nrole = "decode"\n')
    cmd = [sys.executable, "-m", "disagg_cli", "bench", "serve", "--workload", "shifting", "--phase-duration", "3",
           "--request-rate", "0.5", "--planner", "slo", "--planner-interval", "0.3", "--slo-ttft-ms", "500",
           "--goodput", "ttft:60000", "--goodput", "tpot:60000", "--json", "--config", str(topology)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    d = json.loads(done.stdout)["disagg"]
    assert d["requests"]["lost"] == 0 and d["requests"]["failed"] == 0
    assert [p["name"] for p in d["phases"]] == ["prefill-heavy", "decode-heavy", "mixed"]
    assert sum(p["sent"] for p in d["phases"]) == d["requests"]["sent"]
    assert all(p["request_goodput"] == p["completed"] / 3 for p in d["phases"])
    assert d["phases"][0]["roles_at_start"] == "1 prefill + 1 decode"
    planner = d["planner"]
    assert planner["mode"] == "slo" and sorted(planner["roles_at_start"].values()) == ["decode", "prefill"]
    # The planner decided (a 1,024-token prompt misses 500 ms): each decision is kept with its reason,
    # and says why where the switch failed (it does on a build without the in-place switch).
    assert planner["role_changes"] and all(c["reason"] and (c["ok"] or c["error"]) for c in planner["role_changes"])
