"""Prefix-cache figures of one run: the `cache` object of the result JSON's `disagg` section, its
lines in the text block and its rows in the disagg-vs-colocated comparison.

Read from each answered request's `kv` figures, where a missing key counts as 0 (caching off, or
a worker that does not report it):
- `prefix_cached_tokens`: prompt tokens the prefilling worker found in its prefix cache and did
  not compute; prefix hit rate = their sum / the sum of prompt tokens;
- `decode_cached_tokens`: prompt tokens the decode worker already held, so they did not cross the
  wire; KV tokens sent = prompt tokens − those, over the requests whose KV crossed the wire
  (`wire_bytes` > 0), and 0 for the others (colocated, or prefilled on the decode worker);
- `wire_bytes`: KV bytes on the wire.
A multi-turn run adds the same figures for first turns and for later turns, whose new tokens (what
the previous turn's prompt did not hold: its answer and the new message) show how close the wire
comes to carrying only those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagg_cli import ui
from disagg_cli.bench.metrics import percentile

if TYPE_CHECKING:
    from disagg_cli.bench.runs import RunResult, TimedOutput
    from disagg_cli.bench.workload import BenchRequest

CACHE_WORKLOADS = ("multi-turn", "prefix")  # runs that always show the section


def cache_json(run: RunResult) -> dict[str, Any]:
    """The run's cache figures over its answered requests (see the module docstring)."""
    pairs = list(zip(run.outputs, run.workload, strict=True))
    done = [(o, r) for o, r in pairs if o.state == "done"]
    out = _figures(done)
    if any(r.follows is not None for r in run.workload):
        later = [(o, r) for o, r in done if r.follows is not None]
        new = sum(len(o.prompt_token_ids) - len(run.outputs[r.follows].prompt_token_ids)
                  for o, r in later if r.follows is not None)
        sent = _figures(later)["kv_tokens_sent"]
        out["first_turns"] = _figures([(o, r) for o, r in done if r.follows is None])
        out["later_turns"] = _figures(later) | {"new_tokens": new, "kv_sent_per_new_token": sent / new if new else None}
    return out


def _figures(pairs: list[tuple[TimedOutput, BenchRequest]]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o, _ in pairs)
    prefix = sum(o.kv.get("prefix_cached_tokens", 0.0) for o, _ in pairs)
    decode = sum(o.kv.get("decode_cached_tokens", 0.0) for o, _ in pairs)
    sent = sum(len(o.prompt_token_ids) - o.kv.get("decode_cached_tokens", 0.0)
               for o, _ in pairs if o.kv.get("wire_bytes", 0.0) > 0)
    ttft = [rec.ttft_s * 1e3 for o, _ in pairs if (rec := o.record()).success]
    return {
        "requests": len(pairs),
        "prompt_tokens": prompt,
        "prefix_cached_tokens": prefix,
        "prefix_hit_rate": prefix / prompt if prompt else None,
        "decode_cached_tokens": decode,
        "decode_hit_rate": decode / prompt if prompt else None,
        "kv_tokens_sent": sent,
        "kv_sent_per_prompt_token": sent / prompt if prompt else None,
        "wire_bytes": sum(o.kv.get("wire_bytes", 0.0) for o, _ in pairs),
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
    }


def shows_cache(d: dict[str, Any]) -> bool:
    """Whether a run's report has a cache section: a cache workload, or any cache hit at all."""
    c = d["cache"]
    return d["workload"] in CACHE_WORKLOADS or bool(c["prefix_cached_tokens"] or c["decode_cached_tokens"])


def cache_lines(d: dict[str, Any]) -> list[str]:
    """The text block's "Prefix cache" section for one run's `disagg` object."""
    c = d["cache"]
    lines = [f"{'Prefix cache':-^50}"]

    for title, group in [("", c), ("Turns after the first", c.get("later_turns"))]:
        if group is None:
            continue
        if title:
            lines.append(f"{title:-^50}")
        sent = _ratio(group["kv_sent_per_prompt_token"])
        lines += [f"{'Prompt tokens (answered):':<40} {group['prompt_tokens']:<10}",
                  f"{'Prefix cache hits (tokens):':<40} {group['prefix_cached_tokens']:<10.0f}",
                  f"{'Prefix hit rate (%):':<40} {_percent(group['prefix_hit_rate']):<10}",
                  f"{'Decode cache hits (tokens):':<40} {group['decode_cached_tokens']:<10.0f}",
                  f"{'KV tokens sent / prompt tokens:':<40} {sent:<10}",
                  f"{'KV wire bytes:':<40} {ui.human_bytes(group['wire_bytes']):<10}"]
    if "later_turns" in c:
        later = c["later_turns"]
        lines += [f"{'New tokens (answer + message):':<40} {later['new_tokens']:<10}",
                  f"{'KV tokens sent / new tokens:':<40} {_ratio(later['kv_sent_per_new_token']):<10}",
                  f"{'TTFT p50, turn 1 / later turns (ms):':<40} "
                  f"{c['first_turns']['ttft_ms']['p50']:.2f} / {later['ttft_ms']['p50']:.2f}"]
    return lines


def cache_rows(dis: dict[str, Any], col: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """The comparison's cache rows, (label, disagg, colocated), for two runs' `disagg` objects."""
    if not (shows_cache(dis) or shows_cache(col)):
        return []
    a, b = dis["cache"], col["cache"]
    rows: list[tuple[str, float | None, float | None]] = [
        ("Prefix hit rate (%)", _pct(a["prefix_hit_rate"]), _pct(b["prefix_hit_rate"])),
        ("KV wire bytes (MB)", a["wire_bytes"] / 1e6, b["wire_bytes"] / 1e6)]
    if "later_turns" in a and "later_turns" in b:
        la, lb = a["later_turns"], b["later_turns"]
        rows += [("Later turns prefix hit rate (%)", _pct(la["prefix_hit_rate"]), _pct(lb["prefix_hit_rate"])),
                 ("Later turns KV sent / prompt tok", la["kv_sent_per_prompt_token"], lb["kv_sent_per_prompt_token"]),
                 ("Turn 1 TTFT p50 (ms)", a["first_turns"]["ttft_ms"]["p50"], b["first_turns"]["ttft_ms"]["p50"]),
                 ("Later turns TTFT p50 (ms)", la["ttft_ms"]["p50"], lb["ttft_ms"]["p50"])]
    return rows


def _pct(x: float | None) -> float | None:
    return None if x is None else x * 100


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
