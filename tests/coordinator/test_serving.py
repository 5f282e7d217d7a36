"""Disaggregated serving on real worker processes and real sockets, against the references.

Greedy output through the coordinator must equal this process's own engine and Hugging Face
transformers token for token (float32, lossless codec), with every prompt in flight at once, on
1 prefill + 1 decode and on 2 + 2; a bfloat16 prefill feeding a float32 decode with another block
size must stay sensible and leave every block free.

The three topologies are subsets of one module cluster of five workers (2 float32 prefill, 1 bfloat16
prefill, 2 float32 decode): each test's coordinator connects only to its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.coordinator.cluster import LocalCluster
from disagg_cli.coordinator.coordinator import Coordinator
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec, local_topology
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.request import RequestOutput
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer
from tests.reference import PROMPTS, REFERENCE_TOKENS

pytestmark = pytest.mark.slow

NUM_TOKENS = 16
NAMES = ["prose", "code", "long", "chat"]  # a subset of the golden prompts, to keep the file fast
SAMPLING = SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)
F32 = WorkerSpec("prefill", dtype="float32", quantization="none", kv_cache_tokens=2048, kv_codec="none")
# The module's workers by name. "decode" is what local_topology makes of F32: float32, 16-token blocks.
WORKERS = {
    "f32": F32,
    "f32b": F32,
    "bf16": WorkerSpec("prefill", dtype="bfloat16", block_size=32, kv_cache_tokens=2048, kv_codec="none"),
    "decode": local_topology("", F32).workers[1],
    "decodeb": local_topology("", F32).workers[1],
}
TOPOLOGY = tuple(WORKERS.values())
assert WORKERS["decode"] == WorkerSpec("decode", dtype="float32", quantization="none", block_size=16,
                                      kv_cache_tokens=2048)


@pytest.fixture(scope="module")
def prompt_ids(default_tokenizer: Tokenizer) -> dict[str, list[int]]:
    return {name: default_tokenizer.encode(PROMPTS[name]) for name in NAMES}


@pytest.fixture(scope="module")
def hf_ids(hf_greedy, prompt_ids: dict[str, list[int]]) -> dict[str, list[int]]:
    """transformers' greedy continuations (the session's, REFERENCE_TOKENS long), cut to NUM_TOKENS."""
    assert NUM_TOKENS <= REFERENCE_TOKENS
    out = {}
    for name, ids in prompt_ids.items():
        hf_prompt, continuation = hf_greedy[name]
        assert ids == hf_prompt, name  # the reference continues the very prompt served here
        out[name] = continuation[:NUM_TOKENS]
    return out


@pytest.fixture(scope="module")
def in_process_ids(default_model: LoadedModel, prompt_ids: dict[str, list[int]]) -> dict[str, list[int]]:
    engine = LLMEngine(default_model, EngineConfig(kv_cache_tokens=4096))
    got: dict[str, list[int]] = {name: [] for name in prompt_ids}
    for name, ids in prompt_ids.items():
        engine.add_request(name, ids, SAMPLING)
    while engine.has_unfinished():
        for event in engine.step():
            got[event.request_id].append(event.token_id)
    return got


@pytest.fixture(scope="module")
def cluster(default_gguf: Path) -> Iterator[LocalCluster]:
    """One set of workers for the module; each test's coordinator connects to the ones it names (`WORKERS`),
    so no worker is started twice for the same spec."""
    with LocalCluster(ClusterConfig(str(default_gguf), TOPOLOGY), str(default_gguf)) as c:
        yield c


def serve(cluster: LocalCluster, names: tuple[str, ...], tokenizer: Tokenizer, prompt_ids: dict[str, list[int]],
          policy: str = "round-robin") -> tuple[dict[str, RequestOutput], dict[str, dict[str, float]]]:
    """Connect to the workers `names` of the cluster only, run every prompt at once, return the outputs and
    those workers' final stats."""
    outs = {name: RequestOutput(name, PROMPTS[name], ids, SAMPLING, tokenizer) for name, ids in prompt_ids.items()}
    workers = [cluster.addresses()[list(WORKERS).index(n)] for n in names]

    async def run() -> dict[str, dict[str, float]]:
        async with Coordinator(workers, tokenizer.eos_token_ids) as coordinator:
            coordinator.router.policy = policy
            await asyncio.wait_for(coordinator.connect(cluster.check), 150)
            await asyncio.wait_for(asyncio.gather(*(coordinator.run_request(o) for o in outs.values())), 120)
            return await coordinator.connections.wait_idle()

    stats = asyncio.run(run())
    assert set(stats) == {address for _, address in workers}
    for out in outs.values():
        assert out.state == "done", (out.request_id, out.error)
    return outs, stats


def assert_all_blocks_free(stats: dict[str, dict[str, float]]) -> None:
    for address, s in stats.items():
        assert s["free_blocks"] == s["num_blocks"], (address, s)
        assert s.get("reserved_blocks", 0) == 0 and s["running"] == 0 and s["waiting"] == 0, (address, s)


def test_one_prefill_one_decode_equals_in_process_and_transformers(
        cluster: LocalCluster, default_tokenizer: Tokenizer, prompt_ids, hf_ids, in_process_ids) -> None:
    outs, stats = serve(cluster, ("f32", "decode"), default_tokenizer, prompt_ids)  # local_topology(model, F32)
    for name in NAMES:
        assert in_process_ids[name] == hf_ids[name], name
        assert outs[name].token_ids == hf_ids[name], name
    first = outs["long"]
    assert set(first.workers) == {"prefill", "decode"}
    assert first.kv["raw_bytes"] == len(prompt_ids["long"]) * 2 * 30 * 3 * 64 * 4  # float32 KV, lossless
    assert {"prefill_ms", "kv_transfer_ms", "handoff_ms"} <= set(first.timings.stages_ms)
    assert_all_blocks_free(stats)


def test_two_prefill_two_decode_equals_transformers(
        cluster: LocalCluster, default_tokenizer: Tokenizer, prompt_ids, hf_ids) -> None:
    outs, stats = serve(cluster, ("f32", "f32b", "decode", "decodeb"), default_tokenizer, prompt_ids,
                        policy="least-loaded")
    for name in NAMES:
        assert outs[name].token_ids == hf_ids[name], name
    used = {(o.workers["prefill"], o.workers["decode"]) for o in outs.values()}
    assert len({p for p, _ in used}) == 2 and len({d for _, d in used}) == 2  # every worker served
    assert_all_blocks_free(stats)


def test_bfloat16_prefill_into_float32_decode_with_other_block_size(
        cluster: LocalCluster, default_tokenizer: Tokenizer, prompt_ids, hf_ids) -> None:
    # Two short prompts: without native bf16 (AVX2), a bfloat16 prefill is emulated, ~20× slower.
    names = ["prose", "code"]
    outs, stats = serve(cluster, ("bf16", "decode"), default_tokenizer, {n: prompt_ids[n] for n in names})
    same = sum(a == b for name in names for a, b in zip(outs[name].token_ids, hf_ids[name], strict=True))
    assert same >= 0.6 * NUM_TOKENS * len(names), same
    assert all(outs[name].text.strip() for name in names)
    assert outs["prose"].kv["raw_bytes"] == len(prompt_ids["prose"]) * 2 * 30 * 3 * 64 * 2  # bfloat16 on the wire
    assert_all_blocks_free(stats)
