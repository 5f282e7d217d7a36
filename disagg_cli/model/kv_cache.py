"""A dense KV cache for one request, and the attention arithmetic every cache shares.

`DenseKVCache` preallocates every layer's K and V for one request (prompt plus the tokens it may
generate) so each decode step appends one token and reuses the rest. Its storage is token-major per
layer, `(num_tokens, num_kv_heads, head_dim)`, the same layout the wire uses. The engine's paged
pool replaces this storage for batched serving; this cache is the single-request reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disagg_cli.config import ModelConfig


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """Attention of N new queries over L cached keys, the new ones being the last N of them.

    q (N, H, hd); k, v (L, KV, hd) with L = offset + N → (N, H, hd). Query heads that share a KV
    head are folded into the row axis, so grouped-query attention never copies K or V per head.
    """
    n, num_heads, hd = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    qg = q.permute(1, 0, 2).reshape(num_kv, group * n, hd)  # (KV, g*N, hd); row = g_idx*N + i
    kt = k.transpose(0, 1)  # (KV, L, hd)
    vt = v.transpose(0, 1)  # (KV, L, hd)
    if n == 1:
        out = F.scaled_dot_product_attention(qg, kt, vt)  # one query sees every cached token
    elif offset == 0:
        # A fresh prompt: 4-D with is_causal and no mask lets torch take its fused (flash) kernel,
        # which on CPU is ~6x faster at 2k tokens than the masked math path; enable_gqa shares
        # K/V between query heads without copying them.
        out4 = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kt[None], vt[None], is_causal=True,
                                              enable_gqa=True)  # (1, H, N, hd)
        return out4[0].transpose(0, 1)
    else:
        out = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=_causal_mask(n, offset, group, q.device))
    return out.reshape(num_kv, group, n, hd).permute(2, 0, 1, 3).reshape(n, num_heads, hd)


def _causal_mask(n: int, offset: int, group: int, device: torch.device) -> torch.Tensor:
    """(g*N, offset+N) booleans: query i may see key j when j <= offset + i."""
    rows = torch.arange(n, device=device)[:, None] + offset
    cols = torch.arange(offset + n, device=device)[None, :]
    return (cols <= rows).repeat(group, 1)


class DenseKVCache:
    """Every layer's K and V for one request, filled front to back.

    Life of a step: the model calls the cache once per layer with the step's new K/V (stored at
    `num_tokens …`), then the caller calls `advance(n)` to commit them.
    """

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """dtype: the KV's (`LoadedModel.kv_dtype`); a bfloat16 cache under float32 activations is
        widened as read, as the C kernel's paged attention reads its pool."""
        shape = (config.num_layers, capacity, config.num_kv_heads, config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # (layers, capacity, KV, hd)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.num_tokens = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, end = self.num_tokens, self.num_tokens + k.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"KV cache holds {self.capacity} tokens; step needs {end}")
        self.keys[layer, start:end] = k  # rounded where the cache is narrower (bfloat16 KV)
        self.values[layer, start:end] = v
        keys, values = self.keys[layer, :end].to(q.dtype), self.values[layer, :end].to(q.dtype)
        return causal_attention(q, keys, values, start)

    def advance(self, n: int) -> None:
        self.num_tokens += n
