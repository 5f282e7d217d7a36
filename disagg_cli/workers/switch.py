"""A worker's role change in place: the state of one switch, from `SwitchRole` to `RoleSwitched`.

The engine thread owns it (`Worker.switch`); the worker's loop calls `tick` between engine steps.
Life of a switch (the coordinator's side is `coordinator/role_switch.py`):
1. `SwitchRole(role, move)` arrives: new requests are refused from now on ("draining", which the
   coordinator retries elsewhere); the role drops what can never settle here (a decode worker's
   reservations still queued for memory);
2. each tick, with `move`, every request that is decoding (its first token out, every token but
   the last computed) is parked: taken out of the running batch with its blocks kept, and listed
   to the coordinator in `Parked`; between decode and colocated (both keep a decode worker's
   records) every request stays as it is, its KV still arriving or not, and the new role adopts
   it: that switch takes one step; otherwise they decode here to their end;
3. `MoveOut` per parked request: its KV (the tokens the target lacks) leaves layer by layer for
   the target decode worker, then `KVDone` with its last token and sampler state, over the path a
   prefill worker's KV takes (`workers/kv_out.py`); its blocks are freed at once (the KV left as
   copies). A parked request that gets no `MoveOut` within `PARK_TIMEOUT_S` is failed "draining",
   which its coordinator retries (re-prefilled elsewhere);
4. once no request is left (the role's records, the parked ones, the engine's) but those the new
   role adopts, the I/O thread
   has sent everything queued before (`WorkerIO.flush`), and the host builds the new role on the
   same model, pool and I/O thread (`workers/roles.py`), which answers `RoleSwitched`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model.loader import LoadedModel
from disagg_cli.protocol import Error, MoveOut, Parked, ParkedRequest, RoleSwitched, SwitchRole
from disagg_cli.workers.base import log
from disagg_cli.workers.checks import Limits
from disagg_cli.workers.kv_out import Done, EncodeLayer, KVSender, KVStream

PARK_TIMEOUT_S = 60.0  # a parked request waits this long for its `MoveOut`

Dest = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class RoleCarry:
    """What a worker keeps across a role switch: everything but the role's own records."""

    lm: LoadedModel
    engine: LLMEngine
    io: Any  # the `WorkerIO` (or a test's stand-in), its thread running
    ident: Any  # the `WorkerIdentity`: same address and instance, the role replaced
    kv_out: KVSender
    switch: RoleSwitch  # the switch that ended, announced by the new role

    def install(self, worker: Any) -> None:
        """Make `worker` (the new role, being built) run on what the previous role leaves: nothing
        reloaded; only the role's own records start empty. Its I/O hooks are rebound by `announce`."""
        worker.lm, worker.engine, worker.kv_out, worker.io = self.lm, self.engine, self.kv_out, self.io
        worker.engine.prefill_only = worker.prefill_only  # the scheduler's mode; the pool and cache stay
        worker.limits = Limits.of(self.lm)
        worker.address = self.ident.address
        worker.ident = replace(self.ident, role=worker.config.role)  # same instance: peers keep what they know
        worker.requests = {}  # the engine's measured speeds stay: the worker computes as fast in any role


@dataclass
class _Parked:
    owner: Dest
    since_s: float = field(default_factory=time.monotonic)


class RoleSwitch:
    """One switch of a worker's role in flight. `worker` is the role leaving (a `Worker`: its
    engine, I/O, records, `decoding_ids` and `abort`); typed loosely, as `workers/worker.py`
    imports this module."""

    def __init__(self, worker: Any, owner: Dest, msg: SwitchRole) -> None:
        self.worker = worker
        self.owner = owner
        self.previous: str = worker.config.role
        self.role = msg.role
        self.move = msg.move
        self.started_s = time.perf_counter()
        self.parked: dict[str, _Parked] = {}
        self.moved = 0
        self.finished = 0
        self.done = False
        # decode ⇄ colocated: both keep a decode worker's records (a colocated worker is one that also
        # takes prompts), so every request here stays as it is, adopted by the new role: decoding,
        # computing its prompt, or reserved with its KV on the way (and its decoding window kept)
        self.keeps = {self.previous, self.role} <= {"decode", "colocated"}
        self.adopted: dict[str, Any] = {}  # request id → its record, for the new role
        self.reserved_kv: Any = None  # the leaving role's `ReservedKV`, for the new role (keeps)
        self._known = set(worker.requests)  # in flight when the switch began: those that end here count

    def tick(self, flush: Callable[[float], bool]) -> bool:
        """Park what can move, expire what waits too long; True once the worker may take its new role."""
        w = self.worker
        if self.move:
            self._park()
        now = time.monotonic()
        for rid, p in list(self.parked.items()):
            if now - p.since_s > PARK_TIMEOUT_S:
                w.log(f"request {rid} was parked {PARK_TIMEOUT_S:g} s with no MoveOut; failing it over")
                self.fail(rid, "draining", f"{w.config.role} worker {w.address} switched role; it was not moved")
        stay = set(w.requests) if self.keeps else set()
        if set(w.requests) - stay or self.parked or set(w.engine.seqs) - stay:
            return False
        if not stay and w.engine.has_unfinished():
            return False
        self.adopted = {rid: w.requests[rid] for rid in stay}
        self.reserved_kv = getattr(w, "reserved_kv", None) if self.keeps else None
        self.finished = len(self._known) - self.moved - len(self.adopted)
        self.done = flush(10.0)
        return self.done

    def _park(self) -> None:
        w = self.worker
        batch: list[ParkedRequest] = []
        for rid in w.decoding_ids():
            req = w.requests.get(rid)
            if req is None or req.owner != self.owner:
                continue  # another coordinator's request: it decodes here to its end
            seq = w.engine.park(rid)
            if seq is None:
                continue
            del w.requests[rid]
            self.parked[rid] = _Parked(req.owner)
            left = seq.params.max_tokens - seq.num_output_tokens + 1  # the target counts the last token as its first
            batch.append(ParkedRequest(rid, tuple(seq.token_ids), left))
        if batch:
            w.io.send(self.owner, Parked(tuple(batch)))

    def move_out(self, dest: Dest, msg: MoveOut) -> None:
        """Stream a parked request's KV to its new decode worker and free it here."""
        w, rid = self.worker, msg.request_id
        if rid not in self.parked:
            w.io.send(dest, Error(rid, "unknown", f"request {rid} is not parked on {w.address}"))
            return
        seq = w.engine.seqs[rid]
        n = seq.num_computed_tokens
        if not 0 <= msg.cached_tokens < n:
            self.fail(rid, "bad-field", f"MoveOut with cached_tokens {msg.cached_tokens}; {n} tokens are here")
            return
        decode = ("peer", (msg.decode_addr, msg.decode_instance))
        stream = KVStream()
        for layer in range(w.lm.config.num_layers):
            k, v = w.engine.read_kv(rid, layer, msg.cached_tokens, n)  # copies: the blocks may go now
            w.io.send(decode, EncodeLayer(stream, decode, rid, layer, msg.cached_tokens, k, v))
        w.io.send(decode, Done(stream, n, rid, seq.token_ids[n], w.engine.sampler_state(rid), time.time()))
        w.engine.abort(rid)  # frees its blocks (full ones stay in the prefix cache)
        del self.parked[rid]
        self.moved += 1

    def fail(self, rid: str, reason: str, message: str) -> None:
        """End a parked request here; its coordinator hears why."""
        p = self.parked.pop(rid, None)
        self.worker.engine.abort(rid)
        if p is not None:
            self.worker.io.send(p.owner, Error(rid, reason, message))

    def forget(self, rid: str) -> None:
        """The request was aborted (its blocks freed by the caller)."""
        self.parked.pop(rid, None)

    def abort_all(self, reason: str, message: str) -> None:
        for rid in list(self.parked):
            self.fail(rid, reason, message)

    def refusal(self, current: RoleSwitch | None, stopping: bool) -> str:
        """Why the worker cannot take this switch ("" when it can), and the log line when it can."""
        w = self.worker
        if not w.config.elastic:
            return f"it was not started --elastic, so its weights are loaded for {w.config.role} only"
        if current is not None:
            return f"it is already switching to {current.role}"
        if stopping:
            return "it is shutting down"
        if self.role != self.previous:
            w.log(f"switching to {self.role}: {len(w.requests)} request(s) in flight "
                  f"({'moving' if self.move else 'finishing'} those decoding)")
        return ""

    def announce(self) -> None:
        """Called by the new role, once built: `RoleSwitched` to the coordinator that asked."""
        answer = self.answer()
        log(self.role, f"was {self.previous}; switched in {answer.elapsed_ms:.0f} ms ({self.moved} request(s) "
                       f"moved with their KV, {len(self.adopted)} kept, {self.finished} finished)")
        self.worker.io.send(self.owner, answer)

    def answer(self, refused: str = "") -> RoleSwitched:
        return RoleSwitched(self.previous, self.role if not refused else self.previous, self.moved, self.finished,
                            (time.perf_counter() - self.started_s) * 1e3, refused, len(self.adopted))
