"""A prompt's text and token ids, checked against the model: the service's tokenizer and context.

`PromptText` tokenizes (refusing a text too long for the context before it spends seconds on it),
detokenizes, renders chat, and checks ids and lengths; every refusal is an `InvalidPromptError` or a
`ContextLengthError` a front end turns into a 400. Pure: no sockets, no workers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.refusals import InvalidPromptError
from disagg_cli.errors import ContextLengthError
from disagg_cli.model.tokenizer import Tokenizer

# A normalizer may merge a few characters into one (NFC composes a base and its marks), so a
# token covers at most this many times its own length of the text as given.
MAX_CHARS_MERGED_BY_NORMALIZER = 4


class PromptText:
    def __init__(self, tokenizer: Tokenizer, context_limit: int | None) -> None:
        self.tokenizer = tokenizer
        self.context_limit = context_limit or sys.maxsize
        self.max_prompt_chars = sys.maxsize
        if context_limit:
            # No token covers more text than its own (byte-level) string: a longer text is refused
            # at once, not after seconds of tokenizing (a 1M-token prompt took 12 s).
            longest = max(map(len, tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)
            self.max_prompt_chars = context_limit * longest * MAX_CHARS_MERGED_BY_NORMALIZER

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The model's token ids of `text`; BOS first where the model wants one, unless told not to.
        Tokenizing releases the GIL, so a caller on the event loop hands this to a thread."""
        if len(text) > self.max_prompt_chars:
            raise InvalidPromptError(f"the prompt is {len(text)} characters long, more than this model's context "
                                     f"of {self.context_limit} tokens can hold ({self.max_prompt_chars} characters "
                                     "at most, whatever they tokenize to); shorten it")
        tok = self.tokenizer
        # tokenizers' `encode` (under `Tokenizer.encode`) holds the GIL to the end; `encode_batch` lets it go.
        ids: list[int] = tok.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and tok.add_bos and tok.bos_token_id is not None:
            ids.insert(0, tok.bos_token_id)
        return ids

    def detokenize(self, token_ids: Sequence[int]) -> str:
        self.check_ids(token_ids)
        return self.tokenizer.decode(list(token_ids))

    def check_ids(self, token_ids: Sequence[int]) -> None:
        vocab = self.tokenizer.vocab_size
        bad = [i for i in token_ids if not 0 <= i < vocab]
        if bad:
            raise InvalidPromptError(f"token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's own chat template applied to `messages`."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def validate(self, token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise unless these prompt ids can be served with `params`."""
        if not token_ids:
            raise InvalidPromptError("the prompt is empty; give at least one token")
        self.check_ids(token_ids)
        ContextLengthError.check(len(token_ids), params.max_tokens, self.context_limit)
