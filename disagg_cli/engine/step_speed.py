"""How fast this engine's steps run, and how much prompt a step that decodes may take.

An engine that both prefills and decodes (colocated, an elastic worker in that role, a decode worker
computing a short prompt itself) mixes prompt chunks into the steps of its running requests, and
each of their tokens waits for the whole step; a request that arrives (its KV imported, or its
prompt) waits for the step under way. `max_step_ms` bounds those waits, as a TPOT target does: a
step takes only the prompt tokens the measured prefill speed computes in the time its decodes
leave it (all of it when none run), never fewer than `MIN_CHUNK_TOKENS` so prompts always move.
A prefill-only engine is never bounded (nothing of its waits on its steps).

The speeds are moving averages of the steps themselves, also sent in heartbeats (the router's
`--disagg-threshold auto`, the planner). A mixed step's prompt speed counts only the time its
decodes did not take, or a small chunk would measure slow and shrink the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_CHUNK_TOKENS = 32  # two blocks: a chunk's matmuls stay on the wide tiles (5+ rows) with room
MIN_PROMPT_TOKENS_MEASURED = 16  # fewer prompt tokens in a step say little about prefill speed
SMOOTHING = 0.2  # weight of the newest step in the moving averages


@dataclass
class StepSpeed:
    prefill_tokens_per_s: float = 0.0  # 0: not measured yet
    decode_step_ms: float = 0.0  # a step of decodes only, at the batch it ran

    def observe(self, num_prefill_tokens: int, num_decode_seqs: int, elapsed_ms: float) -> None:
        """Fold one step in: a decode-only step gives the step time, one with enough prompt tokens
        the prefill speed (less the decodes' measured share of a mixed step)."""
        if elapsed_ms <= 0:
            return
        if num_prefill_tokens >= MIN_PROMPT_TOKENS_MEASURED:
            prompt_ms = elapsed_ms
            if num_decode_seqs and self.decode_step_ms > 0:
                prompt_ms = elapsed_ms - self.decode_step_ms
                if prompt_ms < 0.25 * elapsed_ms:
                    return  # the decodes took most of it: too little left to time the prompt by
            self.prefill_tokens_per_s = _fold(self.prefill_tokens_per_s, num_prefill_tokens / prompt_ms * 1e3)
        elif num_decode_seqs and not num_prefill_tokens:
            self.decode_step_ms = _fold(self.decode_step_ms, elapsed_ms)

    def prompt_budget(self, max_step_ms: float, decoding: bool) -> int | None:
        """The prompt tokens a step may take to end within `max_step_ms`, after its decodes' part
        when `decoding` (the floor while the prefill speed is not measured yet: that chunk measures
        it); None: no bound."""
        if max_step_ms <= 0:
            return None
        if self.prefill_tokens_per_s <= 0:
            return MIN_CHUNK_TOKENS
        left_ms = max_step_ms - (self.decode_step_ms if decoding else 0.0)
        return max(MIN_CHUNK_TOKENS, int(left_ms * self.prefill_tokens_per_s / 1e3))


def _fold(old: float, new: float) -> float:
    return new if old == 0 else (1 - SMOOTHING) * old + SMOOTHING * new
