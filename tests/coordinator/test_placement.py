"""Where the workers run: the front ends' flags into one `Placement` case, each forbidden combination
refused with its message, and the coordinator's settings checked once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from disagg_cli.cli import app
from disagg_cli.config import EngineConfig, RuntimeConfig
from disagg_cli.coordinator.options import CoordinatorConfig, ServeOptions, ServiceConfig, build_topology
from disagg_cli.coordinator.placement import (
    Colocated,
    Disaggregated,
    FromFile,
    Given,
    InProcess,
    RemoteColocated,
    RemoteDisagg,
    Replicas,
    StartLocal,
    StartOnRay,
    keys_dir,
    placement_from_flags,
)
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec
from disagg_cli.errors import UsageError

TOML = Path("t.toml")
KEYS = Path("keys")


@pytest.mark.parametrize("flags,case", [
    ({}, StartLocal(Disaggregated())),
    ({"prefill_replicas": 2, "decode_replicas": 3}, StartLocal(Disaggregated(Replicas(2, 3)))),
    ({"colocated": True}, StartLocal(Colocated())),
    ({"config": TOML, "decode_replicas": 2}, StartLocal(FromFile(TOML, Replicas(None, 2)))),
    ({"config": TOML, "keys": KEYS}, StartLocal(FromFile(TOML), KEYS)),  # the file may say backend = "ray"
    ({"ray": "auto"}, StartOnRay(Disaggregated(), "auto")),
    ({"ray": "h:6379", "colocated": True, "keys": KEYS}, StartOnRay(Colocated(), "h:6379", KEYS)),
    ({"ray": "auto", "config": TOML, "prefill_replicas": 2}, StartOnRay(FromFile(TOML, Replicas(2, None)), "auto")),
    ({"in_process": True}, InProcess()),
    ({"prefill": ["a:1", "b:1"], "decode": ["c:1"], "keys": KEYS}, RemoteDisagg(("a:1", "b:1"), ("c:1",), KEYS)),
    ({"colocated_addr": "a:1"}, RemoteColocated("a:1")),
    ({"colocated_addr": "a:1", "keys": KEYS}, RemoteColocated("a:1", KEYS)),
])
def test_flags_pick_one_case(flags: dict[str, Any], case: object) -> None:
    assert placement_from_flags(**flags) == case


REMOTE = {"prefill": ["a:1"], "decode": ["b:1"]}


@pytest.mark.parametrize("flags,message", [
    ({"prefill": ["a:1"]}, "--prefill and --decode go together: give at least one address of each"),
    ({"decode": ["a:1"]}, "--prefill and --decode go together: give at least one address of each"),
    ({**REMOTE, "colocated_addr": "c:1"}, "--colocated-addr cannot be combined with --prefill/--decode or --config"),
    ({"config": TOML, "colocated_addr": "c:1"},
     "--colocated-addr cannot be combined with --prefill/--decode or --config"),
    ({"in_process": True, **REMOTE},
     "choose one of --in-process and --prefill/--decode; they pick different places to run"),
    ({"in_process": True, "colocated": True}, "choose one of --in-process and --colocated;"),
    ({"in_process": True, "colocated_addr": "c:1"}, "choose one of --in-process and --colocated;"),
    ({"in_process": True, "config": TOML}, "choose one of --in-process and --config;"),
    ({**REMOTE, "colocated": True}, "choose one of --prefill/--decode and --colocated;"),
    ({**REMOTE, "config": TOML}, "choose one of --prefill/--decode and --config;"),
    ({"colocated": True, "config": TOML}, "choose one of --colocated and --config;"),
    ({"in_process": True, "colocated": True, "config": TOML},
     "choose one of --in-process and --colocated and --config"),
    ({"keys": KEYS}, "--keys is for workers started elsewhere: use it with --prefill/--decode, --colocated-addr or "
                     "--ray"),
    ({"keys": KEYS, "colocated": True}, "--keys is for workers started elsewhere"),
    ({"keys": KEYS, "in_process": True}, "--keys is for workers started elsewhere"),
    ({"ray": "auto", "in_process": True}, "--ray starts the workers as Ray actors: it cannot be combined with "
                                          "--in-process, --prefill/--decode or --colocated-addr"),
    ({"ray": "auto", **REMOTE}, "--ray starts the workers as Ray actors: it cannot be combined"),
    ({"ray": "auto", "colocated_addr": "c:1"}, "--ray starts the workers as Ray actors: it cannot be combined"),
    ({"prefill_replicas": 0}, "--prefill-replicas must be at least 1, got 0"),
    ({"decode_replicas": -1}, "--decode-replicas must be at least 1, got -1"),
    ({"colocated": True, "decode_replicas": 2}, "--decode-replicas size the prefill/decode workers started here; "
                                                "they do not go with --in-process, --prefill/--decode or --colocated"),
    ({"in_process": True, "prefill_replicas": 2}, "--prefill-replicas size the prefill/decode workers started here"),
    ({**REMOTE, "prefill_replicas": 2, "decode_replicas": 2},
     "--prefill-replicas and --decode-replicas size the prefill/decode workers started here"),
    ({"colocated_addr": "c:1", "decode_replicas": 2}, "--decode-replicas size the prefill/decode workers"),
])
def test_flags_that_pick_different_places_are_refused(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as info:
        placement_from_flags(**flags)
    assert message in str(info.value), str(info.value)


def test_the_coordinator_gets_the_placements_keys() -> None:
    assert keys_dir(InProcess()) is None and keys_dir(StartLocal()) is None
    serve = ServeOptions(RemoteColocated("a:1", KEYS), CoordinatorConfig(policy="least-loaded"))
    assert serve.coordinator_config() == CoordinatorConfig(policy="least-loaded", keys_dir=KEYS)
    assert ServeOptions().coordinator_config() == CoordinatorConfig()


@pytest.mark.parametrize("settings,message", [
    ({"policy": "random"}, "--router must be one of round-robin"),
    ({"worker_timeout_s": 0}, "--worker-timeout must be positive, got 0"),
    ({"handshake_timeout_s": -1}, "--connect-timeout must be positive, got -1"),
    ({"disagg_threshold": -1}, "--disagg-threshold takes a token count >= 0 or auto, got -1"),
    ({"disagg_threshold": "sometimes"}, "--disagg-threshold takes a token count >= 0 or auto"),
])
def test_bad_coordinator_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        CoordinatorConfig(**settings)


def test_the_service_starts_what_its_placement_says(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--in-process is for `disagg generate` only"):
        ServiceConfig("m", tmp_path, serve=ServeOptions(InProcess()))
    with pytest.raises(UsageError, match="--kv-codec must be one of"):
        ServeOptions(kv_codec="zip")
    assert ServiceConfig("m", tmp_path, serve=ServeOptions(RemoteDisagg(("a:1",), ("b:1",)))).to_start() is None
    made = ServiceConfig("m", tmp_path, serve=ServeOptions(kv_codec="int8")).to_start()
    assert made is not None and [(w.role, w.kv_codec) for w in made.workers] == [("prefill", "int8"), ("decode", None)]
    colocated = build_topology("m", StartLocal(Colocated()), RuntimeConfig(), EngineConfig())
    assert colocated.is_colocated and colocated.backend == "local"
    # Keys with workers started here as processes: refused once the topology is known (a file may say Ray).
    given = ClusterConfig("m", (WorkerSpec("prefill"), WorkerSpec("decode")))
    with pytest.raises(UsageError, match="the workers started here listen on 127.0.0.1"):
        ServiceConfig("m", tmp_path, serve=ServeOptions(StartLocal(Given(given), KEYS))).to_start()
    on_ray = ServiceConfig("m", tmp_path, serve=ServeOptions(StartOnRay(Given(given), "auto", KEYS))).to_start()
    assert on_ray is not None and on_ray.backend == "ray"


def test_generate_flags_reach_the_placement_and_are_checked() -> None:
    """The CLI builds its `ServeOptions` through `placement_from_flags`: the same case, the same refusals."""
    result = CliRunner().invoke(app, ["generate", "--in-process", "--prefill", "a:1", "--decode", "b:1", "hi"])
    assert result.exit_code != 0
    assert "choose one of --in-process and --prefill/--decode" in str(result.exception) + result.output


def test_worker_restarts_are_a_local_cluster_setting() -> None:
    assert placement_from_flags() == StartLocal(Disaggregated(), None, 5)  # supervision on by default
    assert placement_from_flags(max_worker_restarts=0) == StartLocal(Disaggregated(), None, 0)
    with pytest.raises(UsageError, match="--max-worker-restarts must be 0 \\(never\\) or more, got -1"):
        placement_from_flags(max_worker_restarts=-1)
