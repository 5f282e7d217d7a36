"""`disagg prefill-worker`: turns prompts into KV caches and streams them to decode workers.

Life of a request here:
1. `Prefill` arrives (prompt ids, sampling, the decode worker's address and how many leading
   prompt tokens it already holds); it waits in the engine with other prompts, which are batched
   up to the token budget; the engine computes only what its prefix cache lacks;
2. during the step's forward pass, as each layer's K/V is computed, the engine hands it to the
   I/O thread, which encodes it (`--kv-codec`) and sends it straight to the decode worker while the
   engine computes the next layer: the KV of the prompt tokens the decode worker lacks, that is
   the fresh tokens plus any cached here but not there (read from this worker's pool);
3. after the step: `FirstToken` to the coordinator (its TTFT), then `KVDone` (first token, sampler
   state, timings) to the decode worker; the request's blocks are freed at once.
Its record (`PrefillRequest`, the engine thread's) is PREFILLING in `requests` through 1-2 and
HANDED_OFF after 3, in the bounded `handed_off`; the figures of its KV on the way out are its
`KVStream`, which the I/O thread alone writes as it encodes (`workers/kv_out.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch

from disagg_cli.config import WorkerConfig
from disagg_cli.engine.engine import TokenEvent
from disagg_cli.protocol import Error, FirstToken, Prefill, RequestStats
from disagg_cli.workers.base import Dest, log
from disagg_cli.workers.kv_out import Done, EncodeLayer, KVStream
from disagg_cli.workers.peers import PeerLost
from disagg_cli.workers.stop import StopFlag
from disagg_cli.workers.worker import Worker, WorkerRequest


class PrefillState(Enum):
    PREFILLING = "prefilling"  # waiting for or in an engine step; its KV streams out layer by layer
    HANDED_OFF = "handed_off"  # first token out, blocks freed; remembered so a lost decode fails it over


@dataclass
class PrefillRequest(WorkerRequest):
    """One request on a prefill worker (the engine thread's), from `Prefill` to its hand-off."""

    decode: Dest  # ("peer", (address, instance)) of the decode process holding the reservation
    num_tokens: int
    sent_upto: list[int]  # per layer: the prompt position up to which the decode worker has the KV
    arrival_s: float = field(default_factory=time.perf_counter)
    state: PrefillState = PrefillState.PREFILLING
    stream: KVStream = field(default_factory=KVStream)


class PrefillWorker(Worker[PrefillRequest]):
    prefill_only = True

    def __init__(self, config: WorkerConfig, cache_dir: Any, stop: StopFlag | None = None, **kwargs: Any) -> None:
        super().__init__(config, cache_dir, stop, **kwargs)
        # Requests whose KV left this worker (HANDED_OFF), by id; bounded. Kept so a decode process
        # lost after the hand-off still gets its requests failed over.
        self.handed_off: dict[str, PrefillRequest] = {}

    def handle(self, dest: Dest, item: Any) -> None:
        if isinstance(item, Prefill):
            rid = item.request_id
            if rid in self.requests:
                self.io.send(dest, Error(rid, "duplicate", f"request {rid} is already being prefilled here"))
                return
            try:
                self.engine.add_request(rid, list(item.prompt_ids), item.sampling)
            except ValueError as e:  # larger than the pool, empty prompt
                self.io.send(dest, Error(rid, "rejected", str(e)))
                return
            decode = ("peer", (item.decode_addr, item.decode_instance))
            held = [item.decode_cached_tokens] * self.lm.config.num_layers
            self.requests[rid] = PrefillRequest(dest, decode, len(item.prompt_ids), held)
        elif isinstance(item, PeerLost):
            log("prefill", f"{item.message} [{item.reason}]; failing the requests streamed there")
            for rid in [r for r, req in self._streams() if _lost_to(req.decode, item)]:
                self._fail(rid, item.reason, item.message)
        elif isinstance(item, Error):
            log("prefill", f"peer error: {item.reason}: {item.message:.300}")
            if item.request_id is not None:
                self._fail(item.request_id, item.reason, item.message)
        else:
            self.io.send(dest, Error(getattr(item, "request_id", None), "unexpected",
                                     f"a prefill worker does not take {item.kind}"))

    def step(self) -> list[TokenEvent]:
        t0 = time.perf_counter()
        events = self.engine.step(on_layer=self._on_layer)
        self._step_start = t0
        self._step_stats = RequestStats(prefill_ms=(time.perf_counter() - t0) * 1e3, batch_size=len(events))
        return events

    def _on_layer(self, layer: int, fresh: list[tuple[str, int, torch.Tensor, torch.Tensor]]) -> None:
        for rid, start, k, v in fresh:
            p = self.requests.get(rid)
            if p is None:
                continue
            end, held = start + k.shape[0], p.sent_upto[layer]
            if end <= held:
                continue  # the decode worker holds all of this chunk already
            if held < start:  # cached here, not there: read it from the pool, before the fresh part
                ck, cv = self.engine.read_kv(rid, layer, held, start)
                k, v = torch.cat([ck, k]), torch.cat([cv, v])
            elif held > start:
                k, v = k[held - start :], v[held - start :]
            p.sent_upto[layer] = end
            # KV leaves the engine thread as views; the I/O thread encodes it
            self.io.send(p.decode, EncodeLayer(p.stream, p.decode, rid, layer, held, k.to("cpu"), v.to("cpu")))

    def on_events(self, events: list[TokenEvent]) -> None:
        end_unix = time.time()
        stats = self._step_stats
        for ev in events:
            rid = ev.request_id
            p = self.requests.pop(rid, None)
            if p is None:
                continue
            state = self.engine.sampler_state(rid)
            cached = self.engine.cached_prompt_tokens(rid)
            self.engine.release(rid)
            first = replace(stats, queue_ms=(self._step_start - p.arrival_s) * 1e3, prefix_cached_tokens=cached)
            self.io.send(p.owner, FirstToken(rid, ev.token_id, first, ev.logprobs))
            self.io.send(p.decode, Done(p.stream, p.num_tokens, rid, ev.token_id, state, end_unix))
            p.state = PrefillState.HANDED_OFF
            self.handed_off[rid] = p
            if len(self.handed_off) > 10_000:
                self.handed_off.pop(next(iter(self.handed_off)))

    def _streams(self) -> list[tuple[str, PrefillRequest]]:
        """Every request prefilling or handed off, by id."""
        return [*self.requests.items(), *self.handed_off.items()]

    def _fail(self, rid: str, reason: str, message: str) -> None:
        """The request's KV cannot reach (or was lost by) its decode worker: tell its coordinator,
        whether or not its first token has gone out, so it retries; free what it holds here."""
        p = self.requests.get(rid) or self.handed_off.get(rid)
        self.handed_off.pop(rid, None)
        if p is not None:
            self.io.send(p.owner, Error(rid, reason, message))
        self.abort(rid, notify=False)

    def abort(self, request_id: str, notify: bool, reason: str = "abort", message: str = "") -> None:
        p = self.requests.get(request_id) or self.handed_off.get(request_id)
        if p is not None:
            p.stream.cancelled.set()  # its KV not yet out stays here
        super().abort(request_id, notify, reason, message)


def _lost_to(decode: Dest, lost: PeerLost) -> bool:
    address, instance = decode[1]
    return address == lost.address and (not lost.instance or not instance or instance == lost.instance)
