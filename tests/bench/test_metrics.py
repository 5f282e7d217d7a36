"""vLLM's serving metrics on hand-made timings (binary-exact values, so results compare with ==),
the workload generators, and the keys of the result JSON."""

from __future__ import annotations

import math
import random
import time

import pytest

from disagg_cli.bench.metrics import (
    RequestRecord,
    compute_metrics,
    max_rate_meeting,
    parse_goodput,
    percentile,
    percentile_key,
    slo_attainment,
)
from disagg_cli.bench.workload import arrival_offsets, interference_workload, random_workload, text_token_ids
from disagg_cli.config import SamplingParams
from disagg_cli.model.tokenizer import Tokenizer

RECORDS = [
    # ttft 0.5, end 1.0, 3 tokens: TPOT (1.0 - 0.5) / 2 = 0.25
    RequestRecord(True, prompt_len=10, output_len=3, ttft_s=0.5, latency_s=1.0, itl_s=(0.25, 0.25)),
    # TPOT (1.25 - 0.25) / 2 = 0.5
    RequestRecord(True, prompt_len=20, output_len=3, ttft_s=0.25, latency_s=1.25, itl_s=(0.5, 0.5)),
    # one token: no TPOT, no ITL
    RequestRecord(True, prompt_len=6, output_len=1, ttft_s=0.75, latency_s=0.75),
    RequestRecord(False, prompt_len=8, output_len=0, error="worker-dead"),
]


def test_counts_and_throughputs() -> None:
    m = compute_metrics(RECORDS, duration_s=2.0)
    assert m["completed"] == 3
    assert m["total_input_tokens"] == 36  # failed requests' prompts are not counted (vLLM)
    assert m["total_output_tokens"] == 7
    assert m["output_lens"] == [3, 3, 1, 0]
    assert m["input_lens"] == [10, 20, 6, 8]
    assert m["request_throughput"] == 1.5
    assert m["output_throughput"] == 3.5
    assert m["total_token_throughput"] == 21.5
    assert m["request_goodput"] is None
    assert m["errors"] == ["", "", "", "worker-dead"]
    assert m["itls"] == [[0.25, 0.25], [0.5, 0.5], [], []]


def test_latency_metrics_exact() -> None:
    m = compute_metrics(RECORDS, 2.0, selected=("ttft", "tpot", "itl", "e2el"), percentiles=(25, 50, 75))
    # TTFT over successful requests [0.25, 0.5, 0.75]
    assert (m["mean_ttft_ms"], m["median_ttft_ms"], m["p25_ttft_ms"], m["p75_ttft_ms"]) == (500, 500, 375, 625)
    assert m["std_ttft_ms"] == pytest.approx(1e3 * math.sqrt(1 / 24))
    # TPOT only where more than one token: [0.25, 0.5]
    assert (m["mean_tpot_ms"], m["median_tpot_ms"], m["p75_tpot_ms"]) == (375, 375, 437.5)
    assert m["std_tpot_ms"] == 125
    # ITL pooled over all gaps: [0.25, 0.25, 0.5, 0.5]
    assert (m["mean_itl_ms"], m["median_itl_ms"], m["p25_itl_ms"], m["p75_itl_ms"]) == (375, 375, 250, 500)
    assert (m["mean_e2el_ms"], m["median_e2el_ms"]) == (1000, 1000)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    # Only the first request has TTFT <= 600 and TPOT <= 300; the failed one never counts.
    both = parse_goodput(["ttft:600", "tpot:300"])
    assert compute_metrics(RECORDS, 2.0, slo=both)["request_goodput"] == 0.5
    # A single-token request has TPOT 0 for goodput, as in vLLM.
    assert compute_metrics(RECORDS, 2.0, slo=parse_goodput(["tpot:300"]))["request_goodput"] == 1.0
    assert compute_metrics(RECORDS, 2.0, slo=parse_goodput(["e2el:1000"]))["request_goodput"] == 1.0
    assert slo_attainment(RECORDS, both) == 0.25
    assert parse_goodput(["ttft:600 tpot:300"]).limits_ms == {"ttft": 600.0, "tpot": 300.0}


@pytest.mark.parametrize("bad", ["ttft", "itl:5", "ttft:abc", "tpot:-1"])
def test_goodput_refuses_bad_slos(bad: str) -> None:
    with pytest.raises(ValueError, match="--goodput"):
        parse_goodput([bad])


def test_percentiles_and_keys() -> None:
    assert percentile([], 99) == 0.0  # vLLM: np.percentile(xs or 0, q)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert (percentile_key(99), percentile_key(99.9), percentile_key(50.0)) == ("p99", "p99.9", "p50")
    assert max_rate_meeting({0.5: 1.0, 1.0: 0.95, 2.0: 0.5}) == 1.0
    assert max_rate_meeting({1.0: 0.2}) is None


def test_arrivals_follow_the_rate() -> None:
    assert arrival_offsets(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]
    sends = arrival_offsets(4001, 4.0, 1.0, random.Random(1))
    assert sends[0] == 0.0 and sends == sorted(sends)
    assert sends[-1] / 4000 == pytest.approx(0.25, rel=0.05)  # mean interval 1/rate
    bursty = arrival_offsets(4001, 4.0, 0.25, random.Random(1))
    assert bursty[-1] / 4000 == pytest.approx(0.25, rel=0.15)  # same mean, burstier


VLLM_KEYS = {"date", "backend", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency",
             "duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput", "input_lens", "output_lens",
             "ttfts", "itls", "errors", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
             "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
             "std_itl_ms", "p99_itl_ms"}


def test_workloads_are_seeded_real_text(default_tokenizer: Tokenizer) -> None:
    a = random_workload(default_tokenizer, 4, 32, 8, 0.5, 2.0, 1.0, seed=7)
    assert a == random_workload(default_tokenizer, 4, 32, 8, 0.5, 2.0, 1.0, seed=7)
    assert all(16 <= len(r.prompt_ids) <= 48 and 4 <= r.output_len <= 12 for r in a)
    allowed = set(text_token_ids(default_tokenizer))
    assert all(i in allowed for r in a for i in r.prompt_ids)  # no special tokens
    mixed = interference_workload(default_tokenizer, 10, 32, 64, 1024, 8, 2.0, 2.0, 1.0, seed=0)
    longs = [r for r in mixed if r.kind == "long"]
    assert len(mixed) - len(longs) == 10 and longs and all(len(r.prompt_ids) == 1024 for r in longs)
    assert [r.send_s for r in mixed] == sorted(r.send_s for r in mixed)


def test_result_json_keys(default_tokenizer: Tokenizer) -> None:
    from disagg_cli.bench.runs import RunResult, ServeBenchOptions, TimedOutput
    from disagg_cli.bench.serve_report import result_json, text_block
    from disagg_cli.bench.workload import BenchRequest

    opts = ServeBenchOptions(model="m", cache_dir=__import__("pathlib").Path("."),
                             goodput=parse_goodput(["ttft:1000", "tpot:1000"]))
    workload = [BenchRequest((5, 6, 7), 3, 0.0), BenchRequest((8, 9), 2, 0.0)]
    start = time.perf_counter()
    outs = [TimedOutput(f"r{i}", "", list(r.prompt_ids), SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                        default_tokenizer) for i, r in enumerate(workload)]
    for _ in range(3):
        outs[0].append(100)
    outs[0].kv.update({"raw_bytes": 4.0, "wire_bytes": 2.0, "transfer_ms": 10.0, "hidden_ms": 5.0, "retries": 1.0})
    outs[1].fail("worker-dead", "prefill worker died")
    run = RunResult("disagg", 1.0, workload, outs, 1.0, start, [{"role": "prefill"}], 2)
    result = result_json(run, opts)
    assert set(result) >= VLLM_KEYS
    assert (result["completed"], result["output_lens"], result["errors"][1]) == (1, [3, 0], "prefill worker died")
    assert len(result["itls"][0]) == 2
    d = result["disagg"]
    assert d["requests"] == {"sent": 2, "answered": 1, "failed": 1, "retried_requests": 1, "retries": 1, "lost": 0}
    assert d["failures"] == {"worker-dead": 1}
    assert (d["kv"]["ratio"], d["kv"]["hidden_share"]) == (2.0, 0.5)
    text = text_block(result, opts)
    assert text.startswith("============ Serving Benchmark Result ============")
    for line in ("Successful requests:", "Benchmark duration (s):", "Mean TTFT (ms):", "Median TTFT (ms):",
                 "P99 TTFT (ms):", "P99 ITL (ms):", "Request goodput (req/s):", "KV raw / wire ratio:", "Lost:"):
        assert line in text
