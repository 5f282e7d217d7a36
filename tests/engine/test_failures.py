"""One request's failure stays that request's: the engine fails it (blocks freed, reason listed)
and goes on with the others, whose tokens are exactly what they would have been."""

from __future__ import annotations

import pytest
import torch

from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.sampling import Sampler
from tests.engine.test_engine import run_all, tiny_prompts
from tests.tiny_models import random_weights, write_gguf

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = write_gguf(tmp_path_factory.mktemp("tiny") / "m.gguf", random_weights(seed=11))
    return load_model(path, RuntimeConfig(dtype="float32", threads=1))


class _BrokenSampler(Sampler):
    """Test-only: sampling this request raises, as a bug met by one request's values would."""

    def __call__(self, logits: torch.Tensor) -> int:
        raise RuntimeError("injected: this request's sampling breaks")

    def logprobs(self, logits: torch.Tensor, token_id: int) -> None:
        raise RuntimeError("injected: this request's sampling breaks")


def _engine(lm: LoadedModel) -> LLMEngine:
    return LLMEngine(lm, EngineConfig(block_size=4, kv_cache_tokens=256))


def test_a_sampler_that_raises_fails_its_request_alone(tiny: LoadedModel) -> None:
    prompts = tiny_prompts(4)
    expected = run_all(_engine(tiny), prompts, PARAMS)
    engine = _engine(tiny)
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, PARAMS)
    engine.samplers["r2"] = _BrokenSampler(PARAMS)  # one row of the same batch
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    steps = 0
    while engine.has_unfinished():
        events = engine.step()
        steps += 1
        assert "r2" not in {ev.request_id for ev in events}
        for ev in events:
            got[ev.request_id].append(ev.token_id)
    failed = engine.take_failures()
    assert [rid for rid, _ in failed] == ["r2"] and "injected" in failed[0][1] and "sampling" in failed[0][1]
    assert engine.take_failures() == []
    del got["r2"], expected["r2"]
    assert got == expected
    assert engine.pool.num_free == engine.num_blocks and not engine.has_request("r2")


def test_a_model_step_that_raises_fails_that_steps_requests_and_the_engine_goes_on(tiny: LoadedModel) -> None:
    engine = _engine(tiny)
    prompts = tiny_prompts(3)
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, PARAMS)
    real = engine.runner.execute

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("injected: the batch's forward pass breaks")

    engine.runner.execute = broken  # type: ignore[method-assign]
    assert engine.step() == []
    failed = engine.take_failures()
    assert sorted(rid for rid, _ in failed) == sorted(prompts) and all("forward pass" in why for _, why in failed)
    assert engine.pool.num_free == engine.num_blocks and not engine.has_unfinished()
    engine.runner.execute = real  # type: ignore[method-assign]
    assert run_all(engine, {"after": prompts["r0"]}, PARAMS) == run_all(_engine(tiny), {"after": prompts["r0"]},
                                                                         PARAMS)


def test_token_ids_outside_the_vocabulary_never_reach_the_model(tiny: LoadedModel) -> None:
    engine = _engine(tiny)
    for bad in ([1, 2, 96], [-1], [10**12]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.add_request("x", bad, PARAMS)
    assert engine.reserve_imported("imp", [1, 2, 3]) == 0
    with pytest.raises(ValueError, match="first_token"):
        engine.add_imported("imp", [1, 2, 3], 96, PARAMS)
    engine.abort("imp")
    assert engine.pool.num_free == engine.num_blocks and not engine.has_unfinished()
