"""`disagg prefill-worker`, `decode-worker` and `colocated-worker`: flags into a WorkerConfig.

Plain functions: cli.py registers them as top-level commands (a role is not a command group).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disagg_cli.cli_options import (
    BlockSizeOpt,
    ChunkedOpt,
    DeviceOpt,
    DtypeOpt,
    KVMemoryOpt,
    KVTokensOpt,
    MaxBatchedOpt,
    MaxSeqsOpt,
    ModelOpt,
    PrefixCachingOpt,
    QuantizationOpt,
    ThreadsOpt,
    cache_dir,
)
from disagg_cli.config import EngineConfig, RuntimeConfig, WorkerConfig

HostOpt = Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the worker off the network.")]
AdvertiseOpt = Annotated[str | None, typer.Option(help="Host peers should use to reach this worker.")]
KeysOpt = Annotated[Path | None, typer.Option(help="CurveZMQ key folder from `disagg keys generate`.")]
GraceOpt = Annotated[float, typer.Option(help="Seconds in-flight requests may finish after SIGTERM.")]
ClientTimeoutOpt = Annotated[float, typer.Option(help="Abort a coordinator's requests after its heartbeats stop "
                                                      "for this many seconds.")]


def _serve(role: str, host: str, port: int, model: str, device: str, dtype: str, quantization: str,
           threads: int | None, block_size: int, kv_cache_tokens: int | None, kv_cache_memory_mb: float,
           max_num_seqs: int,
           max_num_batched_tokens: int, chunked_prefill: bool, kv_codec: str, link_gbps: float | None,
           advertise_host: str | None, keys: Path | None, grace_s: float, client_timeout: float,
           enable_prefix_caching: bool) -> None:
    config = WorkerConfig(
        role=role, model=model, host=host, port=port,
        runtime=RuntimeConfig(device=device, dtype=dtype, threads=threads, quantization=quantization),
        engine=EngineConfig(block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                            kv_cache_memory_mb=kv_cache_memory_mb, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, chunked_prefill=chunked_prefill,
                            enable_prefix_caching=enable_prefix_caching),
        kv_codec=kv_codec, link_gbps=link_gbps, advertise_host=advertise_host, keys_dir=keys, grace_s=grace_s,
        client_timeout_s=client_timeout)
    run_worker_config(config)


def run_worker_config(config: WorkerConfig) -> None:
    """Serve the worker `config` describes until SIGINT/SIGTERM, then exit with its code."""
    from disagg_cli.workers.roles import serve_worker

    raise typer.Exit(serve_worker(config, cache_dir()))


def run_worker(config_json: Annotated[str, typer.Argument(help="A WorkerConfig as JSON.")]) -> None:
    """Serve a worker from its whole configuration (how local clusters start their workers)."""
    run_worker_config(WorkerConfig.from_json(config_json))


def prefill_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7100,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    quantization: QuantizationOpt = "none",
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
    enable_prefix_caching: PrefixCachingOpt = True,
    client_timeout: ClientTimeoutOpt = 30.0,
) -> None:
    """Serve prefill: prompts in, KV streamed layer by layer to decode workers."""
    _serve("prefill", host, port, model, device, dtype, quantization, threads, block_size, kv_cache_tokens,
           kv_cache_memory_mb, max_num_seqs, max_num_batched_tokens, False, kv_codec, link_gbps, advertise_host,
           keys, grace_s, client_timeout, enable_prefix_caching)


def decode_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7200,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    quantization: QuantizationOpt = "none",
    threads: ThreadsOpt = None,
    block_size: BlockSizeOpt = 16,
    kv_cache_tokens: KVTokensOpt = None,
    kv_cache_memory_mb: KVMemoryOpt = 512.0,
    max_num_seqs: MaxSeqsOpt = 32,
    max_num_batched_tokens: MaxBatchedOpt = 2048,
    advertise_host: AdvertiseOpt = None,
    keys: KeysOpt = None,
    grace_s: GraceOpt = 10.0,
    enable_prefix_caching: PrefixCachingOpt = True,
    client_timeout: ClientTimeoutOpt = 30.0,
) -> None:
    """Serve decode: KV caches in, tokens streamed to coordinators."""
    _serve("decode", host, port, model, device, dtype, quantization, threads, block_size, kv_cache_tokens,
           kv_cache_memory_mb, max_num_seqs, max_num_batched_tokens, False, "none", None, advertise_host, keys,
           grace_s, client_timeout, enable_prefix_caching)


def colocated_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7300,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    quantization: QuantizationOpt = "none",
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
    enable_prefix_caching: PrefixCachingOpt = True,
    client_timeout: ClientTimeoutOpt = 30.0,
) -> None:
    """Serve both phases in one process: the baseline disaggregation is compared against."""
    _serve("colocated", host, port, model, device, dtype, quantization, threads, block_size, kv_cache_tokens,
           kv_cache_memory_mb, max_num_seqs, max_num_batched_tokens, chunked_prefill, "none", None,
           advertise_host, keys, grace_s, client_timeout, enable_prefix_caching)
