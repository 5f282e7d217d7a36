"""Serving-benchmark arithmetic with vLLM's definitions (`vllm bench serve`), pure: no clock, no I/O.

One `RequestRecord` per benchmark request (times in seconds, measured from the moment the request
was sent). `compute_metrics` turns a run's records and its duration into vLLM's flat result keys:
- TTFT: first token time − send time;
- TPOT per request: (E2EL − TTFT) / (output tokens − 1), only for requests with more than one token;
- ITL: every gap between consecutive tokens of every request, pooled;
- E2EL: last token (end) time − send time;
- throughputs over the benchmark's duration; goodput = requests meeting every SLO / duration.
Percentiles interpolate linearly between closest ranks (numpy's default); std is the population one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from disagg_cli import stats

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
METRIC_HEADERS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                  "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one request measured; `itl_s` are the gaps between its consecutive tokens."""

    success: bool
    prompt_len: int
    output_len: int  # tokens actually produced (0 for a failed request)
    ttft_s: float = 0.0
    latency_s: float = 0.0  # E2EL
    itl_s: tuple[float, ...] = ()
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_len < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_len - 1)


@dataclass(frozen=True, slots=True)
class Slo:
    """Goodput service-level objectives in ms (vLLM's `--goodput ttft:MS tpot:MS e2el:MS`)."""

    limits_ms: dict[str, float] = field(default_factory=dict)

    def met(self, r: RequestRecord) -> bool:
        """vLLM counts a request as good when every given metric is at most its SLO; a request with
        a single token has TPOT 0 there."""
        if not r.success:
            return False
        values = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2el": r.latency_s}
        return all(values[k] * 1e3 <= limit for k, limit in self.limits_ms.items())


def parse_goodput(items: Sequence[str]) -> Slo:
    """`["ttft:500", "tpot:50"]` (or one string "ttft:500 tpot:50") → Slo; ValueError says what is wrong."""
    limits: dict[str, float] = {}
    for item in (part for text in items for part in text.replace(",", " ").split()):
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput takes NAME:MS with NAME one of {', '.join(GOODPUT_METRICS)}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {name}: {value!r} is not a number of milliseconds") from None
        if not ms >= 0:
            raise ValueError(f"--goodput {name} must be >= 0 ms, got {value}")
        limits[name] = ms
    return Slo(limits)


def percentile(values: Sequence[float], q: float) -> float:
    """`stats.percentile`, but 0 for no values, as vLLM's `np.percentile(xs or 0, q)`."""
    value = stats.percentile(values, q)
    return 0.0 if value is None else value


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def std(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((x - m) ** 2 for x in values) / len(values))


def percentile_key(p: float) -> str:
    """vLLM's spelling: 99 → "p99", 99.9 → "p99.9"."""
    return f"p{int(p)}" if int(p) == p else f"p{p}"


def metric_values_s(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    ok = [r for r in records if r.success]
    return {"ttft": [r.ttft_s for r in ok],
            "tpot": [t for r in ok if (t := r.tpot_s) is not None],
            "itl": [gap for r in ok for gap in r.itl_s],
            "e2el": [r.latency_s for r in ok]}


def compute_metrics(records: Sequence[RequestRecord], duration_s: float,
                    selected: Sequence[str] = ("ttft", "tpot", "itl"),
                    percentiles: Sequence[float] = (99,), slo: Slo | None = None) -> dict[str, Any]:
    """vLLM's flat result keys for a run of `duration_s` seconds."""
    assert duration_s > 0, "a benchmark takes time"
    completed = sum(r.success for r in records)
    total_input = sum(r.prompt_len for r in records if r.success)
    output_lens = [r.output_len if r.success else 0 for r in records]
    good = sum(slo.met(r) for r in records) if slo is not None and slo.limits_ms else None
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": completed,
        "total_input_tokens": total_input,
        "total_output_tokens": sum(output_lens),
        "request_throughput": completed / duration_s,
        "request_goodput": good / duration_s if good is not None else None,
        "output_throughput": sum(output_lens) / duration_s,
        "total_token_throughput": (total_input + sum(output_lens)) / duration_s,
        "input_lens": [r.prompt_len for r in records],
        "output_lens": output_lens,
        "ttfts": [r.ttft_s for r in records],
        "itls": [list(r.itl_s) for r in records],
        "errors": [r.error for r in records],
    }
    values = metric_values_s(records)
    for name in selected:
        xs = values[name]
        out[f"mean_{name}_ms"] = mean(xs) * 1e3
        out[f"median_{name}_ms"] = percentile(xs, 50) * 1e3
        out[f"std_{name}_ms"] = std(xs) * 1e3
        for p in percentiles:
            out[f"{percentile_key(p)}_{name}_ms"] = percentile(xs, p) * 1e3
    return out


def slo_attainment(records: Sequence[RequestRecord], slo: Slo) -> float:
    """Share of all requests (failed ones count as missing) that meet every SLO (DistServe)."""
    return sum(slo.met(r) for r in records) / len(records) if records else 0.0


def max_rate_meeting(attainment_by_rate: dict[float, float], target: float = 0.9) -> float | None:
    """The highest rate whose attainment is at least `target`; None when none is."""
    ok = [rate for rate, att in attainment_by_rate.items() if att >= target]
    return max(ok) if ok else None
