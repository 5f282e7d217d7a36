"""Every message that crosses a process boundary, and the only code that turns them into frames.

A message is multipart: frame 0 is a msgpack map ``{"v": PROTOCOL_VERSION, "kind": ..., fields}``,
further frames are payloads (KV bytes) passed through untouched, so a sender hands tensor memory
to zmq without copying. Each kind is a frozen dataclass registered with `@_message`; its type
hints are the schema (checked by `kv/schema.py`). `decode_message` trusts nothing: it checks sizes
before parsing, parses with explicit msgpack limits, checks version, kind, every field's type and
every declared frame length, and raises `WireError` (never anything else) with a short `reason`.

This module is pure: no zmq, no torch (the coordinator imports it without loading torch). The
tensor side of `KVLayers` (codecs, checksums) lives in `kv/codec.py`.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from disagg_cli.config import SamplingParams
from disagg_cli.engine.logprobs import TokenLogprobs
from disagg_cli.errors import DisaggError
from disagg_cli.kv.schema import SchemaError, frames_field, from_wire, has_frames, to_wire

# 2: HelloAck names the worker's instance and Prefill the decode instance it streams to.
# 3: prefix caching: `Reserved` says how many leading prompt tokens the decode worker holds,
#    `Prefill` passes that on, `KVLayers` carry the position of their first token, and
#    `PrefillHere` has a decode worker compute a short prompt itself (selective disaggregation).
PROTOCOL_VERSION = 3

# Who speaks on the wire (`Hello.role`): the three worker roles, and coordinators.
WORKER_ROLES = ("prefill", "decode", "colocated")
PEER_ROLES = ("coordinator", *WORKER_ROLES)

# The KV codecs, by the name `KVMeta.codec` and `--kv-codec` spell them, in the order `disagg bench
# codec` reports them (`kv/codecs.py` maps each to its class).
CODEC_NAMES = ("none", "lz4", "shuffle-lz4", "auto", "int8", "int4")

# Bytes per element of the float dtypes KV may travel in (names as torch spells them).
DTYPE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# Defaults sized for KV of small and medium models; a receiver may pass tighter ones.
MAX_HEADER_BYTES = 1024 * 1024  # room for a prompt's token ids
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_RAW_BYTES = 1024 * 1024 * 1024
MAX_FRAMES = 64
_MAX_ARRAY_LEN = 1 << 17
_MAX_MAP_LEN = 256

REASONS = frozenset(
    [
        "bad-version",
        "bad-msgpack",
        "unknown-kind",
        "oversized",
        "truncated",
        "bad-checksum",
        "bad-payload",
        "fingerprint-mismatch",
        "bad-field",
    ]
)

# Anything exposing the buffer protocol: bytes, memoryview, numpy arrays, zmq.Frame.
Frame = Any


class WireError(DisaggError):
    """A message that cannot be trusted; `reason` is a short code, `request_id` set when known."""

    def __init__(self, reason: str, message: str, request_id: str | None = None) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.request_id = request_id
        self.detail = message
        where = f"request {request_id!r}: " if request_id is not None else ""
        super().__init__(f"{where}{message} [{reason}]")


@dataclass(frozen=True, slots=True)
class KVMeta:
    """How one (k, v) pair of shape `shape` was encoded; written by a codec, read by its decoder.

    `checksum` is crc32 of the raw tensor bytes (k then v) for lossless codecs and of the
    quantized bytes for lossy ones (their originals cannot be rebuilt to compare against).
    `frame_bytes` is the length of each payload frame, in order; `params` is codec-specific.
    """

    codec: str
    dtype: str
    shape: tuple[int, ...]
    raw_bytes: int
    wire_bytes: int
    checksum: int
    frame_bytes: tuple[int, ...]
    params: dict[str, str | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_ITEMSIZE:
            _bad(f"KV dtype {self.dtype!r} is not one of {sorted(DTYPE_ITEMSIZE)}")
        if not 3 <= len(self.shape) <= 4 or min(self.shape) < 1:
            _bad(f"KV shape {self.shape} is not ([layers,] tokens, kv_heads, head_dim) with sizes >= 1")
        expected = 2 * math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]
        if self.raw_bytes != expected:
            _bad(f"raw_bytes {self.raw_bytes} != 2 x {self.shape} x {self.dtype} = {expected}")
        if self.wire_bytes != sum(self.frame_bytes) or min(self.frame_bytes, default=0) < 0:
            _bad(f"wire_bytes {self.wire_bytes} != sum of frame_bytes {self.frame_bytes}")
        if not 0 <= self.checksum < 2**32:
            _bad(f"checksum {self.checksum} is not a 32-bit crc")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of a worker's KV cache, exchanged in the handshake."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int


class Message:
    """Base of all message kinds; `kind` names the class on the wire."""

    __slots__ = ()
    kind: ClassVar[str]


M = TypeVar("M", bound=Message)
_KINDS: dict[str, type[Message]] = {}


def _message(kind: str) -> Callable[[type[M]], type[M]]:
    """Register a message class under `kind`; adding a kind is a dataclass plus this line."""

    def register(cls: type[M]) -> type[M]:
        assert kind not in _KINDS, f"kind {kind!r} registered twice"
        cls.kind = kind
        _KINDS[kind] = cls
        return cls

    return register


@_message("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on every connection: who I am and what KV I hold."""

    protocol_version: int
    role: str  # "coordinator", "prefill", "decode", "colocated"
    model_fingerprint: str  # "" from a coordinator, which holds no weights
    kv_layout: KVLayout | None = None
    capacity: dict[str, int] = field(default_factory=dict)
    # A worker's resolved dtype and weight quantization, with the reasons (`--dtype auto` etc.).
    runtime: dict[str, str] = field(default_factory=dict)


@_message("hello_ack")
@dataclass(frozen=True, slots=True)
class HelloAck(Message):
    """The peer accepted a `Hello`; carries the acceptor's own identity."""

    role: str
    model_fingerprint: str
    kv_layout: KVLayout
    capacity: dict[str, int] = field(default_factory=dict)
    runtime: dict[str, str] = field(default_factory=dict)
    # Random per worker process: a peer that sees a new one knows the worker restarted and forgot
    # every greeting, reservation and KV it held.
    instance_id: str = ""


@_message("refuse")
@dataclass(frozen=True, slots=True)
class Refuse(Message):
    """The peer refused a `Hello`; `message` names both sides of the mismatch."""

    reason: str
    message: str


@_message("kv_layers")
@dataclass(frozen=True, slots=True)
class KVLayers(Message):
    """KV of layers [layer_start, layer_end) of one request's tokens token_start.. (the ones
    before were cached on the receiver), shape (layers, tokens, heads, dim)."""

    request_id: str
    model_fingerprint: str
    layer_start: int
    layer_end: int
    num_tokens: int
    kv: KVMeta
    payloads: tuple[Frame, ...] = frames_field()
    token_start: int = 0

    def __post_init__(self) -> None:
        rid = self.request_id
        if not 0 <= self.layer_start < self.layer_end:
            _bad(f"layer range [{self.layer_start}, {self.layer_end}) is empty or negative", rid)
        if self.token_start < 0:
            _bad(f"token_start {self.token_start} is negative", rid)
        want = (self.layer_end - self.layer_start, self.num_tokens)
        if len(self.kv.shape) != 4 or tuple(self.kv.shape[:2]) != want:
            _bad(f"KV shape {self.kv.shape} does not start with (layers, tokens) = {want}", rid)
        sizes, declared = tuple(memoryview(p).nbytes for p in self.payloads), self.kv.frame_bytes
        if sizes != declared:
            short = len(sizes) < len(declared) or any(a < d for a, d in zip(sizes, declared, strict=False))
            why = "truncated" if short else "oversized"
            raise WireError(why, f"payload frames of {sizes} bytes, header declares {declared}", request_id=rid)


@_message("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A request (or, with request_id None, the connection) failed; `reason` is a short code."""

    request_id: str | None
    reason: str
    message: str


@_message("heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """I am alive; `seq` increases by one per beat so a peer can count missed ones."""

    seq: int
    stats: dict[str, int | float] = field(default_factory=dict)


# --- serving: the life of one disaggregated request ------------------------------------------
#
# Every worker binds one ROUTER socket; coordinators and prefill workers connect DEALERs to it and
# say `Hello` first. Then, per request:
# 1. coordinator → decode worker: `Reserve` (prompt, sampling). The decode worker sets blocks aside
#    for the prompt's KV (sharing the leading blocks its prefix cache holds), or queues the
#    reservation until blocks free up, then answers `Reserved` (with the cached token count).
# 2. coordinator → prefill worker: `Prefill` (prompt, sampling, the decode worker's address and
#    cached token count). The prefill worker batches prompts, computing only what its own prefix
#    cache lacks; as each layer is computed it sends `KVLayers` of the tokens the decode worker
#    lacks straight to it; then `FirstToken` to the coordinator (the user's TTFT) and `KVDone`
#    (first token, sampler state, timings) to the decode worker.
#    Or, for a prompt whose uncached part is short (selective disaggregation), coordinator →
#    decode worker: `PrefillHere`; the decode worker computes it in the reserved blocks and
#    answers `FirstToken` itself.
# 3. decode worker: places each layer into the reserved blocks, joins the request to its running
#    batch on `KVDone`, and streams `Tokens` to the coordinator until EOS or max_tokens.
# 4. coordinator → any worker: `Abort` (a stop string, Ctrl-C, a client gone) frees the request's
#    blocks there. Any side may answer `Error` with a reason code instead.
# Colocated workers take `Generate` and answer `FirstToken` then `Tokens`, all in one process.


@_message("reserve")
@dataclass(frozen=True, slots=True)
class Reserve(Message):
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    eos_ids: tuple[int, ...] = ()


@_message("reserved")
@dataclass(frozen=True, slots=True)
class Reserved(Message):
    request_id: str
    num_blocks: int
    queued_ms: float  # how long the reservation waited for free blocks
    cached_tokens: int = 0  # leading prompt tokens whose KV the decode worker already holds


@_message("prefill")
@dataclass(frozen=True, slots=True)
class Prefill(Message):
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    decode_addr: str  # where to stream the KV (the decode worker's ROUTER)
    # The decode process that holds the reservation (its HelloAck's instance_id): KV goes only to
    # that process, never to a successor that restarted on the same address and knows nothing.
    decode_instance: str = ""
    decode_cached_tokens: int = 0  # from `Reserved`: send the KV of prompt tokens from here on


@_message("prefill_here")
@dataclass(frozen=True, slots=True)
class PrefillHere(Message):
    """To a decode worker holding a reservation: compute its prompt yourself (no transfer)."""

    request_id: str


@_message("generate")
@dataclass(frozen=True, slots=True)
class Generate(Message):
    """Both phases in one (colocated) worker."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    eos_ids: tuple[int, ...] = ()


@_message("first_token")
@dataclass(frozen=True, slots=True)
class FirstToken(Message):
    request_id: str
    token_id: int
    stats: dict[str, float] = field(default_factory=dict)  # queue_ms, prefill_ms, batch_size, …
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@_message("kv_done")
@dataclass(frozen=True, slots=True)
class KVDone(Message):
    """Sent after the last `KVLayers` of a request (same connection, so it arrives after them)."""

    request_id: str
    first_token: int
    num_tokens: int
    num_layers: int
    sampler_state: bytes | None = None  # the sampler's RNG state after drawing the first token
    stats: dict[str, float] = field(default_factory=dict)  # kv_encode_ms, bytes, kv_stream_ms, …


@_message("tokens")
@dataclass(frozen=True, slots=True)
class Tokens(Message):
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    stats: dict[str, float] = field(default_factory=dict)
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, when the request asked for them


@_message("abort")
@dataclass(frozen=True, slots=True)
class Abort(Message):
    request_id: str
    reason: str = "abort"


def _bad(message: str, request_id: str | None = None) -> typing.NoReturn:
    raise WireError("bad-field", message, request_id)


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
        _bad(f"{kind} carries no payloads but got {len(views) - 1}", rid)
    try:
        msg = from_wire(cls, fields, kind, **({"payloads": tuple(frames[1:])} if has_frames(cls) else {}))
    except SchemaError as e:
        _bad(str(e), rid)
    except WireError as e:  # from a __post_init__ check; name the request
        raise WireError(e.reason, e.detail, rid) from None
    except DisaggError as e:  # a nested config refusing its values (e.g. SamplingParams)
        _bad(str(e), rid)
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
