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
from torch import nn

from disagg_cli.model.quant.blocks import QuantizedWeight, concat_rows, from_gguf_blocks, quantize
from disagg_cli.model.quant.methods import LinearMethod

# The backend's choice of method for one weight: (quantized weight, bias, the float weight when kept
# too, whether that float weight is shared with the embedding) → the method (`methods.py`).
MethodFor = Callable[[QuantizedWeight, torch.Tensor | None, torch.Tensor | None, bool], LinearMethod]


class QuantizedLinear(nn.Module):
    """y = x · Wᵀ + b with W held as int8/int4 blocks, multiplied by the method picked at load."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, method: LinearMethod) -> None:
        super().__init__()
        self.weight_q = weight
        self.bias: torch.Tensor | None
        self.register_buffer("bias", bias, persistent=False)
        self.method = method  # replaced once at load when the fused step's packed weights exist
        self.in_features, self.out_features = weight.in_features, weight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(x)  # (N, out)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} → {self.out_features}, {self.weight_q.kind}, {self.method.name}"


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


def quantize_model(model: nn.Module, kind: str, blocks: Blocks, method_for: MethodFor, keep_dense: bool) -> None:
    """Replace the fused model's matmuls (and lm_head) by `QuantizedLinear`s of `kind`, in place, each
    multiplied by `method_for`'s choice; keep_dense: their float weights are kept too."""
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        a, mlp = layer.self_attn, layer.mlp
        h, kv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        qkv = a.qkv_proj.weight
        split = qkv.split((h * hd, kv * hd, kv * hd))
        names = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        a.qkv_proj = _module(_group(names, list(split), kind, blocks), a.qkv_proj, method_for, keep_dense)
        a.o_proj = _module(_weight(p + "self_attn.o_proj.weight", a.o_proj.weight, kind, blocks), a.o_proj,
                           method_for, keep_dense)
        gate_up = mlp.gate_up_proj.weight.split(mlp.intermediate_size)
        names = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        mlp.gate_up_proj = _module(_group(names, list(gate_up), kind, blocks), mlp.gate_up_proj, method_for, keep_dense)
        mlp.down_proj = _module(_weight(p + "mlp.down_proj.weight", mlp.down_proj.weight, kind, blocks),
                                mlp.down_proj, method_for, keep_dense)
    if model.lm_head is None:
        emb = model.model.embed_tokens.weight
        w = _weight("model.embed_tokens.weight", emb, kind, blocks)
        model.lm_head = QuantizedLinear(w, None, method_for(w, None, emb if keep_dense else None, True))
    else:
        model.lm_head = _module(_weight("lm_head.weight", model.lm_head.weight, kind, blocks), model.lm_head,
                                method_for, keep_dense)


def _module(w: QuantizedWeight, old: nn.Linear, method_for: MethodFor, keep_dense: bool) -> QuantizedLinear:
    bias = None if old.bias is None else old.bias.detach()
    return QuantizedLinear(w, bias, method_for(w, bias, old.weight.detach() if keep_dense else None, False))
