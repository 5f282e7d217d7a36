"""The lossy KV codecs, `int8` and `int4`: the quantization math (CPU torch) and the two codecs
built on it (codes LZ4'd, scales raw; framing and checksums come from `kv/codec.py`).

Scales (and int4 zero points) are stored in float16 when every one of them fits, else float32.
They are rounded *outward* (scale up, zero point down) when narrowed to float16, so every input
stays inside the representable range and the error bounds below hold exactly, not "usually".

- int8, symmetric, one scale per (token, head): s = absmax/127,
  |x - x̂| <= s'/2 + half an ulp of the output dtype, with s' <= s·(1 + 2⁻¹⁰) + 2⁻²⁴.
- int4, asymmetric, KIVI-style: keys per channel over groups of `group_size` tokens (outlier
  channels get their own range), values per token over groups of `group_size` channels;
  s = (max - min)/15 per group, |x - x̂| <= s'/2 + half an ulp of the output dtype, with
  s' <= (max - min + |min|·2⁻¹⁰ + 2⁻²⁴)/15 · (1 + 2⁻¹⁰) + 2⁻²⁴.
Both bounds also allow float32 rounding (~2⁻²³ relative) in the arithmetic. Inputs must be
finite: a NaN or inf in KV is a model bug, refused with ValueError.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from disagg_cli.kv.codec import (
    DTYPES,
    KVCodec,
    Stream,
    compress,
    decompress,
    dtype_name,
    expect_size,
    raw_bytes,
    tensor_from,
)
from disagg_cli.protocol import WireError

INT4_GROUP_SIZE = 64  # 64 codes share 4 bytes of scale + zero point: ~3.56x smaller than 16-bit


def _round_up_f16(x: Tensor) -> Tensor:
    """float32 x >= 0 → the smallest float16 >= x (inf when x is beyond float16)."""
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    bits = torch.where(h.float() < x, bits + 1, bits)  # next float16 up; +0 → smallest subnormal
    return bits.view(torch.float16)


def _round_down_f16(x: Tensor) -> Tensor:
    """float32 x → the largest float16 <= x (-inf when x is below float16)."""
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    # Sign-magnitude: a positive value steps down by bits - 1; zero or negative steps away from 0.
    down = torch.where(h > 0, bits - 1, torch.where(bits == 0, torch.full_like(bits, -32767), bits + 1))
    # +inf (x above float16) must stay inf, not step down to 65504: the caller then keeps float32.
    return torch.where((h.float() > x) & torch.isfinite(h), down, bits).view(torch.float16)


def _check_finite(*xs: Tensor) -> None:
    for x in xs:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("KV holds NaN or inf; the lossy codecs only quantize finite values")


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., D) float → codes (..., D) int8 and scales (...) float16 or float32."""
    xf = x.float()
    absmax = xf.abs().amax(-1)  # (...)
    _check_finite(absmax)
    scale = absmax / 127
    scale_f16 = _round_up_f16(scale)
    stored = scale_f16 if bool(torch.isfinite(scale_f16).all()) else scale
    s = stored.float()
    q = torch.round(xf / torch.where(s == 0, 1.0, s).unsqueeze(-1)).clamp_(-127, 127)
    return q.to(torch.int8), stored


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of `quantize_int8`, in `dtype`."""
    return (q.float() * scales.float().unsqueeze(-1)).to(dtype)


def _quantize_asym(xg: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """xg float32 grouped along `dim` → codes 0..15 (uint8, same shape), params (2, reduced...)."""
    lo, hi = xg.amin(dim), xg.amax(dim)
    _check_finite(lo, hi)
    lo_f16 = _round_down_f16(lo)
    scale_f16 = _round_up_f16((hi - lo_f16.float()) / 15)
    if bool(torch.isfinite(lo_f16).all() and torch.isfinite(scale_f16).all()):
        lo_s, scale_s = lo_f16, scale_f16
    else:
        lo_s, scale_s = lo, (hi - lo) / 15
    s = scale_s.float()
    s = torch.where(s == 0, 1.0, s).unsqueeze(dim)
    q = torch.round((xg - lo_s.float().unsqueeze(dim)) / s).clamp_(0, 15)
    return q.to(torch.uint8), torch.stack((scale_s, lo_s))


def _dequantize_asym(q: Tensor, params: Tensor, dim: int) -> Tensor:
    scale, lo = params.float().unbind(0)
    return q.float() * scale.unsqueeze(dim) + lo.unsqueeze(dim)


def _key_groups(shape: tuple[int, ...], group_size: int) -> tuple[int, int, int]:
    """(layers, padded tokens, groups) for keys of `shape` (..., T, H, D)."""
    num_layers = 1 if len(shape) == 3 else shape[0]
    tokens = shape[-3]
    num_groups = -(-tokens // group_size)
    return num_layers, num_groups * group_size, num_groups


def _value_group(head_dim: int, group_size: int) -> int:
    # Groups must tile head_dim; an odd head_dim falls back to one group per (token, head).
    return group_size if head_dim % group_size == 0 else head_dim


def quantize_int4_keys(k: Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """k (..., T, H, D) → packed codes (ceil(numel/2),) uint8, params float16/32.

    Per channel over groups of `group_size` tokens. A short last group is padded by repeating the
    last token (which leaves its min and max unchanged); padded codes are not sent.
    """
    num_layers, padded, num_groups = _key_groups(tuple(k.shape), group_size)
    tokens, heads, dim = k.shape[-3:]
    x = k.float().reshape(num_layers, tokens, heads, dim)
    if padded > tokens:
        x = torch.cat((x, x[:, -1:].expand(num_layers, padded - tokens, heads, dim)), 1)
    q, params = _quantize_asym(x.view(num_layers, num_groups, group_size, heads, dim), 2)
    q = q.view(num_layers, padded, heads, dim)[:, :tokens]
    return pack_int4(q), params


def dequantize_int4_keys(
    packed: Tensor, params: Tensor, shape: tuple[int, ...], dtype: torch.dtype, group_size: int
) -> Tensor:
    num_layers, padded, num_groups = _key_groups(shape, group_size)
    tokens, heads, dim = shape[-3:]
    q = torch.zeros(num_layers, padded, heads, dim, dtype=torch.uint8)
    q[:, :tokens] = unpack_int4(packed, num_layers * tokens * heads * dim).view(num_layers, tokens, heads, dim)
    params = params.view(2, num_layers, num_groups, heads, dim)
    x = _dequantize_asym(q.view(num_layers, num_groups, group_size, heads, dim), params, 2)
    return x.view(num_layers, padded, heads, dim)[:, :tokens].reshape(shape).to(dtype)


def quantize_int4_values(v: Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """v (..., D) → packed codes, params; per token over groups of channels."""
    dim = v.shape[-1]
    g = _value_group(dim, group_size)
    q, params = _quantize_asym(v.float().reshape(-1, dim // g, g), 2)
    return pack_int4(q), params


def dequantize_int4_values(
    packed: Tensor, params: Tensor, shape: tuple[int, ...], dtype: torch.dtype, group_size: int
) -> Tensor:
    dim = shape[-1]
    g = _value_group(dim, group_size)
    params = params.view(2, -1, dim // g)
    q = unpack_int4(packed, params.shape[1] * dim).view(-1, dim // g, g)
    return _dequantize_asym(q, params, 2).reshape(shape).to(dtype)


def int4_param_count(shape: tuple[int, ...], group_size: int, is_key: bool) -> int:
    """Number of (scale, zero) pairs for a tensor of `shape`: what a decoder must receive."""
    if is_key:
        num_layers, _, num_groups = _key_groups(shape, group_size)
        return num_layers * num_groups * shape[-2] * shape[-1]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * (shape[-1] // _value_group(shape[-1], group_size))


def pack_int4(q: Tensor) -> Tensor:
    """Codes 0..15 (any shape) → (ceil(numel/2),) uint8, two per byte, first in the low nibble."""
    flat = q.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat((flat, flat.new_zeros(1)))
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_int4`: (numel,) uint8 codes."""
    return torch.stack((packed & 15, packed >> 4), -1).view(-1)[:numel]


class Int8Codec(KVCodec):
    """Lossy: int8 codes per (token, head) absmax scale, codes LZ4'd; ~1.94x against 16-bit.

    Bound (see the module docstring): |x - x̂| <= s'/2 + half an ulp of the dtype, where
    s' <= absmax/127 · (1 + 2⁻¹⁰) + 2⁻²⁴ and absmax is over the element's (token, head) row.
    """

    name, lossless = "int8", False
    frames_per_stream = 2
    variants = frozenset({"float16", "float32"})  # the dtype the scales travel in

    def _encode_stream(self, x: Tensor, is_key: bool) -> Stream:
        q, scales = quantize_int8(x)
        codes, scale_bytes = raw_bytes(q).data, raw_bytes(scales).data
        return Stream([compress(codes), scale_bytes], [codes, scale_bytes], dtype_name(scales.dtype))

    def _decode_stream(self, meta, frames, is_key, variant):  # type: ignore[no-untyped-def]
        shape, scale_dtype = meta.shape, DTYPES[variant]
        expect_size(frames[1], math.prod(shape[:-1]) * scale_dtype.itemsize, "int8 scales")
        codes = decompress(frames[0], math.prod(shape))
        q = torch.frombuffer(codes, dtype=torch.int8).view(shape)
        scales = tensor_from(frames[1], scale_dtype, shape[:-1])
        return dequantize_int8(q, scales, DTYPES[meta.dtype]), [codes, frames[1]]


class Int4Codec(KVCodec):
    """Lossy, KIVI-style: keys per channel over `group_size` tokens, values per token over
    `group_size` channels; 4-bit asymmetric codes, two per byte, LZ4'd; ~3.55x against 16-bit.

    Bound (see the module docstring): |x - x̂| <= s'/2 + half an ulp of the dtype, where
    s' <= (max - min + |min|·2⁻¹⁰ + 2⁻²⁴)/15 · (1 + 2⁻¹⁰) + 2⁻²⁴, max and min over the group.
    """

    name, lossless = "int4", False
    frames_per_stream = 2
    variants = frozenset({"float16", "float32"})  # the dtype scales and zero points travel in
    max_group_size: ClassVar[int] = 1024  # a forged group size must not make the decoder pad hugely

    def __init__(self, *, group_size: int = INT4_GROUP_SIZE) -> None:
        self.group_size = group_size

    def _params(self) -> dict[str, str | int]:
        return {"group_size": self.group_size}

    def _encode_stream(self, x: Tensor, is_key: bool) -> Stream:
        quantize = quantize_int4_keys if is_key else quantize_int4_values
        packed, params = quantize(x, self.group_size)
        codes, param_bytes = raw_bytes(packed).data, raw_bytes(params).data
        return Stream([compress(codes), param_bytes], [codes, param_bytes], dtype_name(params.dtype))

    def _decode_stream(self, meta, frames, is_key, variant):  # type: ignore[no-untyped-def]
        shape, param_dtype, group = meta.shape, DTYPES[variant], meta.params.get("group_size")
        if not isinstance(group, int) or not 1 <= group <= self.max_group_size:
            raise WireError("bad-field", f"int4 group_size {group!r} not in 1..{self.max_group_size}")
        num_params = int4_param_count(shape, group, is_key)
        expect_size(frames[1], 2 * num_params * param_dtype.itemsize, "int4 scales")
        codes = decompress(frames[0], (math.prod(shape) + 1) // 2)
        params = tensor_from(frames[1], param_dtype, (2 * num_params,))
        dequantize = dequantize_int4_keys if is_key else dequantize_int4_values
        x = dequantize(torch.frombuffer(codes, dtype=torch.uint8), params, shape, DTYPES[meta.dtype], group)
        return x, [codes, frames[1]]
