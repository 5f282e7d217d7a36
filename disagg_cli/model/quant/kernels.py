"""The C kernel's entry points, bound through one typed table and checked against the source at load.

`load_kernel(cache_dir)` builds `kernel.c` (`build.py`), loads it with ctypes and binds every entry
point of `SIGNATURES`: each must exist in the library, and its argument count, argument kinds and
result kind must equal the definition's in `kernel.c` (parsed from the very source that was built),
so a table that drifted from the C raises `KernelBindingError` naming the function, instead of
crashing the process on the first call. ctypes then checks every call's argument count and types.
The thin wrappers below (`matmul`, `gemm`, `decode_attention`, `argmax_rows`) are what the linear
methods, the attention and the engine call.

The fused decode step runs on the library's own small thread pool rather than OpenMP's fork/join,
whose end-of-region barrier waits for every thread: on cores shared with other work that made 2
threads slower than 1. Work called between torch's ops (a prompt's matmuls and attention) runs on
OpenMP's threads, torch's own, where the compiler has OpenMP (`-fopenmp`; kernel.c says why).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from disagg_cli.model.llama import RMSNorm, RotaryEmbedding, StepOps
from disagg_cli.model.quant.blocks import QuantizedWeight
from disagg_cli.model.quant.build import SOURCE, KernelUnavailable, build_kernel, build_key, compiler

_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
CType = type[ctypes.c_void_p] | type[ctypes.c_int] | type[ctypes.c_int64] | type[ctypes.c_float]

# name → (argument types, result type or None for void): every function Python calls.
SIGNATURES: dict[str, tuple[tuple[CType, ...], CType | None]] = {
    "dq_has_openmp": ((), _I),
    "dq_has_avx2": ((), _I),
    "dq_has_vnni": ((), _I),
    "dq_has_q16_tiles": ((), _I),
    # flags, slots, self, threads (see workers/core_lease.py)
    "dq_set_lease": ((_P, _I, _I, _P), _I),
    "dq_lease_threads": ((_I,), _I),
    # kind, x, ldx, M, K, wq, wd, wm, N, y, ldy, nthreads, act_int8
    "dq_matmul": ((_I, _P, _I64, _I, _I, _P, _P, _P, _I, _P, _I64, _I, _I), _I),
    # q, keys, values, block_table, max_blocks, seq_lens, B, H, KV, hd, block_size, scale, out, nthreads, kv_bf16
    "dq_decode_attention": ((_P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _I, _F, _P, _I, _I), _I),
    # x, ldx, M, K, panels, N, bias, y, ldy, nthreads
    "dq_gemm_f32": ((_P, _I64, _I, _I, _P, _I, _P, _P, _I64, _I), _I),
    # logits, B, n, ld, out
    "dq_argmax_rows": ((_P, _I, _I64, _I64, _P), None),
    # L, D, H, KV, hd, F, V, eps, embed, norm_final
    "dq_model_new": ((_I, _I, _I, _I, _I, _I, _I, _F, _P, _P), _P),
    "dq_model_free": ((_P,), None),
    # model, layer, which, kind, N, K, qs, d, mins, bias
    "dq_model_set_weight": ((_P, _I, _I, _I, _I, _I, _P, _P, _P, _P), _I),
    # model, layer, which, N, K, panels, bias
    "dq_model_set_float_weight": ((_P, _I, _I, _I, _I, _P, _P), _I),
    # model, layer, norm_in, norm_post
    "dq_model_set_norms": ((_P, _I, _P, _P), _I),
    # model, layer, which, x, M, y, nthreads
    "dq_model_matmul": ((_P, _I, _I, _P, _I, _P, _I), _I),
    # x, ldx, M, D, weight, eps, out, ldo, nthreads
    "dq_rms_norm_rows": ((_P, _I64, _I, _I, _P, _F, _P, _I64, _I), None),
    # x, ldx, M, heads, hd, positions, cos, sin, nthreads
    "dq_rope_rows": ((_P, _I64, _I, _I, _I, _P, _P, _P, _I), None),
    # gu, M, F, out, nthreads
    "dq_silu_mul_rows": ((_P, _I, _I, _P, _I), None),
    # model, B, tokens, positions, block_table, max_blocks, block_size, keys, values, layer_stride,
    # kv_bf16, cos, sin, nthreads, logits, hidden
    "dq_decode_step": ((_P, _I, _P, _P, _P, _I, _I, _P, _P, _I64, _I, _P, _P, _I, _P, _P), _I),
}
_KIND_NAMES = {_P: "pointer", _I: "int", _I64: "int64_t", _F: "float", None: "void"}


class KernelBindingError(RuntimeError):
    """`SIGNATURES` disagrees with kernel.c: a bug in this package, not in the machine."""


def _c_kind(decl: str) -> CType | None:
    """The ctypes kind of one C parameter or result declaration (its name, if any, ignored)."""
    decl = decl.strip()
    if "*" in decl:
        return _P
    words = decl.replace("const ", "").split()
    if words[0] == "void":
        return None
    kinds: dict[str, CType] = {"int": _I, "int64_t": _I64, "float": _F}
    return kinds[words[0]]


def c_signatures(source: str) -> dict[str, tuple[tuple[CType | None, ...], CType | None]]:
    """Every `dq_*` function defined in the C source: name → (argument kinds, result kind)."""
    out: dict[str, tuple[tuple[CType | None, ...], CType | None]] = {}
    for m in re.finditer(r"^(int|void \*|void)\s*(dq_\w+)\(([^)]*)\)\s*\{", source, re.M):
        params = [p for p in m.group(3).split(",") if p.strip() and p.strip() != "void"]
        out[m.group(2)] = (tuple(_c_kind(p) for p in params), _c_kind(m.group(1)))
    return out


def _describe(args: tuple[CType | None, ...], result: CType | None) -> str:
    return f"({', '.join(_KIND_NAMES[a] for a in args)}) -> {_KIND_NAMES[result]}"


def bind(lib: ctypes.CDLL, source: str) -> None:
    """Give each entry point of `SIGNATURES` its ctypes types, after checking them against `source`."""
    defined = c_signatures(source)
    for name, (args, result) in SIGNATURES.items():
        if name not in defined:
            raise KernelBindingError(f"kernel.c defines no {name}(), which kernels.SIGNATURES binds")
        if defined[name] != (args, result):
            raise KernelBindingError(f"{name}: kernel.c defines {_describe(*defined[name])}, kernels.SIGNATURES "
                                     f"says {_describe(args, result)}; make them agree")
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(args), result


@dataclass(frozen=True)
class Kernel:
    lib: ctypes.CDLL  # every SIGNATURES entry bound and checked
    reason: str  # what was built: SIMD, dot products, threads
    int16_tiles: bool = False  # steps of 5+ rows multiply int16 activations (AVX512-VNNI), not float ones


# Kernels this process has loaded, by build key: a second cache directory (tests, a bench loading
# several modes) reuses the library instead of compiling the same source again (~4 s).
_LOADED: dict[str, Kernel] = {}


def load_kernel(cache_dir: Path) -> Kernel:
    """The compiled kernel, bound; raise KernelUnavailable saying why it cannot be had."""
    cc = compiler()
    source = SOURCE.read_bytes()
    key = build_key(cc, source) if cc else None
    if key is not None and key in _LOADED:
        return _LOADED[key]
    path = build_kernel(cache_dir)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"the built kernel {path} does not load: {e}") from e
    bind(lib, source.decode())
    simd = "AVX2" if lib.dq_has_avx2() else "scalar"
    how = "VNNI" if lib.dq_has_vnni() else ("maddubs" if simd == "AVX2" else "scalar")
    threads = "OpenMP" if lib.dq_has_openmp() else "its own threads"
    tiles = bool(lib.dq_has_q16_tiles())
    wide = ", int16 tiles by AVX512-VNNI" if tiles else ""
    kernel = Kernel(lib, f"C kernel built for this CPU ({simd}, int8 dot products by {how}{wide}, -march=native, "
                         f"{threads})", tiles)
    if key is not None:
        _LOADED[key] = kernel
    return kernel


def matmul(kernel: Kernel, x: torch.Tensor, w: QuantizedWeight, act_int8: bool = False) -> torch.Tensor:
    """x (M, K) float on the CPU → x · wᵀ (M, N) float32 on the C kernel.

    act_int8: round x to int8 blocks first and use integer dot products (llama.cpp's way; faster
    where the CPU has VNNI, less exact); otherwise x stays float32."""
    assert x.device.type == "cpu", "the C kernel multiplies CPU tensors"
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        x = x.float().contiguous()
    m, n = x.shape[0], w.out_features
    y = torch.empty(m, n, dtype=torch.float32)
    kind = 8 if w.kind == "int8" else 4
    rc = kernel.lib.dq_matmul(kind, x.data_ptr(), x.stride(0), m, w.in_features, w.qs.data_ptr(), w.d.data_ptr(),
                              w.m.data_ptr(), n, y.data_ptr(), n,
                              torch.get_num_threads(), int(act_int8))
    if rc != 0:
        raise MemoryError(f"quantized matmul could not allocate its scratch for {m} × {w.in_features}")
    return y


# The pool dtypes the paged attention and the fused step read (and the step writes).
KV_DTYPES = (torch.float32, torch.bfloat16)

PANEL = 16  # output columns per panel of the float GEMM (kernel.c GEMM_NR)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """A float weight (N, K) as the float GEMM reads it: (ceil(N / 16), K, 16) float32, zero past N."""
    n, k = w.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.float32)
    padded[:n] = w.detach().float()
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """pack_panels undone: the weight (N, K)."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n]


def gemm(kernel: Kernel, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) float32 on the CPU · Wᵀ + bias → (M, N) float32, W packed by `pack_panels`."""
    assert panels.dtype == torch.float32 and panels.is_contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    assert panels.shape[1] == k, f"x has {k} features, the weight {panels.shape[1]}"
    y = torch.empty(m, n, dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    kernel.lib.dq_gemm_f32(x.data_ptr(), x.stride(0), m, k, panels.data_ptr(), n,
                           None if bias is None else bias.data_ptr(), y.data_ptr(), n, torch.get_num_threads())
    return y


def decode_attention(kernel: Kernel, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """One new token per sequence over its pooled KV, read in place through its block table.

    q (B, H, hd) float32; keys/values (slots, KV, hd) of one layer, float32 or bfloat16 (widened
    to float32 as they are read); block_table (B, max blocks) int32; seq_lens (B,) int32 keys per
    sequence, the new one included → (B, H, hd) float32.
    """
    assert q.dtype == torch.float32 and keys.dtype == values.dtype and keys.dtype in KV_DTYPES, (q.dtype, keys.dtype)
    assert block_table.dtype == seq_lens.dtype == torch.int32 and keys.is_contiguous() and values.is_contiguous()
    q = q.contiguous()
    b, h, hd = q.shape
    out = torch.empty_like(q)
    rc = kernel.lib.dq_decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), block_table.data_ptr(),
                                        block_table.shape[1], seq_lens.data_ptr(), b, h, keys.shape[1], hd,
                                        block_size, hd ** -0.5, out.data_ptr(), torch.get_num_threads(),
                                        int(keys.dtype == torch.bfloat16))
    if rc != 0:
        raise MemoryError(f"decode attention could not allocate scores for {int(seq_lens.max())} keys")
    return out


def argmax_rows(kernel: Kernel | None, logits: torch.Tensor) -> list[int]:
    """The greedy token of each row of logits (B, V): torch.argmax's answer, first index of the
    largest, read at memory speed by the kernel where there is one (float32 on the CPU)."""
    if (kernel is None or logits.device.type != "cpu" or logits.dtype != torch.float32
            or logits.dim() != 2 or logits.stride(1) != 1):
        return logits.argmax(dim=-1).tolist()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    kernel.lib.dq_argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr())
    return out.tolist()


def reference_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """The fallback and the tests' reference: dequantize, then one float32 matmul."""
    return F.linear(x.float(), w.dequantize().to(x.device))


@dataclass(frozen=True, slots=True)
class _Positions:
    """A step's positions (N,) int32, rotated from the model's cos/sin tables by the kernel."""

    positions: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor


class KernelStepOps(StepOps):
    """RMSNorm, RoPE and SiLU·up of a float32 step on the CPU as the fused decode step computes them:
    one pass each over the rows, split between threads (a 2,048-row prompt step spent 230 ms of its
    1.8 s in torch's dozen ops for them on Zen 4). Anything else goes to torch's ops."""

    def __init__(self, kernel: Kernel) -> None:
        self.lib = kernel.lib

    def rotation(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> object:
        if dtype != torch.float32 or positions.device.type != "cpu":
            return super().rotation(rotary, positions, dtype)
        if positions.numel():
            rotary.ensure(int(positions.max()))
        return _Positions(positions.to(torch.int32).contiguous(), rotary.cos_table, rotary.sin_table)

    def split_rotated(self, qkv: torch.Tensor, heads: int, kv_heads: int, hd: int,
                      rotation: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(rotation, _Positions):
            return super().split_rotated(qkv, heads, kv_heads, hd, rotation)
        qkv = qkv.float().contiguous()  # as every float32 model's projections give it: no copy
        n = qkv.shape[0]
        # q's and k's heads lie side by side at the start of each row: one pass rotates both in place
        self.lib.dq_rope_rows(qkv.data_ptr(), qkv.stride(0), n, heads + kv_heads, hd, rotation.positions.data_ptr(),
                              rotation.cos_table.data_ptr(), rotation.sin_table.data_ptr(), torch.get_num_threads())
        q, k, v = qkv.split((heads * hd, kv_heads * hd, kv_heads * hd), dim=-1)
        return q.view(n, heads, hd), k.view(n, kv_heads, hd), v.view(n, kv_heads, hd)

    def rms_norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        w = norm.weight
        if x.dtype != torch.float32 or x.dim() != 2 or x.stride(-1) != 1 or w.dtype != torch.float32:
            return norm(x)
        out = torch.empty(x.shape, dtype=torch.float32)
        self.lib.dq_rms_norm_rows(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], w.data_ptr(), norm.eps,
                                  out.data_ptr(), x.shape[1], torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor, f: int) -> torch.Tensor:
        if gate_up.dtype != torch.float32 or not gate_up.is_contiguous():
            return super().silu_mul(gate_up, f)
        out = torch.empty(gate_up.shape[0], f, dtype=torch.float32)
        self.lib.dq_silu_mul_rows(gate_up.data_ptr(), gate_up.shape[0], f, out.data_ptr(), torch.get_num_threads())
        return out

