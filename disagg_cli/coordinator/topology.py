"""A cluster topology: which workers to start, where, and how each one runs (frozen, validated).

Read from TOML (`configs/*.toml`) by `load_cluster_config`, or built in code for the embedded
default (`local_topology`: 1 prefill + 1 decode). A file looks like:

    model = "smollm2-135m-instruct"
    [defaults]            # every worker's values unless the worker sets its own
    dtype = "auto"        # bfloat16 where the CPU computes it natively, else float32
    quantization = "none" # none, int8, int4 or auto (int4 for decode, float for prefill)
    [[workers]]
    role = "prefill"      # prefill, decode or colocated
    port = 0              # 0: pick a free port
    cpus = [0]            # CPU affinity (Linux); omitted: the cores are split between workers
    enable_prefix_caching = true  # keep and share full KV blocks of equal prompt prefixes
    replicas = 1          # this many workers like this one (ports must then be 0)

A `[cluster]` table picks where the workers run: `backend = "local"` (the default: child
processes of this machine) or `backend = "ray"` (one Ray actor per worker, `address = "auto"` or
the head node's `host:port`), placed by each worker's `num_cpus`, `num_gpus` and custom
`resources = { prefill = 1 }` (Ray only; `cpus` is for local workers). `lend_cores = false` keeps
each local worker on its own cores even while it has no work (`core_lease.py`).

Pure: no sockets, no processes (`coordinator/cluster.py` and `coordinator/ray_cluster.py` start them).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from disagg_cli.config import EngineConfig, RuntimeConfig, WorkerConfig
from disagg_cli.errors import UsageError
from disagg_cli.protocol import CODEC_NAMES, WORKER_ROLES
from disagg_cli.worker_settings import DEFAULTS, SETTING_NAMES, WorkerSettings


class TopologyError(UsageError):
    """A topology file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker of a topology: where it goes (port, cpus) and every setting of its `WorkerConfig`,
    which `worker_config` makes (and which validates the values, in one place). The worker settings
    are the rows of `worker_settings.WORKER_SETTINGS`, with its defaults; their names are the TOML keys."""

    role: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at start
    device: str = DEFAULTS["device"]
    dtype: str = DEFAULTS["dtype"]
    quantization: str = DEFAULTS["quantization"]  # resolved by the worker for its role when auto
    threads: int | None = DEFAULTS["threads"]  # None: an even share of the cores given to the cluster
    kernel: str = DEFAULTS["kernel"]  # the execution backend: auto, c or torch
    wide_dtype: str = DEFAULTS["wide_dtype"]  # a colocated worker's float copies for wide steps
    kv_cache_dtype: str = DEFAULTS["kv_cache_dtype"]  # the KV pool's: auto, float32 or bfloat16
    cpus: tuple[int, ...] | None = None  # CPU affinity; None: a share of the cores, in order
    kv_codec: str | None = DEFAULTS["kv_codec"]  # prefill (and colocated) only; None: the worker's default
    block_size: int = DEFAULTS["block_size"]
    kv_cache_tokens: int | None = DEFAULTS["kv_cache_tokens"]  # None: sized by kv_cache_memory_mb
    kv_cache_memory_mb: float = DEFAULTS["kv_cache_memory_mb"]
    max_num_seqs: int = DEFAULTS["max_num_seqs"]
    max_num_batched_tokens: int = DEFAULTS["max_num_batched_tokens"]
    chunked_prefill: bool = DEFAULTS["chunked_prefill"]
    max_step_ms: float = DEFAULTS["max_step_ms"]
    enable_prefix_caching: bool = DEFAULTS["enable_prefix_caching"]
    elastic: bool = DEFAULTS["elastic"]  # the coordinator may switch its role in place
    # Ray placement (ignored by local clusters): logical CPUs and GPUs the actor takes, None:
    # `threads` CPUs (1 when unset) and a GPU for a cuda device; custom resources, e.g.
    # (("decode", 1.0),), that only nodes started with them (`ray start --resources`) offer.
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.role not in WORKER_ROLES:
            raise UsageError(f"worker role must be one of {', '.join(WORKER_ROLES)}, got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise UsageError(f"worker port must be 0 (pick a free one) or 1-65535, got {self.port}")
        if self.cpus is not None and (not self.cpus or min(self.cpus) < 0):
            raise UsageError(f"worker cpus must be a non-empty list of CPU numbers, got {list(self.cpus)}")
        if self.kv_codec is not None and self.kv_codec not in CODEC_NAMES:
            raise UsageError(f"worker kv_codec must be one of {', '.join(CODEC_NAMES)}, got {self.kv_codec!r}")
        if self.kv_codec is not None and self.role == "decode":
            raise UsageError("kv_codec is chosen by the prefill worker (the sender); remove it from the decode worker")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise UsageError(f"worker {name} must be a number >= 0, got {value}")
        for name, amount in self.resources:
            if name in ("CPU", "GPU"):
                raise UsageError(f"give {name}s as num_{name.lower()}s, not in resources")
            if not name or not amount > 0:
                raise UsageError(f"worker resources must map names to amounts > 0, got {name!r} = {amount}")
        self.runtime()
        self.engine()

    @classmethod
    def from_settings(cls, role: str, settings: WorkerSettings) -> WorkerSpec:
        """A worker of `role` with the settings a front end's flags gave (port and cpus open)."""
        return cls(role, **{name: getattr(settings, name) for name in SETTING_NAMES})

    def settings(self) -> WorkerSettings:
        return WorkerSettings(**{name: getattr(self, name) for name in SETTING_NAMES})

    def runtime(self) -> RuntimeConfig:
        return self.settings().runtime()

    def engine(self) -> EngineConfig:
        return self.settings().engine()

    def worker_config(self, model: str) -> WorkerConfig:
        """The whole configuration of this worker, once its port is chosen."""
        extra = {} if self.kv_codec is None else {"kv_codec": self.kv_codec}
        return WorkerConfig(role=self.role, model=model, host=self.host, port=self.port, runtime=self.runtime(),
                            engine=self.engine(), cpus=self.cpus, elastic=self.elastic, **extra)

    def ray_options(self) -> dict[str, Any]:
        """What the worker's Ray actor asks its node for (`ray.remote(...).options(**this)`)."""
        num_gpus = self.num_gpus if self.num_gpus is not None else float(self.device.startswith("cuda"))
        return {"num_cpus": self.num_cpus if self.num_cpus is not None else float(self.threads or 1),
                "num_gpus": num_gpus, "resources": dict(self.resources)}


BACKENDS = ("local", "ray")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    model: str
    workers: tuple[WorkerSpec, ...]
    backend: str = "local"  # local: child processes here; ray: Ray actors (coordinator/ray_cluster.py)
    ray_address: str = "auto"  # the Ray cluster to join: auto (RAY_ADDRESS, or one on this machine) or host:port
    # Local workers with cores of their own lend them while they have no work (`core_lease.py`).
    lend_cores: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"[cluster] backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "ray" and any(w.cpus is not None for w in self.workers):
            raise UsageError("cpus (CPU affinity) is for local workers; Ray places a worker by num_cpus, "
                             "num_gpus and resources")
        roles = [w.role for w in self.workers]
        disaggregated = "prefill" in roles and "decode" in roles and "colocated" not in roles
        colocated = set(roles) == {"colocated"}
        if not (disaggregated or colocated):
            raise UsageError(f"a topology needs at least one prefill and one decode worker, or only colocated "
                             f"workers; got roles {roles or 'none'}")
        bound = [(w.host, w.port) for w in self.workers if w.port]
        if len(set(bound)) != len(bound):
            raise UsageError(f"two workers share an address: {sorted(f'{h}:{p}' for h, p in bound)}")

    @property
    def is_colocated(self) -> bool:
        return self.workers[0].role == "colocated"

    def by_role(self, role: str) -> list[WorkerSpec]:
        return [w for w in self.workers if w.role == role]

    def with_replicas(self, role: str, count: int) -> ClusterConfig:
        """`count` workers of `role` (`--prefill-replicas`, `--decode-replicas`), like the one
        the topology gives; one whose workers of that role differ says so."""
        if count < 1:
            raise UsageError(f"--{role}-replicas must be at least 1, got {count}")
        specs = set(self.by_role(role))
        if len(specs) != 1:
            raise UsageError(f"--{role}-replicas needs exactly one kind of {role} worker in the topology, found "
                             f"{len(specs)}; set `replicas` per [[workers]] table in the file instead")
        spec = specs.pop()
        if count > 1 and spec.port:
            raise UsageError(f"--{role}-replicas {count}: the {role} worker has a fixed port {spec.port}; "
                             "set port = 0 so each replica picks its own")
        others = tuple(w for w in self.workers if w.role != role)
        first = next(i for i, w in enumerate(self.workers) if w.role == role)
        return replace(self, workers=others[:first] + (spec,) * count + others[first:])

    def counts(self) -> str:
        """"1 prefill, 2 decode": the roles in order, with how many workers each."""
        return ", ".join(f"{n} {role}" for role, n in Counter(w.role for w in self.workers).items())


def local_topology(model: str, base: WorkerSpec, num_prefill: int = 1, num_decode: int = 1,
                   colocated: bool = False) -> ClusterConfig:
    """The embedded default: `num_prefill` + `num_decode` workers (or one colocated) like `base`."""
    if colocated:
        return ClusterConfig(model, (replace(base, role="colocated"),))
    decode = replace(base, role="decode", kv_codec=None)
    return ClusterConfig(model, (replace(base, role="prefill"),) * num_prefill + (decode,) * num_decode)


def for_planner(config: ClusterConfig, max_step_ms: float) -> ClusterConfig:
    """Its workers as a planner needs them: elastic (they load for every role), and, where no bound was
    given, cutting prompt chunks to end a step that decodes within `max_step_ms` (a planner that makes
    a worker colocated counts on its decodes keeping their TPOT)."""
    return replace(config, workers=tuple(replace(w, elastic=True, max_step_ms=w.max_step_ms or max_step_ms)
                                         for w in config.workers))


_SPEC_FIELDS = {f.name for f in fields(WorkerSpec)}
_TYPES: dict[str, tuple[type, ...]] = {
    "role": (str,), "host": (str,), "port": (int,), "device": (str,), "dtype": (str,),
    "quantization": (str,), "threads": (int,), "kernel": (str,), "wide_dtype": (str,), "kv_cache_dtype": (str,),
    "cpus": (list,), "kv_codec": (str,), "block_size": (int,), "kv_cache_tokens": (int,),
    "max_num_seqs": (int,), "max_num_batched_tokens": (int,), "kv_cache_memory_mb": (int, float),
    "chunked_prefill": (bool,), "max_step_ms": (int, float), "enable_prefix_caching": (bool,), "elastic": (bool,),
    "num_cpus": (int, float), "num_gpus": (int, float), "resources": (dict,),
}
_CLUSTER_TYPES: dict[str, type] = {"backend": str, "address": str, "lend_cores": bool}


def load_cluster_config(path: Path, default_model: str | None = None) -> ClusterConfig:
    """Read a topology file; any problem is one `TopologyError` line naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise TopologyError(f"{path}: reading TOML topologies needs Python 3.11 or newer (tomllib); "
                            f"this is Python {sys.version_info.major}.{sys.version_info.minor}") from None
    path = Path(path)
    if not path.is_file():
        raise TopologyError(f"--config {path}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TopologyError(f"{path} is not valid TOML: {e}") from None
    try:
        return _parse(data, default_model)
    except UsageError as e:
        raise TopologyError(f"{path}: {e}") from None


def _parse(data: dict[str, Any], default_model: str | None) -> ClusterConfig:
    unknown = sorted(set(data) - {"model", "cluster", "defaults", "workers"})
    if unknown:
        raise UsageError(f"unknown top-level key(s) {unknown}; expected model, [cluster], [defaults], [[workers]]")
    cluster = data.get("cluster", {})
    if not isinstance(cluster, dict):
        raise UsageError("[cluster] must be a table")
    for key, value in cluster.items():
        if key not in _CLUSTER_TYPES:
            raise UsageError(f"[cluster]: unknown key {key!r}; known: {sorted(_CLUSTER_TYPES)}")
        if not isinstance(value, _CLUSTER_TYPES[key]):
            raise UsageError(f"[cluster]: {key} must be a {_CLUSTER_TYPES[key].__name__}, got {value!r}")
    model = data.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise UsageError("'model' must be a model name or path (a string)")
    defaults = data.get("defaults", {})
    workers = data.get("workers")
    if not isinstance(defaults, dict):
        raise UsageError("[defaults] must be a table")
    if not isinstance(workers, list) or not workers or not all(isinstance(w, dict) for w in workers):
        raise UsageError("expected one or more [[workers]] tables")
    specs: list[WorkerSpec] = []
    for i, table in enumerate(workers):
        merged = {**defaults, **table}
        where = f"worker {i} ({merged.get('role', 'no role')})"
        replicas = merged.pop("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise UsageError(f"{where}: replicas must be a whole number >= 1, got {replicas!r}")
        bad = sorted(set(merged) - _SPEC_FIELDS)
        if bad:
            raise UsageError(f"{where}: unknown key(s) {bad}; known: {sorted(_SPEC_FIELDS)}")
        if "role" not in merged:
            raise UsageError(f"{where}: 'role' is required (prefill, decode or colocated)")
        for key, value in merged.items():
            # bool is an int in Python; a worker count of `true` is a mistake, not 1
            if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and bool not in _TYPES[key]):
                raise UsageError(f"{where}: {key} must be a {_TYPES[key][0].__name__}, got {value!r}")
        if "cpus" in merged:
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in merged["cpus"]):
                raise UsageError(f"{where}: cpus must be a list of CPU numbers, got {merged['cpus']!r}")
            merged["cpus"] = tuple(merged["cpus"])
        if "resources" in merged:
            amounts = merged["resources"]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in amounts.values()):
                raise UsageError(f"{where}: resources must map names to numbers, got {amounts!r}")
            merged["resources"] = tuple(sorted((str(k), float(v)) for k, v in amounts.items()))
        try:
            spec = WorkerSpec(**merged)
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        if replicas > 1 and spec.port:
            raise UsageError(f"{where}: {replicas} replicas cannot share port {spec.port}; set port = 0")
        specs += [spec] * replicas
    return ClusterConfig(model, tuple(specs), backend=cluster.get("backend", "local"),
                         ray_address=cluster.get("address", "auto"), lend_cores=cluster.get("lend_cores", True))
