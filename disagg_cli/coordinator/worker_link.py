"""The coordinator's link to one worker, and what it tells a request.

A `WorkerLink` is a DEALER socket to one worker plus what the coordinator knows of it: its hello
answer (`accept` checks it, `same_model` checks all of them agree; `check_fits` says whether a
request could fit its KV pool), heartbeat counters, the ids of the requests it holds and its
reader task. When it is taken as dead, each of its requests gets `WorkerGone`; an attempt at a
request that cannot go on raises `RequestFailed` with the reason code the retry policy reads. The
set of links and their handshake are `membership.py`'s, their liveness `liveness.py`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import zmq.asyncio

from disagg_cli.coordinator.router import WorkerRecord
from disagg_cli.errors import DisaggError
from disagg_cli.kv.pool import pool_misfit
from disagg_cli.protocol import Error, HelloAck, Message, Refuse
from disagg_cli.protocol.names import ELASTIC_RUNTIME_KEY


@dataclass(frozen=True, slots=True)
class WorkerGone:
    """Put on a request's queue when the worker holding it is taken as dead."""

    reason: str


class RequestFailed(Exception):
    """One attempt at a request failed; `reason` is the code the retry policy looks at."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def same_model(links: Iterable[WorkerLink]) -> None:
    """Raise unless every worker that answered hello serves the same model (by fingerprint)."""
    fingerprints = {c.record.address: c.ack.model_fingerprint for c in links if c.ack}
    if len(set(fingerprints.values())) > 1:
        (a, fa), (b, fb) = next(((a, fa), (b, fb)) for a, fa in fingerprints.items()
                                for b, fb in fingerprints.items() if fa != fb)
        raise DisaggError(f"workers serve different models: {a} has fingerprint {fa}, {b} has {fb}; "
                          "start every worker with the same --model")


@dataclass(eq=False)
class WorkerLink:
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

    def accept(self, msg: Message) -> HelloAck:
        """Take the worker's answer to hello; a refusal, an error or the wrong role raises, unless the
        worker is elastic (switched in place before this coordinator met it: the caller follows it)."""
        if isinstance(msg, Refuse):
            raise DisaggError(f"{self.name} refused this coordinator: {msg.message} [{msg.reason}]")
        if isinstance(msg, Error):
            raise DisaggError(f"{self.name} answered hello with an error: {msg.message} [{msg.reason}]")
        assert isinstance(msg, HelloAck)
        if msg.role != self.record.role and ELASTIC_RUNTIME_KEY not in msg.runtime:
            raise DisaggError(f"{self.record.address} is a {msg.role} worker, but was given as a "
                              f"{self.record.role} worker")
        self.ack = msg
        self.last_seen_s = time.monotonic()
        return msg

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise `RequestFailed` ("too-long") when the request could never fit the worker's KV pool."""
        if self.ack is None:
            return
        num_blocks, block_size = self.ack.capacity.num_blocks, self.ack.capacity.block_size
        if num_blocks <= 0 or block_size <= 0:
            return
        misfit = pool_misfit(num_prompt_tokens + max_tokens, num_blocks, block_size)
        if misfit:
            raise RequestFailed("too-long", f"{num_prompt_tokens} prompt tokens + --max-tokens "
                                f"{max_tokens} {misfit.replace('the pool', f'the KV pool of {self.name}')}; "
                                "give it a larger --kv-cache-memory-mb or --kv-cache-tokens")
