"""Frozen configuration, built once at the edge (cli.py) and passed down.

Owns the model's architecture description (`ModelConfig`, read from a model file's own metadata),
the runtime choices of one process (`RuntimeConfig`: device, dtype, threads) and the sampling
settings of one request (`SamplingParams`), a worker's whole configuration (`WorkerConfig`, handed
whole to the process or thread that runs the worker) and a request's deadlines. Each validates
itself in `__post_init__` so a bad value fails where it is made, with a message that names the flag.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from disagg_cli.core_lease import LendConfig
from disagg_cli.errors import UsageError

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: bfloat16 where the device computes it natively, else float32
# The KV pool's dtype (vLLM's --kv-cache-dtype); auto: bfloat16 under quantized weights on the C
# kernel, else the weights' dtype (model/hardware.py)
KV_CACHE_DTYPES = ("auto", *DTYPES)
QUANTIZATIONS = ("none", "int8", "int4", "auto")  # weight-only; auto: what is fastest for the role
KERNELS = ("auto", "c", "torch")  # the execution backend (model/backend.py); auto: c wherever it builds
# The dtype of the float weights a colocated worker keeps for wide steps (with --quantization auto):
# bfloat16 (oneDNN, where the CPU has AVX512-BF16 or AMX) is faster but rounds activations and weights.
WIDE_DTYPES = ("float32", "bfloat16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_LOGPROBS = 20  # OpenAI's limit on top alternatives per token
# Below this a temperature is greedy: dividing logits by 1e-40 overflows them to inf, and
# torch.multinomial refuses the NaN probabilities that follow (issue 24).
MIN_TEMPERATURE = 1e-5
# What `torch.Generator.manual_seed` accepts; a seed outside fails in the worker, not at the edge.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_TOP_K = 2**63 - 1  # torch.topk's k is an int64


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of one Llama-family checkpoint (Llama, Mistral, SmolLM, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    # One divisor per rotary frequency (head_dim // 2 of them), as Llama 3's rope scaling and
    # GGUF's `rope_freqs` tensor express it; None means plain RoPE.
    rope_freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: {self.num_heads} heads is not a multiple of "
                             f"{self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"model config: {len(self.rope_freq_factors)} rope factors for "
                             f"head_dim {self.head_dim}")

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Bytes of K and V for one token over all layers: 2 × layers × kv_heads × head_dim × size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Where and how one process runs the model.

    `dtype`, `quantization` and `kv_cache_dtype` may be "auto" here; `model/loader.py` resolves them for the machine
    and role it loads on (see `model/hardware.py`), and `LoadedModel.runtime` holds the result.
    """

    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    quantization: str = "auto"
    kernel: str = "auto"
    wide_dtype: str = "float32"
    kv_cache_dtype: str = "auto"  # the KV pool's dtype

    def __post_init__(self) -> None:
        if self.wide_dtype not in WIDE_DTYPES:
            raise UsageError(f"--wide-dtype must be one of {', '.join(WIDE_DTYPES)}, got {self.wide_dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise UsageError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kernel not in KERNELS:
            raise UsageError(f"--kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise UsageError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if not (self.device == "cpu" or self.device == "mps" or self.device.startswith("cuda")):
            raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks tokens and when it stops. temperature 0 (or below `MIN_TEMPERATURE`)
    means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # report the sampled token's logprob and this many top alternatives

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UsageError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise UsageError(f"--top-k must be between 0 (off) and {MAX_TOP_K}, got {self.top_k}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise UsageError(f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {self.seed}")
        if any(s == "" for s in self.stop):
            raise UsageError("--stop strings must not be empty")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The batched engine's memory and batching limits (vLLM's names where it has one)."""

    block_size: int = 16
    kv_cache_tokens: int | None = None  # pool size in tokens; else sized by kv_cache_memory_mb
    kv_cache_memory_mb: float = 512.0
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    max_step_ms: float = 0.0  # with decodes in a step, prompt chunks cut to end it by then; 0: no bound
    enable_prefix_caching: bool = True  # full blocks kept after their request, shared by equal prefixes

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise UsageError(f"--block-size must be at least 1, got {self.block_size}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise UsageError(f"--kv-cache-tokens must be at least one block ({self.block_size}), "
                             f"got {self.kv_cache_tokens}")
        if self.kv_cache_memory_mb <= 0:
            raise UsageError(f"--kv-cache-memory-mb must be positive, got {self.kv_cache_memory_mb}")
        if self.max_num_seqs < 1:
            raise UsageError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise UsageError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}")
        if not (self.max_step_ms >= 0 and math.isfinite(self.max_step_ms)):
            raise UsageError(f"--max-step-ms must be 0 (no bound) or a positive number, got {self.max_step_ms}")

    def num_blocks(self, kv_bytes_per_token: int) -> int:
        if self.kv_cache_tokens is not None:
            return -(-self.kv_cache_tokens // self.block_size)
        return max(1, int(self.kv_cache_memory_mb * 2**20) // (kv_bytes_per_token * self.block_size))


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long a request may go without progress at each stage, and in all, in seconds.

    A stage past its deadline is `stalled`: the coordinator aborts the request where it is and
    retries it elsewhere; retries and waits for a worker to come back end at `request_s`. The
    defaults leave room for a loaded 2-core machine (a 2,048-token prompt on a slow CPU)."""

    reserve_s: float = 300.0  # a reservation may queue this long for KV memory on a decode worker
    first_token_s: float = 120.0  # the prefill request: queue + compute, to its first token
    token_s: float = 60.0  # between tokens, and from the first token to the KV landing on decode
    request_s: float = 900.0  # the whole request, retries and waits for a worker included

    def __post_init__(self) -> None:
        for name, flag in (("reserve_s", "--reserve-timeout"), ("first_token_s", "--first-token-timeout"),
                           ("token_s", "--token-timeout"), ("request_s", "--request-timeout")):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{flag} must be a positive number of seconds, got {value}")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything one worker runs with, made once at the edge (worker flags, a TOML topology, the
    options of `generate`/`bench`) and handed whole to wherever it runs: a child process gets it
    as JSON (`to_json`), so no field can fall out on the way."""

    role: str
    model: str
    host: str
    port: int
    runtime: RuntimeConfig
    engine: EngineConfig
    kv_codec: str = "auto"
    link_gbps: float | None = None
    advertise_host: str | None = None  # the address peers reach us at, when binding 0.0.0.0
    grace_s: float = 10.0  # how long in-flight requests may finish after SIGTERM
    keys_dir: Path | None = None  # CurveZMQ keys (see keys.py); None: plain tcp, loopback by default
    client_timeout_s: float = 30.0  # a heartbeating coordinator silent this long has gone away
    # CPU affinity (Linux), set on every thread once the model is loaded: the load itself may use
    # every core, so workers sharing a machine start in parallel instead of queueing on theirs.
    cpus: tuple[int, ...] | None = None
    # The coordinator may switch its role in place (`workers/roles.py`): the model is loaded for
    # every role (as colocated: what `--quantization auto` keeps for both phases), once.
    elastic: bool = False
    # Its part of a lease of cores between local workers (`core_lease.py`); None: its own cores only.
    lend: LendConfig | None = None

    @property
    def load_role(self) -> str:
        """The role the weights are loaded for: the worker's own, or colocated (the superset) when elastic."""
        return "colocated" if self.elastic else self.role

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UsageError(f"--port must be in 1..65535, got {self.port}")
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise UsageError(f"--link-gbps must be positive, got {self.link_gbps}")
        if not self.grace_s >= 0:
            raise UsageError(f"--grace-s must be >= 0, got {self.grace_s}")
        if not self.client_timeout_s > 0:
            raise UsageError(f"--client-timeout must be positive, got {self.client_timeout_s}")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["keys_dir"] = None if self.keys_dir is None else str(self.keys_dir)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        """The config `to_json` wrote; validated again, as any config is where it is made."""
        try:
            data = json.loads(text)
            data["runtime"] = RuntimeConfig(**data["runtime"])
            data["engine"] = EngineConfig(**data["engine"])
            data["keys_dir"] = None if data["keys_dir"] is None else Path(data["keys_dir"])
            data["cpus"] = None if data.get("cpus") is None else tuple(data["cpus"])
            lend = data.get("lend")
            data["lend"] = None if lend is None else LendConfig(lend["path"], lend["slot"], tuple(lend["threads"]),
                                                                tuple(lend["cpus"]))
            return cls(**data)
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"not a worker config (as WorkerConfig.to_json writes): {e}") from None
