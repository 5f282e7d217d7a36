"""The real default model against Hugging Face transformers, token for token (float32, greedy).

transformers loads the same GGUF file with its own dequantizer and its own Llama; it is the
reference, installed only as a test dependency. Its continuations are computed once per session
(`hf_greedy`, tests/conftest.py), shared with the serving tests.
"""

from __future__ import annotations

import pytest

from disagg_cli.config import SamplingParams
from disagg_cli.engine.request import RequestOutput
from disagg_cli.engine.single import SingleProcessGenerator
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer
from tests.reference import PROMPTS, REFERENCE_TOKENS

pytestmark = pytest.mark.slow

NUM_TOKENS = REFERENCE_TOKENS


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_tokens_equal_transformers(name: str, default_model: LoadedModel,
                                          default_tokenizer: Tokenizer, hf_greedy) -> None:
    prompt = PROMPTS[name]
    hf_ids, expected = hf_greedy[name]
    ids = default_tokenizer.encode(prompt)
    assert ids == hf_ids
    if name == "long":
        assert len(ids) >= 300
    out = RequestOutput("golden", prompt, ids, SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True),
                        default_tokenizer)
    SingleProcessGenerator(default_model).generate(out)
    assert len(expected) == NUM_TOKENS
    assert out.token_ids == expected
