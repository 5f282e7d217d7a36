"""OpenAI request fields → SamplingParams with vLLM's defaults; each bad value a 400 naming its field."""

from __future__ import annotations

import pytest

from disagg_cli.config import SamplingParams
from disagg_cli.server.bodies import ChatCompletionRequest, CompletionRequest
from disagg_cli.server.errors import APIError
from disagg_cli.server.params import chat_max_tokens, choice_params, completion_params, prompts_of


def test_completion_defaults_are_vllms() -> None:
    params = completion_params(CompletionRequest(prompt="x"))
    assert params == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0)


def test_fields_map_one_to_one_and_unknown_fields_are_tolerated() -> None:
    req = CompletionRequest(prompt="x", max_tokens=5, temperature=0, top_p=0.5, top_k=-1, seed=3, stop="\n",
                            ignore_eos=True, user="someone", frequency_penalty=0.0)
    assert completion_params(req) == SamplingParams(max_tokens=5, temperature=0.0, top_p=0.5, top_k=0, seed=3,
                                                    stop=("\n",), ignore_eos=True)


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.5}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"n": 0}, "n"), ({"n": 17}, "n"), ({"stop": [""]}, "stop"),
    ({"logprobs": 21}, "logprobs"),
])
def test_bad_values_are_400_naming_the_field(fields: dict, param: str) -> None:
    with pytest.raises(APIError) as e:
        completion_params(CompletionRequest(prompt="x", **fields))
    assert (e.value.status, e.value.param) == (400, param)


@pytest.mark.parametrize("fields,param", [
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 2**64 - 1, "n": 2}, "seed"),
    ({"top_k": 2**64}, "top_k"), ({"max_tokens": 2**64}, "max_tokens"), ({"n": 2**64}, "n"),
    ({"logprobs": 2**64}, "logprobs"), ({"stop": ["x" * 1025]}, "stop"), ({"stop": ["é" * 513]}, "stop"),
    ({"stop": ["x" * 1000] * 5}, "stop"), ({"stop": ["x"] * 17}, "stop"),
    ({"prompt": ["a"] * 257}, "prompt"), ({"prompt": ["a"] * 17, "n": 16}, "n"),
])
def test_values_past_what_a_worker_can_use_are_400_naming_the_field(fields: dict, param: str) -> None:
    with pytest.raises(APIError) as e:
        req = CompletionRequest(**{"prompt": "x", **fields})
        prompts_of(req)
        completion_params(req)
    assert (e.value.status, e.value.param) == (400, param), e.value.message


def test_edges_of_the_ranges_are_served() -> None:
    req = CompletionRequest(prompt=["a"] * 16, n=16, seed=2**64 - 16, top_k=2**63 - 1,
                            stop=["x" * 1024] * 4, temperature=1e-5)
    params = completion_params(req)
    assert (params.seed, params.top_k, params.temperature) == (2**64 - 16, 2**63 - 1, 1e-5)
    assert len(prompts_of(req)) == 16
    assert completion_params(CompletionRequest(prompt="x", seed=-(2**63))).seed == -(2**63)


def test_a_temperature_below_the_floor_is_greedy() -> None:
    for t in (1e-40, 5e-324, 9.9e-6):
        params = completion_params(CompletionRequest(prompt="x", temperature=t))
        assert params.temperature == 0.0 and params.is_greedy


def test_chat_max_tokens_prefers_max_completion_tokens_then_max_tokens_then_the_context_left() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert chat_max_tokens(ChatCompletionRequest(messages=msgs, max_completion_tokens=7, max_tokens=9), 100) == 7
    assert chat_max_tokens(ChatCompletionRequest(messages=msgs, max_tokens=9), 100) == 9
    assert chat_max_tokens(ChatCompletionRequest(messages=msgs), 100) == 100


def test_choice_i_of_a_seeded_request_draws_with_seed_plus_i() -> None:
    params = SamplingParams(seed=10, temperature=1.0)
    assert [choice_params(params, i).seed for i in range(3)] == [10, 11, 12]
    assert choice_params(SamplingParams(temperature=1.0), 2).seed is None


def test_prompt_shapes() -> None:
    assert prompts_of(CompletionRequest(prompt="a")) == ["a"]
    assert prompts_of(CompletionRequest(prompt=["a", "b"])) == ["a", "b"]
    assert prompts_of(CompletionRequest(prompt=[1, 2])) == [[1, 2]]
    assert prompts_of(CompletionRequest(prompt=[[1], [2, 3]])) == [[1], [2, 3]]
    with pytest.raises(APIError):
        prompts_of(CompletionRequest(prompt=[]))
