"""The quantized matmul: `kernel.c` built at first use and called through ctypes, or a torch fallback.

1. `load_kernel(cache_dir)` compiles `kernel.c` with the system C compiler (`-O3 -march=native
   -pthread`) into `<cache>/kernels/<hash>/libdisaggq.so`, the hash covering the source, the
   compiler's version and the CPU's flags, so a new CPU or compiler gets its own build and a
   fresh clone needs nothing beyond `pip install -e .`;
2. the build goes to a temporary name and is renamed into place, so workers starting together
   never load a half-written file;
3. when there is no compiler, the build fails, or the library will not load, `load_kernel`
   returns a `Kernel` whose `lib` is None and whose `reason` says why: `matmul` then dequantizes
   and calls `F.linear`, which gives the same numbers within float rounding (slower, never wrong).

The fused decode step runs on the library's own small thread pool rather than OpenMP's fork/join,
whose end-of-region barrier waits for every thread: on cores shared with other work that made 2
threads slower than 1. Work called between torch's ops (a prompt's matmuls and attention) runs on
OpenMP's threads, torch's own, where the compiler has OpenMP (`-fopenmp`; kernel.c says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from disagg_cli.model.quant.blocks import QuantizedWeight

SOURCE = Path(__file__).with_name("kernel.c")
LIB_NAME = "libdisaggq.so"


@dataclass(frozen=True)
class Kernel:
    lib: ctypes.CDLL | None
    reason: str  # what was built or why nothing was
    has_vnni: bool = False  # built with AVX-VNNI / AVX512-VNNI integer dot products

    @property
    def available(self) -> bool:
        return self.lib is not None


def cpu_flags() -> str:
    """The CPU's feature flags (Linux /proc/cpuinfo), or the machine name where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build_key(cc: str, source: bytes) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256(source)
    for part in (version, cpu_flags(), platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_kernel(cache_dir: Path) -> Path:
    """Compile (or find the cached build of) the kernel library; raise RuntimeError with the reason."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    source = SOURCE.read_bytes()
    out_dir = cache_dir / "kernels" / _build_key(cc, source)
    lib = out_dir / LIB_NAME
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    base = [cc, "-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=gnu11", str(SOURCE), "-o", tmp, "-lm"]
    # With OpenMP first (the work between torch's ops then runs on torch's own OpenMP threads), and
    # without it where the compiler has none (a clang without libomp): the library's own pool then.
    for cmd in (base[:4] + ["-fopenmp"] + base[4:], base):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            os.unlink(tmp)
            raise RuntimeError(f"{cc} failed to run: {e}") from e
        if done.returncode == 0:
            break
    if done.returncode != 0:
        os.unlink(tmp)
        first = (done.stderr.strip().splitlines() or ["no output"])[0]
        raise RuntimeError(f"{' '.join(cmd[:5])} … exited {done.returncode}: {first}")
    os.replace(tmp, lib)
    return lib


# Kernels this process has loaded, by build key: a second cache directory (tests, a bench loading
# several modes) reuses the library instead of compiling the same source again (~4 s).
_LOADED: dict[str, Kernel] = {}


def load_kernel(cache_dir: Path) -> Kernel:
    """The compiled kernel, or a `Kernel` without one that says why (the torch fallback runs then)."""
    cc = _compiler()
    key = _build_key(cc, SOURCE.read_bytes()) if cc else None
    if key in _LOADED:
        return _LOADED[key]
    try:
        path = build_kernel(cache_dir)
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError) as e:
        return Kernel(None, f"C kernel unavailable ({e}); using the torch dequantize fallback")
    lib.dq_matmul.restype = ctypes.c_int
    lib.dq_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.dq_decode_attention.restype = ctypes.c_int
    lib.dq_decode_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 5 + [
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    lib.dq_gemm_f32.restype = ctypes.c_int
    lib.dq_gemm_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.dq_argmax_rows.restype = None
    lib.dq_argmax_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    _declare_fused_step(lib)
    vnni = bool(lib.dq_has_vnni())
    simd = "AVX2" if lib.dq_has_avx2() else "scalar"
    how = "VNNI" if vnni else ("maddubs" if simd == "AVX2" else "scalar")
    threads = "OpenMP" if lib.dq_has_openmp() else "its own threads"
    kernel = Kernel(lib, f"C kernel built for this CPU ({simd}, int8 dot products by {how}, -march=native, "
                         f"{threads})", vnni)
    if key is not None:
        _LOADED[key] = kernel
    return kernel


def _declare_fused_step(lib: ctypes.CDLL) -> None:
    """The ctypes signatures of the whole-step entry points (`fused.py` calls them)."""
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.dq_model_new.restype = p
    lib.dq_model_new.argtypes = [i] * 7 + [f, p, p]
    lib.dq_model_free.restype = None
    lib.dq_model_free.argtypes = [p]
    lib.dq_model_set_weight.restype = i
    lib.dq_model_set_weight.argtypes = [p, i, i, i, i, i, p, p, p, p]
    lib.dq_model_set_float_weight.restype = i
    lib.dq_model_set_float_weight.argtypes = [p, i, i, i, i, p, p]
    lib.dq_model_set_norms.restype = i
    lib.dq_model_set_norms.argtypes = [p, i, p, p]
    lib.dq_model_matmul.restype = i
    lib.dq_model_matmul.argtypes = [p, i, i, p, i, p, i]
    lib.dq_decode_step.restype = i
    lib.dq_decode_step.argtypes = [p, i, p, p, p, i, i, p, p, ctypes.c_int64, p, p, i, p, p]


def matmul(kernel: Kernel | None, x: torch.Tensor, w: QuantizedWeight, act_int8: bool = False) -> torch.Tensor:
    """x (M, K) float → x · wᵀ (M, N) float32, with the C kernel when there is one.

    act_int8: round x to int8 blocks first and use integer dot products (llama.cpp's way; faster
    where the CPU has VNNI, less exact); otherwise x stays float32."""
    if kernel is None or kernel.lib is None or x.device.type != "cpu":
        return reference_matmul(x, w)
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
    assert kernel.lib is not None and panels.dtype == torch.float32 and panels.is_contiguous()
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

    q (B, H, hd) float32; keys/values (slots, KV, hd) float32 of one layer; block_table (B, max
    blocks) int32; seq_lens (B,) int32 keys per sequence, the new one included → (B, H, hd).
    """
    assert kernel.lib is not None and q.dtype == keys.dtype == torch.float32
    assert block_table.dtype == seq_lens.dtype == torch.int32 and keys.is_contiguous() and values.is_contiguous()
    q = q.contiguous()
    b, h, hd = q.shape
    out = torch.empty_like(q)
    rc = kernel.lib.dq_decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), block_table.data_ptr(),
                                        block_table.shape[1], seq_lens.data_ptr(), b, h, keys.shape[1], hd,
                                        block_size, hd ** -0.5, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"decode attention could not allocate scores for {int(seq_lens.max())} keys")
    return out


def argmax_rows(kernel: Kernel | None, logits: torch.Tensor) -> list[int]:
    """The greedy token of each row of logits (B, V): torch.argmax's answer, first index of the
    largest, read at memory speed by the kernel where there is one (float32 on the CPU)."""
    if (kernel is None or kernel.lib is None or logits.device.type != "cpu" or logits.dtype != torch.float32
            or logits.dim() != 2 or logits.stride(1) != 1):
        return logits.argmax(dim=-1).tolist()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    kernel.lib.dq_argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr())
    return out.tolist()


def reference_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """The fallback and the tests' reference: dequantize, then one float32 matmul."""
    return F.linear(x.float(), w.dequantize().to(x.device))
