"""The real default model against Hugging Face transformers, token for token (float32, greedy), on
each execution backend (`--kernel c` and `--kernel torch`).

transformers loads the same GGUF file with its own dequantizer and its own Llama; it is the
reference, installed only as a test dependency. Its continuations are computed once per session
(`hf_greedy`, tests/conftest.py), shared with the serving tests.
"""

from __future__ import annotations

import pytest

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.request import RequestOutput
from disagg_cli.engine.single import SingleProcessGenerator
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer
from tests.reference import PROMPTS, REFERENCE_TOKENS

pytestmark = pytest.mark.slow

NUM_TOKENS = REFERENCE_TOKENS


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_tokens_equal_transformers(name: str, model_per_kernel: LoadedModel,
                                          default_tokenizer: Tokenizer, hf_greedy) -> None:
    prompt = PROMPTS[name]
    hf_ids, expected = hf_greedy[name]
    ids = default_tokenizer.encode(prompt)
    assert ids == hf_ids
    if name == "long":
        assert len(ids) >= 300
    out = RequestOutput("golden", prompt, ids, SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True),
                        default_tokenizer)
    SingleProcessGenerator(model_per_kernel).generate(out)
    assert len(expected) == NUM_TOKENS
    assert out.token_ids == expected


def test_batched_engine_greedy_equals_transformers(model_per_kernel: LoadedModel, hf_greedy) -> None:
    """Every prompt at once through the engine: the backend's attention over the paged pool for the
    prompts, then its decode steps (the fused C step on `c`, torch's ops on `torch`)."""
    engine = LLMEngine(model_per_kernel, EngineConfig(block_size=16, kv_cache_tokens=4096,
                                                      enable_prefix_caching=False))
    got: dict[str, list[int]] = {}
    for name in PROMPTS:
        engine.add_request(name, hf_greedy[name][0], SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True))
        got[name] = []
    while engine.has_unfinished():
        for event in engine.step():
            got[event.request_id].append(event.token_id)
    assert got == {name: hf_greedy[name][1] for name in PROMPTS}
