"""`disagg bench engine|codec|serve`: flags into each benchmark's options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from disagg_cli.bench.engine_options import ENGINE_BENCH_DEFAULTS
from disagg_cli.bench.workload import DEFAULT_PHASE_S
from disagg_cli.cli_options import (
    DEFAULT_DEADLINES,
    BlockSizeOpt,
    DisaggThresholdOpt,
    DtypeOpt,
    FirstTokenTimeoutOpt,
    KernelOpt,
    ModelOpt,
    QuantizationOpt,
    RequestTimeoutOpt,
    ReserveTimeoutOpt,
    RouterOpt,
    ThreadsOpt,
    TokenTimeoutOpt,
    cache_dir,
    int_list,
    planner_options,
    worker_options,
)
from disagg_cli.cli_options import disagg_threshold as parse_threshold
from disagg_cli.config import Deadlines, RuntimeConfig
from disagg_cli.coordinator.planner import PlannerConfig
from disagg_cli.errors import UsageError
from disagg_cli.worker_settings import DEFAULTS, WorkerSettings

_BENCH = ENGINE_BENCH_DEFAULTS


def _commas(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


bench_app = typer.Typer(help="Benchmarks: engine speed, KV codecs, serving.", no_args_is_help=True)


@bench_app.command("engine")
def bench_engine(
    model: ModelOpt = "smollm2-135m-instruct",
    dtype: DtypeOpt = DEFAULTS["dtype"],
    quantization: QuantizationOpt = DEFAULTS["quantization"],
    threads: ThreadsOpt = DEFAULTS["threads"],
    kernel: KernelOpt = DEFAULTS["kernel"],
    prompt_lens: Annotated[str, typer.Option(help="Prefill points: prompt lengths in tokens.")] = _commas(
        _BENCH["prompt_lens"]),
    batch_sizes: Annotated[str, typer.Option(help="Decode points: sequences decoding at once.")] = _commas(
        _BENCH["batch_sizes"]),
    decode_context: Annotated[int, typer.Option(help="Prompt tokens of each decoding sequence.")] = _BENCH[
        "decode_context"],
    decode_tokens: Annotated[int, typer.Option(help="Timed decode steps per decode point.")] = _BENCH["decode_tokens"],
    reps: Annotated[int, typer.Option(help="Runs per point (after an untimed one at the largest points); the "
                                           "median is reported.")] = _BENCH["reps"],
    baseline: Annotated[bool, typer.Option(help="Also measure plain transformers on the same file.")] = True,
    against: Annotated[list[str] | None, typer.Option(help="Also measure llama-cpp (llama-cpp-python, when "
                                                      "importable) on the same GGUF and threads: prefill "
                                                      "and batch-1 decode.")] = None,
    perplexity_modes: Annotated[str | None, typer.Option(help="Perplexity of a fixed text for each of "
                                                         "float32,bfloat16,int8,int4 (default: the loaded "
                                                         "mode only).")] = None,
    block_size: BlockSizeOpt = DEFAULTS["block_size"],
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Prefill and decode tokens/s of the engine (llama-bench style), beside plain transformers."""
    from disagg_cli.bench.engine import EngineBenchOptions, print_table, run_engine_bench  # torch: here, not at load

    opts = EngineBenchOptions(
        model=model, cache_dir=cache_dir(),
        runtime=RuntimeConfig(dtype=dtype, threads=threads, quantization=quantization, kernel=kernel),
        block_size=block_size, prompt_lens=int_list("--prompt-lens", prompt_lens),
        batch_sizes=int_list("--batch-sizes", batch_sizes), decode_context=decode_context,
        decode_tokens=decode_tokens, reps=reps, baseline=baseline, against=tuple(against or ()),
        perplexity_modes=tuple(m.strip() for m in perplexity_modes.split(",") if m.strip())
        if perplexity_modes is not None else None, json_output=json_output)
    result = run_engine_bench(opts)
    if json_output:
        print(json.dumps(result))
    else:
        print_table(result)


@bench_app.command("codec")
def bench_codec(
    model: ModelOpt = "smollm2-135m-instruct",
    dtype: DtypeOpt = "bfloat16",  # the KV's 16-bit form, as it crosses the wire
    threads: ThreadsOpt = DEFAULTS["threads"],
    kernel: KernelOpt = DEFAULTS["kernel"],
    prompt_tokens: Annotated[int, typer.Option(help="Length of the prompt whose KV is measured.")] = 1024,
    agreement_tokens: Annotated[int, typer.Option(help="Greedy tokens compared for lossy codecs.")] = 64,
    link_gbps: Annotated[float | None, typer.Option(help="Pace the link to this many Gbit/s "
                                                    "(default: loopback speed).")] = None,
    codecs: Annotated[str, typer.Option(help="Comma-separated codecs (default: all).")] = "",
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Measure every KV codec on real KV: size, speed, error, token agreement, time over a real link."""
    from disagg_cli.bench.codec import CodecBenchOptions, run
    from disagg_cli.protocol import CODEC_NAMES

    names = tuple(c.strip() for c in codecs.split(",") if c.strip()) or CODEC_NAMES
    run(CodecBenchOptions(model=model, cache_dir=cache_dir(),
                          runtime=RuntimeConfig(dtype=dtype, threads=threads, kernel=kernel),
                          prompt_tokens=prompt_tokens, agreement_tokens=agreement_tokens, link_gbps=link_gbps,
                          codecs=names, json_output=json_output))


@bench_app.command("serve")
@worker_options()
@planner_options()
def bench_serve(
    model: ModelOpt = "smollm2-135m-instruct",
    mode: Annotated[str, typer.Option(help="disagg, colocated, or both (same workload, seed and cores).")] = "disagg",
    config: Annotated[Path | None, typer.Option("--config", help="Disaggregated TOML topology to start "
                                                "(default: local 1 prefill + 1 decode).")] = None,
    dataset_name: Annotated[str, typer.Option(help="random or sharegpt.")] = "random",
    dataset_path: Annotated[Path | None, typer.Option(help="ShareGPT-format JSON file.")] = None,
    random_input_len: Annotated[int, typer.Option(help="Prompt tokens (vLLM's default is 1024; 256 here "
                                                  "so a run fits a small CPU).")] = 256,
    random_output_len: Annotated[int, typer.Option(help="Output tokens (vLLM: 128).")] = 64,
    random_range_ratio: Annotated[float, typer.Option(help="Lengths uniform in len·[1−r, 1+r].")] = 0.0,
    num_prompts: Annotated[int, typer.Option(help="Requests (short ones, for --workload interference; "
                                             "conversations, for --workload multi-turn).")] = 32,
    request_rate: Annotated[float | None, typer.Option(help="Requests/s (Poisson); inf sends all at once "
                                                       "(default: inf; 1 for --workload interference).")] = None,
    burstiness: Annotated[float, typer.Option(help="Gamma shape of the intervals; 1 = Poisson, <1 burstier.")] = 1.0,
    max_concurrency: Annotated[int | None, typer.Option(help="Most requests in flight.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the workload (prompts, lengths, arrivals).")] = 0,
    num_warmups: Annotated[int, typer.Option(help="Warm-up requests per mode, not measured.")] = 0,
    ignore_eos: Annotated[bool, typer.Option(help="Generate exactly the output lengths.")] = False,
    percentile_metrics: Annotated[str, typer.Option(help="Of ttft,tpot,itl,e2el.")] = "ttft,tpot,itl",
    metric_percentiles: Annotated[str, typer.Option(help="Comma-separated percentiles.")] = "99",
    goodput: Annotated[list[str] | None, typer.Option(help="SLO NAME:MS (ttft, tpot, e2el); repeatable, or "
                                                      "several in one quoted string.")] = None,
    save_result: Annotated[bool, typer.Option(help="Write the result JSON (one file per mode and rate).")] = False,
    result_dir: Annotated[Path | None, typer.Option(help="Folder for --save-result.")] = None,
    result_filename: Annotated[str | None, typer.Option(help="File name for --save-result.")] = None,
    label: Annotated[str | None, typer.Option(help="Label stored in the result.")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE stored in the result; repeatable.")] = None,
    workload: Annotated[str, typer.Option(help="dataset (--dataset-name); interference: short requests at "
                                          "--request-rate with a long prompt every --long-interval s; "
                                          "prefix: --prefix-len shared tokens + --random-input-len own ones; "
                                          "multi-turn: --num-turns turns per conversation, each adding the "
                                          "last answer and --random-input-len new tokens to the history; "
                                          "shifting: prefill-heavy, decode-heavy and mixed phases of "
                                          "--phase-duration s back to back, for --planner slo "
                                          "(EOS ignored but for dataset).")] = "dataset",
    short_input_len: Annotated[int, typer.Option(help="Interference: short prompts' tokens.")] = 32,
    short_output_len: Annotated[int, typer.Option(help="Interference: short requests' output tokens.")] = 64,
    long_input_len: Annotated[int, typer.Option(help="Interference: long prompts' tokens.")] = 1024,
    long_output_len: Annotated[int, typer.Option(help="Interference: long requests' output tokens.")] = 8,
    long_interval: Annotated[float, typer.Option(help="Interference: seconds between long prompts.")] = 5.0,
    phase_duration: Annotated[float, typer.Option(help="Shifting: seconds of sending per phase (--request-rate "
                                                  "scales every phase's rate; default 1).")] = DEFAULT_PHASE_S,
    num_turns: Annotated[int, typer.Option(help="Multi-turn: turns per conversation, each sent when the one "
                                           "before is answered.")] = 4,
    prefix_len: Annotated[int, typer.Option(help="Multi-turn: tokens of the system prompt all conversations "
                                            "share; prefix: tokens of each shared prefix.")] = 256,
    num_prefixes: Annotated[int, typer.Option(help="Prefix: distinct shared prefixes, given out "
                                              "round-robin.")] = 1,
    sweep_rates: Annotated[str | None, typer.Option(help="Goodput sweep over these rates, e.g. 0.5,1,2 "
                                                    "(needs --goodput ttft:MS tpot:MS).")] = None,
    chaos_kill_every: Annotated[float | None, typer.Option(help="Soak: SIGKILL a random worker every S seconds "
                                                           "and restart it.")] = None,
    disagg_threshold: DisaggThresholdOpt = "0",
    router: RouterOpt = "round-robin",
    worker_timeout: Annotated[float, typer.Option(help="Seconds of silence after which a worker is dead.")] = 10.0,
    reserve_timeout: ReserveTimeoutOpt = DEFAULT_DEADLINES.reserve_s,
    first_token_timeout: FirstTokenTimeoutOpt = DEFAULT_DEADLINES.first_token_s,
    token_timeout: TokenTimeoutOpt = DEFAULT_DEADLINES.token_s,
    request_timeout: RequestTimeoutOpt = DEFAULT_DEADLINES.request_s,
    json_output: Annotated[bool, typer.Option("--json", help="The result JSON on stdout instead of the text.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw TTFT/TPOT distributions and the ITL timeline (PNG; "
                                              "needs matplotlib).")] = None,
    base_url: Annotated[str | None, typer.Option(help="Benchmark this running OpenAI-compatible server (e.g. "
                                                 "http://127.0.0.1:8000) instead of starting clusters; --model "
                                                 "is then the model name sent.")] = None,
    backend: Annotated[str, typer.Option(help="With --base-url: openai (/v1/completions) or openai-chat "
                                         "(/v1/chat/completions).")] = "openai",
    endpoint: Annotated[str | None, typer.Option(help="With --base-url: the route (default: the backend's).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Model whose tokenizer builds the workload "
                                                  "(default: --model).")] = None,
    api_key: Annotated[str | None, typer.Option(help="With --base-url: Bearer key.", envvar="OPENAI_API_KEY")] = None,
    *, settings: WorkerSettings, planner: PlannerConfig,
) -> None:
    """Serving benchmark in vLLM's terms (TTFT, TPOT, ITL, E2EL, goodput), disaggregated vs colocated."""
    from disagg_cli.bench.http_client import HttpTarget, run_http_bench
    from disagg_cli.bench.metrics import parse_goodput
    from disagg_cli.bench.runs import InterferenceShape, ServeBenchOptions
    from disagg_cli.bench.serve import run_serve_bench

    def floats(flag: str, text: str) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise UsageError(f"{flag} takes comma-separated numbers like 0.5,1,2, got {text!r}") from None

    pairs = []
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata takes KEY=VALUE, got {item!r}")
        pairs.append((key, value))
    try:
        slo = parse_goodput(goodput or [])
    except ValueError as e:
        raise UsageError(str(e)) from None
    opts = ServeBenchOptions(
        model=model, cache_dir=cache_dir(), dataset_name=dataset_name, dataset_path=dataset_path,
        random_input_len=random_input_len, random_output_len=random_output_len,
        random_range_ratio=random_range_ratio, num_prompts=num_prompts,
        request_rate=request_rate if request_rate is not None
        else 1.0 if workload in ("interference", "shifting") else float("inf"),
        burstiness=burstiness, max_concurrency=max_concurrency, seed=seed, num_warmups=num_warmups,
        ignore_eos=ignore_eos, percentile_metrics=tuple(m.strip() for m in percentile_metrics.split(",") if m.strip()),
        metric_percentiles=floats("--metric-percentiles", metric_percentiles), goodput=slo,
        save_result=save_result, result_dir=result_dir, result_filename=result_filename, label=label,
        metadata=tuple(pairs), mode=mode, config=config, worker=settings,
        worker_timeout_s=worker_timeout,
        deadlines=Deadlines(reserve_timeout, first_token_timeout, token_timeout, request_timeout),
        json_output=json_output, plot=plot, workload=workload,
        interference=InterferenceShape(short_input_len, short_output_len, long_input_len, long_output_len,
                                       long_interval),
        sweep_rates=floats("--sweep-rates", sweep_rates) if sweep_rates else (),
        chaos_kill_every_s=chaos_kill_every, tokenizer=tokenizer, num_turns=num_turns, prefix_len=prefix_len,
        num_prefixes=num_prefixes,
        disagg_threshold=parse_threshold(disagg_threshold), router=router, planner=planner, phase_s=phase_duration)
    if base_url is not None:
        if planner.is_on:
            raise UsageError("--planner slo runs in the service bench serve starts; a server at --base-url runs its "
                             "own (disagg serve --planner slo)")
        run_http_bench(HttpTarget(base_url, backend, endpoint, api_key), opts)
    else:
        run_serve_bench(opts)
