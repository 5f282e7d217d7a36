"""The KV memory pool's bookkeeping: fixed-size blocks, per-request block tables, exact accounting.

Pure Python, no tensors: the runner owns the storage, `(layers, num_blocks, block_size, KV, hd)`,
and this module decides which block ids each request may write. A block is in exactly one state:
free, reserved (promised to a request whose KV has not arrived yet: a decode worker reserves
before the prefill worker sends) or used. `free + reserved + used == num_blocks` always.

Placement keeps each request's blocks contiguous where it can, so attention can read a request's
KV as one strided view instead of gathering it: a request grows into the block after its last one
when that is free, and a new request starts in the middle of the largest free run, leaving room on
both sides for its neighbours to grow.

Life of a request's blocks:
1. `allocate(rid, num_tokens)` (or `reserve` then `commit`) gives it ceil(tokens / block_size) blocks;
2. `append_slots(rid, n)` before each step that adds n tokens, growing the table as needed;
3. `free(rid)` when it finishes, is aborted or preempted: every block goes back.
"""

from __future__ import annotations

from dataclasses import dataclass


class OutOfBlocks(Exception):
    """Not enough free blocks; the scheduler waits or preempts, nothing is over-committed."""


@dataclass(slots=True)
class BlockTable:
    block_ids: list[int]
    num_tokens: int  # tokens whose slots are assigned (written or about to be)
    reserved: bool


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"pool needs at least one block of at least one token, got {num_blocks}×{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._is_free = bytearray(b"\x01") * num_blocks
        self._num_free = num_blocks
        self.tables: dict[str, BlockTable] = {}

    # --- accounting ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_reserved(self) -> int:
        return sum(len(t.block_ids) for t in self.tables.values() if t.reserved)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free - self.num_reserved

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self._num_free

    def num_new_blocks(self, rid: str, num_new_tokens: int) -> int:
        """Blocks `append_slots(rid, num_new_tokens)` would take from the free list."""
        t = self.tables[rid]
        return self.blocks_for(t.num_tokens + num_new_tokens) - len(t.block_ids)

    # --- life cycle ---------------------------------------------------------------------------

    def allocate(self, rid: str, num_tokens: int) -> list[int]:
        """A new request's blocks for its first `num_tokens` tokens, marked used."""
        return self._create(rid, num_tokens, reserved=False)

    def reserve(self, rid: str, num_tokens: int) -> list[int]:
        """Blocks promised to a request whose KV is still to arrive; `commit` marks them used."""
        return self._create(rid, num_tokens, reserved=True)

    def commit(self, rid: str) -> None:
        self.tables[rid].reserved = False

    def append_slots(self, rid: str, n: int) -> None:
        """Make room for n more tokens of `rid`; raises OutOfBlocks (changing nothing) if it can't."""
        t = self.tables[rid]
        need = self.num_new_blocks(rid, n)
        if need > self._num_free:
            raise OutOfBlocks(f"request {rid} needs {need} more blocks, {self._num_free} free")
        for _ in range(max(need, 0)):
            t.block_ids.append(self._take_after(t.block_ids[-1] if t.block_ids else None))
        t.num_tokens += n

    def free(self, rid: str) -> None:
        """Return every block of `rid`; freeing an unknown or already freed request is a no-op."""
        t = self.tables.pop(rid, None)
        if t is None:
            return
        for b in t.block_ids:
            assert not self._is_free[b], f"block {b} of {rid} freed twice"
            self._is_free[b] = 1
        self._num_free += len(t.block_ids)

    # --- slots --------------------------------------------------------------------------------

    def slots(self, rid: str, start: int, end: int) -> list[int]:
        """Flat slot indices (block * block_size + offset) of tokens start..end-1 of `rid`."""
        ids, bs = self.tables[rid].block_ids, self.block_size
        return [ids[i // bs] * bs + i % bs for i in range(start, end)]

    def contiguous_start(self, rid: str) -> int | None:
        """The first slot of `rid` when all its blocks are consecutive, else None."""
        ids = self.tables[rid].block_ids
        if ids and ids[-1] - ids[0] == len(ids) - 1:
            return ids[0] * self.block_size
        return None

    # --- placement ----------------------------------------------------------------------------

    def _create(self, rid: str, num_tokens: int, reserved: bool) -> list[int]:
        if rid in self.tables:
            raise ValueError(f"request {rid} already holds blocks")
        need = self.blocks_for(num_tokens)
        if need > self._num_free:
            raise OutOfBlocks(f"request {rid} needs {need} blocks, {self._num_free} free")
        self.tables[rid] = t = BlockTable([], 0, reserved)
        if need:
            t.block_ids.append(self._take(self._new_start()))
        self.append_slots(rid, num_tokens)
        return list(t.block_ids)

    def _take(self, b: int) -> int:
        assert self._is_free[b]
        self._is_free[b] = 0
        self._num_free -= 1
        return b

    def _take_after(self, last: int | None) -> int:
        if last is not None and last + 1 < self.num_blocks and self._is_free[last + 1]:
            return self._take(last + 1)
        return self._take(self._new_start())

    def _new_start(self) -> int:
        """Start of a new run: the middle of the largest free run (its start when that run opens the
        pool), so the request before it and the new one both have room to grow."""
        best_start, best_len, start = -1, 0, None
        for i in range(self.num_blocks + 1):
            if i < self.num_blocks and self._is_free[i]:
                if start is None:
                    start = i
            elif start is not None:
                if i - start > best_len:
                    best_start, best_len = start, i - start
                start = None
        assert best_len > 0, "no free block"
        if best_start == 0:
            return 0
        return best_start + best_len // 2
