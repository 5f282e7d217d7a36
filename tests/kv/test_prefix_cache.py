"""The pool's prefix cache, exactly: hash chains, shared blocks and their reference counts, LRU
eviction order (tail before head), and accounting in which every block is free at rest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_cli.kv.pool import BlockPool, OutOfBlocks, hash_blocks


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # full blocks only: the 9th token is not hashed
    assert a == hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_blocks([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1], "a different first block changes every later hash"
    # The same block of tokens after a different prefix is a different key:
    assert hash_blocks([5, 6, 7, 8, 1, 2, 3, 4], 4)[1] != a[0]
    # Continuing a chain from a parent gives the hashes of the longer sequence:
    assert hash_blocks([5, 6, 7, 8], 4, parent=a[0]) == hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)[1:]
    assert hash_blocks(list(range(12)), 4, num_blocks=1) == hash_blocks(list(range(4)), 4)
    assert all(len(h) == 16 for h in a)


def _run(pool: BlockPool, rid: str, tokens: list[int]) -> list[int]:
    """A request computing all of `tokens` (reusing what is cached), published, then freed."""
    prefix = pool.match_prefix(tokens, (len(tokens) - 1) // pool.block_size)
    ids = pool.allocate(rid, len(tokens), prefix)
    pool.cache_blocks(rid, tokens, len(tokens))
    return ids


def test_freed_request_leaves_its_full_blocks_cached_and_a_second_shares_them() -> None:
    pool = BlockPool(num_blocks=8, block_size=4, enable_caching=True)
    tokens = list(range(10))  # two full blocks and a partial one
    assert _run(pool, "a", tokens) == [0, 1, 2]
    pool.free("a")
    assert (pool.num_free, pool.num_cached, pool.num_used) == (8, 2, 0)  # the partial block is blank again
    assert pool.match_prefix(tokens + [99]) == [0, 1]
    ids = pool.allocate("b", 11, pool.match_prefix(tokens + [99]))
    assert ids[:2] == [0, 1] and len(ids) == 3
    assert pool.tables["b"].num_shared == 2 and pool.tables["b"].num_tokens == 11
    assert (pool.num_free, pool.num_cached, pool.num_used) == (5, 0, 3)
    # A third request shares the same two blocks while b holds them: reference count 2.
    pool.allocate("c", 9, pool.match_prefix(tokens[:8] + [7]))
    assert pool.tables["c"].block_ids[:2] == [0, 1]
    assert (pool.num_free, pool.num_used) == (4, 4)
    pool.free("b")
    assert (pool.num_free, pool.num_cached) == (5, 0), "blocks 0, 1 are still held by c"
    pool.free("c")
    assert (pool.num_free, pool.num_cached, pool.num_used) == (8, 2, 0)


def test_match_stops_at_the_first_missing_block_and_respects_the_limit() -> None:
    pool = BlockPool(num_blocks=8, block_size=2, enable_caching=True)
    _run(pool, "a", [1, 2, 3, 4, 5, 6, 7])
    pool.free("a")
    assert pool.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]) == [0, 1, 2]
    assert pool.match_prefix([1, 2, 3, 4, 5, 6, 7, 8], max_blocks=2) == [0, 1]
    assert pool.match_prefix([1, 2, 9, 4, 5, 6]) == [0]
    assert pool.match_prefix([2, 1, 3, 4]) == []
    off = BlockPool(num_blocks=8, block_size=2)
    _run(off, "a", [1, 2, 3, 4])
    off.free("a")
    assert off.match_prefix([1, 2, 3, 4, 5]) == [] and off.num_cached == 0 and off.num_free == 8


def test_eviction_takes_blank_blocks_first_then_lru_tail_before_head() -> None:
    pool = BlockPool(num_blocks=6, block_size=1, enable_caching=True)
    _run(pool, "old", [10, 11, 12])  # blocks 0, 1, 2
    pool.free("old")
    _run(pool, "new", [20, 21])  # blank blocks: middle of the run 3..5 → 4, 5
    assert pool.tables["new"].block_ids == [4, 5]
    pool.free("new")
    assert (pool.num_cached, pool.num_free) == (5, 6)
    # One blank block (3) left: it goes first; then the least recently freed, tail first: 2, 1, 0.
    ids = pool.allocate("x", 4)
    assert ids == [3, 2, 1, 0]
    assert pool.counters.evicted_blocks == 3
    assert pool.match_prefix([10, 11, 12, 13]) == []
    assert pool.match_prefix([20, 21, 22]) == [4, 5]
    pool.free("x")
    assert (pool.num_free, pool.num_cached, pool.num_used) == (6, 2, 0)
    assert pool.reset_cache() == 2 and pool.num_cached == 0 and pool.match_prefix([20, 21, 22]) == []


def test_a_reused_block_moves_to_the_recent_end() -> None:
    pool = BlockPool(num_blocks=4, block_size=1, enable_caching=True)
    _run(pool, "a", [1, 2])
    pool.free("a")
    _run(pool, "b", [7, 8])
    pool.free("b")
    _run(pool, "a2", [1, 9])  # reuses block of token 1: it is recent now, and b's are older
    pool.free("a2")
    pool.allocate("x", 2)  # no blank block left: evicts the two least recently used, b's
    assert pool.match_prefix([1, 9]) == [0, 1] and pool.match_prefix([7, 8]) == []


def test_reservation_shares_its_cached_prefix_and_counts_only_fresh_blocks_reserved() -> None:
    pool = BlockPool(num_blocks=8, block_size=4, enable_caching=True)
    _run(pool, "a", list(range(8)))
    pool.free("a")
    prompt = list(range(8)) + [50, 51, 52]
    prefix = pool.match_prefix(prompt, (len(prompt) - 1) // 4)
    assert pool.can_allocate(len(prompt) + 1, prefix)
    pool.reserve("r", len(prompt), prefix)
    assert (pool.num_free, pool.num_used, pool.num_reserved) == (5, 2, 1)
    pool.commit("r")
    pool.cache_blocks("r", prompt, len(prompt))
    assert (pool.num_free, pool.num_used, pool.num_reserved) == (5, 3, 0)
    pool.rewind("r", 8)
    pool.append_slots("r", 3)
    assert pool.tables["r"].num_tokens == 11 and len(pool.tables["r"].block_ids) == 3


def test_the_same_prefix_computed_twice_at_once_keeps_one_cached_copy() -> None:
    pool = BlockPool(num_blocks=8, block_size=2, enable_caching=True)
    pool.allocate("a", 4)
    pool.allocate("b", 4)
    pool.cache_blocks("a", [1, 2, 3, 4], 4)
    pool.cache_blocks("b", [1, 2, 3, 4], 4)
    pool.free("a")
    pool.free("b")
    assert pool.num_cached == 2 and pool.num_free == 8  # b's duplicates went back blank
    assert pool.match_prefix([1, 2, 3, 4, 5]) == [0, 1]  # a's blocks, published first


def test_can_allocate_counts_free_cached_prefix_blocks_as_taken() -> None:
    pool = BlockPool(num_blocks=3, block_size=1, enable_caching=True)
    _run(pool, "a", [1, 2, 3])
    pool.free("a")
    prefix = pool.match_prefix([1, 2, 3, 4], 3)
    assert len(prefix) == 3
    assert pool.can_allocate(3, prefix)
    assert not pool.can_allocate(4, prefix), "the prefix blocks are the only free ones"
    with pytest.raises(OutOfBlocks):
        pool.allocate("b", 4, prefix)
    assert "b" not in pool.tables and pool.num_cached == 3


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["run", "hold", "grow", "free"]), st.integers(0, 4),
                          st.integers(0, 3), st.integers(1, 14)), max_size=60))
def test_random_operations_with_caching_keep_exact_accounting(ops: list[tuple[str, int, int, int]]) -> None:
    pool = BlockPool(num_blocks=12, block_size=2, enable_caching=True)
    families = [[f * 100 + i for i in range(30)] for f in range(4)]  # prompts sharing prefixes
    lengths: dict[str, int] = {}
    for op, who, family, n in ops:
        rid = f"r{who}"
        tokens = families[family]
        try:
            if op in ("run", "hold") and rid not in pool.tables:
                prefix = pool.match_prefix(tokens[:n], (n - 1) // 2)
                pool.allocate(rid, n, prefix)
                pool.cache_blocks(rid, tokens, n)
                lengths[rid] = family
                if op == "run":
                    pool.free(rid)
            elif op == "grow" and rid in pool.tables:
                t = pool.tables[rid]
                pool.append_slots(rid, min(n, 30 - t.num_tokens))
                pool.cache_blocks(rid, families[lengths[rid]], t.num_tokens)
            elif op == "free":
                pool.free(rid)
        except OutOfBlocks:
            pass
        held = {b for t in pool.tables.values() for b in t.block_ids}
        assert pool.num_free + pool.num_used + pool.num_reserved == pool.num_blocks
        assert pool.num_free == pool.num_blocks - len(held)
        assert 0 <= pool.num_cached <= pool.num_free
        for t in pool.tables.values():
            assert len(t.block_ids) == pool.blocks_for(t.num_tokens)
        # Every cached block's hash is the chain of the tokens it holds: a match gives back blocks
        # whose hashes are exactly the query's.
        for tokens in families:
            found = pool.match_prefix(tokens)
            assert [pool._hash_of[b] for b in found] == hash_blocks(tokens, 2)[: len(found)]
    for rid in list(pool.tables):
        pool.free(rid)
    assert pool.num_free == 12 and pool.num_used == 0
