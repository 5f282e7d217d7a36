"""KV codecs: lossless ones bit-exact, lossy ones within their stated bounds, bad payloads refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagg_cli.errors import UsageError
from disagg_cli.kv.codec import AutoCodec, EncodedKV
from disagg_cli.kv.quant import Int4Codec
from disagg_cli.kv.registry import decode_kv, get_codec
from disagg_cli.protocol import CODEC_NAMES, KVMeta, WireError

LOSSLESS = ("none", "lz4", "shuffle-lz4", "auto")
LOSSY = ("int8", "int4")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def kv_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite (k, v) of shape (T, H, D) with a few kinds of value: noise, wide range, repeats."""
    shape: tuple[int, ...] = (
        draw(st.integers(1, 64)),
        draw(st.integers(1, 4)),
        draw(st.sampled_from([8, 16, 64])),
    )
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 3)), *shape)  # a group of layers
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["normal", "wide", "constant", "few-values"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def one() -> torch.Tensor:
        x = torch.randn(shape, generator=gen)
        if kind == "wide":  # magnitudes from 2^-20 to 2^20: exercises tiny and huge scales
            x = x * torch.exp2(torch.randint(-20, 21, shape, generator=gen).float())
        elif kind == "constant":
            x = torch.full(shape, float(x.flatten()[0]))
        elif kind == "few-values":
            x = torch.round(x * 2) / 2
        big = torch.finfo(dtype).max / 2
        return x.clamp(-big, big).to(dtype)

    return one(), one()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def roundtrip(name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[EncodedKV, torch.Tensor, torch.Tensor]:
    enc = get_codec(name).encode(k, v)
    # As a receiver sees them: bytes off the socket, not the sender's buffers.
    k2, v2 = decode_kv(enc.meta, [bytes(memoryview(p)) for p in enc.payloads])
    return enc, k2, v2


@pytest.mark.parametrize("name", LOSSLESS)
@FAST
@given(kv=kv_pairs())
def test_lossless_codecs_are_bit_exact(name: str, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
    k, v = kv
    enc, k2, v2 = roundtrip(name, k, v)
    assert same_bits(k, k2) and same_bits(v, v2)
    assert enc.meta.raw_bytes == 2 * k.nbytes
    assert enc.meta.wire_bytes == sum(len(memoryview(p).cast("B")) for p in enc.payloads)


@pytest.mark.parametrize("name", LOSSLESS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_codecs_keep_special_values(name: str, dtype: torch.dtype) -> None:
    specials = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, float("nan"), 1e-40, -3.5])
    k = specials.repeat(4 * 2 * 8 // len(specials) + 1)[: 4 * 2 * 8].view(4, 2, 8).to(dtype)
    v = k.flip(0).contiguous()
    _, k2, v2 = roundtrip(name, k, v)
    assert same_bits(k, k2) and same_bits(v, v2)  # byte compare: NaN == NaN, -0.0 != 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_none_codec_byte_counts_are_exact(dtype: torch.dtype) -> None:
    T, H, D = 37, 3, 64
    k, v = torch.randn(T, H, D).to(dtype), torch.randn(T, H, D).to(dtype)
    enc = get_codec("none").encode(k, v)
    itemsize = torch.finfo(dtype).bits // 8
    assert enc.meta.raw_bytes == enc.meta.wire_bytes == 2 * T * H * D * itemsize
    assert enc.meta.frame_bytes == (T * H * D * itemsize,) * 2
    # Zero-copy: the payload is the tensor's own memory.
    assert memoryview(enc.payloads[0]).cast("B").tobytes() == k.view(torch.uint8).numpy().tobytes()


def _bound_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-element error allowed by Int8Codec's docstring (plus float32 arithmetic slack)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127) * (1 + 2**-10) + 2**-24
    return _plus_rounding(scale / 2, xf, x.dtype)


def _plus_rounding(err: torch.Tensor, xf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Casting x̂ to the dtype adds half an ulp of |x̂| <= |x| + err; float32 math adds a little more.
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal
    return err + (xf.abs() + err) * (eps / 2 + 2**-20) + tiny


def _bound_int4(x: torch.Tensor, is_key: bool, group: int) -> torch.Tensor:
    """Per-element error allowed by Int4Codec's docstring, groups computed independently."""
    xf = x.float().reshape(-1, *x.shape[-3:])  # (L, T, H, D)
    err = torch.empty_like(xf)
    if is_key:  # per channel, over groups of `group` tokens
        for t0 in range(0, xf.shape[1], group):
            seg = xf[:, t0 : t0 + group]
            err[:, t0 : t0 + group] = _asym_err(seg.amin(1, keepdim=True), seg.amax(1, keepdim=True))
    else:  # per token, over groups of channels
        gv = group if xf.shape[-1] % group == 0 else xf.shape[-1]
        for d0 in range(0, xf.shape[-1], gv):
            seg = xf[..., d0 : d0 + gv]
            err[..., d0 : d0 + gv] = _asym_err(seg.amin(-1, keepdim=True), seg.amax(-1, keepdim=True))
    return _plus_rounding(err.reshape(x.shape), x.float(), x.dtype)


def _asym_err(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    scale = (hi - lo + lo.abs() * 2**-10 + 2**-24) / 15 * (1 + 2**-10) + 2**-24
    return scale / 2 + (lo.abs() + hi.abs()) * 2**-21


@pytest.mark.parametrize("name", LOSSY)
@FAST
@given(kv=kv_pairs())
def test_lossy_codecs_stay_within_their_bounds(name: str, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
    k, v = kv
    enc, k2, v2 = roundtrip(name, k, v)
    assert k2.dtype == k.dtype and k2.shape == k.shape and v2.shape == v.shape
    for x, x2, is_key in ((k, k2, True), (v, v2, False)):
        bound = _bound_int8(x) if name == "int8" else _bound_int4(x, is_key, 64)
        err = (x2.float() - x.float()).abs()
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@FAST
@given(kv=kv_pairs(), group=st.sampled_from([8, 32]))
def test_int4_smaller_groups_stay_within_bounds(kv: tuple[torch.Tensor, torch.Tensor], group: int) -> None:
    k, v = kv
    enc = Int4Codec(group_size=group).encode(k, v)
    k2, v2 = decode_kv(enc.meta, enc.payloads)
    assert enc.meta.params["group_size"] == group
    assert bool(((k2.float() - k.float()).abs() <= _bound_int4(k, True, group)).all())
    assert bool(((v2.float() - v.float()).abs() <= _bound_int4(v, False, group)).all())


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_codecs_shrink_16_bit_kv(name: str) -> None:
    k, v = torch.randn(256, 3, 64).bfloat16(), torch.randn(256, 3, 64).bfloat16()
    enc = get_codec(name).encode(k, v)
    ratio = enc.meta.raw_bytes / enc.meta.wire_bytes
    assert ratio >= (1.9 if name == "int8" else 3.5), ratio


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_codecs_refuse_non_finite_kv(name: str) -> None:
    k = torch.zeros(4, 1, 8)
    k[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        get_codec(name).encode(k, torch.zeros(4, 1, 8))


def _encoded(name: str) -> EncodedKV:
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(40, 2, 16, generator=gen).bfloat16(), torch.randn(40, 2, 16, generator=gen).bfloat16()
    return get_codec(name).encode(k, v)


@pytest.mark.parametrize("name", CODEC_NAMES)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_a_flipped_byte_is_caught(name: str, data: st.DataObject) -> None:
    enc = _encoded(name)
    payloads = [bytearray(memoryview(p).cast("B")) for p in enc.payloads]
    i = data.draw(st.integers(0, len(payloads) - 1))
    j = data.draw(st.integers(0, len(payloads[i]) - 1))
    payloads[i][j] ^= data.draw(st.integers(1, 255))
    with pytest.raises(WireError) as err:
        decode_kv(enc.meta, payloads)
    assert err.value.reason in ("bad-checksum", "bad-payload")


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_truncated_and_oversized_payloads_are_refused(name: str) -> None:
    enc = _encoded(name)
    payloads = [bytes(memoryview(p).cast("B")) for p in enc.payloads]
    for bad, reason in (
        ([payloads[0][:-1], *payloads[1:]], "truncated"),
        (payloads[:-1], "truncated"),
        ([payloads[0] + b"\0", *payloads[1:]], "oversized"),
        ([*payloads, b"x"], "oversized"),
    ):
        with pytest.raises(WireError) as err:
            decode_kv(enc.meta, bad)
        assert err.value.reason == reason


@pytest.mark.parametrize("name", ("lz4", "shuffle-lz4", "int8", "int4"))
def test_a_consistently_truncated_lz4_frame_is_refused(name: str) -> None:
    # A sender that lies consistently (sizes match the short frame) still cannot pass.
    enc = _encoded(name)
    payloads = [bytes(memoryview(p).cast("B")) for p in enc.payloads]
    payloads[0] = payloads[0][: len(payloads[0]) // 2]
    sizes = tuple(len(p) for p in payloads)
    meta = dataclasses.replace(enc.meta, frame_bytes=sizes, wire_bytes=sum(sizes))
    with pytest.raises(WireError) as err:
        decode_kv(meta, payloads)
    assert err.value.reason == "bad-payload"


def test_forged_metadata_is_refused() -> None:
    enc = _encoded("int4")
    for change in (
        {"codec": "zstd"},
        {"params": {"group_size": 2**40, "k": "float16", "v": "float16"}},
        {"params": {"group_size": 64, "k": "int8", "v": "float16"}},
    ):
        with pytest.raises(WireError) as err:
            decode_kv(dataclasses.replace(enc.meta, **change), enc.payloads)
        assert err.value.reason == "bad-field"
    with pytest.raises(WireError) as err:  # shape and raw_bytes disagree
        KVMeta(**{**{f: getattr(enc.meta, f) for f in KVMeta.__dataclass_fields__}, "shape": (40, 2, 17)})
    assert err.value.reason == "bad-field"


def test_auto_sends_raw_on_a_fast_link_and_compresses_on_a_slow_one() -> None:
    k = torch.zeros(512, 2, 64).bfloat16()  # compresses ~100x
    v = torch.randn(512, 2, 64, generator=torch.Generator().manual_seed(1)).half()[..., :64].bfloat16()
    slow = AutoCodec(link_bytes_per_s=1e6).encode(k, v)
    fast = AutoCodec(link_bytes_per_s=1e15).encode(k, v)
    assert slow.meta.params["k"] == "shuffle-lz4" and slow.meta.wire_bytes < slow.meta.raw_bytes
    assert fast.meta.params == {"k": "none", "v": "none"} and fast.meta.wire_bytes == fast.meta.raw_bytes
    noise = torch.randint(-(2**15), 2**15, (512, 2, 64), dtype=torch.int16).view(torch.float16)
    noise = torch.nan_to_num(noise)  # random bits do not compress: auto keeps them raw
    assert get_codec("auto").encode(noise, noise).meta.params == {"k": "none", "v": "none"}
    for enc in (slow, fast):
        k2, v2 = decode_kv(enc.meta, enc.payloads)
        assert same_bits(k, k2) and same_bits(v, v2)


def test_unknown_codec_name_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError, match="none, lz4, shuffle-lz4, auto, int8, int4"):
        get_codec("zstd")
    assert {get_codec(n).name for n in CODEC_NAMES} == set(CODEC_NAMES)
