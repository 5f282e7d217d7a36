"""The only place that calls the model: the paged KV storage, and each step's calls into the backend.

Storage is one preallocated tensor pair per worker, `(layers, num_blocks * block_size, KV, hd)`,
addressed by flat slot (block id × block_size + offset) as `kv/pool.py` assigns them. A step's
tokens, from any mix of prefills, prefill chunks and decodes, run through the model as one flat
batch; each layer writes its new K/V into their slots (`index_copy_`), then attends through the
attention the backend chose at load (`model/attention.py`), with the metadata it built once for
the step. A step made only of decodes runs as one call into the fused decode step instead, where
the backend built one (`quant/fused.py`): every layer, the K/V writes, attention and the head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from disagg_cli.engine.scheduler import ScheduledSeq
from disagg_cli.kv.pool import BlockPool
from disagg_cli.model.attention import AttentionImpl, SeqRows
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.quant.fused import FusedDecoder

# Called once per layer with the step's fresh K/V of each prompt (or prompt chunk) in this step:
# (layer, [(request_id, position of its first new token, k (T, KV, hd), v (T, KV, hd)), …]).
# The prefill role streams them out.
LayerHook = Callable[[int, list[tuple[str, int, torch.Tensor, torch.Tensor]]], None]


class KVStorage:
    def __init__(self, lm: LoadedModel, num_slots: int) -> None:
        c = lm.config
        shape = (c.num_layers, num_slots, c.num_kv_heads, c.head_dim)
        # the pool's dtype is `--kv-cache-dtype` as resolved at load: bfloat16 under float32 weights on
        # the C kernel's attention, which widens it as it reads
        self.keys = torch.zeros(shape, dtype=lm.kv_dtype, device=lm.device)  # (layers, slots, KV, hd)
        self.values = torch.zeros(shape, dtype=lm.kv_dtype, device=lm.device)


class StepAttention:
    """The model's `Attention` for one step: stores new K/V in the pool, then one call into the backend's."""

    def __init__(self, storage: KVStorage, slot_mapping: torch.Tensor, impl: AttentionImpl, meta: object,
                 on_layer: LayerHook | None, fresh: list[tuple[str, int, int, int]]) -> None:
        self.storage = storage
        self.slot_mapping = slot_mapping
        self.impl = impl
        self.meta = meta
        self.on_layer = on_layer
        self.fresh = fresh  # (request id, first row, end row, position of the first row) of every sequence
        self.gathered_bytes = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.storage.keys[layer], self.storage.values[layer]
        keys.index_copy_(0, self.slot_mapping, k.to(keys.dtype))  # rounded to nearest even into bf16
        values.index_copy_(0, self.slot_mapping, v.to(values.dtype))
        if self.on_layer is not None:  # views into this step's fresh K/V, no copy
            self.on_layer(layer, [(rid, pos, k[a:b], v[a:b]) for rid, a, b, pos in self.fresh])
        out, gathered = self.impl.attend(self.meta, q, k, v, keys, values)
        self.gathered_bytes += gathered
        return out


class ModelRunner:
    def __init__(self, lm: LoadedModel, pool: BlockPool) -> None:
        self.lm = lm
        self.pool = pool
        self.storage = KVStorage(lm, pool.num_blocks * pool.block_size)
        self.gathered_bytes = 0  # KV copied by torch's attention for batched decodes and fragmented sequences
        execution = lm.execution
        self.attention = execution.attention
        self.kernel = execution.backend.kernel  # the C library of the c backend (the engine's greedy argmax)
        self.fused: FusedDecoder | None = execution.fused
        self.fused_reason = execution.fused_reason
        # Where float weights are kept too (colocated), steps of that many rows run on them instead.
        dense = execution.dense_min_rows
        self.fused_max_rows = dense - 1 if dense is not None else 1 << 30

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], on_layer: LayerHook | None = None) -> torch.Tensor:
        """Run one step; return logits (S, V) float32 for the sequences that sample, in batch order."""
        if (self.fused is not None and on_layer is None and 0 < len(batch) <= self.fused_max_rows
                and all(item.num_new_tokens == 1 and item.seq.num_computed_tokens for item in batch)):
            return self._fused_step(batch)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqRows] = []
        sample_rows: list[int] = []
        fresh: list[tuple[str, int, int, int]] = []
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start, done = len(ids), seq.num_computed_tokens
            fresh.append((seq.request_id, start, start + n, done))
            ids += seq.token_ids[done : done + n]
            positions += range(done, done + n)
            slots += self.pool.slots(seq.request_id, done, done + n)
            seqs.append(SeqRows(start, n, done, self.pool.tables[seq.request_id].block_ids))
            if item.samples:
                sample_rows.append(start + n - 1)
        device = self.lm.device
        meta = self.attention.metadata(seqs, self.pool.block_size, device)
        attn = StepAttention(self.storage, torch.tensor(slots, device=device), self.attention, meta, on_layer, fresh)
        hidden = self.lm.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), attn)
        self.gathered_bytes += attn.gathered_bytes
        return self.lm.model.compute_logits(hidden[sample_rows])

    def _fused_step(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        tables = [self.pool.tables[item.seq.request_id].block_ids for item in batch]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        positions = [item.seq.num_computed_tokens for item in batch]
        tokens = [item.seq.token_ids[p] for item, p in zip(batch, positions, strict=True)]
        assert self.fused is not None
        logits = self.fused.step(tokens, positions, table, self.pool.block_size, self.storage.keys,
                                 self.storage.values)
        rows = [i for i, item in enumerate(batch) if item.samples]
        return logits if len(rows) == len(batch) else logits[rows]

    def export_kv(self, request_id: str, num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A request's KV in the wire layout: per layer, K and V (num_tokens, KV, hd), contiguous copies."""
        slots = torch.tensor(self.pool.slots(request_id, 0, num_tokens), device=self.lm.device)
        return [(self.storage.keys[layer].index_select(0, slots), self.storage.values[layer].index_select(0, slots))
                for layer in range(self.lm.config.num_layers)]

    def read_kv(self, request_id: str, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer of tokens start..end-1 of a request's cached KV: (T, KV, hd) copies."""
        slots = torch.tensor(self.pool.slots(request_id, start, end), device=self.lm.device)
        return self.storage.keys[layer].index_select(0, slots), self.storage.values[layer].index_select(0, slots)

    def import_kv_layer(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Place one layer of a request's KV for tokens start.. (token-major, any dtype/device)
        into its reserved slots."""
        slots = torch.tensor(self.pool.slots(request_id, start, start + k.shape[0]), device=self.lm.device)
        dtype = self.storage.keys.dtype
        self.storage.keys[layer].index_copy_(0, slots, k.to(device=self.lm.device, dtype=dtype))
        self.storage.values[layer].index_copy_(0, slots, v.to(device=self.lm.device, dtype=dtype))
