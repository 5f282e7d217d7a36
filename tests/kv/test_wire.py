"""Wire messages: every kind round-trips; anything malformed raises WireError, and only that."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_cli.kv.registry import get_codec
from disagg_cli.kv.transfer import assemble_request_kv, decode_kv_layers, encode_request_kv
from disagg_cli.protocol import (
    PROTOCOL_VERSION,
    Error,
    FirstToken,
    Heartbeat,
    Hello,
    HelloAck,
    KVDone,
    KVLayers,
    KVLayout,
    LinkAck,
    Message,
    Refuse,
    RequestStats,
    Tokens,
    WireError,
    WorkerCapacity,
    WorkerStats,
    decode_message,
    encode_message,
)

FP = "sha256:0123abcd"
PREFILL_STATS = RequestStats(queue_ms=1.5, prefill_ms=20.25, batch_size=3, prefix_cached_tokens=16)
KV_STATS = RequestStats(kv_encode_ms=0.5, raw_bytes=4096, wire_bytes=2048, kv_stream_ms=6.0, kv_exposed_send_ms=1.0)
DECODE_STATS = dataclasses.replace(KV_STATS, kv_transfer_ms=7.0, kv_decode_ms=0.25, reserve_to_kv_done_ms=30.0,
                                   decode_cached_tokens=0, handoff_ms=2.0)
LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_size=16)


def on_the_wire(frames: list[Any]) -> list[bytes]:
    """What a receiver gets: fresh bytes, not the sender's buffers."""
    return [bytes(memoryview(f).cast("B")) for f in frames]


def kv_layers_msg(request_id: str = "req-1", codec: str = "shuffle-lz4") -> KVLayers:
    gen = torch.Generator().manual_seed(0)
    k = [torch.randn(5, 2, 16, generator=gen).bfloat16() for _ in range(3)]
    v = [torch.randn(5, 2, 16, generator=gen).bfloat16() for _ in range(3)]
    return next(encode_request_kv(get_codec(codec), request_id, FP, k, v, layers_per_message=3))


MESSAGES: list[Message] = [
    Hello(PROTOCOL_VERSION, "prefill", FP, LAYOUT, WorkerCapacity(128, 16, 8, 512, True, True, 2)),
    Hello(PROTOCOL_VERSION, "decode", FP, LAYOUT),
    HelloAck("decode", FP, LAYOUT, WorkerCapacity(64, 16, 32, 256, False, True, 1)),
    Refuse("fingerprint-mismatch", "prefill serves sha256:aa, decode serves sha256:bb"),
    Error("req-7", "timeout", "no KV within 30 s"),
    Error(None, "shutting-down", "worker is draining"),
    Heartbeat(41),
    Heartbeat(42, WorkerStats(0, 3, 10, 64, 2, 52, 1.7e9, 4, 100, 40, 1, 250.5, 31.0, 2, 3)),
    Heartbeat(43, WorkerStats(1, 3, 10, 64, 2, 52, 1.7e9, 4, 100, 40, 1, 250.5, 31.0, 2, 3, 5, 1)),
    LinkAck(7, 0.25),
    FirstToken("req-2", 17, PREFILL_STATS),
    FirstToken("req-3", 18),
    KVDone("req-2", 17, 9, 3, b"rng-state", KV_STATS),
    Tokens("req-2", (5, 6), None, DECODE_STATS),
    Tokens("req-2", (7,), "length"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.kind)
def test_every_kind_round_trips(msg: Message) -> None:
    frames = encode_message(msg)
    assert len(frames) == 1
    assert decode_message(on_the_wire(frames)) == msg


@pytest.mark.parametrize("codec", ["none", "auto", "int8"])
def test_kv_layers_round_trip_with_payloads(codec: str) -> None:
    msg = kv_layers_msg(codec=codec)
    frames = encode_message(msg)
    assert len(frames) == 1 + len(msg.payloads)
    got = decode_message(on_the_wire(frames), model_fingerprint=FP)
    assert isinstance(got, KVLayers) and got == msg
    assert [bytes(p) for p in got.payloads] == on_the_wire(list(msg.payloads))
    k, v = decode_kv_layers(got)
    k0, v0 = decode_kv_layers(msg)
    assert torch.equal(k.view(torch.uint8), k0.view(torch.uint8)) and k.shape == (3, 5, 2, 16)
    assert torch.equal(v.view(torch.uint8), v0.view(torch.uint8))


@pytest.mark.parametrize("layers_per_message", [1, 2, 4])
def test_a_request_split_into_layer_groups_reassembles_bit_exactly(layers_per_message: int) -> None:
    gen = torch.Generator().manual_seed(1)
    k = [torch.randn(9, 2, 8, generator=gen).half() for _ in range(4)]
    v = [torch.randn(9, 2, 8, generator=gen).half() for _ in range(4)]
    msgs = list(encode_request_kv(get_codec("lz4"), "r", FP, k, v, layers_per_message=layers_per_message))
    assert len(msgs) == -(-4 // layers_per_message)
    received = [decode_message(on_the_wire(encode_message(m))) for m in reversed(msgs)]  # any order
    k2, v2 = assemble_request_kv(received, num_layers=4)  # type: ignore[arg-type]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(k + v, k2 + v2, strict=True))


def test_missing_or_repeated_layers_are_refused() -> None:
    k = [torch.randn(3, 1, 8) for _ in range(3)]
    msgs = list(encode_request_kv(get_codec("none"), "r9", FP, k, k))
    with pytest.raises(WireError, match="r9") as err:
        assemble_request_kv(msgs[:2], num_layers=3)
    assert err.value.reason == "truncated"
    with pytest.raises(WireError) as err:
        assemble_request_kv([msgs[0], *msgs], num_layers=3)
    assert err.value.reason == "bad-field"


def header_of(msg: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode_message(msg)[0], raw=False)


def refused(frames: list[Any], reason: str, **limits: Any) -> WireError:
    with pytest.raises(WireError) as err:
        decode_message(frames, **limits)
    assert err.value.reason == reason, str(err.value)
    return err.value


def test_wrong_version_unknown_kind_and_missing_field_are_refused() -> None:
    hb = header_of(Heartbeat(1))
    refused([msgpack.packb({**hb, "v": PROTOCOL_VERSION + 1})], "bad-version")
    refused([msgpack.packb({**hb, "v": True})], "bad-version")
    refused([msgpack.packb({**hb, "kind": "teleport"})], "unknown-kind")
    refused([msgpack.packb({k: v for k, v in hb.items() if k != "seq"})], "bad-field")
    refused([msgpack.packb({**hb, "seq": "1"})], "bad-field")
    refused([msgpack.packb({**hb, "seq": True})], "bad-field")
    refused([msgpack.packb({**hb, "colour": "red"})], "bad-field")
    refused([msgpack.packb(hb), b"unexpected payload"], "bad-field")
    refused([msgpack.packb([1, 2])], "bad-msgpack")
    refused([msgpack.packb(hb) + b"\x00"], "bad-msgpack")
    refused([], "truncated")


def test_request_stats_round_trip_typed_and_malformed_ones_are_refused() -> None:
    sent = [FirstToken("r", 1, PREFILL_STATS), KVDone("r", 1, 9, 3, None, KV_STATS),
            Tokens("r", (2,), None, DECODE_STATS)]
    for msg in sent:
        got = decode_message(on_the_wire(encode_message(msg)))
        assert got == msg and type(got.stats) is RequestStats
    header = header_of(FirstToken("r", 1, PREFILL_STATS))
    assert header["stats"]["batch_size"] == 3 and header["stats"]["raw_bytes"] is None
    for stats in ("fast", [1.0], 3.0, {"queue_ms": "1"}, {"queue_ms": True}, {"batch_size": 1.5},
                  {"prefix_cached_tokens": "16"}, {"colour": 1.0}, {"start_unix_s": 1.7e9}):
        err = refused([msgpack.packb({**header, "stats": stats})], "bad-field")
        assert err.request_id == "r" and "stats" in str(err)
    tokens = header_of(Tokens("r", (2,), None, DECODE_STATS))
    refused([msgpack.packb({**tokens, "stats": {"handoff_ms": "soon"}})], "bad-field")
    assert decode_message([msgpack.packb({**tokens, "stats": None})]) == Tokens("r", (2,))
    # a partial map is a stats object with the rest unmeasured
    got = decode_message([msgpack.packb({**header, "stats": {"queue_ms": 2}})])
    assert isinstance(got, FirstToken) and got.stats == RequestStats(queue_ms=2)


def test_errors_name_the_request() -> None:
    header = header_of(kv_layers_msg("req-42"))
    err = refused([msgpack.packb({**header, "v": 99})], "bad-version")
    assert err.request_id == "req-42" and "req-42" in str(err)


def test_size_limits() -> None:
    msg = kv_layers_msg()
    frames = on_the_wire(encode_message(msg))
    refused([b"\x80" + b" " * 100], "oversized", max_header_bytes=64)
    refused(frames, "oversized", max_header_bytes=len(frames[0]) - 1)
    refused(frames, "oversized", max_frame_bytes=max(len(f) for f in frames[1:]) - 1)
    refused(frames, "oversized", max_frames=len(frames) - 2)
    refused(frames, "oversized", max_raw_bytes=msg.kv.raw_bytes - 1)
    refused([frames[0], *frames[1:-1]], "truncated")
    refused([*frames[:-1], frames[-1][:-1]], "truncated")
    refused([*frames, b"extra"], "oversized")
    assert decode_message(frames, max_raw_bytes=msg.kv.raw_bytes) == msg


def test_inconsistent_kv_header_is_refused() -> None:
    header = header_of(kv_layers_msg())
    frames = on_the_wire(encode_message(kv_layers_msg()))[1:]
    kv_change: dict[str, Any]
    for kv_change in (
        {"raw_bytes": 1},
        {"shape": [3, 5, 2, -16]},
        {"dtype": "int64"},
        {"wire_bytes": 3},
        {"shape": [3, 5, 2]},
        {"checksum": 2**40},
        {"frame_bytes": []},
    ):
        refused([msgpack.packb({**header, "kv": {**header["kv"], **kv_change}}), *frames], "bad-field")
    refused([msgpack.packb({**header, "layer_end": 2}), *frames], "bad-field")
    refused([msgpack.packb({**header, "num_tokens": 4}), *frames], "bad-field")


def test_fingerprint_mismatch_names_both_models() -> None:
    frames = on_the_wire(encode_message(kv_layers_msg()))
    err = refused(frames, "fingerprint-mismatch", model_fingerprint="sha256:other")
    assert FP in str(err) and "sha256:other" in str(err)
    refused(encode_message(MESSAGES[0]), "fingerprint-mismatch", model_fingerprint="sha256:other")


def test_a_corrupted_kv_payload_is_caught_after_decode() -> None:
    frames = on_the_wire(encode_message(kv_layers_msg("req-5", codec="none")))
    frames[1] = bytes([frames[1][0] ^ 1]) + frames[1][1:]
    msg = decode_message(frames)  # sizes fine: the header cannot tell
    with pytest.raises(WireError, match="req-5") as err:
        decode_kv_layers(msg)  # type: ignore[arg-type]
    assert err.value.reason == "bad-checksum"


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=200), max_size=4))
def test_random_bytes_only_ever_raise_wire_error(frames: list[bytes]) -> None:
    with contextlib.suppress(WireError):
        decode_message(frames)


@settings(max_examples=300, deadline=None)
@given(value=msgpack_values, base=st.sampled_from([*MESSAGES, kv_layers_msg()]), data=st.data())
def test_random_msgpack_only_ever_raises_wire_error(value: Any, base: Message, data: st.DataObject) -> None:
    """Random headers, and real headers with one field (possibly nested) replaced at random."""
    header = header_of(base)
    key = data.draw(st.sampled_from(sorted(header)))
    if key == "kv" and data.draw(st.booleans()):
        header["kv"][data.draw(st.sampled_from(sorted(header["kv"])))] = value
    else:
        header[key] = value
    payloads = on_the_wire(list(getattr(base, "payloads", ())))
    for frames in ([msgpack.packb(value), *payloads], [msgpack.packb(header), *payloads]):
        try:
            msg = decode_message(frames)
        except WireError:
            continue
        if isinstance(msg, KVLayers):  # a header that still parses must still decode or be refused
            with contextlib.suppress(WireError):
                decode_kv_layers(msg)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_flipped_bytes_in_a_real_kv_message_only_ever_raise_wire_error(data: st.DataObject) -> None:
    frames = [
        bytearray(f)
        for f in on_the_wire(
            encode_message(kv_layers_msg(codec=data.draw(st.sampled_from(["none", "shuffle-lz4", "int4"]))))
        )
    ]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(frames) - 1))
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i][j] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(WireError):
        msg = decode_message(frames)
        assert isinstance(msg, KVLayers)
        decode_kv_layers(msg)


def test_message_kinds_are_frozen_dataclasses() -> None:
    for msg in MESSAGES:
        assert dataclasses.is_dataclass(msg)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, dataclasses.fields(msg)[0].name, None)
