"""KV leaving a worker for a decode worker: a prefill worker's prompts, and a switching worker's
decoding requests moved with their KV (`workers/switch.py`). One path for both, so a moved request's
KV crosses the wire exactly as a prompt's does (the same codec, checksums and `KVDone`).

The engine thread queues work items (`EncodeLayer` per layer, then `Done`) with `WorkerIO.send`;
the I/O thread turns each into its message in `KVSender.prepare`, encoding layer N while the engine
goes on, and fills the request's `KVStream` figures as it goes. A cancelled stream's queued items
are dropped (its request was aborted here).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from disagg_cli.kv.codec import KVCodec
from disagg_cli.kv.registry import get_codec
from disagg_cli.kv.transfer import encode_kv_message
from disagg_cli.protocol import KVDone, KVLayers, Message, RequestStats

# Where a message goes, as `workers/base.py` spells it (not imported: base imports nothing of a role's).
Dest = tuple[str, Any]


@dataclass
class KVStream:
    """The figures of one request's KV on its way out. Made by the engine thread, then written only
    by the I/O thread as it encodes and sends (the work items carry it); the engine thread's one
    touch afterwards is `cancelled`, an Event (thread-safe): an aborted request's queued layers and
    `KVDone` are dropped."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    encode_ms: float = 0.0
    raw_bytes: int = 0
    wire_bytes: int = 0
    first_send_unix_s: float | None = None
    last_send_unix_s: float | None = None
    layers_sent: int = 0


@dataclass(frozen=True, slots=True)
class EncodeLayer:
    """One layer of a request's KV, tokens `token_start`.. of it, to encode and send to `decode`."""

    stream: KVStream
    decode: Dest
    request_id: str
    layer: int
    token_start: int
    k: torch.Tensor  # (T, KV, hd)
    v: torch.Tensor


@dataclass(frozen=True, slots=True)
class Done:
    """After a request's last layer: its `KVDone` (the next token and the sampler state)."""

    stream: KVStream
    num_tokens: int
    request_id: str
    first_token: int
    sampler_state: bytes | None
    prefill_end_unix_s: float


class KVSender:
    """Encodes queued KV work items into messages, on the I/O thread; one codec per decode worker
    (`auto` keeps per-link state). Kept across role switches, so items queued by one role still go."""

    def __init__(self, codec: str, fingerprint: str, link_gbps: float | None = None) -> None:
        link = None if link_gbps is None else link_gbps * 1e9 / 8
        self.fingerprint = fingerprint
        self.codecs: dict[str, KVCodec] = {}
        self._codec_factory: Callable[[], KVCodec] = lambda: get_codec(codec, link_bytes_per_s=link)
        get_codec(codec)  # refuse an unknown name at start, not on the first request

    def prepare(self, item: EncodeLayer | Done) -> Message | None:
        """The message of one work item, or None when its request was aborted meanwhile."""
        p = item.stream
        if p.cancelled.is_set():
            return None
        if isinstance(item, EncodeLayer):
            return self._layer(item)
        first, last = p.first_send_unix_s or item.prefill_end_unix_s, p.last_send_unix_s or item.prefill_end_unix_s
        return KVDone(item.request_id, item.first_token, item.num_tokens, p.layers_sent, item.sampler_state,
                      RequestStats(
                          kv_encode_ms=p.encode_ms,
                          raw_bytes=p.raw_bytes,
                          wire_bytes=p.wire_bytes,
                          kv_stream_ms=(last - first) * 1e3,
                          # Sending that went on after the forward pass ended: the part of the transfer
                          # that prefill compute did not hide. Both ends on this machine's clock.
                          kv_exposed_send_ms=max(0.0, last - item.prefill_end_unix_s) * 1e3,
                      ))

    def _layer(self, item: EncodeLayer) -> KVLayers:
        p = item.stream
        codec = self.codecs.setdefault(item.decode[1][0], self._codec_factory())
        t0 = time.perf_counter()
        msg = encode_kv_message(codec, item.request_id, self.fingerprint, item.layer, item.k[None], item.v[None],
                                item.token_start)
        p.encode_ms += (time.perf_counter() - t0) * 1e3
        p.raw_bytes += msg.kv.raw_bytes
        p.wire_bytes += msg.kv.wire_bytes
        now = time.time()
        p.first_send_unix_s = p.first_send_unix_s or now
        p.last_send_unix_s = now
        p.layers_sent += 1
        return msg
