"""The real default model against Hugging Face transformers, token for token (float32, greedy).

transformers loads the same GGUF file with its own dequantizer and its own Llama; it is the
reference, installed only as a test dependency.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disagg_cli.config import SamplingParams
from disagg_cli.engine.request import RequestOutput
from disagg_cli.engine.single import SingleProcessGenerator
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

NUM_TOKENS = 32
LONG_PROMPT = " ".join(
    f"Section {i}: the committee reviewed item {i * 7} and noted that the budget for the "
    f"{['north', 'south', 'east', 'west'][i % 4]} office rose by {i * 3} percent." for i in range(1, 21)
) + " In summary, the committee"
PROMPTS = {
    "prose": "The old lighthouse keeper climbed the stairs every evening because",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n",
    "digits": "Compute: 1234 + 5678 = 6912. Next, 31415 * 2 =",
    "non_ascii": "Les élèves ont visité le musée à Paris. 東京は日本の首都です。 Ça va? 🙂",
    "long": LONG_PROMPT,
    "chat": "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def reference(default_gguf: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    return model.eval(), tokenizer


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_tokens_equal_transformers(name: str, default_model: LoadedModel,
                                          default_tokenizer: Tokenizer, reference) -> None:
    hf_model, hf_tokenizer = reference
    prompt = PROMPTS[name]
    ids = default_tokenizer.encode(prompt)
    assert ids == hf_tokenizer(prompt, add_special_tokens=False).input_ids
    if name == "long":
        assert len(ids) >= 300
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NUM_TOKENS, do_sample=False,
                                   min_new_tokens=NUM_TOKENS, pad_token_id=hf_tokenizer.eos_token_id)
    expected = hf_out[0, len(ids):].tolist()
    out = RequestOutput("golden", prompt, ids, SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True),
                        default_tokenizer)
    SingleProcessGenerator(default_model).generate(out)
    assert len(expected) == NUM_TOKENS
    assert out.token_ids == expected
