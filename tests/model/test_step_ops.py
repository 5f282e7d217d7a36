"""The kernel's element-wise step ops (`KernelStepOps`) against torch's (`StepOps`) on the same
numbers: RMSNorm, rotate-half RoPE of q and k from the position tables, SiLU·up; and the backend
gives them to a float32 model on the C kernel only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from disagg_cli.model.llama import RMSNorm, RotaryEmbedding, StepOps
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.quant.kernels import Kernel, KernelStepOps

HEADS, KV_HEADS, HD = 9, 3, 64


def _rotary() -> RotaryEmbedding:
    return RotaryEmbedding(SimpleNamespace(head_dim=HD, rope_theta=100000.0, rope_freq_factors=None,  # type: ignore[arg-type]
                                           max_position_embeddings=8192), table_len=64)


@pytest.mark.parametrize("rows", [1, 5, 37])
def test_kernel_step_ops_equal_torchs(kernel: Kernel, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    ops, ref = KernelStepOps(kernel), StepOps()
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.rand(96, generator=g) + 0.5
    x = torch.randn(rows, 96, generator=g) * 3
    torch.testing.assert_close(ops.rms_norm(norm, x), ref.rms_norm(norm, x), atol=2e-6, rtol=2e-6)
    gate_up = torch.randn(rows, 2 * 40, generator=g) * 4  # 40: the vector body and a scalar tail
    torch.testing.assert_close(ops.silu_mul(gate_up, 40), ref.silu_mul(gate_up, 40), atol=2e-6, rtol=2e-6)
    # positions past the table's 64 rows grow it, as torch's path does
    positions = torch.randint(0, 200, (rows,), generator=g)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HD, generator=g)
    got = ops.split_rotated(qkv.clone(), HEADS, KV_HEADS, HD, ops.rotation(_rotary(), positions, torch.float32))
    want = ref.split_rotated(qkv.clone(), HEADS, KV_HEADS, HD, ref.rotation(_rotary(), positions, torch.float32))
    for a, b, shape in zip(got, want, [(rows, HEADS, HD), (rows, KV_HEADS, HD), (rows, KV_HEADS, HD)], strict=True):
        assert a.shape == shape
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    assert torch.equal(got[2], qkv[:, (HEADS + KV_HEADS) * HD:].view(rows, KV_HEADS, HD))  # v untouched


def test_kernel_step_ops_leave_other_dtypes_to_torch(kernel: Kernel) -> None:
    ops, ref = KernelStepOps(kernel), StepOps()
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(ops.rms_norm(norm, x), ref.rms_norm(norm, x))
    gate_up = torch.randn(3, 32).to(torch.bfloat16)
    assert torch.equal(ops.silu_mul(gate_up, 16), ref.silu_mul(gate_up, 16))
    positions = torch.tensor([0, 7, 3])
    rotation = ops.rotation(_rotary(), positions, torch.bfloat16)
    qkv = torch.randn(3, (HEADS + 2 * KV_HEADS) * HD).to(torch.bfloat16)
    got = ops.split_rotated(qkv, HEADS, KV_HEADS, HD, rotation)
    want = ref.split_rotated(qkv, HEADS, KV_HEADS, HD, ref.rotation(_rotary(), positions, torch.bfloat16))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_the_backend_gives_kernel_ops_to_a_float32_model_on_the_kernel(model_per_kernel: LoadedModel) -> None:
    ops = model_per_kernel.model.ops
    assert isinstance(ops, KernelStepOps) == (model_per_kernel.backend.name == "c")
    assert isinstance(ops, StepOps)
