"""What one request's caller sees: token ids becoming text, stop conditions, and timings.

Life of a request's output:
1. created with the prompt's ids and the sampling params, stamped with its arrival time;
2. `append(token_id)` for every sampled token: checks EOS, `max_tokens` and stop strings, and
   returns only the text that is safe to print (never half a UTF-8 character, never the start of
   what may turn out to be a stop string);
3. once `finish_reason` is set, nothing more is appended; `result()` gives the final record.
The same object serves the single-process path, the engine and the coordinator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from disagg_cli.config import SamplingParams
from disagg_cli.engine.logprobs import TokenLogprobs
from disagg_cli.model.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Timings:
    """Wall-clock stamps (time.perf_counter seconds) and per-stage durations of one request."""

    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finish_s: float | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)

    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.arrival_s) * 1e3

    def e2e_ms(self) -> float | None:
        return None if self.finish_s is None else (self.finish_s - self.arrival_s) * 1e3

    def tpot_ms(self, num_output_tokens: int) -> float | None:
        """(E2E − TTFT) / (output tokens − 1), vLLM's definition; None with fewer than 2 tokens."""
        if self.first_token_s is None or self.finish_s is None or num_output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) * 1e3 / (num_output_tokens - 1)


class RequestOutput:
    def __init__(self, request_id: str, prompt: str, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer: Tokenizer) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs | None] = []  # beside each token, when the request asked
        self.text = ""  # all text decoded so far, cut at a stop string once one is seen
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.timings = Timings()
        # What the live table and --json show beyond text: where it is, who served it, its KV.
        self.state = "queued"
        self.workers: dict[str, str] = {}  # role → worker address
        self.kv: dict[str, float] = {}  # raw_bytes, wire_bytes, transfer_ms, hidden_ms, …
        self._eos_ids = frozenset() if params.ignore_eos else tokenizer.eos_token_ids
        self._detok = IncrementalDetokenizer(tokenizer)
        self._emitted = 0  # how much of self.text the caller has been given
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, logprobs: TokenLogprobs | None = None) -> str:
        """Add one sampled token (and its logprobs, if asked for); return the newly printable text."""
        assert self.finish_reason is None, f"request {self.request_id} already finished"
        now = time.perf_counter()
        if self.timings.first_token_s is None:
            self.timings.first_token_s = now
        self.token_ids.append(token_id)
        self.logprobs.append(logprobs)
        if token_id in self._eos_ids:
            self.text += self._detok.flush()
            return self._finish("stop", now)
        before = len(self.text)
        self.text += self._detok.push(token_id)
        if self.params.stop and self._cut_at_stop(before):
            return self._finish("stop", now)
        if len(self.token_ids) >= self.params.max_tokens:
            self.text += self._detok.flush()
            return self._finish("length", now)
        safe = len(self.text) - self._hold
        return self._take(safe)

    def fail(self, reason: str, message: str) -> None:
        """End the request without an answer (abort, timeout, dead worker); sticky."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.state = "failed"
            self.error = message
            self.timings.finish_s = time.perf_counter()

    def _cut_at_stop(self, before: int) -> bool:
        # A new match must end in the text just added, so it starts at most `hold` chars earlier.
        start = max(0, before - self._hold)
        hits = [i for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _finish(self, reason: str, now: float) -> str:
        self.finish_reason = reason
        self.state = "done"
        self.timings.finish_s = now
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out

    def result(self) -> dict[str, Any]:
        """The record `generate --json` prints for this request."""
        t = self.timings
        n = len(self.token_ids)
        e2e = t.e2e_ms()
        ttft = t.ttft_ms()
        tpot = t.tpot_ms(n)
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "prompt_tokens": len(self.prompt_token_ids),
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "ttft_ms": _round(ttft),
            "tpot_ms": _round(tpot),
            "e2e_ms": _round(e2e),
            "tokens_per_s": _round(n / e2e * 1e3) if e2e else None,
            "decode_tokens_per_s": _round(1e3 / tpot) if tpot else None,
            "stages_ms": {k: _round(v) for k, v in t.stages_ms.items()},
            "kv": {k: _round(v) for k, v in self.kv.items()},
            "workers": self.workers,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
