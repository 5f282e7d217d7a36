"""The `logprobs` object of a choice, in OpenAI's two shapes: completions' four parallel lists and
chat's list of `{token, logprob, bytes, top_logprobs}`. Token strings are each id decoded alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from disagg_cli.engine.logprobs import TokenLogprobs

Decode = Callable[[list[int]], str]


def completion_logprobs(decode: Decode, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs],
                        text_offset: int = 0) -> dict[str, Any]:
    tokens = [decode([t]) for t in token_ids]
    offsets, at = [], text_offset
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{decode([i]): v for i, v in zip(lp.top_ids, lp.top_logprobs, strict=True)}
                             for lp in logprobs],
            "text_offset": offsets}


def chat_logprobs(decode: Decode, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(decode([t]), lp.logprob) | {
        "top_logprobs": [entry(decode([i]), v) for i, v in zip(lp.top_ids, lp.top_logprobs, strict=True)]}
        for t, lp in zip(token_ids, logprobs, strict=True)]}
