"""The sampler returns a token of the vocabulary for any logits and any parameters the wire can carry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_cli.config import MIN_TEMPERATURE, SamplingParams
from disagg_cli.errors import UsageError
from disagg_cli.model.sampling import STATE_BYTES, Sampler, one_thread, state_problem

V = 50


def test_a_temperature_below_the_floor_is_greedy() -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    for t in (1e-40, 5e-324, MIN_TEMPERATURE / 2):
        params = SamplingParams(temperature=t, seed=1)
        assert params.is_greedy and Sampler(params)(logits) == int(torch.argmax(logits))
    assert not SamplingParams(temperature=MIN_TEMPERATURE).is_greedy


@settings(max_examples=200, deadline=None, database=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=V, max_size=V),
       temperature=st.one_of(st.just(MIN_TEMPERATURE), st.floats(MIN_TEMPERATURE, 1e6)),
       top_p=st.floats(1e-6, 1.0), top_k=st.integers(0, 2**63 - 1), seed=st.integers(-(2**63), 2**64 - 1))
def test_any_logits_give_a_token_of_the_vocabulary(values: list[float], temperature: float, top_p: float,
                                                    top_k: int, seed: int) -> None:
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, logprobs=20))
    logits = torch.tensor(values)
    token = sampler(logits)
    assert 0 <= token < V
    finite = [i for i, x in enumerate(values) if math.isfinite(x)]
    if any(x == math.inf for x in values):
        assert values[token] == math.inf  # +inf is certain
    elif finite:
        assert math.isfinite(values[token])  # NaN and -inf are impossible
    assert sampler.logprobs(logits, token) is not None


def test_seeds_and_top_k_are_refused_outside_what_torch_takes() -> None:
    for seed in (-(2**63), 2**64 - 1):
        Sampler(SamplingParams(temperature=1.0, seed=seed))(torch.zeros(V))
    for bad in ({"seed": 2**64}, {"seed": -(2**63) - 1}, {"top_k": 2**63}, {"top_k": -1}):
        with pytest.raises(UsageError, match=next(iter(bad)).replace("_", ".")):
            SamplingParams(temperature=1.0, **bad)  # type: ignore[arg-type]


def test_a_sampler_state_of_the_wrong_size_or_shape_is_refused() -> None:
    a, b = Sampler(SamplingParams(temperature=1.0, seed=3)), Sampler(SamplingParams(temperature=1.0, seed=4))
    a(torch.zeros(V))
    state = a.state_bytes()
    assert state is not None and len(state) == STATE_BYTES and state_problem(state) is None
    b.load_state(state)
    logits = torch.randn(V)
    assert a(logits) == b(logits)
    for bad in (b"\0" * 16, state + b"\0", b"\0" * STATE_BYTES):
        assert state_problem(bad) is not None
        with pytest.raises(ValueError, match="sampler_state"):
            b.load_state(bad)


def test_a_seed_gives_the_same_draws_and_zero_probabilities_are_never_drawn() -> None:
    logits = torch.log(torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0]))
    params = SamplingParams(temperature=1.0, seed=7)
    a, b = Sampler(params), Sampler(params)
    draws = [a(logits) for _ in range(4000)]
    assert draws == [b(logits) for _ in range(4000)]
    counts = [draws.count(i) for i in range(5)]
    assert counts[1] == counts[4] == 0
    # 4,000 draws: each share within 4 standard deviations of its probability
    for token, p in ((0, 0.1), (2, 0.6), (3, 0.3)):
        assert abs(counts[token] / 4000 - p) < 4 * (p * (1 - p) / 4000) ** 0.5, counts
    # top-k 1 of these is greedy; the last token of the vocabulary can be drawn
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=1))(logits) == 2
    last = torch.tensor([float("-inf")] * 4 + [0.0])
    assert Sampler(SamplingParams(temperature=1.0, seed=3))(last) == 4


def test_one_thread_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
