"""The KV memory pool's bookkeeping: fixed-size blocks, per-request block tables, a prefix cache,
exact accounting.

Pure Python, no tensors: the runner owns the storage, `(layers, num_blocks, block_size, KV, hd)`,
and this module decides which block ids each request may write. A block is in exactly one state:
- free: no request holds it; with prefix caching a free block may still be *cached* (it keeps the
  KV of a full block of some earlier request's tokens, findable by its hash, evicted LRU when a
  blank block is needed);
- reserved: promised to a request whose KV has not arrived yet (a decode worker reserves before
  the prefill worker sends);
- used: held by one or more requests (a cached prefix block is shared, reference-counted).
`free + reserved + used == num_blocks` always, and `cached <= free`. At rest every block is free.

The prefix cache (vLLM's automatic prefix caching, by block hashes): a full block is keyed by a
hash chained over every token id from the start of the sequence up to the block's end, so equal
keys mean equal token prefixes (BLAKE2b, 128 bits: stable across processes). `match_prefix` finds
the longest run of cached leading blocks of a token sequence; `allocate`/`reserve` take them as
the table's first blocks (shared, read-only) and fresh blocks for the rest; `cache_blocks`
publishes a table's blocks once their KV is computed. Freed blocks go to the LRU end in reverse
order, so a sequence's tail is evicted before its head (a tail is useless without its head).

Placement keeps each request's fresh blocks contiguous where it can, so attention can read a
request's KV as one strided view instead of gathering it: a request grows into the block after its
last one when that is blank, and a new run starts in the middle of the largest blank run, leaving
room on both sides for its neighbours to grow. Cached blocks are evicted only when no blank is left.

Life of a request's blocks:
1. `allocate(rid, num_tokens, prefix)` (or `reserve` then `commit`) gives it the prefix blocks plus
   fresh ones up to ceil(tokens / block_size) blocks;
2. `append_slots(rid, n)` before each step that adds n tokens, growing the table as needed;
3. `cache_blocks(rid, token_ids, num_computed)` after a step (a no-op with caching off);
4. `free(rid)` when it finishes, is aborted or preempted: every block goes back (and stays cached).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


class OutOfBlocks(Exception):
    """Not enough free blocks; the scheduler waits or preempts, nothing is over-committed."""


BlockHash = bytes


def pool_misfit(num_tokens: int, num_blocks: int, block_size: int) -> str | None:
    """The one rule for whether a request can ever fit a pool: its prompt plus max_tokens in
    blocks, against all of the pool. None when it fits, else the shortfall in words."""
    need = -(-num_tokens // block_size)
    if need <= num_blocks:
        return None
    return (f"needs {num_tokens} tokens of KV, {need} KV blocks of {block_size}, but the pool holds only "
            f"{num_blocks} blocks ({num_blocks * block_size} tokens)")


def hash_blocks(token_ids: Sequence[int], block_size: int, num_blocks: int | None = None,
                parent: BlockHash = b"") -> list[BlockHash]:
    """The chained hashes of the full blocks of `token_ids` (the first `num_blocks` of them)."""
    count = len(token_ids) // block_size if num_blocks is None else min(num_blocks, len(token_ids) // block_size)
    out: list[BlockHash] = []
    for i in range(count):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes())
        parent = h.digest()
        out.append(parent)
    return out


@dataclass(slots=True)
class BlockTable:
    block_ids: list[int]
    num_tokens: int  # tokens whose slots are assigned (written or about to be)
    reserved: bool
    num_shared: int = 0  # leading blocks taken from the prefix cache (not part of a reservation)
    hashes: list[BlockHash] = field(default_factory=list)  # of the leading blocks published so far


@dataclass(slots=True)
class CacheCounters:
    """Prefix-cache figures since start (vLLM's prefix_cache_queries / _hits, in tokens)."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"pool needs at least one block of at least one token, got {num_blocks}×{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._blank = bytearray(b"\x01") * num_blocks  # free and keeping no cached KV
        self._num_blank = num_blocks
        self._refs = [0] * num_blocks  # tables holding each block
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached and free, least recent first
        self.tables: dict[str, BlockTable] = {}
        self.counters = CacheCounters()

    # --- accounting ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks no request holds: blank ones and cached ones (which can be evicted)."""
        return self._num_blank + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Free blocks that keep a cached prefix."""
        return len(self._evictable)

    @property
    def num_reserved(self) -> int:
        return sum(len(t.block_ids) - t.num_shared for t in self.tables.values() if t.reserved)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free - self.num_reserved

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, prefix: Sequence[int] = ()) -> bool:
        """Whether `allocate(rid, num_tokens, prefix)` would succeed now."""
        taken_from_free = sum(1 for b in prefix if self._refs[b] == 0)
        return self.blocks_for(num_tokens) - len(prefix) <= self.num_free - taken_from_free

    def num_new_blocks(self, rid: str, num_new_tokens: int) -> int:
        """Blocks `append_slots(rid, num_new_tokens)` would take from the free list."""
        t = self.tables[rid]
        return self.blocks_for(t.num_tokens + num_new_tokens) - len(t.block_ids)

    # --- the prefix cache -----------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], max_blocks: int | None = None) -> list[int]:
        """Block ids of the longest cached run of leading full blocks of `token_ids` (at most
        `max_blocks`); counts the query. Empty with caching off."""
        if not self.enable_caching:
            return []
        found: list[int] = []
        for h in hash_blocks(token_ids, self.block_size, max_blocks):
            b = self._by_hash.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def count_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.counters.queried_tokens += num_tokens
        self.counters.hit_tokens += num_hit_tokens

    def cache_blocks(self, rid: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Publish the full blocks of `rid` whose KV is computed (the first `num_computed` tokens of
        `token_ids`), so later requests with the same prefix can share them."""
        if not self.enable_caching:
            return
        t = self.tables[rid]
        full = min(num_computed // self.block_size, len(t.block_ids))
        if full <= len(t.hashes):
            return
        parent = t.hashes[-1] if t.hashes else b""
        new = hash_blocks(token_ids[len(t.hashes) * self.block_size : full * self.block_size], self.block_size,
                          parent=parent)
        for i, h in enumerate(new, start=len(t.hashes)):
            b = t.block_ids[i]
            if self._hash_of[b] is None and h not in self._by_hash:
                self._hash_of[b] = h
                self._by_hash[h] = b
            # else: the same prefix was computed twice at once (or the block is already the cached
            # one); the duplicate stays private and goes back blank when freed.
        t.hashes.extend(new)

    # --- life cycle ---------------------------------------------------------------------------

    def allocate(self, rid: str, num_tokens: int, prefix: Sequence[int] = ()) -> list[int]:
        """A new request's blocks for its first `num_tokens` tokens (the first of them the cached
        `prefix` blocks, shared), marked used."""
        return self._create(rid, num_tokens, prefix, reserved=False)

    def reserve(self, rid: str, num_tokens: int, prefix: Sequence[int] = ()) -> list[int]:
        """Blocks promised to a request whose KV is still to arrive (past its cached `prefix`,
        which it shares at once); `commit` marks them used."""
        return self._create(rid, num_tokens, prefix, reserved=True)

    def commit(self, rid: str) -> None:
        self.tables[rid].reserved = False

    def rewind(self, rid: str, num_tokens: int) -> None:
        """Take the table's token count back to `num_tokens`, keeping its blocks: the tokens after
        are computed here after all (a reservation prefilled in place)."""
        t = self.tables[rid]
        assert num_tokens <= t.num_tokens, (num_tokens, t.num_tokens)
        t.num_tokens = num_tokens

    def append_slots(self, rid: str, n: int) -> None:
        """Make room for n more tokens of `rid`; raises OutOfBlocks (changing nothing) if it can't."""
        t = self.tables[rid]
        need = self.num_new_blocks(rid, n)
        if need > self.num_free:
            raise OutOfBlocks(f"request {rid} needs {need} more blocks, {self.num_free} free")
        for _ in range(max(need, 0)):
            t.block_ids.append(self._take_after(t.block_ids[-1] if t.block_ids else None))
        t.num_tokens += n

    def free(self, rid: str) -> None:
        """Return every block of `rid` (cached ones stay findable until evicted); freeing an
        unknown or already freed request is a no-op."""
        t = self.tables.pop(rid, None)
        if t is None:
            return
        for b in reversed(t.block_ids):  # tail first: evicted before the head that it extends
            assert self._refs[b] > 0, f"block {b} of {rid} freed twice"
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if self._hash_of[b] is not None:
                self._evictable[b] = None
            else:
                self._blank[b] = 1
                self._num_blank += 1

    def reset_cache(self) -> int:
        """Forget every cached block that no request holds; returns how many."""
        dropped = list(self._evictable)
        for b in dropped:
            self._evict(b)
            self._blank[b] = 1
            self._num_blank += 1
        return len(dropped)

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

    def _create(self, rid: str, num_tokens: int, prefix: Sequence[int], reserved: bool) -> list[int]:
        if rid in self.tables:
            raise ValueError(f"request {rid} already holds blocks")
        assert len(prefix) * self.block_size <= num_tokens, "a prefix longer than the request"
        if not self.can_allocate(num_tokens, prefix):
            raise OutOfBlocks(f"request {rid} needs {self.blocks_for(num_tokens) - len(prefix)} blocks, "
                              f"{self.num_free} free")
        self.tables[rid] = t = BlockTable([], 0, reserved, num_shared=len(prefix))
        for b in prefix:
            assert self._hash_of[b] is not None, f"block {b} is not a cached block"
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
            t.block_ids.append(b)
            t.hashes.append(self._hash_of[b])  # type: ignore[arg-type]
        t.num_tokens = len(prefix) * self.block_size
        if self.blocks_for(num_tokens) > len(prefix) and not prefix:
            t.block_ids.append(self._take(self._new_start()))
        self.append_slots(rid, num_tokens - t.num_tokens)
        return list(t.block_ids)

    def _take(self, b: int | None) -> int:
        """Block b (blank), or with b None the least recently used cached block, evicted."""
        if b is None:
            b = next(iter(self._evictable))
            self._evict(b)
        else:
            assert self._blank[b]
            self._blank[b] = 0
            self._num_blank -= 1
        assert self._refs[b] == 0
        self._refs[b] = 1
        return b

    def _evict(self, b: int) -> None:
        del self._evictable[b]
        h = self._hash_of[b]
        assert h is not None
        del self._by_hash[h]
        self._hash_of[b] = None
        self.counters.evicted_blocks += 1

    def _take_after(self, last: int | None) -> int:
        if last is not None and last + 1 < self.num_blocks and self._blank[last + 1]:
            return self._take(last + 1)
        return self._take(self._new_start())

    def _new_start(self) -> int | None:
        """Start of a new run: the middle of the largest blank run (its start when that run opens
        the pool), so the request before it and the new one both have room to grow; None when no
        blank block is left (a cached one is evicted instead)."""
        if not self._num_blank:
            return None
        best_start, best_len, start = -1, 0, None
        for i in range(self.num_blocks + 1):
            if i < self.num_blocks and self._blank[i]:
                if start is None:
                    start = i
            elif start is not None:
                if i - start > best_len:
                    best_start, best_len = start, i - start
                start = None
        assert best_len > 0, "no blank block"
        if best_start == 0:
            return 0
        return best_start + best_len // 2
