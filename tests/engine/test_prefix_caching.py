"""Prefix caching in the engine: the same tokens with the cache on as off (and as one request
alone), exact hit counts, evicted prefixes recomputed, and a decode engine that reuses what it
holds and imports only the rest."""

from __future__ import annotations

import pytest
import torch

from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.tokenizer import Tokenizer
from tests.engine.test_engine import greedy_alone
from tests.tiny_models import random_weights, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = write_gguf(tmp_path_factory.mktemp("tiny") / "m.gguf", random_weights(seed=11))
    return load_model(path, RuntimeConfig())


def finish(engine: LLMEngine, rid: str, ids: list[int], params: SamplingParams) -> list[int]:
    engine.add_request(rid, ids, params)
    out = []
    while engine.has_unfinished():
        out += [ev.token_id for ev in engine.step() if ev.request_id == rid]
    return out


def shared_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, 96, (13,), generator=g).tolist()
    return [system + torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 5, 1, 9)]


@pytest.mark.parametrize("block_size", [1, 4])
def test_cached_prefix_gives_the_same_tokens_and_exact_hits(tiny: LoadedModel, block_size: int) -> None:
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = LLMEngine(tiny, EngineConfig(block_size=block_size, kv_cache_tokens=256))
    prompts = shared_prompts()
    expected_hits = 0
    for i, ids in enumerate(prompts):
        assert finish(engine, f"r{i}", ids, params) == greedy_alone(tiny, ids, 6), i
        if i:
            # The 13-token system prompt is cached in full blocks (its partial block is not).
            expected_hits += 13 // block_size * block_size
        assert engine.pool.counters.hit_tokens == expected_hits
    # Asking again for a finished prompt reuses all of it but its last token's block.
    again = finish(engine, "again", prompts[0], params)
    assert again == greedy_alone(tiny, prompts[0], 6)
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.pool.tables
    assert engine.pool.num_cached > 0


def test_generated_tokens_are_cached_for_the_next_turn(tiny: LoadedModel) -> None:
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = LLMEngine(tiny, EngineConfig(block_size=2, kv_cache_tokens=128))
    turn1 = shared_prompts()[0]  # 16 tokens
    answer = finish(engine, "t1", turn1, params)
    turn2 = turn1 + answer + [5, 6, 7]
    before = engine.pool.counters.hit_tokens
    assert finish(engine, "t2", turn2, params) == greedy_alone(tiny, turn2, 8)
    # Prompt and answer were computed: 16 + 7 (the last answer token was never fed back) = 23
    # tokens, 11 full blocks of 2.
    assert engine.pool.counters.hit_tokens - before == 22


def test_evicted_prefix_is_recomputed_exactly(tiny: LoadedModel) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    # 12 blocks of 2: every new prompt evicts most of what the last ones left cached.
    engine = LLMEngine(tiny, EngineConfig(block_size=2, kv_cache_tokens=24))
    prompts = shared_prompts()
    g = torch.Generator().manual_seed(9)
    other = torch.randint(0, 96, (18,), generator=g).tolist()
    for i, ids in enumerate([prompts[0], other, prompts[1], other, prompts[2]]):
        assert finish(engine, f"r{i}", ids, params) == greedy_alone(tiny, ids, 4), i
    assert engine.pool.counters.evicted_blocks > 0
    assert engine.pool.num_free == engine.pool.num_blocks


def test_batched_requests_sharing_a_prefix_at_once(tiny: LoadedModel) -> None:
    """Requests admitted in one step compute the shared prefix each (it is published only after the
    step); later ones reuse it; preemption under a small pool recomputes from the cache."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    engine = LLMEngine(tiny, EngineConfig(block_size=1, kv_cache_tokens=60, max_num_batched_tokens=40))
    prompts = shared_prompts()
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    for i, ids in enumerate(prompts):
        assert out[f"r{i}"] == greedy_alone(tiny, ids, 10), i
    assert engine.pool.num_free == engine.pool.num_blocks and engine.pool.num_used == 0


def test_caching_off_keeps_nothing(tiny: LoadedModel) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine = LLMEngine(tiny, EngineConfig(block_size=2, kv_cache_tokens=64, enable_prefix_caching=False))
    for i, ids in enumerate(shared_prompts()):
        assert finish(engine, f"r{i}", ids, params) == greedy_alone(tiny, ids, 4)
    assert engine.pool.counters.hit_tokens == engine.pool.counters.queried_tokens == 0
    assert engine.pool.num_cached == 0


def test_decode_engine_reuses_its_cache_and_imports_only_the_rest(tiny: LoadedModel) -> None:
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    turn1 = shared_prompts()[0]
    prefill = LLMEngine(tiny, EngineConfig(block_size=4, kv_cache_tokens=128), prefill_only=True)
    decode = LLMEngine(tiny, EngineConfig(block_size=4, kv_cache_tokens=128))

    def handoff(rid: str, ids: list[int]) -> list[int]:
        prefill.add_request(rid, ids, params)
        (first,) = prefill.step()
        cached = decode.reserve_imported(rid, ids)
        assert cached is not None
        for layer in range(tiny.config.num_layers):
            k, v = prefill.read_kv(rid, layer, cached, len(ids))
            decode.import_kv_layer(rid, layer, k, v, start=cached)
        prefill.release(rid)
        assert decode.add_imported(rid, ids, first.token_id, params) is None
        tokens = [first.token_id]
        while decode.has_unfinished():
            tokens += [ev.token_id for ev in decode.step()]
        return tokens, cached

    answer, cached = handoff("t1", turn1)
    assert cached == 0 and answer == greedy_alone(tiny, turn1, 6)
    turn2 = turn1 + answer + [1, 2, 3]  # 16 + 6 + 3 = 25 tokens
    tokens, cached = handoff("t2", turn2)
    assert tokens == greedy_alone(tiny, turn2, 6)
    # The decode engine computed 16 + 5 tokens of turn 1: five full blocks of 4 are its own.
    assert cached == 20
    assert prefill.pool.counters.hit_tokens == 16  # the prefill engine only ever saw turn 1's prompt
    for engine in (prefill, decode):
        assert engine.pool.num_free == engine.pool.num_blocks and not engine.pool.tables


def test_reserved_prompt_prefilled_in_place(tiny: LoadedModel) -> None:
    """Selective disaggregation on a decode engine: a reservation whose prompt is computed there."""
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    decode = LLMEngine(tiny, EngineConfig(block_size=4, kv_cache_tokens=128))
    first = shared_prompts()[1]
    assert finish(decode, "warm", first, params) == greedy_alone(tiny, first, 5)
    second = shared_prompts()[2]
    cached = decode.reserve_imported("x", second)
    assert cached == 12  # the shared 13-token system prompt: three full blocks
    decode.prefill_reserved("x", second, params)
    tokens = []
    while decode.has_unfinished():
        tokens += [ev.token_id for ev in decode.step()]
    assert tokens == greedy_alone(tiny, second, 5)
    assert decode.pool.num_free == decode.pool.num_blocks


@pytest.mark.slow
def test_real_model_caching_on_equals_off(default_model: LoadedModel, default_tokenizer: Tokenizer) -> None:
    system = default_tokenizer.encode("You are a helpful assistant who answers in one short sentence. " * 3)
    questions = ["What is the capital of France?", "Name a primary color.", "What does a baker make?"]
    prompts = [system + default_tokenizer.encode(q, add_bos=False) for q in questions]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    results = {}
    for caching in (False, True):
        engine = LLMEngine(default_model, EngineConfig(block_size=16, kv_cache_tokens=2048,
                                                       enable_prefix_caching=caching))
        results[caching] = [finish(engine, f"q{i}", ids, params) for i, ids in enumerate(prompts)]
        if caching:
            assert engine.pool.counters.hit_tokens == 2 * (len(system) // 16 * 16)
    assert results[True] == results[False]
