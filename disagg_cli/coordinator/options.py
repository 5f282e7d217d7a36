"""Where a service's workers run, and what it reads of the model before any of them starts.

`ServeOptions` is the front ends' choice of place (a local cluster, a `--config` topology or one
given whole, running workers, Ray actors) with the coordinator's settings, which it hands on as a
`CoordinatorConfig` (timeouts, deadlines, routing policy, keys), and `ServiceConfig` is all a
service is started with; `build_topology` makes
the topology to start from it, `worker_address` reads an address flag, and `context_length` reads
the model's context from its metadata (no weights). Used by `coordinator/service.py`, which every
front end (`generate`, `bench serve`, `serve`) goes through. Pure: nothing is started here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from disagg_cli.config import Deadlines, EngineConfig, RuntimeConfig
from disagg_cli.coordinator.router import POLICIES
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec, load_cluster_config, local_topology
from disagg_cli.errors import UsageError
from disagg_cli.protocol import CODEC_NAMES
from disagg_cli.worker_settings import WorkerSettings


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    policy: str = "round-robin"
    worker_timeout_s: float = 10.0  # silence after which a worker is dead
    handshake_timeout_s: float = 120.0  # covers a worker's start-up (loading weights)
    deadlines: Deadlines = Deadlines()  # per stage of a request, and in all
    send_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    keys_dir: Path | None = None  # CurveZMQ keys (disagg keys generate); None: plain tcp
    # Selective disaggregation: a prompt whose part uncached on its decode worker is at most this
    # many tokens is computed there, with no transfer; 0: never; "auto": from measured speeds.
    disagg_threshold: int | str = 0



@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Where the prompts run; the default (all empty) starts a local 1 prefill + 1 decode cluster."""

    in_process: bool = False
    prefill: tuple[str, ...] = ()  # addresses of running workers
    decode: tuple[str, ...] = ()
    colocated: bool = False
    colocated_addr: str | None = None
    config: Path | None = None
    # A topology given whole (`bench serve` makes its own), started as it is: no kv_codec or replicas applied.
    topology: ClusterConfig | None = None
    router: str = "round-robin"
    kv_codec: str | None = None  # None: the prefill workers' default
    worker_timeout_s: float = 10.0
    keys_dir: Path | None = None  # CurveZMQ keys for workers started elsewhere with --keys
    connect_timeout_s: float = 120.0  # for every worker's hello answer (covers loading weights)
    deadlines: Deadlines = field(default_factory=Deadlines)
    disagg_threshold: int | str = 0  # selective disaggregation (see CoordinatorConfig)
    ray_address: str | None = None  # the workers as Ray actors in this cluster (auto or host:port)
    prefill_replicas: int | None = None  # None: one, or what the topology says
    decode_replicas: int | None = None

    def __post_init__(self) -> None:
        if self.disagg_threshold != "auto" and not (isinstance(self.disagg_threshold, int)
                                                    and self.disagg_threshold >= 0):
            raise UsageError(f"--disagg-threshold takes a token count >= 0 or auto, got {self.disagg_threshold!r}")
        if bool(self.prefill) != bool(self.decode):
            raise UsageError("--prefill and --decode go together: give at least one address of each")
        if self.colocated_addr is not None and (self.prefill or self.config is not None):
            raise UsageError("--colocated-addr cannot be combined with --prefill/--decode or --config")
        chosen = [name for name, on in [("--in-process", self.in_process), ("--prefill/--decode", bool(self.prefill)),
                                        ("--colocated", self.colocated or self.colocated_addr is not None),
                                        ("--config", self.config is not None),
                                        ("a topology given whole", self.topology is not None)] if on]
        if len(chosen) > 1:
            raise UsageError(f"choose one of {' and '.join(chosen)}; they pick different places to run")
        if self.router not in POLICIES:
            raise UsageError(f"--router must be one of {', '.join(POLICIES)}, got {self.router!r}")
        if self.kv_codec is not None and self.kv_codec not in CODEC_NAMES:
            raise UsageError(f"--kv-codec must be one of {', '.join(CODEC_NAMES)}, got {self.kv_codec!r}")
        if not self.worker_timeout_s > 0:
            raise UsageError(f"--worker-timeout must be positive, got {self.worker_timeout_s}")
        if not self.connect_timeout_s > 0:
            raise UsageError(f"--connect-timeout must be positive, got {self.connect_timeout_s}")
        if self.keys_dir is not None and not (self.prefill or self.colocated_addr or self.ray_address or self.config):
            raise UsageError("--keys is for workers started elsewhere: use it with --prefill/--decode, "
                             "--colocated-addr or --ray")
        if self.ray_address is not None and (self.in_process or self.prefill or self.colocated_addr):
            raise UsageError("--ray starts the workers as Ray actors: it cannot be combined with --in-process, "
                             "--prefill/--decode or --colocated-addr")
        replicas = {"--prefill-replicas": self.prefill_replicas, "--decode-replicas": self.decode_replicas}
        for flag, count in replicas.items():
            if count is not None and count < 1:
                raise UsageError(f"{flag} must be at least 1, got {count}")
        given = [flag for flag, count in replicas.items() if count is not None]
        if given and (self.in_process or self.prefill or self.colocated or self.colocated_addr or self.topology):
            raise UsageError(f"{' and '.join(given)} size the prefill/decode workers started here; they do not go "
                             "with --in-process, --prefill/--decode or --colocated")

    def coordinator_config(self) -> CoordinatorConfig:
        return CoordinatorConfig(policy=self.router, worker_timeout_s=self.worker_timeout_s, keys_dir=self.keys_dir,
                                 handshake_timeout_s=self.connect_timeout_s, deadlines=self.deadlines,
                                 disagg_threshold=self.disagg_threshold)


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
        if self.serve.in_process:
            raise UsageError("the service runs requests on workers; --in-process is for `disagg generate` only")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise UsageError(f"--max-queued-requests must be at least 1 (every request waits a moment), "
                             f"got {self.max_queued_requests}")


def build_topology(model: str, serve: ServeOptions, runtime: RuntimeConfig, engine: EngineConfig) -> ClusterConfig:
    """What to start: the topology given, `--config`'s, or 1 prefill + 1 decode (or one colocated) worker, with
    `--prefill-replicas`/`--decode-replicas` workers of those roles; as Ray actors with `--ray`."""
    if serve.topology is not None:
        config = serve.topology
    elif serve.config is not None:
        config = load_cluster_config(serve.config, default_model=model)
        if serve.kv_codec is not None:
            config = replace(config, workers=tuple(replace(w, kv_codec=serve.kv_codec) if w.role == "prefill" else w
                                                   for w in config.workers))
        for role, count in (("prefill", serve.prefill_replicas), ("decode", serve.decode_replicas)):
            if count is not None:
                config = config.with_replicas(role, count)
    else:
        base = WorkerSpec.from_settings("prefill", WorkerSettings(
            **{f.name: getattr(runtime, f.name) for f in fields(runtime)},
            **{f.name: getattr(engine, f.name) for f in fields(engine)}, kv_codec=serve.kv_codec))
        config = local_topology(model, base, num_prefill=serve.prefill_replicas or 1,
                                num_decode=serve.decode_replicas or 1, colocated=serve.colocated)
    if serve.ray_address is not None:  # --ray: this topology on Ray, whatever its file said
        config = replace(config, backend="ray", ray_address=serve.ray_address)
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
