"""Decode tokens that overtake the first token on another socket are applied after it; when that
first token already ended the request (EOS, a stop string, max_tokens 1), they are discarded and the
request stays done. Marking it decoding again lost its answer: `disagg serve` answered 500 "ended
without an answer" (seen once in CI, in the OpenAPI fuzz test)."""

from __future__ import annotations

import asyncio

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.attempt import Attempt
from disagg_cli.coordinator.coordinator import Coordinator
from disagg_cli.coordinator.stream import StreamingOutput
from disagg_cli.model.tokenizer import Tokenizer
from disagg_cli.protocol import Tokens


class Ends:
    """The one part of a Coordinator `_tokens` calls: the workers done with the request."""

    def __init__(self) -> None:
        self.done: list[object] = []

    def _done_with(self, run: Attempt, src: object) -> None:
        self.done.append(src)


def test_tokens_after_a_first_token_that_ended_the_request_leave_it_done(default_tokenizer: Tokenizer) -> None:
    out = StreamingOutput("r", "", [5, 6], SamplingParams(max_tokens=1), default_tokenizer)
    run = Attempt(out, None, asyncio.Queue(), "r", (5, 6), out.params, 0.0, set())
    out.append(7)  # the first token, from the prefill worker: max_tokens 1 reached
    assert (out.state, out.finish_reason) == ("done", "length")
    ends = Ends()
    for late in (Tokens("r", (8,)), Tokens("r", (9,), finish_reason="length")):
        Coordinator._tokens(ends, run, "decode", late)  # type: ignore[arg-type]
    assert (out.state, out.finish_reason, out.token_ids) == ("done", "length", [7])
    assert ends.done == ["decode"]  # its worker is done with it all the same
    delta = out.last_delta()
    assert (delta.finish_reason, delta.error) == ("length", None)
