"""Quantized weight matrices in blocks of 32 along the input dimension: the in-memory format.

`QuantizedWeight` holds one (N, K) matrix, kept quantized, in the layout `kernel.c` reads: a scale
`d` and a min `m` per block, float32 (N, nb), and w = d · q + m with
- int8: `qs` uint8 (N, nb·32), q in 0..255;
- int4: `qs` uint8 (N, nb·16), q in 0..15, two a byte in GGUF's Q4_0/Q4_1 order (byte j of a
  block: element j low, j + 16 high).
`nb` = ceil(K / 32); a K that is not a multiple of 32 is zero-padded (the kernel reads K values of x).

Made from float weights (min/max per block), or straight from a GGUF tensor's own blocks: Q4_0 /
Q4_1 as int4 as they are; Q8_0 as int8 (q + 128, m = −128 d: exact); and Q4_0 / Q4_1 as int8 by
widening (q8 = 17 q4, d8 = d4 / 17: exact up to float32 rounding), so the default Q4_1 file loads
in either mode with no requantization error. Scales and mins per block of 32 rather than one per
output row: 25 % more bytes than bare int8, and the min is what makes both conversions exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK = 32  # values per block
KINDS = ("int8", "int4")
# GGUF block types this format takes as they are, and the kind each becomes.
GGUF_KINDS = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4"}


@dataclass(frozen=True)
class QuantizedWeight:
    kind: str  # "int8" or "int4"
    in_features: int  # K, before padding
    qs: torch.Tensor  # uint8 (N, nb*32) or (N, nb*16)
    d: torch.Tensor  # float32 (N, nb)
    m: torch.Tensor  # float32 (N, nb)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantized weight kind must be one of {KINDS}, got {self.kind!r}")
        nb = -(-self.in_features // QK)
        per_block = QK if self.kind == "int8" else QK // 2
        assert self.qs.shape == (self.d.shape[0], nb * per_block), (self.qs.shape, self.d.shape, nb)
        assert self.d.shape == self.m.shape == (self.qs.shape[0], nb)
        assert self.d.dtype == self.m.dtype == torch.float32 and self.qs.dtype == torch.uint8
        assert self.qs.is_contiguous() and self.d.is_contiguous() and self.m.is_contiguous()

    @property
    def out_features(self) -> int:
        return self.qs.shape[0]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m))

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix (N, K) these blocks stand for."""
        n, nb = self.d.shape
        if self.kind == "int8":
            q = self.qs.view(n, nb, QK).float()
        else:
            b = self.qs.view(n, nb, QK // 2)
            q = torch.cat((b & 0x0F, b >> 4), dim=-1).float()  # (N, nb, 32): low nibbles first
        w = q * self.d[:, :, None] + self.m[:, :, None]
        return w.reshape(n, nb * QK)[:, : self.in_features]

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The same matrix with its output rows reordered (e.g. llama.cpp's Q/K permutation undone)."""
        return QuantizedWeight(self.kind, self.in_features, self.qs[index].contiguous(), self.d[index].contiguous(),
                               self.m[index].contiguous())

    def widened(self) -> QuantizedWeight:
        """int4 → int8 with the same values: q8 = 17 q4 spans 0..255, d8 = d4 / 17 (float32 rounding only)."""
        if self.kind == "int8":
            return self
        n, nb = self.d.shape
        b = self.qs.view(n, nb, QK // 2)
        q = torch.cat((b & 0x0F, b >> 4), dim=-1) * 17  # (N, nb, 32) uint8, at most 255
        return QuantizedWeight("int8", self.in_features, q.reshape(n, nb * QK).contiguous(), self.d / 17, self.m)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack matrices of one kind and width along the output dimension (fused QKV, gate/up)."""
    kinds, widths = {p.kind for p in parts}, {p.in_features for p in parts}
    assert len(kinds) == 1 and len(widths) == 1, (kinds, widths)
    return QuantizedWeight(parts[0].kind, parts[0].in_features, torch.cat([p.qs for p in parts]),
                           torch.cat([p.d for p in parts]), torch.cat([p.m for p in parts]))


def quantize(w: torch.Tensor, kind: str) -> QuantizedWeight:
    """Float weights (N, K) → blocks with a min and a scale each (256 or 16 levels between them)."""
    n, k = w.shape
    nb = -(-k // QK)
    x = torch.zeros(n, nb * QK, dtype=torch.float32)
    x[:, :k] = w.float()
    x = x.view(n, nb, QK)
    if kind not in KINDS:
        raise ValueError(f"quantization kind must be one of {KINDS}, got {kind!r}")
    levels = 255 if kind == "int8" else 15
    lo, hi = x.amin(-1), x.amax(-1)  # (N, nb)
    d = (hi - lo) / levels
    q = torch.where(d[..., None] > 0, (x - lo[..., None]) / d.clamp_min(1e-30)[..., None], 0).round()
    q = q.clamp(0, levels).to(torch.uint8)
    if kind == "int8":
        return QuantizedWeight("int8", k, q.reshape(n, nb * QK).contiguous(), d.contiguous(), lo.contiguous())
    packed = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)  # (N, nb, 16)
    return QuantizedWeight("int4", k, packed.reshape(n, nb * QK // 2).contiguous(), d.contiguous(), lo.contiguous())


def from_gguf_blocks(raw: np.ndarray, qtype: str, in_features: int) -> QuantizedWeight:
    """A GGUF tensor's raw rows (N, row bytes) of Q8_0, Q4_0 or Q4_1 blocks → the same values, unrounded.

    Q8_0 block: f16 d, 32 × int8.  Q4_0: f16 d, 16 bytes of nibbles, w = d (q − 8).
    Q4_1: f16 d, f16 m, 16 bytes of nibbles, w = d q + m.
    """
    if in_features % QK:
        raise ValueError(f"GGUF {qtype} rows hold whole blocks of {QK}; got {in_features} columns")
    n, nb = raw.shape[0], in_features // QK
    header = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}[qtype]
    body = QK if qtype == "Q8_0" else QK // 2
    blocks = np.ascontiguousarray(raw).reshape(n, nb, header + body)
    d = blocks[..., 0:2].copy().view(np.float16).reshape(n, nb).astype(np.float32)
    qs = np.ascontiguousarray(blocks[..., header:]).reshape(n, nb * body)
    if qtype == "Q8_0":  # d q = d (q + 128) + (−128 d), exact in float32
        q8 = torch.from_numpy((qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8))
        return QuantizedWeight("int8", in_features, q8, torch.from_numpy(d), torch.from_numpy(-128 * d))
    # Q4_0: d (q − 8) = d q + (−8 d), exact in float32
    m = blocks[..., 2:4].copy().view(np.float16).reshape(n, nb).astype(np.float32) if qtype == "Q4_1" else -8 * d
    return QuantizedWeight("int4", in_features, torch.from_numpy(qs.copy()), torch.from_numpy(d), torch.from_numpy(m))
