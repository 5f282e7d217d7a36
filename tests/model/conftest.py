"""Fixtures of the model tests: the C kernel, built once per session into a cache of its own, and
the default model on the torch backend (tests/conftest.py's `default_model` is on `--kernel auto`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_cli.config import RuntimeConfig
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.quant.build import KernelUnavailable
from disagg_cli.model.quant.kernels import Kernel, load_kernel


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Kernel:
    try:
        return load_kernel(tmp_path_factory.mktemp("kernel-cache"))
    except KernelUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def default_model_torch(default_gguf: Path) -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 on the CPU, 2 threads, `--kernel torch`."""
    return load_model(default_gguf, RuntimeConfig(dtype="float32", threads=2, kernel="torch"))


@pytest.fixture(scope="session", params=["c", "torch"])
def model_per_kernel(request: pytest.FixtureRequest, kernel: object) -> LoadedModel:
    """The default model on each backend: `default_model` (c where it builds) and `--kernel torch`."""
    lm: LoadedModel = request.getfixturevalue("default_model" if request.param == "c" else "default_model_torch")
    assert lm.backend.name == request.param
    return lm
