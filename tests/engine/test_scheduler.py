"""Scheduler decisions on hand-made sequences: budgets, admission, backpressure, preemption."""

from __future__ import annotations

from disagg_cli.config import SamplingParams
from disagg_cli.engine.scheduler import Scheduler, Sequence, Status
from disagg_cli.kv.pool import BlockPool


def seq(rid: str, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(rid, list(range(prompt_len)), prompt_len, SamplingParams(max_tokens=max_tokens))


def run_step(s: Scheduler, prompt_budget: int | None = None) -> list[tuple[str, int]]:
    """Schedule, then pretend the model ran: every sequence that samples gets one token."""
    out = s.schedule(prompt_budget)
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.token_ids.append(0)
    return [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled]


def test_prefills_batch_under_token_budget_then_decode_together() -> None:
    s = Scheduler(BlockPool(64, 4), max_num_seqs=8, max_num_batched_tokens=20)
    for rid, n in [("a", 8), ("b", 8), ("c", 8)]:
        s.add(seq(rid, n))
    assert run_step(s) == [("a", 8), ("b", 8)]  # c's 8 would pass the budget of 20
    assert run_step(s) == [("a", 1), ("b", 1), ("c", 8)]  # decodes first, then the next prompt
    assert run_step(s) == [("a", 1), ("b", 1), ("c", 1)]


def test_max_num_seqs_caps_the_running_batch() -> None:
    s = Scheduler(BlockPool(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abc":
        s.add(seq(rid, 4))
    assert run_step(s) == [("a", 4), ("b", 4)]
    assert [x.request_id for x in s.waiting] == ["c"]


def test_long_prompt_runs_alone_without_chunking_and_in_chunks_with_it() -> None:
    s = Scheduler(BlockPool(64, 4), max_num_seqs=4, max_num_batched_tokens=16)
    s.add(seq("long", 40))
    assert run_step(s) == [("long", 40)]
    c = Scheduler(BlockPool(64, 4), max_num_seqs=4, max_num_batched_tokens=16, chunked_prefill=True)
    c.add(seq("long", 40))
    c.add(seq("short", 4))
    assert run_step(c) == [("long", 16)]
    assert run_step(c) == [("long", 16)]
    assert run_step(c) == [("long", 8), ("short", 4)]  # last chunk samples; the rest of the budget admits
    assert c.running[0].num_output_tokens == 1


def test_prompt_budget_cuts_chunks_and_decodes_run_whole() -> None:
    s = Scheduler(BlockPool(64, 4), max_num_seqs=8, max_num_batched_tokens=64, chunked_prefill=True)
    s.add(seq("a", 8))
    assert run_step(s, prompt_budget=5) == [("a", 5)]
    assert run_step(s) == [("a", 3)]
    s.add(seq("long", 30))
    s.add(seq("b", 4))
    assert run_step(s, prompt_budget=5) == [("a", 1), ("long", 5)]  # b waits behind long's chunk
    assert run_step(s, prompt_budget=12) == [("a", 1), ("long", 12)]  # the running chunk first
    assert run_step(s) == [("a", 1), ("long", 13), ("b", 4)]  # no bound: the token budget alone
    assert [x.num_output_tokens for x in s.running] == [4, 1, 1]
    n = Scheduler(BlockPool(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    n.add(seq("whole", 30))
    assert run_step(n, prompt_budget=5) == [("whole", 30)]  # without chunked prefill a prompt goes whole


def test_prompt_budget_lets_imported_decodes_pass_the_prompts_it_holds_back() -> None:
    pool = BlockPool(64, 4)
    s = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64, chunked_prefill=True)
    s.add(seq("a", 4))
    s.add(seq("p", 20))
    assert run_step(s) == [("a", 4), ("p", 20)]
    s.add(seq("q", 20))
    s.add(seq("r", 20))
    assert run_step(s, prompt_budget=6) == [("a", 1), ("p", 1), ("q", 6)]
    # a request moved here with its KV (reserved, now arrived) waits behind r, a prompt
    pool.reserve("m", 8)
    s.waiting.append(Sequence("m", list(range(9)), 8, SamplingParams(max_tokens=8), num_computed_tokens=8,
                              kv_imported=True))
    assert run_step(s, prompt_budget=6) == [("a", 1), ("p", 1), ("q", 6), ("m", 1)]  # q took the 6
    assert [x.request_id for x in s.waiting] == ["r"] and not pool.tables["m"].reserved


def test_an_older_prompt_chunk_never_squeezes_the_decodes_out_of_a_bounded_step() -> None:
    pool = BlockPool(64, 4)
    s = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=16, chunked_prefill=True)
    s.add(seq("long", 40))
    for rid in ("m1", "m2"):  # moved here with their KV: they join as decodes past the held-back prompt
        pool.reserve(rid, 8)
        s.waiting.append(Sequence(rid, list(range(9)), 8, SamplingParams(max_tokens=8), num_computed_tokens=8,
                                  kv_imported=True))
    assert run_step(s, prompt_budget=4) == [("long", 4), ("m1", 1), ("m2", 1)]
    # long is older than the decodes: a bound past the token budget still leaves them their tokens
    assert run_step(s, prompt_budget=100) == [("long", 14), ("m1", 1), ("m2", 1)]
    assert run_step(s) == [("long", 16)]  # unbounded, as before: the token budget alone


def test_backpressure_waits_for_blocks_and_never_over_commits() -> None:
    pool = BlockPool(4, 4)  # 16 tokens in all
    s = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    s.add(seq("a", 8, max_tokens=4))
    s.add(seq("b", 8, max_tokens=4))
    s.add(seq("c", 4, max_tokens=4))
    assert run_step(s) == [("a", 8), ("b", 8)]
    assert pool.num_free == 0 and [x.request_id for x in s.waiting] == ["c"]
    # a needs a 3rd block for its 9th token: it preempts the newest (b), which re-queues first.
    assert run_step(s) == [("a", 1)]
    assert [x.request_id for x in s.waiting] == ["b", "c"] and s.waiting[0].num_computed_tokens == 0
    assert pool.num_free + pool.num_used == 4 and pool.num_used == 3
    s.finish(s.running[0], "stop")
    assert pool.num_free == 4
    assert run_step(s) == [("b", 9), ("c", 4)]  # b re-prefills its prompt and its first output


def test_finish_frees_blocks_from_any_state() -> None:
    pool = BlockPool(8, 4)
    s = Scheduler(pool, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = seq("a", 4), seq("b", 4)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(a, "abort")
    s.finish(b, "abort")  # still waiting
    s.finish(b, "abort")
    assert a.status is b.status is Status.FINISHED and not s.has_unfinished()
    assert pool.num_free == 8 and not pool.tables
