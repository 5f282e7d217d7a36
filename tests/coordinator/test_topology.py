"""Topology files: the shipped ones load, a bad one is one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_cli.coordinator.topology import (
    ClusterConfig,
    TopologyError,
    WorkerSpec,
    load_cluster_config,
    local_topology,
)
from disagg_cli.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,roles", [
    ("local", ["prefill", "decode"]),
    ("2p1d", ["prefill", "prefill", "decode"]),
    ("1p2d", ["prefill", "decode", "decode"]),
    ("2p2d", ["prefill", "prefill", "decode", "decode"]),
])
def test_shipped_topologies_load(name: str, roles: list[str]) -> None:
    config = load_cluster_config(CONFIGS / f"{name}.toml")
    assert config.model == "smollm2-135m-instruct"
    assert [w.role for w in config.workers] == roles
    assert all(w.dtype == "float32" and w.port == 0 and w.threads == 1 for w in config.workers)


def test_defaults_apply_and_workers_override(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('model = "/m.gguf"\n[defaults]\ndtype = "bfloat16"\nblock_size = 32\n'
                    '[[workers]]\nrole = "prefill"\nport = 7001\ncpus = [0, 1]\nkv_codec = "int8"\n'
                    '[[workers]]\nrole = "decode"\ndtype = "float32"\nblock_size = 16\nkv_cache_tokens = 512\n')
    config = load_cluster_config(path)
    assert config.workers == (
        WorkerSpec("prefill", port=7001, dtype="bfloat16", block_size=32, cpus=(0, 1), kv_codec="int8"),
        WorkerSpec("decode", dtype="float32", block_size=16, kv_cache_tokens=512),
    )
    assert not config.is_colocated


def test_model_falls_back_to_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[[workers]]\nrole = "colocated"\n')
    config = load_cluster_config(path, default_model="smollm2-135m-instruct")
    assert config.model == "smollm2-135m-instruct" and config.is_colocated


@pytest.mark.parametrize("text,fragment", [
    ("model = 'x'\n[[workers]]\nrole = 'prefill'\n", "at least one prefill and one decode"),
    ("model = 'x'\n[[workers]]\nrole = 'prefil'\n", "worker 0 (prefil): worker role must be one of"),
    ("model = 'x'\n[[workers]]\nrole = 'prefill'\nthreads = '2'\n", "worker 0 (prefill): threads must be a int"),
    ("model = 'x'\n[[workers]]\nrole = 'prefill'\ngpus = 1\n", "unknown key(s) ['gpus']"),
    ("model = 'x'\n[[workers]]\nrole = 'decode'\nkv_codec = 'lz4'\n", "kv_codec is chosen by the prefill"),
    ("model = 'x'\n[[workers]]\nrole = 'prefill'\nkv_codec = 'zstd'\n", "kv_codec must be one of none, lz4"),
    ("model = 'x'\nworkers = 3\n", "expected one or more [[workers]] tables"),
    ("model = 'x'\n[[workers]\n", "is not valid TOML"),
    ("model = 'x'\n[[workers]]\nrole = 'prefill'\nport = 7000\n[[workers]]\nrole = 'decode'\nport = 7000\n",
     "two workers share an address"),
])
def test_bad_file_is_one_line_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TopologyError) as info:
        load_cluster_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and fragment in message, message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="no such file"):
        load_cluster_config(tmp_path / "nope.toml")


def test_local_topology_is_one_prefill_one_decode() -> None:
    config = local_topology("m", WorkerSpec("prefill", kv_codec="lz4"))
    assert [(w.role, w.kv_codec) for w in config.workers] == [("prefill", "lz4"), ("decode", None)]
    assert local_topology("m", WorkerSpec("prefill"), colocated=True).is_colocated
    with pytest.raises(UsageError):
        ClusterConfig("m", ())
