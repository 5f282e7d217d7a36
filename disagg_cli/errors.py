"""Errors a person or a peer meets, each with a message that says what to do.

`DisaggError` and its subclasses are raised at boundaries (files, flags, the network). The CLI
prints their message as one line and exits non-zero; workers turn them into a typed reason on the
wire. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class DisaggError(Exception):
    """An expected failure with a message fit for a person: what was expected, what was found."""

    exit_code = 1


class UsageError(DisaggError):
    """A flag or argument value that cannot be used."""

    exit_code = 2


class ModelNotFoundError(DisaggError):
    """No model by that name or path."""


class ModelFormatError(DisaggError):
    """A file or folder that is not a model we can load."""


class ContextLengthError(DisaggError):
    """A prompt (plus the tokens asked for) longer than the model's context."""

    @classmethod
    def check(cls, num_prompt_tokens: int, max_tokens: int, context_tokens: int) -> None:
        """Raise unless the prompt and the tokens to generate fit the model's context (every path's
        one refusal: the service's, the in-process engine's, the engine benchmark's)."""
        if num_prompt_tokens + max_tokens > context_tokens:
            raise cls(f"this model's context is {context_tokens} tokens, but {num_prompt_tokens + max_tokens} were "
                      f"asked for ({num_prompt_tokens} in the prompt, {max_tokens} to generate); shorten the prompt "
                      "or ask for fewer tokens")


class Interrupted(DisaggError):
    """Ctrl-C: what was in flight has been aborted on its workers."""

    exit_code = 130
