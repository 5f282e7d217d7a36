"""Tokenizer: ids equal the reference's on the real default model, round trips, streaming text,
chat templates, and tiny tokenizers written in `tmp_path` (tokenizer.json folders and GGUF files)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from disagg_cli.errors import ModelFormatError, ModelNotFoundError, UsageError
from disagg_cli.model.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 'quoted' and \"double-quoted\"; don't I'LL we've.",
    "def f(x):\n    if x > 0:\n\treturn [i ** 2 for i in range(x)]  # tab, then spaces\n",
    "Pi is 3.14159, a million is 1,000,000 (or 1.000.000), call 555-0123 in 2024; 10½ x²³.",
    "café naïve Ærøskøbing — 日本語のテキスト, 中文 한국어 😀👍🏽 👨‍👩‍👧 مرحبا بالعالم שלום",
    "a  b   c\n\n\n  \t\t \r\n end   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    " ² ³ ١٢٣ ２０２４",  # numerals after a space: where transformers' GGUF tokenizer goes wrong
    "",
]
# Text in which a non-ASCII numeral follows a space. SmolLM2's own tokenizer.json splits digits off
# first (Digits(individual_digits=True), as llama.cpp's `smollm` pre-type does), so " ²" is "Ġ" + "Â²".
# transformers builds a GGUF `smollm` vocabulary with plain GPT-2 splitting and gets "ĠÂ" + "²".
# (ASCII digits agree either way: the vocabulary has no "Ġ1"-like merges.)
REFERENCE_DIFFERS = {TEXTS[6]}
SYSTEM_USER = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2? Answer in one word, über-kurz 😀."},
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smollm(default_tokenizer: Tokenizer) -> Tokenizer:
    """The default model's tokenizer (conftest loads it once), under a shorter name."""
    return default_tokenizer


@pytest.fixture(scope="module")
def reference(hf_tokenizer):  # type: ignore[no-untyped-def]
    """The transformers tokenizer (conftest loads it once per session, for the golden tests too)."""
    return hf_tokenizer


# --- the real default model ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", [t for t in TEXTS if t not in REFERENCE_DIFFERS])
def test_ids_equal_reference(smollm: Tokenizer, reference, text: str) -> None:
    assert smollm.encode(text) == reference.encode(text, add_special_tokens=False)
    assert smollm.encode(text) == reference(text)["input_ids"]  # SmolLM2 adds no BOS


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_reference_given_smollm_pre_tokenizer(smollm: Tokenizer, reference, text: str) -> None:
    real = tokenizers.Tokenizer.from_str(reference.backend_tokenizer.to_str())
    real.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert smollm.encode(text) == real.encode(text, add_special_tokens=False).ids


def test_numerals_are_split_from_the_space_before_them(smollm: Tokenizer) -> None:
    space, two = smollm.token_to_id("Ġ"), smollm.token_to_id("Â²")
    assert smollm.encode(" ²") == [space, two]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(smollm: Tokenizer, text: str) -> None:
    assert smollm.decode(smollm.encode(text), skip_special_tokens=False) == text


def test_special_tokens_encode_whole_and_are_skipped_on_decode(smollm: Tokenizer) -> None:
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smollm.token_to_id("<|im_start|>") == 1
    assert ids[-1] == smollm.token_to_id("<|im_end|>") == 2
    assert smollm.decode(ids) == "user\nhi"


def test_bos_and_eos(smollm: Tokenizer) -> None:
    assert smollm.vocab_size == 49152
    assert smollm.bos_token_id == 1
    # Declared EOS is <|im_end|>; <|endoftext|> is in the vocabulary but not in the template.
    assert smollm.eos_token_ids == frozenset({2})
    assert smollm.encode("hi")[0] != 1  # add_bos_token is false in the file
    assert smollm.encode("hi", add_bos=True)[0] == 1


@pytest.mark.slow
def test_chat_template_equals_reference(smollm: Tokenizer, reference) -> None:
    ours = smollm.apply_chat_template(SYSTEM_USER)
    theirs = reference.apply_chat_template(SYSTEM_USER, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert smollm.encode(ours) == reference(theirs)["input_ids"]
    without_system = SYSTEM_USER[1:]
    assert smollm.apply_chat_template(without_system, add_generation_prompt=False) == (
        reference.apply_chat_template(without_system, tokenize=False, add_generation_prompt=False)
    )


def test_detokenizer_holds_back_half_characters(smollm: Tokenizer) -> None:
    ids = smollm.encode("ok 😀👨‍👩‍👧 日本")
    assert any("\ufffd" in smollm.decode([i]) for i in ids)  # some tokens really are half a character
    detok = IncrementalDetokenizer(smollm)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == "ok 😀👨‍👩‍👧 日本"


def test_detokenizer_continues_a_prompt(smollm: Tokenizer) -> None:
    prompt_ids, output_ids = smollm.encode("Say hi:"), smollm.encode(" hi there 😀")
    detok = IncrementalDetokenizer(smollm, prompt_ids)
    text = "".join(detok.push(i) for i in output_ids) + detok.flush()
    assert text == " hi there 😀"


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40))
def test_detokenizer_matches_full_decode(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text)
    detok = IncrementalDetokenizer(smollm)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == smollm.decode(ids)
    # SmolLM2's vocabulary has no token for 21 of the 256 bytes (some control characters, lead
    # bytes 0xF1/0xF2 of U+40000..U+BFFFF, bytes invalid in UTF-8); BPE drops those, as the
    # model's own tokenizer does. Text made of the other characters must survive exactly.
    if all(smollm.decode(smollm.encode(c), skip_special_tokens=False) == c for c in set(text)):
        assert smollm.decode(ids, skip_special_tokens=False) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces)


# --- tiny tokenizers written here ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bpe() -> tokenizers.Tokenizer:
    """A byte-level BPE trained in memory on a few lines, with ChatML special tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t for t in TEXTS if t] * 20, trainer=trainer)
    return tok


def test_tokenizer_json_folder(tmp_path: Path, tiny_bpe: tokenizers.Tokenizer) -> None:
    tiny_bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": CHAT_TEMPLATE,
                "bos_token": None,
                "eos_token": {"content": "<|im_end|>", "special": True},
                "add_bos_token": False,
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id is None
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.vocab_size == tiny_bpe.get_vocab_size()
    for text in TEXTS:
        assert tok.encode(text) == tiny_bpe.encode(text).ids
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    rendered = tok.apply_chat_template(SYSTEM_USER)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tok.encode(rendered).count(1) == 3  # each <|im_start|> is one token


def test_tokenizer_json_post_processor_decides_bos(tmp_path: Path, tiny_bpe: tokenizers.Tokenizer) -> None:
    with_bos = tokenizers.Tokenizer.from_str(tiny_bpe.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    with_bos.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi")[0] == 0
    assert tok.encode("hi") == with_bos.encode("hi").ids
    assert tok.encode("hi", add_bos=False) == tiny_bpe.encode("hi").ids
    with pytest.raises(UsageError, match="has no chat template; drop --chat"):
        tok.apply_chat_template(SYSTEM_USER)


def _write_gguf(path: Path, tok: tokenizers.Tokenizer | None, model: str = "gpt2", pre: str = "gpt2") -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    if tok is not None:
        spec = json.loads(tok.to_str())["model"]
        tokens = sorted(spec["vocab"], key=spec["vocab"].__getitem__)
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
        writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(0)
        writer.add_chat_template(CHAT_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_tokenizer_metadata(tmp_path: Path, tiny_bpe: tokenizers.Tokenizer) -> None:
    tok = load_tokenizer(_write_gguf(tmp_path / "tiny.gguf", tiny_bpe))
    # EOS: the declared <|endoftext|>, and <|im_end|> because the template closes turns with it.
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.bos_token_id == 1
    for text in TEXTS:
        assert tok.encode(text) == tiny_bpe.encode(text).ids
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>user") == [1, *tiny_bpe.encode("user").ids]
    expected = "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\n"
    assert tok.apply_chat_template(SYSTEM_USER).startswith(expected)


SPLITS = {  # how each family splits "I'LL 12345  world\n\n", worked out by hand from its pattern
    "llama-bpe": ["I", "'LL", "Ġ", "123", "45", "Ġ", "Ġworld", "ĊĊ"],
    "qwen2": ["I", "'LL", "Ġ", "1", "2", "3", "4", "5", "Ġ", "Ġworld", "ĊĊ"],
    "smollm": ["I", "'", "LL", "Ġ", "1", "2", "3", "4", "5", "Ġ", "Ġworld", "ĊĊ"],
    "gpt2": ["I", "'", "LL", "Ġ12345", "Ġ", "Ġworld", "ĊĊ"],
}


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_gguf_pre_tokenizers(tmp_path: Path, tiny_bpe: tokenizers.Tokenizer, pre: str) -> None:
    tok = load_tokenizer(_write_gguf(tmp_path / "tiny.gguf", tiny_bpe, pre=pre))
    pieces = tok.backend.pre_tokenizer.pre_tokenize_str("I'LL 12345  world\n\n")
    assert [piece for piece, _ in pieces] == SPLITS[pre]
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_gguf_without_tokenizer_is_refused(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bare.gguf", None)
    with pytest.raises(ModelFormatError, match="bare.gguf has no tokenizer"):
        load_tokenizer(path)


@pytest.mark.parametrize(("model", "pre"), [("llama", "default"), ("gpt2", "made-up")])
def test_gguf_unsupported_tokenizer_is_refused(
    tmp_path: Path, tiny_bpe: tokenizers.Tokenizer, model: str, pre: str
) -> None:
    path = _write_gguf(tmp_path / "other.gguf", tiny_bpe, model=model, pre=pre)
    with pytest.raises(ModelFormatError, match=f"tokenizer model '{model}' with pre-tokenizer '{pre}'"):
        load_tokenizer(path)


def test_not_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.gguf").write_text("not a gguf file")
    with pytest.raises(ModelFormatError, match="notes.gguf is not a GGUF file"):
        load_tokenizer(tmp_path / "notes.gguf")
    with pytest.raises(ModelFormatError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no model at"):
        load_tokenizer(tmp_path / "missing.gguf")


def test_chat_template_helpers(tmp_path: Path, tiny_bpe: tokenizers.Tokenizer) -> None:
    tiny_bpe.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first, please') }}{% endif %}"
        "{{ strftime_now('%Y') }}\n{{ messages | tojson }}\n{{ eos_token }}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "<|im_end|>"})
    )
    tok = load_tokenizer(tmp_path)
    year, as_json, eos = tok.apply_chat_template(SYSTEM_USER).split("\n")
    assert year.isdigit() and len(year) == 4
    assert eos == "<|im_end|>"
    assert json.loads(as_json) == SYSTEM_USER and "😀" in as_json  # not ASCII- or HTML-escaped
    with pytest.raises(UsageError, match="system first, please"):
        tok.apply_chat_template(SYSTEM_USER[1:])
