"""OpenAI request fields → `SamplingParams`, with vLLM's defaults and one 400 per bad value.

Defaults as vLLM's: temperature 1.0, top_p 1.0, top_k off (-1 or 0), max_tokens 16 for
completions and "the rest of the context" for chat. With `n` > 1 and a seed, choice i draws with
seed + i, so the choices differ from each other and repeat from call to call.

Every number that travels to a worker is checked here against the range it is used in, so none
fails later inside a worker (or in msgpack, which packs integers of 64 bits at most):
- a temperature below `MIN_TEMPERATURE` is greedy (vLLM's epsilon): dividing logits by 1e-40
  overflows them;
- a seed, and seed + n - 1 with n choices, must be one `torch.Generator.manual_seed` takes;
- top_k at most `MAX_TOP_K` (a top_k at or past the vocabulary is off, as in the sampler);
- max_tokens at most `MAX_TOKENS_FIELD`; stop strings and prompts × n within their bounds
  (`limits.py`).
"""

from __future__ import annotations

import math
from dataclasses import replace

from disagg_cli.config import MAX_LOGPROBS, MAX_TOP_K, MIN_TEMPERATURE, SEED_RANGE, SamplingParams
from disagg_cli.server.bodies import ChatCompletionRequest, CompletionRequest, _Sampling
from disagg_cli.server.errors import APIError
from disagg_cli.server.limits import (
    MAX_CHOICES,
    MAX_N,
    MAX_STOP_BYTES,
    MAX_STOP_STRING_BYTES,
    MAX_STOP_STRINGS,
    MAX_TOKENS_FIELD,
)


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if max_tokens > MAX_TOKENS_FIELD:
        raise APIError(400, f"max_tokens must be at most {MAX_TOKENS_FIELD}, got {max_tokens}", "max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not (math.isfinite(temperature) and temperature >= 0):
        raise APIError(400, f"temperature must be a finite number >= 0, got {temperature}", "temperature")
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = 0 if req.top_k is None or req.top_k == -1 else req.top_k
    if not 0 <= top_k <= MAX_TOP_K:
        raise APIError(400, f"top_k must be -1 or 0 (off) or a count up to {MAX_TOP_K}, got {req.top_k}", "top_k")
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    _check_seed(req.seed, req.n)
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=req.seed,
                          stop=stop_strings(req.stop), ignore_eos=req.ignore_eos, logprobs=logprobs)


def _check_seed(seed: int | None, n: int) -> None:
    low, high = SEED_RANGE
    if seed is None or low <= seed and seed + n - 1 <= high:
        return
    with_n = f" (choice i of n draws with seed + i, so at most {high - n + 1} with n={n})" if n > 1 else ""
    raise APIError(400, f"seed must be between {low} and {high}{with_n}, got {seed}", "seed")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(strings)}", "stop")
    if any(s == "" for s in strings):
        raise APIError(400, "stop strings must not be empty", "stop")
    sizes = [len(s.encode("utf-8", "surrogatepass")) for s in strings]
    if max(sizes, default=0) > MAX_STOP_STRING_BYTES or sum(sizes) > MAX_STOP_BYTES:
        raise APIError(400, f"stop strings may be at most {MAX_STOP_STRING_BYTES} bytes each and {MAX_STOP_BYTES} "
                       f"together, got {max(sizes)} at most and {sum(sizes)} together", "stop")
    return tuple(strings)


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
    """`prompt` as a list of prompts (a string, strings, token ids, or lists of token ids), at most
    `MAX_CHOICES` of them with n choices each."""
    p = req.prompt
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif not p:
        raise APIError(400, "prompt is empty", "prompt")
    elif all(isinstance(x, int) for x in p):
        prompts = [[int(x) for x in p]]  # type: ignore[arg-type]
    else:
        prompts = [x if isinstance(x, str) else [int(t) for t in x] for x in p]  # type: ignore[union-attr]
    check_choices(len(prompts), req.n)
    return prompts


def check_choices(num_prompts: int, n: int) -> None:
    if num_prompts * n > MAX_CHOICES:
        raise APIError(400, f"a request may ask for at most {MAX_CHOICES} choices (prompts × n), got "
                       f"{num_prompts} × {n} = {num_prompts * n}", "n" if n > 1 and num_prompts <= MAX_CHOICES
                       else "prompt")
