"""`WorkerStats` and `WorkerCapacity` on the wire: typed both ways, a missing or mistyped figure refused
with the field named (before, a typo in a stats map read as 0)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from disagg_cli.protocol import (
    PROTOCOL_VERSION,
    Heartbeat,
    Hello,
    HelloAck,
    KVLayout,
    WireError,
    WorkerCapacity,
    WorkerStats,
    decode_message,
    encode_message,
)

LAYOUT = KVLayout(2, 1, 4, "float32", 16)
CAPACITY = WorkerCapacity(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=256,
                          chunked_prefill=True, prefix_caching=False, threads=2)
STATS = WorkerStats(waiting=1, running=3, free_blocks=10, num_blocks=64, reserved_blocks=2, used_blocks=52,
                    time_unix_s=1.7e9, cached_blocks=4, prefix_queried_tokens=100, prefix_hit_tokens=40,
                    prefix_evicted_blocks=1, prefill_tokens_per_s=250.5, decode_step_ms=31.0, threads=2,
                    greeted_peers=3)
DECODE_STATS = dataclasses.replace(STATS, queued_reservations=5, incoming=1)


def roundtrip(msg: Any) -> Any:
    return decode_message(encode_message(msg))


def header(msg: Any) -> dict[str, Any]:
    (frame,) = encode_message(msg)
    head = msgpack.unpackb(frame)
    assert isinstance(head, dict)
    return head


def refused(head: dict[str, Any]) -> str:
    with pytest.raises(WireError) as err:
        decode_message([msgpack.packb(head)])
    assert err.value.reason == "bad-field", str(err.value)
    return str(err.value)


@pytest.mark.parametrize("stats", [STATS, DECODE_STATS, None])
def test_heartbeat_stats_round_trip_typed(stats: WorkerStats | None) -> None:
    got = roundtrip(Heartbeat(9, stats))
    assert got == Heartbeat(9, stats) and type(got.stats) is type(stats)


def test_capacity_round_trips_typed_in_hello_and_ack() -> None:
    hello = roundtrip(Hello(PROTOCOL_VERSION, "decode", "fp", LAYOUT, CAPACITY))
    ack = roundtrip(HelloAck("decode", "fp", LAYOUT, CAPACITY, instance_id="ab"))
    assert hello.capacity == ack.capacity == CAPACITY and type(ack.capacity) is WorkerCapacity
    assert roundtrip(Hello(PROTOCOL_VERSION, "coordinator", "")).capacity is None


def test_stats_travel_as_a_map_of_their_fields() -> None:
    assert header(Heartbeat(1, STATS))["stats"] == {**STATS.as_dict(), "queued_reservations": None,
                                                    "incoming": None, "role": "", "switching_to": ""}
    assert header(Heartbeat(1))["stats"] is None


def test_as_dict_names_every_reported_figure() -> None:
    assert STATS.as_dict()["prefill_tokens_per_s"] == 250.5
    assert "queued_reservations" not in STATS.as_dict()  # not a decode worker's
    assert DECODE_STATS.as_dict()["queued_reservations"] == 5 and len(DECODE_STATS.as_dict()) == 17
    assert CAPACITY.as_dict() == {"num_blocks": 64, "block_size": 16, "max_num_seqs": 8,
                                  "max_num_batched_tokens": 256, "chunked_prefill": 1, "prefix_caching": 0,
                                  "threads": 2, "max_step_ms": 0.0}


def test_a_missing_figure_is_refused_naming_it() -> None:
    head = header(Heartbeat(1, STATS))
    del head["stats"]["decode_step_ms"]
    assert "missing field 'decode_step_ms'" in refused(head)


def test_a_misspelt_figure_is_refused_not_read_as_zero() -> None:
    head = header(Heartbeat(1, STATS))
    head["stats"]["prefill_tokens_per_sec"] = head["stats"].pop("prefill_tokens_per_s")
    assert "unknown fields ['prefill_tokens_per_sec']" in refused(head)


@pytest.mark.parametrize(("field", "value"), [("free_blocks", 1.5), ("waiting", "3"), ("running", True),
                                              ("decode_step_ms", None), ("incoming", 0.5)])
def test_a_mistyped_figure_is_refused_naming_it(field: str, value: Any) -> None:
    head = header(Heartbeat(1, STATS))
    head["stats"][field] = value
    assert f"stats.{field}" in refused(head)


def test_capacity_fields_are_checked_too() -> None:
    head = header(HelloAck("decode", "fp", LAYOUT, CAPACITY))
    head["capacity"]["prefix_caching"] = 1  # a bool, not a number
    assert "capacity.prefix_caching" in refused(head)
    head = header(HelloAck("decode", "fp", LAYOUT, CAPACITY))
    del head["capacity"]["num_blocks"]
    assert "missing field 'num_blocks'" in refused(head)
    head = header(HelloAck("decode", "fp", LAYOUT, CAPACITY))
    head["capacity"] = {"num_blocks": 64}  # a map of the old shape
    assert "capacity" in refused(head)
