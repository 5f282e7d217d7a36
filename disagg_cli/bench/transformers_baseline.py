"""Plain Hugging Face transformers on the same GGUF file: the reference baseline of `bench engine`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from disagg_cli.model.loader import TORCH_DTYPES


class HFEngine:
    """Plain transformers: one `model(...)` forward for prefill, `generate` for decode."""

    name = "transformers"
    gathered_bytes = 0

    def __init__(self, path: Path, dtype: str) -> None:
        # Its GGUF loader draws a tqdm bar that ignores transformers' own switch; this one it obeys.
        os.environ.setdefault("TQDM_DISABLE", "1")
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # its tqdm bars would bypass our quiet-off-a-terminal rule
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=TORCH_DTYPES[dtype]).eval()

    @torch.inference_mode()
    def prefill_s(self, ids: list[int]) -> float:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        # logits_to_keep=1: the lm_head runs on the last row only, as ours and `generate` do
        self.model(input_ids=x, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode_s(self, prompts: list[list[int]], steps: int) -> float:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []

        class Stamp(StoppingCriteria):  # called once after each new token is appended
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        x = torch.tensor(prompts)
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps + 1,
                                  min_new_tokens=steps + 1, do_sample=False, pad_token_id=0,
                                  stopping_criteria=StoppingCriteriaList([Stamp()]))
        assert out.shape[1] == x.shape[1] + steps + 1 and len(stamps) == steps + 1
        return stamps[-1] - stamps[0]  # first stamp: after the prefill forward; then `steps` decodes
