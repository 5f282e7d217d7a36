"""`POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed, as vLLM answers them.

1. the body's fields become `SamplingParams` (`params.py`) and token ids (the service tokenizes,
   in a thread: `prompts.py`; chat goes through the model's own chat template first);
2. `prompts × n` choices are submitted at once (`streams.py`): a refusal is an error response;
3. whole: every choice collected, one object with `usage` (built in a thread: logprobs decode
   every token); a choice that failed makes the whole answer an error. Streamed: a chunk per
   delta with text (chat: the first chunk of a choice, with its first token, carries the role, as
   vLLM's does, so a client's TTFT clock stops at the real first token), the finishing chunk of
   each choice with our figures under `disagg`, a usage chunk when
   `stream_options.include_usage`, then `[DONE]`; a failure mid-stream is an error event, then
   `[DONE]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from disagg_cli.coordinator.service import CoordinatorService
from disagg_cli.coordinator.stream import Delta
from disagg_cli.server.bodies import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseHead,
    disagg_figures,
    usage,
)
from disagg_cli.server.errors import from_failure
from disagg_cli.server.openai_logprobs import chat_logprobs, completion_logprobs
from disagg_cli.server.params import (
    chat_logprobs_count,
    chat_max_tokens,
    completion_params,
    prompts_of,
    sampling_params,
)
from disagg_cli.server.prompts import chat_prompt, completion_prompts
from disagg_cli.server.streams import SSE_DONE, Choice, collect, merged, sse, submit_choices

# (choice index, delta) → the chunk's one `choices` entry, or None to send nothing
ChunkChoice = Callable[[int, Delta], dict[str, Any] | None]


async def create_completion(req: CompletionRequest, model: str, service: CoordinatorService,
                            request: Request) -> JSONResponse | StreamingResponse:
    params = completion_params(req)
    prompts, echo = await completion_prompts(service, prompts_of(req), params.max_tokens, req.echo)
    streams = submit_choices(service, prompts, params, req.n)
    head = ResponseHead("cmpl", model)
    num_prompt_tokens = sum(len(p) for p in prompts)
    echoed: set[int] = set()
    offsets = [len(echo[i // req.n]) for i in range(len(streams))]  # where each choice's next token starts
    _note(request, streams)

    def chunk_choice(index: int, delta: Delta) -> dict[str, Any] | None:
        text = delta.text
        if req.echo and index not in echoed:
            echoed.add(index)
            text = echo[index // req.n] + text
        if not text and not delta.is_last and not delta.logprobs:
            return None
        logprobs = None
        if delta.logprobs:
            logprobs = completion_logprobs(service.detokenize, delta.token_ids, delta.logprobs, offsets[index])
            offsets[index] += sum(len(t) for t in logprobs["tokens"])
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason,
                "stop_reason": None}

    if req.stream:
        return _stream(head, "text_completion", streams, chunk_choice, num_prompt_tokens, req)
    choices = await collect(streams, request)
    _raise_failure(choices)

    def whole() -> JSONResponse:
        body = head.body("text_completion", choices=[
            {"index": i, "text": echo[i // req.n] + "".join(c.text),
             "logprobs": completion_logprobs(service.detokenize, c.token_ids, c.logprobs, len(echo[i // req.n]))
             if params.logprobs is not None else None,
             "finish_reason": _last(c).finish_reason, "stop_reason": None}
            for i, c in enumerate(choices)])
        return _whole(body, choices, num_prompt_tokens)

    return await asyncio.to_thread(whole)


async def create_chat_completion(req: ChatCompletionRequest, model: str, service: CoordinatorService,
                                 request: Request) -> JSONResponse | StreamingResponse:
    ids = await chat_prompt(service, req.messages, req.add_generation_prompt)
    params = sampling_params(req, chat_max_tokens(req, service.context_limit - len(ids)), chat_logprobs_count(req))
    streams = submit_choices(service, [ids], params, req.n)
    head = ResponseHead("chatcmpl", model)
    started: set[int] = set()
    _note(request, streams)

    def chunk_choice(index: int, delta: Delta) -> dict[str, Any] | None:
        if index not in started:  # the choice's first token: its role goes with it, never before
            started.add(index)
            body: dict[str, Any] = {"role": "assistant", "content": delta.text}
        elif delta.is_last:
            body = {"content": delta.text} if delta.text else {}
        elif delta.text or delta.logprobs:
            body = {"content": delta.text}
        else:
            return None
        logprobs = chat_logprobs(service.detokenize, delta.token_ids, delta.logprobs) if delta.logprobs else None
        return {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    if req.stream:
        return _stream(head, "chat.completion.chunk", streams, chunk_choice, len(ids), req)
    choices = await collect(streams, request)
    _raise_failure(choices)

    def whole() -> JSONResponse:
        body = head.body("chat.completion", choices=[
            {"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
             "logprobs": chat_logprobs(service.detokenize, c.token_ids, c.logprobs) if params.logprobs is not None
             else None,
             "finish_reason": _last(c).finish_reason}
            for i, c in enumerate(choices)])
        return _whole(body, choices, len(ids))

    return await asyncio.to_thread(whole)


def _stream(head: ResponseHead, obj: str, streams: list[Any], chunk_choice: ChunkChoice, num_prompt_tokens: int,
            req: CompletionRequest | ChatCompletionRequest) -> StreamingResponse:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        completion_tokens = 0
        async for index, delta in merged(streams):
            completion_tokens += len(delta.token_ids)
            if delta.error is not None:
                yield sse(from_failure(delta.error, delta.error_message or delta.error).body())
                break  # leaving `merged` aborts the other choices
            entry = chunk_choice(index, delta)
            if entry is None:
                continue
            chunk = head.body(obj, choices=[entry])
            if delta.is_last:
                chunk["disagg"] = disagg_figures(delta.result)
            yield sse(chunk)
        else:
            if include_usage:
                yield sse(head.body(obj, choices=[], usage=usage(num_prompt_tokens, completion_tokens)))
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")


def _whole(body: dict[str, Any], choices: list[Choice], num_prompt_tokens: int) -> JSONResponse:
    body["usage"] = usage(num_prompt_tokens, sum(len(c.token_ids) for c in choices))
    body["disagg"] = [disagg_figures(_last(c).result) for c in choices]
    return JSONResponse(body)


def _last(c: Choice) -> Delta:
    assert c.last is not None, "a choice collected without its last delta"
    return c.last


def _raise_failure(choices: list[Choice]) -> None:
    for c in choices:
        last = c.last
        if last is None:
            raise from_failure("aborted", "the request was aborted")
        if last.error is not None:
            raise from_failure(last.error, last.error_message or last.error)


def _note(request: Request, streams: list[Any]) -> None:
    """What the access log line tells of this request (read by the middleware after the response)."""
    request.state.disagg_outputs = [s.out for s in streams]
