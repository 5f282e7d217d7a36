"""`disagg decode-worker`: receives KV caches and generates tokens from them.

Life of a request here: one `DecodeRequest` in `requests`, its `state` moving forward only:
1. `Reserve` (prompt, sampling) from a coordinator: QUEUED; blocks for the prompt's KV are set aside
   at once (the leading ones shared from this worker's prefix cache when it holds them), or the
   reservation waits in FIFO order until finished requests free enough (backpressure; the pool
   never over-commits); `Reserved` answers when they are (RESERVED), with how many prompt tokens
   are cached;
2. `KVLayers` from the prefill worker, for the prompt tokens past the cached ones: checked on the
   I/O thread against the reservation before anything is decompressed (`ReservedKV`: a request
   reserved here, tokens and layers inside it, sizes that fit), then decoded there (checksum,
   decompression), cast to this worker's dtype and placed into the reserved blocks by the engine
   thread, layer by layer (a layer may come in chunks, in order);
3. `KVDone`: every layer must have arrived whole; the request joins the running batch (continuous
   batching) with the prefill's first token and sampler state (RUNNING);
   or instead of 2-3, `PrefillHere` (selective disaggregation: a short uncached part): the prompt
   is computed here, in the reserved blocks (PREFILLING_HERE), and `FirstToken` goes to the
   coordinator from here (RUNNING);
4. each engine step streams `Tokens` to the coordinator until EOS or max_tokens, when the record is
   dropped; `abort`, from any state, frees the blocks and drops the record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch

from disagg_cli.config import SamplingParams
from disagg_cli.engine.engine import TokenEvent
from disagg_cli.engine.logprobs import TokenLogprobs
from disagg_cli.kv.transfer import decode_kv_layers
from disagg_cli.protocol import (
    Error,
    FirstToken,
    KVDone,
    KVLayers,
    Message,
    PrefillHere,
    RequestStats,
    Reserve,
    Reserved,
    Tokens,
)
from disagg_cli.workers.base import Dest, log
from disagg_cli.workers.checks import ReservedKV
from disagg_cli.workers.peers import PeerLost
from disagg_cli.workers.switch import RoleSwitch
from disagg_cli.workers.worker import Worker, WorkerRequest


class DecodeState(Enum):
    """Where a request is on this worker; forward only (abort may end it from any state)."""

    QUEUED = "queued"  # waiting in FIFO order for free blocks
    RESERVED = "reserved"  # blocks set aside, `Reserved` sent: KV on its way (or `PrefillHere`)
    PREFILLING_HERE = "prefilling_here"  # `PrefillHere`: its prompt computed here, first token not out
    RUNNING = "running"  # in the running batch, streaming `Tokens`


@dataclass
class DecodeRequest(WorkerRequest):
    """One request on a decode worker, from `Reserve` until its last `Tokens` or abort."""

    prompt_ids: list[int]
    sampling: SamplingParams
    eos_ids: frozenset[int]
    asked_s: float = field(default_factory=time.perf_counter)  # when `Reserve` came
    state: DecodeState = DecodeState.QUEUED
    cached_tokens: int = 0  # leading prompt tokens held here before the reservation
    next_pos: list[int] = field(default_factory=list)  # per layer: KV present up to this position
    first_arrival_s: float | None = None
    last_arrival_s: float | None = None
    decode_ms: float = 0.0
    first_stats: RequestStats | None = None  # sent with its first Tokens (KVDone's figures and ours)
    kv_done_s: float | None = None  # when its KVDone arrived (this clock)
    prefill_here_s: float | None = None  # when `PrefillHere` came (this clock)


@dataclass(frozen=True, slots=True)
class _DecodedKV:
    request_id: str
    layer_start: int
    token_start: int
    k: torch.Tensor  # (layers, T, KV, hd)
    v: torch.Tensor
    arrival_s: float
    decode_ms: float


class DecodeWorker(Worker[DecodeRequest]):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step_start = 0.0
        # What the I/O thread may decode: the windows of the RESERVED requests (a locked hand-off).
        self.reserved_kv = ReservedKV(self.limits)

    # --- the I/O thread ----------------------------------------------------------------------------

    def preprocess(self, dest: Dest, msg: Message) -> Any:
        if not isinstance(msg, KVLayers):
            return msg
        arrival = time.perf_counter()
        self.reserved_kv.admit(msg)  # raises WireError, before a byte is decompressed
        k, v = decode_kv_layers(msg)  # raises WireError (bad checksum, …) naming the request
        return _DecodedKV(msg.request_id, msg.layer_start, msg.token_start, k, v, arrival,
                          (time.perf_counter() - arrival) * 1e3)

    # --- the engine thread ---------------------------------------------------------------------------

    def handle(self, dest: Dest, item: Any) -> None:
        if isinstance(item, Reserve):
            self._reserve(dest, item)
        elif isinstance(item, _DecodedKV):
            self._place(item)
        elif isinstance(item, KVDone):
            self._join(item)
        elif isinstance(item, PrefillHere):
            self._prefill_here(dest, item)
        elif isinstance(item, PeerLost):  # a worker this one moved KV to (a role switch): its coordinator sees
            log(self.config.role, f"{item.message} [{item.reason}]")
        elif isinstance(item, Error):
            log(self.config.role, f"peer error: {item.reason}: {item.message:.300}")
            if item.request_id is not None and self._in(item.request_id, DecodeState.RESERVED):
                self.abort(item.request_id, notify=True, reason=item.reason, message=item.message)
        else:
            self.io.send(dest, Error(getattr(item, "request_id", None), "unexpected",
                                     f"a {self.config.role} worker does not take {item.kind}"))

    def _in(self, rid: str, state: DecodeState) -> DecodeRequest | None:
        """The request's record when it is in `state`, else None."""
        req = self.requests.get(rid)
        return req if req is not None and req.state is state else None

    def _reserve(self, dest: Dest, msg: Reserve) -> None:
        rid = msg.request_id
        if rid in self.requests or self.engine.has_request(rid):
            self.io.send(dest, Error(rid, "duplicate", f"request {rid} is already reserved here"))
            return
        misfit = self.engine.misfit(len(msg.prompt_ids) + msg.sampling.max_tokens)
        if misfit:
            self.io.send(dest, Error(rid, "rejected", f"request {rid} {misfit}"))
            return
        self.requests[rid] = DecodeRequest(dest, list(msg.prompt_ids), msg.sampling, frozenset(msg.eos_ids))
        self._admit_reservations()

    def _admit_reservations(self) -> None:
        # FIFO (records keep their arrival order): a large reservation at the head is not
        # overtaken, so it cannot starve.
        for rid, req in [(r, q) for r, q in self.requests.items() if q.state is DecodeState.QUEUED]:
            cached = self.engine.reserve_imported(rid, req.prompt_ids)
            if cached is None:
                return
            req.state, req.cached_tokens = DecodeState.RESERVED, cached
            req.next_pos = [cached] * self.lm.config.num_layers
            self.reserved_kv.open(rid, cached, len(req.prompt_ids))  # before Reserved: KV may follow it at once
            queued_ms = (time.perf_counter() - req.asked_s) * 1e3
            self.io.send(req.owner, Reserved(rid, self.engine.blocks_held(rid), queued_ms, cached))

    def _place(self, kv: _DecodedKV) -> None:
        inc = self._in(kv.request_id, DecodeState.RESERVED)
        if inc is None:
            return  # aborted, or never reserved here: nothing to place it in
        n, layers = kv.k.shape[1], range(kv.layer_start, kv.layer_start + kv.k.shape[0])
        bad = next((f"layer {i} continues at token {inc.next_pos[i]}, not {kv.token_start}" for i in layers
                    if i >= len(inc.next_pos) or inc.next_pos[i] != kv.token_start), None)
        if bad is None and kv.token_start + n > len(inc.prompt_ids):
            bad = f"KV of tokens {kv.token_start}..{kv.token_start + n - 1} for a prompt of {len(inc.prompt_ids)}"
        if bad is not None:
            self.abort(kv.request_id, notify=True, reason="bad-field", message=bad)
            return
        t0 = time.perf_counter()
        for i, layer in enumerate(layers):
            self.engine.import_kv_layer(kv.request_id, layer, kv.k[i], kv.v[i], start=kv.token_start)
            inc.next_pos[layer] += n
        inc.decode_ms += kv.decode_ms + (time.perf_counter() - t0) * 1e3
        inc.first_arrival_s = inc.first_arrival_s or kv.arrival_s
        inc.last_arrival_s = kv.arrival_s

    def _join(self, done: KVDone) -> None:
        rid = done.request_id
        inc = self._in(rid, DecodeState.RESERVED)
        if inc is None:
            return
        self.reserved_kv.close(rid)
        if done.num_tokens != len(inc.prompt_ids) or any(n != len(inc.prompt_ids) for n in inc.next_pos):
            missing = [i for i, n in enumerate(inc.next_pos) if n != len(inc.prompt_ids)]
            self.abort(rid, notify=True, reason="truncated", message=f"KV of layers {missing[:5]} never arrived")
            return
        event = self.engine.add_imported(rid, inc.prompt_ids, done.first_token, inc.sampling, eos_ids=inc.eos_ids)
        inc.state = DecodeState.RUNNING
        if done.sampler_state:
            self.engine.set_sampler_state(rid, done.sampler_state)  # checked on arrival (workers/checks.py)
        inc.kv_done_s = time.perf_counter()
        first, last = inc.first_arrival_s or time.perf_counter(), inc.last_arrival_s or time.perf_counter()
        inc.first_stats = replace(  # the prefill worker's figures, and ours (this clock)
            done.stats,
            kv_transfer_ms=(last - first) * 1e3,
            kv_decode_ms=inc.decode_ms,
            reserve_to_kv_done_ms=(time.perf_counter() - inc.asked_s) * 1e3,
            decode_cached_tokens=inc.cached_tokens,
        )
        if event is not None:  # the first token already ended it (EOS, max_tokens 1)
            self._step_start = time.perf_counter()
            self._send_tokens(rid, (), event.finish_reason)

    def _prefill_here(self, dest: Dest, msg: PrefillHere) -> None:
        rid = msg.request_id
        inc = self._in(rid, DecodeState.RESERVED)
        if inc is None:
            self.io.send(dest, Error(rid, "unknown", f"request {rid} holds no reservation here"))
            return
        self.reserved_kv.close(rid)
        if inc.next_pos and any(n != inc.cached_tokens for n in inc.next_pos):
            self.abort(rid, notify=True, reason="bad-field", message="PrefillHere after KV began to arrive")
            return
        self.engine.prefill_reserved(rid, inc.prompt_ids, inc.sampling, inc.eos_ids)
        inc.state, inc.prefill_here_s = DecodeState.PREFILLING_HERE, time.perf_counter()

    def step(self) -> list[TokenEvent]:
        self._step_start = time.perf_counter()
        return self.engine.step()

    def on_events(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for ev in events:
            req = self.requests.get(ev.request_id)
            if req is None:
                continue
            if req.state is DecodeState.PREFILLING_HERE:  # the first token of a prompt computed here
                req.state = DecodeState.RUNNING
                self.io.send(req.owner, FirstToken(ev.request_id, ev.token_id, self.first_token_stats(req, now),
                                                   ev.logprobs))
                if ev.finish_reason is not None:
                    self._send_tokens(ev.request_id, (), ev.finish_reason)
                continue
            self._send_tokens(ev.request_id, (ev.token_id,), ev.finish_reason, ev.logprobs)
        self._admit_reservations()  # finished requests may have freed blocks

    def first_token_stats(self, req: DecodeRequest, now: float) -> RequestStats:
        """The figures of a first token computed here (`PrefillHere`)."""
        asked = req.prefill_here_s or now
        return RequestStats(queue_ms=max(0.0, self._step_start - asked) * 1e3,
                            prefill_ms=(now - max(asked, self._step_start)) * 1e3,
                            prefix_cached_tokens=req.cached_tokens, decode_cached_tokens=req.cached_tokens)

    def _send_tokens(self, rid: str, tokens: tuple[int, ...], finish_reason: str | None,
                     logprobs: TokenLogprobs | None = None) -> None:
        req = self.requests.get(rid)
        if req is None:
            return
        stats, done_s = req.first_stats, req.kv_done_s
        req.first_stats = req.kv_done_s = None  # the first Tokens only
        if stats is not None and done_s is not None:  # KVDone → the step that decoded its first token, this clock
            stats = replace(stats, handoff_ms=max(0.0, self._step_start - done_s) * 1e3)
        self.io.send(req.owner, Tokens(rid, tokens, finish_reason, stats, (logprobs,) if logprobs else ()))
        if finish_reason is not None:
            del self.requests[rid]  # the engine freed its blocks as its sequence finished

    def abort(self, request_id: str, notify: bool, reason: str = "abort", message: str = "") -> None:
        self.reserved_kv.close(request_id)
        super().abort(request_id, notify, reason, message)  # frees its blocks, drops its record
        self._admit_reservations()

    def decoding_ids(self) -> list[str]:
        return [rid for rid, r in self.requests.items() if r.state is DecodeState.RUNNING]

    def adopt(self, switch: RoleSwitch) -> None:
        # decode ⇄ colocated: the records as they are, and the windows KV still arriving lands through
        if switch.reserved_kv is not None:
            self.reserved_kv = switch.reserved_kv
        self.requests.update(switch.adopted)
        self._admit_reservations()

    def begin_switch(self) -> None:
        if self.switch is not None and self.switch.keeps:
            return  # to colocated (or back): every request stays, reservations queued for memory too
        # Reservations still queued for memory: no KV is on its way (the coordinator sends `Prefill`
        # only after `Reserved`), so their coordinators retry them elsewhere at once.
        for rid in [r for r, q in self.requests.items() if q.state is DecodeState.QUEUED]:
            self.abort(rid, notify=True, reason="draining",
                       message=f"{self.config.role} worker {self.address} is switching role")

    def extra_stats(self) -> dict[str, int]:
        states = [r.state for r in self.requests.values()]
        return {"queued_reservations": states.count(DecodeState.QUEUED),
                "incoming": states.count(DecodeState.RESERVED)}
