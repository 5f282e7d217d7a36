"""What this machine computes well, and the `--dtype auto` / `--quantization auto` choices that follow.

The decisions are pure functions of what was probed (torch's CPU capability string, the CPU's
flags), the device and the execution backend chosen by `--kernel` (`model/backend.py`: "c" or
"torch"), never of what happens to be installed, so each case is a unit test; `probe_cpu` is the
one impure part. Measured on the machines this runs on (see DESIGN.md):
- bf16 is 2–3× faster than f32 where the CPU has AVX512-BF16 or AMX, and hundreds of times slower
  in matmuls where it has not (torch emulates it), so bf16 only where it is native, or on CUDA;
- but bf16 is not the default on the C kernel: prompts in bf16 parted greedy text from float32's
  (end to end, 1P+1D, the agreement prompts: 81.5 % of tokens equal free-running), where every
  `auto` choice below keeps ≥ 99 % (`--dtype bfloat16` trades it for speed where asked);
- decode reads every weight once per token, so it goes as fast as the weights are small: int4
  blocks (the default GGUF's own Q4_1) with the C kernel;
- prefill is compute-bound. Where the CPU has AVX512-VNNI the kernel multiplies int4 weights by
  int16-rounded activations (`vpdpwssd`, twice an FMA's work per instruction): 1.5× its float32
  GEMM at 512 rows and the same greedy text (100 %), so every role keeps the int4 blocks alone.
  Elsewhere float GEMM beats the integer kernel at prompt sizes, so a prefill worker keeps float
  weights and a colocated one keeps both, using float for steps of many rows; those float
  matmuls run on the C kernel's own GEMM, faster than torch's at these shapes (`quant/panel.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

# torch.backends.cpu.get_cpu_capability() names, and /proc/cpuinfo flags, that mean native bf16.
_BF16_CAPABILITY_WORDS = ("BF16", "AMX")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# /proc/cpuinfo flags under which the C kernel (built -march=native) has its int16 tiles (kernel.c)
_INT16_TILE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})
# A step with at least this many rows runs on the float weights when they are kept (colocated):
# float32 GEMM overtook the int8/int4 kernel between 32 and 128 rows on the AVX2 machine; bfloat16
# on torch's matmul (oneDNN: AVX512-BF16 dot products, AMX tiles) overtook the kernel's packed int4
# tiles between 16 and 32 rows on Zen 4 (layers only, 2 threads: 32 rows 869 tok/s against 715).
DENSE_MIN_ROWS = 64
BF16_MIN_ROWS = 16


@dataclass(frozen=True, slots=True)
class CPUInfo:
    capability: str  # torch's, e.g. "AVX2", "AVX512", "AVX512_BF16", "AMX_BF16"
    flags: frozenset[str]

    @property
    def has_native_bf16(self) -> bool:
        return any(w in self.capability.upper() for w in _BF16_CAPABILITY_WORDS) or any(
            f in self.flags for f in _BF16_FLAGS)

    @property
    def has_int16_tiles(self) -> bool:
        """The C kernel multiplies int4 weights by int16 activations here at twice its float32 rate."""
        return self.flags >= _INT16_TILE_FLAGS


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: str
    reason: str


@dataclass(frozen=True, slots=True)
class QuantChoice:
    quantization: str  # "none", "int8" or "int4"
    keep_dense: bool  # also hold float weights, for steps of `wide_min_rows` rows or more
    reason: str
    # float32 weights on the CPU multiplied by the C kernel's GEMM (`quant/panel.py`), not torch's
    float_gemm: bool = False
    # the kept float weights' dtype: bfloat16 where the CPU multiplies it natively (torch's
    # oneDNN matmul on AVX512-BF16 or AMX), float32 (the kernel's GEMM) elsewhere
    wide_dtype: str = "float32"

    @property
    def wide_min_rows(self) -> int:
        return BF16_MIN_ROWS if self.wide_dtype == "bfloat16" else DENSE_MIN_ROWS


def probe_cpu() -> CPUInfo:
    import torch

    from disagg_cli.model.quant.build import cpu_flags

    return CPUInfo(torch.backends.cpu.get_cpu_capability(), frozenset(cpu_flags().split()))


def choose_dtype(requested: str, device: str, cpu: CPUInfo, role: str = "colocated",
                 backend: str = "torch") -> DtypeChoice:
    """The weights' and KV's dtype for `--dtype requested` in this role on this device and CPU;
    backend "c": the C kernel's (its fused decode step, GEMM and paged attention are float32)."""
    native = cpu.has_native_bf16
    kernel = backend == "c"
    if requested != "auto":
        if requested == "bfloat16" and device == "cpu" and not native:
            return DtypeChoice(requested, f"--dtype bfloat16 as asked, but this CPU ({cpu.capability}) has no "
                                          "native bf16: its matmuls are emulated, far slower than float32")
        return DtypeChoice(requested, f"--dtype {requested} as asked")
    if device.startswith("cuda"):
        return DtypeChoice("bfloat16", "auto: CUDA computes bfloat16 natively")
    if device != "cpu":
        return DtypeChoice("float32", f"auto: float32 on {device}")
    bf16 = f"{cpu.capability}{', avx512_bf16' if 'avx512_bf16' in cpu.flags else ''}"
    if native and not kernel:
        return DtypeChoice("bfloat16", f"auto: this CPU computes bfloat16 natively ({bf16})")
    if native:
        # Zen 4, 2 threads: batch-1 decode 207 tok/s in float32 on the fused step against 48 in
        # bfloat16 on torch's ops; prompts in bf16 parted greedy text from float32's (module doc)
        return DtypeChoice("float32", f"auto: float32 for {role} steps, though this CPU computes bfloat16 "
                                      f"natively ({bf16}): the C kernel runs float32 (its fused decode step "
                                      "~4x faster than bfloat16 on torch's ops), and bfloat16 prompts part "
                                      "greedy text from float32's; --dtype bfloat16 trades that for speed")
    return DtypeChoice("float32", f"auto: this CPU ({cpu.capability}) has no native bfloat16 "
                                  "(no AVX512-BF16 or AMX), where float32 is the fast dtype")


def choose_quantization(requested: str, role: str, device: str, backend: str,
                        cpu: CPUInfo | None = None, stored_quantized: bool = True,
                        wide_dtype: str = "float32") -> QuantChoice:
    """Weight quantization for `--quantization requested` in this role, on backend "c" or "torch";
    cpu: what decides the kept float weights' dtype (None: float32); stored_quantized: the
    checkpoint holds quantized blocks (a GGUF's Q8_0/Q4_x), which `auto` keeps as they are; float
    weights `auto` keeps float, for quantizing them would lose what the file has; wide_dtype: the
    kept float weights' dtype asked for (`--wide-dtype`), bfloat16 only where the CPU computes it."""
    kernel = backend == "c"
    if requested != "auto":
        if requested != "none" and device != "cpu":
            from disagg_cli.errors import UsageError

            raise UsageError(f"--quantization {requested} runs on the CPU only; use --device cpu or "
                             "--quantization none")
        note = "" if requested == "none" or kernel else " (torch backend: the slower dequantize fallback)"
        # float weights on the CPU go to the kernel's GEMM wherever it built: at one row it reads
        # the weights at memory speed, where torch's float32 matmul took ~3x as long
        gemm = requested == "none" and device == "cpu" and kernel
        return QuantChoice(requested, False, f"--quantization {requested} as asked{note}", gemm)
    if device != "cpu":
        return QuantChoice("none", False, f"auto: float weights on {device} (the quantized kernel is CPU-only)")
    if not kernel:
        return QuantChoice("none", False, "auto: float weights (torch backend: its dequantize fallback is "
                                          "slower than float matmuls)")
    if not stored_quantized and role != "prefill":
        return QuantChoice("none", False, "auto: float weights, as the checkpoint stores them (quantizing them "
                                          "would lose precision; --quantization int4 or int8 asks for it)", True)
    tiles = cpu is not None and cpu.has_int16_tiles
    if role == "prefill" and not (tiles and stored_quantized):
        return QuantChoice("none", False, "auto: float weights for prefill (compute-bound: float GEMM beats "
                                          "the integer kernel at prompt sizes)", True)
    if role == "prefill":
        return QuantChoice("int4", False, "auto: int4 weights for prefill on the kernel's int16 tiles "
                                          "(AVX512-VNNI: 1.5x its float GEMM at prompt sizes, the same greedy text)")
    if role == "decode":
        return QuantChoice("int4", False, "auto: int4 weights for decode (bandwidth-bound: the fewest bytes "
                                          "per token)")
    if wide_dtype == "bfloat16" and cpu is not None and cpu.has_native_bf16:
        return QuantChoice("int4", True, f"auto: int4 weights for decode steps, bfloat16 copies for steps of "
                                         f"{BF16_MIN_ROWS}+ rows (prompts, wide batches) on torch's matmul, "
                                         f"which this CPU computes natively ({cpu.capability}; --wide-dtype "
                                         "bfloat16 as asked)", True, "bfloat16")
    if tiles:
        return QuantChoice("int4", False, "auto: int4 weights for every step: the kernel's int16 tiles "
                                          "(AVX512-VNNI) run wide steps 1.5x faster than float32 copies would")
    return QuantChoice("int4", True, f"auto: int4 weights for decode steps, float32 copies kept for steps of "
                                     f"{DENSE_MIN_ROWS}+ rows (prefill) on the C GEMM", True)


def choose_kv_cache_dtype(requested: str, dtype: str, quantization: str, device: str, backend: str) -> DtypeChoice:
    """The KV pool's dtype for `--kv-cache-dtype requested`, given the resolved weights' dtype and
    quantization, the device and the backend ("c" or "torch").

    Only the C kernel's attention and fused step read a pool whose dtype differs from the
    activations' (float32 model, bfloat16 pool: widened as read, rounded to nearest even as
    written); torch's SDPA wants the two equal, so elsewhere the pool is the weights' dtype."""
    widens = backend == "c" and device == "cpu" and dtype == "float32"
    if requested != "auto":
        if requested != dtype and not (widens and requested == "bfloat16"):
            from disagg_cli.errors import UsageError

            raise UsageError(f"--kv-cache-dtype {requested} with {dtype} weights needs the C kernel's attention "
                             f"(--kernel c on the CPU, --dtype float32); here the pool must be {dtype}: pass "
                             "--kv-cache-dtype auto")
        return DtypeChoice(requested, f"--kv-cache-dtype {requested} as asked")
    if widens and quantization != "none":
        # Zen 4, 2 threads, batch 32 at ~290 tokens: attention reads 46 KB a token of float32 KV, a
        # third of the step; bf16 halves it, and its rounding (2^-9) is far below int4 weights' error
        return DtypeChoice("bfloat16", f"auto: bfloat16 KV under {quantization} weights: the C kernel's attention "
                                       "widens it as it reads, half the bytes of float32 at a rounding far "
                                       "below the weights'")
    if widens:
        return DtypeChoice("float32", "auto: float32 KV with float32 weights (--quantization none: the exact path)")
    return DtypeChoice(dtype, f"auto: the weights' dtype ({dtype}), which this attention needs")
