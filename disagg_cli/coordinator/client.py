"""The coordinator's side of the wire: connections to workers and the drive of each request.

Owns one DEALER socket per worker (its reader task routes replies by request id to a per-request
queue), the handshake, heartbeats and dead-worker detection. Life of one disaggregated request in
`run_request` (`out.state` in quotes):
1. "queued": the router picks a decode and a prefill worker;
2. "reserving": `Reserve` to the decode worker, wait for `Reserved` (it may queue for memory);
3. "prefilling": `Prefill` (with the decode worker's address) to the prefill worker;
4. "transferring": `FirstToken` came from the prefill worker (TTFT); the KV is on its way;
5. "decoding": `Tokens` stream from the decode worker (any that overtook the first token wait for
   it); each is appended to `out`, which detokenizes and spots stop strings;
6. "done" or "failed": when `out` finishes before the worker does (a stop string), or fails
   (an `Error`, a timeout, a silent worker, Ctrl-C), `Abort` goes to every worker still holding
   the request, so no KV block stays taken.
A colocated request is `Generate` to one worker, then 4-6. Retrying elsewhere is not done here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq
import zmq.asyncio

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.router import NoWorkerError, Router, WorkerRecord
from disagg_cli.engine.request import RequestOutput
from disagg_cli.errors import DisaggError
from disagg_cli.keys import Keys
from disagg_cli.kv.wire import (
    PROTOCOL_VERSION,
    Abort,
    Error,
    FirstToken,
    Generate,
    Heartbeat,
    Hello,
    HelloAck,
    Message,
    Prefill,
    Refuse,
    Reserve,
    Reserved,
    Tokens,
    WireError,
    decode_message,
    encode_message,
)

log = logging.getLogger(__name__)
_SEND_LINGER_MS = 500  # on close, how long queued messages (aborts) may still go out


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    policy: str = "round-robin"
    worker_timeout_s: float = 10.0  # silence after which a worker is dead
    handshake_timeout_s: float = 120.0  # covers a worker's start-up (loading weights)
    step_timeout_s: float = 600.0  # longest wait for a request's next message (a queued reservation)
    send_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    max_retries: int = 2  # attempts after the first when a worker dies or shuts down mid-request
    keys_dir: Path | None = None  # CurveZMQ keys (disagg keys generate); None: plain tcp


# Failures another worker can mend: the worker (and the request's KV there) is gone, not the request.
RETRYABLE = frozenset({"worker-dead", "shutdown", "draining", "truncated", "no-hello", "peer-restarted"})


@dataclass(frozen=True, slots=True)
class _WorkerGone:
    reason: str


class _Failed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(eq=False)
class _Connection:
    record: WorkerRecord
    sock: zmq.asyncio.Socket
    hello: asyncio.Future[Message]
    ack: HelloAck | None = None
    last_seen_s: float = field(default_factory=time.monotonic)
    seq: int = 0
    acked_seq: int = -1
    beat: asyncio.Event = field(default_factory=asyncio.Event)
    request_ids: set[str] = field(default_factory=set)
    reader: asyncio.Task[None] | None = None
    rehello: bool = False  # greeted again after it restarted; waiting for its ack

    @property
    def name(self) -> str:
        return f"{self.record.role} worker {self.record.address}"


class Coordinator:
    """Connections to a set of workers; `run_request` many requests at once, one task each."""

    def __init__(self, workers: list[tuple[str, str]], eos_ids: frozenset[int],
                 config: CoordinatorConfig = CoordinatorConfig()) -> None:
        """`workers`: (role, address) pairs, addresses as `tcp://host:port` (or `ipc://…`);
        `eos_ids`: the tokenizer's end-of-sequence ids, which workers stop on."""
        self.config = config
        self.eos_ids = tuple(sorted(eos_ids))
        self.router = Router([WorkerRecord(addr, role) for role, addr in workers], config.policy)
        self._ctx: zmq.asyncio.Context | None = None
        self._conns: dict[str, _Connection] = {}
        self._queues: dict[str, asyncio.Queue[tuple[_Connection, Message | _WorkerGone]]] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Coordinator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- connections ----------------------------------------------------------------------------

    async def connect(self, check: Callable[[], None] | None = None) -> None:
        """Say hello to every worker and wait for all answers; `check` (called while waiting)
        may raise to fail early, e.g. when a locally started worker process exited."""
        self._ctx = zmq.asyncio.Context()
        loop = asyncio.get_running_loop()
        keys = Keys.load(self.config.keys_dir, "coordinator") if self.config.keys_dir else None
        for record in self.router.workers:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, _SEND_LINGER_MS)
            if keys is not None:
                keys.make_client(sock, record.role)
            sock.connect(record.address)  # zmq queues the hello until the worker is bound
            conn = _Connection(record, sock, loop.create_future())
            conn.reader = asyncio.create_task(self._read(conn), name=f"read {record.address}")
            self._conns[record.address] = conn
            await self._send(conn, Hello(PROTOCOL_VERSION, "coordinator", ""))
        timeout = self.config.handshake_timeout_s
        deadline = time.monotonic() + timeout
        pending = {c.hello for c in self._conns.values()}
        while pending:
            if check is not None:
                check()
            left = deadline - time.monotonic()
            if left <= 0:
                silent = [c.name for c in self._conns.values() if not c.hello.done()]
                raise DisaggError(f"no answer to hello from {', '.join(silent)} within {timeout:.0f} s; "
                                  "is a worker of that role listening at that address?")
            _, pending = await asyncio.wait(pending, timeout=min(0.25, left))
        for conn in self._conns.values():
            self._accept(conn, conn.hello.result())
        fingerprints = {c.record.address: c.ack.model_fingerprint for c in self._conns.values() if c.ack}
        if len(set(fingerprints.values())) > 1:
            (a, fa), (b, fb) = next(((a, fa), (b, fb)) for a, fa in fingerprints.items()
                                    for b, fb in fingerprints.items() if fa != fb)
            raise DisaggError(f"workers serve different models: {a} has fingerprint {fa}, {b} has {fb}; "
                              "start every worker with the same --model")
        self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")

    def _accept(self, conn: _Connection, msg: Message) -> None:
        if isinstance(msg, Refuse):
            raise DisaggError(f"{conn.name} refused this coordinator: {msg.message} [{msg.reason}]")
        if isinstance(msg, Error):
            raise DisaggError(f"{conn.name} answered hello with an error: {msg.message} [{msg.reason}]")
        assert isinstance(msg, HelloAck)
        if msg.role != conn.record.role:
            raise DisaggError(f"{conn.record.address} is a {msg.role} worker, but was given as a "
                              f"{conn.record.role} worker")
        conn.ack = msg
        conn.last_seen_s = time.monotonic()

    def capacity(self, address: str) -> dict[str, int]:
        ack = self._conns[address].ack
        return dict(ack.capacity) if ack else {}

    @property
    def model_fingerprint(self) -> str | None:
        return next((c.ack.model_fingerprint for c in self._conns.values() if c.ack), None)

    async def poll_stats(self, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
        """Fresh heartbeat stats of every live worker, by address (a beat sent now, answered)."""
        async def one(conn: _Connection) -> None:
            conn.seq += 1
            want = conn.seq
            await self._send(conn, Heartbeat(want))
            while conn.acked_seq < want:
                conn.beat.clear()
                await conn.beat.wait()

        live = [c for c in self._conns.values() if c.record.is_alive]
        try:
            await asyncio.wait_for(asyncio.gather(*(one(c) for c in live)), timeout_s)
        except asyncio.TimeoutError:
            raise DisaggError(f"no heartbeat answer within {timeout_s:.0f} s") from None
        return {c.record.address: dict(c.record.stats) for c in live}

    async def wait_idle(self, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
        """Fresh stats once every live worker reports all its KV blocks free (or at `timeout_s`).

        A worker publishes stats between engine steps, so the beat answered right after a
        request's last token may predate the release of its blocks."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = await self.poll_stats()
            if all(s.get("free_blocks") == s.get("num_blocks") for s in stats.values()) \
                    or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        tasks = [t for t in [self._heartbeat, *(c.reader for c in self._conns.values())] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in self._conns.values():
            conn.sock.close()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _send(self, conn: _Connection, msg: Message) -> None:
        try:
            await asyncio.wait_for(conn.sock.send_multipart(encode_message(msg)), self.config.send_timeout_s)
        except asyncio.TimeoutError:
            raise _Failed("timeout", f"could not send {msg.kind} to {conn.name} within "
                          f"{self.config.send_timeout_s:.0f} s") from None

    async def _read(self, conn: _Connection) -> None:
        # Runs for the connection's life; liveness is the heartbeat task's job.
        while True:
            frames = await conn.sock.recv_multipart()
            conn.last_seen_s = time.monotonic()
            try:
                msg = decode_message(frames)
            except WireError as e:
                log.warning("dropped a message from %s: %s", conn.name, e)
                continue
            self._dispatch(conn, msg)

    def _dispatch(self, conn: _Connection, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            conn.record.stats = dict(msg.stats)
            conn.acked_seq = max(conn.acked_seq, msg.seq)
            conn.beat.set()
            return
        rid = getattr(msg, "request_id", None)
        if isinstance(msg, HelloAck | Refuse) or (isinstance(msg, Error) and rid is None):
            if not conn.hello.done():
                conn.hello.set_result(msg)
            elif isinstance(msg, HelloAck):
                if not conn.record.is_alive or conn.rehello:
                    self._rejoin(conn, msg)
            elif isinstance(msg, Error) and msg.reason == "no-hello":
                self._restarted(conn)
            else:
                log.warning("%s: %s after the handshake: %s", conn.name, msg.kind, msg)
            return
        queue = self._queues.get(rid) if isinstance(rid, str) else None
        if queue is None:  # a late message for a request that already ended here
            log.debug("%s: %s for unknown request %r", conn.name, msg.kind, rid)
            return
        queue.put_nowait((conn, msg))

    async def _beat(self) -> None:
        timeout = self.config.worker_timeout_s
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            now = time.monotonic()
            for conn in self._conns.values():
                if not conn.record.is_alive:
                    # A restarted worker at the same address knows nobody: greet it again.
                    with contextlib.suppress(_Failed):
                        await self._send(conn, Hello(PROTOCOL_VERSION, "coordinator", ""))
                    continue
                if now - conn.last_seen_s > timeout:
                    self._mark_dead(conn, f"{conn.name} sent nothing for {now - conn.last_seen_s:.0f} s "
                                          f"(--worker-timeout {timeout:g} s); it is taken as dead")
                    continue
                conn.seq += 1
                # A beat that cannot go out is left to the silence check above.
                with contextlib.suppress(_Failed):
                    await self._send(conn, Heartbeat(conn.seq))

    def _rejoin(self, conn: _Connection, ack: HelloAck) -> None:
        expected = self.model_fingerprint
        if ack.role != conn.record.role or (expected and ack.model_fingerprint != expected):
            log.warning("%s came back as a %s worker of model %s; not routing to it", conn.name, ack.role,
                        ack.model_fingerprint)
            return
        conn.ack = ack
        conn.rehello = False
        conn.last_seen_s = time.monotonic()
        self.router.mark_alive(conn.record.address)
        log.warning("%s is back and takes requests again", conn.name)

    def _restarted(self, conn: _Connection) -> None:
        """The worker answered as if it never met us: it restarted faster than the heartbeat noticed.
        What it held is gone; fail those requests over (they retry) and greet it again."""
        if conn.rehello:
            return
        conn.rehello = True
        self._mark_dead(conn, f"{conn.name} restarted and lost its requests")
        conn.sock.send_multipart(encode_message(Hello(PROTOCOL_VERSION, "coordinator", "")))

    def _mark_dead(self, conn: _Connection, reason: str) -> None:
        log.warning("%s", reason)
        self.router.mark_dead(conn.record.address)
        for rid in conn.request_ids:
            if rid in self._queues:
                self._queues[rid].put_nowait((conn, _WorkerGone(reason)))

    # --- requests -------------------------------------------------------------------------------

    async def run_request(self, out: RequestOutput, on_text: Callable[[str], None] | None = None) -> None:
        """Drive `out` to the end (done or failed, never an exception but cancellation);
        `on_text` gets each piece of newly printable text.

        When a worker dies or shuts down mid-request, the request is retried on the workers left:
        prompt plus the tokens already produced are prefilled again (the KV died with the worker),
        so the text continues where it stopped and nothing is printed twice."""
        attempt = 0
        while True:
            done = len(out.token_ids)
            params = replace(out.params, max_tokens=out.params.max_tokens - done)
            wire_id = out.request_id if attempt == 0 else f"{out.request_id}.retry{attempt}"
            run = _Run(out, on_text, asyncio.Queue(), wire_id, tuple(out.prompt_token_ids) + tuple(out.token_ids),
                       params)
            self._queues[wire_id] = run.queue
            try:
                if self.router.by_role("colocated"):
                    await self._colocated(run)
                else:
                    await self._disaggregated(run)
                return
            except _Failed as e:
                if e.reason in RETRYABLE and attempt < self.config.max_retries and not out.is_finished:
                    attempt += 1
                    out.kv["retries"] = float(attempt)
                    log.warning("retrying %s (attempt %d) after: %s", out.request_id, attempt, e.message)
                    continue
                out.fail(e.reason, e.message)
                return
            except NoWorkerError as e:
                out.fail("no-worker", str(e) + (f" (after {attempt} retries)" if attempt else ""))
                return
            except asyncio.CancelledError:
                out.fail("aborted", "interrupted before it finished")
                raise
            finally:
                await self._end(run)

    async def _disaggregated(self, run: _Run) -> None:
        out = run.out
        decode = self._take(run, "decode")
        self._check_fits(out, decode)
        out.state = "reserving"
        t0 = time.perf_counter()
        eos_ids = () if out.params.ignore_eos else self.eos_ids
        await self._send(decode, Reserve(run.wire_id, run.prompt_ids, run.params, eos_ids))
        _, reserved = await self._expect(run, Reserved, "a reservation")
        assert isinstance(reserved, Reserved)
        out.timings.stages_ms["reserve_ms"] = (time.perf_counter() - t0) * 1e3
        out.timings.stages_ms["reserve_queued_ms"] = reserved.queued_ms
        out.kv["reserved_blocks"] = reserved.num_blocks
        prefill = self._take(run, "prefill")
        out.workers = {"prefill": prefill.record.address, "decode": decode.record.address}
        out.state = "prefilling"
        await self._send(prefill, Prefill(run.wire_id, run.prompt_ids, run.params, decode.record.address))
        early: list[Tokens] = []  # decode tokens that overtook the first token on another socket
        while not out.is_finished:
            src, msg = await self._expect(run, (FirstToken, Tokens), "tokens")
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

    async def _colocated(self, run: _Run) -> None:
        out = run.out
        worker = self._take(run, "colocated")
        self._check_fits(out, worker)
        out.workers = {"colocated": worker.record.address}
        out.state = "prefilling"
        eos_ids = () if out.params.ignore_eos else self.eos_ids
        await self._send(worker, Generate(run.wire_id, run.prompt_ids, run.params, eos_ids))
        while not out.is_finished:
            src, msg = await self._expect(run, (FirstToken, Tokens), "tokens")
            if isinstance(msg, FirstToken):
                self._first_token(run, msg)
                out.state = "decoding"
            else:
                assert isinstance(msg, Tokens)
                self._tokens(run, src, msg)

    def _take(self, run: _Run, role: str) -> _Connection:
        record = self.router.pick(role)
        conn = self._conns[record.address]
        run.active.append(conn)
        conn.request_ids.add(run.wire_id)
        return conn

    def _done_with(self, run: _Run, conn: _Connection) -> None:
        """The worker finished its part of the request itself: no abort needed there."""
        if conn in run.active:
            run.active.remove(conn)
            conn.request_ids.discard(run.wire_id)
            self.router.release(conn.record)

    def _check_fits(self, out: RequestOutput, conn: _Connection) -> None:
        cap = conn.ack.capacity if conn.ack else {}
        num_blocks, block_size = cap.get("num_blocks"), cap.get("block_size")
        if not num_blocks or not block_size:
            return
        need = math.ceil((len(out.prompt_token_ids) + out.params.max_tokens) / block_size)
        if need > num_blocks:
            raise _Failed("too-long", f"{len(out.prompt_token_ids)} prompt tokens + --max-tokens "
                          f"{out.params.max_tokens} need {need} KV blocks, but {conn.name} has only "
                          f"{num_blocks} blocks of {block_size} tokens in all; start it with a larger "
                          "--kv-cache-tokens")

    async def _expect(self, run: _Run, kinds: type | tuple[type, ...], what: str) -> tuple[_Connection, Message]:
        timeout = self.config.step_timeout_s
        try:
            src, msg = await asyncio.wait_for(run.queue.get(), timeout)
        except asyncio.TimeoutError:
            names = ", ".join(c.name for c in run.active) or "no worker"
            raise _Failed("timeout", f"no {what} from {names} within {timeout:.0f} s") from None
        if isinstance(msg, _WorkerGone):
            raise _Failed("worker-dead", msg.reason)
        if isinstance(msg, Error):
            self._done_with(run, src)
            raise _Failed(msg.reason, f"{src.name}: {msg.message} [{msg.reason}]")
        if not isinstance(msg, kinds):
            raise _Failed("error", f"{src.name} sent {msg.kind} while {what} were expected")
        return src, msg

    def _first_token(self, run: _Run, msg: FirstToken) -> None:
        run.got_first = True
        _copy_stats(run.out, msg.stats)
        run.emit(run.out.append(msg.token_id))

    def _tokens(self, run: _Run, src: _Connection, msg: Tokens) -> None:
        out = run.out
        if out.state != "decoding":
            out.state = "decoding"
            _copy_stats(out, msg.stats)
        for token_id in msg.token_ids:
            if out.is_finished:
                break  # a stop string: the rest is discarded and the worker aborted
            run.emit(out.append(token_id))
        if msg.finish_reason is not None:
            self._done_with(run, src)
            if not out.is_finished:
                out.fail("error", f"{src.name} ended the request ({msg.finish_reason}) after "
                         f"{len(out.token_ids)} tokens, before EOS or --max-tokens {out.params.max_tokens}")

    async def _end(self, run: _Run) -> None:
        rid = run.wire_id
        self._queues.pop(rid, None)
        for conn in list(run.active):
            if conn.record.is_alive:
                try:
                    reason = run.out.finish_reason or "abort"
                    await asyncio.wait_for(conn.sock.send_multipart(encode_message(Abort(rid, reason))), 1.0)
                except (asyncio.TimeoutError, zmq.ZMQError):
                    log.warning("could not send abort of %s to %s", rid, conn.name)
            conn.request_ids.discard(rid)
            self.router.release(conn.record)
        run.active.clear()


@dataclass(eq=False)
class _Run:
    """One attempt at a request: its id on the wire, and the prompt it prefills (a retry's prompt
    includes the tokens produced before the failure)."""

    out: RequestOutput
    on_text: Callable[[str], None] | None
    queue: asyncio.Queue[tuple[_Connection, Message | _WorkerGone]]
    wire_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    active: list[_Connection] = field(default_factory=list)  # workers still holding the request
    got_first: bool = False

    def emit(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text)


def _copy_stats(out: RequestOutput, stats: dict[str, float]) -> None:
    """Worker-reported figures: durations into `stages_ms`, the rest (bytes, ratios) into `kv`."""
    for key, value in stats.items():
        if key.endswith("_unix_s"):
            continue  # another machine's clock: only differences taken there mean anything
        if key.endswith("_ms"):
            out.timings.stages_ms[key] = float(value)
            if key.startswith("kv_") or "hidden" in key:
                out.kv[key] = float(value)
        else:
            out.kv[key] = float(value)
    # The decode side saw layers land over `kv_transfer_ms`; whatever of that came after prefill
    # compute ended is in `handoff_ms` (prefill end → first decode step). The rest was hidden.
    if "kv_transfer_ms" in stats and "handoff_ms" in stats:
        out.kv["transfer_ms"] = float(stats["kv_transfer_ms"])
        out.kv["hidden_ms"] = max(0.0, float(stats["kv_transfer_ms"]) - float(stats["handoff_ms"]))
