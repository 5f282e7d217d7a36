"""The one table of worker settings: every command that starts workers or is one has the same options
with the same defaults, a topology's workers default to them too, and the values reach the command."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from disagg_cli.bench.runs import ServeBenchOptions
from disagg_cli.bench.serve import topologies
from disagg_cli.cli import app
from disagg_cli.cli_options import (
    COORDINATOR_PANEL,
    PLACEMENT_PANEL,
    PLANNER_PANEL,
    placement_options,
    worker_options,
)
from disagg_cli.config import EngineConfig, RuntimeConfig
from disagg_cli.coordinator.options import ServeOptions, build_topology
from disagg_cli.coordinator.placement import StartLocal
from disagg_cli.coordinator.planner import PlannerConfig
from disagg_cli.coordinator.topology import WorkerSpec
from disagg_cli.errors import UsageError
from disagg_cli.worker_settings import DEFAULTS, SETTING_NAMES, WORKER_SETTINGS, WorkerSettings

FRONT_ENDS = (("generate",), ("serve",), ("bench", "serve"))
WORKERS = {("prefill-worker",): "prefill", ("decode-worker",): "decode", ("colocated-worker",): "colocated"}


def _command(path: tuple[str, ...]) -> Any:
    command: Any = typer.main.get_command(app)  # typer may vendor its own click: no isinstance checks
    for name in path:
        command = command.commands[name]
    return command


def _settings_of(path: tuple[str, ...]) -> dict[str, object]:
    return {p.name: p.default for p in _command(path).params if p.name in SETTING_NAMES}


@pytest.mark.parametrize("path", FRONT_ENDS, ids=" ".join)
def test_front_ends_take_every_worker_setting_with_the_table_default(path: tuple[str, ...]) -> None:
    assert _settings_of(path) == DEFAULTS


@pytest.mark.parametrize("path", list(WORKERS), ids=" ".join)
def test_worker_commands_take_their_role_settings_with_the_table_default(path: tuple[str, ...]) -> None:
    role = WORKERS[path]
    expected = {s.name: DEFAULTS[s.name] for s in WORKER_SETTINGS if role in s.roles}
    assert _settings_of(path) == expected
    # The pool default that drifted (256 MiB for prefill-worker and topologies, 512 elsewhere).
    assert _settings_of(path)["kv_cache_memory_mb"] == EngineConfig().kv_cache_memory_mb == 512.0


def test_topology_workers_default_to_the_table() -> None:
    spec = WorkerSpec("decode")
    assert {name: getattr(spec, name) for name in SETTING_NAMES} == DEFAULTS
    assert spec.settings() == WorkerSettings()
    assert spec.runtime() == RuntimeConfig() and spec.engine() == EngineConfig()


def test_bench_serve_clusters_get_the_same_workers_as_generate() -> None:
    """`bench serve`'s default cluster and `generate`'s (same flags) start the same worker settings."""
    generate = build_topology("m", StartLocal(), RuntimeConfig(), EngineConfig())
    bench = topologies(ServeBenchOptions(model="m", cache_dir=Path(".")))["disagg"]
    assert [w.role for w in bench.workers] == [w.role for w in generate.workers] == ["prefill", "decode"]
    assert [w.settings() for w in bench.workers] == [w.settings() for w in generate.workers]
    assert bench.workers[1].engine().kv_cache_memory_mb == 512.0


def test_flags_reach_the_command_as_one_worker_settings() -> None:
    got: list[WorkerSettings] = []
    probe = typer.Typer()

    @probe.command()
    @worker_options()
    def run(name: str = "x", *, settings: WorkerSettings) -> None:
        got.append(settings)

    result = CliRunner().invoke(probe, ["--kv-cache-memory-mb", "3", "--no-enable-prefix-caching", "--threads", "1",
                                        "--kv-codec", "int8", "--dtype", "float32", "--kv-cache-dtype", "bfloat16",
                                        "--name", "y"])
    assert result.exit_code == 0, result.output
    assert got == [WorkerSettings(kv_cache_memory_mb=3.0, enable_prefix_caching=False, threads=1, kv_codec="int8",
                                  dtype="float32", kv_cache_dtype="bfloat16")]
    assert got[0].runtime().kv_cache_dtype == "bfloat16"


def test_kv_cache_dtype_is_one_row_with_the_runtime_default() -> None:
    assert [s.name for s in WORKER_SETTINGS].count("kv_cache_dtype") == 1
    assert DEFAULTS["kv_cache_dtype"] == RuntimeConfig().kv_cache_dtype == "auto"
    assert WorkerSpec("prefill", kv_cache_dtype="float32").runtime().kv_cache_dtype == "float32"
    with pytest.raises(UsageError, match="--kv-cache-dtype must be one of auto, float32, bfloat16, float16"):
        WorkerSettings(kv_cache_dtype="int8")


def test_every_setting_has_help_and_a_panel() -> None:
    assert len({s.name for s in WORKER_SETTINGS}) == len(WORKER_SETTINGS) == len(fields(WorkerSettings))
    assert all(s.help.endswith((".", ").")) and s.panel for s in WORKER_SETTINGS)


def test_generate_and_serve_share_the_placement_and_coordinator_options() -> None:
    def options(path: tuple[str, ...]) -> dict[str, object]:
        return {p.name: p.default for p in _command(path).params
                if getattr(p, "rich_help_panel", None) in (PLACEMENT_PANEL, COORDINATOR_PANEL)}

    generate, serve = options(("generate",)), options(("serve",))
    assert generate.pop("in_process") is False  # generate alone can run in its own process
    assert generate == serve
    assert {"prefill", "decode", "config", "ray", "router", "worker_timeout", "request_timeout"} <= set(serve)


def test_planner_options_come_from_one_table() -> None:
    def options(path: tuple[str, ...]) -> dict[str, object]:
        return {p.name: p.default for p in _command(path).params
                if getattr(p, "rich_help_panel", None) == PLANNER_PANEL}

    d = PlannerConfig()
    expected = {"planner": d.mode, "slo_ttft_ms": d.slo_ttft_ms, "slo_tpot_ms": d.slo_tpot_ms,
                "planner_interval": d.interval_s}
    assert options(("generate",)) == options(("bench", "serve")) == expected
    assert options(("serve",)) == expected | {"admission": d.admission}  # refusing by load is a server's


def test_planner_flags_reach_the_command() -> None:
    seen: list[ServeOptions] = []
    probe = typer.Typer()

    @probe.command()
    @placement_options(admission=True)
    def run(*, serve: ServeOptions) -> None:
        seen.append(serve)

    result = CliRunner().invoke(probe, ["--planner", "slo", "--slo-ttft-ms", "500", "--slo-tpot-ms", "40",
                                        "--planner-interval", "1", "--admission", "slo"])
    assert result.exit_code == 0, result.output
    assert seen[0].planner == PlannerConfig(mode="slo", slo_ttft_ms=500, slo_tpot_ms=40, interval_s=1,
                                            admission="slo")
    result = CliRunner().invoke(probe, ["--planner", "maybe"])
    assert result.exit_code != 0 and "--planner must be one of off, slo" in str(result.exception)
