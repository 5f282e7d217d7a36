"""One access-log line per HTTP request, written when its response has fully gone out.

A pure ASGI middleware (not Starlette's `BaseHTTPMiddleware`, which would see a streamed
response end at its headers): it notes the status when the response starts and writes the line
when the last body part is sent, or when the client hangs up first. Routes that ran model requests
leave their outputs in `request.state.disagg_outputs`, so the line carries tokens and timings.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

Scope = dict[str, Any]
Message = dict[str, Any]


class AccessLog:
    def __init__(self, app: Callable[..., Any], stream: TextIO | None = None) -> None:
        self.app = app
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 0, "logged": False}

        def write(note: str = "") -> None:
            if status["logged"]:
                return
            status["logged"] = True
            line = access_line(scope, int(status["code"]), (time.perf_counter() - start) * 1e3) + note
            out = self.stream or sys.stderr
            out.write(line + "\n")
            out.flush()

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                write()

        try:
            await self.app(scope, receive, logged_send)
        finally:
            write(" (client gone)" if status["code"] else " (no response)")


def access_line(scope: Scope, status: int, elapsed_ms: float) -> str:
    client = scope.get("client") or ("-", 0)
    path = scope.get("path", "")
    line = f'{client[0]}:{client[1]} "{scope.get("method", "")} {path}" {status} {elapsed_ms:.0f} ms'
    outs = scope.get("state", {}).get("disagg_outputs") or []
    if outs:
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        generated = sum(len(o.token_ids) for o in outs)
        reasons = ",".join(sorted({str(o.finish_reason) for o in outs}))
        line += f" {outs[0].request_id}{'+' + str(len(outs) - 1) if len(outs) > 1 else ''}: {prompt} prompt + " \
                f"{generated} output tokens, finish={reasons}"
        ttft = outs[0].timings.ttft_ms()
        if ttft is not None:
            line += f", TTFT {ttft:.0f} ms"
    return line
