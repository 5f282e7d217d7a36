"""A cluster of Ray actors: a topology's workers placed, restarted and stopped by Ray.

Ray only places and restarts; requests and KV still go over ZeroMQ, coordinator to worker and
worker to worker. Life of a Ray cluster (`disagg serve --ray ADDRESS`, or a topology whose
`[cluster]` says `backend = "ray"`):
1. `start()`: join the Ray cluster at ADDRESS as a driver (one line, not a hang, when Ray is not
   installed or nothing answers there), then create one actor per worker (`workers/ray_actor.py`),
   named `<role>-<i>` in a namespace of this service's own, asking for the worker's `num_cpus`,
   `num_gpus` and custom resources, restarted by Ray whenever its process dies;
2. `wait_addresses()`: every actor reports the address its worker bound; an actor Ray cannot
   place is an error naming its role and the resources it asks for: soon when no node has them
   (`INFEASIBLE_AFTER_S`), at the connect timeout when the nodes that have them are busy;
3. `follow(connections)` (the coordinator's `WorkerConnections`): a task per actor holds the actor's
   `wait_stopped` call open; the moment the actor's process dies that call fails, and the
   coordinator drops its address (its requests are retried, as for any dead worker); when Ray has
   restarted it, its new address is added;
4. `stop()`: every worker drains, the actors are killed for good, the driver leaves Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec
from disagg_cli.errors import DisaggError
from disagg_cli.workers.ray_actor import CALLS_AT_ONCE, WorkerActor

if TYPE_CHECKING:
    from disagg_cli.coordinator.membership import WorkerConnections

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'disagg-cli[ray]'"
INFEASIBLE_AFTER_S = 10.0  # how long a demand no node meets may wait for such a node to join
ANSWER_TIMEOUT_S = 5.0  # a TCP connect to the Ray address, before ray.init (which would hang)
STOP_TIMEOUT_S = 15.0  # for every worker's drain, past its grace_s (10 s)
RESTART_PAUSE_S = 2.0  # before asking Ray again for an actor whose worker failed to start


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DisaggError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


@dataclass
class ActorSlot:
    """One worker of the topology and the actor that runs it (whichever process it is now in)."""

    name: str  # <role>-<i>, the actor's name in the namespace
    spec: WorkerSpec
    handle: Any  # ray.actor.ActorHandle
    address: str | None = None  # what the coordinator knows it by; None while it is gone
    instance_id: str | None = None
    joined: int = 0  # how many times its address was handed to the coordinator

    @property
    def role(self) -> str:
        return self.spec.role


class RayCluster:
    """The workers of `config` as Ray actors in the cluster at `address` (see the module docstring)."""

    def __init__(self, config: ClusterConfig, address: str, keys_dir: Path | None = None) -> None:
        self.config = config
        self.address = address
        self.keys_dir = keys_dir
        self.namespace = f"disagg-{secrets.token_hex(4)}"
        self.slots: list[ActorSlot] = []
        self._ray: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        ray = self._ray = import_ray()
        _check_answers(self.address)
        # ray.init makes SIGTERM call sys.exit; the server's own handlers must stay in charge.
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(address=self.address, namespace=self.namespace, logging_level=logging.WARNING)
        except ConnectionError as e:
            if self.address == "auto":
                raise DisaggError(_NO_LOCAL_CLUSTER) from None
            raise DisaggError(f"--ray {self.address}: could not join the Ray cluster: {_first_line(e)}") from None
        except (RuntimeError, ValueError) as e:
            raise DisaggError(f"--ray {self.address}: could not join the Ray cluster: {_first_line(e)}") from None
        finally:
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
        actor_class = ray.remote(WorkerActor)
        keys = str(self.keys_dir) if self.keys_dir else None
        counts: dict[str, int] = {}
        for spec in self.config.workers:
            name = f"{spec.role}-{counts.setdefault(spec.role, 0)}"
            counts[spec.role] += 1
            handle = actor_class.options(name=name, max_restarts=-1, max_task_retries=0,
                                         max_concurrency=CALLS_AT_ONCE, **spec.ray_options()
                                         ).remote(spec, self.config.model, keys)
            self.slots.append(ActorSlot(name, spec, handle))

    async def wait_addresses(self, timeout_s: float) -> list[tuple[str, str]]:
        """(role, address) of every worker once all have bound; raises naming what Ray could not
        place (see the module docstring) or a worker's own start-up error."""
        ray = self._ray
        start = time.monotonic()
        pending = {asyncio.ensure_future(_result(slot.handle.address.remote())): slot for slot in self.slots}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, timeout=0.5)
                for future in done:
                    slot = pending.pop(future)
                    try:
                        slot.address, slot.instance_id = future.result()
                    except ray.exceptions.RayTaskError as e:
                        raise DisaggError(f"the {slot.role} worker ({slot.name}) could not start: "
                                          f"{_first_line(getattr(e, 'cause', e))}") from None
                    except ray.exceptions.RayActorError as e:
                        raise DisaggError(f"the {slot.role} worker ({slot.name}) died while starting: "
                                          f"{_first_line(e)}") from None
                    slot.joined = 1
                waited = time.monotonic() - start
                if pending and waited >= min(timeout_s, INFEASIBLE_AFTER_S):
                    self._raise_unplaceable([s.spec for s in pending.values()], waited, timeout_s)
        finally:
            for future in pending:
                future.cancel()
        return [(slot.role, slot.address) for slot in self.slots if slot.address]

    def _raise_unplaceable(self, specs: list[WorkerSpec], waited: float, timeout_s: float) -> None:
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        for spec in specs:
            demand = _demand(spec)
            if not any(all(n["Resources"].get(k, 0) >= v for k, v in demand.items()) for n in nodes):
                have = "; ".join(f"{n['NodeManagerAddress']} {_shown(n['Resources'])}" for n in nodes) or "none"
                raise DisaggError(
                    f"cannot place the {spec.role} worker: no node of the Ray cluster at {self.address} has "
                    f"{_shown(demand)} (nodes: {have}); start one that has, e.g. `ray start --address ADDRESS "
                    f"--resources '{{...}}'`, or change the topology's num_cpus/num_gpus/resources")
        if waited >= timeout_s:
            roles = ", ".join(sorted({s.role for s in specs}))
            raise DisaggError(f"the {roles} worker(s) did not start within --connect-timeout {timeout_s:g} s: "
                              "nodes with their resources exist but are busy (`ray status` shows what holds "
                              "them), or the weights are still loading")

    # --- membership while serving -----------------------------------------------------------------

    def follow(self, connections: WorkerConnections) -> None:
        """Keep the coordinator's workers in step with the actors (see the module docstring)."""
        self._tasks = [asyncio.create_task(self._follow(slot, connections), name=f"follow {slot.name}")
                       for slot in self.slots]

    async def unfollow(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _follow(self, slot: ActorSlot, connections: WorkerConnections) -> None:
        while True:
            try:
                if not await self._follow_once(slot, connections):
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the following of this actor unseen
                log.exception("following the %s worker (%s) failed; trying again", slot.role, slot.name)
                await asyncio.sleep(RESTART_PAUSE_S)

    async def _follow_once(self, slot: ActorSlot, connections: WorkerConnections) -> bool:
        """Join the actor's worker if it is not in, then wait for it to end; False: stop following."""
        exceptions = self._ray.exceptions
        if slot.address is None:
            try:  # Ray holds the call until the restarted actor's __init__ has run
                address, instance_id = await _result(slot.handle.address.remote())
            except exceptions.RayTaskError as e:
                log.warning("the restarted %s worker (%s) could not start: %s; asking Ray for another try",
                            slot.role, slot.name, _first_line(getattr(e, "cause", e)))
                await asyncio.sleep(RESTART_PAUSE_S)
                self._ray.kill(slot.handle, no_restart=False)
                return True
            except exceptions.ActorDiedError as e:
                log.warning("the %s worker (%s) is gone for good: %s", slot.role, slot.name, _first_line(e))
                return False
            except exceptions.RayActorError:  # unavailable for a moment: ask again
                await asyncio.sleep(RESTART_PAUSE_S)
                return True
            log.warning("Ray restarted the %s worker (%s); it rejoins at %s", slot.role, slot.name, address)
            await connections.add_worker(slot.role, address)
            slot.address, slot.instance_id = address, instance_id
            slot.joined += 1
        try:
            outcome = await _result(slot.handle.wait_stopped.remote(slot.instance_id))
            reason = "its Ray actor restarted" if outcome == "restarted" else "its worker stopped"
        except exceptions.ActorUnavailableError:
            outcome, reason = "died", "its Ray actor's process died; Ray restarts it"
        except exceptions.RayActorError as e:
            outcome, reason = "died", f"its Ray actor died: {_first_line(e)}"
        with contextlib.suppress(KeyError):
            await connections.remove_worker(slot.address, reason)
        slot.address = None
        return outcome != "stopped"

    # --- the end --------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Drain every worker, kill the actors for good and leave the Ray cluster."""
        await self.unfollow()
        if self._ray is None or not self._ray.is_initialized():
            return
        # Only workers that ever bound can drain; an actor Ray never placed is just killed.
        started = [s for s in self.slots if s.joined]
        if started:
            stops = [asyncio.ensure_future(_result(s.handle.stop.remote(STOP_TIMEOUT_S - 1))) for s in started]
            await asyncio.wait(stops, timeout=STOP_TIMEOUT_S)
            for future in stops:
                future.cancel()
                if future.done() and not future.cancelled():
                    future.exception()  # an actor already dead: nothing left to stop
        for slot in self.slots:
            with contextlib.suppress(Exception):
                self._ray.kill(slot.handle, no_restart=True)
        self.slots.clear()
        await asyncio.to_thread(self._ray.shutdown)


async def _result(ref: Any) -> Any:
    return await asyncio.wrap_future(ref.future())


_NO_LOCAL_CLUSTER = ("--ray auto: no Ray cluster runs on this machine and RAY_ADDRESS is not set; start one with "
                     "`ray start --head`, or pass the head node's address (host:port)")


def _check_answers(address: str) -> None:
    """A readable line instead of ray.init's endless retries when nothing listens at `address`."""
    target = address
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment
            target = get_ray_address_from_environment("auto", None) or "auto"
        except Exception:  # a Ray without this helper: ray.init says it
            return
        if target == "auto":
            raise DisaggError(_NO_LOCAL_CLUSTER)
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise DisaggError(f"--ray {address}: expected auto or the head node's host:port, got {target!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ANSWER_TIMEOUT_S).close()
    except OSError as e:
        raise DisaggError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or e}); is a Ray head "
                          "node running there (`ray start --head` prints its address)?") from None


def _demand(spec: WorkerSpec) -> dict[str, float]:
    options = spec.ray_options()
    demand = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}
    return {k: float(v) for k, v in demand.items() if v}


def _shown(resources: dict[str, float]) -> str:
    """CPU, GPU and custom resources (not memory, object store or Ray's own node: labels)."""
    kept = {k: v for k, v in sorted(resources.items())
            if k not in ("memory", "object_store_memory") and not k.startswith(("node:", "accelerator_type:"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in kept.items()) + "}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
