"""What a serving benchmark is given and what it gets back: `ServeBenchOptions`, the timed output
of one request, and one mode's run at one rate. Shared by the runner (`bench/serve.py`, clusters
started here), the HTTP client (`bench/http_client.py`, any OpenAI server), the report and plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from disagg_cli.bench.metrics import METRICS, RequestRecord, Slo
from disagg_cli.bench.workload import DEFAULT_PHASE_S, BenchRequest
from disagg_cli.config import Deadlines
from disagg_cli.coordinator.planner import PlannerConfig
from disagg_cli.coordinator.stream import StreamingOutput
from disagg_cli.errors import UsageError
from disagg_cli.worker_settings import WorkerSettings

MODES = ("disagg", "colocated", "both")
DATASETS = ("random", "sharegpt")
WORKLOADS = ("dataset", "interference", "multi-turn", "prefix", "shifting")
# Workloads whose shapes are token counts by design: their requests never stop at EOS.
FIXED_LENGTH_WORKLOADS = ("interference", "multi-turn", "prefix", "shifting")


@dataclass(frozen=True, slots=True)
class InterferenceShape:
    short_input_len: int = 32
    short_output_len: int = 64
    long_input_len: int = 1024
    long_output_len: int = 8
    long_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ServeBenchOptions:
    model: str
    cache_dir: Path
    dataset_name: str = "random"
    dataset_path: Path | None = None
    random_input_len: int = 256
    random_output_len: int = 64
    random_range_ratio: float = 0.0
    num_prompts: int = 32
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    num_warmups: int = 0
    ignore_eos: bool = False
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl")
    metric_percentiles: tuple[float, ...] = (99.0,)
    goodput: Slo = field(default_factory=Slo)
    save_result: bool = False
    result_dir: Path | None = None
    result_filename: str | None = None
    label: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    mode: str = "disagg"
    config: Path | None = None
    worker: WorkerSettings = field(default_factory=WorkerSettings)  # every worker of the default topology
    worker_timeout_s: float = 10.0
    deadlines: Deadlines = field(default_factory=Deadlines)
    json_output: bool = False
    plot: Path | None = None
    workload: str = "dataset"
    interference: InterferenceShape = field(default_factory=InterferenceShape)
    sweep_rates: tuple[float, ...] = ()
    chaos_kill_every_s: float | None = None
    tokenizer: str | None = None  # for the workload; None: --model
    num_turns: int = 4  # multi-turn: turns per conversation
    prefix_len: int = 256  # multi-turn: shared system prompt; prefix: each shared prefix (tokens)
    num_prefixes: int = 1  # prefix: distinct prefixes, assigned round-robin
    disagg_threshold: int | str = 0  # selective disaggregation (CoordinatorConfig)
    router: str = "round-robin"
    planner: PlannerConfig = field(default_factory=PlannerConfig)  # --planner and its SLO targets
    phase_s: float = DEFAULT_PHASE_S  # shifting: seconds of sending per phase

    def __post_init__(self) -> None:
        from disagg_cli.coordinator.router import POLICIES

        if self.router not in POLICIES:
            raise UsageError(f"--router must be one of {', '.join(POLICIES)}, got {self.router!r}")
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dataset_name not in DATASETS:
            raise UsageError(f"--dataset-name must be one of {', '.join(DATASETS)}, got {self.dataset_name!r}")
        if self.dataset_name == "sharegpt" and self.dataset_path is None:
            raise UsageError("--dataset-name sharegpt needs --dataset-path FILE.json (ShareGPT format)")
        if self.workload not in WORKLOADS:
            raise UsageError(f"--workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        for flag, value in [("--num-prompts", self.num_prompts), ("--random-input-len", self.random_input_len),
                            ("--random-output-len", self.random_output_len),
                            ("--short-input-len", self.interference.short_input_len),
                            ("--short-output-len", self.interference.short_output_len),
                            ("--long-input-len", self.interference.long_input_len),
                            ("--long-output-len", self.interference.long_output_len),
                            ("--num-turns", self.num_turns), ("--num-prefixes", self.num_prefixes)]:
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if not 0 <= self.random_range_ratio < 1:
            raise UsageError(f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}")
        for rate in (self.request_rate, *self.sweep_rates):
            if not rate > 0:
                raise UsageError(f"request rates must be positive (or inf), got {rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise UsageError(f"--burstiness must be a positive number (1 = Poisson), got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise UsageError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if self.num_warmups < 0:
            raise UsageError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        bad = [m for m in self.percentile_metrics if m not in METRICS]
        if bad or not self.percentile_metrics:
            raise UsageError(f"--percentile-metrics takes a comma list of {','.join(METRICS)}, got {bad or 'none'}")
        if not self.metric_percentiles or not all(0 < p < 100 for p in self.metric_percentiles):
            raise UsageError(f"--metric-percentiles must be in (0, 100), got {list(self.metric_percentiles)}")
        if self.sweep_rates and not {"ttft", "tpot"} <= set(self.goodput.limits_ms):
            raise UsageError("--sweep-rates needs both SLOs: --goodput ttft:MS tpot:MS")
        if not self.worker_timeout_s > 0:
            raise UsageError(f"--worker-timeout must be positive, got {self.worker_timeout_s}")
        if self.chaos_kill_every_s is not None and not self.chaos_kill_every_s > 0:
            raise UsageError(f"--chaos-kill-every must be a positive number of seconds, got {self.chaos_kill_every_s}")
        if self.prefix_len < (1 if self.workload == "prefix" else 0):
            raise UsageError(f"--prefix-len must be at least {1 if self.workload == 'prefix' else 0} "
                             f"for --workload {self.workload}, got {self.prefix_len}")
        if not (self.phase_s > 0 and math.isfinite(self.phase_s)):
            raise UsageError(f"--phase-duration must be a positive number of seconds, got {self.phase_s}")
        if self.interference.long_interval_s <= 0:
            raise UsageError(f"--long-interval must be positive, got {self.interference.long_interval_s}")

    @property
    def ignores_eos(self) -> bool:
        return self.ignore_eos or self.workload in FIXED_LENGTH_WORKLOADS

    @property
    def modes(self) -> tuple[str, ...]:
        return ("disagg", "colocated") if self.mode == "both" else (self.mode,)


class TimedOutput(StreamingOutput):
    """A request's output as the service streams it (which stamps every token's arrival, for ITL
    and the token timeline), and the benchmark's record of it."""

    def record(self) -> RequestRecord:
        t = self.timings
        ok = self.state == "done" and bool(self.token_times_s) and t.finish_s is not None
        if not ok:
            return RequestRecord(False, len(self.prompt_token_ids), 0, error=self.error or f"ended {self.state}")
        assert t.finish_s is not None
        times = self.token_times_s
        return RequestRecord(True, len(self.prompt_token_ids), len(self.token_ids), times[0] - t.arrival_s,
                             t.finish_s - t.arrival_s, tuple(b - a for a, b in zip(times, times[1:], strict=False)))


@dataclass
class RunResult:
    """One mode at one rate: the outputs in workload order and what happened around them."""

    mode: str
    rate: float
    workload: list[BenchRequest]
    outputs: list[TimedOutput]
    duration_s: float
    start_s: float  # perf_counter at the benchmark's start
    topology: list[dict[str, object]]
    num_cores: int
    kills: list[dict[str, object]] = field(default_factory=list)
    # (free, total) KV blocks per live worker after the run; None when the workers are not ours.
    blocks_at_end: dict[str, tuple[int, int]] | None = None
    base_url: str | None = None  # a server elsewhere (`bench/http_client.py`), not clusters started here
    # The planner's switches (`RoleChange.as_dict`, `t_s` from the start) and the roles at the start.
    role_changes: list[dict[str, object]] = field(default_factory=list)
    roles_at_start: dict[str, str] = field(default_factory=dict)

    @property
    def records(self) -> list[RequestRecord]:
        return [o.record() for o in self.outputs]
