"""What workers measured of one request, as it travels on the wire (`FirstToken`, `KVDone`,
`Tokens` in `messages.py`); the coordinator maps it into a request's output (`coordinator/client.py`)."""

from __future__ import annotations

from dataclasses import dataclass, fields


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
