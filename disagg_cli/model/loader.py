"""Build a ready-to-run model from a file: read the checkpoint, cast, place, strict-load, fuse, quantize.

1. resolve `--dtype auto` and `--quantization auto` for this machine and role (`model/hardware.py`);
2. read the checkpoint, cast to the dtype and load it under its HF names with `strict=True`;
3. fuse q/k/v and gate/up into one matmul each (`fuse_projections`);
4. the execution backend chosen by `--kernel` (`model/backend.py`, before step 1: the `auto`s follow
   from it) gives each matmul its linear method (quantized ones as `QuantizedLinear`s, GGUF blocks
   taken as they are), builds the fused decode step where it can and picks the attention.

`LoadedModel` is what every role (colocated, prefill, decode) holds: the module, its config and
fingerprint, the runtime it was built for (dtype and quantization resolved, with the reasons) and
the `Execution` the backend fixed for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from disagg_cli.config import ModelConfig, RuntimeConfig
from disagg_cli.errors import ModelFormatError, UsageError
from disagg_cli.model.backend import Backend, Execution, choose_backend
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
    runtime: RuntimeConfig  # as resolved: a concrete dtype, quantization and kernel ("c" or "torch")
    execution: Execution  # the backend's linear methods, fused step and attention for this model
    dtype_reason: str = ""
    quantization_reason: str = ""

    @property
    def backend(self) -> Backend:
        return self.execution.backend

    @property
    def kernel_reason(self) -> str:
        """The backend and why, as the worker log and `generate` print it."""
        return f"kernel {self.backend.name} ({self.backend.reason})"

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

        # a quantized weight's float copy lives in its method, not among the modules
        n = sum(p.numel() for p in self.model.parameters())
        for name, mod in self.model.named_modules():
            if isinstance(mod, QuantizedLinear) and not (name == "lm_head" and self.config.tie_word_embeddings):
                n += mod.in_features * mod.out_features
            elif isinstance(mod, PanelLinear) and not (name == "lm_head" and self.config.tie_word_embeddings):
                n += mod.num_weights
        return n

    def describe_runtime(self) -> dict[str, str]:
        """The resolved choices and why, as the worker's hello and `disagg model info` show them."""
        return {"dtype": self.runtime.dtype, "dtype_reason": self.dtype_reason,
                "quantization": self.runtime.quantization, "quantization_reason": self.quantization_reason,
                **self.execution.describe()}


def apply_threads(runtime: RuntimeConfig) -> None:
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch build ({torch.__version__}) sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")


def resolve_runtime(runtime: RuntimeConfig, role: str, cpu: CPUInfo | None = None,
                    backend: str = "torch", stored_quantized: bool = True) -> tuple[RuntimeConfig, str, QuantChoice]:
    """(runtime with dtype, quantization and kernel made concrete for `backend` ("c" or "torch"),
    dtype reason, the quantization choice)."""
    cpu = cpu or probe_cpu()
    d = choose_dtype(runtime.dtype, runtime.device, cpu, role, backend)
    q = choose_quantization(runtime.quantization, role, runtime.device, backend, cpu, stored_quantized,
                            runtime.wide_dtype)
    return replace(runtime, dtype=d.dtype, quantization=q.quantization, kernel=backend), d.reason, q


def load_model(path: Path, runtime: RuntimeConfig, progress: Progress | None = None,
               role: str = "colocated", cache_dir: Path | None = None) -> LoadedModel:
    """Load `path` for `role` ("prefill", "decode" or "colocated": what `--quantization auto` weighs)."""
    check_device(runtime.device)
    apply_threads(runtime)
    from disagg_cli.model.registry import default_cache_dir

    backend = choose_backend(runtime.kernel, runtime.device, cache_dir or default_cache_dir())
    ckpt = read_checkpoint(path, progress)
    resolved, dtype_reason, quant = resolve_runtime(runtime, role, backend=backend.name,
                                                    stored_quantized=bool(ckpt.blocks))
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
    model.to(runtime.device)
    float_gemm = quant.float_gemm and backend.name == "c" and dtype == torch.float32
    quant_reason = quant.reason + ("; float matmuls on the C kernel's GEMM" if float_gemm else "")
    execution = backend.plan(model, resolved.quantization, ckpt.blocks, quant, float_gemm)
    model.eval()
    return LoadedModel(model, ckpt.config, ckpt.fingerprint, path, ckpt.file_type, resolved, execution,
                       dtype_reason, quant_reason)
