"""The log-probabilities reported for one sampled token (OpenAI's `logprobs`), pure data.

Made by the sampler from the model's raw logits (before temperature, top-k or top-p, as vLLM
reports them by default), carried by the engine's token events and the workers' token messages,
and kept by `RequestOutput` beside each token.
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg_cli.config import MAX_LOGPROBS


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    logprob: float  # of the sampled token
    top_ids: tuple[int, ...] = ()  # the most likely tokens, most likely first
    top_logprobs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.top_ids) != len(self.top_logprobs) or len(self.top_ids) > MAX_LOGPROBS:
            raise ValueError(f"{len(self.top_ids)} top ids with {len(self.top_logprobs)} logprobs "
                             f"(at most {MAX_LOGPROBS})")
