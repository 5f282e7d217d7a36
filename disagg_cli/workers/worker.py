"""The engine loop a worker process runs, shared by the prefill, decode and colocated roles.

1. load the model and build the engine (its pool sized by the engine config);
2. bind the socket and start the I/O thread (`workers/base.py`);
3. loop: handle what arrived, run one engine step if there is work, hand the step's events to the
   role, publish stats for heartbeats; block on the inbox only when idle;
4. on `SwitchRole` (an elastic worker): the switch (`workers/switch.py`) runs between steps until
   nothing is left in flight; then `serve` returns and the host (`workers/roles.py`) builds the new
   role on this one's `carry()`: the model, engine (pool, prefix cache), I/O thread and KV sender;
5. on SIGINT/SIGTERM: drain: refuse new requests (reason "draining"), let in-flight ones finish
   for up to `grace_s` seconds (a second signal cuts that short), then fail what is left with
   reason "shutdown", free all blocks, stop the I/O thread, exit 0.

Nothing a request does can end the loop. Each message's fields are checked before the role sees
it (`workers/checks.py`; how messages reach the role: `workers/intake.py`): a bad one is refused
with `Error(reason="bad-field")` naming the field.
An exception while the role handles a message fails the request that message belongs to; one in
an engine step fails the request the engine blames it on (its sampling), or else every request
of that step; one while answering a step's event fails that event's request. A failed request's
blocks are freed, its coordinator gets `Error(reason="internal-error")` with the exception, the
worker logs it and serves the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from disagg_cli.config import WorkerConfig
from disagg_cli.core_lease import CoreLease
from disagg_cli.engine.engine import LLMEngine, TokenEvent
from disagg_cli.keys import Keys
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.registry import resolve_model
from disagg_cli.protocol import (
    Error,
    KVLayout,
    Message,
    WorkerCapacity,
    WorkerStats,
)
from disagg_cli.protocol.names import ELASTIC_RUNTIME_KEY
from disagg_cli.workers.base import Dest, WorkerIdentity, WorkerIO, log
from disagg_cli.workers.checks import Limits
from disagg_cli.workers.intake import MessageIntake
from disagg_cli.workers.kv_out import KVSender
from disagg_cli.workers.stop import StopFlag
from disagg_cli.workers.switch import RoleCarry, RoleSwitch


@dataclass
class WorkerRequest:
    """What every role keeps of a request in flight here; each role's record extends it."""

    owner: Dest  # the coordinator to answer


R = TypeVar("R", bound=WorkerRequest)


class Worker(MessageIntake, Generic[R]):
    """A role's engine loop. `requests` holds one record per request in flight here, by id: made
    by the role when the request arrives, changed only on the engine thread, and dropped when the
    request ends here (finished, handed on) or by `abort`, which also frees its blocks."""

    prefill_only = False

    def __init__(self, config: WorkerConfig, cache_dir: Any, stop: StopFlag | None = None, *,
                 lm: LoadedModel | None = None, io: Any = None, carry: RoleCarry | None = None) -> None:
        """lm: a model already loaded for this config (a host that loads once); io: what carries the
        role's messages, instead of the `WorkerIO` that binds the socket (in-process role tests);
        carry: the previous role's model, engine and I/O, when this role replaces it in place."""
        self.config = config
        self.stop = stop or StopFlag()
        self.switch: RoleSwitch | None = None
        self._resumed = carry
        if carry is not None:
            carry.install(self)  # the model, engine, I/O and KV sender of the role it replaces
            return
        if lm is None:
            path = resolve_model(config.model, cache_dir)
            r = config.runtime
            log(config.role, f"loading {path.name} (dtype {r.dtype}, quantization {r.quantization}, {r.device}"
                             f"{'; elastic: loaded for every role' if config.elastic else ''})")
            lm = load_model(path, r, role=config.load_role, cache_dir=cache_dir)
        self.lm: LoadedModel = lm
        lr = self.lm.runtime
        log(config.role, f"dtype {lr.dtype} ({self.lm.dtype_reason}); weights {lr.quantization} "
                         f"({self.lm.quantization_reason}); KV {lr.kv_cache_dtype} ({self.lm.kv_cache_dtype_reason})"
                         + (f"; {self.lm.kernel_reason}" if self.lm.kernel_reason else ""))
        self.engine = LLMEngine(self.lm, config.engine, prefill_only=self.prefill_only)
        self.limits = Limits.of(self.lm)
        self.kv_out = KVSender(config.kv_codec, self.lm.fingerprint, config.link_gbps)
        if not self.prefill_only:
            fused = self.engine.runner.fused
            log(config.role, "decode steps: " + ("fused, one C call per step" if fused is not None
                                                 else f"torch ops per layer ({self.engine.runner.fused_reason})"))
        c = self.lm.config
        host = config.advertise_host or config.host
        self.address = f"tcp://{host}:{config.port}"
        layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, lr.kv_cache_dtype, config.engine.block_size)
        e = config.engine
        capacity = WorkerCapacity(self.engine.num_blocks, e.block_size, e.max_num_seqs, e.max_num_batched_tokens,
                                  e.chunked_prefill, e.enable_prefix_caching, torch.get_num_threads(),
                                  e.max_step_ms if e.chunked_prefill else 0.0)  # unchunked: no bound applies
        runtime = self.lm.describe_runtime()
        if config.elastic:  # a coordinator that meets it after a switch takes its role from the hello
            runtime[ELASTIC_RUNTIME_KEY] = "loaded for every role; its role may differ from the one it started in"
        self.ident = WorkerIdentity(config.role, self.address, self.lm.fingerprint, layout, capacity, runtime)
        if io is None:
            keys = Keys.load(config.keys_dir, config.role) if config.keys_dir else None
            io = WorkerIO(self.ident, config.host, config.port, self.preprocess, self.prepare, keys,
                          config.client_timeout_s)
        self.io = io
        self.requests: dict[str, R] = {}

    def carry(self) -> RoleCarry:
        """What the next role takes over, once `serve` returned from a finished switch."""
        assert self.switch is not None and self.switch.done
        return RoleCarry(self.lm, self.engine, self.io, self.ident, self.kv_out, self.switch)

    def log(self, message: str) -> None:
        log(self.config.role, message)

    # --- role hooks -----------------------------------------------------------------------------

    def preprocess(self, dest: Dest, msg: Message) -> Any:
        """Runs on the I/O thread: heavy decoding that should not hold up the engine."""
        return msg

    def prepare(self, item: Any) -> Message | None:
        """Runs on the I/O thread: turn a queued work item into the message to send (KV leaving)."""
        return self.kv_out.prepare(item)

    def handle(self, dest: Dest, item: Any) -> None:
        raise NotImplementedError

    def on_events(self, events: list[TokenEvent]) -> None:
        raise NotImplementedError

    def extra_stats(self) -> dict[str, int]:
        """The role's own figures for `WorkerStats` (its optional fields)."""
        return {}

    def decoding_ids(self) -> list[str]:
        """Requests decoding here (first token out), which a role switch may move with their KV."""
        return []

    def begin_switch(self) -> None:
        """A role switch began: drop what can never settle here (the switch refuses new requests)."""

    def adopt(self, switch: RoleSwitch) -> None:
        """Take over the requests the previous role leaves here (`switch.adopted`: decode ⇄ colocated)."""
        if switch.adopted:
            raise NotImplementedError(f"a {self.config.role} worker does not decode")

    # --- the loop -------------------------------------------------------------------------------

    def serve(self) -> int:
        """Serve until stopped (the exit code) or until a role switch is done (then `carry()`)."""
        if self._resumed is not None:
            return self._loop()
        self._publish_stats()  # before the first heartbeat can come
        self.io.start()
        c = self.config
        if c.keys_dir:
            where = f"CurveZMQ: encrypted, only keys in {c.keys_dir / 'allowed'}"
        elif c.host in ("127.0.0.1", "localhost", "::1"):
            where = "loopback only, no keys"
        else:
            where = "WARNING: no --keys, so anyone who reaches this port can send requests and read KV"
        log(c.role, f"serving on {self.address} ({where}); model fingerprint {self.lm.fingerprint}; "
                    f"{self.engine.num_blocks} KV blocks of {c.engine.block_size}")
        return self._loop()

    def _loop(self) -> int:
        deadline: float | None = None
        lease = CoreLease.attached()  # busy while it has requests to step; idle (lent) while it waits
        while True:
            if self.stop.count and deadline is None:
                deadline = time.monotonic() + self.config.grace_s
                log(self.config.role, f"draining: {len(self.requests)} in-flight request(s) get "
                                      f"{self.config.grace_s:g} s to finish; new ones are refused")
            if deadline is not None and (not self.requests or time.monotonic() > deadline or self.stop.count > 1):
                break
            self._publish_stats()
            busy = self.engine.has_unfinished()
            if lease is not None:
                lease.set_busy(busy)
            self._drain(block=not busy)
            if self.engine.has_unfinished():
                if lease is not None:
                    lease.set_busy(True)
                self._step()
                self._publish_stats()
            if self.switch is not None and not self.stop.count and self.switch.tick(self.io.flush):
                return 0  # the host builds the new role on `carry()`
        self.shutdown()
        return 0

    def request_stop(self) -> None:
        """Drain and stop, as SIGTERM does (a second call: stop without waiting); any thread."""
        self.stop.set()

    def step(self) -> list[TokenEvent]:
        return self.engine.step()

    def announce(self) -> None:
        """The new role is up: tell the coordinator that asked for it (`RoleSwitched`)."""
        if self._resumed is None:
            return
        self.adopt(self._resumed.switch)  # before the I/O thread calls this role's `preprocess`
        self.io.rebind(self.ident, self.preprocess, self.prepare)
        self._publish_stats()
        self._resumed.switch.announce()

    def _step(self) -> None:
        """One engine step and its events, each failure confined to the requests it belongs to."""
        try:
            events = self.step()
        except Exception as e:  # past the engine's own blame: fail the step's requests, or all
            stepped = [r for r in self.engine.step_request_ids if self.engine.has_request(r)]
            for rid in stepped or list(self.engine.seqs):
                self.engine.fail(rid, f"the engine step failed: {type(e).__name__}: {e}")
            events = []
        failed = self.engine.take_failures()
        for rid, why in failed:
            log(self.config.role, f"request {rid} failed: {why}")
            self.abort(rid, notify=True, reason="internal-error", message=f"{self.config.role} worker: {why}")
        for ev in events:
            try:
                self.on_events([ev])
            except Exception as e:
                why = f"answering its token failed: {type(e).__name__}: {e}"
                log(self.config.role, f"request {ev.request_id} failed: {why}")
                self.abort(ev.request_id, notify=True, reason="internal-error",
                           message=f"{self.config.role} worker: {why}")

    def abort(self, request_id: str, notify: bool, reason: str = "abort", message: str = "") -> None:
        """Stop a request here and free its blocks; tell its coordinator when it did not ask."""
        if self.switch is not None:
            self.switch.forget(request_id)
        self.engine.abort(request_id)
        req = self.requests.pop(request_id, None)
        if notify and req is not None:
            self.io.send(req.owner, Error(request_id, reason, message or f"{self.config.role} worker: {reason}"))

    def _publish_stats(self) -> None:
        cache = {k: int(v) for k, v in self.engine.cache_stats().items()}
        self.io.publish_stats(WorkerStats(
            **self.engine.pool_stats(), time_unix_s=time.time(), **cache,
            prefill_tokens_per_s=self.engine.speed.prefill_tokens_per_s,
            decode_step_ms=self.engine.speed.decode_step_ms,
            threads=self.ident.capacity.threads, greeted_peers=0,  # the I/O thread counts its peers
            role=self.config.role, switching_to=self.switch.role if self.switch is not None else "",
            **self.extra_stats()))

    def shutdown(self) -> None:
        in_flight = list(self.requests)
        log(self.config.role, f"shutting down; failing {len(in_flight)} in-flight request(s)")
        if self.switch is not None:
            self.switch.abort_all("shutdown", f"{self.config.role} worker {self.address} shut down")
        for rid in in_flight:
            self.abort(rid, notify=True, reason="shutdown", message=f"{self.config.role} worker {self.address} "
                                                                     "shut down")
        self.engine.abort_all()
        self._publish_stats()
        self.io.stop()
