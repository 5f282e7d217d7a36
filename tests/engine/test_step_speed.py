"""The engine's measured speeds and the prompt budget a step that decodes gets from `max_step_ms`."""

from __future__ import annotations

import pytest

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.step_speed import MIN_CHUNK_TOKENS, StepSpeed
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer


def test_no_bound_unless_asked_for_and_the_floor_until_measured() -> None:
    speed = StepSpeed()
    assert speed.prompt_budget(0.0, True) is None
    assert speed.prompt_budget(100.0, True) == MIN_CHUNK_TOKENS  # speed not measured yet: a chunk measures it
    speed.observe(num_prefill_tokens=500, num_decode_seqs=0, elapsed_ms=500.0)
    assert speed.prefill_tokens_per_s == 1000.0
    assert speed.prompt_budget(0.0, True) is None  # 0: no bound
    assert speed.prompt_budget(100.0, True) == 100  # no decode step measured: the whole 100 ms


def test_budget_leaves_the_decodes_their_step() -> None:
    speed = StepSpeed(prefill_tokens_per_s=1000.0)
    speed.observe(num_prefill_tokens=0, num_decode_seqs=4, elapsed_ms=20.0)
    assert speed.decode_step_ms == 20.0
    assert speed.prompt_budget(100.0, True) == 80
    assert speed.prompt_budget(100.0, False) == 100  # nothing decodes: the whole step is the prompt's
    assert speed.prompt_budget(30.0, True) == MIN_CHUNK_TOKENS  # 10 tokens' time left: prompts still move
    speed.observe(num_prefill_tokens=0, num_decode_seqs=4, elapsed_ms=30.0)
    assert speed.decode_step_ms == pytest.approx(22.0)  # a moving average, newest step weighs 0.2


def test_a_mixed_step_times_its_prompt_without_its_decodes() -> None:
    speed = StepSpeed(prefill_tokens_per_s=1000.0, decode_step_ms=20.0)
    speed.observe(num_prefill_tokens=80, num_decode_seqs=4, elapsed_ms=100.0)  # 80 tokens in 80 ms
    assert speed.prefill_tokens_per_s == pytest.approx(1000.0)
    speed.observe(num_prefill_tokens=16, num_decode_seqs=4, elapsed_ms=24.0)  # 4 ms of 24: too little to time
    assert speed.prefill_tokens_per_s == pytest.approx(1000.0)
    speed.observe(num_prefill_tokens=8, num_decode_seqs=0, elapsed_ms=4.0)  # under 16 tokens: ignored
    assert (speed.prefill_tokens_per_s, speed.decode_step_ms) == (pytest.approx(1000.0), 20.0)


def test_a_bounded_engine_feeds_a_long_prompt_beside_decodes_in_small_chunks_and_changes_no_token(
        default_model: LoadedModel, default_tokenizer: Tokenizer) -> None:
    short = default_tokenizer.encode("The capital of France is Paris. The capital of Germany is Berlin. The capital "
                                     "of Italy is")  # 16+ tokens: its step measures the prefill speed
    long = default_tokenizer.encode(" ".join(f"item {i} is on shelf {i % 7}." for i in range(24)))
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def serve(max_step_ms: float) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
        engine = LLMEngine(default_model, EngineConfig(kv_cache_tokens=1024, max_step_ms=max_step_ms))
        engine.add_request("short", short, params)
        got: dict[str, list[int]] = {"short": [], "long": []}
        steps: list[tuple[int, int]] = []  # (prompt tokens, decodes) of each step
        while engine.has_unfinished():
            if len(got["short"]) == 2:
                engine.add_request("long", long, params)  # arrives while "short" decodes
            for ev in engine.step():
                got[ev.request_id].append(ev.token_id)
            steps.append((engine.last_step.num_prefill_tokens, engine.last_step.num_decode_seqs))
        assert engine.pool.num_free == engine.pool.num_blocks
        return got, steps

    unbounded, whole = serve(0.0)
    assert (len(long), 1) in whole  # the whole prompt in one step beside the decode
    # A 1 ms bound leaves no time for prompt tokens: every chunk beside a decode is the 32-token floor.
    bounded, chunked = serve(1.0)
    beside = [n for n, decodes in chunked if n and decodes]
    assert beside == [MIN_CHUNK_TOKENS] * (len(long) // MIN_CHUNK_TOKENS) + [len(long) % MIN_CHUNK_TOKENS], chunked
    assert bounded == unbounded
