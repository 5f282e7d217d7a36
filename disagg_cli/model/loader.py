"""Build a ready-to-run model from a file: read the checkpoint, cast, place, strict-load.

`LoadedModel` is what every role (colocated, prefill, decode) holds: the module, its config and
fingerprint, and the runtime it was built for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from disagg_cli.config import ModelConfig, RuntimeConfig
from disagg_cli.errors import ModelFormatError, UsageError
from disagg_cli.model.llama import LlamaForCausalLM, RotaryEmbedding
from disagg_cli.model.weights import Progress, read_checkpoint

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    fingerprint: str
    path: Path
    file_type: str
    runtime: RuntimeConfig

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.runtime.dtype]

    @property
    def device(self) -> torch.device:
        return torch.device(self.runtime.device)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def apply_threads(runtime: RuntimeConfig) -> None:
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch build ({torch.__version__}) sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")


def load_model(path: Path, runtime: RuntimeConfig, progress: Progress | None = None) -> LoadedModel:
    check_device(runtime.device)
    apply_threads(runtime)
    ckpt = read_checkpoint(path, progress)
    dtype = TORCH_DTYPES[runtime.dtype]
    with torch.device("meta"):
        model = LlamaForCausalLM(ckpt.config)
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
    model.rotary = RotaryEmbedding(ckpt.config)  # float32 on purpose, whatever the weights' dtype
    model.to(runtime.device).eval()
    return LoadedModel(model, ckpt.config, ckpt.fingerprint, path, ckpt.file_type, runtime)
