"""Build a ready-to-run model from a file: read the checkpoint, cast, place, strict-load, fuse, quantize.

1. resolve `--dtype auto` and `--quantization auto` for this machine and role (`model/hardware.py`);
2. read the checkpoint, cast to the dtype and load it under its HF names with `strict=True`;
3. fuse q/k/v and gate/up into one matmul each (`fuse_projections`);
4. with quantization, replace the matmuls by `QuantizedLinear`s (GGUF blocks taken as they are).

`LoadedModel` is what every role (colocated, prefill, decode) holds: the module, its config and
fingerprint, and the runtime it was built for (dtype and quantization resolved, with the reasons).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from disagg_cli.config import ModelConfig, RuntimeConfig
from disagg_cli.errors import ModelFormatError, UsageError
from disagg_cli.model.hardware import CPUInfo, QuantChoice, choose_dtype, choose_quantization, probe_cpu
from disagg_cli.model.llama import LlamaForCausalLM, fuse_projections
from disagg_cli.model.weights import Progress, read_checkpoint

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    fingerprint: str
    path: Path
    file_type: str
    runtime: RuntimeConfig  # as resolved: a concrete dtype and quantization
    dtype_reason: str = ""
    quantization_reason: str = ""
    kernel_reason: str = ""  # whether the quantized C kernel built, and why not
    kernel: Any = None  # the built `Kernel` (CPU): paged decode attention (float32 KV), quantized matmuls

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.runtime.dtype]

    @property
    def device(self) -> torch.device:
        return torch.device(self.runtime.device)

    @property
    def num_parameters(self) -> int:
        """Weights of the checkpoint (quantized ones counted by value; a tied head counted once)."""
        from disagg_cli.model.quant.linear import QuantizedLinear
        from disagg_cli.model.quant.panel import PanelLinear

        n = sum(p.numel() for p in self.model.parameters())
        for name, mod in self.model.named_modules():
            if isinstance(mod, QuantizedLinear) and not (name == "lm_head" and self.config.tie_word_embeddings):
                n += mod.in_features * mod.out_features
            elif (isinstance(mod, PanelLinear) and not name.endswith(".dense_gemm")  # a quantized one's copy
                  and not (name == "lm_head" and self.config.tie_word_embeddings)):
                n += mod.num_weights
        return n

    def describe_runtime(self) -> dict[str, str]:
        """The resolved choices and why, as the worker's hello and `disagg model info` show them."""
        return {"dtype": self.runtime.dtype, "dtype_reason": self.dtype_reason,
                "quantization": self.runtime.quantization, "quantization_reason": self.quantization_reason,
                "kernel": self.kernel_reason}


def apply_threads(runtime: RuntimeConfig) -> None:
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch build ({torch.__version__}) sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")


def resolve_runtime(runtime: RuntimeConfig, role: str, cpu: CPUInfo | None = None,
                    kernel_reason: str | None = None) -> tuple[RuntimeConfig, str, QuantChoice]:
    """(runtime with dtype and quantization made concrete, dtype reason, the quantization choice)."""
    cpu = cpu or probe_cpu()
    d = choose_dtype(runtime.dtype, runtime.device, cpu, role, kernel_reason is not None)
    q = choose_quantization(runtime.quantization, role, runtime.device, kernel_reason)
    return replace(runtime, dtype=d.dtype, quantization=q.quantization), d.reason, q


def load_model(path: Path, runtime: RuntimeConfig, progress: Progress | None = None,
               role: str = "colocated", cache_dir: Path | None = None) -> LoadedModel:
    """Load `path` for `role` ("prefill", "decode" or "colocated": what `--quantization auto` weighs)."""
    check_device(runtime.device)
    apply_threads(runtime)
    kernel = None
    # The C kernel also serves float weights: its paged decode attention reads each sequence's KV in
    # place through its block table, where torch would gather a padded copy of every decode's KV.
    if runtime.device == "cpu":
        from disagg_cli.model.quant.kernels import load_kernel
        from disagg_cli.model.registry import default_cache_dir

        kernel = load_kernel(cache_dir or default_cache_dir())
    resolved, dtype_reason, quant = resolve_runtime(
        runtime, role, kernel_reason=kernel.reason if kernel and kernel.available else None)
    ckpt = read_checkpoint(path, progress)
    dtype = TORCH_DTYPES[resolved.dtype]
    model = LlamaForCausalLM(ckpt.config, device="meta")  # every parameter is assigned from the file below
    state = {name: t.to(dtype) for name, t in ckpt.state_dict.items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ModelFormatError(f"{path}: weights do not fit a {ckpt.config.architecture} model: "
                               f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                               f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
    # strict: a missing or misnamed weight fails here, loudly, not as garbage output later.
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shapes that disagree with the config
        raise ModelFormatError(f"{path}: weights do not fit the model's own config: "
                               f"{str(e).splitlines()[-1].strip()}") from e
    del state
    fuse_projections(model)
    float_gemm = quant.float_gemm and kernel is not None and kernel.available and dtype == torch.float32
    quant_reason = quant.reason + ("; float matmuls on the C kernel's GEMM" if float_gemm else "")
    if resolved.quantization != "none":
        from disagg_cli.model.quant.linear import quantize_model

        quantize_model(model, resolved.quantization, ckpt.blocks, kernel, quant.keep_dense)
    elif float_gemm and kernel is not None:
        from disagg_cli.model.quant.panel import use_float_gemm

        use_float_gemm(model, kernel)
    model.to(runtime.device).eval()
    return LoadedModel(model, ckpt.config, ckpt.fingerprint, path, ckpt.file_type, resolved, dtype_reason,
                       quant_reason, kernel.reason if kernel else "", kernel if kernel and kernel.available else None)
