"""Quantized weights: the C kernel and the torch fallback against a dequantized reference; GGUF
Q8_0 / Q4_0 / Q4_1 blocks loaded as they are against quantizing their dequantized values."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from disagg_cli.config import RuntimeConfig
from disagg_cli.errors import UsageError
from disagg_cli.model.backend import choose_backend
from disagg_cli.model.loader import load_model
from disagg_cli.model.quant.blocks import QuantizedWeight, concat_rows, from_gguf_blocks, quantize
from disagg_cli.model.quant.build import SOURCE, KernelUnavailable, build_kernel
from disagg_cli.model.quant.kernels import (
    Kernel,
    KernelBindingError,
    bind,
    decode_attention,
    matmul,
    reference_matmul,
)
from disagg_cli.model.quant.linear import QuantizedLinear
from disagg_cli.model.quant.methods import TorchDequant
from tests.model.test_weights import logits
from tests.tiny_models import TINY, random_weights, write_gguf

SHAPES = [(1, 1, 32), (1, 7, 33), (3, 5, 64), (5, 17, 100), (4, 64, 576), (9, 31, 1536), (33, 3, 95)]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_matches_dequantized_reference(kernel: Kernel, kind: str, m: int, n: int, k: int,
                                              act_int8: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    q = quantize(w, kind)
    ours, ref = matmul(kernel, x, q, act_int8), reference_matmul(x, q)
    assert ours.shape == (m, n) and ours.dtype == torch.float32
    # Float activations: the same products summed in another order. int8 activations (absmax/127
    # per block of 32) cost ~0.5 % of the largest output.
    assert _relative_error(ours, ref) < (0.02 if act_int8 else 1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_fallback_is_the_reference_and_quantization_is_close(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(40, 70, generator=g), torch.randn(6, 70, generator=g)
    q = quantize(w, kind)
    assert torch.equal(TorchDequant(q, None).apply(x), torch.nn.functional.linear(x, q.dequantize()))
    assert q.dequantize().shape == (40, 70)
    # Weight error bounds: half a step of the block's grid (range / 255 or / 15).
    step = (w.amax() - w.amin()) / (255 if kind == "int8" else 15)
    assert float((q.dequantize() - w).abs().max()) <= float(step) / 2 + 1e-6


def test_int4_packing_is_ggufs_nibble_order() -> None:
    w = torch.arange(32, dtype=torch.float32)[None] % 16  # values 0..15 twice: scale 1, min 0
    q = quantize(w, "int4")
    assert q.qs.shape == (1, 16) and q.d.tolist() == [[1.0]] and q.m.tolist() == [[0.0]]
    # byte j: element j in the low nibble, element j + 16 in the high one
    assert q.qs[0].tolist() == [j | (j << 4) for j in range(16)]
    assert torch.equal(q.dequantize(), w)


def test_concat_and_select_rows_keep_values() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 64, generator=g), torch.randn(3, 64, generator=g)
    qa, qb = quantize(a, "int4"), quantize(b, "int4")
    both = concat_rows([qa, qb])
    assert torch.equal(both.dequantize(), torch.cat([qa.dequantize(), qb.dequantize()]))
    index = torch.tensor([7, 0, 3])
    assert torch.equal(both.select_rows(index).dequantize(), both.dequantize()[index])


@pytest.mark.parametrize("qtype,kind", [("Q8_0", "int8"), ("Q4_0", "int4"), ("Q4_1", "int4")])
def test_gguf_blocks_load_as_the_same_values(qtype: str, kind: str) -> None:
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(24, 96, generator=g) * 0.1).numpy()
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])  # (24, row bytes)
    values = torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]),
                                       dtype=np.float32)).reshape(24, 96)
    direct = from_gguf_blocks(raw, qtype, 96)
    assert direct.kind == kind
    assert torch.equal(direct.dequantize(), values)  # exact: the file's own blocks
    # The dequantize-then-quantize path lands on the same grid only for Q4_1 (min/max, 16 levels);
    # Q4_0's and Q8_0's symmetric grids are not min/max ones, so there it costs up to half a step,
    # which loading the blocks as they are avoids.
    again = quantize(values, kind).dequantize()
    blocks = values.view(24, 3, 32)
    levels = 255 if kind == "int8" else 15
    half_step = ((blocks.amax(-1) - blocks.amin(-1)) / levels / 2).repeat_interleave(32, dim=1)
    err = (again - values).abs()
    if qtype == "Q4_1":
        assert float(err.max()) < 1e-5
    else:
        assert bool((err <= half_step + 1e-6).all()) and float(err.max()) > 0
    # Q4_x asked for as int8 widens exactly (q8 = 17 q4): float32 rounding only.
    if kind == "int4":
        wide = direct.widened()
        assert wide.kind == "int8" and float((wide.dequantize() - values).abs().max()) < 1e-6


@pytest.mark.parametrize("kernel", ["c", "torch"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_model_from_gguf_blocks_matches_requantized(tmp_path: Path, qtype: str, kernel: str) -> None:
    cfg = dict(TINY, hidden_size=64, intermediate_size=96, head_dim=16)
    path = write_gguf(tmp_path / f"{qtype}.gguf", random_weights(seed=6, cfg=cfg), qtype=qtype, cfg=cfg)
    kind = "int8" if qtype == "Q8_0" else "int4"
    lm = load_model(path, RuntimeConfig(dtype="float32", quantization=kind, kernel=kernel), cache_dir=tmp_path)
    dense = load_model(path, RuntimeConfig(dtype="float32", quantization="none", kernel=kernel))
    # Every matmul is quantized, q/k rows un-permuted like the float weights: dequantized, they
    # equal the float model's (dequantized GGUF) weights exactly.
    qkv = lm.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantizedLinear) and qkv.weight_q.kind == kind
    assert isinstance(qkv.method, TorchDequant) if kernel == "torch" else "C quantized matmul" in qkv.method.name
    assert torch.equal(qkv.weight_q.dequantize(), dense.model.model.layers[0].self_attn.qkv_proj.weight)
    head = lm.model.lm_head
    assert isinstance(head, QuantizedLinear)
    assert torch.equal(head.weight_q.dequantize(), dense.model.model.embed_tokens.weight)
    # Logits within activation-quantization error of the float model's.
    assert _relative_error(logits(lm), logits(dense)) < 0.05


@pytest.mark.parametrize("kernel", ["c", "torch"])
def test_quantized_model_from_float_weights(tmp_path: Path, kernel: str) -> None:
    path = write_gguf(tmp_path / "f32.gguf", random_weights(seed=7))
    dense = load_model(path, RuntimeConfig(dtype="float32", quantization="none", kernel=kernel))
    for kind in ("int8", "int4"):
        lm = load_model(path, RuntimeConfig(dtype="float32", quantization=kind, kernel=kernel), cache_dir=tmp_path)
        assert lm.backend.name == kernel
        assert lm.runtime.quantization == kind
        assert lm.num_parameters == dense.num_parameters
        tolerance = 0.03 if kind == "int8" else 0.25
        assert _relative_error(logits(lm), logits(dense)) < tolerance, kind


def test_kernel_c_without_a_compiler_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one case where the compiler is taken away: `--kernel c` stops with the reason and what to
    do, `auto` says it takes torch and why, and `torch` never looks for a compiler."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(KernelUnavailable, match="failed to run"):
        build_kernel(tmp_path)
    with pytest.raises(UsageError) as e:
        choose_backend("c", "cpu", tmp_path)
    message = str(e.value)
    assert "\n" not in message and "--kernel c" in message and "no-such-compiler" in message
    assert "--kernel torch" in message  # what to do
    auto = choose_backend("auto", "cpu", tmp_path)
    assert auto.name == "torch" and auto.kernel is None and "cannot be built" in auto.reason
    assert choose_backend("torch", "cpu", tmp_path).kernel is None
    path = write_gguf(tmp_path / "m.gguf", random_weights(seed=3))
    with pytest.raises(UsageError, match="--kernel c"):
        load_model(path, RuntimeConfig(kernel="c"), cache_dir=tmp_path)


def test_kernel_c_on_another_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="CPU only"):
        choose_backend("c", "cuda", tmp_path)
    assert choose_backend("auto", "cuda", tmp_path).name == "torch"


def test_bindings_are_checked_against_the_source(kernel: Kernel) -> None:
    """A table that drifted from kernel.c is a clear error at load, not a crash at the first call."""
    source = SOURCE.read_text()
    bind(kernel.lib, source)  # as shipped: they agree
    fewer = source.replace("float *y, int nthreads) {\n    dq_model *m", "float *y) {\n    dq_model *m")
    assert fewer != source
    with pytest.raises(KernelBindingError, match=r"dq_model_matmul: kernel.c defines \(pointer, int, int, "
                                                 r"pointer, int, pointer\) -> int"):
        bind(kernel.lib, fewer)
    with pytest.raises(KernelBindingError, match="defines no dq_argmax_rows"):
        bind(kernel.lib, source.replace("void dq_argmax_rows(", "void dq_argmax_rows_renamed("))
    with pytest.raises(TypeError):  # and ctypes checks each call's argument count
        kernel.lib.dq_model_matmul(None, 0, 0, None, 1, None)


def test_quantized_w_kind_is_checked() -> None:
    with pytest.raises(ValueError, match="int8"):
        QuantizedWeight("int2", 32, torch.zeros(1, 16, dtype=torch.uint8), torch.zeros(1, 1), None)


@pytest.mark.parametrize("lens", [[1], [5, 16, 17], [40, 3, 33, 64]])
def test_decode_attention_reads_fragmented_blocks_in_place(kernel: Kernel, lens: list[int]) -> None:
    g = torch.Generator().manual_seed(sum(lens))
    heads, kv, hd, bs, num_blocks = 6, 2, 16, 8, 40
    keys = torch.randn(num_blocks * bs, kv, hd, generator=g)
    values = torch.randn(num_blocks * bs, kv, hd, generator=g)
    q = torch.randn(len(lens), heads, hd, generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()  # scattered, out-of-order blocks
    tables, expected = [], []
    for i, n in enumerate(lens):
        ids = [order.pop() for _ in range(-(-n // bs))]
        tables.append(ids)
        slots = torch.tensor([ids[t // bs] * bs + t % bs for t in range(n)])
        k, v = keys[slots].transpose(0, 1), values[slots].transpose(0, 1)  # (KV, n, hd)
        qi = q[i].view(kv, heads // kv, hd)  # query heads grouped by the KV head they share
        expected.append(torch.nn.functional.scaled_dot_product_attention(qi, k, v).reshape(heads, hd))
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = decode_attention(kernel, q, keys, values, table, torch.tensor(lens, dtype=torch.int32), bs)
    assert torch.allclose(out, torch.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [64, 16, 24])
def test_attention_of_prompt_rows_by_tiles_equals_each_row_alone(kernel: Kernel, pool_dtype: torch.dtype,
                                                                   hd: int) -> None:
    """A step's rows as the engine sends them: a chunk of 13 rows after 20 cached tokens, a decode
    row of another sequence, a fresh 7-row prompt and a lone first row. Consecutive rows of one
    sequence go by tiles (hd a multiple of 16), the rest row by row; every row's output is what
    SDPA gives over its own keys, within float32 rounding."""
    g = torch.Generator().manual_seed(hd)
    heads, kv, bs, num_blocks = 6, 2, 8, 40
    keys = torch.randn(num_blocks * bs, kv, hd, generator=g).to(pool_dtype)
    values = torch.randn(num_blocks * bs, kv, hd, generator=g).to(pool_dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    seqs = [(20, 13), (30, 1), (0, 7), (0, 1)]  # (cached, new rows)
    tables, lens, expected = [], [], []
    for cached, new in seqs:
        total = cached + new
        ids = [order.pop() for _ in range(-(-total // bs))]
        for r in range(new):
            tables.append(ids)
            lens.append(cached + r + 1)
    q = torch.randn(len(lens), heads, hd, generator=g)
    row = 0
    for cached, new in seqs:
        total = cached + new
        ids = tables[row]
        slots = torch.tensor([ids[t // bs] * bs + t % bs for t in range(total)])
        k, v = keys[slots].float().transpose(0, 1), values[slots].float().transpose(0, 1)  # (KV, total, hd)
        for r in range(new):
            n = cached + r + 1
            qi = q[row].view(kv, heads // kv, hd)
            expected.append(torch.nn.functional.scaled_dot_product_attention(qi, k[:, :n], v[:, :n]).reshape(heads, hd))
            row += 1
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = decode_attention(kernel, q, keys, values, table, torch.tensor(lens, dtype=torch.int32), bs)
    want = torch.stack(expected)
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-5), float((out - want).abs().max())


def test_wide_dtype_bfloat16_runs_wide_steps_on_bfloat16_copies(tmp_path: Path) -> None:
    from disagg_cli.model.hardware import probe_cpu

    cfg = dict(TINY, hidden_size=64, intermediate_size=96, head_dim=16)
    path = write_gguf(tmp_path / "q.gguf", random_weights(seed=8, cfg=cfg), qtype="Q4_1", cfg=cfg)
    exact = load_model(path, RuntimeConfig(dtype="float32", quantization="none"), cache_dir=tmp_path)
    lm = load_model(path, RuntimeConfig(dtype="float32", quantization="auto", wide_dtype="bfloat16"),
                    role="colocated", cache_dir=tmp_path)
    qkv = lm.model.model.layers[0].self_attn.qkv_proj
    if lm.backend.name != "c" or not probe_cpu().has_native_bf16:
        assert "bfloat16" not in qkv.method.name  # asked for, but this CPU would emulate it: float32
        return
    assert qkv.method.name.startswith("bfloat16 on oneDNN from 16 rows"), qkv.method.name
    ids = torch.randint(0, exact.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0))
    # 32 rows: every matmul on the bfloat16 copies, rounded (not float32's numbers) but close to them
    assert 1e-6 < _relative_error(logits(lm, ids), logits(exact, ids)) < 0.05
