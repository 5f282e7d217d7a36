"""Turning logits into token ids: greedy, temperature, top-k, top-p, seeded per request.

Each request owns a `torch.Generator` seeded from its `seed`, so a seeded request draws the same
tokens whether it runs alone or in a batch.

Whatever a row of logits holds, a draw returns a token id of the vocabulary and never raises:
NaN logits count as impossible, +inf ones as certain (shared evenly when several are), and a row
with nothing left to draw from gives its first token. A temperature below `MIN_TEMPERATURE` is
greedy (`SamplingParams.is_greedy`), so dividing by it cannot overflow the logits.

A sampler's random state travels from the prefill worker to the decode worker as bytes
(`state_bytes`, `load_state`): exactly `STATE_BYTES` of them, as torch's CPU generator packs it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from disagg_cli.config import SamplingParams
from disagg_cli.engine.logprobs import TokenLogprobs

# The size of a CPU `torch.Generator`'s packed state (5,056 bytes in torch 2.x).
STATE_BYTES = torch.Generator().get_state().numel()


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (V,) float32 → one token id."""
        p = self.params
        drawable = _drawable(logits.float().cpu())
        if drawable is None:
            return 0
        if p.is_greedy:
            return int(torch.argmax(drawable))
        logits = drawable / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        # Inverse CDF with one uniform draw: torch.multinomial with a generator took 14 ms per token
        # over this vocabulary (49,152) on Zen 4, this 0.2 ms; the same seed still gives the same text.
        cdf = torch.softmax(logits, dim=-1).cumsum(-1)
        total = float(cdf[-1])
        if not (math.isfinite(total) and total > 0):
            return int(torch.argmax(drawable))  # the temperature over- or underflowed them: the best
        u = float(torch.rand((), generator=self.generator)) * total
        # the first token whose cumulative probability passes u: one of positive probability
        return min(int(torch.searchsorted(cdf, torch.tensor([u]), right=True)), cdf.shape[-1] - 1)

    def state_bytes(self) -> bytes | None:
        """The generator's state (None for greedy sampling, which draws nothing)."""
        return None if self.generator is None else bytes(self.generator.get_state().numpy().tobytes())

    def load_state(self, state: bytes) -> None:
        """Go on from `state_bytes()` of another sampler; `ValueError` naming what is wrong with it."""
        if why := state_problem(state):
            raise ValueError(why)
        if self.generator is not None:
            self.generator.set_state(_state_tensor(state))

    def logprobs(self, logits: torch.Tensor, token_id: int) -> TokenLogprobs | None:
        """The raw distribution's logprob of `token_id` and its top `params.logprobs`; None when not asked."""
        k = self.params.logprobs
        if k is None:
            return None
        lp = torch.log_softmax(logits.float(), dim=-1)
        k = min(k, lp.shape[-1])
        top = torch.topk(lp, k) if k else None
        return TokenLogprobs(float(lp[token_id]), tuple(top.indices.tolist()) if top is not None else (),
                             tuple(top.values.tolist()) if top is not None else ())


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's ops on the calling thread alone, inside the block. Sampling is a few vocabulary-wide
    ops per row; split across threads, each waits for whichever thread another process preempted
    (Zen 4, 2 threads, a 49,152-wide division: 7 us on a quiet machine, 15 ms beside a busy one)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def state_problem(state: bytes) -> str | None:
    """Why torch would refuse `state` as a generator state, or None (tried on a scratch generator,
    as torch also checks its Mersenne-twister fields)."""
    if len(state) != STATE_BYTES:
        return f"sampler_state of {len(state)} bytes; a torch CPU generator state is {STATE_BYTES}"
    try:
        torch.Generator().set_state(_state_tensor(state))
    except (RuntimeError, ValueError) as e:
        return f"sampler_state is not a torch CPU generator state: {e}"
    return None


def _state_tensor(state: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


def _drawable(logits: torch.Tensor) -> torch.Tensor | None:
    """`logits` with NaN as -inf and, when any is +inf, only those kept (as equals); None when no
    entry is drawable. The common all-finite row is returned as is."""
    if bool(torch.isfinite(logits).all()):
        return logits
    inf = torch.isposinf(logits)
    if bool(inf.any()):
        return torch.where(inf, 0.0, float("-inf"))
    logits = torch.nan_to_num(logits, nan=float("-inf"), neginf=float("-inf"))
    return logits if bool(torch.isfinite(logits).any()) else None
