"""The fused decode step (one C call per step for quantized float32 models) against the torch path.

Its matmul equals the dequantized reference (int16-rounded activations below QPANEL_MIN_ROWS rows,
exact float panels from there); a whole engine run through it gives the torch path's logits and
tokens, on tiny checkpoints (with and without q/k/v bias, tied and untied heads) whose batches
shrink from 5 sequences to 1 across both kernels, and on the real model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from disagg_cli.bench.agreement import AGREEMENT_PROMPTS
from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.quant.blocks import quantize
from disagg_cli.model.quant.fused import FusedDecoder, fused_decoder, step_matmul
from disagg_cli.model.quant.kernels import Kernel, argmax_rows, reference_matmul
from disagg_cli.model.quant.methods import ByRows, CPacked, CQuant
from disagg_cli.model.tokenizer import Tokenizer
from tests.model.test_quant import _relative_error
from tests.tiny_models import random_weights, write_gguf

QPANEL_MIN_ROWS = 5  # kernel.c: from this many rows the step widens its quantized panels to float


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (1, 7, 33), (2, 5, 100), (3, 13, 576), (4, 9, 40), (5, 3, 95),
                                   (7, 17, 64), (32, 30, 576), (9, 6, 1536), (8, 17, 95), (13, 33, 40),
                                   (6, 16, 33), (5, 40, 64), (67, 40, 576), (11, 64, 96), (6, 32, 1536),
                                   (17, 80, 64)])
def test_step_matmul_matches_dequantized_reference(kernel: Kernel, kind: str, m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    q = quantize(w, kind)
    ours, ref = step_matmul(kernel, x, q), reference_matmul(x, q)
    assert ours.shape == (m, n)
    # Quantized panels widened to float: the same products in another order. Below, and on the
    # int16 tiles (AVX512-VNNI) at every row count, int16 activations (absmax / 32767 per block of
    # 32): ~1e-4 of the largest output at most.
    exact = m >= QPANEL_MIN_ROWS and not kernel.int16_tiles
    assert _relative_error(ours, ref) < (1e-5 if exact else 3e-4), (m, n, k)


@pytest.mark.parametrize("rows,width", [(32, 49152), (1, 49152), (3, 7), (5, 1), (4, 13), (2, 100)])
def test_argmax_rows_is_torchs_argmax(kernel: Kernel, rows: int, width: int) -> None:
    """The engine's greedy tokens: the first index of the largest value, NaN counting as largest,
    whatever the width (vector body and scalar tail), ties and infinities included."""
    g = torch.Generator().manual_seed(rows * width)
    for trial in range(12):
        x = torch.randn(rows, width, generator=g)
        if trial % 3 == 0:
            x = (x * 2).round()  # many ties
        if trial % 4 == 1:  # a NaN somewhere in each row, in the body or the tail
            x[torch.arange(rows), torch.randint(0, width, (rows,), generator=g)] = float("nan")
        if trial % 5 == 2:
            x[:, -1] = float("inf")
        assert argmax_rows(kernel, x) == x.argmax(dim=-1).tolist(), (rows, width, trial)
    strided = torch.randn(rows, width + 3, generator=g)[:, :width]  # rows apart by more than their width
    assert argmax_rows(kernel, strided) == strided.argmax(dim=-1).tolist()
    assert argmax_rows(None, strided) == strided.argmax(dim=-1).tolist()


def _tiny(tmp_path: Path, qtype: str, **weights: bool) -> LoadedModel:
    path = write_gguf(tmp_path / f"{qtype}.gguf", random_weights(seed=11, **weights), qtype=qtype,
                      arch="qwen2" if weights.get("bias") else "llama")
    kind = "none" if qtype == "F32" else "int8" if qtype == "Q8_0" else "int4"  # F32: the GEMM's panels
    return load_model(path, RuntimeConfig(dtype="float32", quantization=kind, threads=2), cache_dir=tmp_path,
                      role="decode")


def _run(lm: LoadedModel, prompts: list[list[int]], max_tokens: list[int], fused: bool,
         on_logits: Callable[[str, torch.Tensor], None] | None = None,
         block_size: int = 4, max_num_seqs: int = 8) -> tuple[dict[str, list[int]], LLMEngine]:
    engine = LLMEngine(lm, EngineConfig(block_size=block_size, kv_cache_tokens=2048, max_num_seqs=max_num_seqs,
                                        enable_prefix_caching=False))
    if not fused:
        engine.runner.fused = None
    if on_logits is not None:
        execute = engine.runner.execute

        def recording(batch, on_layer=None):  # type: ignore[no-untyped-def]
            out = execute(batch, on_layer)
            decode_only = all(item.num_new_tokens == 1 and item.seq.num_computed_tokens for item in batch)
            on_logits("decode" if decode_only else "other", out)
            return out

        engine.runner.execute = recording  # type: ignore[method-assign]
    out: dict[str, list[int]] = {}
    for i, (ids, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=n, ignore_eos=True))
        out[f"r{i}"] = []
    while engine.has_unfinished():
        for event in engine.step():
            out[event.request_id].append(event.token_id)
    return out, engine


@pytest.mark.parametrize("qtype,weights", [("Q4_1", {}), ("Q8_0", {}), ("Q4_0", {"tied": False}),
                                           ("Q4_1", {"bias": True, "tied": False}), ("F32", {}),
                                           ("F32", {"bias": True, "tied": False})])
def test_fused_step_gives_the_torch_paths_logits_and_tokens(tmp_path: Path, qtype: str, weights: dict) -> None:
    lm = _tiny(tmp_path, qtype, **weights)
    # Prompts of 1 to 13 tokens over blocks of 4: tables of 1 to 9 blocks, and the batch shrinks
    # from 5 sequences (float panels) to 1 (int16 dot products) as they finish.
    prompts = [[(7 * i + 3 * j) % 96 for j in range(n)] for i, n in enumerate([1, 5, 8, 13, 3])]
    max_tokens = [24, 6, 11, 17, 3]
    got: list[tuple[str, torch.Tensor]] = []
    want: list[tuple[str, torch.Tensor]] = []
    fused, engine = _run(lm, prompts, max_tokens, True, lambda kind, t: got.append((kind, t.clone())))
    plain, _ = _run(lm, prompts, max_tokens, False, lambda kind, t: want.append((kind, t.clone())))
    assert isinstance(engine.runner.fused, FusedDecoder)
    assert fused == plain
    assert [k for k, _ in got] == [k for k, _ in want] and sum(k == "decode" for k, _ in got) == 23
    sizes = {t.shape[0] for k, t in got if k == "decode"}
    assert sizes == {1, 2, 3, 4, 5}
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert _relative_error(a, b) < 2e-3
    assert engine.pool.num_free == engine.pool.num_blocks


def test_runner_takes_the_fused_step_only_for_decode_only_steps(tmp_path: Path) -> None:
    lm = _tiny(tmp_path, "Q4_1")
    engine = LLMEngine(lm, EngineConfig(block_size=4, kv_cache_tokens=512, enable_prefix_caching=False))
    fused = engine.runner.fused
    assert fused is not None and engine.runner.fused_reason == "fused C decode step"
    calls: list[int] = []
    step = fused.step
    fused.step = lambda tokens, *rest: (calls.append(len(tokens)), step(tokens, *rest))[1]  # type: ignore[method-assign]
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # a's prefill
    assert calls == []
    engine.add_request("b", [4, 5], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # b's prefill beside a's decode: a mixed step takes the torch path
    assert calls == []
    engine.step()  # both decode
    assert calls == [2]


def test_fused_decoder_says_why_not(tmp_path: Path, kernel: Kernel) -> None:
    path = write_gguf(tmp_path / "f.gguf", random_weights(seed=2))
    dense = load_model(path, RuntimeConfig(dtype="float32"), cache_dir=tmp_path)
    assert isinstance(LLMEngine(dense, EngineConfig(enable_prefix_caching=False)).runner.fused, FusedDecoder)
    layer = dense.model.model.layers[1]
    layer.mlp.down_proj = torch.nn.Linear(layer.mlp.down_proj.in_features, layer.mlp.down_proj.out_features,
                                          bias=False)  # one matmul left to torch
    assert fused_decoder(dense.model, kernel) == (None, "the fused decode step needs every matmul quantized "
                                                        "(--quantization int8/int4) or float32 on the kernel's GEMM")
    on_torch = load_model(path, RuntimeConfig(dtype="float32", kernel="torch"), cache_dir=tmp_path)
    runner = LLMEngine(on_torch, EngineConfig(enable_prefix_caching=False)).runner
    assert runner.fused is None and runner.fused_reason == "the torch backend has no fused step"
    bf16 = load_model(path, RuntimeConfig(dtype="bfloat16"), cache_dir=tmp_path)
    assert fused_decoder(bf16.model, kernel) == (None, "the fused decode step needs float32 weights on the CPU")


def test_fused_step_refuses_bad_tokens_and_positions(tmp_path: Path) -> None:
    lm = _tiny(tmp_path, "Q4_1")
    engine = LLMEngine(lm, EngineConfig(block_size=4, kv_cache_tokens=64, enable_prefix_caching=False))
    fused, keys, values = engine.runner.fused, engine.runner.storage.keys, engine.runner.storage.values
    assert fused is not None
    table = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="outside the vocabulary of 96"):
        fused.step([96], [0], table, 4, keys, values)
    with pytest.raises(ValueError, match="past its block table of 2 blocks"):
        fused.step([1], [8], table, 4, keys, values)  # position 8 needs a third block of 4
    assert fused.step([1], [7], table, 4, keys, values).shape == (1, 96)


@pytest.mark.slow
def test_real_model_fused_float32_greedy_equals_the_torch_path(default_model: LoadedModel,
                                                               default_tokenizer: Tokenizer) -> None:
    prompts = [default_tokenizer.encode(p) for p in AGREEMENT_PROMPTS]
    fused, engine = _run(default_model, prompts, [20] * 6, True, block_size=16)
    assert engine.runner.fused is not None
    plain, _ = _run(default_model, prompts, [20] * 6, False, block_size=16)
    assert fused == plain


@pytest.mark.slow
def test_real_model_fused_int4_greedy_equals_the_torch_path(default_gguf: Path,
                                                            default_tokenizer: Tokenizer) -> None:
    lm = load_model(default_gguf, RuntimeConfig(dtype="float32", quantization="int4", threads=2), role="decode")
    prompts = [default_tokenizer.encode(p) for p in AGREEMENT_PROMPTS]
    fused, engine = _run(lm, prompts, [20] * 6, True, block_size=16)
    assert engine.runner.fused is not None
    plain, _ = _run(lm, prompts, [20] * 6, False, block_size=16)
    assert fused == plain


def test_prompts_on_a_quantized_model_run_on_the_packed_float_tiles(tmp_path: Path) -> None:
    """The backend hands the fused step's packed copy to each quantized linear at load: steps of 5+
    rows multiply it as tiles (float, or int16 where the kernel has AVX512-VNNI), fewer rows take
    the kernel's row-wise matmul."""
    lm = _tiny(tmp_path, "Q4_1", bias=True, tied=False)
    qkv = lm.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.method, ByRows) and qkv.bias is not None
    (five, packed), (zero, plain) = qkv.method.tiers
    assert (five, zero) == (5, 0) and isinstance(packed, CPacked) and isinstance(plain, CQuant)
    assert packed.fused is lm.execution.fused
    x = torch.randn(7, qkv.in_features)
    want = reference_matmul(x, qkv.weight_q) + qkv.bias
    tiles = lm.execution.backend.kernel.int16_tiles
    assert packed.name == ("C packed int16 tiles" if tiles else "C packed float tiles")
    # float panels: the same products in another order; int16 tiles: activations rounded per block
    assert _relative_error(qkv(x), want) < (3e-4 if tiles else 1e-5)  # bias added once
    assert _relative_error(qkv(x[:2]), want[:2]) < 1e-5  # under 5 rows: the float-activation kernel


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_wide_fused_steps_on_quantized_panels_give_the_torch_paths_tokens(tmp_path: Path, qtype: str) -> None:
    """From QPANEL_MIN_ROWS rows the step widens its panel-ordered copy of the quants and runs the
    GEMM's tiles: a decode batch shrinking from 10 through 5 to 1 keeps the torch path's tokens."""
    lm = _tiny(tmp_path, qtype, bias=True, tied=False)
    prompts = [[(5 * i + 3 * j) % 96 for j in range(2 + i % 4)] for i in range(10)]
    max_tokens = [3 + 2 * i for i in range(10)]
    got: list[tuple[str, torch.Tensor]] = []
    want: list[tuple[str, torch.Tensor]] = []
    fused, _ = _run(lm, prompts, max_tokens, True, lambda kind, t: got.append((kind, t.clone())), max_num_seqs=10)
    plain, _ = _run(lm, prompts, max_tokens, False, lambda kind, t: want.append((kind, t.clone())), max_num_seqs=10)
    assert fused == plain
    assert {t.shape[0] for k, t in got if k == "decode"} == set(range(1, 11))
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert _relative_error(a, b) < 2e-3
