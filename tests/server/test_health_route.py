"""`GET /health` as the route answers it, in-process: the exact 503 bodies, with no race.

The SIGTERM test in `test_openai_api.py` drains a real server; whether its probe request is read
before or after the signal is up to the kernel and the event loop, so the draining answer's shape
is pinned here, on the app itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from disagg_cli.coordinator.service import CoordinatorService, ServiceConfig
from disagg_cli.server.app import ServerConfig, create_app


def test_health_is_503_without_workers_and_503_draining(tmp_path: Path) -> None:
    service = CoordinatorService(ServiceConfig(model="smollm2-135m-instruct", cache_dir=tmp_path))
    app = create_app(service, ServerConfig(), "smollm2")

    async def ask() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            before = await client.get("/health")
            service.draining = True  # what the server's SIGTERM handler sets
            return before, await client.get("/health")

    before, draining = asyncio.run(ask())
    assert (before.status_code, before.json()) == (503, {"status": "not connected to any worker"})
    assert (draining.status_code, draining.json()) == (503, {"status": "draining"})
