"""What `disagg bench engine` measures, and its defaults (the command's options take theirs from here).

Light (no torch): the CLI reads the defaults without loading the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from disagg_cli.config import RuntimeConfig
from disagg_cli.errors import UsageError


@dataclass(frozen=True, slots=True)
class EngineBenchOptions:
    model: str
    cache_dir: Path
    runtime: RuntimeConfig
    block_size: int = 16
    prompt_lens: tuple[int, ...] = (128, 512, 2048)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_context: int = 128
    decode_tokens: int = 32
    reps: int = 3  # the median of 3 drops one run a busy neighbour slowed
    baseline: bool = True
    against: tuple[str, ...] = ()  # "llama-cpp"
    perplexity_modes: tuple[str, ...] | None = None  # None: the loaded mode only; () none
    json_output: bool = False

    def __post_init__(self) -> None:
        for name in ("prompt_lens", "batch_sizes"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be positive integers, got {getattr(self, name)}")
        for name in self.against:
            if name != "llama-cpp":
                raise UsageError(f"--against takes llama-cpp, got {name!r}")
        from disagg_cli.bench.perplexity import PPL_MODES

        for mode in self.perplexity_modes or ():
            if mode not in PPL_MODES:
                raise UsageError(f"--perplexity-modes takes {', '.join(PPL_MODES)}, got {mode!r}")
        for name in ("decode_context", "decode_tokens", "reps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


ENGINE_BENCH_DEFAULTS = {f.name: f.default for f in fields(EngineBenchOptions)}
