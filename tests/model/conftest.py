"""Fixtures of the model tests: the C kernel, built once per session into a cache of its own."""

from __future__ import annotations

import pytest

from disagg_cli.model.quant.kernels import Kernel, load_kernel


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Kernel:
    k = load_kernel(tmp_path_factory.mktemp("kernel-cache"))
    if not k.available:
        pytest.skip(k.reason)
    return k
