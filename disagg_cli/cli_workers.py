"""`disagg prefill-worker`, `decode-worker` and `colocated-worker`: flags into a WorkerConfig.

Plain functions: cli.py registers them as top-level commands (a role is not a command group).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from disagg_cli.cli_options import ModelOpt, cache_dir, keyword_option, with_options, worker_options
from disagg_cli.config import WorkerConfig
from disagg_cli.model.registry import DEFAULT_MODEL
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
        client_timeout_s=client_timeout, elastic=settings.elastic, **extra)
    run_worker_config(config)


def run_worker_config(config: WorkerConfig) -> None:
    """Serve the worker `config` describes until SIGINT/SIGTERM, then exit with its code."""
    from disagg_cli.workers.roles import serve_worker

    raise typer.Exit(serve_worker(config, cache_dir()))


def run_worker(config_json: Annotated[str, typer.Argument(help="A WorkerConfig as JSON.")]) -> None:
    """Serve a worker from its whole configuration (how local clusters start their workers)."""
    run_worker_config(WorkerConfig.from_json(config_json))


def _worker_command(role: str, port: int, doc: str) -> Callable[..., None]:
    """The `ROLE-worker` command: where it listens and how it treats peers, then its role's worker settings."""
    options = [
        keyword_option("port", Annotated[int, typer.Option(help="TCP port to listen on.")], port),
        keyword_option("host", HostOpt, "127.0.0.1"),
        keyword_option("model", ModelOpt, DEFAULT_MODEL),
        keyword_option("advertise_host", AdvertiseOpt, None),
        keyword_option("keys", KeysOpt, None),
        keyword_option("grace_s", GraceOpt, 10.0),
        keyword_option("client_timeout", ClientTimeoutOpt, 30.0),
    ]
    if role == "prefill":  # the sender picks the codec, for its link
        options.append(keyword_option("link_gbps", LinkOpt, None))

    def command(*, process: dict[str, Any], settings: WorkerSettings) -> None:
        _serve(role, settings, **process)

    command.__doc__ = doc
    return worker_options(role)(with_options(options, "process", dict)(command))


prefill_worker = _worker_command("prefill", 7100, "Serve prefill: prompts in, KV streamed layer by layer to decode "
                                                  "workers.")
decode_worker = _worker_command("decode", 7200, "Serve decode: KV caches in, tokens streamed to coordinators.")
colocated_worker = _worker_command("colocated", 7300, "Serve both phases in one process: the baseline "
                                                      "disaggregation is compared against.")
