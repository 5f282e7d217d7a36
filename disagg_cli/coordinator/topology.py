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

Pure: no sockets, no processes (`coordinator/cluster.py` starts them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from disagg_cli.config import EngineConfig, RuntimeConfig, WorkerConfig
from disagg_cli.errors import UsageError
from disagg_cli.protocol import CODEC_NAMES, WORKER_ROLES


class TopologyError(UsageError):
    """A topology file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker of a topology: where it goes (port, cpus) and every setting of its `WorkerConfig`,
    which `worker_config` makes (and which validates the values, in one place)."""

    role: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at start
    device: str = "cpu"
    dtype: str = "auto"
    quantization: str = "none"  # weight-only: none, int8, int4, auto (resolved by the worker for its role)
    threads: int | None = None  # None: an even share of the cores given to the cluster
    cpus: tuple[int, ...] | None = None  # CPU affinity; None: a share of the cores, in order
    kv_codec: str | None = None  # prefill (and colocated) only; None: the worker's default
    block_size: int = 16
    kv_cache_tokens: int | None = None  # None: sized by kv_cache_memory_mb
    kv_cache_memory_mb: float = 256.0
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = False
    enable_prefix_caching: bool = True

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
        self.runtime()
        self.engine()

    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(device=self.device, dtype=self.dtype, threads=self.threads, quantization=self.quantization)

    def engine(self) -> EngineConfig:
        return EngineConfig(block_size=self.block_size, kv_cache_tokens=self.kv_cache_tokens,
                            kv_cache_memory_mb=self.kv_cache_memory_mb, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens, chunked_prefill=self.chunked_prefill,
                            enable_prefix_caching=self.enable_prefix_caching)

    def worker_config(self, model: str) -> WorkerConfig:
        """The whole configuration of this worker, once its port is chosen."""
        extra = {} if self.kv_codec is None else {"kv_codec": self.kv_codec}
        return WorkerConfig(role=self.role, model=model, host=self.host, port=self.port, runtime=self.runtime(),
                            engine=self.engine(), **extra)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    model: str
    workers: tuple[WorkerSpec, ...]

    def __post_init__(self) -> None:
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


def local_topology(model: str, base: WorkerSpec, num_prefill: int = 1, num_decode: int = 1,
                   colocated: bool = False) -> ClusterConfig:
    """The embedded default: `num_prefill` + `num_decode` workers (or one colocated) like `base`."""
    if colocated:
        return ClusterConfig(model, (replace(base, role="colocated"),))
    decode = replace(base, role="decode", kv_codec=None)
    return ClusterConfig(model, (replace(base, role="prefill"),) * num_prefill + (decode,) * num_decode)


_SPEC_FIELDS = {f.name for f in fields(WorkerSpec)}
_TYPES: dict[str, tuple[type, ...]] = {
    "role": (str,), "host": (str,), "port": (int,), "device": (str,), "dtype": (str,),
    "quantization": (str,), "threads": (int,),
    "cpus": (list,), "kv_codec": (str,), "block_size": (int,), "kv_cache_tokens": (int,),
    "max_num_seqs": (int,), "max_num_batched_tokens": (int,), "kv_cache_memory_mb": (int, float),
    "chunked_prefill": (bool,), "enable_prefix_caching": (bool,),
}


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
    unknown = sorted(set(data) - {"model", "defaults", "workers"})
    if unknown:
        raise UsageError(f"unknown top-level key(s) {unknown}; expected model, [defaults], [[workers]]")
    model = data.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise UsageError("'model' must be a model name or path (a string)")
    defaults = data.get("defaults", {})
    workers = data.get("workers")
    if not isinstance(defaults, dict):
        raise UsageError("[defaults] must be a table")
    if not isinstance(workers, list) or not workers or not all(isinstance(w, dict) for w in workers):
        raise UsageError("expected one or more [[workers]] tables")
    specs = []
    for i, table in enumerate(workers):
        merged = {**defaults, **table}
        where = f"worker {i} ({merged.get('role', 'no role')})"
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
        try:
            specs.append(WorkerSpec(**merged))
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
    return ClusterConfig(model, tuple(specs))
