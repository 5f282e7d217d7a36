"""Worker-reported `RequestStats` land in a request's output under the key names users see
(`--json`, bench reports, the HTTP server, metrics): these exact dicts, in this order."""

from __future__ import annotations

import dataclasses
import json

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.request_stats import KV_STATS, STAGE_STATS, copy_stats
from disagg_cli.engine.request import RequestOutput
from disagg_cli.model.tokenizer import Tokenizer
from disagg_cli.protocol import RequestStats

PREFILL = RequestStats(queue_ms=1.5, prefill_ms=20.0, batch_size=2, prefix_cached_tokens=16)
KV = RequestStats(kv_encode_ms=0.5, raw_bytes=4096, wire_bytes=2048, kv_stream_ms=6.0, kv_exposed_send_ms=1.0)
DECODE = dataclasses.replace(KV, kv_transfer_ms=7.0, kv_decode_ms=0.25, reserve_to_kv_done_ms=30.0,
                             decode_cached_tokens=0, handoff_ms=2.0)


def _out(tokenizer: Tokenizer, *stats: RequestStats | None) -> RequestOutput:
    out = RequestOutput("r", "", [1, 2, 3], SamplingParams(max_tokens=2), tokenizer)
    for s in stats:
        copy_stats(out, s)
    return out


def test_a_disaggregated_request_maps_to_the_same_keys_as_before(default_tokenizer: Tokenizer) -> None:
    out = _out(default_tokenizer, PREFILL, DECODE)  # FirstToken, then the first Tokens
    assert list(out.timings.stages_ms.items()) == [
        ("queue_ms", 1.5), ("prefill_ms", 20.0), ("kv_encode_ms", 0.5), ("kv_stream_ms", 6.0),
        ("kv_exposed_send_ms", 1.0), ("kv_transfer_ms", 7.0), ("kv_decode_ms", 0.25),
        ("reserve_to_kv_done_ms", 30.0), ("handoff_ms", 2.0),
    ]
    assert list(out.kv.items()) == [
        ("batch_size", 2.0), ("prefix_cached_tokens", 16.0), ("kv_encode_ms", 0.5), ("raw_bytes", 4096.0),
        ("wire_bytes", 2048.0), ("kv_stream_ms", 6.0), ("kv_exposed_send_ms", 1.0), ("kv_transfer_ms", 7.0),
        ("kv_decode_ms", 0.25), ("decode_cached_tokens", 0.0), ("transfer_ms", 7.0), ("hidden_ms", 5.0),
    ]
    # counts travel as ints but come out as the floats they always were (`2.0` in --json, not `2`)
    assert json.dumps(out.kv).startswith('{"batch_size": 2.0, "prefix_cached_tokens": 16.0, ')


def test_prompts_computed_on_the_decode_worker_or_colocated(default_tokenizer: Tokenizer) -> None:
    here = _out(default_tokenizer, RequestStats(queue_ms=0.0, prefill_ms=3.0, prefix_cached_tokens=4,
                                                decode_cached_tokens=4), None)
    assert here.timings.stages_ms == {"queue_ms": 0.0, "prefill_ms": 3.0}
    assert here.kv == {"prefix_cached_tokens": 4.0, "decode_cached_tokens": 4.0}
    colocated = _out(default_tokenizer, RequestStats(queue_ms=0.5, prefill_ms=2.0), None)
    assert colocated.timings.stages_ms == {"queue_ms": 0.5, "prefill_ms": 2.0} and colocated.kv == {}
    assert _out(default_tokenizer, RequestStats(), None).kv == {}


def test_hidden_time_never_exceeds_the_transfer(default_tokenizer: Tokenizer) -> None:
    out = _out(default_tokenizer, dataclasses.replace(DECODE, kv_transfer_ms=3.0, kv_exposed_send_ms=0.0))
    assert out.kv["transfer_ms"] == 3.0 and out.kv["hidden_ms"] == 3.0
    no_stream = _out(default_tokenizer, RequestStats(kv_transfer_ms=3.0))
    assert no_stream.kv == {"kv_transfer_ms": 3.0, "transfer_ms": 3.0}


def test_every_figure_lands_somewhere() -> None:
    names = {f.name for f in dataclasses.fields(RequestStats)}
    assert names == STAGE_STATS | KV_STATS
    assert not any(n.endswith("_unix_s") for n in names)  # another machine's clock never travels
    assert {n for n in names if n.endswith("_ms")} == STAGE_STATS
