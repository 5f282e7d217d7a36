"""Greedy agreement of a model (e.g. int8 weights) with a reference (float32) on varied prompts.

Two figures per comparison, both over the same prompts and token counts:
- `free_running`: both generate greedily on their own; the share of positions whose tokens are equal
  (after a first difference the texts usually part, so this is the strict, user-visible one);
- `teacher_forced`: the candidate scores the reference's own greedy text; the share of positions
  where its argmax is the reference's token (how often one step would differ).
"""

from __future__ import annotations

import torch

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.model.kv_cache import DenseKVCache
from disagg_cli.model.loader import LoadedModel

AGREEMENT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Write a short poem about the sea.",
    "Explain in simple words how a refrigerator keeps food cold.",
    "1, 1, 2, 3, 5, 8, 13,",
    "Les élèves ont visité le musée et ensuite",
)


def greedy(lm: LoadedModel, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    from disagg_cli.engine.engine import LLMEngine

    engine = LLMEngine(lm, EngineConfig(kv_cache_tokens=8192, max_num_seqs=len(prompts)))
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True)
    out: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(f"p{i}", ids, params)
        out[f"p{i}"] = []
    while engine.has_unfinished():
        for event in engine.step():
            out[event.request_id].append(event.token_id)
    return [out[f"p{i}"] for i in range(len(prompts))]


@torch.inference_mode()
def _argmax_along(lm: LoadedModel, prompt: list[int], text: list[int]) -> list[int]:
    ids = prompt + text
    cache = DenseKVCache(lm.config, len(ids), lm.kv_dtype, lm.device)
    hidden = lm.model(torch.tensor(ids), torch.arange(len(ids)), cache)
    # Row i predicts token i + 1: the rows from the prompt's last onward predict `text`.
    return lm.model.compute_logits(hidden[len(prompt) - 1 : len(ids) - 1]).argmax(-1).tolist()


def agreement(reference: LoadedModel, candidate: LoadedModel, prompts: list[list[int]],
              num_tokens: int) -> dict[str, float]:
    ref = greedy(reference, prompts, num_tokens)
    cand = greedy(candidate, prompts, num_tokens)
    total = len(prompts) * num_tokens
    free = sum(a == b for r, c in zip(ref, cand, strict=True) for a, b in zip(r, c, strict=True))
    forced = sum(a == b for p, r in zip(prompts, ref, strict=True)
                 for a, b in zip(_argmax_along(candidate, p, r), r, strict=True))
    return {"free_running": free / total, "teacher_forced": forced / total, "tokens": total}
