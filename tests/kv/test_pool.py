"""The block pool's accounting, exactly: block ids, counts, states, and nothing leaked."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_cli.kv.pool import BlockPool, OutOfBlocks


def test_first_request_starts_at_block_zero_and_grows_in_place() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    assert pool.allocate("a", 6) == [0, 1]
    assert pool.slots("a", 0, 6) == [0, 1, 2, 3, 4, 5]
    pool.append_slots("a", 2)  # 8 tokens: still two blocks
    assert pool.tables["a"].block_ids == [0, 1]
    pool.append_slots("a", 1)  # the 9th token opens block 2, right after block 1
    assert pool.tables["a"].block_ids == [0, 1, 2]
    assert (pool.num_free, pool.num_used, pool.num_reserved) == (5, 3, 0)
    assert pool.contiguous_start("a") == 0


def test_new_request_starts_mid_gap_so_both_can_grow() -> None:
    pool = BlockPool(num_blocks=10, block_size=2)
    pool.allocate("a", 2)  # block 0
    assert pool.allocate("b", 2) == [5]  # middle of the free run 1..9
    pool.append_slots("a", 2)
    pool.append_slots("b", 2)
    assert pool.tables["a"].block_ids == [0, 1] and pool.tables["b"].block_ids == [5, 6]


def test_fragmented_request_is_reported_non_contiguous() -> None:
    pool = BlockPool(num_blocks=4, block_size=1)
    pool.allocate("a", 1)  # [0]
    pool.allocate("b", 1)  # middle of 1..3 → [2]
    pool.append_slots("a", 1)  # block 1 is free: [0, 1]
    pool.append_slots("a", 1)  # block 2 is b's: jumps to [3]
    assert pool.tables["a"].block_ids == [0, 1, 3]
    assert pool.contiguous_start("a") is None
    assert pool.slots("a", 0, 3) == [0, 1, 3]


def test_out_of_blocks_changes_nothing() -> None:
    pool = BlockPool(num_blocks=3, block_size=4)
    pool.allocate("a", 8)
    with pytest.raises(OutOfBlocks):
        pool.allocate("b", 5)  # needs 2, 1 free
    assert "b" not in pool.tables and pool.num_free == 1
    with pytest.raises(OutOfBlocks):
        pool.append_slots("a", 5)  # 13 tokens need 4 blocks
    assert pool.tables["a"].num_tokens == 8 and pool.num_free == 1


def test_reserve_commit_and_free() -> None:
    pool = BlockPool(num_blocks=6, block_size=16)
    assert pool.reserve("r", 40) == [0, 1, 2]
    assert (pool.num_free, pool.num_used, pool.num_reserved) == (3, 0, 3)
    pool.commit("r")
    assert (pool.num_free, pool.num_used, pool.num_reserved) == (3, 3, 0)
    pool.free("r")
    pool.free("r")  # idempotent
    assert (pool.num_free, pool.num_used, pool.num_reserved) == (6, 0, 0)


def test_duplicate_request_is_refused() -> None:
    pool = BlockPool(num_blocks=2, block_size=2)
    pool.allocate("a", 1)
    with pytest.raises(ValueError, match="already holds blocks"):
        pool.allocate("a", 1)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "reserve", "grow", "free", "commit"]),
                          st.integers(0, 5), st.integers(0, 40)), max_size=60))
def test_random_operations_keep_exact_accounting(ops: list[tuple[str, int, int]]) -> None:
    pool = BlockPool(num_blocks=16, block_size=4)
    for op, who, n in ops:
        rid = f"r{who}"
        try:
            if op == "alloc" and rid not in pool.tables:
                pool.allocate(rid, n)
            elif op == "reserve" and rid not in pool.tables:
                pool.reserve(rid, n)
            elif op == "grow" and rid in pool.tables:
                pool.append_slots(rid, n)
            elif op == "commit" and rid in pool.tables:
                pool.commit(rid)
            elif op == "free":
                pool.free(rid)
        except OutOfBlocks:
            pass
        held = [b for t in pool.tables.values() for b in t.block_ids]
        assert len(held) == len(set(held)), "a block is held twice"
        assert pool.num_free + pool.num_used + pool.num_reserved == pool.num_blocks
        assert pool.num_free == pool.num_blocks - len(held)
        for t in pool.tables.values():
            assert len(t.block_ids) == pool.blocks_for(t.num_tokens)
    for rid in list(pool.tables):
        pool.free(rid)
    assert pool.num_free == 16
