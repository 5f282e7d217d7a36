"""The only place that calls the model: the paged KV storage and attention over it.

Storage is one preallocated tensor pair per worker, `(layers, num_blocks * block_size, KV, hd)`,
addressed by flat slot (block id × block_size + offset) as `kv/pool.py` assigns them. A step's
tokens, from any mix of prefills, prefill chunks and decodes, run through the model as one flat
batch; each layer writes its new K/V into their slots (`index_copy_`), then attends per sequence:
- a fresh prompt (nothing cached before it) attends over its own new K/V, reading no cache;
- two or more decoding sequences (one new token each) attend together in one batched call over
  their KV gathered into a padded (B, L) batch: one copy of their KV per layer, which measured
  cheaper than B small attention calls per layer (Python overhead) at the batch sizes we serve;
- any other sequence whose blocks are consecutive reads its cache as a strided view, copying
  nothing; a fragmented one gathers its slots (`index_select`). The runner counts gathered bytes.
With the C kernel (float32 models), every decoding sequence instead attends in one kernel call
per layer that reads its K/V in place through its block table (`decode_attention`): no gather,
whatever the context length, and one call for the whole batch. A prompt chunk, or a prompt after
a cached prefix, attends the same way, each new row a query over its blocks up to itself, so it
reads the pool in place instead of gathering it. A fresh prompt does too: alone the kernel's
attention took 0.32 s against torch's flash kernel's 0.42 s for a 512-token prompt's 30 layers on
2 AVX2 cores, but inside a prefill step both took ~0.43 s while the kernel ran its own thread pool
beside torch's OpenMP threads. On OpenMP's threads (kernel.c, `parallel_work`) the whole step
took 2.04 s against 2.11 s with SDPA (min of 6, interleaved); without the kernel SDPA attends.
A quantized float32 model runs a step made only of decodes as one call into the kernel
(`quant/fused.py`): every layer, the K/V writes, attention and the head, with no torch op in between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from disagg_cli.engine.scheduler import ScheduledSeq
from disagg_cli.kv.pool import BlockPool
from disagg_cli.model.hardware import DENSE_MIN_ROWS
from disagg_cli.model.kv_cache import causal_attention
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.quant.fused import FusedDecoder, fused_decoder
from disagg_cli.model.quant.kernels import decode_attention
from disagg_cli.model.quant.linear import QuantizedLinear

# Called once per layer with the step's fresh K/V of each prompt (or prompt chunk) in this step:
# (layer, [(request_id, position of its first new token, k (T, KV, hd), v (T, KV, hd)), …]).
# The prefill role streams them out.
LayerHook = Callable[[int, list[tuple[str, int, torch.Tensor, torch.Tensor]]], None]


@dataclass(frozen=True, slots=True)
class _SeqView:
    request_id: str
    start: int  # first row in the flat batch
    end: int
    offset: int  # tokens cached before this step
    cache_start: int | None  # first slot when the sequence's slots are consecutive
    slot_ids: torch.Tensor | None  # all of its slots, when they are not
    paged: _PagedDecode | None = None  # with the kernel: each new row as a query over its blocks


class KVStorage:
    def __init__(self, lm: LoadedModel, num_slots: int) -> None:
        c = lm.config
        shape = (c.num_layers, num_slots, c.num_kv_heads, c.head_dim)
        self.keys = torch.zeros(shape, dtype=lm.dtype, device=lm.device)  # (layers, slots, KV, hd)
        self.values = torch.zeros(shape, dtype=lm.dtype, device=lm.device)


@dataclass(frozen=True, slots=True)
class _DecodeBatch:
    rows: torch.Tensor  # (B,) rows of the flat batch, one per decoding sequence
    slot_ids: torch.Tensor  # (B * L,) each sequence's slots, padded to the longest L with slot 0
    mask: torch.Tensor  # (B, 1, 1, L) True where a key is the sequence's own
    max_len: int


@dataclass(frozen=True, slots=True)
class _PagedDecode:
    rows: torch.Tensor | None  # (B,) rows of the flat batch; None when the batch is exactly these decodes
    block_table: torch.Tensor  # (B, max blocks) int32, padded with block 0
    seq_lens: torch.Tensor  # (B,) int32: keys each sequence attends to, its new one included
    block_size: int


class PagedAttention:
    """The `Attention` of one step: stores new K/V in the pool, attends each sequence."""

    def __init__(self, storage: KVStorage, slot_mapping: torch.Tensor, seqs: list[_SeqView],
                 on_layer: LayerHook | None = None, decode: _DecodeBatch | None = None,
                 paged: _PagedDecode | None = None, kernel: Any = None,
                 fresh: list[tuple[str, int, int, int]] = ()) -> None:
        self.storage = storage
        self.fresh = fresh  # (request id, first row, end row, position of the first row) of every sequence
        self.paged = paged
        self.kernel = kernel
        self.slot_mapping = slot_mapping
        self.seqs = seqs
        self.on_layer = on_layer
        self.decode = decode
        self.gathered_bytes = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.storage.keys[layer], self.storage.values[layer]
        keys.index_copy_(0, self.slot_mapping, k)
        values.index_copy_(0, self.slot_mapping, v)
        if self.on_layer is not None:  # views into this step's fresh K/V, no copy
            self.on_layer(layer, [(rid, pos, k[a:b], v[a:b]) for rid, a, b, pos in self.fresh])
        only = self.seqs[0] if self.decode is None and self.paged is None and len(self.seqs) == 1 else None
        if only is not None and only.paged is not None:  # one prompt (or chunk): the whole batch is its own
            return self._attend_paged(only.paged, q, keys, values)
        if only is not None and only.offset == 0:
            return causal_attention(q, k, v, 0)  # a fresh prompt, no kernel: SDPA over its new K/V
        p = self.paged
        if p is not None and p.rows is None:  # a decode-only step: the kernel does all of it
            return decode_attention(self.kernel, q, keys, values, p.block_table, p.seq_lens, p.block_size)
        out = torch.empty_like(q)
        if p is not None:
            assert p.rows is not None
            ob = decode_attention(self.kernel, q.index_select(0, p.rows), keys, values, p.block_table, p.seq_lens,
                                  p.block_size)
            out.index_copy_(0, p.rows, ob)
        if self.decode is not None:
            self._attend_decodes(keys, values, q, out)
        for s in self.seqs:
            if s.paged is not None:
                out[s.start : s.end] = self._attend_paged(s.paged, q[s.start : s.end], keys, values)
                continue
            if s.offset == 0:
                ks, vs = k[s.start : s.end], v[s.start : s.end]
            elif s.cache_start is not None:
                end = s.cache_start + s.offset + (s.end - s.start)
                ks, vs = keys[s.cache_start : end], values[s.cache_start : end]
            else:
                assert s.slot_ids is not None
                ks, vs = keys.index_select(0, s.slot_ids), values.index_select(0, s.slot_ids)
                self.gathered_bytes += 2 * ks.numel() * ks.element_size()
            out[s.start : s.end] = causal_attention(q[s.start : s.end], ks, vs, s.offset)
        return out

    def _attend_paged(self, p: _PagedDecode, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return decode_attention(self.kernel, q, keys, values, p.block_table, p.seq_lens, p.block_size)

    def _attend_decodes(self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
        d = self.decode
        assert d is not None
        b, (_, num_heads, hd), num_kv = d.rows.numel(), q.shape, keys.shape[1]
        kb = keys.index_select(0, d.slot_ids).view(b, d.max_len, num_kv, hd).transpose(1, 2)  # (B, KV, L, hd)
        vb = values.index_select(0, d.slot_ids).view(b, d.max_len, num_kv, hd).transpose(1, 2)
        self.gathered_bytes += 2 * kb.numel() * kb.element_size()
        qb = q.index_select(0, d.rows).view(b, num_kv, num_heads // num_kv, hd)  # (B, KV, g, hd)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=d.mask)  # (B, KV, g, hd)
        out.index_copy_(0, d.rows, ob.reshape(b, num_heads, hd))


class ModelRunner:
    def __init__(self, lm: LoadedModel, pool: BlockPool) -> None:
        self.lm = lm
        self.pool = pool
        self.storage = KVStorage(lm, pool.num_blocks * pool.block_size)
        self.gathered_bytes = 0  # KV copied for batched decodes and fragmented sequences since start
        # In-place paged decode attention: the C kernel's, for float32 KV on the CPU.
        self.kernel = lm.kernel if lm.kernel is not None and lm.dtype == torch.float32 else None
        self.kernel_prompts = True  # fresh prompts attend on the kernel too (False: torch's SDPA)
        # Decode-only steps of a float32 model (quantized, or on the kernel's GEMM): one kernel call a step.
        self.fused: FusedDecoder | None = None
        self.fused_reason = "no C kernel for this model's dtype or device"
        if self.kernel is not None:
            self.fused, self.fused_reason = fused_decoder(lm.model, self.kernel)
        # Where float weights are kept too (colocated), steps of that many rows run on them instead.
        dense = any(isinstance(m, QuantizedLinear) and m.has_float for m in lm.model.modules())
        self.fused_max_rows = DENSE_MIN_ROWS - 1 if dense else 1 << 30

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], on_layer: LayerHook | None = None) -> torch.Tensor:
        """Run one step; return logits (S, V) float32 for the sequences that sample, in batch order."""
        if (self.fused is not None and on_layer is None and 0 < len(batch) <= self.fused_max_rows
                and all(item.num_new_tokens == 1 and item.seq.num_computed_tokens for item in batch)):
            return self._fused_step(batch)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        views: list[_SeqView] = []
        sample_rows: list[int] = []
        decodes: list[tuple[int, list[int]]] = []  # (row, slots) of sequences adding one token
        many_decodes = sum(1 for item in batch if item.num_new_tokens == 1 and item.seq.num_computed_tokens) >= 2
        paged: list[tuple[int, list[int], int]] = []  # (row, block ids, keys) for the kernel's attention
        fresh: list[tuple[str, int, int, int]] = []
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start, done = len(ids), seq.num_computed_tokens
            fresh.append((seq.request_id, start, start + n, done))
            ids += seq.token_ids[done : done + n]
            positions += range(done, done + n)
            slots += self.pool.slots(seq.request_id, done, done + n)
            if item.samples:
                sample_rows.append(start + n - 1)
            if self.kernel is not None and n == 1 and done:
                paged.append((start, self.pool.tables[seq.request_id].block_ids, done + 1))
                continue
            if many_decodes and n == 1 and done:
                decodes.append((start, self.pool.slots(seq.request_id, 0, done + 1)))
                continue
            if self.kernel is not None and (done or self.kernel_prompts):  # attended in place, as decodes are
                views.append(_SeqView(seq.request_id, start, start + n, done, None, None,
                                      self._prompt_rows(self.pool.tables[seq.request_id].block_ids, done, n)))
                continue
            cache_start = self.pool.contiguous_start(seq.request_id) if done else None
            slot_ids = None
            if done and cache_start is None:
                slot_ids = torch.tensor(self.pool.slots(seq.request_id, 0, done + n), device=self.lm.device)
            views.append(_SeqView(seq.request_id, start, start + n, done, cache_start, slot_ids))
        device = self.lm.device
        attn = PagedAttention(self.storage, torch.tensor(slots, device=device), views, on_layer,
                              self._decode_batch(decodes) if decodes else None,
                              self._paged_decode(paged, len(ids)) if paged else None, self.kernel, fresh)
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

    def _paged_decode(self, paged: list[tuple[int, list[int], int]], num_rows: int) -> _PagedDecode:
        width = max(len(ids) for _, ids, _ in paged)
        table = torch.tensor([ids + [0] * (width - len(ids)) for _, ids, _ in paged], dtype=torch.int32)
        lens = torch.tensor([n for _, _, n in paged], dtype=torch.int32)
        rows = [r for r, _, _ in paged]
        in_order = rows == list(range(num_rows))
        return _PagedDecode(None if in_order else torch.tensor(rows), table, lens, self.pool.block_size)

    def _prompt_rows(self, block_ids: list[int], done: int, n: int) -> _PagedDecode:
        """n new rows of one sequence after `done` cached tokens, each a query over its own blocks:
        row i sees done + i + 1 keys (causal), through the same block table."""
        table = torch.tensor(block_ids, dtype=torch.int32).expand(n, len(block_ids)).contiguous()
        return _PagedDecode(None, table, torch.arange(done + 1, done + n + 1, dtype=torch.int32),
                            self.pool.block_size)

    def _decode_batch(self, decodes: list[tuple[int, list[int]]]) -> _DecodeBatch:
        max_len = max(len(s) for _, s in decodes)
        padded = [s + [0] * (max_len - len(s)) for _, s in decodes]
        lengths = torch.tensor([len(s) for _, s in decodes])
        mask = torch.arange(max_len)[None, :] < lengths[:, None]  # (B, L)
        device = self.lm.device
        return _DecodeBatch(torch.tensor([r for r, _ in decodes], device=device),
                            torch.tensor(padded, device=device).view(-1), mask[:, None, None, :].to(device), max_len)

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
