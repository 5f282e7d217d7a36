"""`disagg bench serve`: replay one workload against a disaggregated and/or a colocated cluster.

1. build the workload once from the seed (`bench/workload.py`), tokenizing with the model's
   tokenizer (the coordinator never loads weights);
2. per mode: start a local cluster (the same total cores for both modes), connect a coordinator,
   send the warm-up requests, then each request at its send time (at most `max_concurrency` in
   flight; a conversation's turns one after the other, `bench/replay.py`), recording every token's
   arrival time; with `--chaos-kill-every`, SIGKILL a random worker every so often and restart it
   on its port;
3. per mode and rate: vLLM's metrics (`bench/metrics.py`) plus the disaggregation figures, printed
   and saved by `bench/serve_report.py`; the cluster is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from dataclasses import replace
from pathlib import Path
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
)
from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec, load_cluster_config, local_topology
from disagg_cli.errors import UsageError

if TYPE_CHECKING:
    from disagg_cli.coordinator.client import Coordinator
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
        base = WorkerSpec("prefill", dtype=opts.dtype, kv_codec=opts.kv_codec)
        disagg = local_topology(opts.model, base)
    if opts.enable_prefix_caching is not None:
        disagg = replace(disagg, workers=tuple(replace(w, enable_prefix_caching=opts.enable_prefix_caching)
                                               for w in disagg.workers))
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
    config = CoordinatorConfig(policy=opts.router, worker_timeout_s=opts.worker_timeout_s, deadlines=opts.deadlines,
                               disagg_threshold=opts.disagg_threshold)
    results = []
    async with Coordinator(cluster.addresses(), tokenizer.eos_token_ids, config, cluster.is_gone) as coordinator:
        await coordinator.connect(cluster.check)
        if opts.num_warmups and workloads and workloads[0][1]:
            first = workloads[0][1][0]
            warm = [_output(f"warmup-{i}", list(first.prompt_ids), first.output_len, tokenizer, opts)
                    for i in range(opts.num_warmups)]
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
            # What the workers hold once the run is over: every block should be free again (no leak).
            blocks = {address: (int(s.get("free_blocks", -1)), int(s.get("num_blocks", -1)))
                      for address, s in (await coordinator.wait_idle(timeout_s=30)).items()}
            results.append(RunResult(mode, rate, workload, outputs, duration_s, start_s, topology, num_cores, kills,
                                     blocks_at_end=blocks))
    return results


def _output(request_id: str, prompt_ids: list[int], output_len: int, tokenizer: Tokenizer,
            opts: ServeBenchOptions) -> TimedOutput:
    params = SamplingParams(max_tokens=output_len, ignore_eos=opts.ignores_eos)
    return TimedOutput(request_id, "", prompt_ids, params, tokenizer)


async def _bench(coordinator: Coordinator, workload: list[BenchRequest], tokenizer: Tokenizer,
                 opts: ServeBenchOptions, mode: str) -> tuple[list[TimedOutput], float, float]:
    def make(index: int, prompt_ids: list[int]) -> TimedOutput:
        return _output(f"{mode}-{index}", prompt_ids, workload[index].output_len, tokenizer, opts)

    return await replay(workload, make, coordinator.run_request, f"{mode} requests", opts.max_concurrency)


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
