"""The kernel's float32 GEMM (`PanelLinear`, `dq_gemm_f32`) against torch's F.linear, and where it
runs: float32 weights on the CPU (`none`, a prefill worker's `auto`), a colocated worker's float copies.

The GEMM sums the same float32 products in another order, so it equals F.linear to ~1e-6
relative on any shape (rows not a multiple of its 6-row tiles, columns not of its 16-column
panels, any K), and the real model gives the same greedy tokens on it as on torch's matmuls.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from disagg_cli.bench.agreement import AGREEMENT_PROMPTS
from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model import loader
from disagg_cli.model.hardware import CPUInfo, probe_cpu
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.quant.kernels import Kernel, pack_panels, unpack_panels
from disagg_cli.model.quant.linear import QuantizedLinear
from disagg_cli.model.quant.methods import ByRows, CFloatPanels
from disagg_cli.model.quant.panel import PanelLinear
from disagg_cli.model.tokenizer import Tokenizer
from tests.model.test_quant import _relative_error


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 16, 576), (5, 17, 33), (6, 32, 7), (7, 15, 100),
                                   (13, 3, 1536), (48, 33, 576), (97, 50, 64), (300, 40, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_equals_f_linear(kernel: Kernel, m: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    lin = PanelLinear(w, b, kernel)
    assert lin.panels.shape == (-(-n // 16), k, 16) and torch.equal(lin.weight, w)
    y = lin(x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert _relative_error(y, F.linear(x, w, b)) < 1e-5, (m, n, k)


def test_gemm_reads_strided_rows_and_batched_input(kernel: Kernel) -> None:
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(20, 64, generator=g), torch.randn(20, generator=g)
    lin = PanelLinear(w, b, kernel)
    wide = torch.randn(11, 100, generator=g)
    x = wide[:, 5:69]  # rows 100 floats apart: read in place
    assert x.stride() == (100, 1)
    assert _relative_error(lin(x), F.linear(x, w, b)) < 1e-5
    x3 = torch.randn(2, 9, 64, generator=g)
    assert _relative_error(lin(x3), F.linear(x3, w, b)) < 1e-5 and lin(x3).shape == (2, 9, 20)
    xb = x3.bfloat16()  # another dtype: F.linear on the unpacked weight, in that dtype
    assert lin(xb).dtype == torch.bfloat16 and torch.equal(lin(xb), F.linear(xb, w.bfloat16(), b.bfloat16()))
    assert lin(x[:0]).shape == (0, 20)


def test_pack_panels_zero_pads_and_unpacks() -> None:
    w = torch.arange(3 * 5, dtype=torch.float32).view(3, 5)
    p = pack_panels(w)
    assert p.shape == (1, 5, 16) and p[0, 2, 1] == w[1, 2] and torch.all(p[:, :, 3:] == 0)
    assert torch.equal(unpack_panels(p, 3), w)


def _greedy(lm: LoadedModel, prompts: list[list[int]], n: int) -> list[list[int]]:
    engine = LLMEngine(lm, EngineConfig(block_size=16, kv_cache_tokens=2048, enable_prefix_caching=False))
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=n, ignore_eos=True))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for event in engine.step():
            out[event.request_id].append(event.token_id)
    assert all(len(t) == n for t in out.values())
    return [out[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.slow
def test_float_weights_run_the_gemm_with_torchs_tokens(default_gguf: Path, default_model: LoadedModel,
                                                       default_tokenizer: Tokenizer) -> None:
    """float32 on the CPU (--quantization none, and a prefill worker's auto) multiplies on the
    kernel's GEMM, and gives the greedy tokens torch's matmuls give on the same weights."""
    assert "C kernel's GEMM" in default_model.quantization_reason
    layer = default_model.model.model.layers[0]
    assert all(isinstance(m, PanelLinear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                    layer.mlp.gate_up_proj, layer.mlp.down_proj))
    torch_lm = load_model(default_gguf, RuntimeConfig(dtype="float32", threads=2, kernel="torch"))
    assert isinstance(torch_lm.model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    prompts = [default_tokenizer.encode(p) for p in AGREEMENT_PROMPTS[:3]]
    assert _greedy(default_model, prompts, 12) == _greedy(torch_lm, prompts, 12)



def _without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decide as on this CPU without AVX512-VNNI (no int16 tiles): what AVX2 machines and older
    AVX-512 ones get from `auto`; the kernel that runs is this machine's all the same."""
    cpu = probe_cpu()
    monkeypatch.setattr(loader, "probe_cpu", lambda: CPUInfo(cpu.capability, cpu.flags - {"avx512_vnni"}))


@pytest.mark.slow
def test_prefill_auto_takes_int16_tiles_where_the_cpu_has_them_else_the_gemm(
        default_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = RuntimeConfig(dtype="float32", quantization="auto", threads=2)
    if probe_cpu().has_int16_tiles:
        prefill = load_model(default_gguf, runtime, role="prefill")
        assert prefill.runtime.quantization == "int4" and "int16 tiles" in prefill.quantization_reason
        gate_up = prefill.model.model.layers[0].mlp.gate_up_proj
        assert isinstance(gate_up, QuantizedLinear) and "int16 tiles" in gate_up.method.name
    _without_vnni(monkeypatch)
    prefill = load_model(default_gguf, runtime, role="prefill")
    assert prefill.runtime.quantization == "none" and "C kernel's GEMM" in prefill.quantization_reason
    assert isinstance(prefill.model.model.layers[0].mlp.gate_up_proj, PanelLinear)


@pytest.mark.slow
def test_colocated_auto_runs_steps_of_many_rows_on_the_gemm_without_int16_tiles(
        default_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_vnni(monkeypatch)
    lm = load_model(default_gguf, RuntimeConfig(dtype="float32", quantization="auto", threads=2), role="colocated")
    qkv = lm.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantizedLinear) and isinstance(qkv.method, ByRows)
    dense_min_rows, wide = qkv.method.tiers[0]
    assert dense_min_rows == 64 and isinstance(wide, CFloatPanels)
    x = torch.randn(dense_min_rows, qkv.in_features, generator=torch.Generator().manual_seed(0))
    want = F.linear(x, wide.panels.weight, qkv.bias)
    assert torch.equal(qkv(x), wide.panels(x)) and _relative_error(qkv(x), want) < 1e-5
