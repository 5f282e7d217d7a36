"""The engine loop every role runs: schedule → run the model once → sample and post-process.

Life of a request in the engine:
1. `add_request` (a prompt) or `add_imported` (a prompt whose KV and first token came from a
   prefill engine) puts a `Sequence` in the scheduler's waiting queue;
2. each `step()` schedules a batch, runs it, samples one token for every sequence whose known
   tokens are now all cached, publishes the full blocks it computed to the prefix cache (with
   `enable_prefix_caching`), and reports `TokenEvent`s;
3. a sequence finishes on EOS, `max_tokens`, `abort()` (a stop string seen by the caller, a client
   gone), or, in a `prefill_only` engine, right after its first token, where the caller may
   `export_kv` before `release`; its blocks return to the pool;
4. or it fails: an exception in sampling its token fails it alone, one in the model's step (no
   row to blame) every sequence of that step; each is aborted (blocks freed) and listed with the
   reason for the caller's `take_failures()`, and the engine goes on with the others.

Token ids from outside (prompts, an imported first token) are checked against the vocabulary
where they enter (`add_*` raise `ValueError`), as the model's embedding would index past its table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.engine.logprobs import TokenLogprobs
from disagg_cli.engine.runner import LayerHook, ModelRunner
from disagg_cli.engine.scheduler import Scheduler, Sequence
from disagg_cli.engine.step_speed import StepSpeed
from disagg_cli.kv.pool import BlockPool, pool_misfit
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.quant.kernels import argmax_rows
from disagg_cli.model.sampling import Sampler, one_thread


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: str
    token_id: int
    finish_reason: str | None  # "stop", "length", "prefilled" (prefill_only) or None while running
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass
class StepStats:
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0
    num_preempted: int = 0
    elapsed_ms: float = 0.0


class LLMEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig, prefill_only: bool = False) -> None:
        self.lm = lm
        self.config = config
        self.prefill_only = prefill_only
        num_blocks = config.num_blocks(lm.config.kv_bytes_per_token(lm.runtime.kv_cache_dtype))
        self.pool = BlockPool(num_blocks, config.block_size, enable_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.chunked_prefill)
        self.runner = ModelRunner(lm, self.pool)
        self.seqs: dict[str, Sequence] = {}
        self.samplers: dict[str, Sampler] = {}
        self.last_step = StepStats()
        self.speed = StepSpeed()  # measured as it steps; bounds the prompt chunks of steps that decode
        self.failures: list[tuple[str, str]] = []  # (request id, why) failed in steps, for take_failures
        self.step_request_ids: list[str] = []  # whom the current (or last) step scheduled

    # --- requests in ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    eos_ids: frozenset[int] = frozenset()) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request {request_id} is already in the engine")
        if not prompt_ids:
            raise ValueError(f"request {request_id} has an empty prompt")
        self.check_token_ids(request_id, prompt_ids, "prompt_ids")
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), params,
                       frozenset() if params.ignore_eos else eos_ids)
        self.scheduler.add(seq)
        self.seqs[request_id] = seq
        self.samplers[request_id] = Sampler(params)

    def reserve_imported(self, request_id: str, prompt_ids: list[int]) -> int | None:
        """Set aside blocks for a prompt's KV that another engine will send, sharing the longest
        cached prefix of it (never the whole prompt: at least one token's KV must come); returns
        how many leading prompt tokens are already cached here, or None if there is no room yet."""
        bs = self.pool.block_size
        prefix = self.pool.match_prefix(prompt_ids, (len(prompt_ids) - 1) // bs)
        if not self.pool.can_allocate(len(prompt_ids) + 1, prefix):
            return None
        self.pool.reserve(request_id, len(prompt_ids), prefix)
        if self.pool.enable_caching:
            self.pool.count_query(len(prompt_ids), len(prefix) * bs)
        return len(prefix) * bs

    def add_imported(self, request_id: str, prompt_ids: list[int], first_token: int, params: SamplingParams,
                     kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                     eos_ids: frozenset[int] = frozenset()) -> TokenEvent | None:
        """Join a sequence prefilled elsewhere: its KV (already placed layer by layer with
        `import_kv_layer`, or given here whole) fills its reserved blocks; decoding continues from
        `first_token`. Returns a finish event when that first token already ends it."""
        self.check_token_ids(request_id, [*prompt_ids, first_token], "prompt_ids and first_token")
        if request_id not in self.pool.tables:
            self.pool.reserve(request_id, len(prompt_ids))
        if kv is not None:
            for layer, (k, v) in enumerate(kv):
                self.runner.import_kv_layer(request_id, layer, k, v)
        seq = Sequence(request_id, list(prompt_ids) + [first_token], len(prompt_ids), params,
                       frozenset() if params.ignore_eos else eos_ids, num_computed_tokens=len(prompt_ids),
                       kv_imported=True)
        self.seqs[request_id] = seq
        self.samplers[request_id] = Sampler(params)
        reason = self._finish_reason(seq, first_token)
        if reason:
            self.scheduler.finish(seq, reason)
            return TokenEvent(request_id, first_token, reason)
        self.scheduler.waiting.append(seq)
        return None

    def import_kv_layer(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """One layer of a reserved request's KV for prompt tokens start.. (the ones before it were
        cached here)."""
        self.runner.import_kv_layer(request_id, layer, k, v, start)

    def prefill_reserved(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                         eos_ids: frozenset[int] = frozenset()) -> None:
        """Compute here, in its reserved blocks, the prompt of a request reserved for imported KV
        (selective disaggregation: a short prompt is not worth a transfer); the cached leading
        tokens of the reservation are not computed again."""
        if request_id in self.seqs:
            raise ValueError(f"request {request_id} is already in the engine")
        self.check_token_ids(request_id, prompt_ids, "prompt_ids")
        table = self.pool.tables[request_id]
        cached = table.num_shared * self.pool.block_size
        self.pool.rewind(request_id, cached)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), params,
                       frozenset() if params.ignore_eos else eos_ids, num_computed_tokens=cached,
                       num_cached_tokens=cached)
        self.scheduler.add(seq)
        self.seqs[request_id] = seq
        self.samplers[request_id] = Sampler(params)

    def read_kv(self, request_id: str, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer` of tokens start..end-1 of a request's KV in the pool (e.g. its cached prefix)."""
        return self.runner.read_kv(request_id, layer, start, end)

    def cache_stats(self) -> dict[str, float]:
        """The prefix cache's figures for heartbeats and /metrics (zeros with caching off)."""
        c = self.pool.counters
        return {"cached_blocks": self.pool.num_cached, "prefix_queried_tokens": c.queried_tokens,
                "prefix_hit_tokens": c.hit_tokens, "prefix_evicted_blocks": c.evicted_blocks}

    def check_token_ids(self, request_id: str, token_ids: list[int], what: str) -> None:
        """Raise `ValueError` unless every id indexes the model's vocabulary."""
        vocab = self.lm.config.vocab_size
        if bad := [t for t in token_ids if not 0 <= t < vocab][:1]:
            raise ValueError(f"request {request_id}: {what} holds token id {bad[0]}, outside the vocabulary "
                             f"0..{vocab - 1}")

    # --- what roles ask of a request ---------------------------------------------------------------

    def has_request(self, request_id: str) -> bool:
        """Whether the engine knows the request (waiting, running, or prefilled and not released)."""
        return request_id in self.seqs

    def blocks_held(self, request_id: str) -> int:
        """KV blocks the request holds (reserved or used), 0 when it holds none."""
        table = self.pool.tables.get(request_id)
        return len(table.block_ids) if table is not None else 0

    def cached_prompt_tokens(self, request_id: str) -> int:
        """Leading prompt tokens the prefix cache gave the request (0 when unknown)."""
        seq = self.seqs.get(request_id)
        return seq.num_cached_tokens if seq is not None else 0

    def sampler_state(self, request_id: str) -> bytes | None:
        """The request's random generator state (seeded sampling), for a decode worker to go on from."""
        sampler = self.samplers.get(request_id)
        return None if sampler is None else sampler.state_bytes()

    def set_sampler_state(self, request_id: str, state: bytes) -> None:
        """Continue a request's seeded sampling from the state its prefill engine left; a state torch
        cannot load raises `ValueError` (and leaves the request as it was)."""
        sampler = self.samplers.get(request_id)
        if sampler is not None:
            sampler.load_state(state)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def misfit(self, num_tokens: int) -> str | None:
        """Why a request of num_tokens (prompt + max new) can never fit this pool, or None."""
        return pool_misfit(num_tokens, self.pool.num_blocks, self.pool.block_size)

    def pool_stats(self) -> dict[str, int]:
        """Queue lengths and exact block counts, for heartbeats."""
        pool, sched = self.pool, self.scheduler
        return {"waiting": len(sched.waiting), "running": len(sched.running), "free_blocks": pool.num_free,
                "num_blocks": pool.num_blocks, "reserved_blocks": pool.num_reserved, "used_blocks": pool.num_used}

    def abort_all(self) -> None:
        """Abort every request that holds blocks (shutdown); afterwards every block is free."""
        for rid in list(self.pool.tables):
            self.abort(rid)
        assert self.pool.num_free == self.pool.num_blocks

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free its blocks (reserved ones too); idempotent."""
        seq = self.seqs.pop(request_id, None)
        self.samplers.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
        self.pool.free(request_id)

    # --- the loop -------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self, on_layer: LayerHook | None = None) -> list[TokenEvent]:
        t0 = time.perf_counter()
        self.step_request_ids = []
        # a prefill-only engine has no decodes to keep waiting: its prompts go whole
        out = self.scheduler.schedule(None if self.prefill_only else self.speed.prompt_budget(
            self.config.max_step_ms, self.scheduler.num_decoding() > 0))
        self.step_request_ids = [item.seq.request_id for item in out.scheduled]
        if not out.scheduled:
            self.last_step = StepStats(num_preempted=len(out.preempted))
            return []
        try:
            logits = self.runner.execute(out.scheduled, on_layer)
            # Every greedy row's token in one pass over the logits (one call instead of one per row).
            greedy = (argmax_rows(self.runner.kernel, logits) if any(
                self.samplers[i.seq.request_id].params.is_greedy for i in out.scheduled if i.samples) else [])
        except Exception as e:  # the batch's rows cannot be trusted, nor one of them blamed
            for rid in self.step_request_ids:
                self.fail(rid, f"the model step failed: {type(e).__name__}: {e}")
            self.last_step = StepStats(num_preempted=len(out.preempted), elapsed_ms=(time.perf_counter() - t0) * 1e3)
            return []
        events: list[TokenEvent] = []
        row = 0
        stats = StepStats(num_preempted=len(out.preempted))
        with one_thread():  # the per-row sampling ops
            for item in out.scheduled:
                seq = item.seq
                samples = item.samples  # read before num_computed_tokens moves
                if item.num_new_tokens > 1 or seq.num_output_tokens == 0:
                    stats.num_prefill_tokens += item.num_new_tokens
                else:
                    stats.num_decode_seqs += 1
                seq.num_computed_tokens += item.num_new_tokens
                self.pool.cache_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
                if not samples:
                    continue  # a prefill chunk with more of its prompt to come
                sampler = self.samplers[seq.request_id]
                try:
                    token = greedy[row] if sampler.params.is_greedy else sampler(logits[row])
                    logprobs = sampler.logprobs(logits[row], token)
                except Exception as e:  # this request's sampling alone: the batch's other rows stand
                    self.fail(seq.request_id, f"sampling failed: {type(e).__name__}: {e}")
                    continue
                finally:
                    row += 1
                seq.token_ids.append(token)
                reason = self._finish_reason(seq, token)
                if reason == "prefilled":  # the caller exports the KV first, then `release`s
                    self.scheduler.finish(seq, reason, keep_blocks=True)
                elif reason:
                    self.scheduler.finish(seq, reason)
                    self._forget(seq.request_id)
                events.append(TokenEvent(seq.request_id, token, reason, logprobs))
        stats.elapsed_ms = (time.perf_counter() - t0) * 1e3
        self.last_step = stats
        self.speed.observe(stats.num_prefill_tokens, stats.num_decode_seqs, stats.elapsed_ms)
        return events

    def fail(self, request_id: str, why: str) -> None:
        """Abort a request that broke (blocks freed) and list it for `take_failures`."""
        self.abort(request_id)
        self.failures.append((request_id, why))

    def take_failures(self) -> list[tuple[str, str]]:
        """(request id, why) of the requests failed since the last call, for the caller to report."""
        out, self.failures = self.failures, []
        return out

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if self.prefill_only:
            return "prefilled"
        if token in seq.eos_ids:
            return "stop"
        if seq.num_output_tokens >= seq.params.max_tokens:
            return "length"
        return None

    def _forget(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)
        self.samplers.pop(request_id, None)

    # --- KV out -----------------------------------------------------------------------------------

    def export_kv(self, request_id: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The KV of a sequence's computed tokens, token-major per layer, independent of block size."""
        seq = self.seqs[request_id]
        return self.runner.export_kv(request_id, seq.num_computed_tokens)

    def park(self, request_id: str) -> Sequence | None:
        """Take a decoding sequence out of the batch between steps, its blocks and sampler kept, to
        move it with its KV (`read_kv` of its computed tokens, then `abort`); None unless every
        token but its last is computed (a prompt or chunk still running, or not here)."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.num_output_tokens < 1 or seq.num_computed_tokens != seq.num_tokens - 1:
            return None
        if seq in self.scheduler.running:
            self.scheduler.running.remove(seq)
        elif seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        else:
            return None
        return seq

    def release(self, request_id: str) -> None:
        """Free a finished prefill_only sequence's blocks after its KV was exported."""
        self.pool.free(request_id)
        self._forget(request_id)
