"""`PanelLinear`: a float32 Linear multiplied by the C kernel's own GEMM (`dq_gemm_f32`).

Prefill is compute-bound, and at prompt sizes torch's float32 GEMM reached 44–79 % of this
machine's FMA peak (AVX2 EPYC, 2 threads, noisy host) against 72–94 % for the kernel's 6 × 16
register-tiled one: 1.55 s against 1.94 s for the 30 layers' matmuls of a 512-token prompt,
interleaved in one run. The weight is packed once into panels of 16 output columns (`pack_panels`).
The numbers are float32's, summed in another order than torch's (within ~1e-6 relative).

Float32 weights on the CPU use it wherever the kernel built: `--quantization none`, a prefill
worker's `auto`, and the float copies a colocated worker keeps for steps of many rows. At one row
it reads the weights at memory speed: 0.51 ms a layer against torch's 1.16 ms (batch 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disagg_cli.model.quant.kernels import Kernel, gemm, pack_panels, unpack_panels


class PanelLinear(nn.Module):
    """y = x · Wᵀ + b, W float32 as the kernel's panels; other dtypes or devices go through F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: Kernel) -> None:
        super().__init__()
        assert kernel.lib is not None, "PanelLinear needs the C kernel"
        self.kernel = kernel
        self.out_features, self.in_features = weight.shape
        self.panels: torch.Tensor
        self.register_buffer("panels", pack_panels(weight), persistent=False)
        self.bias: torch.Tensor | None
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)

    @property
    def num_weights(self) -> int:
        """The Linear's parameter count: weight and bias, without the panels' zero padding."""
        return self.in_features * self.out_features + (0 if self.bias is None else self.bias.numel())

    @property
    def weight(self) -> torch.Tensor:
        """The weight (N, K), unpacked (a copy): for checks and the fallback."""
        return unpack_panels(self.panels, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight.to(x), None if self.bias is None else self.bias.to(x))
        if x.dim() == 2:
            return gemm(self.kernel, x, self.panels, self.out_features, self.bias)
        y = gemm(self.kernel, x.reshape(-1, self.in_features), self.panels, self.out_features, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} → {self.out_features}, float32 panels, bias={self.bias is not None}"


def use_float_gemm(model: nn.Module, kernel: Kernel) -> None:
    """Give every matmul of the fused float32 model (qkv, o, gate_up, down, and the head) to the
    kernel's GEMM, in place. A tied head gets panels of its own (the embedding stays row-major for
    the lookup: +V·D floats); so every matmul of a decode step can run in the fused C step."""
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        for owner, name in ((a, "qkv_proj"), (a, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
            old = getattr(owner, name)
            assert isinstance(old, nn.Linear) and old.weight.dtype == torch.float32, f"{name}: {old}"
            setattr(owner, name, PanelLinear(old.weight, old.bias, kernel))
    head = model.lm_head
    weight = model.model.embed_tokens.weight if head is None else head.weight
    model.lm_head = PanelLinear(weight, None if head is None else head.bias, kernel)
