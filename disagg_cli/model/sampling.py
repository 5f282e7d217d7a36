"""Turning logits into token ids: greedy, temperature, top-k, top-p, seeded per request.

Each request owns a `torch.Generator` seeded from its `seed`, so a seeded request draws the same
tokens whether it runs alone or in a batch.
"""

from __future__ import annotations

import torch

from disagg_cli.config import SamplingParams
from disagg_cli.engine.logprobs import TokenLogprobs


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (V,) float32 → one token id."""
        p = self.params
        if p.is_greedy:
            return int(torch.argmax(logits))
        logits = logits.float().cpu() / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def logprobs(self, logits: torch.Tensor, token_id: int) -> TokenLogprobs | None:
        """The raw distribution's logprob of `token_id` and its top `params.logprobs`; None when not asked."""
        k = self.params.logprobs
        if k is None:
            return None
        lp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(lp, k) if k else None
        return TokenLogprobs(float(lp[token_id]), tuple(top.indices.tolist()) if top is not None else (),
                             tuple(top.values.tolist()) if top is not None else ())
