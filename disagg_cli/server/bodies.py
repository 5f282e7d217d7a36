"""The OpenAI request bodies as vLLM accepts them (pydantic), and the response objects we build.

Requests tolerate unknown fields (OpenAI clients send `user`, `frequency_penalty`, …); values are
checked where they become `SamplingParams` (`server/params.py`), so every refusal names its field.
Text is checked here: JSON may carry a lone surrogate (`"\\ud800"`), which no UTF-8 tokenizer, wire
or response can hold, so a field holding one is a 400 naming it.
Responses are plain dicts in OpenAI's shapes (`text_completion`, `chat.completion`, their chunks),
with our per-request figures under `disagg`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")

    @field_validator("*")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        _check_utf8(value)
        return value


def _check_utf8(value: Any) -> None:
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"holds a lone surrogate ({value[e.start]!r} at character {e.start}), which "
                                 "UTF-8 cannot encode; send valid Unicode text") from None
    elif isinstance(value, list):
        for item in value:
            _check_utf8(item)


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Lenient):
    model: str | None = None
    temperature: float | None = None  # absent: 1.0, as vLLM and OpenAI
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ContentPart(_Lenient):
    type: str = "text"
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """What the chat template reads: role and text content (text parts joined)."""
    out = []
    for m in messages:
        if isinstance(m.content, list):
            content = "".join(p.text or "" for p in m.content if p.type == "text")
        else:
            content = m.content or ""
        out.append({"role": m.role, "content": content})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def disagg_figures(result: dict[str, Any] | None) -> dict[str, Any]:
    """Our per-request timings for the `disagg` field: TTFT, TPOT, KV bytes, transfer, workers."""
    if not result:
        return {}
    kv, stages = result.get("kv", {}), result.get("stages_ms", {})
    transfer = kv.get("transfer_ms")
    hidden = kv.get("hidden_ms")
    return {
        "request_id": result["request_id"],
        "ttft_ms": result["ttft_ms"], "tpot_ms": result["tpot_ms"], "e2e_ms": result["e2e_ms"],
        "kv_raw_bytes": kv.get("raw_bytes"), "kv_wire_bytes": kv.get("wire_bytes"),
        "kv_transfer_ms": transfer,
        "kv_hidden_share": round(hidden / transfer, 4) if transfer and hidden is not None else None,
        "retries": int(kv.get("retries", 0)),
        # Prompt tokens served from the prefix cache of the worker that prefilled, and of the
        # decode worker (whose KV did not cross the wire); whether the decode worker prefilled.
        "prefix_cached_tokens": int(kv.get("prefix_cached_tokens", 0)),
        "decode_cached_tokens": int(kv.get("decode_cached_tokens", 0)),
        "local_prefill": bool(kv.get("local_prefill", 0)),
        "stages_ms": stages, "workers": result.get("workers", {}),
        # Every worker's role when the request was taken: with --planner slo they change over time.
        "roles": result.get("roles", {}),
    }


class ResponseHead:
    """id, object, created and model: the fields every response and chunk of one request share."""

    def __init__(self, prefix: str, model: str) -> None:
        self.id = new_id(prefix)
        self.created = int(time.time())
        self.model = model

    def body(self, obj: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, **fields}
