"""Topology files: the shipped ones load, a bad one is one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_cli.coordinator.planner import PlannerConfig
from disagg_cli.coordinator.topology import (
    ClusterConfig,
    TopologyError,
    WorkerSpec,
    for_planner,
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


def test_ray_topology_places_by_resources_and_expands_replicas(tmp_path: Path) -> None:
    path = tmp_path / "ray.toml"
    path.write_text('model = "m"\n[cluster]\nbackend = "ray"\naddress = "10.0.0.1:6379"\n[defaults]\nthreads = 2\n'
                    '[[workers]]\nrole = "prefill"\nresources = { prefill = 1 }\n'
                    '[[workers]]\nrole = "decode"\nreplicas = 3\nnum_cpus = 1.5\ndevice = "cuda"\n'
                    'resources = { decode = 1, fast_net = 0.5 }\n')
    config = load_cluster_config(path)
    assert (config.backend, config.ray_address) == ("ray", "10.0.0.1:6379")
    assert [w.role for w in config.workers] == ["prefill", "decode", "decode", "decode"]
    prefill, decode = config.workers[0], config.workers[1]
    assert prefill.ray_options() == {"num_cpus": 2.0, "num_gpus": 0.0, "resources": {"prefill": 1.0}}
    assert decode.ray_options() == {"num_cpus": 1.5, "num_gpus": 1.0, "resources": {"decode": 1.0, "fast_net": 0.5}}
    assert config.counts() == "1 prefill, 3 decode"


def test_shipped_ray_topology_loads() -> None:
    config = load_cluster_config(CONFIGS / "ray-2node.toml")
    assert (config.backend, config.ray_address) == ("ray", "auto")
    assert [(w.role, w.resources, w.quantization) for w in config.workers] == [
        ("prefill", (("prefill", 1.0),), "none"), ("decode", (("decode", 1.0),), "auto")]


@pytest.mark.parametrize("text,fragment", [
    ("[cluster]\nbackend = 'k8s'\n", "[cluster] backend must be one of local, ray, got 'k8s'"),
    ("[cluster]\nnodes = 2\n", "[cluster]: unknown key 'nodes'"),
    ("[cluster]\naddress = 6379\n", "[cluster]: address must be a str"),
    ("[cluster]\nbackend = 'ray'\n[defaults]\ncpus = [0]\n", "cpus (CPU affinity) is for local workers"),
    ("[defaults]\nresources = { CPU = 2 }\n", "give CPUs as num_cpus, not in resources"),
    ("[defaults]\nresources = { decode = 0 }\n", "resources must map names to amounts > 0"),
    ("[defaults]\nresources = { decode = 'one' }\n", "resources must map names to numbers"),
    ("[defaults]\nnum_gpus = -1\n", "num_gpus must be a number >= 0"),
    ("[defaults]\nreplicas = 0\n", "replicas must be a whole number >= 1, got 0"),
    ("[defaults]\nreplicas = 2\nport = 7000\n", "2 replicas cannot share port 7000"),
])
def test_bad_ray_settings_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"model = 'x'\n{text}[[workers]]\nrole = 'prefill'\n[[workers]]\nrole = 'decode'\n")
    with pytest.raises(TopologyError) as info:
        load_cluster_config(path)
    assert "\n" not in str(info.value) and fragment in str(info.value), str(info.value)


def test_replicas_flags_resize_a_role() -> None:
    config = local_topology("m", WorkerSpec("prefill"), num_prefill=1, num_decode=1)
    assert [w.role for w in config.with_replicas("decode", 3).workers] == ["prefill", "decode", "decode", "decode"]
    assert [w.role for w in config.with_replicas("prefill", 2).workers] == ["prefill", "prefill", "decode"]
    mixed = ClusterConfig("m", (WorkerSpec("prefill"), WorkerSpec("decode"), WorkerSpec("decode", dtype="float32")))
    with pytest.raises(UsageError, match="exactly one kind of decode worker in the topology, found 2"):
        mixed.with_replicas("decode", 2)
    fixed = ClusterConfig("m", (WorkerSpec("prefill", port=7000), WorkerSpec("decode")))
    with pytest.raises(UsageError, match="fixed port 7000"):
        fixed.with_replicas("prefill", 2)


def test_serve_options_place_ray_and_replicas(tmp_path: Path) -> None:
    from disagg_cli.config import EngineConfig, RuntimeConfig
    from disagg_cli.coordinator.cluster import LocalCluster
    from disagg_cli.coordinator.options import build_topology
    from disagg_cli.coordinator.placement import StartOnRay, placement_from_flags

    start = placement_from_flags(ray="auto", prefill_replicas=2, decode_replicas=3)
    assert isinstance(start, StartOnRay)
    config = build_topology("m", start, RuntimeConfig(dtype="float32"), EngineConfig())
    assert (config.backend, config.ray_address, config.counts()) == ("ray", "auto", "2 prefill, 3 decode")
    assert all(w.dtype == "float32" for w in config.workers)
    on_ray = placement_from_flags(config=CONFIGS / "ray-2node.toml", ray="10.0.0.1:6379", decode_replicas=2)
    assert isinstance(on_ray, StartOnRay)
    on_file = build_topology("m", on_ray, RuntimeConfig(), EngineConfig())
    assert (on_file.ray_address, on_file.counts()) == ("10.0.0.1:6379", "1 prefill, 2 decode")
    with pytest.raises(UsageError, match="this topology runs on ray"):
        LocalCluster(config, "m")
    with pytest.raises(UsageError, match="--ray starts the workers as Ray actors: it cannot be combined"):
        placement_from_flags(ray="auto", prefill=("h:1",), decode=("h:2",))
    with pytest.raises(UsageError, match="--decode-replicas size the prefill/decode workers started here"):
        placement_from_flags(colocated=True, decode_replicas=2)
    with pytest.raises(UsageError, match="--prefill-replicas must be at least 1"):
        placement_from_flags(prefill_replicas=0)


def test_serve_options_take_a_topology_whole() -> None:
    from disagg_cli.config import EngineConfig, RuntimeConfig
    from disagg_cli.coordinator.options import build_topology
    from disagg_cli.coordinator.placement import Given, StartLocal, StartOnRay

    given = ClusterConfig("m", (WorkerSpec("colocated", dtype="float32", threads=2),))
    # As it is: the flags' runtime, engine and codec settings are for the topologies made from them.
    # (A topology given whole has no file beside it and no replica counts: the type has no room for them.)
    assert build_topology("other", StartLocal(Given(given)), RuntimeConfig(dtype="bfloat16"), EngineConfig(),
                          kv_codec="int8") is given
    on_ray = build_topology("m", StartOnRay(Given(given), "auto"), RuntimeConfig(), EngineConfig())
    assert (on_ray.backend, on_ray.workers) == ("ray", given.workers)


def test_flags_given_beside_a_config_file_win_over_it_and_defaults_leave_it() -> None:
    """`serve --config 2p1d.toml --no-enable-prefix-caching`: every worker of the file runs without the
    cache (the flag was ignored without a word before); flags left at their defaults keep the file's
    values (its float32, one thread, 8,192 tokens of pool)."""
    from disagg_cli.config import EngineConfig, RuntimeConfig
    from disagg_cli.coordinator.options import build_topology
    from disagg_cli.coordinator.placement import placement_from_flags

    start = placement_from_flags(config=CONFIGS / "2p1d.toml")
    as_filed = build_topology("m", start, RuntimeConfig(), EngineConfig())
    assert as_filed == load_cluster_config(CONFIGS / "2p1d.toml", default_model="m")
    assert all((w.dtype, w.threads, w.kv_cache_tokens, w.enable_prefix_caching) == ("float32", 1, 8192, True)
               for w in as_filed.workers)
    flagged = build_topology("m", start, RuntimeConfig(quantization="int8"), EngineConfig(enable_prefix_caching=False))
    assert [w.role for w in flagged.workers] == [w.role for w in as_filed.workers]
    assert all((w.dtype, w.threads, w.kv_cache_tokens, w.enable_prefix_caching, w.quantization) ==
               ("float32", 1, 8192, False, "int8") for w in flagged.workers)


def test_a_planner_makes_its_workers_elastic_with_a_step_bound_from_the_tpot_target() -> None:
    config = ClusterConfig("m", (WorkerSpec("prefill"), WorkerSpec("decode", max_step_ms=30.0)))
    planner = PlannerConfig(mode="slo", slo_tpot_ms=50.0)
    got = for_planner(config, planner.max_step_ms)
    assert [(w.role, w.elastic, w.max_step_ms) for w in got.workers] == [("prefill", True, 40.0),
                                                                         ("decode", True, 30.0)]  # given: kept
