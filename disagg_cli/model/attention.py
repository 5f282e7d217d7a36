"""Attention over the paged KV pool: two implementations, one chosen per model at load.

A step's tokens, from any mix of prefills, prefill chunks and decodes, run through the model as one
flat batch; each layer's new K/V are already in their pool slots when `attend` runs. Each sequence
of the step is a `SeqRows`; `metadata(seqs)` turns them into what the implementation reads, once
per step, and `attend(meta, q, k, v, keys, values)` runs one layer.

- `KernelAttention` (the C backend, a float32 model on the CPU; KV float32 or bfloat16, widened as
  read): every row of the step is a query over
  its own sequence's blocks up to itself, read in place through its block table, in one kernel
  call per layer: decodes, prompt chunks, prompts after a cached prefix and fresh prompts alike.
  Alone the kernel's attention took 0.32 s against torch's flash kernel's 0.42 s for a 512-token
  prompt's 30 layers on 2 AVX2 cores; inside a prefill step, on OpenMP's threads, the whole step
  took 2.04 s against 2.11 s with SDPA (min of 6, interleaved). It copies nothing.
- `TorchAttention` (everything else): a fresh prompt attends over its own new K/V with SDPA
  (torch's flash kernel), reading no cache; two or more decoding sequences attend together in one
  batched call over their KV gathered into a padded (B, L) batch (one copy per layer, measured
  cheaper than B small calls); any other sequence whose blocks are consecutive reads its cache as a
  strided view, and a fragmented one gathers its slots. It counts the bytes it gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from disagg_cli.model.kv_cache import causal_attention
from disagg_cli.model.quant.kernels import Kernel, decode_attention


@dataclass(frozen=True, slots=True)
class SeqRows:
    """One sequence's rows in a step's flat batch."""

    start: int  # first row
    num_new: int  # rows (new tokens) this step
    num_cached: int  # tokens cached before this step
    block_ids: list[int]  # its KV blocks, in order


def _slots(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    return [block_ids[i // block_size] * block_size + i % block_size for i in range(start, end)]


class AttentionImpl(Protocol):
    name: str

    def metadata(self, seqs: list[SeqRows], block_size: int, device: torch.device) -> object: ...

    def attend(self, meta: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """q (N, H, hd), this step's k/v (N, KV, hd), one layer's pool (slots, KV, hd) → the
        output (N, H, hd) and the KV bytes gathered to compute it."""
        ...


@dataclass(frozen=True, slots=True)
class PagedRows:
    """Each row of the step as a query over its sequence's blocks (`KernelAttention`)."""

    block_table: torch.Tensor  # (N, max blocks) int32, padded with block 0
    seq_lens: torch.Tensor  # (N,) int32: keys the row attends to, itself included
    block_size: int


class KernelAttention:
    name = "C paged attention (every row through its block table)"

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def metadata(self, seqs: list[SeqRows], block_size: int, device: torch.device) -> PagedRows:
        width = max(len(s.block_ids) for s in seqs)
        tables, lens = [], []
        for s in seqs:
            row = torch.tensor(s.block_ids + [0] * (width - len(s.block_ids)), dtype=torch.int32)
            tables.append(row.expand(s.num_new, width))
            # row i sees num_cached + i + 1 keys: causal within the step's new tokens
            lens.append(torch.arange(s.num_cached + 1, s.num_cached + s.num_new + 1, dtype=torch.int32))
        return PagedRows(torch.cat(tables).contiguous(), torch.cat(lens), block_size)

    def attend(self, meta: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> tuple[torch.Tensor, int]:
        assert isinstance(meta, PagedRows)
        return decode_attention(self.kernel, q, keys, values, meta.block_table, meta.seq_lens, meta.block_size), 0


@dataclass(frozen=True, slots=True)
class _CachedSeq:
    start: int  # first row in the flat batch
    end: int
    offset: int  # tokens cached before this step
    cache_start: int | None  # first slot when the sequence's slots are consecutive
    slot_ids: torch.Tensor | None  # all of its slots, when they are not


@dataclass(frozen=True, slots=True)
class _DecodeBatch:
    rows: torch.Tensor  # (B,) rows of the flat batch, one per decoding sequence
    slot_ids: torch.Tensor  # (B * L,) each sequence's slots, padded to the longest L with slot 0
    mask: torch.Tensor  # (B, 1, 1, L) True where a key is the sequence's own
    max_len: int


@dataclass(frozen=True, slots=True)
class TorchRows:
    """The step's sequences as `TorchAttention` attends them."""

    seqs: list[_CachedSeq]  # attended one by one
    decodes: _DecodeBatch | None  # two or more decodes, attended together
    only_fresh: bool  # the whole step is one fresh prompt: SDPA over this step's K/V, nothing else


class TorchAttention:
    name = "torch SDPA (fresh prompts on its flash kernel; decodes gathered into one padded batch)"

    def metadata(self, seqs: list[SeqRows], block_size: int, device: torch.device) -> TorchRows:
        decodes = [s for s in seqs if s.num_new == 1 and s.num_cached]
        batched = decodes if len(decodes) >= 2 else []
        views = []
        for s in seqs:
            if batched and s.num_new == 1 and s.num_cached:
                continue
            done, end = s.num_cached, s.start + s.num_new
            ids = s.block_ids
            contiguous = bool(ids) and ids[-1] - ids[0] == len(ids) - 1
            cache_start = ids[0] * block_size if done and contiguous else None
            slot_ids = None
            if done and cache_start is None:
                slot_ids = torch.tensor(_slots(ids, block_size, 0, done + s.num_new), device=device)
            views.append(_CachedSeq(s.start, end, done, cache_start, slot_ids))
        only_fresh = len(seqs) == 1 and seqs[0].num_cached == 0
        return TorchRows(views, self._decode_batch(batched, block_size, device) if batched else None, only_fresh)

    @staticmethod
    def _decode_batch(decodes: list[SeqRows], block_size: int, device: torch.device) -> _DecodeBatch:
        slots = [_slots(s.block_ids, block_size, 0, s.num_cached + 1) for s in decodes]
        max_len = max(len(s) for s in slots)
        padded = [s + [0] * (max_len - len(s)) for s in slots]
        lengths = torch.tensor([len(s) for s in slots])
        mask = torch.arange(max_len)[None, :] < lengths[:, None]  # (B, L)
        return _DecodeBatch(torch.tensor([s.start for s in decodes], device=device),
                            torch.tensor(padded, device=device).view(-1), mask[:, None, None, :].to(device), max_len)

    def attend(self, meta: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> tuple[torch.Tensor, int]:
        assert isinstance(meta, TorchRows)
        if meta.only_fresh:
            return causal_attention(q, k, v, 0), 0
        gathered = 0
        out = torch.empty_like(q)
        d = meta.decodes
        if d is not None:
            b, (_, num_heads, hd), num_kv = d.rows.numel(), q.shape, keys.shape[1]
            kb = keys.index_select(0, d.slot_ids).view(b, d.max_len, num_kv, hd).transpose(1, 2)  # (B, KV, L, hd)
            vb = values.index_select(0, d.slot_ids).view(b, d.max_len, num_kv, hd).transpose(1, 2)
            gathered += 2 * kb.numel() * kb.element_size()
            qb = q.index_select(0, d.rows).view(b, num_kv, num_heads // num_kv, hd)  # (B, KV, g, hd)
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=d.mask)  # (B, KV, g, hd)
            out.index_copy_(0, d.rows, ob.reshape(b, num_heads, hd))
        for s in meta.seqs:
            if s.offset == 0:
                ks, vs = k[s.start : s.end], v[s.start : s.end]
            elif s.cache_start is not None:
                end = s.cache_start + s.offset + (s.end - s.start)
                ks, vs = keys[s.cache_start : end], values[s.cache_start : end]
            else:
                assert s.slot_ids is not None
                ks, vs = keys.index_select(0, s.slot_ids), values.index_select(0, s.slot_ids)
                gathered += 2 * ks.numel() * ks.element_size()
            out[s.start : s.end] = causal_attention(q[s.start : s.end], ks, vs, s.offset)
        return out, gathered
