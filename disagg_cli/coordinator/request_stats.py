"""Where the figures a worker reports for a request (`RequestStats`) land in its `RequestOutput`.

Each under its own name: durations in `timings.stages_ms`; counts and bytes in `kv`, and the KV
durations in both; plus the derived `transfer_ms` and `hidden_ms` of the KV's crossing.
"""

from __future__ import annotations

from dataclasses import fields

from disagg_cli.engine.request import RequestOutput
from disagg_cli.protocol.stats import RequestStats

# Where each figure of `RequestStats` lands in a request's output, under its own name: durations in
# `timings.stages_ms`; counts and bytes in `kv`, and the KV durations in both.
STAGE_STATS = frozenset({
    "queue_ms", "prefill_ms", "kv_encode_ms", "kv_stream_ms", "kv_exposed_send_ms", "kv_transfer_ms",
    "kv_decode_ms", "reserve_to_kv_done_ms", "handoff_ms",
})
KV_STATS = frozenset({
    "batch_size", "prefix_cached_tokens", "raw_bytes", "wire_bytes", "decode_cached_tokens", "kv_encode_ms",
    "kv_stream_ms", "kv_exposed_send_ms", "kv_transfer_ms", "kv_decode_ms",
})
assert {f.name for f in fields(RequestStats)} == STAGE_STATS | KV_STATS, "a figure that lands nowhere"


def copy_stats(out: RequestOutput, stats: RequestStats | None) -> None:
    """Worker-reported figures into `stages_ms` and `kv` (see `STAGE_STATS`, `KV_STATS`)."""
    if stats is None:
        return
    for name, value in stats.items():
        if name in STAGE_STATS:
            out.timings.stages_ms[name] = value
        if name in KV_STATS:
            out.kv[name] = value
    # Each worker measures on its own clock only. The decode side saw the layers land over
    # `kv_transfer_ms`; the prefill side streamed them over `kv_stream_ms`, of which
    # `kv_exposed_send_ms` came after its forward pass ended: the rest was hidden behind compute.
    if stats.kv_transfer_ms is not None:
        out.kv["transfer_ms"] = float(stats.kv_transfer_ms)
        if stats.kv_stream_ms is not None and stats.kv_exposed_send_ms is not None:
            out.kv["hidden_ms"] = min(float(stats.kv_transfer_ms),
                                      max(0.0, float(stats.kv_stream_ms) - float(stats.kv_exposed_send_ms)))
