"""Where a front end's workers run: one type with a case per kind, and the flags that pick one.

A `Placement` is one of
- `InProcess`: no workers, `disagg generate`'s own engine (`--in-process`);
- `StartLocal`: workers started here as processes, those its `cluster` says (a `--config` file whose
  `[cluster]` says `backend = "ray"` puts them on Ray all the same); the default;
- `StartOnRay`: the same, started as Ray actors in the Ray cluster at `address` (`--ray`);
- `RemoteDisagg`: running prefill and decode workers (`--prefill`/`--decode`);
- `RemoteColocated`: one running colocated worker (`--colocated-addr`).

What `StartLocal` and `StartOnRay` start, a `Cluster`, is one of `Disaggregated` (prefill + decode
workers made from the worker flags, one of each unless `replicas` says; the default), `Colocated`
(one worker doing both phases, `--colocated`), `FromFile` (a TOML topology, `--config`) or `Given`
(a topology given whole, as `bench serve` makes its own: started as it is).

`placement_from_flags` turns the front ends' flags into a case: every check that keeps them apart,
with its message, is there. Pure: nothing is read or started here; `coordinator/options.py` makes
the topology to start from a case and `coordinator/service.py` starts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from disagg_cli.errors import UsageError

if TYPE_CHECKING:
    from disagg_cli.coordinator.topology import ClusterConfig


@dataclass(frozen=True, slots=True)
class Replicas:
    """How many workers of each role to start; None: one, or what the topology file says."""

    prefill: int | None = None
    decode: int | None = None


@dataclass(frozen=True, slots=True)
class Disaggregated:
    replicas: Replicas = field(default_factory=Replicas)


@dataclass(frozen=True, slots=True)
class Colocated:
    pass


@dataclass(frozen=True, slots=True)
class FromFile:
    path: Path
    replicas: Replicas = field(default_factory=Replicas)


@dataclass(frozen=True, slots=True)
class Given:
    topology: ClusterConfig


Cluster = Disaggregated | Colocated | FromFile | Given


@dataclass(frozen=True, slots=True)
class InProcess:
    pass


DEFAULT_MAX_WORKER_RESTARTS = 5  # per worker within 10 minutes (supervisor.py); then it stays down


@dataclass(frozen=True, slots=True)
class StartLocal:
    cluster: Cluster = field(default_factory=Disaggregated)
    # Only for a --config file that puts its workers on Ray: workers started as processes here
    # listen on 127.0.0.1, and the service refuses keys for them once it has read the file.
    keys_dir: Path | None = None
    # A worker that exits is started again up to this many times within the window; 0: never (an
    # outside supervisor, or a test of what a dead worker looks like).
    max_worker_restarts: int = DEFAULT_MAX_WORKER_RESTARTS


@dataclass(frozen=True, slots=True)
class StartOnRay:
    cluster: Cluster
    address: str  # the Ray cluster: auto (RAY_ADDRESS, or one on this machine) or the head's host:port
    keys_dir: Path | None = None  # the workers' CurveZMQ keys (the same folder on every node)


@dataclass(frozen=True, slots=True)
class RemoteDisagg:
    prefill: tuple[str, ...]  # host:port or tcp://host:port, at least one of each
    decode: tuple[str, ...]
    keys_dir: Path | None = None  # CurveZMQ keys for workers started with --keys


@dataclass(frozen=True, slots=True)
class RemoteColocated:
    address: str
    keys_dir: Path | None = None


Placement = InProcess | StartLocal | StartOnRay | RemoteDisagg | RemoteColocated


def keys_dir(placement: Placement) -> Path | None:
    """The CurveZMQ keys the coordinator reaches the workers with; None: plain tcp."""
    return None if isinstance(placement, InProcess) else placement.keys_dir


def placement_from_flags(*, in_process: bool = False, prefill: Sequence[str] = (), decode: Sequence[str] = (),
                         colocated: bool = False, colocated_addr: str | None = None, config: Path | None = None,
                         ray: str | None = None, keys: Path | None = None, prefill_replicas: int | None = None,
                         decode_replicas: int | None = None,
                         max_worker_restarts: int = DEFAULT_MAX_WORKER_RESTARTS) -> Placement:
    """The case the flags of `generate`/`serve` pick (none: a local 1 prefill + 1 decode cluster);
    a `UsageError` naming the flags for any two that pick different places."""
    prefill, decode = tuple(prefill), tuple(decode)
    if bool(prefill) != bool(decode):
        raise UsageError("--prefill and --decode go together: give at least one address of each")
    if colocated_addr is not None and (prefill or config is not None):
        raise UsageError("--colocated-addr cannot be combined with --prefill/--decode or --config")
    chosen = [name for name, on in [("--in-process", in_process), ("--prefill/--decode", bool(prefill)),
                                    ("--colocated", colocated or colocated_addr is not None),
                                    ("--config", config is not None)] if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one of {' and '.join(chosen)}; they pick different places to run")
    if keys is not None and not (prefill or colocated_addr or ray or config):
        raise UsageError("--keys is for workers started elsewhere: use it with --prefill/--decode, "
                         "--colocated-addr or --ray")
    if ray is not None and (in_process or prefill or colocated_addr):
        raise UsageError("--ray starts the workers as Ray actors: it cannot be combined with --in-process, "
                         "--prefill/--decode or --colocated-addr")
    counts = {"--prefill-replicas": prefill_replicas, "--decode-replicas": decode_replicas}
    for flag, count in counts.items():
        if count is not None and count < 1:
            raise UsageError(f"{flag} must be at least 1, got {count}")
    given = [flag for flag, count in counts.items() if count is not None]
    if given and (in_process or prefill or colocated or colocated_addr):
        raise UsageError(f"{' and '.join(given)} size the prefill/decode workers started here; they do not go "
                         "with --in-process, --prefill/--decode or --colocated")

    if max_worker_restarts < 0:
        raise UsageError(f"--max-worker-restarts must be 0 (never) or more, got {max_worker_restarts}")

    if in_process:
        return InProcess()
    if prefill:
        return RemoteDisagg(prefill, decode, keys)
    if colocated_addr is not None:
        return RemoteColocated(colocated_addr, keys)
    replicas = Replicas(prefill_replicas, decode_replicas)
    cluster: Cluster = (FromFile(config, replicas) if config is not None
                        else Colocated() if colocated else Disaggregated(replicas))
    return StartOnRay(cluster, ray, keys) if ray is not None else StartLocal(cluster, keys, max_worker_restarts)
