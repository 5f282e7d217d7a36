"""Text ⇄ token ids for a model, from a GGUF file's metadata or a Hugging Face `tokenizer.json`.

Owns: building a `tokenizers.Tokenizer` that splits text the way the model family's own tokenizer
does, BOS/EOS policy, chat-template rendering (sandboxed jinja2), and incremental detokenization
for streaming. Loads no weights, so the coordinator can tokenize without a model in memory.

End-of-sequence ids (`Tokenizer.eos_token_ids`) are the union of
  1. the declared EOS (`tokenizer.ggml.eos_token_id`, or `eos_token` in `tokenizer_config.json`),
  2. GGUF's explicit end-of-turn ids (`tokenizer.ggml.eot_token_id`, `eom_token_id`),
  3. `generation_config.json`'s `eos_token_id` (an int or a list),
  4. each known chat-end token (`<|im_end|>`, `<|eot_id|>`, …) that is in the vocabulary AND written
     literally in the chat template: the template then closes turns with it, so a chat model ends
     its answer with it even when the file declares another EOS. A chat-end token in neither the
     template nor the config is not added: a base model may emit it mid-text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from disagg_cli.errors import ModelFormatError, ModelNotFoundError, UsageError
from disagg_cli.model.gguf_file import read_gguf

# Split patterns as published with each family's tokenizer.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (  # Llama-3's pattern, but one digit per piece
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")
_GGUF_PRE = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "llama-v3", "qwen2", "deepseek-r1-qwen")


def _gguf_pipeline(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None, bool]:
    """(pre-tokenizer, normalizer, BPE ignore_merges) for `tokenizer.ggml.pre`, as each family's own
    tokenizer.json sets them: SmolLM splits digits one by one first, Qwen2 NFC-normalizes, Llama-3
    looks a whole word up in the vocabulary before merging."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's pattern built in
    bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated")
        return pre_tokenizers.Sequence([split, bytes_only]), None, True
    if pre in ("qwen2", "deepseek-r1-qwen"):
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated")
        return pre_tokenizers.Sequence([split, bytes_only]), normalizers.NFC(), False
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]), None, False
    return gpt2, None, False


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A model's tokenizer: encode/decode, BOS/EOS ids and the chat template. Made by `load_tokenizer`."""

    backend: tokenizers.Tokenizer = field(repr=False)  # its repr is the whole vocabulary
    name: str  # what messages call the model
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None  # the declared EOS, which chat templates call `eos_token`
    eos_token_ids: frozenset[int]  # every id that ends generation (see the module docstring)
    add_bos: bool  # whether `encode` puts BOS first unless told otherwise
    chat_template: str | None = field(repr=False)

    def __post_init__(self) -> None:
        assert self.eos_token_id is None or self.eos_token_id in self.eos_token_ids
        assert not self.add_bos or self.bos_token_id is not None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        # The backend's post-processor is bypassed: BOS is our decision, made once at load time.
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise UsageError(f"model {self.name} has no chat template; drop --chat")

        def text(token_id: int | None) -> str:
            return "" if token_id is None else self.backend.id_to_token(token_id) or ""

        try:
            return str(
                self._template.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=text(self.bos_token_id),
                    eos_token=text(self.eos_token_id),
                )
            )
        except TemplateError as e:
            raise UsageError(f"model {self.name}'s chat template refused the conversation: {e}") from e

    @cached_property
    def _template(self) -> Template | None:
        if self.chat_template is None:
            return None
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        # HF templates call these; jinja2's own tojson escapes HTML, which a prompt must not.
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Holds a short window of ids: up to `read_offset`, the last ones already emitted (context, so
    that decoders which depend on neighbours, like a leading space or a byte sequence, decode as a
    full decode would); after it, those not yet emitted. Each step decodes only this window, and
    text is emitted once it no longer ends in half a character.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids or [])[-5:]  # a little context is all the window needs
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[: self._read_offset])
        new_text = self._decode(self._ids)
        # A trailing U+FFFD is (usually) a character whose remaining bytes are still to come.
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        del self._ids[: self._read_offset]  # what was new becomes the next window's context
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a `.gguf` file or of a Hugging Face checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"no model at {path}: expected a .gguf file or a folder with tokenizer.json")
    if path.is_dir():
        return _load_hf_folder(path)
    return _load_gguf(path)


def _chat_end_ids(vocab_lookup: Callable[[str], int | None], template: str | None) -> set[int]:
    found = [vocab_lookup(t) for t in _CHAT_END_TOKENS if template is not None and t in template]
    return {i for i in found if i is not None}


def _load_gguf(path: Path) -> Tokenizer:
    metadata = read_gguf(path).metadata  # raises ModelFormatError naming what it found

    def meta(key: str) -> Any:
        return metadata.get(key)

    kind = meta("tokenizer.ggml.model")
    if kind is None:
        raise ModelFormatError(
            f"{path} has no tokenizer (no tokenizer.ggml.model key); supported: a GGUF with a 'gpt2' "
            "(byte-level BPE) tokenizer, or a folder with tokenizer.json"
        )
    pre = meta("tokenizer.ggml.pre") or "default"
    if kind != "gpt2" or pre not in _GGUF_PRE:
        raise ModelFormatError(
            f"{path} has tokenizer model {kind!r} with pre-tokenizer {pre!r}; supported: model 'gpt2' "
            f"with pre-tokenizer one of {', '.join(sorted(_GGUF_PRE))} (or use the HF checkpoint folder)"
        )
    tokens: list[str] = meta("tokenizer.ggml.tokens")
    merges: list[str] = meta("tokenizer.ggml.merges") or []
    token_types: list[int] = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise ModelFormatError(f"{path} lists {len(tokens)} tokens but {len(token_types)} token types")

    pre_tokenizer, normalizer, ignore_merges = _gguf_pipeline(pre)
    vocab = {token: i for i, token in enumerate(tokens)}
    # Byte-level tokens spell a space as "Ġ", so a merge line splits on its one real space.
    pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
    backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer, backend.normalizer = pre_tokenizer, normalizer
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, …) must match whole in rendered chat text, and user-defined
    # ones (<think>, …) too; they keep their ids because they are already in the vocabulary.
    # llama.cpp token types: 3 is control, 4 user-defined.
    typed = [(t, k) for t, k in zip(tokens, token_types, strict=True) if t]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == 4])

    template = meta("tokenizer.chat_template")
    eos, eot, eom = (meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
    bos = meta("tokenizer.ggml.bos_token_id")
    add_bos = meta("tokenizer.ggml.add_bos_token")
    eos_ids = {int(i) for i in (eos, eot, eom) if i is not None} | _chat_end_ids(vocab.get, template)
    return Tokenizer(
        backend,
        name=path.name,
        vocab_size=len(tokens),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
        eos_token_ids=frozenset(eos_ids),
        # llama.cpp's default for a byte-level vocabulary that does not say: no BOS.
        add_bos=bool(add_bos) and bos is not None,
        chat_template=template,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_hf_folder(path: Path) -> Tokenizer:
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ModelFormatError(
            f"{path} has no tokenizer.json (found: {found}); supported: a folder with tokenizer.json "
            "or a .gguf file"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise ModelFormatError(f"{tokenizer_file} is not a tokenizers JSON file ({e})") from e
    config = _read_json(path / "tokenizer_config.json")
    generation = _read_json(path / "generation_config.json")

    template = config.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = path / "chat_template.jinja"  # newer checkpoints keep the template beside the config
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    template = template if isinstance(template, str) else None

    def lookup(token: str | None) -> int | None:
        return None if token is None else backend.token_to_id(token)

    bos = lookup(_token_text(config.get("bos_token")))
    gen_eos = generation.get("eos_token_id")
    gen_eos_ids = [int(i) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if i is not None]
    eos = lookup(_token_text(config.get("eos_token")))
    eos = eos if eos is not None else next(iter(gen_eos_ids), None)
    eos_ids = {*gen_eos_ids, *([] if eos is None else [eos])}
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:
        # No flag: the tokenizer.json post-processor decides (Llama-3 adds BOS there); ask it.
        add_bos = backend.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return Tokenizer(
        backend,
        name=path.name,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=frozenset(eos_ids | _chat_end_ids(backend.token_to_id, template)),
        add_bos=add_bos and bos is not None,
        chat_template=template,
    )
