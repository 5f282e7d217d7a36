"""The execution backend: which code multiplies each weight, attends and runs a decode step, decided once at load.

`--kernel` picks it (`choose_backend`): `c` is the C kernel (`quant/kernel.c`, built for this CPU at
first use), `torch` is torch's ops only, `auto` is `c` wherever the kernel builds and loads (a C
compiler and a CPU it compiles for) and `torch` elsewhere, saying why. `--kernel c` where it cannot
be built is one `UsageError` with the reason, never a silent fallback; `--kernel torch` never
builds or calls the kernel.

At load (`model/loader.py`), `Backend.plan(model, …)` then fixes, for that model:
1. each weight's linear method (`quant/methods.py`): quantized weights on the kernel's matmul or
   torch's dequantize fallback, float32 weights as the kernel's GEMM panels or torch's matmul, float
   copies kept for wide steps;
2. the fused decode step (`quant/fused.py`), where the model is float32 and every matmul is on the
   kernel; its packed weights become the quantized linears' method for steps of 5+ rows (int16
   tiles where the kernel has AVX512-VNNI, float tiles elsewhere);
3. the attention (`model/attention.py`): the kernel's paged attention for a float32 model on the
   CPU (its pool float32 or bfloat16, as `--kv-cache-dtype` resolved), else torch's.
The result, an `Execution`, is what the runner calls; `describe()` is what the worker log, the
hello, `model info` and `bench engine` report.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from disagg_cli.errors import UsageError
from disagg_cli.model.attention import AttentionImpl, KernelAttention, TorchAttention
from disagg_cli.model.hardware import QuantChoice
from disagg_cli.model.llama import LlamaForCausalLM
from disagg_cli.model.quant.blocks import QuantizedWeight
from disagg_cli.model.quant.build import KernelUnavailable
from disagg_cli.model.quant.fused import FusedDecoder, fused_decoder, matmuls
from disagg_cli.model.quant.kernels import Kernel, KernelStepOps, load_kernel
from disagg_cli.model.quant.linear import Blocks, QuantizedLinear, quantize_model
from disagg_cli.model.quant.methods import (
    PACKED_MIN_ROWS,
    CFloatPanels,
    CPacked,
    CQuant,
    LinearMethod,
    TorchDequant,
    TorchFloat,
    bf16_linear,
    packed_tiles_name,
    with_tier,
)
from disagg_cli.model.quant.panel import PanelLinear, use_float_gemm


@dataclass(frozen=True)
class Backend:
    name: str  # "c" or "torch"
    reason: str  # why this one, and for c what was built
    kernel: Kernel | None = None  # the C library: there exactly when name == "c"

    def __post_init__(self) -> None:
        assert (self.name == "c") == (self.kernel is not None), self

    def linear_method(self, quant: QuantChoice, w: QuantizedWeight, bias: torch.Tensor | None,
                      dense: torch.Tensor | None, shared: bool) -> LinearMethod:
        """The method of one quantized weight; dense: its float weight, kept for steps of
        `quant.wide_min_rows`+ rows (as bfloat16 where `quant.wide_dtype` says); shared: that float
        weight is the embedding (a tied head), multiplied in place rather than packed again (V × D
        floats) unless it is copied to bfloat16 anyway."""
        method: LinearMethod = TorchDequant(w, bias) if self.kernel is None else CQuant(self.kernel, w, bias)
        if dense is None:
            return method
        wide: LinearMethod
        if quant.wide_dtype == "bfloat16":
            wide = bf16_linear(dense, bias)
        elif self.kernel is not None and not shared and dense.dtype == torch.float32 and dense.device.type == "cpu":
            wide = CFloatPanels(PanelLinear(dense, bias, self.kernel))
        else:
            wide = TorchFloat(dense, bias)
        return with_tier(method, quant.wide_min_rows, wide)

    def plan(self, model: LlamaForCausalLM, quantization: str, blocks: Blocks, quant: QuantChoice,
             float_gemm: bool) -> Execution:
        """Give the loaded (fused, cast) model its linear methods, fused step and attention, in place."""
        keep_dense = quant.keep_dense
        if quantization != "none":
            quantize_model(model, quantization, blocks, partial(self.linear_method, quant), keep_dense)
        elif float_gemm and self.kernel is not None:
            use_float_gemm(model, self.kernel)
        emb = model.model.embed_tokens.weight
        float32_cpu = emb.dtype == torch.float32 and emb.device.type == "cpu"
        dense_min_rows = quant.wide_min_rows if keep_dense else None
        if self.kernel is None:
            return Execution(self, TorchAttention(), None, "the torch backend has no fused step", dense_min_rows)
        fused, why = fused_decoder(model, self.kernel)
        if fused is not None:
            tiles = packed_tiles_name(self.kernel)
            for layer, which, mod in matmuls(model):
                if isinstance(mod, QuantizedLinear):  # from 5 rows, the step's packed copy as tiles
                    mod.method = with_tier(mod.method, PACKED_MIN_ROWS, CPacked(fused, layer, which, tiles))
        if float32_cpu:  # a step's norms, RoPE and SiLU as the fused step computes them
            model.ops = KernelStepOps(self.kernel)
        attention: AttentionImpl = KernelAttention(self.kernel) if float32_cpu else TorchAttention()
        return Execution(self, attention, fused, why, dense_min_rows)


@dataclass(frozen=True)
class Execution:
    """What the backend fixed for one loaded model; the runner calls these."""

    backend: Backend
    attention: AttentionImpl
    fused: FusedDecoder | None  # a decode-only step in one C call, where the model allows it
    fused_reason: str  # what the decode step is, or why it is not fused
    dense_min_rows: int | None  # steps of this many rows run on float copies of the weights (colocated)

    def describe(self) -> dict[str, str]:
        return {"kernel": self.backend.name, "kernel_reason": self.backend.reason,
                "attention": self.attention.name, "decode_step": self.fused_reason}


def choose_backend(requested: str, device: str, cache_dir: Path) -> Backend:
    """The backend for `--kernel requested` on `device`; `c` that cannot be had is a UsageError."""
    if requested == "torch":
        return Backend("torch", "--kernel torch as asked: torch's ops only")
    if device != "cpu":
        if requested == "c":
            raise UsageError(f"--kernel c runs on the CPU only, not --device {device}; pass --kernel torch or auto")
        return Backend("torch", f"auto: torch on {device} (the C kernel is CPU-only)")
    try:
        kernel = load_kernel(cache_dir)
    except KernelUnavailable as e:
        if requested == "c":
            raise UsageError(f"--kernel c: the C kernel cannot be built here: {e}; install gcc (or set CC to a C "
                             "compiler), or pass --kernel torch") from e
        return Backend("torch", f"auto: torch, the C kernel cannot be built here ({e})")
    how = "--kernel c as asked" if requested == "c" else "auto: the C kernel builds here"
    return Backend("c", f"{how}; {kernel.reason}", kernel)
