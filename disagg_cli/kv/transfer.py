"""One request's whole KV ⇄ a sequence of `KVLayers` messages (per layer or per group of layers).

Sender: `encode_request_kv` yields messages in layer order, so layer 0 can go on the wire while
later layers are still being encoded (or computed). Receiver: `decode_kv_layers` restores one
message's layers as soon as it arrives; `assemble_request_kv` checks that a set of messages covers
every layer exactly once and returns per-layer tensors. Errors are `WireError`s naming the request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from disagg_cli.kv.codec import KVCodec
from disagg_cli.kv.registry import decode_kv
from disagg_cli.protocol import KVLayers, WireError


def encode_request_kv(
    codec: KVCodec,
    request_id: str,
    model_fingerprint: str,
    k_layers: Sequence[Tensor],
    v_layers: Sequence[Tensor],
    *,
    layers_per_message: int = 1,
) -> Iterator[KVLayers]:
    """One request's KV (per layer, each (T, n_kv, hd)) as `KVLayers` messages, in layer order.

    A generator, so a sender can put layer 0 on the wire while later layers are encoded. A single
    layer goes as a view (the `none` codec then sends its memory as is); a group of layers is
    stacked (one copy) into (layers, T, n_kv, hd).
    """
    assert len(k_layers) == len(v_layers) > 0 and layers_per_message >= 1
    for start in range(0, len(k_layers), layers_per_message):
        end = min(start + layers_per_message, len(k_layers))
        if end - start == 1:
            k, v = k_layers[start][None], v_layers[start][None]  # (1, T, n_kv, hd), no copy
        else:
            k, v = torch.stack(list(k_layers[start:end])), torch.stack(list(v_layers[start:end]))
        yield encode_kv_message(codec, request_id, model_fingerprint, start, k, v)


def encode_kv_message(codec: KVCodec, request_id: str, model_fingerprint: str, layer_start: int, k: Tensor,
                      v: Tensor, token_start: int = 0) -> KVLayers:
    """One `KVLayers`: layers layer_start.. of tokens token_start.. of a request, k and v each
    (layers, T, n_kv, hd). The one path KV takes onto the wire, for workers and benchmarks alike."""
    enc = codec.encode(k, v)
    return KVLayers(request_id, model_fingerprint, layer_start, layer_start + k.shape[0], k.shape[1], enc.meta,
                    tuple(enc.payloads), token_start=token_start)


def decode_kv_layers(msg: KVLayers) -> tuple[Tensor, Tensor]:
    """(k, v) of the message's layers, each (layers, T, n_kv, hd); errors name the request."""
    try:
        return decode_kv(msg.kv, msg.payloads)
    except WireError as e:
        raise WireError(e.reason, e.detail, request_id=msg.request_id) from None


def assemble_request_kv(msgs: Sequence[KVLayers], num_layers: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer k and v lists (each (T, n_kv, hd)) from messages covering every layer once."""
    rid = msgs[0].request_id if msgs else None
    k_layers: list[Tensor | None] = [None] * num_layers
    v_layers: list[Tensor | None] = [None] * num_layers
    for msg in msgs:
        if msg.request_id != rid or msg.num_tokens != msgs[0].num_tokens:
            raise WireError(
                "bad-field",
                f"KV of request {msg.request_id!r} ({msg.num_tokens} tokens) mixed into this one's",
                request_id=rid,
            )
        if msg.layer_end > num_layers or any(x is not None for x in k_layers[msg.layer_start : msg.layer_end]):
            raise WireError(
                "bad-field",
                f"layers [{msg.layer_start}, {msg.layer_end}) overlap or exceed {num_layers}",
                request_id=rid,
            )
        k, v = decode_kv_layers(msg)
        k_layers[msg.layer_start : msg.layer_end] = list(k.unbind(0))
        v_layers[msg.layer_start : msg.layer_end] = list(v.unbind(0))
    missing = [i for i, x in enumerate(k_layers) if x is None]
    if missing:
        raise WireError("truncated", f"KV of layers {missing} never arrived", request_id=rid)
    return [x for x in k_layers if x is not None], [x for x in v_layers if x is not None]
