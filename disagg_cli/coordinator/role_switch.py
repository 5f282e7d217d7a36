"""Changing a worker's role in place, the coordinator's side (the worker's is `workers/switch.py`).

`switch_role(coordinator, address, role)` (what `Coordinator.switch_role` and the planner call):
1. the router stops routing new requests to the worker (`Router.begin_switch`); requests that pick
   it in a race are refused "draining" and retried elsewhere;
2. `SwitchRole(role, move)` goes to it; `move` when it stops decoding (becomes a prefill worker)
   and another decode or colocated worker is routable to take its decoding requests (without one
   they finish there first; between decode and colocated they stay, adopted by the new role);
3. per request listed in `Parked` (taken out of its batch, KV kept), a task `_move`s it: a decode
   worker is picked (else a colocated one, which decodes it as a decode worker would), the
   request's `Attempt` gains it (so its death fails the request over, as any worker's does),
   `Reserve` goes there for every token but the last (its reply is tapped off the request's
   queue), then `MoveOut` to the old worker, which streams the KV there; the new worker decodes on
   from the next token and its `Tokens` reach the request's task on the same queue, which never
   noticed; once one arrives the old worker leaves the attempt. Any failure on the way fails the
   attempt over as a dead worker would (`WorkerGone`): retried, re-prefilled, not lost;
4. `RoleSwitched`: the router routes by the new role (`WorkerConnections.note_switch`), and the
   outcome is returned and counted (`SwitchLog`). A worker that dies or refuses (not `--elastic`)
   raises `DisaggError`, its role as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Protocol

from disagg_cli.coordinator.attempt import Attempt
from disagg_cli.coordinator.membership import WorkerConnections
from disagg_cli.coordinator.options import CoordinatorConfig
from disagg_cli.coordinator.router import NoWorkerError, Router
from disagg_cli.coordinator.timeouts import wait_within
from disagg_cli.coordinator.worker_link import RequestFailed, WorkerGone, WorkerLink
from disagg_cli.errors import DisaggError, UsageError
from disagg_cli.protocol import (
    WORKER_ROLES,
    Error,
    MoveOut,
    Parked,
    ParkedRequest,
    Reserve,
    Reserved,
    RoleSwitched,
    SwitchRole,
)
from disagg_cli.protocol.names import CAN_DECODE

log = logging.getLogger(__name__)
SWITCH_TIMEOUT_S = 300.0  # SwitchRole → RoleSwitched: the worker finishes what cannot move within this
_POLL_S = 0.002  # how often a move looks for its request's next token


@dataclass(frozen=True, slots=True)
class SwitchOutcome:
    """What one role switch did."""

    address: str
    previous: str
    role: str
    moved: int  # requests moved with their KV to another decode worker (and decoding there)
    finished: int  # requests that ended on the worker during the switch (decoded to the end, refused)
    kept: int  # requests decoding there that decode on in its new role (decode ⇄ colocated)
    failed_over: int  # requests whose move failed: retried elsewhere, re-prefilled (none lost)
    elapsed_s: float  # `SwitchRole` sent → `RoleSwitched` received and every move done
    worker_ms: float  # the worker's own figure: `SwitchRole` arrived → the new role took over
    max_pause_s: float  # the longest a moved request went without a token: parked → its next token
    pauses_s: tuple[float, ...] = ()  # each moved request's pause


class SwitchLog:
    """The switches a coordinator made: counts by (from, to) for /metrics, the last outcomes."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.recent: deque[SwitchOutcome] = deque(maxlen=64)

    def note(self, outcome: SwitchOutcome) -> None:
        if outcome.previous != outcome.role:
            self.counts[(outcome.previous, outcome.role)] += 1
            self.recent.append(outcome)


class Coordinator(Protocol):
    """What a switch uses of the `Coordinator` (`coordinator.py`, which imports this module)."""

    connections: WorkerConnections
    config: CoordinatorConfig
    eos_ids: tuple[int, ...]
    attempts: dict[str, Attempt]
    switches: SwitchLog

    @property
    def router(self) -> Router: ...


async def switch_role(coordinator: Coordinator, address: str, role: str) -> SwitchOutcome:
    """See the module docstring."""
    if role not in WORKER_ROLES:
        raise UsageError(f"a worker's role is one of {', '.join(WORKER_ROLES)}, not {role!r}")
    conns, router = coordinator.connections, coordinator.router
    try:
        record = router.get(address)
    except KeyError:
        raise DisaggError(f"{address} is not a worker of this coordinator") from None
    if not record.is_alive or record.switching:
        raise DisaggError(f"{record.role} worker {address} is {'switching' if record.switching else 'not alive'}; "
                          "it cannot switch role now")
    previous, t0 = record.role, time.perf_counter()
    if role == previous:
        return SwitchOutcome(address, previous, role, 0, 0, 0, 0, 0.0, 0.0, 0.0)
    source = conns.link(address)
    takers = [w for w in router.workers if w.role in CAN_DECODE and w.routable and w.address != address]
    move = role == "prefill" and bool(takers)
    router.begin_switch(address)
    control = conns.channels.open_control(address)
    moves: list[asyncio.Task[float | None]] = []
    switched: RoleSwitched | None = None
    try:
        await conns.send(source, SwitchRole(role, move))
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while switched is None:
            try:
                _, msg = await wait_within(control.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise DisaggError(f"{source.name} did not finish switching to {role} within "
                                  f"{SWITCH_TIMEOUT_S:g} s") from None
            if isinstance(msg, WorkerGone):
                raise DisaggError(f"{source.name} was lost while switching to {role}: {msg.reason}")
            if isinstance(msg, Parked):
                parked_s = time.perf_counter()
                moves += [asyncio.create_task(_move(coordinator, source, p, parked_s)) for p in msg.requests]
            elif isinstance(msg, RoleSwitched):
                if msg.refused:
                    raise DisaggError(f"{source.name} did not switch to {role}: {msg.refused}")
                switched = msg
        pauses = await asyncio.gather(*moves)
    finally:
        for task in moves:
            task.cancel()  # done already, unless the switch failed: then its request fails over
        await asyncio.gather(*moves, return_exceptions=True)
        conns.channels.close_control(address)
        conns.note_switch(address, role if switched is not None else None)
    moved = [p for p in pauses if p is not None]
    outcome = SwitchOutcome(address, previous, role, len(moved), switched.finished, switched.kept,
                            len(pauses) - len(moved),
                            time.perf_counter() - t0, switched.elapsed_ms, max(moved, default=0.0), tuple(moved))
    coordinator.switches.note(outcome)
    log.warning("%s switched %s → %s in %.0f ms: %d request(s) moved with their KV (longest pause %.0f ms), "
                "%d kept, %d finished there, %d failed over", address, previous, role, outcome.elapsed_s * 1e3,
                outcome.moved, outcome.max_pause_s * 1e3, outcome.kept, outcome.finished, outcome.failed_over)
    return outcome


async def _move(coordinator: Coordinator, source: WorkerLink, parked: ParkedRequest, parked_s: float) -> float | None:
    """Move one parked request to a decode worker; its pause (parked → its next token) in seconds,
    or None when it ended first or was failed over instead."""
    rid = parked.request_id
    run = coordinator.attempts.get(rid)
    if run is None or run.ended or run.out.is_finished:
        return None  # it ended meanwhile; the abort its end sent freed it on the worker
    try:
        return await _move_attempt(coordinator, source, parked, parked_s, run)
    except (RequestFailed, NoWorkerError, asyncio.CancelledError, asyncio.TimeoutError) as e:
        why = getattr(e, "message", None) or str(e) or type(e).__name__
        queue = coordinator.connections.queue_of(rid)
        if queue is not None and not run.ended:
            queue.put_nowait((source, WorkerGone(f"moving it off {source.name} failed: {why}")))
        log.warning("moving %s off %s failed (%s); it is retried", rid, source.name, why)
        return None
    finally:
        for conn in run.active:
            coordinator.connections.channels.untap(conn.record.address, rid)


async def _move_attempt(coordinator: Coordinator, source: WorkerLink, parked: ParkedRequest, parked_s: float,
                        run: Attempt) -> float | None:
    conns, router, rid = coordinator.connections, coordinator.router, parked.request_id
    if parked.token_ids[: len(run.prompt_ids)] != run.prompt_ids or len(parked.token_ids) <= len(run.prompt_ids):
        raise RequestFailed("error", f"{source.name} parked tokens that do not continue the request's prompt")
    # a decode worker, else a colocated one (it decodes moved requests as a decode worker does)
    decodes = [w for w in router.by_role("decode") if w.routable and w.address != source.record.address]
    record = router.pick("decode" if decodes else "colocated", avoid={source.record.address})  # counted there
    target = conns.link(record.address)
    run.active.append(target)  # from here its death, or the request's end, reaches it
    target.request_ids.add(rid)
    tap = conns.channels.tap(record.address, rid)
    eos_ids = () if run.out.params.ignore_eos else coordinator.eos_ids
    params = replace(run.params, max_tokens=parked.max_tokens)
    await conns.send(target, Reserve(rid, parked.token_ids[:-1], params, eos_ids))
    timeout = coordinator.config.deadlines.token_s
    _, reply = await wait_within(tap.get(), timeout)
    conns.channels.untap(record.address, rid)
    if isinstance(reply, WorkerGone):
        raise RequestFailed("worker-dead", reply.reason)
    if isinstance(reply, Error):
        raise RequestFailed(reply.reason, f"{target.name}: {reply.message}")
    if not isinstance(reply, Reserved):
        raise RequestFailed("error", f"{target.name} sent {reply.kind} to a reservation")
    if run.ended:
        return None  # its end told every worker of the attempt, this one too, to abort
    instance = target.ack.instance_id if target.ack else ""
    await conns.send(source, MoveOut(rid, record.address, instance, reply.cached_tokens))
    run.decode = record
    run.out.workers["decode"] = record.address
    had = len(parked.token_ids) - len(run.out.prompt_token_ids)  # the request's tokens when it was parked
    end = time.monotonic() + timeout
    while len(run.out.token_ids) <= had and not run.out.is_finished and not run.ended:
        if time.monotonic() > end:
            raise RequestFailed("stalled", f"no token from {target.name} within {timeout:g} s of the move")
        await asyncio.sleep(_POLL_S)
    pause = time.perf_counter() - parked_s
    if source in run.active:  # its part is over: the KV left it (no abort needed there)
        run.active.remove(source)
        source.request_ids.discard(rid)
        router.release(source.record)
    return pause
