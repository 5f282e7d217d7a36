"""The FastAPI app: OpenAI's routes as vLLM serves them, over one `CoordinatorService`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `POST /tokenize`,
`POST /detokenize` (these take the Bearer key when one is set), and `GET /health`, `GET /version`,
`GET /metrics`, `GET /openapi.json` (open, as vLLM's are, for load balancers, Prometheus and
client generators). The handlers only translate: the service tokenizes (in a thread), checks
limits and runs the requests. A body past `max_body_bytes` is refused with 413 before it is read.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from disagg_cli import __version__
from disagg_cli.coordinator.service import CoordinatorService
from disagg_cli.errors import UsageError
from disagg_cli.server.access_log import AccessLog
from disagg_cli.server.bodies import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from disagg_cli.server.body_limit import BodyLimit
from disagg_cli.server.completions import create_chat_completion, create_completion
from disagg_cli.server.errors import APIError, install_handlers
from disagg_cli.server.limits import DEFAULT_MAX_BODY_BYTES
from disagg_cli.server.metrics import ServerMetrics
from disagg_cli.server.prompts import chat_prompt, off_loop


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # vLLM's
    served_model_names: tuple[str, ...] = ()  # empty: the model's name as given
    api_key: str | None = None
    access_log: bool = True  # one line per request on stderr (off a terminal)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise UsageError(f"--max-body-bytes must be at least 1, got {self.max_body_bytes}")
        if not 0 <= self.port < 65536:
            raise UsageError(f"--port must be 1-65535 (or 0 for any free port), got {self.port}")
        if self.api_key == "":
            raise UsageError("--api-key must not be empty")
        if self.api_key is None and not is_loopback(self.host):
            raise UsageError(f"refusing to listen on {self.host} without --api-key: anyone who can reach that "
                             "address could use the model; pass --api-key KEY or bind 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


def check_key(request: Request) -> None:
    """The Bearer key, when the server has one (compared in constant time)."""
    key: str | None = request.app.state.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                       "the key this server was started with (--api-key)")


Auth = Annotated[None, Depends(check_key)]


def create_app(service: CoordinatorService, config: ServerConfig, model_name: str) -> FastAPI:
    """`model_name`: the first name served; requests may use any of `config.served_model_names`."""
    names = config.served_model_names or (model_name,)
    created = int(time.time())
    metrics = ServerMetrics(service, names[0])
    app = FastAPI(title="disagg", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.service = service
    app.state.metrics = metrics
    app.state.api_key = config.api_key
    install_handlers(app)
    app.add_middleware(BodyLimit, max_body_bytes=config.max_body_bytes)  # inside the access log, which logs its 413s
    if config.access_log:
        app.add_middleware(AccessLog)

    def model_of(requested: str | None) -> str:
        if requested is None or requested == "":
            return names[0]
        if requested not in names:
            raise APIError(404, f"the model `{requested}` does not exist; this server serves "
                           f"{', '.join(repr(n) for n in names)}", "model")
        return requested

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request, _: Auth) -> JSONResponse | StreamingResponse:
        return await create_completion(body, model_of(body.model), service, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request, _: Auth) -> JSONResponse | StreamingResponse:
        return await create_chat_completion(body, model_of(body.model), service, request)

    @app.get("/v1/models")
    async def models(_: Auth) -> dict[str, object]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "disagg", "root": model_name,
             "parent": None, "max_model_len": service.context_limit, "permission": []} for name in names]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, _: Auth) -> dict[str, object]:
        model_of(body.model)
        if body.prompt is not None and body.messages is None:
            ids = await off_loop("prompt", service.tokenize, body.prompt, body.add_special_tokens)
        elif body.messages is not None and body.prompt is None:
            ids = await chat_prompt(service, body.messages, body.add_generation_prompt, body.add_special_tokens)
        else:
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        return {"count": len(ids), "max_model_len": service.context_limit, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, _: Auth) -> dict[str, object]:
        model_of(body.model)
        return {"prompt": await off_loop("tokens", service.detokenize, body.tokens)}

    @app.get("/health")
    async def health() -> Response:
        ok, why = service.health()
        return Response(status_code=200) if ok else JSONResponse({"status": why}, status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
