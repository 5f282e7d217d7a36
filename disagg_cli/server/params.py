"""OpenAI request fields → `SamplingParams`, with vLLM's defaults and one 400 per bad value.

Defaults as vLLM's: temperature 1.0, top_p 1.0, top_k off (-1 or 0), max_tokens 16 for
completions and "the rest of the context" for chat. With `n` > 1 and a seed, choice i draws with
seed + i, so the choices differ from each other and repeat from call to call.
"""

from __future__ import annotations

import math
from dataclasses import replace

from disagg_cli.config import MAX_LOGPROBS, SamplingParams
from disagg_cli.server.errors import APIError
from disagg_cli.server.protocol import ChatCompletionRequest, CompletionRequest, _Sampling

MAX_N = 16
MAX_STOP_STRINGS = 16


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not (math.isfinite(temperature) and temperature >= 0):
        raise APIError(400, f"temperature must be a finite number >= 0, got {temperature}", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = 0 if req.top_k is None or req.top_k == -1 else req.top_k
    if top_k < 0:
        raise APIError(400, f"top_k must be -1 or 0 (off) or a positive count, got {req.top_k}", "top_k")
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(s == "" for s in stop):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {stop!r}", "stop")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=req.seed,
                          stop=tuple(stop), ignore_eos=req.ignore_eos, logprobs=logprobs)


def completion_params(req: CompletionRequest) -> SamplingParams:
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", "logprobs")
    return sampling_params(req, 16 if req.max_tokens is None else req.max_tokens, req.logprobs)


def chat_logprobs_count(req: ChatCompletionRequest) -> int | None:
    """`logprobs: true` asks for the sampled token's; `top_logprobs` for that many alternatives too."""
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.top_logprobs}",
                       "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_max_tokens(req: ChatCompletionRequest, context_left: int) -> int:
    """max_completion_tokens, else max_tokens, else what is left of the context (vLLM's default)."""
    if req.max_completion_tokens is not None:
        return req.max_completion_tokens
    if req.max_tokens is not None:
        return req.max_tokens
    return max(1, context_left)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice `index` of n: its own seed when the request has one."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=params.seed + index)


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    """`prompt` as a list of prompts: a string, strings, token ids, or lists of token ids."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt is empty", "prompt")
    if all(isinstance(x, int) for x in p):
        return [[int(x) for x in p]]  # type: ignore[arg-type]
    return [x if isinstance(x, str) else [int(t) for t in x] for x in p]  # type: ignore[union-attr]
