"""`disagg colocated-worker`: both phases in one process, the baseline disaggregation is measured
against. The same engine interleaves prefills and decodes in one loop (chunked prefill optional).

Life of a request here (its `ColocatedRequest`): `Generate` → waits for a batch slot → prefilled
(possibly in chunks that share steps with running decodes) → `FirstToken` (`first_token_sent`) →
one `Tokens` per step until EOS or max_tokens, when its record is dropped (or `abort` drops it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from disagg_cli.engine.engine import TokenEvent
from disagg_cli.protocol import Error, FirstToken, Generate, RequestStats, Tokens
from disagg_cli.workers.base import Dest, log
from disagg_cli.workers.peers import PeerLost
from disagg_cli.workers.worker import Worker, WorkerRequest


@dataclass
class ColocatedRequest(WorkerRequest):
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_sent: bool = False


class ColocatedWorker(Worker[ColocatedRequest]):
    def handle(self, dest: Dest, item: Any) -> None:
        if isinstance(item, Error):  # never answered: two workers would trade errors for ever
            log("colocated", f"peer error: {item.reason}: {item.message:.300}")
            return
        if isinstance(item, PeerLost):  # a worker this one moved KV to (a role switch): its coordinator sees
            log("colocated", f"{item.message} [{item.reason}]")
            return
        if not isinstance(item, Generate):
            self.io.send(dest, Error(getattr(item, "request_id", None), "unexpected",
                                     f"a colocated worker does not take {item.kind}"))
            return
        rid = item.request_id
        if rid in self.requests:
            self.io.send(dest, Error(rid, "duplicate", f"request {rid} is already running here"))
            return
        try:
            self.engine.add_request(rid, list(item.prompt_ids), item.sampling, frozenset(item.eos_ids))
        except ValueError as e:
            self.io.send(dest, Error(rid, "rejected", str(e)))
            return
        self.requests[rid] = ColocatedRequest(dest)

    def adopt(self, request_id: str, owner: Dest) -> None:
        self.requests[request_id] = ColocatedRequest(owner, first_token_sent=True)

    def decoding_ids(self) -> list[str]:
        return [rid for rid, r in self.requests.items() if r.first_token_sent]

    def step(self) -> list[TokenEvent]:
        self._step_start = time.perf_counter()
        return self.engine.step()

    def on_events(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for ev in events:
            rid = ev.request_id
            req = self.requests.get(rid)
            if req is None:
                continue
            owner = req.owner
            if not req.first_token_sent:
                req.first_token_sent = True
                arrival = req.arrival_s
                self.io.send(owner, FirstToken(rid, ev.token_id, RequestStats(
                    queue_ms=max(0.0, self._step_start - arrival) * 1e3,
                    prefill_ms=(now - max(arrival, self._step_start)) * 1e3), ev.logprobs))
                if ev.finish_reason is not None:
                    self.io.send(owner, Tokens(rid, (), ev.finish_reason))
            else:
                self.io.send(owner, Tokens(rid, (ev.token_id,), ev.finish_reason,
                                           logprobs=(ev.logprobs,) if ev.logprobs else ()))
            if ev.finish_reason is not None:
                del self.requests[rid]  # its blocks went with its sequence
