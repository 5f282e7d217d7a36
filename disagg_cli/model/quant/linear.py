"""`QuantizedLinear`: a Linear whose weight stays quantized in memory, and the model conversion.

`quantize_model` runs after the strict float load and `fuse_projections`: each decoder matmul
(qkv, o, gate_up, down) and the lm_head become a `QuantizedLinear`. A weight comes straight from
the GGUF's own blocks when they are of the requested kind (Q4_0 / Q4_1 for int4, Q8_0 for int8),
finer (a Q8_0 tensor stays int8 under int4: requantizing it would only lose precision) or
widen exactly (Q4_x under int8); other weights are quantized from their float values. A tied head
gets a quantized copy of the embedding for the logits; the lookup keeps reading the float
embedding (one row per token).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from disagg_cli.model.hardware import DENSE_MIN_ROWS
from disagg_cli.model.quant.blocks import QuantizedWeight, concat_rows, from_gguf_blocks, quantize
from disagg_cli.model.quant.kernels import Kernel, matmul
from disagg_cli.model.quant.panel import PanelLinear

# From this many rows the fused step's quantized panels run as exact float GEMM tiles (kernel.c
# QPANEL_MIN_ROWS), faster than widening each block per row: prompts on a decode worker, mixed steps.
PACKED_MIN_ROWS = 5


class QuantizedLinear(nn.Module):
    """y = x · Wᵀ + b with W held as int8/int4 blocks; optionally the float W too, for big batches."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, kernel: Kernel | None,
                 dense: torch.Tensor | None = None, dense_min_rows: int = DENSE_MIN_ROWS,
                 dense_gemm: PanelLinear | None = None) -> None:
        super().__init__()
        self.weight_q = weight
        self.kernel = kernel
        self.bias: torch.Tensor | None
        self.register_buffer("bias", bias, persistent=False)
        self.dense: torch.Tensor | None
        self.register_buffer("dense", dense, persistent=False)
        # or the float weights as the kernel's GEMM panels (bias included)
        self.dense_gemm = dense_gemm
        self.dense_min_rows = dense_min_rows
        self.in_features, self.out_features = weight.in_features, weight.out_features
        # Set by the fused decode step (`fused.py`) while it lives: its repacked copy of this weight
        # multiplied as float panels (bias included), for steps of PACKED_MIN_ROWS rows or more that
        # do not take the float weights; it returns None once that step is gone.
        self.packed: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.dense_gemm is not None and rows >= self.dense_min_rows:
            return self.dense_gemm(x)
        if self.dense is not None and rows >= self.dense_min_rows:
            return F.linear(x, self.dense, self.bias)
        packed = self.packed
        if packed is not None and rows >= PACKED_MIN_ROWS and x.dtype == torch.float32:
            y = packed(x)
            if y is not None:
                return y
        # Float activations on every CPU, never int8-rounded (VNNI's one-instruction dot product):
        # that parts greedy text from float32's within ~30 tokens (`quantize_row16` in kernel.c) and
        # made one model's numbers differ between AVX2 and VNNI machines.
        y = matmul(self.kernel, x, self.weight_q)  # (N, out) float32
        if self.bias is not None:
            y += self.bias
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    @property
    def has_float(self) -> bool:
        """Float weights are kept too, for steps of dense_min_rows rows or more."""
        return self.dense is not None or self.dense_gemm is not None

    def extra_repr(self) -> str:
        return (f"{self.in_features} → {self.out_features}, {self.weight_q.kind}, "
                f"kernel={'C' if self.kernel and self.kernel.available else 'torch'}, dense={self.has_float}")


# GGUF raw blocks under HF names: name → (GGML type name, raw rows (N, row bytes)), rows already in HF order.
Blocks = Mapping[str, tuple[str, np.ndarray]]


def _weight(name: str, w: torch.Tensor, kind: str, blocks: Blocks) -> QuantizedWeight:
    if name in blocks:
        qtype, raw = blocks[name]
        own = from_gguf_blocks(raw, qtype, w.shape[1])
        if own.kind == kind or own.kind == "int8":  # as stored, or finer than asked (Q8_0 under int4)
            return own
        return own.widened()  # Q4_x asked as int8: the same values, exactly
    return quantize(w, kind)


def _group(names: list[str], weights: list[torch.Tensor], kind: str, blocks: Blocks) -> QuantizedWeight:
    parts = [_weight(n, w, kind, blocks) for n, w in zip(names, weights, strict=True)]
    if len({p.kind for p in parts}) > 1:  # Q8_0 beside Q4_x in one fused group: all as int8, exactly
        parts = [p.widened() for p in parts]
    return concat_rows(parts)


def quantize_model(model: nn.Module, kind: str, blocks: Blocks, kernel: Kernel | None, keep_dense: bool) -> None:
    """Replace the fused model's matmuls (and lm_head) by `QuantizedLinear`s of `kind`, in place."""
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        a, mlp = layer.self_attn, layer.mlp
        h, kv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        qkv = a.qkv_proj.weight
        split = qkv.split((h * hd, kv * hd, kv * hd))
        names = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        a.qkv_proj = _module(_group(names, list(split), kind, blocks), a.qkv_proj, kernel, keep_dense)
        a.o_proj = _module(_weight(p + "self_attn.o_proj.weight", a.o_proj.weight, kind, blocks), a.o_proj,
                           kernel, keep_dense)
        gate_up = mlp.gate_up_proj.weight.split(mlp.intermediate_size)
        names = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        mlp.gate_up_proj = _module(_group(names, list(gate_up), kind, blocks), mlp.gate_up_proj, kernel, keep_dense)
        mlp.down_proj = _module(_weight(p + "mlp.down_proj.weight", mlp.down_proj.weight, kind, blocks),
                                mlp.down_proj, kernel, keep_dense)
    if model.lm_head is None:
        emb = model.model.embed_tokens.weight
        model.lm_head = QuantizedLinear(_weight("model.embed_tokens.weight", emb, kind, blocks), None, kernel,
                                        emb if keep_dense else None)
    else:
        model.lm_head = _module(_weight("lm_head.weight", model.lm_head.weight, kind, blocks), model.lm_head,
                                kernel, keep_dense)


def _module(w: QuantizedWeight, old: nn.Linear, kernel: Kernel | None, keep_dense: bool) -> QuantizedLinear:
    bias = None if old.bias is None else old.bias.detach()
    if not keep_dense:
        return QuantizedLinear(w, bias, kernel)
    weight = old.weight.detach()
    if kernel is not None and kernel.available and weight.dtype == torch.float32 and weight.device.type == "cpu":
        # the float copy as the kernel's GEMM panels (see panel.py), not torch's matmul
        return QuantizedLinear(w, bias, kernel, dense_gemm=PanelLinear(weight, bias, kernel))
    return QuantizedLinear(w, bias, kernel, weight)
