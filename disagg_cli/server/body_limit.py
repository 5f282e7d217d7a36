"""The request body size limit (`disagg serve --max-body-bytes`): 413 in OpenAI's error shape.

A pure ASGI middleware, so a body too large is refused without being read: a `Content-Length`
past the limit is answered at once, before the route runs; a chunked body is counted as it
arrives, and the route's read of it fails (413) at the first part that goes past the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

from disagg_cli.server.errors import APIError

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Callable[..., Any], max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _message(self, size: str) -> str:
        return (f"the request body is {size} bytes, more than this server takes ({self.max_body_bytes} bytes, "
                "--max-body-bytes)")

    async def __call__(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await APIError(413, self._message(length.decode())).response()(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Raised into the route's read of the body; the app's handlers answer it.
                    raise HTTPException(413, self._message(f"over {received}"))
            return message

        await self.app(scope, counted_receive, send)
