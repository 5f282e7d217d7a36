"""Linear methods: the code that multiplies one weight, picked per weight at load (vLLM's `quant_method`).

A `QuantizedLinear` holds one method and its forward is one call into it. The backend
(`model/backend.py`) picks them when the model loads and says which in `extra_repr`:
- `TorchDequant`: the torch fallback, dequantize then one float32 matmul (exact, slower);
- `CQuant`: the C kernel's quantized matmul, float activations (never int8-rounded: that parted
  greedy text from float32's within ~30 tokens and made numbers differ between AVX2 and VNNI CPUs);
- `CPacked`: the fused decode step's panel-ordered copy of the weight, for steps of
  `PACKED_MIN_ROWS`+ rows (prompts, mixed steps, decode batches): widened to int16 and multiplied
  by int16-rounded activations on `vpdpwssd` tiles where the kernel was built with AVX512-VNNI
  (1.5x the float GEMM at 512 rows, greedy text unchanged), else widened to float and run on the
  GEMM's tiles (exact). The fused step owns that copy; the method holds the step;
- `TorchFloat` / `CFloatPanels` / `TorchBF16`: float weights kept beside the quantized ones
  (colocated workers), on torch's matmul, the kernel's GEMM or, as bfloat16 copies where the CPU
  multiplies bfloat16 natively, torch's oneDNN matmul, for steps of many rows (prefill is
  compute-bound);
- `ByRows`: the methods above by the step's row count, thresholds fixed at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from disagg_cli.model.quant.blocks import QuantizedWeight
from disagg_cli.model.quant.kernels import Kernel, matmul, reference_matmul
from disagg_cli.model.quant.panel import PanelLinear

# From this many rows the fused step's quantized panels run as tiles (kernel.c QPANEL_MIN_ROWS:
# int16 ones where it has AVX512-VNNI, else exact float GEMM ones), faster than the row-wise kernel.
PACKED_MIN_ROWS = 5


class LinearMethod(Protocol):
    @property
    def name(self) -> str:
        """What multiplies the weight, as `extra_repr` shows it."""
        ...

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) → x · Wᵀ + b (M, N), float32 (or x's dtype for a float weight)."""
        ...


class PackedWeights(Protocol):
    """The fused decode step's own copy of the model's weights (`fused.FusedDecoder`)."""

    def matmul(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor: ...


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y += bias
    return y


@dataclass(frozen=True, eq=False)
class TorchDequant:
    weight: QuantizedWeight
    bias: torch.Tensor | None
    name: str = "dequantized on torch"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(reference_matmul(x, self.weight), self.bias)


@dataclass(frozen=True, eq=False)
class CQuant:
    kernel: Kernel
    weight: QuantizedWeight
    bias: torch.Tensor | None
    name: str = "C quantized matmul"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(matmul(self.kernel, x, self.weight), self.bias)


@dataclass(frozen=True, eq=False)
class CPacked:
    fused: PackedWeights
    layer: int  # -1: the head
    which: str  # "qkv", "o", "gate_up", "down" or "head"
    name: str = "C packed float tiles"  # or int16 tiles (`packed_tiles_name`)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.matmul(self.layer, self.which, x)  # bias included


def packed_tiles_name(kernel: Kernel) -> str:
    return "C packed int16 tiles" if kernel.int16_tiles else "C packed float tiles"


@dataclass(frozen=True, eq=False)
class TorchFloat:
    weight: torch.Tensor
    bias: torch.Tensor | None
    name: str = "float on torch"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# oneDNN packs a weight for the row count it expects; 512 rows (a prompt chunk) served every row
# count from 7 to 512 best on Zen 4 (30 layers, 2 threads: 32 rows 22.9 ms against 30.7 for
# F.linear, which reorders the weight on every call; 512 rows 258 against 314 ms; identical numbers).
PACK_ROWS = 512


@dataclass(frozen=True, eq=False)
class TorchBF16:
    """bfloat16 copies of the weights on torch's oneDNN matmul (AVX512-BF16 dot products or AMX
    tiles where the CPU has them), for wide steps; activations are rounded to bfloat16 on the way
    in, float32 out. `packed`: the weight is in oneDNN's own blocked layout (`bf16_linear`)."""

    weight: torch.Tensor  # (N, K) bfloat16, or oneDNN's packing of it
    bias: torch.Tensor | None
    packed: bool
    name: str = "bfloat16 on oneDNN"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(xb, self.weight, None, "none", [], "")
        else:
            y = F.linear(xb, self.weight)
        return _add_bias(y.float(), self.bias)


def bf16_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> TorchBF16:
    """A bfloat16 copy of `weight`, packed once for oneDNN where this torch can (else plain)."""
    w = weight.detach().to(torch.bfloat16).contiguous()
    if w.device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return TorchBF16(torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS), bias, True)
        except (RuntimeError, AttributeError):  # a torch without the op: the plain matmul
            pass
    return TorchBF16(w, bias, False)


@dataclass(frozen=True, eq=False)
class CFloatPanels:
    panels: PanelLinear
    name: str = "float on the C GEMM"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.panels(x)


@dataclass(frozen=True, eq=False)
class ByRows:
    """The first method whose minimum row count the step reaches; the last one's is 0."""

    tiers: tuple[tuple[int, LinearMethod], ...]  # (min rows, method), min rows descending

    def __post_init__(self) -> None:
        mins = [m for m, _ in self.tiers]
        assert mins == sorted(mins, reverse=True) and mins[-1] == 0, mins

    @property
    def name(self) -> str:
        return ", ".join(f"{m.name} from {n} rows" if n else m.name for n, m in self.tiers)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        for min_rows, method in self.tiers:
            if rows >= min_rows:
                return method.apply(x)
        raise AssertionError("the last tier takes every row count")


def with_tier(method: LinearMethod, min_rows: int, faster: LinearMethod) -> LinearMethod:
    """`method`, with `faster` for steps from `min_rows` up to the next tier above it."""
    tiers = list(method.tiers) if isinstance(method, ByRows) else [(0, method)]
    tiers.append((min_rows, faster))
    return ByRows(tuple(sorted(tiers, key=lambda t: -t[0])))
