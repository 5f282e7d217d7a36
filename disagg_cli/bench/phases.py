"""Per-phase figures of a `--workload shifting` run: for each phase, its requests' goodput, TTFT
and TPOT, failed and lost, the roles in effect when it began and the planner's switches during it;
saved under the result's `disagg.phases` and printed as one line per phase.

A phase's goodput is its requests that met every `--goodput` SLO over its sending window
(`--phase-duration`): every mode is sent the same requests, so the figures compare across runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagg_cli.bench.metrics import percentile
from disagg_cli.bench.workload import phase_spans

if TYPE_CHECKING:
    from disagg_cli.bench.runs import RunResult, ServeBenchOptions


def roles_at(run: RunResult, t_s: float) -> dict[str, str]:
    """Every worker's role at `t_s` seconds from the start: as started, then each switch made before."""
    roles = dict(run.roles_at_start)
    for change in run.role_changes:
        if change["ok"] and float(change["t_s"]) <= t_s:  # type: ignore[arg-type]
            roles[str(change["address"])] = str(change["to"])
    return roles


def phases_json(run: RunResult, opts: ServeBenchOptions) -> list[dict[str, Any]]:
    if opts.workload != "shifting":
        return []
    records = run.records
    spans = phase_spans(opts.phase_s)
    phases = []
    for i, (name, start, end) in enumerate(spans):
        mine = [(rec, out) for rec, out, req in zip(records, run.outputs, run.workload, strict=True)
                if req.kind == name]
        ok = [rec for rec, _ in mine if rec.success]
        ttft = [r.ttft_s * 1e3 for r in ok]
        tpot = [t * 1e3 for r in ok if (t := r.tpot_s) is not None]
        good = sum(opts.goodput.met(r) for r in ok) if opts.goodput.limits_ms else None
        failed = sum(out.state == "failed" for _, out in mine)
        last = i == len(spans) - 1  # the last phase's switches run to the end of the run
        phases.append({
            "name": name, "start_s": start, "end_s": end, "sent": len(mine), "completed": len(ok),
            "failed": failed, "lost": len(mine) - len(ok) - failed,
            "request_goodput": good / (end - start) if good is not None else None,
            "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
            "tpot_ms": {"p50": percentile(tpot, 50), "p99": percentile(tpot, 99)},
            "roles_at_start": _counts(roles_at(run, start)),
            "switches": [c for c in run.role_changes
                         if start <= float(c["t_s"]) < end or (last and float(c["t_s"]) >= end)],  # type: ignore[arg-type]
        })
    return phases


def _counts(roles: dict[str, str]) -> str:
    """"1 prefill + 1 decode": the roles, counted, in a fixed order."""
    order = ("prefill", "decode", "colocated")
    values = list(roles.values())
    return " + ".join(f"{values.count(r)} {r}" for r in order if r in values) or "-"


def phase_lines(phases: list[dict[str, Any]]) -> list[str]:
    """One line per phase (and one per switch under it), for the text report."""
    if not phases:
        return []
    head = f"{'phase':<14} {'goodput':>8} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>16} {'fail':>5} {'lost':>5}"
    lines = [f"{'Per phase (shifting workload)':-^50}", head + "  roles at its start"]
    for p in phases:
        goodput = "-" if p["request_goodput"] is None else f"{p['request_goodput']:.2f}"
        ttft = f"{p['ttft_ms']['p50']:.0f}/{p['ttft_ms']['p99']:.0f}"
        tpot = f"{p['tpot_ms']['p50']:.1f}/{p['tpot_ms']['p99']:.1f}"
        lines.append(f"{p['name']:<14} {goodput:>8} {ttft:>17} {tpot:>16} {p['failed']:>5} {p['lost']:>5}  "
                     f"{p['roles_at_start']}")
        for c in p["switches"]:
            done = (f"{c['requests_moved']} moved, {c['seconds']:.2f} s, pause {c['longest_pause_s'] * 1e3:.0f} ms"
                    if c["ok"] else f"failed: {str(c['error'])[:60]}")
            lines.append(f"  at {c['t_s']:.1f} s: {c['address']} {c['from']} → {c['to']} ({done})")
    return lines
