"""Batching decisions, in pure Python: who runs this step, with how many tokens.

Policy (one unified step, as vLLM's V1 scheduler does):
1. Running sequences first, oldest first: each needs one token (decode) or, when a chunked
   prefill is unfinished, its next chunk. A sequence that cannot get a block for its next token
   preempts the newest running sequence (its blocks are freed and it goes back to the front of
   the waiting queue, to be re-prefilled later: recompute, not swap; on CPU recompute is cheap
   next to copying KV out and back). A sequence that would preempt itself waits instead.
2. Then waiting sequences, in arrival order, while `max_num_seqs`, the token budget
   (`max_num_batched_tokens`) and free blocks allow. Admission waits until the blocks of the whole
   prompt are free, so a prompt rarely stalls half-way for memory. Without chunked prefill a prompt
   goes in whole (alone if it exceeds the budget); with it, a prompt takes what budget is left.
3. A request that can never fit (prompt + max_tokens beyond the pool) is refused at `add`.
4. With prefix caching, a sequence admitted from the waiting queue first takes the longest cached
   run of its leading full blocks (never its last token, whose logits it needs) and computes only
   the rest; the budget and the free-block check count only what it computes and newly holds.
`decode_only` engines (the decode role) admit sequences whose KV was imported, never prompts;
`prefill_only` engines (the prefill role) finish a sequence after its first token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from disagg_cli.config import SamplingParams
from disagg_cli.kv.pool import BlockPool, pool_misfit


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then outputs
    num_prompt_tokens: int
    params: SamplingParams
    eos_ids: frozenset[int] = frozenset()
    num_computed_tokens: int = 0  # tokens whose KV is in the pool
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    kv_imported: bool = False  # its prompt's KV came from elsewhere (a prefill worker)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at its last admission

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """This step completes the sequence's known tokens, so its last position yields a token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = False) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        misfit = pool_misfit(seq.num_prompt_tokens + seq.params.max_tokens, self.pool.num_blocks,
                             self.pool.block_size)
        if misfit:
            raise ValueError(f"request {seq.request_id} {misfit}")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_decoding(self) -> int:
        """Running sequences whose next step is one token (decodes, not prompt chunks)."""
        return sum(1 for s in self.running if s.num_tokens - s.num_computed_tokens == 1)

    def schedule(self, prompt_budget: int | None = None) -> SchedulerOutput:
        """This step's batch. `prompt_budget`: with chunked prefill, the most prompt tokens the step
        may take (the engine's `max_step_ms`); None: only the token budget limits them."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        prompt_left = budget
        if prompt_budget is not None and self.chunked_prefill:
            # never so much prompt that an older chunk leaves the running decodes out of the step
            prompt_left = max(1, min(budget - self.num_decoding(), prompt_budget))
        # 1. running sequences, oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n > 1:  # the next chunk of a prompt
                n = min(n, prompt_left)
                if n < 1:
                    i += 1
                    continue
                prompt_left -= n
            while self.pool.num_new_blocks(seq.request_id, n) > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it preempted itself; everything after it is gone too
            self.pool.append_slots(seq.request_id, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        # 2. waiting sequences, in arrival order; once the prompt budget is spent, only those that join
        # as decodes (their KV imported) go past the prompts
        k = 0
        while k < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[k]
            imported = seq.request_id in self.pool.tables  # its KV arrived into reserved blocks
            is_prompt = not imported or seq.num_tokens - seq.num_computed_tokens > 1
            if is_prompt and prompt_left < 1:
                k += 1
                continue
            prefix: list[int] = []
            if not imported:
                prefix = self.pool.match_prefix(seq.token_ids, (seq.num_tokens - 1) // self.pool.block_size)
            start = seq.num_computed_tokens if imported else len(prefix) * self.pool.block_size
            remaining = seq.num_tokens - start
            if self.chunked_prefill:
                n = min(remaining, budget, prompt_left) if is_prompt else min(remaining, budget)
            elif remaining <= budget or not out.scheduled:
                n = remaining  # a prompt longer than the budget runs whole, alone
            else:
                break
            if imported:
                if self.pool.num_new_blocks(seq.request_id, n) > self.pool.num_free:
                    break
            elif not self.pool.can_allocate(seq.num_tokens, prefix):
                break  # backpressure: wait for blocks for the whole prompt, never over-commit
            del self.waiting[k]
            if is_prompt:
                prompt_left -= n
            if imported:
                self.pool.commit(seq.request_id)
            else:
                self.pool.allocate(seq.request_id, start, prefix)
                seq.num_computed_tokens = seq.num_cached_tokens = start
                if self.pool.enable_caching:
                    self.pool.count_query(seq.num_tokens, start)
            self.pool.append_slots(seq.request_id, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.pool.free(seq.request_id)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.kv_imported = False
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str, keep_blocks: bool = False) -> None:
        """End a sequence (done, aborted, failed) and free its blocks unless the caller still
        needs its KV (a prefill engine exports it first); idempotent."""
        if seq.status is Status.FINISHED:
            if not keep_blocks:
                self.pool.free(seq.request_id)
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_blocks:
            self.pool.free(seq.request_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
