"""The coordinator: drives each request through the workers, over the links it holds.

`Coordinator` holds a `WorkerConnections` (`membership.py`: which workers there are, handshake,
heartbeats, liveness, and the router whose records say who is alive) as `connections`; front ends
call `connect`/`close` (or `async with`), `run_request`, and reach the workers through
`coordinator.connections` (`poll_stats`, `wait_idle`, `add_worker`, …).

Life of one disaggregated request in `run_request` (`out.state` in quotes):
1. "queued": the router picks a decode and a prefill worker;
2. "reserving": `Reserve` to the decode worker, wait for `Reserved` (it may queue for memory;
   it says how many leading prompt tokens the decode worker's prefix cache holds);
3. "prefilling": `Prefill` (with the decode worker's address and cached token count) to the
   prefill worker; or, when the part of the prompt the decode worker lacks is short enough
   (`disagg_threshold`: selective disaggregation), `PrefillHere` to the decode worker, which
   computes it itself and sends the first token (no prefill worker, no transfer);
4. "transferring": `FirstToken` came from the prefill worker (TTFT); the KV is on its way;
5. "decoding": `Tokens` stream from the decode worker (any that overtook the first token wait for
   it); each is appended to `out`, which detokenizes and spots stop strings;
6. "done" or "failed": when `out` finishes before the worker does (a stop string), or fails
   (an `Error`, a timeout, a silent worker, Ctrl-C), `Abort` goes to every worker still holding
   the request, so no KV block stays taken.
A colocated request is `Generate` to one worker, then 4-6. When a worker dies, restarts or shuts
down mid-request, or a stage makes no progress within its deadline ("stalled"), the request runs
again on the workers left (`RETRYABLE`), prefilling its prompt plus the tokens produced so far.
While no worker of a role is up, the request waits for one to join or come back. Retries and waits
are bounded by the request's own deadline (`Deadlines.request_s`), not by a count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import zmq

from disagg_cli.coordinator.attempt import BACKOFF_S, RETRYABLE, Attempt
from disagg_cli.coordinator.membership import WorkerConnections
from disagg_cli.coordinator.options import CoordinatorConfig
from disagg_cli.coordinator.request_stats import copy_stats
from disagg_cli.coordinator.role_switch import SwitchLog, SwitchOutcome, switch_role
from disagg_cli.coordinator.router import NoWorkerError, Router, local_prefill_pays, prompt_wait_s
from disagg_cli.coordinator.timeouts import wait_within
from disagg_cli.coordinator.worker_link import RequestFailed, WorkerGone, WorkerLink
from disagg_cli.engine.request import RequestOutput
from disagg_cli.protocol import (
    COMPLETED_REASONS,
    Abort,
    Error,
    FirstToken,
    Generate,
    Message,
    Prefill,
    PrefillHere,
    Reserve,
    Reserved,
    Tokens,
    encode_message,
)

__all__ = ["Coordinator", "CoordinatorConfig", "SwitchOutcome"]

log = logging.getLogger(__name__)


class Coordinator:
    """Workers to send requests to; `run_request` many requests at once, one task each."""

    def __init__(self, workers: list[tuple[str, str]], eos_ids: frozenset[int],
                 config: CoordinatorConfig = CoordinatorConfig(),
                 probe: Callable[[str], bool] | None = None) -> None:
        """Arguments as `WorkerConnections`'s: (role, address) pairs, the tokenizer's EOS ids, the
        settings, and `probe(address)` True when a worker's process is known to be gone."""
        self.connections = WorkerConnections(workers, eos_ids, config, probe)
        self.config = config
        self.eos_ids = self.connections.eos_ids
        self.attempts: dict[str, Attempt] = {}  # by wire id: the attempts in flight (a role switch moves them)
        self.switches = SwitchLog()  # role switches by (from, to), for /metrics and the planner

    @property
    def router(self) -> Router:
        return self.connections.router

    async def connect(self, check: Callable[[], None] | None = None, join_grace_s: float | None = None) -> None:
        await self.connections.connect(check, join_grace_s)

    async def close(self) -> None:
        await self.connections.close()

    async def __aenter__(self) -> Coordinator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def switch_role(self, address: str, role: str) -> SwitchOutcome:
        """Change the role of the (elastic) worker at `address` to "prefill", "decode" or "colocated"
        in place (`role_switch.py`): no new request goes there meanwhile; when it stops decoding, the
        requests it decodes move with their KV to another decode (or colocated) worker, or finish
        there when none can take them; between decode and colocated they stay. Returns what
        happened; raises `DisaggError` when the worker is unknown, not alive, dies mid-switch or
        refuses (not started `--elastic`), `UsageError` for a role that is none of the three."""
        return await switch_role(self, address, role)

    # --- requests -------------------------------------------------------------------------------

    async def run_request(self, out: RequestOutput, on_text: Callable[[str], None] | None = None) -> None:
        """Drive `out` to the end (done or failed, never an exception but cancellation);
        `on_text` gets each piece of newly printable text.

        When a worker dies, shuts down or stalls mid-request, the request is retried on the workers
        left: prompt plus the tokens already produced are prefilled again (the KV died with the
        worker), so the text continues where it stopped and nothing is printed twice."""
        attempt = 0
        deadline = time.monotonic() + self.config.deadlines.request_s
        avoid: set[str] = set()  # workers that stalled this request: others first on a retry
        while True:
            if attempt:  # after the last attempt's workers were told to abort (its `finally`)
                await asyncio.sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
            done = len(out.token_ids)
            params = replace(out.params, max_tokens=out.params.max_tokens - done)
            wire_id = out.request_id if attempt == 0 else f"{out.request_id}.retry{attempt}"
            run = Attempt(out, on_text, self.connections.open_queue(wire_id), wire_id,
                       tuple(out.prompt_token_ids) + tuple(out.token_ids), params, deadline, avoid)
            self.attempts[wire_id] = run
            try:
                if self._colocated_mode(len(run.prompt_ids)):
                    await self._colocated(run)
                else:
                    await self._disaggregated(run)
                return
            except RequestFailed as e:
                pause = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                retryable = e.reason in RETRYABLE and not out.is_finished
                if retryable and time.monotonic() + pause < deadline:
                    attempt += 1
                    out.kv["retries"] = float(attempt)
                    log.warning("retrying %s (attempt %d) after: %s", out.request_id, attempt, e.message)
                    continue
                spent = f" (after {attempt} retries; --request-timeout {self.config.deadlines.request_s:g} s)"
                out.fail(e.reason, e.message + (spent if retryable else ""))
                return
            except NoWorkerError as e:
                out.fail("no-worker", f"{e}, and none came back within --request-timeout "
                                      f"{self.config.deadlines.request_s:g} s" + (f" (after {attempt} retries)"
                                                                                if attempt else ""))
                return
            except asyncio.CancelledError:
                out.fail("aborted", "interrupted before it finished")
                raise
            finally:
                await self._end(run)

    def _colocated_mode(self, prompt_tokens: int) -> bool:
        """Whether a request goes whole to a colocated worker: where there are only colocated workers
        (or no prefill ones). Beside prefill workers, which only elastic roles make: with decode
        workers too, where the least loaded colocated worker is no busier than the least loaded decode
        worker; without, where its prompt would wait least (else it is prefilled on a prefill worker
        and decodes on the colocated one)."""
        r = self.router
        if not r.by_role("colocated"):
            return False
        if not r.by_role("prefill"):
            return True
        colocated = [w for w in r.by_role("colocated") if w.routable]
        if not r.by_role("decode"):
            prefill = [w for w in r.by_role("prefill") if w.routable]
            both = colocated + prefill
            return bool(colocated) and (not prefill or min(prompt_wait_s(w, prompt_tokens, both) for w in colocated)
                                        <= min(prompt_wait_s(w, prompt_tokens, both) for w in prefill))
        decode = [w.load for w in r.by_role("decode") if w.routable]
        return bool(colocated) and (not decode or min(w.load for w in colocated) <= min(decode))

    async def _disaggregated(self, run: Attempt) -> None:
        out = run.out
        # beside prefill workers and no decode one (elastic roles), a colocated worker decodes
        decode = await self._take(run, "decode" if self.router.by_role("decode") else "colocated")
        run.decode = decode.record
        decode.check_fits(len(out.prompt_token_ids), out.params.max_tokens)
        out.state = "reserving"
        t0 = time.perf_counter()
        eos_ids = () if out.params.ignore_eos else self.eos_ids
        await self.connections.send(decode, Reserve(run.wire_id, run.prompt_ids, run.params, eos_ids))
        _, reserved = await self._expect(run, Reserved, "a reservation", self.config.deadlines.reserve_s)
        assert isinstance(reserved, Reserved)
        out.timings.stages_ms["reserve_ms"] = (time.perf_counter() - t0) * 1e3
        out.timings.stages_ms["reserve_queued_ms"] = reserved.queued_ms
        out.kv["reserved_blocks"] = reserved.num_blocks
        out.kv["decode_cached_tokens"] = float(reserved.cached_tokens)
        if self._prefill_here(run, decode, reserved.cached_tokens):
            out.workers = {"decode": decode.record.address}
            out.kv["local_prefill"] = 1.0
            out.state = "prefilling"
            await self.connections.send(decode, PrefillHere(run.wire_id))
            await self._receive(run, self.config.deadlines.first_token_s)
            return
        prefill = await self._take(run, "prefill")
        run.queued = (prefill.record, self.router.queue_prefill(prefill.record, run.prompt_ids))
        out.workers = {"prefill": prefill.record.address, "decode": decode.record.address}
        out.state = "prefilling"
        instance = decode.ack.instance_id if decode.ack else ""
        await self.connections.send(prefill, Prefill(run.wire_id, run.prompt_ids, run.params, decode.record.address,
                                                     instance, reserved.cached_tokens))
        early: list[Tokens] = []  # decode tokens that overtook the first token on another socket
        while not out.is_finished:
            if run.got_first:
                timeout, what = self.config.deadlines.token_s, "tokens"
            else:
                timeout, what = self.config.deadlines.first_token_s, "the first token"
            src, msg = await self._expect(run, (FirstToken, Tokens), what, timeout)
            if isinstance(msg, FirstToken):
                self._done_with(run, src)
                out.state = "transferring"
                self._first_token(run, msg)
                for tokens in early:
                    self._tokens(run, decode, tokens)
            elif not run.got_first:
                assert isinstance(msg, Tokens)
                early.append(msg)
            else:
                assert isinstance(msg, Tokens)
                self._tokens(run, src, msg)

    async def _colocated(self, run: Attempt) -> None:
        out = run.out
        worker = await self._take(run, "colocated")
        worker.check_fits(len(out.prompt_token_ids), out.params.max_tokens)
        run.queued = (worker.record, self.router.queue_prefill(worker.record, run.prompt_ids))
        out.workers = {"colocated": worker.record.address}
        out.state = "prefilling"
        eos_ids = () if out.params.ignore_eos else self.eos_ids
        await self.connections.send(worker, Generate(run.wire_id, run.prompt_ids, run.params, eos_ids))
        await self._receive(run, self.config.deadlines.first_token_s + self.config.deadlines.reserve_s)
        self.router.note_cached(worker.record, run.prompt_ids)

    async def _receive(self, run: Attempt, first_token_s: float) -> None:
        """The first token, then tokens, from the one worker that computes the whole request."""
        out = run.out
        while not out.is_finished:
            if run.got_first:
                timeout, what = self.config.deadlines.token_s, "tokens"
            else:
                timeout, what = first_token_s, "the first token"
            src, msg = await self._expect(run, (FirstToken, Tokens), what, timeout)
            if isinstance(msg, FirstToken):
                self._first_token(run, msg)
                if not out.is_finished:  # a first token that was also the last (max_tokens 1) ended it
                    out.state = "decoding"
            else:
                assert isinstance(msg, Tokens)
                self._tokens(run, src, msg)

    def _prefill_here(self, run: Attempt, decode: WorkerLink, cached_tokens: int) -> bool:
        """Selective disaggregation: whether the decode worker computes this prompt itself."""
        uncached = len(run.prompt_ids) - cached_tokens
        threshold = self.config.disagg_threshold
        if threshold != "auto":
            return uncached <= int(threshold)
        return local_prefill_pays(uncached, decode.record, [r for r in self.router.by_role("prefill") if r.routable])

    async def _take(self, run: Attempt, role: str) -> WorkerLink:
        """A live worker of `role` (waiting for one to join or come back, up to the request's
        deadline), preferring workers that have not stalled this request."""
        await self.connections.wait_for_worker(role, run.deadline)
        record = self.router.pick(role, avoid=run.avoid, prompt_ids=run.prompt_ids)
        conn = self.connections.link(record.address)
        run.active.append(conn)
        conn.request_ids.add(run.wire_id)
        return conn

    def _done_with(self, run: Attempt, conn: WorkerLink) -> None:
        """The worker finished its part of the request itself: no abort needed there."""
        if conn in run.active:
            run.active.remove(conn)
            conn.request_ids.discard(run.wire_id)
            self.router.release(conn.record)

    async def _expect(self, run: Attempt, kinds: type | tuple[type, ...], what: str,
                      timeout: float) -> tuple[WorkerLink, Message]:
        """The request's next message; `stalled` when none comes within `timeout` (the stage's
        progress deadline) or before the request's own deadline."""
        left = run.deadline - time.monotonic()
        try:
            src, msg = await wait_within(run.queue.get(), min(timeout, left))
        except asyncio.TimeoutError:
            names = ", ".join(c.name for c in run.active) or "no worker"
            run.avoid.update(c.record.address for c in run.active)
            within = f"{timeout:g} s" if timeout < left else "the request's deadline"
            raise RequestFailed("stalled", f"no {what} from {names} within {within}") from None
        if isinstance(msg, WorkerGone):
            raise RequestFailed("worker-dead", msg.reason)
        if isinstance(msg, Error):
            self._done_with(run, src)
            raise RequestFailed(msg.reason, f"{src.name}: {msg.message} [{msg.reason}]")
        if not isinstance(msg, kinds):
            raise RequestFailed("error", f"{src.name} sent {msg.kind} while {what} were expected")
        return src, msg

    def _first_token(self, run: Attempt, msg: FirstToken) -> None:
        run.got_first = True
        self._unqueue(run)
        copy_stats(run.out, msg.stats)
        run.emit(run.out.append(msg.token_id, msg.logprobs))

    def _tokens(self, run: Attempt, src: WorkerLink, msg: Tokens) -> None:
        out = run.out
        if out.is_finished:  # decode tokens that overtook a first token which ended the request (EOS, stop,
            if msg.finish_reason is not None:  # max_tokens): discarded, the request left done (marking it
                self._done_with(run, src)  # decoding again lost its answer: a 500 "ended without an answer")
            return
        if out.state != "decoding":
            out.state = "decoding"
            copy_stats(out, msg.stats)
        for i, token_id in enumerate(msg.token_ids):
            if out.is_finished:
                break  # a stop string: the rest is discarded and the worker aborted
            run.emit(out.append(token_id, msg.logprobs[i] if i < len(msg.logprobs) else None))
        if msg.finish_reason is not None:
            self._done_with(run, src)
            if not out.is_finished:
                out.fail("error", f"{src.name} ended the request ({msg.finish_reason}) after "
                         f"{len(out.token_ids)} tokens, before EOS or --max-tokens {out.params.max_tokens}")

    async def _end(self, run: Attempt) -> None:
        rid = run.wire_id
        run.ended = True
        self.attempts.pop(rid, None)
        self.connections.close_queue(rid)
        self._unqueue(run)
        if run.decode is not None and run.out.finish_reason in COMPLETED_REASONS:
            # The decode worker computed the prompt and all but the last token: its cache holds them.
            self.router.note_cached(run.decode, (*run.out.prompt_token_ids, *run.out.token_ids)[:-1])
        for conn in list(run.active):
            if conn.record.is_alive:
                try:
                    reason = run.out.finish_reason or "abort"
                    await wait_within(conn.sock.send_multipart(encode_message(Abort(rid, reason))), 1.0)
                except (asyncio.TimeoutError, zmq.ZMQError):
                    log.warning("could not send abort of %s to %s", rid, conn.name)
            conn.request_ids.discard(rid)
            self.router.release(conn.record)
        run.active.clear()

    def _unqueue(self, run: Attempt) -> None:
        if run.queued is not None:
            self.router.unqueue_prefill(*run.queued)
            run.queued = None
