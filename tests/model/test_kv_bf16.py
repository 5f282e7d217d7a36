"""A bfloat16 KV pool on the C kernel (`--kv-cache-dtype bfloat16`, float32 compute).

The paged attention reading bf16 K/V equals torch's attention over the same K/V widened to
float32 (decodes, prompts and chunks, scattered block tables); the fused step writes its new K/V
rounded exactly as torch's `.to(torch.bfloat16)` rounds; a whole engine run on a bf16 pool gives
the fused step's and the torch path's tokens alike; and `auto` picks bf16 only where the C kernel's
attention widens it, float32 on the exact path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from disagg_cli.config import RuntimeConfig
from disagg_cli.errors import UsageError
from disagg_cli.model.hardware import choose_kv_cache_dtype
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.quant.kernels import Kernel, decode_attention
from tests.model.test_fused import _run
from tests.tiny_models import random_weights, write_gguf


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: list[int], n: int,
               bs: int) -> torch.Tensor:
    """One row: q (H, hd) over the first n keys of its sequence, in float32 from the pool as stored."""
    heads, hd = q.shape
    kv = keys.shape[1]
    slots = torch.tensor([table[t // bs] * bs + t % bs for t in range(n)])
    k, v = keys[slots].float().transpose(0, 1), values[slots].float().transpose(0, 1)  # (KV, n, hd)
    return F.scaled_dot_product_attention(q.view(kv, heads // kv, hd), k, v).reshape(heads, hd)


# (cached tokens before the step, new tokens this step) per sequence: decodes (n, 1), fresh prompts
# (0, n), chunks after a cached prefix (c, n); blocks of 8, so tables of 1 to 9 blocks.
STEPS = [[(0, 1)], [(4, 1), (16, 1), (40, 1)], [(0, 13)], [(24, 9), (5, 1), (0, 3)], [(63, 1), (17, 20)]]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("hd", [64, 16, 20])  # 64: the 8-wide value path; 20: the scalar tails
def test_attention_over_a_bf16_pool_equals_torch_over_the_same_kv_widened(kernel: Kernel, steps: list, hd: int) -> None:
    g = torch.Generator().manual_seed(len(steps) * 100 + hd)
    heads, kv, bs, num_blocks = 6, 2, 8, 40
    keys = torch.randn(num_blocks * bs, kv, hd, generator=g).to(torch.bfloat16)
    values = torch.randn(num_blocks * bs, kv, hd, generator=g).to(torch.bfloat16)
    order = torch.randperm(num_blocks, generator=g).tolist()  # scattered, out-of-order blocks
    tables, lens, row_tables = [], [], []
    for cached, new in steps:
        ids = [order.pop() for _ in range(-(-(cached + new) // bs))]
        tables.append(ids)
        for i in range(new):  # row i of the sequence sees cached + i + 1 keys
            lens.append(cached + i + 1)
            row_tables.append(ids)
    q = torch.randn(len(lens), heads, hd, generator=g)
    width = max(map(len, row_tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in row_tables], dtype=torch.int32)
    out = decode_attention(kernel, q, keys, values, table, torch.tensor(lens, dtype=torch.int32), bs)
    want = torch.stack([_reference(q[r], keys, values, row_tables[r], lens[r], bs) for r in range(len(lens))])
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5), (out - want).abs().max()
    # and the float32 pool of the same values gives the same answer
    f32 = decode_attention(kernel, q, keys.float(), values.float(), table, torch.tensor(lens, dtype=torch.int32), bs)
    assert torch.allclose(out, f32, atol=1e-6, rtol=1e-6)


def test_bf16_attention_over_shared_and_reordered_blocks(kernel: Kernel) -> None:
    """Rows whose tables share leading blocks (a cached prefix), a longer row before a shorter one,
    and the same blocks in another order: each row attends exactly its own keys."""
    g = torch.Generator().manual_seed(5)
    heads, kv, hd, bs = 9, 3, 64, 4
    keys = torch.randn(12 * bs, kv, hd, generator=g).to(torch.bfloat16)
    values = torch.randn(12 * bs, kv, hd, generator=g).to(torch.bfloat16)
    rows = [([3, 7, 1], 10), ([3, 7, 2], 11), ([3, 7, 1], 6), ([3, 7, 1], 12), ([7, 3, 1], 9), ([3], 2),
            ([3, 7, 1, 5], 14), ([3, 7, 1, 5], 15)]
    width = max(len(t) for t, _ in rows)
    table = torch.tensor([t + [0] * (width - len(t)) for t, _ in rows], dtype=torch.int32)
    lens = torch.tensor([n for _, n in rows], dtype=torch.int32)
    q = torch.randn(len(rows), heads, hd, generator=g)
    for _ in range(3):  # the next call's copy is its own, though the tables are the same
        out = decode_attention(kernel, q, keys, values, table, lens, bs)
        want = torch.stack([_reference(q[r], keys, values, t, n, bs) for r, (t, n) in enumerate(rows)])
        assert torch.allclose(out, want, atol=1e-5, rtol=1e-5), (out - want).abs().max()
        keys = (keys.float() + 1).to(torch.bfloat16)


@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("heads", "kv", "bs"), [(9, 3, 16), (8, 2, 5), (4, 4, 16), (16, 2, 32)])
def test_a_wide_decode_batch_attends_each_row_over_its_own_keys(kernel: Kernel, pool_dtype: torch.dtype, heads: int,
                                                                 kv: int, bs: int) -> None:
    """24 decode rows at head dim 64: enough sequences that each is one item with all its KV heads
    (the path a batch-32 step takes), at lengths around the 16-key chunks and the blocks, with blocks
    scattered; every row equals SDPA over its own keys, for 1 to 8 query heads per KV head."""
    g = torch.Generator().manual_seed(heads * 100 + bs)
    hd = 64
    lens = [1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 49, 64, 70, 5, 9, 80, 100, 127, 128, 129, 3, 40, 63, 96]
    blocks = [-(-n // bs) for n in lens]
    num_blocks = sum(blocks) + 3
    keys = torch.randn(num_blocks * bs, kv, hd, generator=g).to(pool_dtype)
    values = torch.randn(num_blocks * bs, kv, hd, generator=g).to(pool_dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[order.pop() for _ in range(n)] for n in blocks]
    width = max(blocks)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), heads, hd, generator=g)
    out = decode_attention(kernel, q, keys, values, table, torch.tensor(lens, dtype=torch.int32), bs)
    want = torch.stack([_reference(q[r], keys, values, tables[r], lens[r], bs) for r in range(len(lens))])
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5), (out - want).abs().max()


def _tiny(tmp_path: Path, qtype: str, kv_cache_dtype: str) -> LoadedModel:
    path = write_gguf(tmp_path / f"{qtype}.gguf", random_weights(seed=11), qtype=qtype)
    kind = "none" if qtype == "F32" else "int4"
    return load_model(path, RuntimeConfig(dtype="float32", quantization=kind, threads=2,
                                          kv_cache_dtype=kv_cache_dtype), cache_dir=tmp_path, role="decode")


@pytest.mark.parametrize("qtype", ["Q4_1", "F32"])
def test_the_fused_step_writes_bf16_kv_as_torch_rounds_it(tmp_path: Path, qtype: str) -> None:
    lm = _tiny(tmp_path, qtype, "bfloat16")
    assert lm.execution.fused is not None and lm.kv_dtype == torch.bfloat16
    c, bs = lm.config, 4
    shape = (c.num_layers, 16 * bs, c.num_kv_heads, c.head_dim)
    g = torch.Generator().manual_seed(3)
    history = torch.randn(shape, generator=g).to(torch.bfloat16)  # what earlier steps stored
    table = torch.tensor([[0, 1, 2], [5, 4, 3], [9, 8, 7]], dtype=torch.int32)
    tokens, positions = [5, 17, 60], [0, 6, 11]
    new_slots = [int(table[b, p // bs]) * bs + p % bs for b, p in enumerate(positions)]
    f32_keys, f32_values = history.float(), history.float()
    bf_keys, bf_values = history.clone(), history.clone()
    logits32 = lm.execution.fused.step(tokens, positions, table, bs, f32_keys, f32_values)
    logits16 = lm.execution.fused.step(tokens, positions, table, bs, bf_keys, bf_values)
    # Layer 0's new K/V come from the tokens alone: the bf16 pool holds exactly torch's rounding of
    # the float32 pool's. Later layers read the pool, so only their old slots must be untouched.
    assert torch.equal(bf_keys[0, new_slots], f32_keys[0, new_slots].to(torch.bfloat16))
    assert torch.equal(bf_values[0, new_slots], f32_values[0, new_slots].to(torch.bfloat16))
    old = [s for s in range(shape[1]) if s not in new_slots]
    assert torch.equal(bf_keys[:, old], history[:, old]) and torch.equal(bf_values[:, old], history[:, old])
    assert not torch.equal(bf_keys[1:, new_slots], history[1:, new_slots])  # every layer wrote its slots
    assert (logits16 - logits32).abs().max() < 0.05 * logits32.abs().max()


@pytest.mark.parametrize("qtype", ["Q4_1", "F32"])
def test_an_engine_on_a_bf16_pool_gives_the_same_tokens_fused_or_not(tmp_path: Path, qtype: str) -> None:
    lm = _tiny(tmp_path, qtype, "bfloat16")
    prompts = [[(7 * i + 3 * j) % 96 for j in range(n)] for i, n in enumerate([1, 5, 8, 13, 3])]
    max_tokens = [24, 6, 11, 17, 3]
    fused, engine = _run(lm, prompts, max_tokens, True)
    plain, _ = _run(lm, prompts, max_tokens, False)
    assert engine.runner.storage.keys.dtype == torch.bfloat16
    assert fused == plain


def test_auto_kv_dtype_is_bf16_only_where_the_kernel_widens_it() -> None:
    assert choose_kv_cache_dtype("auto", "float32", "int4", "cpu", "c").dtype == "bfloat16"
    assert choose_kv_cache_dtype("auto", "float32", "none", "cpu", "c").dtype == "float32"  # the exact path
    assert choose_kv_cache_dtype("auto", "float32", "int4", "cpu", "torch").dtype == "float32"
    assert choose_kv_cache_dtype("auto", "bfloat16", "none", "cpu", "c").dtype == "bfloat16"
    assert choose_kv_cache_dtype("auto", "bfloat16", "none", "cuda", "torch").dtype == "bfloat16"
    assert choose_kv_cache_dtype("float32", "float32", "int4", "cpu", "c").dtype == "float32"
    assert choose_kv_cache_dtype("bfloat16", "float32", "none", "cpu", "c").dtype == "bfloat16"
    with pytest.raises(UsageError, match="--kv-cache-dtype auto"):
        choose_kv_cache_dtype("bfloat16", "float32", "none", "cpu", "torch")
    with pytest.raises(UsageError, match="--kv-cache-dtype auto"):
        choose_kv_cache_dtype("float32", "bfloat16", "none", "cpu", "c")
    with pytest.raises(UsageError, match="--kv-cache-dtype auto"):
        choose_kv_cache_dtype("float16", "float32", "int4", "cpu", "c")  # the kernel reads f32 or bf16 only
    assert choose_kv_cache_dtype("float16", "float16", "none", "cuda", "torch").dtype == "float16"
    with pytest.raises(UsageError, match="--kv-cache-dtype"):
        RuntimeConfig(kv_cache_dtype="int8")
