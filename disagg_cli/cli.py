"""The `disagg` command line: parse flags, build frozen configs, call in. No logic lives here.

Every expected failure (`DisaggError`, a bad flag) ends as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from disagg_cli import ui
from disagg_cli.config import DTYPES, EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.errors import DisaggError, Interrupted, UsageError

app = typer.Typer(
    name="disagg",
    help="Serve a real LLM with prefill-decode disaggregation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
model_app = typer.Typer(help="Named models: list, inspect, fetch.", no_args_is_help=True)
app.add_typer(model_app, name="model")
bench_app = typer.Typer(help="Benchmarks: engine speed, KV codecs.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="A model name (see `disagg model list`), "
                                       "a .gguf file or a Hugging Face checkpoint folder.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help=f"Weights and KV dtype: {', '.join(DTYPES)}.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="Torch intra-op threads (default: torch's choice).")]
BlockSizeOpt = Annotated[int, typer.Option(help="Tokens per KV block.")]
KVTokensOpt = Annotated[int | None, typer.Option(help="KV pool size in tokens (default: sized by memory).")]
KVMemoryOpt = Annotated[float, typer.Option(help="KV pool size in MiB when --kv-cache-tokens is not given.")]
MaxSeqsOpt = Annotated[int, typer.Option(help="Most sequences decoding at once.")]
MaxBatchedOpt = Annotated[int, typer.Option(help="Token budget of one engine step.")]
ChunkedOpt = Annotated[bool, typer.Option(help="Split long prompts into chunks that share steps with decodes.")]


def _cache_dir() -> Path:
    from disagg_cli.model.registry import default_cache_dir

    return default_cache_dir()


@app.command()
def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts; '-' reads stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="One prompt per line; .jsonl: JSON.")] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate per prompt.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 keeps all.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling (per request).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable); not printed.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past end-of-sequence.")] = False,
    chat: Annotated[bool, typer.Option(help="Wrap each prompt in the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message for --chat.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per prompt on stdout.")] = False,
    block_size: BlockSizeOpt = 16,
    kv_cache_tokens: KVTokensOpt = None,
    kv_cache_memory_mb: KVMemoryOpt = 512.0,
    max_num_seqs: MaxSeqsOpt = 32,
    max_num_batched_tokens: MaxBatchedOpt = 2048,
    chunked_prefill: ChunkedOpt = False,
    prefill: Annotated[list[str] | None, typer.Option(help="Address (host:port) of a running prefill worker; "
                                                      "repeatable. Needs --decode.")] = None,
    decode: Annotated[list[str] | None, typer.Option(help="Address of a running decode worker; repeatable.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Start this TOML topology (see configs/).")] = None,
    colocated: Annotated[bool, typer.Option(help="One worker doing both phases (the baseline).")] = False,
    colocated_addr: Annotated[str | None, typer.Option(help="Address of a running colocated worker.")] = None,
    in_process: Annotated[bool, typer.Option(help="Run in this process's own engine, no workers.")] = False,
    router: Annotated[str, typer.Option(help="round-robin or least-loaded.")] = "round-robin",
    kv_codec: Annotated[str | None, typer.Option(help="KV codec of the prefill workers started here: none, lz4, "
                                                 "shuffle-lz4, int8, int4 or auto.")] = None,
    worker_timeout: Annotated[float, typer.Option(help="Seconds of silence after which a worker is dead.")] = 10.0,
    keys: Annotated[Path | None, typer.Option(help="CurveZMQ keys to reach workers started with --keys.")] = None,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for every worker's hello.")] = 120.0,
) -> None:
    """Generate text for prompts, streaming it as it is produced.

    With no addresses, starts a local 1 prefill + 1 decode cluster and stops it afterwards."""
    from disagg_cli.generate import GenerateOptions, ServeOptions, read_prompts, run_generate

    opts = GenerateOptions(
        model=model,
        cache_dir=_cache_dir(),
        runtime=RuntimeConfig(device=device, dtype=dtype, threads=threads),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos),
        engine=EngineConfig(block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                            kv_cache_memory_mb=kv_cache_memory_mb, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, chunked_prefill=chunked_prefill),
        chat=chat,
        system=system,
        json_output=json_output,
        serve=ServeOptions(in_process=in_process, prefill=tuple(prefill or ()), decode=tuple(decode or ()),
                           colocated=colocated, colocated_addr=colocated_addr, config=config, router=router,
                           kv_codec=kv_codec, worker_timeout_s=worker_timeout, keys_dir=keys,
                           connect_timeout_s=connect_timeout),
    )
    if system is not None and not chat:
        raise UsageError("--system only applies with --chat")
    try:
        run_generate(read_prompts(prompts or [], file), opts)
    except KeyboardInterrupt:
        # Raised out of asyncio.run once every request task has sent its aborts; Click would
        # otherwise swallow it and exit 0.
        raise Interrupted("interrupted; in-flight requests were aborted on their workers") from None


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers like 1,8,32, got {text!r}") from None


@bench_app.command("engine")
def bench_engine(
    model: ModelOpt = "smollm2-135m-instruct",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    prompt_lens: Annotated[str, typer.Option(help="Prefill points: prompt lengths in tokens.")] = "128,512,2048",
    batch_sizes: Annotated[str, typer.Option(help="Decode points: sequences decoding at once.")] = "1,8,32",
    decode_context: Annotated[int, typer.Option(help="Prompt tokens of each decoding sequence.")] = 128,
    decode_tokens: Annotated[int, typer.Option(help="Timed decode steps per decode point.")] = 32,
    reps: Annotated[int, typer.Option(help="Runs per point; the median is reported.")] = 2,
    baseline: Annotated[bool, typer.Option(help="Also measure plain transformers on the same file.")] = True,
    block_size: BlockSizeOpt = 16,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Prefill and decode tokens/s of the engine (llama-bench style), beside plain transformers."""
    from disagg_cli.bench.engine import EngineBenchOptions, print_table, run_engine_bench

    opts = EngineBenchOptions(
        model=model, cache_dir=_cache_dir(), runtime=RuntimeConfig(dtype=dtype, threads=threads),
        block_size=block_size, prompt_lens=_int_list("--prompt-lens", prompt_lens),
        batch_sizes=_int_list("--batch-sizes", batch_sizes), decode_context=decode_context,
        decode_tokens=decode_tokens, reps=reps, baseline=baseline, json_output=json_output)
    result = run_engine_bench(opts)
    if json_output:
        print(json.dumps(result))
    else:
        print_table(result)


HostOpt = Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the worker off the network.")]
AdvertiseOpt = Annotated[str | None, typer.Option(help="Host peers should use to reach this worker.")]
KeysOpt = Annotated[Path | None, typer.Option(help="CurveZMQ key folder from `disagg keys generate`.")]
GraceOpt = Annotated[float, typer.Option(help="Seconds in-flight requests may finish after SIGTERM.")]
ClientTimeoutOpt = Annotated[float, typer.Option(help="Abort a coordinator's requests after its heartbeats stop "
                                                      "for this many seconds.")]


def _serve(role: str, host: str, port: int, model: str, device: str, dtype: str, threads: int | None,
           block_size: int, kv_cache_tokens: int | None, kv_cache_memory_mb: float, max_num_seqs: int,
           max_num_batched_tokens: int, chunked_prefill: bool, kv_codec: str, link_gbps: float | None,
           advertise_host: str | None, keys: Path | None, grace_s: float, client_timeout: float) -> None:
    from disagg_cli.workers.worker import WorkerConfig, serve_worker

    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    if link_gbps is not None and link_gbps <= 0:
        raise UsageError(f"--link-gbps must be positive, got {link_gbps}")
    if grace_s < 0:
        raise UsageError(f"--grace-s must be >= 0, got {grace_s}")
    if client_timeout <= 0:
        raise UsageError(f"--client-timeout must be positive, got {client_timeout}")
    config = WorkerConfig(
        role=role, model=model, host=host, port=port,
        runtime=RuntimeConfig(device=device, dtype=dtype, threads=threads),
        engine=EngineConfig(block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                            kv_cache_memory_mb=kv_cache_memory_mb, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, chunked_prefill=chunked_prefill),
        kv_codec=kv_codec, link_gbps=link_gbps, advertise_host=advertise_host, keys_dir=keys, grace_s=grace_s,
        client_timeout_s=client_timeout)
    raise typer.Exit(serve_worker(config, _cache_dir()))


@app.command("prefill-worker")
def prefill_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7100,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    kv_codec: Annotated[str, typer.Option(help="none, lz4, shuffle-lz4, int8, int4 or auto.")] = "auto",
    link_gbps: Annotated[float | None, typer.Option(help="Link speed to decode workers, for --kv-codec auto.")] = None,
    block_size: BlockSizeOpt = 16,
    kv_cache_tokens: KVTokensOpt = None,
    kv_cache_memory_mb: KVMemoryOpt = 256.0,
    max_num_seqs: MaxSeqsOpt = 32,
    max_num_batched_tokens: MaxBatchedOpt = 2048,
    advertise_host: AdvertiseOpt = None,
    keys: KeysOpt = None,
    grace_s: GraceOpt = 10.0,
    client_timeout: ClientTimeoutOpt = 30.0,
) -> None:
    """Serve prefill: prompts in, KV streamed layer by layer to decode workers."""
    _serve("prefill", host, port, model, device, dtype, threads, block_size, kv_cache_tokens, kv_cache_memory_mb,
           max_num_seqs, max_num_batched_tokens, False, kv_codec, link_gbps, advertise_host, keys, grace_s,
           client_timeout)


@app.command("decode-worker")
def decode_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7200,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    block_size: BlockSizeOpt = 16,
    kv_cache_tokens: KVTokensOpt = None,
    kv_cache_memory_mb: KVMemoryOpt = 512.0,
    max_num_seqs: MaxSeqsOpt = 32,
    max_num_batched_tokens: MaxBatchedOpt = 2048,
    advertise_host: AdvertiseOpt = None,
    keys: KeysOpt = None,
    grace_s: GraceOpt = 10.0,
    client_timeout: ClientTimeoutOpt = 30.0,
) -> None:
    """Serve decode: KV caches in, tokens streamed to coordinators."""
    _serve("decode", host, port, model, device, dtype, threads, block_size, kv_cache_tokens, kv_cache_memory_mb,
           max_num_seqs, max_num_batched_tokens, False, "none", None, advertise_host, keys, grace_s,
           client_timeout)


@app.command("colocated-worker")
def colocated_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7300,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    block_size: BlockSizeOpt = 16,
    kv_cache_tokens: KVTokensOpt = None,
    kv_cache_memory_mb: KVMemoryOpt = 512.0,
    max_num_seqs: MaxSeqsOpt = 32,
    max_num_batched_tokens: MaxBatchedOpt = 2048,
    chunked_prefill: ChunkedOpt = False,
    advertise_host: AdvertiseOpt = None,
    keys: KeysOpt = None,
    grace_s: GraceOpt = 10.0,
    client_timeout: ClientTimeoutOpt = 30.0,
) -> None:
    """Serve both phases in one process: the baseline disaggregation is compared against."""
    _serve("colocated", host, port, model, device, dtype, threads, block_size, kv_cache_tokens,
           kv_cache_memory_mb, max_num_seqs, max_num_batched_tokens, chunked_prefill, "none", None,
           advertise_host, keys, grace_s, client_timeout)


keys_app = typer.Typer(help="CurveZMQ keys for authenticated, encrypted worker traffic.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(directory: Annotated[Path, typer.Argument(help="Folder to write the key pairs into.")]) -> None:
    """Write a key pair per role and an allowed/ folder of their public keys."""
    from disagg_cli.keys import generate_keys

    for path in generate_keys(directory):
        print(path)


@model_app.command("list")
def model_list(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Named models and whether they are in the local cache."""
    from disagg_cli.model.registry import REGISTRY, cached_path, is_cached

    cache = _cache_dir()
    rows: list[dict[str, Any]] = [{"name": e.name, "cached": is_cached(e, cache), "size_bytes": e.size_bytes,
             "path": str(cached_path(e, cache)), "source": f"pypi:{e.pypi_package}=={e.pypi_version}",
             "description": e.description} for e in REGISTRY.values()]
    if json_output:
        print(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "cached", "size", "source", "description")
    for r in rows:
        table.add_row(r["name"], "yes" if r["cached"] else "no", f"{r['size_bytes'] / 1e6:.0f} MB",
                      r["source"], r["description"])
    Console().print(table)


@model_app.command("pull")
def model_pull(name: Annotated[str, typer.Argument(help="A model name from `disagg model list`.")]) -> None:
    """Fetch a named model into the local cache (checks its sha256)."""
    from disagg_cli.model.registry import REGISTRY, pull

    if name not in REGISTRY:
        raise UsageError(f"unknown model {name!r}; known names: {', '.join(REGISTRY)}")
    with ui.pull_progress(name) as progress:
        path = pull(REGISTRY[name], _cache_dir(), progress)
    print(path)


@model_app.command("info")
def model_info(
    model: Annotated[str, typer.Argument(help="A model name, a .gguf file or a checkpoint folder.")],
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Architecture, parameters, stored dtype, KV bytes per token and fingerprint of a model."""
    from disagg_cli.model.inspect import describe_model

    info = describe_model(model, _cache_dir())
    if json_output:
        print(json.dumps(info))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


@bench_app.command("codec")
def bench_codec(
    model: ModelOpt = "smollm2-135m-instruct",
    dtype: DtypeOpt = "bfloat16",
    threads: ThreadsOpt = None,
    prompt_tokens: Annotated[int, typer.Option(help="Length of the prompt whose KV is measured.")] = 1024,
    agreement_tokens: Annotated[int, typer.Option(help="Greedy tokens compared for lossy codecs.")] = 64,
    link_gbps: Annotated[float | None, typer.Option(help="Pace the link to this many Gbit/s "
                                                    "(default: loopback speed).")] = None,
    codecs: Annotated[str, typer.Option(help="Comma-separated codecs (default: all).")] = "",
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Measure every KV codec on real KV: size, speed, error, token agreement, time over a real link."""
    from disagg_cli.bench.codec import CodecBenchOptions, run
    from disagg_cli.kv.codec import CODEC_NAMES

    names = tuple(c.strip() for c in codecs.split(",") if c.strip()) or CODEC_NAMES
    run(CodecBenchOptions(model=model, cache_dir=_cache_dir(), runtime=RuntimeConfig(dtype=dtype, threads=threads),
                          prompt_tokens=prompt_tokens, agreement_tokens=agreement_tokens, link_gbps=link_gbps,
                          codecs=names, json_output=json_output))


@bench_app.command("serve")
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
    num_prompts: Annotated[int, typer.Option(help="Requests (short ones, for --workload interference).")] = 32,
    request_rate: Annotated[float, typer.Option(help="Requests/s (Poisson); inf sends all at once.")] = float("inf"),
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
    workload: Annotated[str, typer.Option(help="dataset (--dataset-name) or interference: short requests at "
                                          "--request-rate with a long prompt every --long-interval s "
                                          "(EOS ignored).")] = "dataset",
    short_input_len: Annotated[int, typer.Option(help="Interference: short prompts' tokens.")] = 32,
    short_output_len: Annotated[int, typer.Option(help="Interference: short requests' output tokens.")] = 64,
    long_input_len: Annotated[int, typer.Option(help="Interference: long prompts' tokens.")] = 1024,
    long_output_len: Annotated[int, typer.Option(help="Interference: long requests' output tokens.")] = 8,
    long_interval: Annotated[float, typer.Option(help="Interference: seconds between long prompts.")] = 5.0,
    sweep_rates: Annotated[str | None, typer.Option(help="Goodput sweep over these rates, e.g. 0.5,1,2 "
                                                    "(needs --goodput ttft:MS tpot:MS).")] = None,
    chaos_kill_every: Annotated[float | None, typer.Option(help="Soak: SIGKILL a random worker every S seconds "
                                                           "and restart it.")] = None,
    dtype: DtypeOpt = "float32",
    kv_codec: Annotated[str | None, typer.Option(help="KV codec of the prefill workers (default topology).")] = None,
    worker_timeout: Annotated[float, typer.Option(help="Seconds of silence after which a worker is dead.")] = 10.0,
    json_output: Annotated[bool, typer.Option("--json", help="The result JSON on stdout instead of the text.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw TTFT/TPOT distributions and the ITL timeline (PNG; "
                                              "needs matplotlib).")] = None,
) -> None:
    """Serving benchmark in vLLM's terms (TTFT, TPOT, ITL, E2EL, goodput), disaggregated vs colocated."""
    from disagg_cli.bench.metrics import parse_goodput
    from disagg_cli.bench.serve import InterferenceShape, ServeBenchOptions, run_serve_bench

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
        model=model, cache_dir=_cache_dir(), dataset_name=dataset_name, dataset_path=dataset_path,
        random_input_len=random_input_len, random_output_len=random_output_len,
        random_range_ratio=random_range_ratio, num_prompts=num_prompts, request_rate=request_rate,
        burstiness=burstiness, max_concurrency=max_concurrency, seed=seed, num_warmups=num_warmups,
        ignore_eos=ignore_eos, percentile_metrics=tuple(m.strip() for m in percentile_metrics.split(",") if m.strip()),
        metric_percentiles=floats("--metric-percentiles", metric_percentiles), goodput=slo,
        save_result=save_result, result_dir=result_dir, result_filename=result_filename, label=label,
        metadata=tuple(pairs), mode=mode, config=config, dtype=dtype, kv_codec=kv_codec,
        worker_timeout_s=worker_timeout, json_output=json_output, plot=plot, workload=workload,
        interference=InterferenceShape(short_input_len, short_output_len, long_input_len, long_output_len,
                                       long_interval),
        sweep_rates=floats("--sweep-rates", sweep_rates) if sweep_rates else (),
        chaos_kill_every_s=chaos_kill_every)
    run_serve_bench(opts)


def main() -> None:
    """Entry point: run the app and turn expected failures into one line and an exit code."""
    try:
        app(prog_name="disagg", standalone_mode=False)
    except DisaggError as e:
        ui.print_error(str(e))
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        ui.print_error("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:
        # Click's usage errors (bad option, bad value); typer may vendor its own click, so match
        # on behaviour rather than on a class from one particular click.
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `disagg` or `disagg model`: show help
            sys.stderr.write(e.format_message() + "\n")
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        ui.print_error(e.format_message().replace("\n", " ") + hint)
        sys.exit(e.exit_code)
