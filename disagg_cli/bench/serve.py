"""`disagg bench serve`: replay one workload against a disaggregated and/or a colocated cluster.

1. build the workload once from the seed (`bench/workload.py`), tokenizing with the model's
   tokenizer (the coordinator never loads weights);
2. per mode: start a coordinator service on the mode's local cluster (the same total cores for
   both modes), submit the warm-up requests, then each request at its send time (at most
   `max_concurrency` in flight; a conversation's turns one after the other, `bench/replay.py`),
   its output recording every token's arrival time; with `--chaos-kill-every`, SIGKILL a random
   worker of the service's cluster every so often and restart it on its port;
3. per mode and rate: vLLM's metrics (`bench/metrics.py`) plus the disaggregation figures, printed
   and saved by `bench/serve_report.py`; the service stops its cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from disagg_cli import ui
from disagg_cli.bench.replay import replay
from disagg_cli.bench.runs import RunResult, ServeBenchOptions, TimedOutput
from disagg_cli.bench.workload import (
    BenchRequest,
    interference_workload,
    multi_turn_workload,
    prefix_workload,
    random_workload,
    sharegpt_workload,
    shifting_workload,
)
from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.options import CoordinatorConfig, ServeOptions
from disagg_cli.coordinator.placement import Given, StartLocal
from disagg_cli.coordinator.service import CoordinatorService, ServiceConfig
from disagg_cli.coordinator.topology import (
    ClusterConfig,
    WorkerSpec,
    for_planner,
    load_cluster_config,
    local_topology,
)
from disagg_cli.errors import DisaggError, UsageError

if TYPE_CHECKING:
    from disagg_cli.coordinator.cluster import LocalCluster
    from disagg_cli.model.tokenizer import Tokenizer

def build_workload(opts: ServeBenchOptions, tokenizer: Tokenizer, rate: float) -> list[BenchRequest]:
    if opts.workload == "interference":
        s = opts.interference
        return interference_workload(tokenizer, opts.num_prompts, s.short_input_len, s.short_output_len,
                                     s.long_input_len, s.long_output_len, s.long_interval_s, rate,
                                     opts.burstiness, opts.seed)
    if opts.workload == "multi-turn":
        return multi_turn_workload(tokenizer, opts.num_prompts, opts.num_turns, opts.prefix_len,
                                   opts.random_input_len, opts.random_output_len, rate, opts.burstiness, opts.seed)
    if opts.workload == "shifting":
        return shifting_workload(tokenizer, opts.phase_s, rate, opts.burstiness, opts.seed)
    if opts.workload == "prefix":
        return prefix_workload(tokenizer, opts.num_prompts, opts.num_prefixes, opts.prefix_len, opts.random_input_len,
                               opts.random_output_len, rate, opts.burstiness, opts.seed)
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
        disagg = local_topology(opts.model, WorkerSpec.from_settings("prefill", opts.worker))
    placed = place(disagg.workers, available_cpus())
    threads = sum(w.threads or 1 for w in placed)
    cpus = tuple(sorted({c for w in placed for c in (w.cpus or ())})) or None
    colocated_spec = replace(placed[0], role="colocated", port=0, threads=threads, cpus=cpus, kv_codec=None)
    return {"disagg": disagg, "colocated": ClusterConfig(disagg.model, (colocated_spec,))}


def run_mode(mode: str, cluster_config: ClusterConfig, workloads: list[tuple[float, list[BenchRequest]]],
             opts: ServeBenchOptions) -> list[RunResult]:
    """Start the mode's cluster once, behind a coordinator service, and run every (rate, workload)
    on it, one after the other."""
    return asyncio.run(_run_all(mode, CoordinatorService(service_config(cluster_config, opts)), workloads, opts))


def service_config(cluster_config: ClusterConfig, opts: ServeBenchOptions) -> ServiceConfig:
    """The service of one mode: `cluster_config` started here, with the benchmark's coordinator settings."""
    coordinator = CoordinatorConfig(policy=opts.router, worker_timeout_s=opts.worker_timeout_s,
                                    deadlines=opts.deadlines, disagg_threshold=opts.disagg_threshold)
    if opts.planner.is_on:
        cluster_config = for_planner(cluster_config, opts.planner.max_step_ms)
    serve = ServeOptions(StartLocal(Given(cluster_config)), coordinator, planner=opts.planner)
    # A request sent while a killed worker restarts waits for it, as a client of a cluster would.
    return ServiceConfig(opts.model, opts.cache_dir, serve=serve, tokenizer=opts.tokenizer, wait_for_workers=True)


async def _run_all(mode: str, service: CoordinatorService, workloads: list[tuple[float, list[BenchRequest]]],
                   opts: ServeBenchOptions) -> list[RunResult]:
    results = []
    async with service:
        cluster = service.cluster
        assert cluster is not None, "bench serve starts its workers here"
        topology: list[dict[str, object]] = [
            {"role": w.spec.role, "address": w.address, "threads": w.spec.threads,
             "cpus": list(w.spec.cpus or ()), "dtype": w.spec.dtype, "kv_codec": w.spec.kv_codec}
            for w in cluster.workers]
        num_cores = len({c for w in cluster.workers for c in (w.spec.cpus or ())}) or sum(
            int(w.spec.threads or 1) for w in cluster.workers)
        if opts.num_warmups and workloads and workloads[0][1]:
            first = workloads[0][1][0]
            warm = [service.submit(list(first.prompt_ids), _params(first.output_len, opts), request_id=f"warmup-{i}")
                    for i in range(opts.num_warmups)]
            await asyncio.gather(*(stream.wait() for stream in warm))
        for rate, workload in workloads:
            ui.info(f"[{mode}] {len(workload)} requests at {rate:g} req/s")
            kills: list[dict[str, object]] = []
            roles = {w.address: w.role for w in service.workers()}
            seen = len(service.planner.changes) if service.planner is not None else 0
            chaos = (asyncio.create_task(_chaos(cluster, opts.chaos_kill_every_s, opts.seed, kills))
                     if opts.chaos_kill_every_s else None)
            try:
                outputs, duration_s, start_s = await _bench(service, workload, opts, mode)
            finally:
                if chaos is not None:
                    chaos.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await chaos
            # What the workers hold once the run is over: every block should be free again (no leak).
            blocks = await service.kv_blocks(timeout_s=30)
            changes = service.planner.changes[seen:] if service.planner is not None else []
            results.append(RunResult(mode, rate, workload, outputs, duration_s, start_s, topology, num_cores, kills,
                                     blocks_at_end=blocks, roles_at_start=roles,
                                     role_changes=[c.as_dict() | {"t_s": round(c.t_s - start_s, 3)}
                                                   for c in changes]))
    return results


def _params(output_len: int, opts: ServeBenchOptions) -> SamplingParams:
    return SamplingParams(max_tokens=output_len, ignore_eos=opts.ignores_eos)


async def _bench(service: CoordinatorService, workload: list[BenchRequest], opts: ServeBenchOptions,
                 mode: str) -> tuple[list[TimedOutput], float, float]:
    tokenizer = service.tokenizer
    assert tokenizer is not None

    def make(index: int, prompt_ids: list[int]) -> TimedOutput:
        return TimedOutput(f"{mode}-{index}", "", prompt_ids, _params(workload[index].output_len, opts), tokenizer)

    async def send(out: TimedOutput) -> None:
        try:
            stream = service.submit_output(out)
        except DisaggError as e:  # refused before it began (e.g. longer than the context): a failed request
            out.fail("refused", str(e))
            return
        await stream.wait()

    return await replay(workload, make, send, f"{mode} requests", opts.max_concurrency)


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


def prepare_workloads(opts: ServeBenchOptions) -> tuple[Tokenizer, list[tuple[float, list[BenchRequest]]]]:
    """The tokenizer, and one workload per rate (the same seed for all)."""
    from disagg_cli.model.registry import resolve_model
    from disagg_cli.model.tokenizer import load_tokenizer

    with ui.pull_progress(opts.tokenizer or opts.model) as on_pull:
        model_path = resolve_model(opts.tokenizer or opts.model, opts.cache_dir, on_pull)
    tokenizer = load_tokenizer(model_path)
    rates = opts.sweep_rates or (opts.request_rate,)
    return tokenizer, [(rate, build_workload(opts, tokenizer, rate)) for rate in rates]


def run_serve_bench(opts: ServeBenchOptions) -> None:
    """The command: workload(s), each mode's runs, then the report (stdout), saved files and plot."""
    from disagg_cli.bench import serve_report

    _, workloads = prepare_workloads(opts)
    clusters = topologies(opts)
    runs = {mode: run_mode(mode, clusters[mode], workloads, opts) for mode in opts.modes}
    serve_report.report(runs, opts)
