"""`--plot FILE.png`: TTFT and TPOT distributions per mode, and each mode's token-latency timeline
(every inter-token gap at the moment it ended), where a colocated prefill shows as a spike; for
`--workload shifting`, each phase shaded on the timeline and each role switch of the planner a
labelled line.

matplotlib is optional: imported here only, and its absence is one line, not a failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from disagg_cli import ui

if TYPE_CHECKING:
    from disagg_cli.bench.runs import RunResult

COLORS = {"disagg": "tab:blue", "colocated": "tab:orange"}
PHASE_COLORS = ("tab:purple", "tab:green", "tab:gray")  # shading of the shifting workload's phases


def plot_runs(runs: dict[str, RunResult], path: Path, phases: list[tuple[str, float, float]] | None = None) -> bool:
    """Draw the figure into `path`; False (after saying why) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        ui.print_error("install matplotlib for --plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(2 + len(runs), 1, figsize=(10, 4 + 3 * (2 + len(runs))), squeeze=False)
    for row in axes[3:]:  # one ITL scale for every mode's timeline, so they compare at a glance
        row[0].sharey(axes[2][0])
    ax_ttft, ax_tpot = axes[0][0], axes[1][0]
    for mode, run in runs.items():
        records = run.records
        ok = [r for r in records if r.success]
        ttft = sorted(r.ttft_s * 1e3 for r in ok)
        tpot = sorted(t * 1e3 for r in ok if (t := r.tpot_s) is not None)
        for ax, values in ((ax_ttft, ttft), (ax_tpot, tpot)):
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                        label=f"{mode} (n={len(values)})", color=COLORS.get(mode))
    for ax, name in ((ax_ttft, "TTFT"), (ax_tpot, "TPOT")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("share of requests ≤ x")
        ax.set_title(f"{name} distribution (CDF)")
        ax.grid(alpha=0.3)
        ax.legend()
    for row, (mode, run) in enumerate(runs.items(), start=2):
        ax = axes[row][0]
        phase_color = {name: PHASE_COLORS[i % len(PHASE_COLORS)] for i, (name, _, _) in enumerate(phases or ())}
        for name, start, end in phases or ():
            ax.axvspan(start, end, color=phase_color[name], alpha=0.08)
            ax.text(start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        for change in run.role_changes:
            t = float(change["t_s"])  # type: ignore[arg-type]
            ax.axvline(t, color="black" if change["ok"] else "gray", linestyle="--", linewidth=1)
            ax.text(t, 0.02, f" {str(change['address']).rsplit(':', 1)[-1]}: {change['from']}→{change['to']}"
                    + ("" if change["ok"] else " (failed)"), transform=ax.get_xaxis_transform(), rotation=90,
                    fontsize=7, va="bottom")
        for kind in dict.fromkeys(req.kind for req in run.workload):
            marker = "x" if kind == "long" else "."
            xs, ys = [], []
            for out, req in zip(run.outputs, run.workload, strict=True):
                if req.kind != kind:
                    continue
                times = out.token_times_s
                for a, b in zip(times, times[1:], strict=False):
                    xs.append(b - run.start_s)
                    ys.append((b - a) * 1e3)
            if xs:
                color = "tab:red" if kind == "long" else phase_color.get(kind, COLORS.get(mode))
                ax.scatter(xs, ys, s=6, marker=marker, label=f"{kind} requests' ITL", color=color)
        for out, req in zip(run.outputs, run.workload, strict=True):
            if req.kind == "long":
                ax.axvline(out.timings.arrival_s - run.start_s, color="tab:red", alpha=0.3, linewidth=1)
        ax.set_title(f"{mode}: inter-token latency over time (red lines: long prompts sent; dashed: role switches)")
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel("ITL (ms, log scale)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
