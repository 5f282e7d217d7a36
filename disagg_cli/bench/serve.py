"""`disagg bench serve`: replay one workload against a disaggregated and/or a colocated cluster.

1. build the workload once from the seed (`bench/workload.py`), tokenizing with the model's
   tokenizer (the coordinator never loads weights);
2. per mode: start a local cluster (the same total cores for both modes), connect a coordinator,
   send the warm-up requests, then each request at its send time (at most `max_concurrency` in
   flight), recording every token's arrival time; with `--chaos-kill-every`, SIGKILL a random
   worker every so often and restart it on its port;
3. per mode and rate: vLLM's metrics (`bench/metrics.py`) plus the disaggregation figures, printed
   and saved by `bench/serve_report.py`; the cluster is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from disagg_cli import ui
from disagg_cli.bench.metrics import METRICS, RequestRecord, Slo
from disagg_cli.bench.workload import BenchRequest, interference_workload, random_workload, sharegpt_workload
from disagg_cli.config import Deadlines, SamplingParams
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec, load_cluster_config, local_topology
from disagg_cli.engine.logprobs import TokenLogprobs
from disagg_cli.engine.request import RequestOutput
from disagg_cli.errors import UsageError
from disagg_cli.kv.wire import CODEC_NAMES

if TYPE_CHECKING:
    from disagg_cli.coordinator.client import Coordinator
    from disagg_cli.coordinator.cluster import LocalCluster
    from disagg_cli.model.tokenizer import Tokenizer

MODES = ("disagg", "colocated", "both")
DATASETS = ("random", "sharegpt")
WORKLOADS = ("dataset", "interference")


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
    dtype: str = "float32"
    kv_codec: str | None = None
    worker_timeout_s: float = 10.0
    deadlines: Deadlines = field(default_factory=Deadlines)
    json_output: bool = False
    plot: Path | None = None
    workload: str = "dataset"
    interference: InterferenceShape = field(default_factory=InterferenceShape)
    sweep_rates: tuple[float, ...] = ()
    chaos_kill_every_s: float | None = None
    tokenizer: str | None = None  # for the workload; None: --model

    def __post_init__(self) -> None:
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
                            ("--long-output-len", self.interference.long_output_len)]:
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
        if self.kv_codec is not None and self.kv_codec not in CODEC_NAMES:
            raise UsageError(f"--kv-codec must be one of {', '.join(CODEC_NAMES)}, got {self.kv_codec!r}")
        if not self.worker_timeout_s > 0:
            raise UsageError(f"--worker-timeout must be positive, got {self.worker_timeout_s}")
        if self.chaos_kill_every_s is not None and not self.chaos_kill_every_s > 0:
            raise UsageError(f"--chaos-kill-every must be a positive number of seconds, got {self.chaos_kill_every_s}")
        if self.interference.long_interval_s <= 0:
            raise UsageError(f"--long-interval must be positive, got {self.interference.long_interval_s}")

    @property
    def modes(self) -> tuple[str, ...]:
        return ("disagg", "colocated") if self.mode == "both" else (self.mode,)


class TimedOutput(RequestOutput):
    """A RequestOutput that also stamps every token's arrival (for ITL and the token timeline)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.token_times_s: list[float] = []

    def append(self, token_id: int, logprobs: TokenLogprobs | None = None) -> str:
        self.token_times_s.append(time.perf_counter())
        return super().append(token_id, logprobs)

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
    base_url: str | None = None  # a server elsewhere (`bench/http_client.py`), not clusters started here

    @property
    def records(self) -> list[RequestRecord]:
        return [o.record() for o in self.outputs]


def build_workload(opts: ServeBenchOptions, tokenizer: Tokenizer, rate: float) -> list[BenchRequest]:
    if opts.workload == "interference":
        s = opts.interference
        return interference_workload(tokenizer, opts.num_prompts, s.short_input_len, s.short_output_len,
                                     s.long_input_len, s.long_output_len, s.long_interval_s, rate,
                                     opts.burstiness, opts.seed)
    if opts.dataset_name == "sharegpt":
        assert opts.dataset_path is not None
        return sharegpt_workload(tokenizer, opts.dataset_path, opts.num_prompts, rate, opts.burstiness, opts.seed)
    return random_workload(tokenizer, opts.num_prompts, opts.random_input_len, opts.random_output_len,
                           opts.random_range_ratio, rate, opts.burstiness, opts.seed)


def topologies(opts: ServeBenchOptions) -> dict[str, ClusterConfig]:
    """Per mode, what to start: the disaggregated topology and a colocated worker on the same cores."""
    from disagg_cli.coordinator.cluster import available_cpus, place

    if opts.config is not None:
        disagg = load_cluster_config(opts.config, default_model=opts.model)
        if disagg.is_colocated:
            raise UsageError(f"--config {opts.config} is a colocated topology; give a prefill + decode one")
    else:
        base = WorkerSpec("prefill", dtype=opts.dtype, kv_codec=opts.kv_codec)
        disagg = local_topology(opts.model, base)
    placed = place(disagg.workers, available_cpus())
    threads = sum(w.threads or 1 for w in placed)
    cpus = tuple(sorted({c for w in placed for c in (w.cpus or ())})) or None
    colocated_spec = replace(placed[0], role="colocated", port=0, threads=threads, cpus=cpus, kv_codec=None)
    return {"disagg": disagg, "colocated": ClusterConfig(disagg.model, (colocated_spec,))}


def run_mode(mode: str, cluster_config: ClusterConfig, model_path: Path, tokenizer: Tokenizer,
             workloads: list[tuple[float, list[BenchRequest]]], opts: ServeBenchOptions) -> list[RunResult]:
    """Start the mode's cluster once and run every (rate, workload) on it, one after the other."""
    from disagg_cli.coordinator.cluster import LocalCluster

    roles = [w.role for w in cluster_config.workers]
    ui.info(f"[{mode}] starting " + ", ".join(f"{roles.count(r)} {r}" for r in dict.fromkeys(roles)) + " worker(s)…")
    with LocalCluster(cluster_config, str(model_path)) as cluster:
        return asyncio.run(_run_all(mode, cluster, tokenizer, workloads, opts))


async def _run_all(mode: str, cluster: LocalCluster, tokenizer: Tokenizer,
                   workloads: list[tuple[float, list[BenchRequest]]], opts: ServeBenchOptions) -> list[RunResult]:
    from disagg_cli.coordinator.client import Coordinator, CoordinatorConfig

    topology: list[dict[str, object]] = [
        {"role": w.spec.role, "address": w.address, "threads": w.spec.threads,
         "cpus": list(w.spec.cpus or ()), "dtype": w.spec.dtype, "kv_codec": w.spec.kv_codec}
        for w in cluster.workers]
    num_cores = len({c for w in cluster.workers for c in (w.spec.cpus or ())}) or sum(
        int(w.spec.threads or 1) for w in cluster.workers)
    config = CoordinatorConfig(worker_timeout_s=opts.worker_timeout_s, deadlines=opts.deadlines)
    results = []
    async with Coordinator(cluster.addresses(), tokenizer.eos_token_ids, config, cluster.is_gone) as coordinator:
        await coordinator.connect(cluster.check)
        if opts.num_warmups and workloads and workloads[0][1]:
            first = workloads[0][1][0]
            warm = [_output(f"warmup-{i}", first, tokenizer, opts) for i in range(opts.num_warmups)]
            await asyncio.gather(*(coordinator.run_request(o) for o in warm))
        for rate, workload in workloads:
            ui.info(f"[{mode}] {len(workload)} requests at {rate:g} req/s")
            kills: list[dict[str, object]] = []
            chaos = (asyncio.create_task(_chaos(cluster, opts.chaos_kill_every_s, opts.seed, kills))
                     if opts.chaos_kill_every_s else None)
            try:
                outputs, duration_s, start_s = await _bench(coordinator, workload, tokenizer, opts, mode)
            finally:
                if chaos is not None:
                    chaos.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await chaos
            results.append(RunResult(mode, rate, workload, outputs, duration_s, start_s, topology, num_cores, kills))
    return results


def _output(request_id: str, req: BenchRequest, tokenizer: Tokenizer, opts: ServeBenchOptions) -> TimedOutput:
    # The interference shapes are token counts by design, so those requests never stop at EOS.
    ignore_eos = opts.ignore_eos or opts.workload == "interference"
    params = SamplingParams(max_tokens=req.output_len, ignore_eos=ignore_eos)
    return TimedOutput(request_id, "", list(req.prompt_ids), params, tokenizer)


async def _bench(coordinator: Coordinator, workload: list[BenchRequest], tokenizer: Tokenizer,
                 opts: ServeBenchOptions, mode: str) -> tuple[list[TimedOutput], float, float]:
    outputs = [_output(f"{mode}-{i}", req, tokenizer, opts) for i, req in enumerate(workload)]
    limit = asyncio.Semaphore(opts.max_concurrency) if opts.max_concurrency else None
    with ui_progress(len(workload), f"{mode} requests", enabled=ui.is_interactive()) as advance:
        start_s = time.perf_counter()

        async def one(req: BenchRequest, out: TimedOutput) -> None:
            delay = start_s + req.send_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with limit if limit is not None else contextlib.nullcontext():
                out.timings.arrival_s = time.perf_counter()  # vLLM's clock starts when the request is sent
                await coordinator.run_request(out)
            advance()

        await asyncio.gather(*(one(req, out) for req, out in zip(workload, outputs, strict=True)))
        duration_s = time.perf_counter() - start_s
    return outputs, duration_s, start_s


@contextlib.contextmanager
def ui_progress(total: int, label: str, enabled: bool):  # type: ignore[no-untyped-def]
    """A requests-done bar on stderr (a terminal only); yields the function that advances it."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=ui.err_console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


async def _chaos(cluster: LocalCluster, every_s: float | None, seed: int, kills: list[dict[str, object]]) -> None:
    """Every `every_s` seconds SIGKILL a random worker, then start it again on the same port."""
    assert every_s is not None
    rng = random.Random(seed ^ 0x5EED)
    start = time.perf_counter()
    while True:
        await asyncio.sleep(every_s)
        index = rng.randrange(len(cluster.workers))
        worker = cluster.workers[index]
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(worker.process.wait)
        cluster.restart(index)
        kills.append({"t_s": round(time.perf_counter() - start, 3), "index": index, "role": worker.spec.role,
                      "address": worker.address})
        ui.info(f"chaos: killed and restarted {worker.name}")


def prepare_workloads(opts: ServeBenchOptions) -> tuple[Path, Tokenizer, list[tuple[float, list[BenchRequest]]]]:
    """The tokenizer's model file, the tokenizer, and one workload per rate (the same seed for all)."""
    from disagg_cli.model.registry import resolve_model
    from disagg_cli.model.tokenizer import load_tokenizer

    with ui.pull_progress(opts.tokenizer or opts.model) as on_pull:
        model_path = resolve_model(opts.tokenizer or opts.model, opts.cache_dir, on_pull)
    tokenizer = load_tokenizer(model_path)
    rates = opts.sweep_rates or (opts.request_rate,)
    return model_path, tokenizer, [(rate, build_workload(opts, tokenizer, rate)) for rate in rates]


def run_serve_bench(opts: ServeBenchOptions) -> None:
    """The command: workload(s), each mode's runs, then the report (stdout), saved files and plot."""
    from disagg_cli.bench import serve_report
    from disagg_cli.model.registry import resolve_model

    model_path, tokenizer, workloads = prepare_workloads(opts)
    if opts.tokenizer is not None:  # the workers still load --model
        model_path = resolve_model(opts.model, opts.cache_dir)
    clusters = topologies(opts)
    runs = {mode: run_mode(mode, clusters[mode], model_path, tokenizer, workloads, opts) for mode in opts.modes}
    serve_report.report(runs, opts)
