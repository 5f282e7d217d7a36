"""Prefill-then-decode through the KV cache equals recomputing the whole sequence every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disagg_cli.config import RuntimeConfig
from disagg_cli.model.kv_cache import DenseKVCache, causal_attention
from disagg_cli.model.loader import LoadedModel, load_model
from tests.tiny_models import random_weights, write_gguf

TOLERANCE = {"float32": 1e-4, "bfloat16": 0.15, "float16": 0.02}


def full_logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    cache = DenseKVCache(lm.config, len(ids), lm.dtype, "cpu")
    hidden = lm.model(torch.tensor(ids), torch.arange(len(ids)), cache)
    return lm.model.compute_logits(hidden[-1:])[0]


def check_incremental(lm: LoadedModel, prompt: list[int], steps: int, prefill_chunk: int | None = None) -> float:
    """Greedy-decode `steps` tokens through the cache; return the worst logit gap to recomputation."""
    cache = DenseKVCache(lm.config, len(prompt) + steps, lm.dtype, "cpu")
    chunk = prefill_chunk or len(prompt)
    for start in range(0, len(prompt), chunk):  # chunked prefill exercises offset > 0 with N > 1
        ids = prompt[start : start + chunk]
        hidden = lm.model(torch.tensor(ids), torch.arange(start, start + len(ids)), cache)
        cache.advance(len(ids))
    logits = lm.model.compute_logits(hidden[-1:])[0]
    seq = list(prompt)
    worst = 0.0
    for _ in range(steps):
        ref = full_logits(lm, seq)
        worst = max(worst, (logits - ref).abs().max().item())
        seq.append(int(torch.argmax(ref)))
        hidden = lm.model(torch.tensor(seq[-1:]), torch.tensor([len(seq) - 1]), cache)
        cache.advance(1)
        logits = lm.model.compute_logits(hidden)[0]
    return worst


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tiny_model_incremental_equals_recompute(tmp_path: Path, dtype: str) -> None:
    lm = load_model(write_gguf(tmp_path / "m.gguf", random_weights(seed=5)), RuntimeConfig(dtype=dtype))
    prompt = [5, 9, 31, 2, 77, 40, 12]
    assert check_incremental(lm, prompt, steps=6) <= TOLERANCE[dtype]
    assert check_incremental(lm, prompt, steps=3, prefill_chunk=3) <= TOLERANCE[dtype]


@pytest.mark.slow
def test_default_model_incremental_equals_recompute(default_model: LoadedModel, default_tokenizer) -> None:
    prompt = default_tokenizer.encode("The quick brown fox jumps over the lazy dog. Then it")
    assert check_incremental(default_model, prompt, steps=8) <= TOLERANCE["float32"]
    assert check_incremental(default_model, prompt, steps=2, prefill_chunk=5) <= TOLERANCE["float32"]


def test_grouped_query_attention_equals_repeated_heads() -> None:
    g = torch.Generator().manual_seed(0)
    n, offset, heads, kv, hd = 5, 3, 6, 2, 8
    q = torch.randn(n, heads, hd, generator=g)
    k = torch.randn(offset + n, kv, hd, generator=g)
    v = torch.randn(offset + n, kv, hd, generator=g)
    out = causal_attention(q, k, v, offset)
    # Reference: every query head gets its own copy of its KV head, explicit causal softmax.
    kr = k.repeat_interleave(heads // kv, dim=1)  # (L, H, hd)
    vr = v.repeat_interleave(heads // kv, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, kr) / hd**0.5
    allowed = torch.arange(offset + n)[None, :] <= (torch.arange(n)[:, None] + offset)
    scores = scores.masked_fill(~allowed, float("-inf"))
    ref = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), vr)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
