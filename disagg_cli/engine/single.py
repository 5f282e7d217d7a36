"""One request at a time, in this process: prefill the prompt, then decode token by token.

The simplest correct path through the model, with a dense KV cache per request. It is the
reference the batched engine and the disaggregated workers are tested against.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from disagg_cli.engine.request import RequestOutput
from disagg_cli.errors import ContextLengthError
from disagg_cli.model.kv_cache import DenseKVCache
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.sampling import Sampler


def check_context(loaded: LoadedModel, num_prompt_tokens: int, max_tokens: int) -> None:
    ContextLengthError.check(num_prompt_tokens, max_tokens, loaded.config.max_position_embeddings)


class SingleProcessGenerator:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def prefill(self, prompt_ids: list[int], capacity: int) -> tuple[DenseKVCache, torch.Tensor]:
        """Run the prompt through the model → (its KV cache, logits (V,) for the next token)."""
        lm = self.loaded
        cache = DenseKVCache(lm.config, capacity, lm.kv_dtype, lm.device)
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=lm.device)
        positions = torch.arange(len(prompt_ids), device=lm.device)
        hidden = lm.model(ids, positions, cache)  # (T, D)
        cache.advance(len(prompt_ids))
        return cache, lm.model.compute_logits(hidden[-1:])[0]

    def decode_step(self, cache: DenseKVCache, token_id: int) -> torch.Tensor:
        """Feed one token → logits (V,) for the next."""
        lm = self.loaded
        ids = torch.tensor([token_id], dtype=torch.long, device=lm.device)
        positions = torch.tensor([cache.num_tokens], device=lm.device)
        hidden = lm.model(ids, positions, cache)
        cache.advance(1)
        return lm.model.compute_logits(hidden)[0]

    def generate(self, out: RequestOutput, on_text: Callable[[str], None] | None = None) -> RequestOutput:
        params = out.params
        check_context(self.loaded, len(out.prompt_token_ids), params.max_tokens)
        sampler = Sampler(params)
        t0 = time.perf_counter()
        cache, logits = self.prefill(out.prompt_token_ids, len(out.prompt_token_ids) + params.max_tokens)
        out.timings.stages_ms["prefill"] = (time.perf_counter() - t0) * 1e3
        while True:
            text = out.append(sampler(logits))
            if on_text and text:
                on_text(text)
            if out.is_finished:
                return out
            logits = self.decode_step(cache, out.token_ids[-1])
