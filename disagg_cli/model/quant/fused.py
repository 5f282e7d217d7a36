"""A whole decode step of a float32 model in one call into the C kernel (`dq_decode_step`).

Eager torch runs some twenty small ops per layer in a decode step; at batch 1 their dispatch and
allocations cost more than the matmuls themselves. `FusedDecoder` gives the kernel the model once:
quantized weights are copied and repacked in groups of 4 output rows (the kernel owns that copy);
float panels, the norms, biases and embedding are read in place (this object keeps them
referenced). It then runs each decode-only step of B sequences, one token each, as a single call:
every layer, the KV writes into the pool, paged attention, the final norm and the head.

It takes the model as `quantize_model` left it (float32 on the CPU, every decoder matmul and the
head a `QuantizedLinear` with the C kernel), or as `use_float_gemm` left it (every matmul and the
head a float32 `PanelLinear`, multiplied on the kernel's GEMM at any batch size). For quantized
weights, below 5 rows its matmuls round activations to int16 per block of 32; from 5 rows they
widen a panel-ordered copy of the quants to float and multiply it on the GEMM's tiles, exactly; the
backend gives the model's `QuantizedLinear`s that copy for their own steps of 5+ rows at load
(`methods.CPacked`). Logits agree with the torch path to ~1e-4 relative.
`fused_decoder(model, kernel)` says why not when the model is not of that shape. It is built once
per loaded model; its scratch is shared, so a step holds a lock (one engine thread calls it).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from disagg_cli.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from disagg_cli.model.quant.blocks import QuantizedWeight
from disagg_cli.model.quant.kernels import KV_DTYPES, Kernel
from disagg_cli.model.quant.linear import QuantizedLinear
from disagg_cli.model.quant.panel import PanelLinear

_WHICH = {"qkv": 0, "o": 1, "gate_up": 2, "down": 3, "head": 4}


def matmuls(model: LlamaForCausalLM) -> list[tuple[int, str, nn.Module]]:
    """(layer, which, module) of every matmul the step runs; the head is layer -1."""
    out: list[tuple[int, str, nn.Module]] = []
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer, LlamaDecoderLayer)
        a, mlp = layer.self_attn, layer.mlp
        for which, mod in (("qkv", a.qkv_proj), ("o", a.o_proj), ("gate_up", mlp.gate_up_proj),
                           ("down", mlp.down_proj)):
            assert mod is not None, "fuse_projections runs first"
            out.append((i, which, mod))
    assert model.lm_head is not None
    return out + [(-1, "head", model.lm_head)]


def fused_decoder(model: LlamaForCausalLM, kernel: Kernel) -> tuple[FusedDecoder | None, str]:
    """The fused step for this model, or None and the reason it cannot have one."""
    emb = model.model.embed_tokens.weight
    if emb.dtype != torch.float32 or emb.device.type != "cpu":
        return None, "the fused decode step needs float32 weights on the CPU"
    mods = [m for _, _, m in matmuls(model)]
    if not (all(isinstance(m, QuantizedLinear) for m in mods)
            or all(isinstance(m, PanelLinear) and m.kernel is kernel for m in mods)):
        return None, ("the fused decode step needs every matmul quantized (--quantization int8/int4) or "
                      "float32 on the kernel's GEMM")
    return FusedDecoder(model, kernel), "fused C decode step"


class FusedDecoder:
    def __init__(self, model: LlamaForCausalLM, kernel: Kernel) -> None:
        self.lib = kernel.lib
        self.rotary = model.rotary
        self._lock = threading.Lock()
        c = model.config
        self.vocab_size = c.vocab_size
        self._handle = self.lib.dq_model_new(c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                             c.intermediate_size, c.vocab_size, c.rms_norm_eps,
                                             model.model.embed_tokens.weight.data_ptr(),
                                             model.model.norm.weight.data_ptr())
        if not self._handle:
            raise MemoryError("the fused decode step could not allocate its model")
        # the tensors the kernel reads in place: embedding, norms, biases
        self._keep: list[torch.Tensor] = [model.model.embed_tokens.weight, model.model.norm.weight]
        self._out: dict[tuple[int, str], int] = {}  # output features of each weight
        for i, layer in enumerate(model.model.layers):
            assert isinstance(layer, LlamaDecoderLayer)
            self._norms(i, layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        for i, which, mod in matmuls(model):
            assert isinstance(mod, QuantizedLinear | PanelLinear)
            self._weight(i, which, mod)

    def _norms(self, layer: int, norm_in: torch.Tensor, norm_post: torch.Tensor) -> None:
        for t in (norm_in, norm_post):
            assert t.dtype == torch.float32 and t.is_contiguous()
        self._keep += [norm_in, norm_post]
        self.lib.dq_model_set_norms(self._handle, layer, norm_in.data_ptr(), norm_post.data_ptr())

    def _weight(self, layer: int, which: str, mod: QuantizedLinear | PanelLinear) -> None:
        if isinstance(mod, PanelLinear):  # float32: the step reads its panels (and bias) in place
            self._keep += [mod.panels] + ([] if mod.bias is None else [mod.bias])
            self._out[(layer, which)] = mod.out_features
            if self.lib.dq_model_set_float_weight(self._handle, layer, _WHICH[which], mod.out_features,
                                                  mod.in_features, mod.panels.data_ptr(),
                                                  None if mod.bias is None else mod.bias.data_ptr()) != 0:
                raise ValueError(f"the fused decode step refused the {which} weight of layer {layer}")
            return
        w = mod.weight_q
        bias = mod.bias
        if bias is not None:
            bias = bias.float().contiguous()
        if bias is not None:
            self._keep.append(bias)
        self._out[(layer, which)] = w.out_features
        rc = self.lib.dq_model_set_weight(self._handle, layer, _WHICH[which], 8 if w.kind == "int8" else 4,
                                          w.out_features, w.in_features, w.qs.data_ptr(), w.d.data_ptr(),
                                          w.m.data_ptr(), None if bias is None else bias.data_ptr())
        if rc != 0:
            raise ValueError(f"the fused decode step refused the {which} weight of layer {layer}")

    def matmul(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) · Wᵀ + b with one of the model's weights as the step holds it (repacked); from
        5 rows (float tiles) it needs no scratch, so it runs beside a step without the lock."""
        x = x.contiguous()
        y = torch.empty(x.shape[0], self._out[(layer, which)], dtype=torch.float32)
        rc = self.lib.dq_model_matmul(self._handle, layer, _WHICH[which], x.data_ptr(), x.shape[0], y.data_ptr(),
                                      torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"the fused step's matmul could not allocate for {x.shape[0]} rows")
        return y

    def __del__(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self.lib.dq_model_free(handle)

    def step(self, tokens: list[int], positions: list[int], block_table: torch.Tensor, block_size: int,
             keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One decode step of B sequences → logits (B, V) float32.

        tokens, positions: each sequence's new token and its position; block_table (B, max blocks)
        int32 of block ids; keys/values the pool, (layers, slots, KV, hd) float32 or bfloat16 and
        contiguous: each new K/V lands in slot table[pos // block_size] · block_size + pos %
        block_size (rounded to nearest even into a bfloat16 pool, as torch's cast rounds)."""
        b = len(tokens)
        assert keys.dtype == values.dtype and keys.dtype in KV_DTYPES, keys.dtype
        assert keys.is_contiguous() and values.is_contiguous()
        assert block_table.dtype == torch.int32 and block_table.is_contiguous() and block_table.shape[0] == b
        rotary = self.rotary
        tok = torch.tensor(tokens, dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.int32)
        logits = torch.empty(b, self.vocab_size, dtype=torch.float32)
        with self._lock:  # the model's scratch is one per load
            rotary.ensure(max(positions))
            rc = self.lib.dq_decode_step(self._handle, b, tok.data_ptr(), pos.data_ptr(), block_table.data_ptr(),
                                         block_table.shape[1], block_size, keys.data_ptr(), values.data_ptr(),
                                         keys[0].numel(), int(keys.dtype == torch.bfloat16),
                                         rotary.cos_table.data_ptr(),
                                         rotary.sin_table.data_ptr(), torch.get_num_threads(), logits.data_ptr(),
                                         None)
        if rc == -2:
            raise ValueError(f"a token id is outside the vocabulary of {self.vocab_size}")
        if rc == -3:
            raise ValueError(f"a position lies past its block table of {block_table.shape[1]} blocks")
        if rc != 0:
            raise MemoryError(f"the fused decode step could not allocate its scratch for {b} sequences")
        return logits


def step_matmul(kernel: Kernel, x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x (M, K) · wᵀ as the fused step computes it (its repacked weight, int16-rounded activations
    below QPANEL_MIN_ROWS rows, float panels from there): for tests and measurements."""
    lib = kernel.lib
    x = x.float().contiguous()
    m, k = x.shape
    handle = lib.dq_model_new(1, k, 1, 1, k, k, w.out_features, 1e-5, None, None)
    if not handle:
        raise MemoryError("could not allocate a model for the step's matmul")
    try:
        rc = lib.dq_model_set_weight(handle, 0, _WHICH["qkv"], 8 if w.kind == "int8" else 4, w.out_features,
                                     w.in_features, w.qs.data_ptr(), w.d.data_ptr(), w.m.data_ptr(), None)
        y = torch.empty(m, w.out_features, dtype=torch.float32)
        if rc == 0:
            rc = lib.dq_model_matmul(handle, 0, _WHICH["qkv"], x.data_ptr(), m, y.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"the step's matmul could not allocate for {m} × {k}")
        return y
    finally:
        lib.dq_model_free(handle)
