"""`disagg serve`: flags into a ServiceConfig and a ServerConfig; cli.py registers it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disagg_cli.cli_options import (
    DEFAULT_DEADLINES,
    DisaggThresholdOpt,
    FirstTokenTimeoutOpt,
    ModelOpt,
    RequestTimeoutOpt,
    ReserveTimeoutOpt,
    RouterOpt,
    TokenTimeoutOpt,
    cache_dir,
    worker_options,
)
from disagg_cli.cli_options import disagg_threshold as parse_threshold
from disagg_cli.config import Deadlines
from disagg_cli.server.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUED_REQUESTS
from disagg_cli.worker_settings import WorkerSettings


@worker_options()
def serve(
    model: ModelOpt = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Interface to listen on; beyond loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    served_model_name: Annotated[list[str] | None, typer.Option(
        help="Name(s) clients use in `model` (repeatable; default: --model).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY' on /v1 routes.",
                                                envvar="DISAGG_API_KEY")] = None,
    max_queued_requests: Annotated[int, typer.Option(
        help="Answer 503 (Retry-After) while this many requests wait for decode memory.",
    )] = DEFAULT_MAX_QUEUED_REQUESTS,
    max_body_bytes: Annotated[int, typer.Option(
        help="Answer 413 to a request body larger than this, without reading it.")] = DEFAULT_MAX_BODY_BYTES,
    disagg_threshold: DisaggThresholdOpt = "0",
    prefill: Annotated[list[str] | None, typer.Option(help="Address (host:port) of a running prefill worker; "
                                                      "repeatable. Needs --decode.")] = None,
    decode: Annotated[list[str] | None, typer.Option(help="Address of a running decode worker; repeatable.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Start this TOML topology (see configs/).")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS|auto", help="Run the workers as Ray actors in the Ray cluster at ADDRESS (the head "
        "node's host:port; auto: RAY_ADDRESS or the one on this machine). Needs disagg-cli[ray].")] = None,
    prefill_replicas: Annotated[int | None, typer.Option(
        help="Prefill workers to start (default 1, or the topology's).")] = None,
    decode_replicas: Annotated[int | None, typer.Option(
        help="Decode workers to start (default 1, or the topology's).")] = None,
    colocated: Annotated[bool, typer.Option(help="One worker doing both phases (the baseline).")] = False,
    colocated_addr: Annotated[str | None, typer.Option(help="Address of a running colocated worker.")] = None,
    router: RouterOpt = "round-robin",
    worker_timeout: Annotated[float, typer.Option(help="Seconds of silence after which a worker is dead.")] = 10.0,
    keys: Annotated[Path | None, typer.Option(help="CurveZMQ keys to reach workers started with --keys; with "
                                              "--ray, the workers' own (the same folder on every node).")] = None,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for every worker's hello.")] = 120.0,
    reserve_timeout: ReserveTimeoutOpt = DEFAULT_DEADLINES.reserve_s,
    first_token_timeout: FirstTokenTimeoutOpt = DEFAULT_DEADLINES.first_token_s,
    token_timeout: TokenTimeoutOpt = DEFAULT_DEADLINES.token_s,
    request_timeout: RequestTimeoutOpt = DEFAULT_DEADLINES.request_s,
    *, settings: WorkerSettings,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (completions, chat, /metrics).

    With no addresses, starts a local 1 prefill + 1 decode cluster (with --ray: Ray actors) and stops
    it on exit."""
    from disagg_cli.coordinator.options import ServeOptions
    from disagg_cli.coordinator.service import ServiceConfig
    from disagg_cli.server.app import ServerConfig
    from disagg_cli.server.run import run_server

    server = ServerConfig(host=host, port=port, served_model_names=tuple(served_model_name or ()), api_key=api_key,
                          max_body_bytes=max_body_bytes)
    service = ServiceConfig(
        model=model, cache_dir=cache_dir(),
        runtime=settings.runtime(), engine=settings.engine(),
        serve=ServeOptions(prefill=tuple(prefill or ()), decode=tuple(decode or ()), colocated=colocated,
                           colocated_addr=colocated_addr, config=config, router=router, kv_codec=settings.kv_codec,
                           worker_timeout_s=worker_timeout, keys_dir=keys, connect_timeout_s=connect_timeout,
                           disagg_threshold=parse_threshold(disagg_threshold), ray_address=ray,
                           prefill_replicas=prefill_replicas, decode_replicas=decode_replicas,
                           deadlines=Deadlines(reserve_timeout, first_token_timeout, token_timeout, request_timeout)),
        max_queued_requests=max_queued_requests)
    run_server(service, server)
