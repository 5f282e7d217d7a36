"""KV ⇄ bytes: the codecs a `KVLayers` message's payloads are written in, picked by name.

The unit is one (k, v) pair in the wire layout: token-major, each a contiguous CPU tensor of
shape ([layers,] tokens, kv_heads, head_dim) in float32, float16 or bfloat16. A codec turns the
k stream and the v stream each into a fixed number of payload frames and fills a `KVMeta`
(sizes, crc32 checksum, per-stream choices in `params`); `kv/registry.py`'s `decode_kv` reverses any of them from
the metadata alone, checking every size and the checksum, and raises `WireError` on a mismatch.

Choices measured on this machine kind (2 shared cores; one layer of bfloat16 KV, 1,024 tokens):
crc32 7.0 GB/s vs blake2b-64 1.4 GB/s on 1 MiB. lz4.frame vs lz4.block on byte-shuffled KV: ratio
1.198 vs 1.191, compress 0.80 vs 0.85 GB/s, decompress 6.6 vs 6.9 GB/s, a near tie; frames win on
being self-delimiting (lz4 itself catches a truncated or over-long payload) and readable by any
lz4 tool. Both release the GIL, so a worker can encode layer N while its model computes layer N+1.
A thread pool splitting k and v across two threads did not pay (shuffle-lz4 0.56 → 0.54 GB/s;
int8/int4 slower, their torch ops contending with torch's own threads), so codecs are serial.
Byte order on the wire is little-endian, as on every machine this runs on.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import lz4.frame
import numpy as np
import torch
from torch import Tensor

from disagg_cli.errors import UsageError
from disagg_cli.protocol import Frame, KVMeta, WireError

assert sys.byteorder == "little", "the KV wire format is little-endian"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class EncodedKV:
    """A codec's output: the metadata for the header and the payload frames (not copied)."""

    meta: KVMeta
    payloads: list[Frame]


@dataclass(frozen=True, slots=True)
class Stream:
    """One of k or v, encoded: what a codec's `_encode_stream` returns."""

    frames: list[Frame]  # what goes on the wire
    checked: list[Frame]  # the bytes the checksum covers
    variant: str = ""  # a per-stream choice the decoder needs (auto's pick, a scale dtype)


def raw_bytes(x: Tensor) -> np.ndarray:
    """The bytes of contiguous tensor `x` as a flat uint8 array sharing its memory."""
    return x.reshape(-1).view(torch.uint8).numpy()


def tensor_from(buf: Frame, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """A new tensor holding a copy of `buf` (frames may be read-only or reused by zmq)."""
    out = torch.empty(shape, dtype=dtype)
    raw_bytes(out)[:] = np.frombuffer(buf, np.uint8)
    return out


def compress(data: Frame) -> bytes:
    return lz4.frame.compress(data, store_size=True)


def decompress(frame: Frame, size: int) -> bytearray:
    """Exactly `size` bytes out of one lz4 frame; anything else is a corrupt payload."""
    d = lz4.frame.LZ4FrameDecompressor(return_bytearray=True)
    try:
        out = d.decompress(frame, max_length=size)  # max_length: a forged frame cannot balloon
    except Exception as e:  # lz4 reports corrupt input as RuntimeError, but be sure
        raise WireError("bad-payload", f"lz4 frame does not decompress: {e}") from None
    if len(out) != size or not d.eof or d.unused_data:
        raise WireError("bad-payload", f"lz4 frame holds other than the declared {size} bytes")
    return out


def _shuffle(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte planes: every element's byte 0, then every byte 1, ... (exponents end up together)."""
    elems = raw.reshape(-1, itemsize)
    planes = np.empty((itemsize, elems.shape[0]), np.uint8)
    for i in range(itemsize):  # one strided copy per plane: ~4 GB/s, 5x np.ascontiguousarray(.T)
        planes[i] = elems[:, i]
    return planes.reshape(-1)


def _unshuffle_into(raw: np.ndarray, planes: Frame, itemsize: int) -> None:
    src = np.frombuffer(planes, np.uint8).reshape(itemsize, -1)
    dst = raw.reshape(-1, itemsize)
    for i in range(itemsize):
        dst[:, i] = src[i]


def _decode_raw(meta: KVMeta, frame: memoryview) -> tuple[Tensor, list[Frame]]:
    expect_size(frame, meta.raw_bytes // 2, "raw stream")
    return tensor_from(frame, DTYPES[meta.dtype], meta.shape), [frame]


def _decode_shuffled(meta: KVMeta, frame: memoryview) -> tuple[Tensor, list[Frame]]:
    out = torch.empty(meta.shape, dtype=DTYPES[meta.dtype])
    raw = raw_bytes(out)
    _unshuffle_into(raw, decompress(frame, meta.raw_bytes // 2), out.element_size())
    return out, [raw.data]


def expect_size(frame: memoryview, size: int, what: str) -> None:
    if frame.nbytes != size:
        raise WireError("bad-field", f"{what} of {frame.nbytes} bytes; the shape implies {size}")


def _sized(frames: Sequence[Frame], sizes: Sequence[int]) -> list[memoryview]:
    """`frames` as byte views, checked against the declared `sizes`."""
    views = [memoryview(f).cast("B") for f in frames]
    got = tuple(v.nbytes for v in views)
    if got != tuple(sizes):
        short = len(got) < len(sizes) or any(a < b for a, b in zip(got, sizes, strict=False))
        raise WireError("truncated" if short else "oversized", f"payloads of {got} bytes, declared {sizes}")
    return views


def _crc32(parts: Sequence[Frame]) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


class KVCodec:
    """Base of all codecs: splits (k, v) into two streams, checksums, builds the metadata."""

    name: ClassVar[str]
    lossless: ClassVar[bool]
    frames_per_stream: ClassVar[int] = 1
    variants: ClassVar[frozenset[str]] = frozenset({""})  # allowed per-stream params["k"/"v"]

    def encode(self, k: Tensor, v: Tensor) -> EncodedKV:
        """k, v: ([layers,] tokens, kv_heads, head_dim) CPU float tensors of equal shape and dtype."""
        dtype = dtype_name(k.dtype)
        assert dtype in DTYPES and k.dtype == v.dtype and k.shape == v.shape, (k.shape, v.shape)
        assert k.device.type == "cpu" and v.device.type == "cpu", "move KV to the CPU before encoding"
        k, v = k.contiguous(), v.contiguous()
        ks, vs = self._encode_stream(k, True), self._encode_stream(v, False)
        frames = ks.frames + vs.frames
        sizes = tuple(memoryview(f).nbytes for f in frames)
        variants = {"k": ks.variant, "v": vs.variant} if ks.variant else {}
        meta = KVMeta(
            codec=self.name,
            dtype=dtype,
            shape=tuple(k.shape),
            raw_bytes=2 * k.nbytes,
            wire_bytes=sum(sizes),
            checksum=_crc32(ks.checked + vs.checked),
            frame_bytes=sizes,
            params={**self._params(), **variants},
        )
        return EncodedKV(meta, frames)

    def decode(self, meta: KVMeta, payloads: Sequence[Frame]) -> tuple[Tensor, Tensor]:
        """(k, v) in `meta.dtype` and `meta.shape`; raises WireError if anything disagrees."""
        n = self.frames_per_stream
        if len(meta.frame_bytes) != 2 * n:
            raise WireError("bad-field", f"{meta.codec} sends {2 * n} payloads, not {len(meta.frame_bytes)}")
        views = _sized(payloads, meta.frame_bytes)
        variants = [str(meta.params.get(s, "")) for s in "kv"]  # str(): an int is no variant either
        if any(x not in self.variants for x in variants):
            raise WireError("bad-field", f"{meta.codec} stream variants {variants} not in {set(self.variants)}")
        k, kc = self._decode_stream(meta, views[:n], True, variants[0])
        v, vc = self._decode_stream(meta, views[n:], False, variants[1])
        if (crc := _crc32(kc + vc)) != meta.checksum:
            raise WireError("bad-checksum", f"{meta.codec} payloads hash to crc32 {crc}, header says {meta.checksum}")
        return k, v

    def _params(self) -> dict[str, str | int]:
        return {}

    def _encode_stream(self, x: Tensor, is_key: bool) -> Stream:
        raise NotImplementedError

    def _decode_stream(
        self, meta: KVMeta, frames: list[memoryview], is_key: bool, variant: str
    ) -> tuple[Tensor, list[Frame]]:
        raise NotImplementedError


class NoneCodec(KVCodec):
    """Raw tensor bytes, sent straight from the tensor's memory."""

    name, lossless = "none", True

    def _encode_stream(self, x: Tensor, is_key: bool) -> Stream:
        raw = raw_bytes(x).data
        return Stream([raw], [raw])

    def _decode_stream(self, meta, frames, is_key, variant):  # type: ignore[no-untyped-def]
        return _decode_raw(meta, frames[0])


class LZ4Codec(KVCodec):
    """LZ4 frames over the raw bytes. Gains ~0-2% on 16-bit KV: there for comparison."""

    name, lossless = "lz4", True

    def _encode_stream(self, x: Tensor, is_key: bool) -> Stream:
        raw = raw_bytes(x).data
        return Stream([compress(raw)], [raw])

    def _decode_stream(self, meta, frames, is_key, variant):  # type: ignore[no-untyped-def]
        plain = decompress(frames[0], meta.raw_bytes // 2)
        return torch.frombuffer(plain, dtype=DTYPES[meta.dtype]).view(meta.shape), [plain]


class ShuffleLZ4Codec(KVCodec):
    """Byte planes, then LZ4: the sign/exponent bytes of nearby values repeat, so they compress."""

    name, lossless = "shuffle-lz4", True

    def _encode_stream(self, x: Tensor, is_key: bool) -> Stream:
        raw = raw_bytes(x)
        return Stream([compress(_shuffle(raw, x.element_size()))], [raw.data])

    def _decode_stream(self, meta, frames, is_key, variant):  # type: ignore[no-untyped-def]
        return _decode_shuffled(meta, frames[0])


class AutoCodec(KVCodec):
    """Lossless: each stream goes as shuffle-lz4 where that pays, else raw (zero-copy).

    Without a link speed, "pays" means shuffle-lz4 saves at least `min_saving` of the bytes.
    Given the link's bytes/s the codec must also keep up with the link (layers are pipelined),
    as estimated by a probe (a 32 KiB sample shuffled, compressed and restored, timed) rerun every
    `probe_every` streams; so on a fast link (loopback) auto sends raw without compressing every
    frame to find out, and on a slow one (1 Gbit/s) it compresses. The probe state makes an
    instance one link's.
    """

    name, lossless = "auto", True
    variants = frozenset({"none", "shuffle-lz4"})
    probe_bytes: ClassVar[int] = 32 * 1024

    def __init__(
        self,
        *,
        min_saving: float = 0.05,
        link_bytes_per_s: float | None = None,
        probe_every: int = 64,
    ) -> None:
        if link_bytes_per_s is not None and link_bytes_per_s <= 0:
            raise UsageError(f"link speed must be > 0 bytes/s, got {link_bytes_per_s}")
        self.min_saving = min_saving
        self.link_bytes_per_s = link_bytes_per_s
        self.probe_every = probe_every
        self._streams_since_probe = probe_every  # probe on the first stream
        self._pays = True

    def _encode_stream(self, x: Tensor, is_key: bool) -> Stream:
        raw = raw_bytes(x)
        itemsize = x.element_size()
        if self.link_bytes_per_s is None or self._probe_says_pays(raw, itemsize):
            packed = compress(_shuffle(raw, itemsize))
            if len(packed) <= (1 - self.min_saving) * raw.nbytes:
                return Stream([packed], [raw.data], "shuffle-lz4")
        return Stream([raw.data], [raw.data], "none")

    def _probe_says_pays(self, raw: np.ndarray, itemsize: int) -> bool:
        assert self.link_bytes_per_s is not None
        self._streams_since_probe += 1
        if self._streams_since_probe < self.probe_every:
            return self._pays
        self._streams_since_probe = 0
        sample = raw[: min(raw.nbytes, self.probe_bytes) // itemsize * itemsize]
        start = time.perf_counter()
        packed = compress(_shuffle(sample, itemsize))
        _unshuffle_into(np.empty_like(sample), decompress(packed, sample.nbytes), itemsize)
        codec_s_per_byte = (time.perf_counter() - start) / max(sample.nbytes, 1)
        saving = 1 - len(packed) / max(sample.nbytes, 1)
        # KV goes out layer by layer, so encoding one layer overlaps sending the one before and
        # decoding overlaps receiving: compression pays when the codec keeps up with the link
        # (then the wire carries fewer bytes in the same pipeline), not only when its time is
        # smaller than the wire time it saves.
        link_s_per_byte = 1 / self.link_bytes_per_s
        self._pays = saving >= self.min_saving and codec_s_per_byte < link_s_per_byte
        return self._pays

    def _decode_stream(self, meta, frames, is_key, variant):  # type: ignore[no-untyped-def]
        return (_decode_shuffled if variant == "shuffle-lz4" else _decode_raw)(meta, frames[0])


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → "bfloat16", the spelling on the wire."""
    return str(dtype).removeprefix("torch.")
