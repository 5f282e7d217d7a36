"""The prefix and multi-turn workloads (exact lengths, shared prefixes, seeds), the driver that
sends a conversation's turns in order (`bench/replay.py`, with in-memory outputs), and the
prefix-cache figures of the report on hand-made kv values."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest

from disagg_cli.bench.replay import SKIPPED, replay
from disagg_cli.bench.runs import RunResult, ServeBenchOptions, TimedOutput
from disagg_cli.bench.serve_report import compare_block, ratios, result_json, text_block
from disagg_cli.bench.workload import (
    BenchRequest,
    conversations,
    multi_turn_workload,
    next_prompt,
    prefix_workload,
    text_token_ids,
)
from disagg_cli.config import SamplingParams
from disagg_cli.engine.request import Timings
from disagg_cli.errors import UsageError
from disagg_cli.model.tokenizer import Tokenizer


def test_prefix_workload_shares_prefixes_round_robin(default_tokenizer: Tokenizer) -> None:
    w = prefix_workload(default_tokenizer, 7, num_prefixes=3, prefix_len=20, input_len=5, output_len=4,
                        rate=2.0, burstiness=1.0, seed=3)
    assert w == prefix_workload(default_tokenizer, 7, 3, 20, 5, 4, 2.0, 1.0, seed=3)
    assert w != prefix_workload(default_tokenizer, 7, 3, 20, 5, 4, 2.0, 1.0, seed=4)
    assert all(len(r.prompt_ids) == 25 and r.output_len == 4 and r.follows is None for r in w)
    heads = [r.prompt_ids[:20] for r in w]
    assert heads[0] == heads[3] == heads[6] and heads[1] == heads[4] and heads[2] == heads[5]
    assert len({heads[0], heads[1], heads[2]}) == 3
    assert len({r.prompt_ids[20:] for r in w}) == 7  # every suffix its own
    assert [r.send_s for r in w] == sorted(r.send_s for r in w) and w[0].send_s == 0.0
    allowed = set(text_token_ids(default_tokenizer))
    assert all(i in allowed for r in w for i in r.prompt_ids)
    assert conversations(w) == [[i] for i in range(7)]


def test_multi_turn_workload_shape(default_tokenizer: Tokenizer) -> None:
    w = multi_turn_workload(default_tokenizer, 3, num_turns=4, prefix_len=32, input_len=8, output_len=5,
                            rate=1.0, burstiness=1.0, seed=11)
    assert w == multi_turn_workload(default_tokenizer, 3, 4, 32, 8, 5, 1.0, 1.0, seed=11)
    assert w != multi_turn_workload(default_tokenizer, 3, 4, 32, 8, 5, 1.0, 1.0, seed=12)
    assert [r.kind for r in w] == ["turn1", "turn2", "turn3", "turn4"] * 3
    assert [r.follows for r in w] == [None, 0, 1, 2, None, 4, 5, 6, None, 8, 9, 10]
    assert conversations(w) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    firsts = [w[0], w[4], w[8]]
    assert all(len(r.prompt_ids) == 40 for r in firsts)
    assert firsts[0].prompt_ids[:32] == firsts[1].prompt_ids[:32] == firsts[2].prompt_ids[:32]  # one system prompt
    assert len({r.prompt_ids[32:] for r in firsts}) == 3
    assert all(len(r.prompt_ids) == 8 for r in w if r.follows is not None)  # only the new message
    assert all(r.output_len == 5 for r in w)
    # Every turn of a conversation carries its arrival; conversations arrive in order.
    assert [r.send_s for r in w] == [w[0].send_s] * 4 + [w[4].send_s] * 4 + [w[8].send_s] * 4
    assert 0.0 == w[0].send_s < w[4].send_s < w[8].send_s
    assert next_prompt([1, 2], [3], w[1]) == [1, 2, 3, *w[1].prompt_ids]


def test_workload_flags_are_checked() -> None:
    with pytest.raises(UsageError, match="--num-turns must be at least 1"):
        ServeBenchOptions(model="m", cache_dir=Path("."), workload="multi-turn", num_turns=0)
    with pytest.raises(UsageError, match="--prefix-len must be at least 1 for --workload prefix"):
        ServeBenchOptions(model="m", cache_dir=Path("."), workload="prefix", prefix_len=0)
    assert ServeBenchOptions(model="m", cache_dir=Path("."), workload="multi-turn", prefix_len=0).ignores_eos
    assert not ServeBenchOptions(model="m", cache_dir=Path(".")).ignores_eos


class FakeOutput:
    """An in-memory request: answers with `prompt length + k` for k in range(output_len)."""

    def __init__(self, index: int, prompt_token_ids: list[int], output_len: int) -> None:
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.output_len = output_len
        self.token_ids: list[int] = []
        self.state = "queued"
        self.timings = Timings()
        self.error: str | None = None
        self.finish_reason: str | None = None

    def fail(self, reason: str, message: str) -> None:
        self.state, self.finish_reason, self.error = "failed", reason, message


def test_replay_sends_turns_in_order_and_fails_the_rest() -> None:
    system = (100, 101)
    w = [BenchRequest((*system, 1), 2, 0.0, "turn1"), BenchRequest((2,), 2, 0.0, "turn2", follows=0),
         BenchRequest((3,), 2, 0.0, "turn3", follows=1),
         BenchRequest((*system, 7), 2, 0.0, "turn1"), BenchRequest((8,), 2, 0.0, "turn2", follows=3),
         BenchRequest((9,), 2, 0.0, "turn3", follows=4)]
    events: list[tuple[str, int]] = []
    in_flight = [0, 0]

    async def send(out: FakeOutput) -> None:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        events.append(("start", out.index))
        await asyncio.sleep(0.01)
        if out.index == 4:  # the second conversation's second turn fails
            out.fail("worker-dead", "gone")
        else:
            out.token_ids = [len(out.prompt_token_ids) * 10 + k for k in range(out.output_len)]
            out.state = "done"
        events.append(("end", out.index))
        in_flight[0] -= 1

    def make(i: int, prompt_ids: list[int]) -> FakeOutput:
        return FakeOutput(i, prompt_ids, w[i].output_len)

    outs, duration_s, _ = asyncio.run(replay(w, make, send, "test", max_concurrency=None))
    assert [o.index for o in outs] == list(range(6)) and duration_s > 0
    assert outs[0].prompt_token_ids == [100, 101, 1]
    assert outs[1].prompt_token_ids == [100, 101, 1, 30, 31, 2]  # turn 1's prompt + its output + message
    assert outs[2].prompt_token_ids == [100, 101, 1, 30, 31, 2, 60, 61, 3]
    for turn in (1, 2, 4):  # a turn starts only after the turn before it ended
        assert events.index(("end", turn - 1)) < events.index(("start", turn))
    assert ("start", 5) not in events  # never sent: turn 2 of its conversation failed
    assert [o.state for o in outs] == ["done", "done", "done", "done", "failed", "failed"]
    assert outs[5].finish_reason == SKIPPED and "turn 2" in (outs[5].error or "")
    assert outs[5].timings.arrival_s > 0
    assert in_flight[1] == 2  # the two conversations ran side by side

    events.clear()
    in_flight[1] = 0
    asyncio.run(replay(w, make, send, "test", max_concurrency=1))
    assert in_flight[1] == 1


def _run(tokenizer: Tokenizer, workload: list[BenchRequest], mode: str, kvs: list[dict[str, float]],
         states: list[str]) -> RunResult:
    """A run of `workload` (turns built as the driver builds them) whose request i has kv figures
    `kvs[i]` and ends `states[i]`."""
    start = time.perf_counter()
    outs = []
    prompt: list[int] = []
    for i, (req, kv, state) in enumerate(zip(workload, kvs, states, strict=True)):
        prompt = list(req.prompt_ids) if req.follows is None else next_prompt(prompt, outs[-1].token_ids, req)
        out = TimedOutput(f"r{i}", "", prompt, SamplingParams(max_tokens=req.output_len, ignore_eos=True), tokenizer)
        out.timings.arrival_s = start
        if state == "done":
            for _ in range(req.output_len):
                out.append(5)
        else:
            out.fail("worker-dead", "gone")
        out.kv.update(kv)
        outs.append(out)
    return RunResult(mode, 1.0, workload, outs, 1.0, start, [{"role": "prefill"}], 2)


def test_cache_figures_of_a_multi_turn_run(default_tokenizer: Tokenizer) -> None:
    opts = ServeBenchOptions(model="m", cache_dir=Path("."), workload="multi-turn", mode="both")
    # Two conversations of two turns: prompts 40 and 40 + 4 + 8 = 52 tokens.
    w = [BenchRequest(tuple(range(40)), 4, 0.0, "turn1"), BenchRequest(tuple(range(8)), 4, 0.0, "turn2", follows=0),
         BenchRequest(tuple(range(40)), 4, 0.0, "turn1"), BenchRequest(tuple(range(8)), 4, 0.0, "turn2", follows=2)]
    dis = _run(default_tokenizer, w, "disagg", [
        {"wire_bytes": 1000.0, "raw_bytes": 1000.0},
        {"prefix_cached_tokens": 32.0, "decode_cached_tokens": 32.0, "wire_bytes": 500.0, "raw_bytes": 500.0},
        {"prefix_cached_tokens": 32.0, "wire_bytes": 1000.0, "raw_bytes": 1000.0},
        {"prefix_cached_tokens": 48.0, "decode_cached_tokens": 48.0, "wire_bytes": 100.0, "raw_bytes": 100.0},
    ], ["done"] * 4)
    col = _run(default_tokenizer, w, "colocated", [{}, {"prefix_cached_tokens": 40.0}, {}, {}],
               ["done", "done", "done", "failed"])
    d = result_json(dis, opts)["disagg"]
    assert d["num_conversations"] == 2
    c = d["cache"]
    # prompts 40 + 52 + 40 + 52 = 184; prefix hits 32 + 32 + 48 = 112; decode hits 32 + 48 = 80
    assert (c["requests"], c["prompt_tokens"]) == (4, 184)
    assert (c["prefix_cached_tokens"], c["decode_cached_tokens"]) == (112, 80)
    assert (c["prefix_hit_rate"], c["decode_hit_rate"]) == (112 / 184, 80 / 184)
    assert (c["kv_tokens_sent"], c["kv_sent_per_prompt_token"], c["wire_bytes"]) == (104, 104 / 184, 2600.0)
    later = c["later_turns"]
    # later turns: prompts 52 + 52; sent (52 - 32) + (52 - 48) = 24; new tokens 12 + 12 (answer + message)
    assert (later["requests"], later["prompt_tokens"], later["prefix_cached_tokens"]) == (2, 104, 80)
    assert later["prefix_hit_rate"] == 80 / 104
    assert (later["kv_tokens_sent"], later["kv_sent_per_prompt_token"]) == (24, 24 / 104)
    assert (later["new_tokens"], later["kv_sent_per_new_token"], later["wire_bytes"]) == (24, 1.0, 600.0)
    assert (c["first_turns"]["prompt_tokens"], c["first_turns"]["prefix_hit_rate"]) == (80, 32 / 80)
    assert c["first_turns"]["ttft_ms"]["p50"] >= 0 and later["ttft_ms"]["p99"] >= 0
    assert d["by_kind"]["turn1"]["count"] == d["by_kind"]["turn2"]["count"] == 2

    k = result_json(col, opts)["disagg"]["cache"]  # the failed turn counts nowhere; nothing crossed a wire
    assert (k["requests"], k["prompt_tokens"], k["prefix_cached_tokens"]) == (3, 132, 40)
    assert k["prefix_hit_rate"] == 40 / 132
    assert (k["kv_tokens_sent"], k["kv_sent_per_prompt_token"], k["wire_bytes"]) == (0, 0.0, 0.0)
    assert (k["later_turns"]["prompt_tokens"], k["later_turns"]["new_tokens"]) == (52, 12)

    text = text_block(result_json(dis, opts), opts)
    for label, value in [("Prefix hit rate (%):", "60.9"), ("Decode cache hits (tokens):", "80"),
                         ("KV tokens sent / prompt tokens:", "0.565"), ("Prefix hit rate (%):", "76.9"),
                         ("New tokens (answer + message):", "24"), ("KV tokens sent / new tokens:", "1.000")]:
        assert f"{label:<40} {value:<10}" in text
    assert "--------------Turns after the first---------------" in text
    assert "TTFT p50, turn 1 / later turns (ms):" in text
    results = {"disagg": result_json(dis, opts), "colocated": result_json(col, opts)}
    rows = {label: (a, b) for label, a, b in ratios(results, opts)}
    assert rows["Prefix hit rate (%)"] == (112 / 184 * 100, 40 / 132 * 100)
    assert rows["KV wire bytes (MB)"] == (0.0026, 0.0)
    assert rows["Later turns KV sent / prompt tok"] == (24 / 104, 0.0)
    assert "Later turns TTFT p50 (ms)" in rows and "Turn 1 TTFT p50 (ms)" in rows
    assert "Prefix hit rate (%)" in compare_block(results, opts)


def test_no_cache_section_without_cache_workload_or_hits(default_tokenizer: Tokenizer) -> None:
    opts = ServeBenchOptions(model="m", cache_dir=Path("."))
    w = [BenchRequest((1, 2, 3), 2, 0.0)]
    result = result_json(_run(default_tokenizer, w, "disagg", [{"wire_bytes": 10.0}], ["done"]), opts)
    c = result["disagg"]["cache"]
    assert "later_turns" not in c and (c["prefix_hit_rate"], c["kv_tokens_sent"]) == (0.0, 3)
    assert "Prefix cache" not in text_block(result, opts)
    hit = result_json(_run(default_tokenizer, w, "disagg", [{"prefix_cached_tokens": 2.0}], ["done"]), opts)
    assert "Prefix cache" in text_block(hit, opts) and math.isclose(hit["disagg"]["cache"]["prefix_hit_rate"], 2 / 3)
