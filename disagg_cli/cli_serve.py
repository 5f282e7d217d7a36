"""`disagg serve`: flags into a ServiceConfig and a ServerConfig; cli.py registers it."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from disagg_cli.cli_options import ModelOpt, cache_dir, placement_options, worker_options
from disagg_cli.coordinator.options import ServeOptions
from disagg_cli.server.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUED_REQUESTS
from disagg_cli.worker_settings import WorkerSettings


@worker_options()
@placement_options(admission=True)
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
    *, settings: WorkerSettings, serve: ServeOptions,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (completions, chat, /metrics).

    With no addresses, starts a local 1 prefill + 1 decode cluster (with --ray: Ray actors) and stops
    it on exit."""
    from disagg_cli.coordinator.service import ServiceConfig
    from disagg_cli.server.app import ServerConfig
    from disagg_cli.server.run import run_server

    server = ServerConfig(host=host, port=port, served_model_names=tuple(served_model_name or ()), api_key=api_key,
                          max_body_bytes=max_body_bytes)
    service = ServiceConfig(
        model=model, cache_dir=cache_dir(),
        runtime=settings.runtime(), engine=settings.engine(),
        serve=replace(serve, kv_codec=settings.kv_codec, elastic=settings.elastic),
        max_queued_requests=max_queued_requests)
    run_server(service, server)
