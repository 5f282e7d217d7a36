"""The `logprobs` object of a choice, in OpenAI's two shapes: completions' four parallel lists and
chat's list of `{token, logprob, bytes, top_logprobs}`. Token strings are each id decoded alone.

As OpenAI and vLLM answer, a position's `top_logprobs` always holds the token sampled there: the
k most likely, then the sampled token when it is not among them (k + 1 entries). The worker sends
the sampled token's logprob beside the top k. Chat asked for no alternatives (`top_logprobs` 0)
keeps an empty list, as OpenAI's does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from disagg_cli.engine.logprobs import TokenLogprobs

Decode = Callable[[list[int]], str]


def _with_sampled(token_id: int, lp: TokenLogprobs) -> list[tuple[int, float]]:
    """(id, logprob) of the top k, and of the sampled token after them when it is not one."""
    top = list(zip(lp.top_ids, lp.top_logprobs, strict=True))
    return top if token_id in lp.top_ids else [*top, (token_id, lp.logprob)]


def completion_logprobs(decode: Decode, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs],
                        text_offset: int = 0) -> dict[str, Any]:
    tokens = [decode([t]) for t in token_ids]
    offsets, at = [], text_offset
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    tops: list[dict[str, float]] = []
    for t, lp in zip(token_ids, logprobs, strict=True):
        top: dict[str, float] = {}
        for i, v in _with_sampled(t, lp):
            top.setdefault(decode([i]), v)  # two ids may decode alike; the likelier keeps the key
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(decode: Decode, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(decode([t]), lp.logprob) | {
        "top_logprobs": [entry(decode([i]), v) for i, v in (_with_sampled(t, lp) if lp.top_ids else [])]}
        for t, lp in zip(token_ids, logprobs, strict=True)]}
