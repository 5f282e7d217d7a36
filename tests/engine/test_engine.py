"""The batched engine on real weights: same tokens as one-at-a-time, KV that moves, no leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.request import RequestOutput
from disagg_cli.engine.scheduler import Status
from disagg_cli.engine.single import SingleProcessGenerator
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.tokenizer import Tokenizer
from tests.tiny_models import random_weights, write_gguf

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "Water boils at",
    "Les élèves ont visité le musée",
    "The three primary colors are",
    "import numpy as np\nx = np.",
]


def run_all(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    return out


def alone(lm: LoadedModel, tokenizer: Tokenizer, ids: list[int], params: SamplingParams) -> list[int]:
    out = RequestOutput("ref", "", ids, params, tokenizer)
    return SingleProcessGenerator(lm).generate(out).token_ids


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("tiny") / "m.gguf", random_weights(seed=11))


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path) -> LoadedModel:
    return load_model(tiny_gguf, RuntimeConfig())


@pytest.fixture(scope="module")
def tiny_torch(tiny_gguf: Path) -> LoadedModel:
    """The same weights on the torch backend: SDPA over strided views, gathers and padded batches."""
    return load_model(tiny_gguf, RuntimeConfig(dtype="float32", kernel="torch"))


def tiny_prompts(n: int, length: int = 6) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(n)
    return {f"r{i}": torch.randint(0, 96, (length + i,), generator=g).tolist() for i in range(n)}


def greedy_alone(lm: LoadedModel, ids: list[int], steps: int) -> list[int]:
    from disagg_cli.model.kv_cache import DenseKVCache

    gen = SingleProcessGenerator(lm)
    cache, logits = gen.prefill(ids, len(ids) + steps)
    tokens = [int(torch.argmax(logits))]
    while len(tokens) < steps:
        tokens.append(int(torch.argmax(gen.decode_step(cache, tokens[-1]))))
    assert isinstance(cache, DenseKVCache)
    return tokens


@pytest.mark.parametrize("block_size,chunked,kernel", [(16, False, True), (1, False, True), (1, False, False),
                                                       (3, True, True), (3, True, False)])
def test_tiny_batched_equals_alone_and_frees_everything(tiny: LoadedModel, tiny_torch: LoadedModel, block_size: int,
                                                        chunked: bool, kernel: bool) -> None:
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = tiny_prompts(6)
    # A pool of 48 blocks of 1 token cannot hold all six at once: they wait, preempt, recompute.
    cfg = EngineConfig(block_size=block_size, kv_cache_tokens=48 if block_size == 1 else 512,
                       max_num_batched_tokens=8 if chunked else 2048, chunked_prefill=chunked)
    lm = tiny if kernel else tiny_torch
    if kernel and lm.backend.name != "c":
        pytest.skip(lm.backend.reason)
    engine = LLMEngine(lm, cfg)
    got = run_all(engine, prompts, params)
    for rid, ids in prompts.items():
        assert got[rid] == greedy_alone(lm, ids, 10), rid
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.pool.tables
    if kernel:  # chunks, recomputed prompts and decodes all read the pool in place through their block tables
        assert engine.runner.gathered_bytes == 0
    elif block_size == 1:
        assert engine.runner.gathered_bytes > 0  # fragmentation exercised the gather path


def test_abort_frees_blocks_in_every_state(tiny: LoadedModel) -> None:
    engine = LLMEngine(tiny, EngineConfig(block_size=4, kv_cache_tokens=64, max_num_seqs=1))
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    for rid, ids in tiny_prompts(2).items():
        engine.add_request(rid, ids, params)
    engine.step()
    # max_num_seqs 1: r0 runs, r1 waits
    assert engine.seqs["r0"].status is Status.RUNNING and engine.seqs["r1"].status is Status.WAITING
    assert engine.reserve_imported("incoming", list(range(10))) == 0
    assert engine.pool.num_reserved == 3
    for rid in ("r0", "r1", "incoming", "r0"):
        engine.abort(rid)
    assert not engine.has_unfinished()
    assert engine.pool.num_free == engine.pool.num_blocks == 16


def test_request_larger_than_pool_is_refused(tiny: LoadedModel) -> None:
    engine = LLMEngine(tiny, EngineConfig(block_size=4, kv_cache_tokens=32))
    with pytest.raises(ValueError, match=r"the pool holds only 8 blocks \(32 tokens\)"):
        engine.add_request("big", list(range(30)), SamplingParams(max_tokens=8))


@pytest.mark.slow
def test_real_model_batched_equals_alone(default_model: LoadedModel, default_tokenizer: Tokenizer) -> None:
    # 8 prompts of 5–14 tokens, batched from the first step, each 12 tokens against its run alone
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = {f"p{i}": default_tokenizer.encode(p) for i, p in enumerate(PROMPTS)}
    engine = LLMEngine(default_model, EngineConfig(block_size=16, kv_cache_tokens=4096))
    got = run_all(engine, prompts, params)
    for rid, ids in prompts.items():
        assert got[rid] == alone(default_model, default_tokenizer, ids, params), rid
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.slow
def test_export_import_continues_exactly(default_model: LoadedModel, default_tokenizer: Tokenizer,
                                         default_gguf: Path) -> None:
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ids = default_tokenizer.encode("The old lighthouse keeper climbed the stairs every evening because")
    expected = alone(default_model, default_tokenizer, ids, params)

    prefill = LLMEngine(default_model, EngineConfig(block_size=16, kv_cache_tokens=512), prefill_only=True)
    prefill.add_request("x", ids, params)
    (first,) = prefill.step()
    assert first.finish_reason == "prefilled" and first.token_id == expected[0]
    kv = prefill.export_kv("x")
    assert len(kv) == 30 and kv[0][0].shape == (len(ids), 3, 64)
    prefill.release("x")
    assert prefill.pool.num_free == prefill.pool.num_blocks

    # A decode engine with another block size continues where prefill stopped.
    decode = LLMEngine(default_model, EngineConfig(block_size=5, kv_cache_tokens=512))
    assert decode.reserve_imported("x", ids) == 0
    for layer, (k, v) in enumerate(kv):
        decode.import_kv_layer("x", layer, k, v)
    assert decode.add_imported("x", ids, first.token_id, params) is None
    tokens = [first.token_id]
    while decode.has_unfinished():
        tokens += [ev.token_id for ev in decode.step()]
    assert tokens == expected
    assert decode.pool.num_free == decode.pool.num_blocks

    # bfloat16 prefill, float32 decode: the decode side casts on arrival and stays sensible.
    bf16 = load_model(default_gguf, RuntimeConfig(dtype="bfloat16", threads=2))
    prefill16 = LLMEngine(bf16, EngineConfig(block_size=16, kv_cache_tokens=512), prefill_only=True)
    prefill16.add_request("y", ids, params)
    (first16,) = prefill16.step()
    kv16 = prefill16.export_kv("y")
    assert kv16[0][0].dtype == torch.bfloat16
    decode.add_imported("y", ids, first16.token_id, params, kv=kv16)
    tokens16 = [first16.token_id]
    while decode.has_unfinished():
        tokens16 += [ev.token_id for ev in decode.step()]
    agree = sum(a == b for a, b in zip(tokens16, expected, strict=True))
    assert agree >= 12, (tokens16, expected)  # bfloat16 KV drifts a little, never into garbage
    assert decode.pool.num_free == decode.pool.num_blocks
