"""One table of worker settings: how a worker computes (device, dtype, weights, threads), its KV pool and
batching, and the codec its KV leaves in.

Every command that starts workers or is one (`generate`, `serve`, `bench serve`, the `*-worker`
commands) takes these options from `WORKER_SETTINGS` (the Typer side is `cli_options.worker_options`),
a topology file takes the same names as keys (`coordinator/topology.py`'s `WorkerSpec`), and the
values end in a `WorkerConfig`. The defaults are written once, in `RuntimeConfig` and `EngineConfig`,
so no command can drift from another. Pure: no Typer, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from disagg_cli.config import (
    DTYPE_CHOICES,
    KERNELS,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    WIDE_DTYPES,
    EngineConfig,
    RuntimeConfig,
)
from disagg_cli.errors import UsageError
from disagg_cli.protocol.names import CODEC_NAMES, WORKER_ROLES

_RUNTIME = RuntimeConfig()
_ENGINE = EngineConfig()


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The values of `WORKER_SETTINGS` for one worker (or every worker a front end starts)."""

    device: str = _RUNTIME.device
    dtype: str = _RUNTIME.dtype
    quantization: str = _RUNTIME.quantization
    threads: int | None = _RUNTIME.threads
    kernel: str = _RUNTIME.kernel
    wide_dtype: str = _RUNTIME.wide_dtype
    kv_cache_dtype: str = _RUNTIME.kv_cache_dtype
    block_size: int = _ENGINE.block_size
    kv_cache_tokens: int | None = _ENGINE.kv_cache_tokens
    kv_cache_memory_mb: float = _ENGINE.kv_cache_memory_mb
    max_num_seqs: int = _ENGINE.max_num_seqs
    max_num_batched_tokens: int = _ENGINE.max_num_batched_tokens
    chunked_prefill: bool = _ENGINE.chunked_prefill
    max_step_ms: float = _ENGINE.max_step_ms
    enable_prefix_caching: bool = _ENGINE.enable_prefix_caching
    kv_codec: str | None = None  # None: the prefill worker's own default (auto), or the topology file's
    elastic: bool = False  # may change role in place (`SwitchRole`): loads what every role needs

    def __post_init__(self) -> None:
        self.runtime()
        self.engine()  # each validates its values and names the flag
        if self.kv_codec is not None and self.kv_codec not in CODEC_NAMES:
            raise UsageError(f"--kv-codec must be one of {', '.join(CODEC_NAMES)}, got {self.kv_codec!r}")

    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(device=self.device, dtype=self.dtype, threads=self.threads, quantization=self.quantization,
                             kernel=self.kernel, wide_dtype=self.wide_dtype, kv_cache_dtype=self.kv_cache_dtype)

    def engine(self) -> EngineConfig:
        return EngineConfig(block_size=self.block_size, kv_cache_tokens=self.kv_cache_tokens,
                            kv_cache_memory_mb=self.kv_cache_memory_mb, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens, chunked_prefill=self.chunked_prefill,
                            max_step_ms=self.max_step_ms, enable_prefix_caching=self.enable_prefix_caching)


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table: a `WorkerSettings` field, which is also the TOML key; the flag is the
    name with dashes (or `flags`); `roles`: the worker commands that take it (front ends take all)."""

    name: str
    help: str
    panel: str
    flags: tuple[str, ...] = ()
    roles: tuple[str, ...] = WORKER_ROLES


RUNTIME_PANEL = "Worker: model and runtime"
KV_PANEL = "Worker: KV cache and batching"

WORKER_SETTINGS: tuple[Setting, ...] = (
    Setting("device", "cpu, cuda, cuda:N or mps.", RUNTIME_PANEL),
    Setting("dtype", f"Weights and KV dtype: {', '.join(DTYPE_CHOICES)} (auto: bfloat16 where the CPU computes it "
                     "natively (AVX512-BF16/AMX) or on CUDA, else float32; decode and colocated workers keep "
                     "float32 where the C kernel runs).", RUNTIME_PANEL),
    Setting("quantization", f"Weight-only quantization: {', '.join(QUANTIZATIONS)} (auto: int4 for decode, float "
                            "for prefill, both for colocated; the GGUF's own Q8_0/Q4_0/Q4_1 blocks load as they "
                            "are).", RUNTIME_PANEL),
    Setting("threads", "Torch intra-op threads per worker (default: workers started here share the cores; a "
                       "worker alone: torch's choice).", RUNTIME_PANEL),
    Setting("kernel", f"Execution backend: {', '.join(KERNELS)} (c: the C kernel built for this CPU at first use; "
                      "torch: torch's ops only; auto: c wherever it builds, else torch, and the log says why). It "
                      "decides --dtype auto and --quantization auto too.", RUNTIME_PANEL),
    Setting("wide_dtype", f"{' or '.join(WIDE_DTYPES)}: the float weights a colocated worker keeps beside int4 ones "
                          "(--quantization auto) for steps of many rows. bfloat16 runs them on oneDNN where the CPU "
                          "multiplies it natively (AVX512-BF16, AMX): 2.2x float32's prompt speed on Zen 4, but "
                          "greedy agreement with float32 falls to 89% (97.9% a step; README, 'Speed').",
            RUNTIME_PANEL),
    Setting("kv_cache_dtype", f"KV pool dtype: {', '.join(KV_CACHE_DTYPES)} (auto: bfloat16 where the weights are "
                              "quantized on the C kernel, whose attention widens it to float32 as it reads, "
                              "half the bytes of float32; else the weights' dtype, so --dtype float32 "
                              "--quantization none stays exact). A prefill worker's KV lands in its decode "
                              "worker's pool dtype.", KV_PANEL),
    Setting("block_size", "Tokens per KV block.", KV_PANEL),
    Setting("kv_cache_tokens", "KV pool size in tokens (default: sized by --kv-cache-memory-mb).", KV_PANEL),
    Setting("kv_cache_memory_mb", "KV pool size in MiB when --kv-cache-tokens is not given.", KV_PANEL),
    Setting("max_num_seqs", "Most sequences decoding at once.", KV_PANEL),
    Setting("max_num_batched_tokens", "Token budget of one engine step.", KV_PANEL),
    Setting("chunked_prefill", "Split long prompts into chunks that share steps with decodes.", KV_PANEL,
            roles=("colocated",)),
    Setting("max_step_ms", "Cut prompt chunks so a step ends within this many ms (from the measured prefill "
                           "speed, after the step's decodes; at least 32 tokens a step): decoding requests' TPOT stays "
                           "near it while prompts share their steps (a prefill worker is never bounded). 0: only "
                           "--max-num-batched-tokens bounds a chunk (--planner slo makes 0 0.8x --slo-tpot-ms).",
            KV_PANEL),
    Setting("enable_prefix_caching", "Keep full KV blocks after their request and reuse them for prompts that "
                                     "start with the same tokens.", KV_PANEL,
            flags=("--enable-prefix-caching/--no-enable-prefix-caching",)),
    Setting("kv_codec", f"KV codec of the prefill workers: {', '.join(CODEC_NAMES)} (default: auto, or what a "
                        "--config topology says).", KV_PANEL, roles=("prefill",)),
    Setting("elastic", "Let the coordinator switch this worker between prefill, decode and colocated in place "
                       "(weights, KV pool and prefix cache kept): it loads what every role needs, as a colocated "
                       "worker does (int4 weights for decode steps and float copies for wide ones).", RUNTIME_PANEL,
            flags=("--elastic/--no-elastic",)),
)

SETTING_NAMES = tuple(s.name for s in WORKER_SETTINGS)
DEFAULTS = {f.name: f.default for f in fields(WorkerSettings)}
assert set(SETTING_NAMES) == set(DEFAULTS), "every WorkerSettings field has one row in WORKER_SETTINGS"
