"""`disagg prefill-worker`, `decode-worker` and `colocated-worker`: flags into a WorkerConfig.

Plain functions: cli.py registers them as top-level commands (a role is not a command group).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disagg_cli.cli_options import ModelOpt, cache_dir, worker_options
from disagg_cli.config import WorkerConfig
from disagg_cli.worker_settings import WorkerSettings

HostOpt = Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the worker off the network.")]
AdvertiseOpt = Annotated[str | None, typer.Option(help="Host peers should use to reach this worker.")]
KeysOpt = Annotated[Path | None, typer.Option(help="CurveZMQ key folder from `disagg keys generate`.")]
GraceOpt = Annotated[float, typer.Option(help="Seconds in-flight requests may finish after SIGTERM.")]
ClientTimeoutOpt = Annotated[float, typer.Option(help="Abort a coordinator's requests after its heartbeats stop "
                                                      "for this many seconds.")]
LinkOpt = Annotated[float | None, typer.Option(help="Link speed to decode workers, for --kv-codec auto.")]


def _serve(role: str, settings: WorkerSettings, *, host: str, port: int, model: str, advertise_host: str | None,
           keys: Path | None, grace_s: float, client_timeout: float, link_gbps: float | None = None) -> None:
    extra = {} if settings.kv_codec is None else {"kv_codec": settings.kv_codec}
    config = WorkerConfig(
        role=role, model=model, host=host, port=port, runtime=settings.runtime(), engine=settings.engine(),
        link_gbps=link_gbps, advertise_host=advertise_host, keys_dir=keys, grace_s=grace_s,
        client_timeout_s=client_timeout, **extra)
    run_worker_config(config)


def run_worker_config(config: WorkerConfig) -> None:
    """Serve the worker `config` describes until SIGINT/SIGTERM, then exit with its code."""
    from disagg_cli.workers.roles import serve_worker

    raise typer.Exit(serve_worker(config, cache_dir()))


def run_worker(config_json: Annotated[str, typer.Argument(help="A WorkerConfig as JSON.")]) -> None:
    """Serve a worker from its whole configuration (how local clusters start their workers)."""
    run_worker_config(WorkerConfig.from_json(config_json))


@worker_options("prefill")
def prefill_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7100,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    link_gbps: LinkOpt = None,
    advertise_host: AdvertiseOpt = None,
    keys: KeysOpt = None,
    grace_s: GraceOpt = 10.0,
    client_timeout: ClientTimeoutOpt = 30.0,
    *, settings: WorkerSettings,
) -> None:
    """Serve prefill: prompts in, KV streamed layer by layer to decode workers."""
    _serve("prefill", settings, host=host, port=port, model=model, advertise_host=advertise_host, keys=keys,
           grace_s=grace_s, client_timeout=client_timeout, link_gbps=link_gbps)


@worker_options("decode")
def decode_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7200,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    advertise_host: AdvertiseOpt = None,
    keys: KeysOpt = None,
    grace_s: GraceOpt = 10.0,
    client_timeout: ClientTimeoutOpt = 30.0,
    *, settings: WorkerSettings,
) -> None:
    """Serve decode: KV caches in, tokens streamed to coordinators."""
    _serve("decode", settings, host=host, port=port, model=model, advertise_host=advertise_host, keys=keys,
           grace_s=grace_s, client_timeout=client_timeout)


@worker_options("colocated")
def colocated_worker(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 7300,
    host: HostOpt = "127.0.0.1",
    model: ModelOpt = "smollm2-135m-instruct",
    advertise_host: AdvertiseOpt = None,
    keys: KeysOpt = None,
    grace_s: GraceOpt = 10.0,
    client_timeout: ClientTimeoutOpt = 30.0,
    *, settings: WorkerSettings,
) -> None:
    """Serve both phases in one process: the baseline disaggregation is compared against."""
    _serve("colocated", settings, host=host, port=port, model=model, advertise_host=advertise_host, keys=keys,
           grace_s=grace_s, client_timeout=client_timeout)
