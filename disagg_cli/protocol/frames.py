"""The only code that turns messages into frames and back.

A message is multipart: frame 0 is a msgpack map ``{"v": PROTOCOL_VERSION, "kind": ..., fields}``,
further frames are payloads (KV bytes) passed through untouched, so a sender hands tensor memory
to zmq without copying. `decode_message` trusts nothing: it checks sizes before parsing, parses
with explicit msgpack limits, checks version, kind, every field's type and every declared frame
length, and raises `WireError` (never anything else) with a short `reason`.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack

from disagg_cli.errors import DisaggError
from disagg_cli.protocol.errors import WireError, bad_field
from disagg_cli.protocol.messages import _KINDS, PROTOCOL_VERSION, Frame, KVMeta, Message
from disagg_cli.protocol.schema import SchemaError, from_wire, has_frames, to_wire

# Defaults sized for KV of small and medium models; a receiver may pass tighter ones.
MAX_HEADER_BYTES = 1024 * 1024  # room for a prompt's token ids
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_RAW_BYTES = 1024 * 1024 * 1024
MAX_FRAMES = 64
_MAX_ARRAY_LEN = 1 << 17
_MAX_MAP_LEN = 256


def encode_message(msg: Message) -> list[Frame]:
    """Frames for `msg`: the msgpack header, then its payloads as given (not copied)."""
    header = {"v": PROTOCOL_VERSION, "kind": msg.kind, **to_wire(msg)}
    frames: list[Frame] = [msgpack.packb(header, use_bin_type=True)]
    frames.extend(getattr(msg, "payloads", ()))
    return frames


def decode_message(
    frames: Sequence[Frame],
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    max_frames: int = MAX_FRAMES,
    max_raw_bytes: int = MAX_RAW_BYTES,
    model_fingerprint: str | None = None,
) -> Message:
    """Parse and check `frames` (as from `recv_multipart`); raise `WireError` on anything wrong.

    `max_raw_bytes` bounds what a KV message may make the receiver allocate when decoded;
    `model_fingerprint`, when given, must equal the fingerprint of messages that carry one.
    """
    if not frames:
        raise WireError("truncated", "empty message (no header frame)")
    if len(frames) > 1 + max_frames:
        raise WireError("oversized", f"{len(frames) - 1} payload frames, limit {max_frames}")
    try:
        views = [memoryview(f) for f in frames]
    except TypeError as e:
        raise WireError("bad-payload", f"a frame is not a buffer: {e}") from None
    if views[0].nbytes > max_header_bytes:
        raise WireError("oversized", f"header of {views[0].nbytes} bytes, limit {max_header_bytes}")
    try:
        header = msgpack.unpackb(
            views[0],
            raw=False,
            strict_map_key=True,
            max_bin_len=max_header_bytes,
            max_str_len=max_header_bytes,
            max_array_len=_MAX_ARRAY_LEN,
            max_map_len=_MAX_MAP_LEN,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises a zoo (ValueError, ExtraData, StackError, ...)
        raise WireError("bad-msgpack", f"header is not msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise WireError("bad-msgpack", f"header is a {type(header).__name__}, not a map")
    rid = header.get("request_id")
    rid = rid if isinstance(rid, str) else None
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError("bad-version", f"protocol {version!r:.20}, this side speaks {PROTOCOL_VERSION}", rid)
    kind = header.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(kind, str):
        raise WireError("unknown-kind", f"kind {kind!r:.40} not one of {sorted(_KINDS)}", rid)
    if (largest := max((v.nbytes for v in views[1:]), default=0)) > max_frame_bytes:
        raise WireError("oversized", f"a payload frame of {largest} bytes, limit {max_frame_bytes}", rid)
    fields = {k: v for k, v in header.items() if k not in ("v", "kind")}
    if len(views) > 1 and not has_frames(cls):
        bad_field(f"{kind} carries no payloads but got {len(views) - 1}", rid)
    try:
        msg = from_wire(cls, fields, kind, **({"payloads": tuple(frames[1:])} if has_frames(cls) else {}))
    except SchemaError as e:
        bad_field(str(e), rid)
    except WireError as e:  # from a __post_init__ check; name the request
        raise WireError(e.reason, e.detail, rid) from None
    except DisaggError as e:  # a nested config refusing its values (e.g. SamplingParams)
        bad_field(str(e), rid)
    kv = getattr(msg, "kv", None)
    if isinstance(kv, KVMeta) and kv.raw_bytes > max_raw_bytes:
        raise WireError("oversized", f"KV of {kv.raw_bytes} raw bytes, limit {max_raw_bytes}", rid)
    theirs = getattr(msg, "model_fingerprint", None)
    if model_fingerprint is not None and theirs is not None and theirs != model_fingerprint:
        raise WireError(
            "fingerprint-mismatch",
            f"{kind} is for model {theirs!r} but this process serves {model_fingerprint!r}",
            rid,
        )
    return msg
