"""One Llama-family decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Covers Llama 2/3, Mistral, SmolLM and Qwen2 (q/k/v bias). Parameter names follow Hugging Face
(`model.layers.N.self_attn.q_proj.weight`, …) so every loader ends in one strict state-dict load.

The model sees a flat batch of tokens, `N` of them from any number of requests, with their
positions. It does not own the KV cache: each layer hands its rotated K and V to an `Attention`
object, which stores them wherever the caller keeps KV (a dense per-request cache, or the paged pool)
and returns the attention output. That keeps storage and batching out of this file.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from disagg_cli.config import ModelConfig

Device = torch.device | str | None


class Attention(Protocol):
    """Stores one layer's new K/V and attends the queries over everything cached so far."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, H, hd), k/v (N, KV, hd) for the N new tokens → output (N, H, hd)."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: Device = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the storage dtype, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (the Hugging Face layout; GGUF's interleaved Q/K are un-permuted on load).

    cos/sin come from a table of every position, computed once, so a step only indexes it (no
    per-step trigonometry or allocation beyond the gather); it grows if a position runs past it.
    """

    def __init__(self, config: ModelConfig, table_len: int = 4096) -> None:
        super().__init__()
        hd = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        if config.rope_freq_factors is not None:
            inv_freq = inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float32)
        # Not parameters: computed from the config, so they stay out of the state dict.
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.cos_table: torch.Tensor
        self.sin_table: torch.Tensor
        self._build(min(table_len, config.max_position_embeddings))

    def _build(self, length: int) -> None:
        freqs = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def ensure(self, max_position: int) -> None:
        """Grow the tables (to twice the need) when a position runs past them."""
        if max_position >= self.cos_table.shape[0]:
            self._build(2 * max_position + 1)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.numel():
            self.ensure(int(positions.max()))
        cos, sin = self.cos_table[positions], self.sin_table[positions]  # (N, hd)
        if dtype != cos.dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos[:, None, :], sin[:, None, :]  # (N, 1, hd)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StepOps:
    """The element-wise parts of a step: RMSNorm, RoPE of q and k, SiLU·up. These are torch's ops
    (any dtype, any device); the execution backend may give the model faster ones at load
    (`quant/kernels.py` `KernelStepOps`: the C kernel's, for float32 on the CPU)."""

    def rotation(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> object:
        """What `split_rotated` needs for this step's positions: here cos and sin (N, 1, hd)."""
        return rotary(positions, dtype)

    def split_rotated(self, qkv: torch.Tensor, heads: int, kv_heads: int, hd: int,
                      rotation: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (N, (H + 2 KV) · hd) → q (N, H, hd) and k (N, KV, hd) rotated, v (N, KV, hd)."""
        n = qkv.shape[0]
        cos, sin = cast(tuple[torch.Tensor, torch.Tensor], rotation)
        q, k, v = qkv.split((heads * hd, kv_heads * hd, kv_heads * hd), dim=-1)
        return (apply_rotary(q.view(n, heads, hd), cos, sin), apply_rotary(k.view(n, kv_heads, hd), cos, sin),
                v.reshape(n, kv_heads, hd))

    def rms_norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x)

    def silu_mul(self, gate_up: torch.Tensor, f: int) -> torch.Tensor:
        """gate_up (N, 2F), gate then up → silu(gate) · up (N, F)."""
        gate, up = gate_up.split(f, dim=-1)
        return F.silu(gate) * up


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device: Device = None) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias, device=device)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias, device=device)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias, device=device)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False, device=device)
        # After loading, `fuse_projections` replaces q/k/v_proj with one matmul of their stacked rows.
        self.qkv_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor, rotation: object, attn: Attention, ops: StepOps) -> torch.Tensor:
        n, h, kv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)  # (N, (H + 2 KV)·hd)
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        q, k, v = ops.split_rotated(qkv, h, kv, hd, rotation)  # (N, H, hd), (N, KV, hd) ×2
        out = attn(self.layer, q, k, v)  # (N, H, hd)
        return self.o_proj(out.reshape(n, h * hd))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, device: Device = None) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.intermediate_size = f
        self.gate_proj = nn.Linear(d, f, bias=False, device=device)
        self.up_proj = nn.Linear(d, f, bias=False, device=device)
        self.down_proj = nn.Linear(f, d, bias=False, device=device)
        self.gate_up_proj: nn.Module | None = None  # gate and up stacked, after `fuse_projections`

    def forward(self, x: torch.Tensor, ops: StepOps) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)  # (N, 2F): gate then up
        else:
            gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)
        return self.down_proj(ops.silu_mul(gate_up, self.intermediate_size))


def fuse_projections(model: LlamaForCausalLM) -> None:
    """Stack q/k/v and gate/up into one Linear each (after the strict load, so HF names load as they are).

    One matmul of the stacked rows gives the same numbers as three (each output row is its own dot
    product) in a third of the calls: fewer, larger matmuls per decode step.
    """
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        a.qkv_proj = _stacked([a.q_proj, a.k_proj, a.v_proj])
        mlp.gate_up_proj = _stacked([mlp.gate_proj, mlp.up_proj])
        del a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj


def _stacked(parts: list[nn.Linear]) -> nn.Linear:
    w = parts[0].weight
    # on the meta device: no random init of weights about to be replaced (0.5 s a load)
    out = nn.Linear(w.shape[1], sum(p.weight.shape[0] for p in parts), bias=parts[0].bias is not None,
                    device="meta", dtype=w.dtype)
    with torch.no_grad():
        out.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=w.requires_grad)
        if out.bias is not None:
            out.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=w.requires_grad)
    return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device: Device = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.self_attn = LlamaAttention(config, layer, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.mlp = LlamaMLP(config, device)

    def forward(self, x: torch.Tensor, rotation: object, attn: Attention, ops: StepOps) -> torch.Tensor:
        x = x + self.self_attn(ops.rms_norm(self.input_layernorm, x), rotation, attn, ops)
        return x + self.mlp(ops.rms_norm(self.post_attention_layernorm, x), ops)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, device: Device = None) -> None:
        super().__init__()
        # On the meta device the embedding is given its (empty) weight, so it draws no random one:
        # its normal_ init there runs through torch's Python reference ops, whose first use imports
        # torch._dynamo (3 s a start). Elsewhere it initialises as usual.
        shape = (config.vocab_size, config.hidden_size)
        meta = torch.empty(shape, device="meta") if torch.device(device or "cpu").type == "meta" else None
        self.embed_tokens = nn.Embedding(*shape, _weight=meta, device=device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)


class LlamaForCausalLM(nn.Module):
    """`device` is where the parameters are made: "meta" for a loader that assigns every weight
    from a checkpoint (no memory, no random init). The RoPE tables are computed on the CPU either way.

    The device is passed to each module rather than set with a `torch.device(...)` context: under
    that context torch routes every factory call through its Python reference ops, whose first use
    imports torch._dynamo (3 s of each worker's start)."""

    def __init__(self, config: ModelConfig, device: Device = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, device)
        self.rotary = RotaryEmbedding(config)
        # A tied head reads the embedding matrix; it has no parameter of its own to load.
        self.lm_head: nn.Module | None = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, device=device)
        self.ops = StepOps()  # the backend may replace it at load (model/backend.py)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Attention) -> torch.Tensor:
        """input_ids, positions (N,) → final hidden states (N, D), after the last norm."""
        x = self.model.embed_tokens(input_ids)  # (N, D)
        ops = self.ops
        rotation = ops.rotation(self.rotary, positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rotation, attn, ops)
        return ops.rms_norm(self.model.norm, x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (M, D) → logits (M, V) in float32, so sampling sees the same numbers in any dtype."""
        if self.lm_head is None:  # tied: the embedding matrix, unless quantization gave a head of its own
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
