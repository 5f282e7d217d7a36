"""The HTTP path's CPU work on text — rendering the chat template, tokenizing, detokenizing for
echo and for logprobs — in a worker thread, off the event loop that the coordinator's heartbeats
share: a long prompt must not stall `/health` or make a worker look dead.

The service's `tokenize` refuses a text longer than the context could hold before tokenizing it,
and releases the GIL while it tokenizes. A refusal names the field its text came from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

from disagg_cli.coordinator.service import CoordinatorService
from disagg_cli.errors import DisaggError
from disagg_cli.server.bodies import ChatMessage, message_dicts
from disagg_cli.server.errors import from_service_error

T = TypeVar("T")


async def off_loop(param: str | None, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a thread; the service's refusal becomes a 400 naming `param`."""
    try:
        return await asyncio.to_thread(fn, *args)
    except DisaggError as e:
        raise from_service_error(e, param) from None


async def completion_prompts(service: CoordinatorService, prompts: Sequence[str | list[int]], max_tokens: int,
                             echo: bool) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids, and with `echo` its text (else "")."""
    ids: list[list[int]] = []
    for p in prompts:  # one at a time: a prompt too long is refused before the next is tokenized
        ids.append(await off_loop("prompt", service.tokenize, p) if isinstance(p, str) else p)
        try:
            service.check_context(len(ids[-1]), max_tokens)
        except DisaggError as e:
            raise from_service_error(e) from None
    texts = [(p if isinstance(p, str) else await off_loop("prompt", service.detokenize, i)) if echo else ""
             for p, i in zip(prompts, ids, strict=True)]
    return ids, texts


async def chat_prompt(service: CoordinatorService, messages: list[ChatMessage], add_generation_prompt: bool,
                      add_special_tokens: bool = True) -> list[int]:
    """The conversation through the model's chat template, tokenized."""
    text = await off_loop("messages", service.render_chat, message_dicts(messages), add_generation_prompt)
    return await off_loop("messages", service.tokenize, text, add_special_tokens)
