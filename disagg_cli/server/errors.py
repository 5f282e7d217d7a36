"""HTTP errors in OpenAI's nested shape, `{"error": {"message", "type", "param", "code"}}`.

`APIError` is what route code raises; the handlers installed by `install_handlers` turn it, the
request-validation errors FastAPI would answer with 422, unknown routes and anything unexpected
into that shape. `from_service_error` maps the service's refusals to their status codes.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from disagg_cli.coordinator.refusals import DrainingError, OverloadedError, QueueFullError, UnavailableError
from disagg_cli.errors import ContextLengthError, DisaggError, UsageError

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1

# The class names OpenAI's SDK raises per status, as vLLM puts them in `type`.
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
          413: "RequestTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
MAX_ECHOED_INPUT_CHARS = 200  # of a refused value quoted back in a message
# A failed request's reason code (coordinator) → HTTP status, for errors before any byte was sent.
_FAILURE_STATUS = {"too-long": 400, "rejected": 400, "no-worker": 503, "draining": 503, "shutdown": 503}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def from_service_error(e: DisaggError, param: str | None = None) -> APIError:
    """The service's refusal as an HTTP error; `param`: the field a refused prompt came from."""
    if isinstance(e, OverloadedError):  # come back once the queue ahead has drained below the target
        return APIError(503, str(e), headers={"Retry-After": str(max(RETRY_AFTER_S, math.ceil(e.retry_after_s)))})
    if isinstance(e, QueueFullError | UnavailableError):
        return APIError(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, DrainingError):
        return APIError(503, str(e))
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param="max_tokens")
    if isinstance(e, UsageError):
        return APIError(400, str(e), param)
    return APIError(500, str(e))


def from_failure(reason: str, message: str) -> APIError:
    """A request that failed before its response began (non-streaming)."""
    return APIError(_FAILURE_STATUS.get(reason, 500), message)


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict") or part[:1].isupper()


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        # 400, not FastAPI's 422: OpenAI's and vLLM's answer to a body that does not parse or fit.
        errors = e.errors()
        # Of a union's failed members, the one our own check refused says the most.
        first = next((x for x in errors if x.get("type") == "value_error"), errors[0] if errors else {})
        # pydantic names the union member that failed last ("prompt.str"); the field is the rest.
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _is_type_tag(str(x))]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            param = None
        elif param:
            message = f"{param}: {str(first.get('msg', 'invalid value')).removeprefix('Value error, ')}"
            if "input" in first and first["type"] != "missing":
                got = repr(first["input"])  # repr escapes a lone surrogate, which JSON could not encode
                if len(got) > MAX_ECHOED_INPUT_CHARS:
                    got = got[:MAX_ECHOED_INPUT_CHARS] + f"… ({len(got)} characters)"
                message += f" (got {got})"
        else:
            message = str(first.get("msg", "invalid request"))
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else HTTPStatus(e.status_code).phrase
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error in a request")
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()
