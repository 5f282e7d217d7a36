"""The prompts the real-model golden tests share, and the transformers reference for them.

transformers loads the same GGUF file with its own dequantizer and its own Llama; it is the
reference, installed only as a test dependency. Its greedy continuations are computed once per
session (`hf_greedy` in tests/conftest.py) for every prompt here, `REFERENCE_TOKENS` long; a test
that needs fewer takes a prefix. That prefix is exactly what a shorter `generate` would return:
decoding is greedy and `min_new_tokens` equals the length asked for, so EOS is masked on every
step either way and step i sees the same logits in both runs.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_TOKENS = 32
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


def _parse_gguf_once() -> None:
    """Make transformers parse the GGUF file once per process, not three times.

    transformers' GGUF loading reads the whole file with gguf-py's `GGUFReader` for the config,
    again for the tokenizer and again for the weights (~17 s each here: the tokenizer's 98k strings
    become numpy memmap slices one by one), and builds gguf-py's tensor-name map once per module
    (397 times, ~16 s). Both are pure functions of their arguments and used read-only, so the
    reference shares one of each; its numbers are untouched (same file, same code, same math).
    """
    import functools

    import gguf

    if getattr(gguf, "_disagg_parse_once", False):
        return
    readers: dict[str, gguf.GGUFReader] = {}
    reader_class = gguf.GGUFReader

    def reader(path: str | Path, mode: str = "r") -> gguf.GGUFReader:
        key = str(Path(path).resolve())
        if mode != "r":
            return reader_class(path, mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment, misc]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    gguf._disagg_parse_once = True  # type: ignore[attr-defined]


def load_hf_tokenizer(gguf: Path):  # type: ignore[no-untyped-def]
    import transformers

    _parse_gguf_once()

    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def hf_greedy_tokens(gguf: Path, hf_tokenizer) -> dict[str, tuple[list[int], list[int]]]:  # type: ignore[no-untyped-def]
    """name → (the prompt's ids by the transformers tokenizer, its greedy float32 continuation)."""
    import torch
    import transformers

    _parse_gguf_once()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for name, prompt in PROMPTS.items():
            ids = hf_tokenizer(prompt, add_special_tokens=False).input_ids
            gen = model.generate(torch.tensor([ids]), max_new_tokens=REFERENCE_TOKENS, do_sample=False,
                                 min_new_tokens=REFERENCE_TOKENS, pad_token_id=hf_tokenizer.eos_token_id)
            out[name] = (list(ids), gen[0, len(ids):].tolist())
    return out
