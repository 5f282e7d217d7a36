"""What the planner predicts from a snapshot of the service: TTFT and TPOT with the roles as they are
or as they would be (`coordinator/planner.py` decides from them; its docstring has the rule).

Pure: no sockets, no clock, no torch. A worker's figures are its heartbeat's measured speeds; a
worker that has not measured one yet borrows the best measured per thread, or a fallback.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from disagg_cli.engine.step_speed import MIN_CHUNK_TOKENS
from disagg_cli.protocol.names import CAN_DECODE, CAN_PREFILL, WORKER_ROLES

# Before a worker has measured its speed: the low end of what SmolLM2-135M does on 2 cores.
FALLBACK_PREFILL_TOK_S = 700.0
FALLBACK_DECODE_STEP_MS = 20.0
STEP_FIXED_SHARE = 0.3  # of a decode step, the part that does not grow with the batch (reading weights)


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker as the service sees it at a tick."""

    address: str
    role: str
    is_alive: bool = True
    queued_prefill_tokens: int = 0  # prompt tokens routed here whose first token has not come
    running_decodes: int = 0  # in its running batch (heartbeat)
    prefill_tokens_per_s: float = 0.0  # measured (heartbeat); 0: not yet
    decode_step_ms: float = 0.0  # measured (heartbeat); 0: not yet
    threads: int = 1
    max_step_ms: float = 0.0  # its hello's: while decoding, prompt chunks are cut to end a step by then; 0: not
    lends_cores: bool = False  # shares a lease of cores (`core_lease.py`): idle, its cores work for the others

    def __post_init__(self) -> None:
        assert self.role in WORKER_ROLES, self.role


@dataclass(frozen=True, slots=True)
class Snapshot:
    now_s: float  # the caller's monotonic clock
    workers: tuple[WorkerSnapshot, ...]
    pending_prompt_tokens: int = 0  # of requests not yet at any worker (waiting for decode memory)
    recent_ttft_ms: tuple[float, ...] = ()
    recent_tpot_ms: tuple[float, ...] = ()


def prefill_rate_or_borrowed(rate: float, threads: float, others: Iterable[tuple[float, float]]) -> float:
    """A worker's prefill tok/s: `rate` where it measured one; unmeasured, the best measured of
    `others` ((tok/s, threads) pairs, 0 tok/s: unmeasured) per thread × its `threads`; with none
    measured, the fallback."""
    if rate > 0:
        return rate
    per_thread = [r / max(1.0, t) for r, t in others if r > 0]
    return max(per_thread) * max(1.0, threads) if per_thread else FALLBACK_PREFILL_TOK_S


def _prefill_rate(w: WorkerSnapshot, ws: tuple[WorkerSnapshot, ...]) -> float:
    return prefill_rate_or_borrowed(w.prefill_tokens_per_s, w.threads,
                                    ((o.prefill_tokens_per_s, o.threads) for o in ws))


def _step_ms(w: WorkerSnapshot, ws: tuple[WorkerSnapshot, ...]) -> tuple[float, int]:
    """(its decode step ms, the batch it was measured at); unmeasured: the fastest measured
    worker's, or the fallback at batch 1."""
    if w.decode_step_ms > 0:
        return w.decode_step_ms, max(1, w.running_decodes)
    measured = [(o.decode_step_ms, max(1, o.running_decodes)) for o in ws if o.decode_step_ms > 0]
    return min(measured) if measured else (FALLBACK_DECODE_STEP_MS, 1)


def _at_batch(w: WorkerSnapshot, ws: tuple[WorkerSnapshot, ...], batch: float) -> float:
    """Its decode step ms at `batch` running decodes (a step grows with its batch past a fixed part)."""
    step_ms, measured_at = _step_ms(w, ws)
    return step_ms * (STEP_FIXED_SHARE + (1 - STEP_FIXED_SHARE) * batch / measured_at)


def colocated_step(w: WorkerSnapshot, ws: tuple[WorkerSnapshot, ...], decode_ms: float) -> tuple[float, float]:
    """(step ms, share of it spent on prompts) of a colocated worker whose decodes take `decode_ms` a
    step while prompts wait: its chunks fill the step to its `max_step_ms` (at least MIN_CHUNK_TOKENS);
    a worker without that bound is taken to give prompts as long as its decodes."""
    rate = _prefill_rate(w, ws)
    bounded = max(w.max_step_ms - decode_ms, MIN_CHUNK_TOKENS / rate * 1e3)
    prompt_ms = bounded if w.max_step_ms > 0 else decode_ms
    return decode_ms + prompt_ms, prompt_ms / (decode_ms + prompt_ms)


def prefill_capacity(ws: tuple[WorkerSnapshot, ...]) -> float:
    """Prompt tokens per second the live workers able to prefill compute together (a colocated
    worker that decodes gives its steps' prompt share)."""
    total = 0.0
    for w in ws:
        if w.is_alive and w.role in CAN_PREFILL:
            share = 1.0
            if w.role == "colocated" and w.running_decodes:
                share = colocated_step(w, ws, _at_batch(w, ws, w.running_decodes))[1]
            total += _prefill_rate(w, ws) * share
    return total


def queued_tokens(snap: Snapshot) -> int:
    return snap.pending_prompt_tokens + sum(w.queued_prefill_tokens for w in snap.workers if w.is_alive)


def predict_ttft_ms(snap: Snapshot, ws: tuple[WorkerSnapshot, ...] | None = None, extra_tokens: int = 0) -> float:
    """Time until the queued prompt tokens (and `extra_tokens` more) are computed, with roles `ws`."""
    ws = snap.workers if ws is None else ws
    tokens = queued_tokens(snap) + extra_tokens
    if tokens <= 0:
        return 0.0
    capacity = prefill_capacity(ws)
    return tokens / capacity * 1e3 if capacity > 0 else float("inf")


def predict_tpot_ms(snap: Snapshot, ws: tuple[WorkerSnapshot, ...] | None = None) -> float:
    """The slowest decode-capable worker's time per token once the running decodes (at least one
    each while prompts wait: they will decode) are spread evenly over the workers of `ws` able to
    decode; a colocated worker's steps carry prompt chunks while prompts wait (`colocated_step`)."""
    ws = snap.workers if ws is None else ws
    decoders = [w for w in ws if w.is_alive and w.role in CAN_DECODE]
    if not decoders:
        return float("inf")
    running = sum(w.running_decodes for w in snap.workers if w.is_alive)
    prompts_wait = queued_tokens(snap) > 0
    if running == 0 and not prompts_wait:
        return 0.0
    batch = max(running / len(decoders), 1.0 if prompts_wait else 0.0)
    worst = 0.0
    for w in decoders:
        step = _at_batch(w, ws, batch)
        if w.role == "colocated" and prompts_wait:
            step = colocated_step(w, ws, step)[0]
        worst = max(worst, step)
    return worst
