"""What `disagg bench serve` prints and saves: vLLM's result block and flat JSON keys, plus the
disaggregation figures (KV transfer, per-stage means, retries and failures, short vs long requests),
the side-by-side comparison of modes, and the goodput sweep table; the prefix-cache figures are
`bench/cache_report.py`'s.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disagg_cli import ui
from disagg_cli.bench.cache_report import cache_json, cache_lines, cache_rows, shows_cache
from disagg_cli.bench.metrics import (
    METRIC_HEADERS,
    METRIC_NAMES,
    compute_metrics,
    max_rate_meeting,
    mean,
    percentile,
    percentile_key,
    slo_attainment,
)
from disagg_cli.bench.phases import phase_lines, phases_json
from disagg_cli.bench.workload import conversations, phase_spans

if TYPE_CHECKING:
    from disagg_cli.bench.runs import RunResult, ServeBenchOptions

SLO_TARGET = 0.9  # DistServe: the share of requests that must meet both SLOs


def result_json(run: RunResult, opts: ServeBenchOptions) -> dict[str, Any]:
    """vLLM's flat keys for one run, with one nested `disagg` object."""
    records = run.records
    metrics = compute_metrics(records, run.duration_s, opts.percentile_metrics, opts.metric_percentiles,
                              opts.goodput if opts.goodput.limits_ms else None)
    head: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": run.mode if run.base_url is not None else f"disagg-{run.mode}",
        "base_url": run.base_url,
        "label": opts.label,
        "model_id": opts.model,
        "tokenizer_id": opts.tokenizer or opts.model,
        "num_prompts": len(run.workload),
        "request_rate": "inf" if math.isinf(run.rate) else run.rate,
        "burstiness": opts.burstiness,
        "max_concurrency": opts.max_concurrency,
        **dict(opts.metadata),
    }
    return head | metrics | {"disagg": disagg_json(run, opts)}


def disagg_json(run: RunResult, opts: ServeBenchOptions) -> dict[str, Any]:
    outs = run.outputs
    kv = [o.kv for o in outs]
    transfer = [k["transfer_ms"] for k in kv if "transfer_ms" in k]
    hidden = [k.get("hidden_ms", 0.0) for k in kv if "transfer_ms" in k]
    raw = sum(k.get("raw_bytes", 0.0) for k in kv)
    wire = sum(k.get("wire_bytes", 0.0) for k in kv)
    stage_keys = sorted({key for o in outs for key in o.timings.stages_ms})
    answered = sum(o.state == "done" for o in outs)
    failed = [o for o in outs if o.state == "failed"]
    reasons = Counter(o.finish_reason or "unknown" for o in failed)
    examples = {r: next(o.error for o in failed if o.finish_reason == r) for r in reasons}
    retries = [int(k.get("retries", 0)) for k in kv]
    return {
        "mode": run.mode,
        "workload": opts.workload,
        "topology": run.topology,
        "num_workers": len(run.topology),
        "num_cores": run.num_cores,
        "num_conversations": len(conversations(run.workload)),
        "kv": {
            "raw_bytes": raw, "wire_bytes": wire, "ratio": raw / wire if wire else None,
            "transfer_ms": _summary(transfer, opts.metric_percentiles),
            # Share of the transfer time that overlapped prefill compute (not on the critical path).
            "hidden_share": sum(hidden) / sum(transfer) if transfer and sum(transfer) else None,
        },
        "cache": cache_json(run),
        "stages_ms": {key: mean([o.timings.stages_ms[key] for o in outs if key in o.timings.stages_ms])
                      for key in stage_keys},
        "requests": {"sent": len(outs), "answered": answered, "failed": len(failed),
                     "retried_requests": sum(r > 0 for r in retries), "retries": sum(retries),
                     "lost": len(outs) - answered - len(failed)},
        "failures": dict(reasons),
        "failure_examples": examples,
        "chaos": {"kill_every_s": opts.chaos_kill_every_s, "kills": run.kills},
        "kv_blocks_at_end": None if run.blocks_at_end is None else {
            address: {"free": free, "total": total} for address, (free, total) in run.blocks_at_end.items()},
        "by_kind": _by_kind(run, opts),
        "kinds": [r.kind for r in run.workload],
        # The planner (--planner slo): its settings, the roles as started and every switch it made.
        "planner": {"mode": opts.planner.mode, "slo_ttft_ms": opts.planner.slo_ttft_ms,
                    "slo_tpot_ms": opts.planner.slo_tpot_ms, "roles_at_start": run.roles_at_start,
                    "role_changes": run.role_changes},
        "phases": phases_json(run, opts),
        "send_times": [round(o.timings.arrival_s - run.start_s, 6) for o in outs],
    }


def _summary(values: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    out = {"mean": mean(values), "median": percentile(values, 50)}
    return out | {percentile_key(p): percentile(values, p) for p in percentiles}


def _by_kind(run: RunResult, opts: ServeBenchOptions) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    records = run.records
    for kind in dict.fromkeys(r.kind for r in run.workload):
        mine = [rec for rec, req in zip(records, run.workload, strict=True) if req.kind == kind]
        ok = [r for r in mine if r.success]
        tpot = [t * 1e3 for r in ok if (t := r.tpot_s) is not None]
        kinds[kind] = {"count": len(mine), "completed": len(ok),
                       "ttft_ms": _summary([r.ttft_s * 1e3 for r in ok], (50, 99)),
                       "tpot_ms": _summary(tpot, (50, 99))}
    return kinds


def text_block(result: dict[str, Any], opts: ServeBenchOptions) -> str:
    """vLLM's result layout, then the KV transfer, stages and reliability sections."""
    d = result["disagg"]
    lines = [f"{' Serving Benchmark Result ':=^50}",
             f"{'Mode:':<40} {d['mode']:<10}",
             f"{'Planner:':<40} {d['planner']['mode']:<10}",
             f"{'Successful requests:':<40} {result['completed']:<10}"]
    if result["max_concurrency"] is not None:
        lines.append(f"{'Maximum request concurrency:':<40} {result['max_concurrency']:<10}")
    lines += [f"{'Benchmark duration (s):':<40} {result['duration']:<10.2f}",
              f"{'Total input tokens:':<40} {result['total_input_tokens']:<10}",
              f"{'Total generated tokens:':<40} {result['total_output_tokens']:<10}",
              f"{'Request throughput (req/s):':<40} {result['request_throughput']:<10.2f}"]
    if result["request_goodput"] is not None:
        lines.append(f"{'Request goodput (req/s):':<40} {result['request_goodput']:<10.2f}")
    lines += [f"{'Output token throughput (tok/s):':<40} {result['output_throughput']:<10.2f}",
              f"{'Total Token throughput (tok/s):':<40} {result['total_token_throughput']:<10.2f}"]
    for name in opts.percentile_metrics:
        label = METRIC_NAMES[name]
        lines.append(f"{METRIC_HEADERS[name]:-^50}")
        lines.append(f"{f'Mean {label} (ms):':<40} {result[f'mean_{name}_ms']:<10.2f}")
        lines.append(f"{f'Median {label} (ms):':<40} {result[f'median_{name}_ms']:<10.2f}")
        for p in opts.metric_percentiles:
            key = percentile_key(p)
            lines.append(f"{f'P{key[1:]} {label} (ms):':<40} {result[f'{key}_{name}_ms']:<10.2f}")
    kv = d["kv"]
    if kv["transfer_ms"]["mean"] or kv["raw_bytes"]:
        lines.append(f"{'KV transfer':-^50}")
        ratio = "-" if kv["ratio"] is None else f"{kv['ratio']:.3f}"
        hidden = "-" if kv["hidden_share"] is None else f"{kv['hidden_share'] * 100:.1f}"
        lines += [f"{'KV raw bytes:':<40} {ui.human_bytes(kv['raw_bytes']):<10}",
                  f"{'KV wire bytes:':<40} {ui.human_bytes(kv['wire_bytes']):<10}",
                  f"{'KV raw / wire ratio:':<40} {ratio:<10}"]
        for key, value in kv["transfer_ms"].items():
            label = "Mean" if key == "mean" else "Median" if key == "median" else f"P{key[1:]}"
            lines.append(f"{f'{label} KV transfer (ms):':<40} {value:<10.2f}")
        lines.append(f"{'Transfer hidden behind prefill (%):':<40} {hidden:<10}")
    if shows_cache(d):
        lines += cache_lines(d)
    if d["stages_ms"]:
        lines.append(f"{'Per-stage means (ms)':-^50}")
        lines += [f"{key + ':':<40} {value:<10.2f}" for key, value in d["stages_ms"].items()]
    if len(d["by_kind"]) > 1:
        lines.append(f"{'Per request kind':-^50}")
        for kind, k in d["by_kind"].items():
            lines.append(f"{f'{kind}: completed / sent':<40} {k['completed']} / {k['count']}")
            for m in ("ttft", "tpot"):
                s = k[f"{m}_ms"]
                lines.append(f"{f'{kind}: {METRIC_NAMES[m]} p50 / p99 (ms)':<40} {s['p50']:.2f} / {s['p99']:.2f}")
    lines += phase_lines(d["phases"])
    req = d["requests"]
    lines.append(f"{'Requests':-^50}")
    lines += [f"{k.replace('_', ' ').capitalize() + ':':<40} {v:<10}" for k, v in req.items()]
    for reason, count in d["failures"].items():
        lines.append(f"{f'Failed ({reason}):':<40} {count:<10} {d['failure_examples'][reason][:120]}")
    if d["chaos"]["kills"]:
        lines.append(f"{'Workers killed and restarted:':<40} {len(d['chaos']['kills']):<10}")
    if d.get("kv_blocks_at_end"):
        free = all(b["free"] == b["total"] for b in d["kv_blocks_at_end"].values())
        lines.append(f"{'Every KV block free at the end:':<40} {'yes' if free else 'NO':<10}")
    lines.append("=" * 50)
    return "\n".join(lines)


COMPARED = [("Request throughput (req/s)", "request_throughput"), ("Request goodput (req/s)", "request_goodput"),
            ("Output token throughput (tok/s)", "output_throughput")]


def ratios(results: dict[str, dict[str, Any]], opts: ServeBenchOptions) -> list[tuple[str, float | None, float | None]]:
    """(label, disagg, colocated) rows, the numbers `compare_block` prints and `--json` keeps."""
    dis, col = results["disagg"], results["colocated"]
    rows: list[tuple[str, float | None, float | None]] = [(label, dis[k], col[k]) for label, k in COMPARED]
    for name in opts.percentile_metrics:
        for stat in ("mean", "median", *(percentile_key(p) for p in opts.metric_percentiles)):
            label = f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {METRIC_NAMES[name]} (ms)"
            rows.append((label, dis[f"{stat}_{name}_ms"], col[f"{stat}_{name}_ms"]))
    kinds_d, kinds_c = dis["disagg"]["by_kind"], col["disagg"]["by_kind"]
    if "short" in kinds_d:
        for m in ("tpot", "ttft"):
            for q in ("p50", "p99"):
                rows.append((f"short {METRIC_NAMES[m]} {q} (ms)", kinds_d["short"][f"{m}_ms"][q],
                             kinds_c["short"][f"{m}_ms"][q]))
    return rows + cache_rows(dis["disagg"], col["disagg"])


def compare_block(results: dict[str, dict[str, Any]], opts: ServeBenchOptions) -> str:
    lines = [f"{' Disaggregated vs colocated ':=^72}",
             f"{'metric':<34} {'disagg':>12} {'colocated':>12} {'col/dis':>10}"]
    for label, a, b in ratios(results, opts):
        ratio = f"{b / a:.2f}x" if a and b is not None else "-"
        lines.append(f"{label:<34} {_fmt(a):>12} {_fmt(b):>12} {ratio:>10}")
    lines.append("=" * 72)
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def sweep_json(runs: dict[str, list[RunResult]], opts: ServeBenchOptions) -> dict[str, Any]:
    """Per mode: SLO attainment at every rate, the highest rate at which ≥ 90% meet both SLOs, and
    that rate per core (both modes use the same cores, so per core is the fair unit here)."""
    out: dict[str, Any] = {"slo_ms": opts.goodput.limits_ms, "target": SLO_TARGET, "modes": {}}
    for mode, mode_runs in runs.items():
        points = []
        for run in mode_runs:
            records = run.records
            points.append({"rate": run.rate, "attainment": slo_attainment(records, opts.goodput),
                           "completed": sum(r.success for r in records), "duration": run.duration_s})
        best = max_rate_meeting({p["rate"]: p["attainment"] for p in points}, SLO_TARGET)
        cores = mode_runs[0].num_cores
        out["modes"][mode] = {"points": points, "max_rate": best, "num_cores": cores,
                              "num_workers": len(mode_runs[0].topology),
                              "max_rate_per_core": best / cores if best is not None else None}
    return out


def sweep_block(sweep: dict[str, Any]) -> str:
    modes = list(sweep["modes"])
    slo = ", ".join(f"{k} ≤ {v:g} ms" for k, v in sweep["slo_ms"].items())
    lines = [f"{' Goodput sweep ':=^60}", f"SLOs: {slo}; target: {sweep['target'] * 100:.0f}% of requests",
             f"{'rate (req/s)':<14}" + "".join(f"{m + ' attained':>22}" for m in modes)]
    rates = [p["rate"] for p in sweep["modes"][modes[0]]["points"]]
    for i, rate in enumerate(rates):
        lines.append(f"{rate:<14g}" + "".join(f"{sweep['modes'][m]['points'][i]['attainment'] * 100:>21.1f}%"
                                              for m in modes))
    for m in modes:
        s = sweep["modes"][m]
        best = "none of the rates" if s["max_rate"] is None else (
            f"{s['max_rate']:g} req/s = {s['max_rate_per_core']:.3f} req/s per core")
        lines.append(f"{m}: highest rate meeting the SLOs: {best} ({s['num_workers']} worker(s) on "
                     f"{s['num_cores']} core(s))")
    lines.append("=" * 60)
    return "\n".join(lines)


def report(runs: dict[str, list[RunResult]], opts: ServeBenchOptions) -> None:
    results = {mode: [result_json(run, opts) for run in mode_runs] for mode, mode_runs in runs.items()}
    if opts.save_result:
        for mode, mode_results in results.items():
            for run, result in zip(runs[mode], mode_results, strict=True):
                path = _result_path(opts, mode, run.rate)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result), encoding="utf-8")
                ui.info(f"saved {path}")
    sweep = sweep_json(runs, opts) if opts.sweep_rates else None
    last = {mode: mode_results[-1] for mode, mode_results in results.items()}
    if opts.json_output:
        if sweep is not None:
            doc: dict[str, Any] = {"sweep": sweep, "runs": results}
        elif len(last) == 1:
            doc = next(iter(last.values()))
        else:
            doc = {"mode": "both", "runs": last,
                   "ratios": {label: (b / a if a and b is not None else None) for label, a, b in ratios(last, opts)}}
        print(json.dumps(doc))
    else:
        for mode_results in results.values():
            for result in mode_results:
                print(text_block(result, opts))
        if len(last) == 2:
            print(compare_block(last, opts))
        if sweep is not None:
            print(sweep_block(sweep))
    if opts.plot is not None:
        from disagg_cli.bench.plot import plot_runs

        phases = phase_spans(opts.phase_s) if opts.workload == "shifting" else None
        if plot_runs({mode: mode_runs[-1] for mode, mode_runs in runs.items()}, opts.plot, phases):
            ui.info(f"plot written to {opts.plot}")


def _result_path(opts: ServeBenchOptions, mode: str, rate: float) -> Path:
    base = Path(opts.result_dir) if opts.result_dir is not None else Path(".")
    if opts.result_filename:
        name = Path(opts.result_filename)
        if len(opts.modes) > 1 or len(opts.sweep_rates) > 1:
            name = name.with_name(f"{name.stem}-{mode}-{rate:g}qps{name.suffix or '.json'}")
        return base / name
    model = Path(opts.model).stem if "/" in opts.model else opts.model
    conc = f"-concurrency{opts.max_concurrency}" if opts.max_concurrency else ""
    label = f"{opts.label}-" if opts.label else ""
    return base / f"{label}disagg-{mode}-{rate:g}qps{conc}-{model}-{datetime.now():%Y%m%d-%H%M%S}.json"
