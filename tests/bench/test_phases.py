"""`--workload shifting`: its phases (exact kinds, lengths, send windows, seeds) and the per-phase
report (goodput, failed and lost, the roles at each phase's start and the planner's switches in it),
on hand-made outputs."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from disagg_cli.bench.metrics import parse_goodput
from disagg_cli.bench.phases import phase_lines, phases_json, roles_at
from disagg_cli.bench.runs import RunResult, ServeBenchOptions, TimedOutput
from disagg_cli.bench.serve_report import result_json, text_block
from disagg_cli.bench.workload import SHIFTING_PHASES, Phase, phase_spans, shifting_workload
from disagg_cli.config import SamplingParams
from disagg_cli.errors import UsageError
from disagg_cli.model.tokenizer import Tokenizer

P, D = "tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"
SMALL = (Phase("prefill-heavy", 64, 2, 4.0), Phase("decode-heavy", 4, 16, 4.0), Phase("mixed", 16, 8, 4.0))


def test_shifting_workload_phases(default_tokenizer: Tokenizer) -> None:
    w = shifting_workload(default_tokenizer, 10.0, 1.0, 1.0, seed=1)
    assert w == shifting_workload(default_tokenizer, 10.0, 1.0, 1.0, seed=1)
    assert w != shifting_workload(default_tokenizer, 10.0, 1.0, 1.0, seed=2)
    assert list(dict.fromkeys(r.kind for r in w)) == [p.name for p in SHIFTING_PHASES]
    for phase, (name, start, end) in zip(SHIFTING_PHASES, phase_spans(10.0), strict=True):
        mine = [r for r in w if r.kind == name]
        assert mine[0].send_s == start and all(start <= r.send_s < end for r in mine)
        assert all(len(r.prompt_ids) == phase.input_len and r.output_len == phase.output_len for r in mine)
    assert [r.send_s for r in w] == sorted(r.send_s for r in w)
    doubled = shifting_workload(default_tokenizer, 100.0, 2.0, 1.0, seed=1)
    single = shifting_workload(default_tokenizer, 100.0, 1.0, 1.0, seed=1)
    assert 1.6 < len(doubled) / len(single) < 2.4  # --request-rate scales every phase
    with pytest.raises(UsageError, match="positive finite"):
        shifting_workload(default_tokenizer, 10.0, math.inf, 1.0, seed=1)
    with pytest.raises(UsageError, match="--phase-duration"):
        ServeBenchOptions(model="m", cache_dir=Path("."), workload="shifting", phase_s=0)


def _run(tokenizer: Tokenizer, phase_s: float) -> RunResult:
    """Requests of `SMALL`: the decode-heavy phase's first fails, the mixed phase's first is lost
    (never ended); the rest take 0.1 s to their first token. The planner made one switch in the
    decode-heavy phase and failed one in the mixed phase."""
    workload = shifting_workload(tokenizer, phase_s, 1.0, 1.0, seed=0, phases=SMALL)
    start = time.perf_counter()
    outs = []
    for i, req in enumerate(workload):
        out = TimedOutput(f"r{i}", "", list(req.prompt_ids), SamplingParams(max_tokens=req.output_len), tokenizer)
        out.timings.arrival_s = start - 0.1  # the tokens below come at once: TTFT 0.1 s
        first_of = i == 0 or workload[i - 1].kind != req.kind
        if first_of and req.kind == "decode-heavy":
            out.fail("worker-dead", "gone")
        elif not (first_of and req.kind == "mixed"):
            for _ in range(req.output_len):
                out.append(5)
        outs.append(out)
    changes: list[dict[str, object]] = [
        {"t_s": phase_s * 1.5, "address": D, "from": "decode", "to": "colocated", "reason": "r", "ok": True,
         "requests_moved": 3, "seconds": 0.5, "longest_pause_s": 0.08, "error": None},
        {"t_s": phase_s * 2.5, "address": P, "from": "prefill", "to": "decode", "reason": "r", "ok": False,
         "requests_moved": 0, "seconds": 0.0, "longest_pause_s": 0.0, "error": "no switch here"}]
    return RunResult("disagg", 1.0, workload, outs, 3 * phase_s, start, [{"role": "prefill"}], 2,
                     roles_at_start={P: "prefill", D: "decode"}, role_changes=changes)


def test_per_phase_report(default_tokenizer: Tokenizer) -> None:
    opts = ServeBenchOptions(model="m", cache_dir=Path("."), workload="shifting", phase_s=5.0,
                             goodput=parse_goodput(["ttft:1000", "tpot:60000"]))
    run = _run(default_tokenizer, 5.0)
    assert roles_at(run, 0.0) == {P: "prefill", D: "decode"}
    assert roles_at(run, 10.0) == {P: "prefill", D: "colocated"}  # the failed switch changed nothing
    phases = phases_json(run, opts)
    assert [p["name"] for p in phases] == ["prefill-heavy", "decode-heavy", "mixed"]
    counts = {p["name"]: sum(r.kind == p["name"] for r in run.workload) for p in phases}
    heavy, decode, mixed = phases
    n = counts["prefill-heavy"]
    assert (heavy["sent"], heavy["completed"], heavy["failed"], heavy["lost"]) == (n, n, 0, 0)
    assert heavy["request_goodput"] == pytest.approx(counts["prefill-heavy"] / 5.0)
    assert heavy["ttft_ms"]["p50"] == pytest.approx(100.0, abs=20.0)
    assert (decode["failed"], decode["lost"], decode["completed"]) == (1, 0, counts["decode-heavy"] - 1)
    assert (mixed["failed"], mixed["lost"]) == (0, 1)
    assert [p["roles_at_start"] for p in phases] == ["1 prefill + 1 decode", "1 prefill + 1 decode",
                                                     "1 prefill + 1 colocated"]
    assert [len(p["switches"]) for p in phases] == [0, 1, 1]
    lines = phase_lines(phases)
    assert lines[1].split()[:2] == ["phase", "goodput"]
    assert f"  at 7.5 s: {D} decode → colocated (3 moved, 0.50 s, pause 80 ms)" in lines
    assert f"  at 12.5 s: {P} prefill → decode (failed: no switch here)" in lines
    result = result_json(run, opts)
    assert result["disagg"]["phases"] == phases
    assert result["disagg"]["planner"]["role_changes"] == run.role_changes
    text = text_block(result, opts)
    assert "Per phase (shifting workload)" in text and "Planner:" in text
    assert phases_json(run, ServeBenchOptions(model="m", cache_dir=Path("."))) == []  # other workloads: none
