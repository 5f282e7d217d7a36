"""`disagg colocated-worker`: both phases in one process, the baseline disaggregation is measured
against. The same engine interleaves prefills and decodes in one loop (chunked prefill optional).

Life of a request here (a `DecodeRequest`, as a decode worker keeps one): `Generate` → waits for a
batch slot (PREFILLING_HERE) → prefilled (possibly in chunks that share steps with running decodes)
→ `FirstToken` (RUNNING) → one `Tokens` per step until EOS or max_tokens, when its record is dropped
(or `abort` drops it). And it decodes what a decode worker does: a request moved here with its KV by
a role switch (`Reserve`, `KVLayers`, `KVDone`: `workers/decode.py`), so an elastic switch may move
requests to a colocated worker too.
"""

from __future__ import annotations

import time
from typing import Any

from disagg_cli.protocol import Error, Generate, RequestStats
from disagg_cli.workers.base import Dest
from disagg_cli.workers.decode import DecodeRequest, DecodeState, DecodeWorker


class ColocatedWorker(DecodeWorker):
    def handle(self, dest: Dest, item: Any) -> None:
        if not isinstance(item, Generate):
            super().handle(dest, item)  # a moved request's reservation, KV and KVDone; errors never answered
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
        self.requests[rid] = DecodeRequest(dest, list(item.prompt_ids), item.sampling, frozenset(item.eos_ids),
                                           state=DecodeState.PREFILLING_HERE, prefill_here_s=time.perf_counter())

    def first_token_stats(self, req: DecodeRequest, now: float) -> RequestStats:
        asked = req.prefill_here_s or now
        return RequestStats(queue_ms=max(0.0, self._step_start - asked) * 1e3,
                            prefill_ms=(now - max(asked, self._step_start)) * 1e3)

    def extra_stats(self) -> dict[str, int]:
        return {}  # a decode worker's own figures; a colocated worker's heartbeat has none
