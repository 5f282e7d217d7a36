"""Perplexity of one fixed English text, per weight mode: what quantization and dtype cost in quality.

The text is scored in one forward (teacher forcing): perplexity = exp(mean NLL of tokens 2..T).
Modes: float32, bfloat16 (float weights in that dtype), int8 and int4 (quantized weights through
the C kernel, or its torch fallback, float32 activations). Each mode loads the model anew.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from disagg_cli.config import RuntimeConfig
from disagg_cli.model.kv_cache import DenseKVCache
from disagg_cli.model.loader import LoadedModel

PPL_MODES = ("float32", "bfloat16", "int8", "int4")
PPL_TEXT = (
    "The river begins in the hills as a thin stream of cold water that runs over stones and under "
    "fallen trees. Farther down, other streams join it, and by the time it reaches the first town it "
    "is wide enough for small boats. People have lived along its banks for thousands of years, "
    "fishing, farming the flat land that floods each spring, and trading with the towns downstream. "
    "In the nineteenth century engineers built locks and canals so that larger ships could carry coal "
    "and grain to the coast. Today most of that trade moves by road and rail, and the river is used "
    "mainly for drinking water, irrigation and recreation. Scientists who study it measure the "
    "temperature, the amount of oxygen in the water and the number of fish, because these numbers show "
    "how healthy the river is. When a factory leaks chemicals or a summer is unusually dry, the "
    "measurements change within days. Keeping a river clean, they say, depends less on any single "
    "rule than on many small decisions made by the people who live near it. A student who wants to "
    "understand the river should walk its length at least once, from the spring to the sea, and write "
    "down what she sees: the color of the water, the birds, the bridges, and the places where the "
    "banks have been turned into walls of concrete."
)


def runtime_for_mode(mode: str, threads: int | None, kernel: str = "auto") -> RuntimeConfig:
    if mode not in PPL_MODES:
        raise ValueError(f"perplexity mode must be one of {', '.join(PPL_MODES)}, got {mode!r}")
    if mode in ("int8", "int4"):
        return RuntimeConfig(dtype="float32", threads=threads, quantization=mode, kernel=kernel)
    return RuntimeConfig(dtype=mode, threads=threads, quantization="none", kernel=kernel)


@torch.inference_mode()
def perplexity(lm: LoadedModel, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] given their prefixes, in one forward of all of `ids`."""
    cache = DenseKVCache(lm.config, len(ids), lm.kv_dtype, lm.device)
    x = torch.tensor(ids, device=lm.device)
    hidden = lm.model(x, torch.arange(len(ids), device=lm.device), cache)  # (T, D)
    logits = lm.model.compute_logits(hidden[:-1])  # (T-1, V) float32
    return math.exp(float(F.cross_entropy(logits, x[1:])))


def perplexity_per_mode(path: Path, ids: list[int], modes: tuple[str, ...], threads: int | None,
                        cache_dir: Path, kernel: str = "auto") -> dict[str, float]:
    """Each mode loaded on the bench's own backend (`--kernel`), so the modes differ in nothing else."""
    from disagg_cli.model.loader import load_model

    return {mode: perplexity(load_model(path, runtime_for_mode(mode, threads, kernel), cache_dir=cache_dir), ids)
            for mode in modes}
