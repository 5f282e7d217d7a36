"""What a service is started with, and what it reads of the model before any of its workers starts.

`ServeOptions` is a front end's `Placement` (where the workers run, `coordinator/placement.py`) with
the coordinator's settings, a `CoordinatorConfig` (timeouts, deadlines, routing policy, keys), and
`ServiceConfig` is all a service is started with; `build_topology` makes the topology to start for
a placement that starts workers, `worker_address` reads an address flag, and `context_length` reads
the model's context from its metadata (no weights). Used by `coordinator/service.py`, which every
front end (`generate`, `bench serve`, `serve`) goes through. Pure: nothing is started here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from disagg_cli.config import Deadlines, EngineConfig, RuntimeConfig
from disagg_cli.coordinator.placement import (
    Colocated,
    Disaggregated,
    FromFile,
    Given,
    InProcess,
    Placement,
    Replicas,
    StartLocal,
    StartOnRay,
    keys_dir,
)
from disagg_cli.coordinator.planner import PlannerConfig
from disagg_cli.coordinator.router import POLICIES
from disagg_cli.coordinator.topology import (
    ClusterConfig,
    WorkerSpec,
    for_planner,
    load_cluster_config,
    local_topology,
)
from disagg_cli.errors import UsageError
from disagg_cli.protocol import CODEC_NAMES
from disagg_cli.worker_settings import SETTING_NAMES, WorkerSettings


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    policy: str = "round-robin"  # --router
    worker_timeout_s: float = 10.0  # silence after which a worker is dead
    handshake_timeout_s: float = 120.0  # --connect-timeout: covers a worker's start-up (loading weights)
    deadlines: Deadlines = Deadlines()  # per stage of a request, and in all
    send_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    keys_dir: Path | None = None  # CurveZMQ keys (disagg keys generate); None: plain tcp
    # Selective disaggregation: a prompt whose part uncached on its decode worker is at most this
    # many tokens is computed there, with no transfer; 0: never; "auto": from measured speeds.
    disagg_threshold: int | str = 0

    def __post_init__(self) -> None:
        if self.disagg_threshold != "auto" and not (isinstance(self.disagg_threshold, int)
                                                    and self.disagg_threshold >= 0):
            raise UsageError(f"--disagg-threshold takes a token count >= 0 or auto, got {self.disagg_threshold!r}")
        if self.policy not in POLICIES:
            raise UsageError(f"--router must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.worker_timeout_s > 0:
            raise UsageError(f"--worker-timeout must be positive, got {self.worker_timeout_s}")
        if not self.handshake_timeout_s > 0:
            raise UsageError(f"--connect-timeout must be positive, got {self.handshake_timeout_s}")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Where the workers run (the default: a local 1 prefill + 1 decode cluster) and how the coordinator
    routes and times requests; its `keys_dir` is the placement's (`coordinator_config`)."""

    placement: Placement = field(default_factory=StartLocal)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    kv_codec: str | None = None  # the prefill workers' codec where workers are made from flags or a file; None: theirs
    planner: PlannerConfig = field(default_factory=PlannerConfig)  # --planner, the SLO targets, --admission
    elastic: bool = False  # the workers started here may switch role in place (`--elastic`, or a planner)

    def __post_init__(self) -> None:
        if self.kv_codec is not None and self.kv_codec not in CODEC_NAMES:
            raise UsageError(f"--kv-codec must be one of {', '.join(CODEC_NAMES)}, got {self.kv_codec!r}")

    def coordinator_config(self) -> CoordinatorConfig:
        return replace(self.coordinator, keys_dir=keys_dir(self.placement))


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    model: str
    cache_dir: Path
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    serve: ServeOptions = field(default_factory=ServeOptions)  # where the workers run
    max_queued_requests: int | None = None  # None: no limit
    tokenizer: str | None = None  # the model whose tokenizer to use; None: the served model's
    # A request submitted while a role has no live worker: False, refused at once (a server's
    # client retries); True, it waits for one up to its deadline (a batch: generate, bench).
    wait_for_workers: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.serve.placement, InProcess):
            raise UsageError("the service runs requests on workers; --in-process is for `disagg generate` only")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise UsageError(f"--max-queued-requests must be at least 1 (every request waits a moment), "
                             f"got {self.max_queued_requests}")

    def to_start(self) -> ClusterConfig | None:
        """The topology to start here (`build_topology`); None: the workers run elsewhere."""
        match self.serve.placement:
            case StartLocal() | StartOnRay() as start:
                # a planner switches roles in place: its workers load for every role
                topology = build_topology(self.model, start, self.runtime, self.engine, self.serve.kv_codec,
                                          self.serve.elastic)
                if self.serve.planner.is_on:
                    topology = for_planner(topology, self.serve.planner.max_step_ms)
                if topology.backend != "ray" and start.keys_dir is not None:
                    raise UsageError("--keys is for workers started elsewhere or on Ray (--ray); the workers "
                                     "started here listen on 127.0.0.1")
                return topology
            case _:
                return None


def build_topology(model: str, start: StartLocal | StartOnRay, runtime: RuntimeConfig, engine: EngineConfig,
                   kv_codec: str | None = None, elastic: bool = False) -> ClusterConfig:
    """What to start: the topology given, `--config`'s, or 1 prefill + 1 decode (or one colocated) worker
    made from the worker settings, with `--prefill-replicas`/`--decode-replicas` workers of those roles;
    as Ray actors for `StartOnRay`. `kv_codec` (None: the workers' default) is the prefill workers';
    `elastic` makes every worker made from flags or a file one that may switch role."""
    match start.cluster:
        case Given(topology=config):  # started as it is: the flags' settings are for topologies made from them
            pass
        case FromFile(path=path, replicas=replicas):
            config = load_cluster_config(path, default_model=model)
            given = _given_settings(runtime, engine)
            if given:
                config = replace(config, workers=tuple(replace(w, **given) for w in config.workers))
            if kv_codec is not None:
                config = replace(config, workers=tuple(replace(w, kv_codec=kv_codec) if w.role == "prefill" else w
                                                       for w in config.workers))
            if elastic:
                config = replace(config, workers=tuple(replace(w, elastic=True) for w in config.workers))
            config = _resized(config, replicas)
        case Disaggregated(replicas=replicas):
            config = local_topology(model, _base_spec(runtime, engine, kv_codec, elastic),
                                    num_prefill=replicas.prefill or 1, num_decode=replicas.decode or 1)
        case Colocated():
            config = local_topology(model, _base_spec(runtime, engine, kv_codec, elastic), colocated=True)
    if isinstance(start, StartOnRay):  # this topology on Ray, whatever its file said
        config = replace(config, backend="ray", ray_address=start.address)
    return config


def _base_spec(runtime: RuntimeConfig, engine: EngineConfig, kv_codec: str | None, elastic: bool = False) -> WorkerSpec:
    return WorkerSpec.from_settings("prefill", WorkerSettings(
        **{f.name: getattr(runtime, f.name) for f in fields(runtime)},
        **{f.name: getattr(engine, f.name) for f in fields(engine)}, kv_codec=kv_codec, elastic=elastic))


def _given_settings(runtime: RuntimeConfig, engine: EngineConfig) -> dict[str, Any]:
    """The worker settings the flags moved off their defaults: on a `--config` file's workers they win
    over the file, as a command line wins over a config file in vLLM's `--config` and most servers
    (`--no-enable-prefix-caching` with a file was ignored without a word). A flag left at its default
    leaves the file's value."""
    flags, defaults = _base_spec(runtime, engine, None), WorkerSpec.from_settings("prefill", WorkerSettings())
    return {name: getattr(flags, name) for name in SETTING_NAMES if getattr(flags, name) != getattr(defaults, name)}


def _resized(config: ClusterConfig, replicas: Replicas) -> ClusterConfig:
    for role, count in (("prefill", replicas.prefill), ("decode", replicas.decode)):
        if count is not None:
            config = config.with_replicas(role, count)
    return config


def worker_address(address: str | None) -> str:
    """`host:port` or a full zmq address (`tcp://…`, `ipc://…`)."""
    assert address is not None
    if "://" in address:
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"worker address {address!r} is not host:port or tcp://host:port")
    return f"tcp://{address}"


def context_length(path: Path) -> int | None:
    """The model's context in tokens, read from its metadata (no weights are loaded); None: unknown."""
    from disagg_cli.model.gguf_file import read_gguf

    if path.is_dir() and (path / "config.json").is_file():
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return int(hf.get("max_position_embeddings", 4096))
    gguf_path = path if path.is_file() else next(iter(sorted(path.glob("*.gguf"))), path)
    meta = read_gguf(gguf_path).metadata
    value = meta.get(f"{meta.get('general.architecture')}.context_length")
    return int(value) if value is not None else None
