"""Typed figures on the wire (`messages.py`), each a frozen dataclass whose type hints are its schema:
- `RequestStats`: what workers measured of one request (`FirstToken`, `KVDone`, `Tokens`); the
  coordinator maps it into a request's output (`coordinator/coordinator.py`);
- `WorkerCapacity`: what a worker was built with (`Hello`, `HelloAck`);
- `WorkerStats`: a worker's queues, pool and speeds, answered to each `Heartbeat`."""

from __future__ import annotations

from dataclasses import dataclass, fields

from disagg_cli.protocol.errors import bad_field
from disagg_cli.protocol.names import WORKER_ROLES


@dataclass(frozen=True, slots=True)
class RequestStats:
    """What workers measured of one request, sent with `FirstToken`, `KVDone` and `Tokens`.

    None = not measured (by this worker, or for this path). Every figure is taken on one machine's
    clock, named per field; a difference between two machines' clocks never travels. The field
    order is the order they reach the coordinator, which keeps its outputs in the same order.
    """

    # the worker that computed the prompt (prefill, decode under PrefillHere, colocated): FirstToken
    queue_ms: float | None = None  # arrival → the step that computed the prompt began; that worker's clock
    prefill_ms: float | None = None  # that step (the prompt's forward pass); that worker's clock
    batch_size: int | None = None  # prompts computed in that step; prefill worker
    prefix_cached_tokens: int | None = None  # leading prompt tokens its prefix cache held; that worker
    # the prefill worker's KV send: KVDone, passed on by the decode worker in its first Tokens
    kv_encode_ms: float | None = None  # encoding the KV layers (sum over layers); prefill worker's clock
    raw_bytes: int | None = None  # KV bytes before encoding; prefill worker
    wire_bytes: int | None = None  # KV bytes after encoding, as sent; prefill worker
    kv_stream_ms: float | None = None  # first KV layer sent → last sent; prefill worker's clock
    kv_exposed_send_ms: float | None = None  # of that, after the forward pass ended; prefill worker's clock
    # the decode worker's side: its first Tokens
    kv_transfer_ms: float | None = None  # first KV layer arrived → last arrived; decode worker's clock
    kv_decode_ms: float | None = None  # decoding the KV layers into blocks (sum); decode worker's clock
    reserve_to_kv_done_ms: float | None = None  # Reserve arrived → KVDone arrived; decode worker's clock
    decode_cached_tokens: int | None = None  # leading prompt tokens its prefix cache held; decode worker
    handoff_ms: float | None = None  # KVDone arrived → the step decoding its first token; decode worker's clock

    def items(self) -> list[tuple[str, float]]:
        """(name, value) of every measured figure, in field order."""
        return [(f.name, float(v)) for f in fields(self) if (v := getattr(self, f.name)) is not None]


@dataclass(frozen=True, slots=True)
class WorkerCapacity:
    """What a worker was built with, sent in its `Hello` / `HelloAck`: the coordinator sizes its
    view of the worker's prefix cache and refuses requests that can never fit its pool by it."""

    num_blocks: int  # KV blocks in its pool
    block_size: int  # tokens per block
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked_prefill: bool
    prefix_caching: bool
    threads: int  # torch threads of its engine
    max_step_ms: float = 0.0  # with decodes running, prompt chunks are cut to end a step by then; 0: no bound

    def as_dict(self) -> dict[str, float]:
        """name → value, for display and JSON."""
        return {f.name: float(v) if isinstance(v := getattr(self, f.name), float) else int(v) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """A worker's figures, answered to every `Heartbeat`: a snapshot taken between engine steps.

    Read by the router (load, free blocks, measured speeds for `--disagg-threshold auto`), the live
    table and /metrics. Every field is required on the wire except the decode role's own."""

    # the scheduler and the pool (exact counts)
    waiting: int  # requests waiting for a batch slot
    running: int  # requests in the running batch
    free_blocks: int
    num_blocks: int
    reserved_blocks: int  # set aside for KV on its way (decode)
    used_blocks: int
    time_unix_s: float  # when the snapshot was taken; the worker's clock
    # the prefix cache (zeros with caching off)
    cached_blocks: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    prefix_evicted_blocks: int
    # measured speeds (moving averages; 0 until measured)
    prefill_tokens_per_s: float
    decode_step_ms: float
    threads: int
    greeted_peers: int  # peers whose hello this worker remembers (the I/O thread's count)
    # a decode worker's reservations: None from other roles
    queued_reservations: int | None = None  # waiting for free blocks
    incoming: int | None = None  # reserved, KV on its way
    # the role it serves now (an elastic worker's changes, `SwitchRole`); "" from a worker that did not say
    role: str = ""
    switching_to: str = ""  # the role it is changing to, while it does; "" otherwise

    def __post_init__(self) -> None:
        for name in ("role", "switching_to"):
            value = getattr(self, name)
            if value and value not in WORKER_ROLES:
                bad_field(f"{name} {value!r:.40} is not one of {', '.join(WORKER_ROLES)}")

    def as_dict(self) -> dict[str, float]:
        """name → value of every figure reported, for display and JSON (the decode role's own only
        from a decode worker; the role is a name, not a figure: `role` has it)."""
        return {f.name: v for f in fields(self)
                if f.name not in ("role", "switching_to") and (v := getattr(self, f.name)) is not None}
