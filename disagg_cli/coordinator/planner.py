"""The planner's arithmetic: which role each worker should have, and why, from what the service measured.

Pure: no sockets, no clock of its own, no torch; the predictions are `predictions.py`'s.
`planner_loop.py` builds a `Snapshot` every few seconds (the router's records, the heartbeats'
`WorkerStats`, the TTFT/TPOT of recent requests) and applies the `Plan`'s changes with the
coordinator's `switch_role`.

The rule, per tick:
1. predict TTFT as the prompt tokens waiting to be computed over the prefill capacity (the sum of
   the measured prefill tok/s of the workers able to prefill; a colocated worker that is decoding
   gives the share of its steps its prompt chunks take), and TPOT as the slowest decode-capable
   worker's step time at its batch (at least one decode each while prompts wait: they will decode).
   A colocated worker with prompts waiting fills each step with prompt chunks up to its
   `max_step_ms` (the planner gives its workers 0.8 × the TPOT target where they were given none),
   or, without that bound, is taken to spend as long on prompts as on its decodes;
2. a target is missed when its prediction is over it, or recent requests' median is over it while
   that phase still has work;
3. one worker: it must be colocated. Otherwise, with TTFT missed and TPOT not, the decode worker
   with the fewest running decodes gains prefill (decode → colocated, or → prefill when another
   worker still decodes and TPOT stays met); with TPOT missed and TTFT not, a prefill or colocated
   worker gives up prefill (→ decode, or prefill → colocated when it is the only one able to
   prefill). A phase past half its target while the other is within a quarter of its own counts
   as missed: the phase with room lends before the other misses.
   A decode worker that is idle and lends its cores to the others (`core_lease.py`) is not
   taken: its cores already compute prompts. A change is proposed only when it is predicted to
   help and to keep the other target met, and not when, by the predictions after it, the other
   phase would lend back at once (a switch and its undoing, once per dwell);
   never one that leaves no worker able to prefill or none able to decode, nor one that leaves
   decode and colocated workers without a prefill worker (the colocated ones would compute every
   prompt while the decode ones take none);
4. hysteresis: a proposal must come up `hold_ticks` ticks in a row, and no switch happens within
   `min_dwell_s` of the last one (its figures are still settling); at most one change per tick,
   and none while a worker is down.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from disagg_cli.coordinator.predictions import (
    Snapshot,
    WorkerSnapshot,
    predict_tpot_ms,
    predict_ttft_ms,
    prefill_capacity,
    queued_tokens,
)
from disagg_cli.errors import UsageError
from disagg_cli.protocol.names import CAN_DECODE, CAN_PREFILL

PLANNERS = ("off", "slo")
ADMISSIONS = ("off", "slo")
DEFAULT_SLO_TTFT_MS = 2000.0  # 1P+1D's median TTFT when saturated here (2.2 s): a target it can meet
DEFAULT_SLO_TPOT_MS = 100.0  # above the p99 TPOT of either topology on the interference workload
BACKED_UP = 0.5  # a phase is backed up when its prediction is past this share of its target
ROOM = 0.25  # a phase has room to lend when its prediction is within this share of its target
# A worker the planner runs cuts prompt chunks to end a step that decodes within this share of the
# TPOT target (unless its --max-step-ms says otherwise): room for the steps that run long.
STEP_SHARE_OF_TPOT = 0.8


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """`--planner`, `--slo-ttft-ms`, `--slo-tpot-ms`, `--planner-interval`, `--admission`."""

    mode: str = "off"  # off: the topology stays as started; slo: roles follow the targets
    slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS
    slo_tpot_ms: float = DEFAULT_SLO_TPOT_MS
    interval_s: float = 2.0  # between ticks
    hold_ticks: int = 3  # a proposal must come up this many ticks in a row
    min_dwell_s: float = 10.0  # no switch this soon after the last one
    window_s: float = 10.0  # recent requests: those that ended this long ago at most
    admission: str = "off"  # slo: refuse (503) a request predicted to miss the TTFT target

    def __post_init__(self) -> None:
        if self.mode not in PLANNERS:
            raise UsageError(f"--planner must be one of {', '.join(PLANNERS)}, got {self.mode!r}")
        if self.admission not in ADMISSIONS:
            raise UsageError(f"--admission must be one of {', '.join(ADMISSIONS)}, got {self.admission!r}")
        for flag, value in (("--slo-ttft-ms", self.slo_ttft_ms), ("--slo-tpot-ms", self.slo_tpot_ms),
                            ("--planner-interval", self.interval_s)):
            if not value > 0:
                raise UsageError(f"{flag} must be positive, got {value}")
        if self.hold_ticks < 1 or self.min_dwell_s < 0 or not self.window_s > 0:
            raise UsageError(f"planner hysteresis needs hold_ticks >= 1, min_dwell_s >= 0 and window_s > 0, got "
                             f"{self.hold_ticks}, {self.min_dwell_s}, {self.window_s}")

    @property
    def is_on(self) -> bool:
        return self.mode != "off"

    @property
    def max_step_ms(self) -> float:
        """The step bound of the workers it runs that were given none."""
        return STEP_SHARE_OF_TPOT * self.slo_tpot_ms


@dataclass(frozen=True, slots=True)
class Decision:
    address: str
    old_role: str
    new_role: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    roles: dict[str, str]  # address → the role it should have after this tick
    reasons: dict[str, str]  # address → why it keeps or changes its role
    changes: tuple[Decision, ...] = ()  # to apply now (past the hysteresis)
    ttft_ms: float = 0.0  # predicted now
    tpot_ms: float = 0.0
    summary: str = ""


def _median(values: tuple[float, ...]) -> float:
    return statistics.median(values) if values else 0.0


# --- the planner ----------------------------------------------------------------------------------

@dataclass
class Planner:
    """The rule of the module docstring; `tick(snapshot)` once per interval. Its only state is the
    hysteresis: the proposal being held and when the last switch was made."""

    config: PlannerConfig
    _proposal: tuple[str, str] | None = None  # (address, new role) held so far
    _held: int = 0
    _last_switch_s: float | None = None
    history: list[Decision] = field(default_factory=list)

    def tick(self, snap: Snapshot) -> Plan:
        c = self.config
        ttft, tpot = predict_ttft_ms(snap), predict_tpot_ms(snap)
        roles = {w.address: w.role for w in snap.workers}
        summary = (f"TTFT {_ms(ttft)} (target {_ms(c.slo_ttft_ms)}), TPOT {_ms(tpot)} (target {_ms(c.slo_tpot_ms)}), "
                   f"{queued_tokens(snap)} prompt tokens queued, "
                   f"{sum(w.running_decodes for w in snap.workers)} decoding")
        proposal, why = self._propose(snap, ttft, tpot)
        reasons = {w.address: f"keeps {w.role}: {why}" for w in snap.workers}
        if proposal is None:
            self._proposal, self._held = None, 0
            return Plan(roles, reasons, (), ttft, tpot, summary)
        address, new_role = proposal
        old_role = roles[address]
        self._held = self._held + 1 if self._proposal == proposal else 1
        self._proposal = proposal
        dwell_left = (0.0 if self._last_switch_s is None
                      else c.min_dwell_s - (snap.now_s - self._last_switch_s))
        if self._held < c.hold_ticks or dwell_left > 0:
            wait = (f"{self._held}/{c.hold_ticks} ticks" if self._held < c.hold_ticks
                    else f"{dwell_left:.1f} s of dwell left")
            reasons[address] = f"would become {new_role} ({wait}): {why}"
            return Plan(roles, reasons, (), ttft, tpot, summary)
        decision = Decision(address, old_role, new_role, why)
        self._proposal, self._held, self._last_switch_s = None, 0, snap.now_s
        self.history.append(decision)
        roles[address] = new_role
        reasons[address] = f"{old_role} → {new_role}: {why}"
        return Plan(roles, reasons, (decision,), ttft, tpot, summary)

    def _propose(self, snap: Snapshot, ttft: float, tpot: float) -> tuple[tuple[str, str] | None, str]:
        """(address, new role) to propose, or None; and the reason, in words."""
        c = self.config
        ws = snap.workers
        if any(not w.is_alive for w in ws):
            down = ", ".join(w.address for w in ws if not w.is_alive)
            return None, f"a worker is down ({down}): no change until it is back"
        if len(ws) == 1:
            w = ws[0]
            if w.role != "colocated":
                return (w.address, "colocated"), "one worker: it must both prefill and decode"
            return None, "one worker, colocated"
        queued = queued_tokens(snap)
        running = sum(w.running_decodes for w in ws)
        ttft_missed = ttft > c.slo_ttft_ms or (queued > 0 and _median(snap.recent_ttft_ms) > c.slo_ttft_ms)
        tpot_missed = tpot > c.slo_tpot_ms or (running > 0 and _median(snap.recent_tpot_ms) > c.slo_tpot_ms)
        # A phase idle or with room (its prediction within a quarter of its target) while the other is
        # backed up (past half of its own) lends: waiting for the miss would leave the queue to drain late.
        decode_room = running == 0 or tpot <= ROOM * c.slo_tpot_ms
        prefill_room = queued == 0 or ttft <= ROOM * c.slo_ttft_ms
        ttft_missed = ttft_missed or (ttft > BACKED_UP * c.slo_ttft_ms and decode_room)
        tpot_missed = tpot_missed or (tpot > BACKED_UP * c.slo_tpot_ms and prefill_room)
        state = f"TTFT {_ms(ttft)} vs {_ms(c.slo_ttft_ms)}, TPOT {_ms(tpot)} vs {_ms(c.slo_tpot_ms)}"
        if ttft_missed and tpot_missed:
            return None, f"both targets missed ({state}): no role change frees capacity; more workers would"
        if not ttft_missed and not tpot_missed:
            return None, f"targets met ({state})"
        if ttft_missed:
            return self._more_prefill(snap, ttft, state)
        return self._more_decode(snap, tpot, state)

    def _more_prefill(self, snap: Snapshot, ttft: float, state: str) -> tuple[tuple[str, str] | None, str]:
        c, ws = self.config, snap.workers
        # An idle decode worker that lends its cores already computes prompts with them (the prefill
        # worker's kernel borrows them): as colocated it would add bounded chunks, not cores.
        takers = (w for w in ws if w.role == "decode" and not _idle_lender(w))
        for w in sorted(takers, key=lambda w: w.running_decodes):
            found = _first_helping(snap, w, CAN_PREFILL,
                                   lambda ttft_after, tpot_after: (ttft_after < ttft and tpot_after <= c.slo_tpot_ms
                                                                   and not self._lends_to_decode(snap, ttft_after,
                                                                                                 tpot_after)))
            if found is not None:
                new_role, ttft_after, tpot_after = found
                return (w.address, new_role), (
                    f"TTFT missed ({state}; {queued_tokens(snap)} prompt tokens at "
                    f"{prefill_capacity(ws):.0f} tok/s) with {w.running_decodes} decoding there; as {new_role}: "
                    f"TTFT {_ms(ttft_after)}, TPOT {_ms(tpot_after)}")
        lending = [w.address for w in ws if w.role == "decode" and _idle_lender(w)]
        if lending:
            return None, (f"TTFT missed ({state}); idle decode worker(s) {', '.join(lending)} already lend their "
                          "cores to prefill, and no other decode worker can give up decoding without missing TPOT "
                          "or having it switched back")
        return None, (f"TTFT missed ({state}) but no decode worker can give up decoding without missing TPOT "
                      "or having it switched back")

    def _more_decode(self, snap: Snapshot, tpot: float, state: str) -> tuple[tuple[str, str] | None, str]:
        c, ws = self.config, snap.workers
        givers = sorted((w for w in ws if w.role in CAN_PREFILL), key=lambda w: (w.role != "colocated",
                                                                                  w.queued_prefill_tokens))
        for w in givers:
            found = _first_helping(snap, w, CAN_DECODE,
                                   lambda ttft_after, tpot_after: (tpot_after < tpot and ttft_after <= c.slo_ttft_ms
                                                                   and not self._lends_to_prefill(snap, ttft_after,
                                                                                                  tpot_after)))
            if found is not None:
                new_role, ttft_after, tpot_after = found
                return (w.address, new_role), (
                    f"TPOT missed ({state}; {sum(x.running_decodes for x in ws)} decoding) with "
                    f"{w.queued_prefill_tokens} prompt tokens queued there; as {new_role}: "
                    f"TPOT {_ms(tpot_after)}, TTFT {_ms(ttft_after)}")
        return None, (f"TPOT missed ({state}) but no worker can take up decoding without missing TTFT, leaving "
                      "no prefill worker or having it switched back")

    # A change must not make the rule that undoes it fire: the lending rule of the other phase reads
    # the predictions after the change. Without this, a colocated worker whose bound puts its TPOT
    # past half the target while prompts trickle in went back to decode, which backed TTFT up with
    # TPOT idle, which made it colocated again, once per dwell. Where recent requests of the phase
    # given more missed its target, the undoing cannot fire (both would count as missed).
    def _lends_to_decode(self, snap: Snapshot, ttft_after: float, tpot_after: float) -> bool:
        """After a change giving prefill more, decode would lend itself back (backed up, prefill with room)."""
        c, queued = self.config, queued_tokens(snap)
        if queued > 0 and _median(snap.recent_ttft_ms) > c.slo_ttft_ms:
            return False
        prefill_room = queued == 0 or ttft_after <= ROOM * c.slo_ttft_ms
        return tpot_after > BACKED_UP * c.slo_tpot_ms and prefill_room

    def _lends_to_prefill(self, snap: Snapshot, ttft_after: float, tpot_after: float) -> bool:
        """After a change giving decode more, prefill would lend itself back (backed up, decode with room)."""
        c, running = self.config, sum(w.running_decodes for w in snap.workers)
        if running > 0 and _median(snap.recent_tpot_ms) > c.slo_tpot_ms:
            return False
        decode_room = running == 0 or tpot_after <= ROOM * c.slo_tpot_ms
        return ttft_after > BACKED_UP * c.slo_ttft_ms and decode_room


def _first_helping(snap: Snapshot, w: WorkerSnapshot, roles: tuple[str, ...],
                   helps: Callable[[float, float], bool]) -> tuple[str, float, float] | None:
    """The first of `roles` (other than its own) that `w` may take, keeping both phases served, whose
    predicted (TTFT, TPOT) `helps` accepts: (role, TTFT, TPOT); None when none does."""
    for new_role in roles:
        if new_role == w.role:
            continue
        after = _with_role(snap.workers, w.address, new_role)
        if not _both_phases(after) or _prompts_only_on_colocated(after):
            continue
        ttft_after, tpot_after = predict_ttft_ms(snap, after), predict_tpot_ms(snap, after)
        if helps(ttft_after, tpot_after):
            return new_role, ttft_after, tpot_after
    return None


def _idle_lender(w: WorkerSnapshot) -> bool:
    """It shares a lease of cores and decodes nothing: its cores work for the others now."""
    return w.lends_cores and w.running_decodes == 0


def _with_role(ws: tuple[WorkerSnapshot, ...], address: str, role: str) -> tuple[WorkerSnapshot, ...]:
    return tuple(replace(w, role=role) if w.address == address else w for w in ws)


def _both_phases(ws: tuple[WorkerSnapshot, ...]) -> bool:
    """Some live worker can prefill and some can decode."""
    live = [w for w in ws if w.is_alive]
    return any(w.role in CAN_PREFILL for w in live) and any(w.role in CAN_DECODE for w in live)


def _prompts_only_on_colocated(ws: tuple[WorkerSnapshot, ...]) -> bool:
    """Decode and colocated workers and no prefill one: the colocated ones would compute every prompt,
    in steps cut short for their decodes, while the decode ones take none."""
    roles = {w.role for w in ws if w.is_alive}
    return {"decode", "colocated"} <= roles and "prefill" not in roles


def _ms(x: float) -> str:
    return "∞" if x == float("inf") else f"{x:,.0f} ms"


def admit(snap: Snapshot, prompt_tokens: int, slo_ttft_ms: float) -> tuple[bool, float]:
    """Admission by load: (admit, predicted TTFT ms) of a new prompt behind what is queued. A prompt
    with nothing queued ahead of it is always admitted (refusing it would not make it sooner)."""
    if queued_tokens(snap) <= 0:
        return True, predict_ttft_ms(snap, extra_tokens=prompt_tokens)
    ttft = predict_ttft_ms(snap, extra_tokens=prompt_tokens)
    return ttft <= slo_ttft_ms, ttft
