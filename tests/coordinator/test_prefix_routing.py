"""Prefix caching across real worker processes: a chat's next turn reuses the KV both workers hold,
only the KV the decode worker lacks crosses the wire (exact bytes), an evicted prefix is computed
again with the same tokens, a prompt prefilled in chunks streams each chunk's KV at its position,
and a short prompt is prefilled on its decode worker (selective
disaggregation); greedy output equals this process's engine with caching off, token for token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.coordinator.cluster import LocalCluster
from disagg_cli.coordinator.coordinator import Coordinator
from disagg_cli.coordinator.options import CoordinatorConfig
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.request import RequestOutput
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

N = 12  # output tokens per turn
SAMPLING = SamplingParams(max_tokens=N, ignore_eos=True)
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # layers x (K, V) x kv heads x head dim x float32
SYSTEM = "You are a careful assistant. Answer each question in a few plain words and never use lists."


def reference(lm: LoadedModel, ids: list[int]) -> list[int]:
    engine = LLMEngine(lm, EngineConfig(kv_cache_tokens=1024, enable_prefix_caching=False))
    engine.add_request("ref", ids, SAMPLING)
    out: list[int] = []
    while engine.has_unfinished():
        out += [ev.token_id for ev in engine.step()]
    return out


def test_turns_reuse_both_caches_and_short_prompts_stay_on_decode(
        default_gguf: Path, default_model: LoadedModel, default_tokenizer: Tokenizer) -> None:
    tok = default_tokenizer
    system = tok.encode(SYSTEM)
    turn1 = system + tok.encode(" What is the capital of France?", add_bos=False)
    flood = tok.encode("Tell me a long story about a lighthouse keeper and the sea. " * 12)
    # A decode pool of 12 blocks: the ~170-token flood request evicts what the turns left cached.
    # Chunked prefill of 24 tokens a step: a prompt's KV leaves in chunks, each at its position.
    topology = ClusterConfig(str(default_gguf), (
        WorkerSpec("prefill", dtype="float32", quantization="none", kv_cache_tokens=2048, kv_codec="none", threads=1,
                   chunked_prefill=True, max_num_batched_tokens=24),
        WorkerSpec("decode", dtype="float32", quantization="none", kv_cache_tokens=192, threads=1)))
    results: dict[str, RequestOutput] = {}

    async def ask(coordinator: Coordinator, name: str, ids: list[int]) -> RequestOutput:
        out = RequestOutput(name, "", ids, SAMPLING, tok)
        await asyncio.wait_for(coordinator.run_request(out), 180)
        assert out.finish_reason == "length", (name, out.error)
        results[name] = out
        return out

    async def run(cluster: LocalCluster) -> dict[str, dict[str, float]]:
        async with Coordinator(cluster.addresses(), tok.eos_token_ids) as coordinator:
            await asyncio.wait_for(coordinator.connect(cluster.check), 150)
            one = await ask(coordinator, "turn1", turn1)
            turn2 = turn1 + one.token_ids + tok.encode(" And of Spain?", add_bos=False)
            two = await ask(coordinator, "turn2", turn2)
            await ask(coordinator, "flood", flood)
            await ask(coordinator, "turn3", turn2 + two.token_ids + tok.encode(" And Italy?", add_bos=False))
        local = CoordinatorConfig(disagg_threshold=10_000)
        async with Coordinator(cluster.addresses(), tok.eos_token_ids, local) as coordinator:
            await asyncio.wait_for(coordinator.connect(cluster.check), 150)
            await ask(coordinator, "local", system + tok.encode(" Name a fruit.", add_bos=False))
            return await coordinator.connections.wait_idle()

    with LocalCluster(topology, str(default_gguf)) as cluster:
        stats = asyncio.run(run(cluster))
        prefill_at, decode_at = (address for _, address in cluster.addresses())

    for name, out in results.items():
        assert out.token_ids == reference(default_model, list(out.prompt_token_ids)), name
    one, two, three = results["turn1"], results["turn2"], results["turn3"]
    assert one.kv["prefix_cached_tokens"] == one.kv["decode_cached_tokens"] == 0
    assert one.kv["raw_bytes"] == len(turn1) * KV_BYTES_PER_TOKEN
    # Turn 2: the prefill worker holds turn 1's prompt (its full blocks); the decode worker holds
    # turn 1's prompt and all but the last answer token, so only the rest of the KV is sent.
    len1, len2 = len(turn1), len(two.prompt_token_ids)
    assert two.kv["prefix_cached_tokens"] == len1 // 16 * 16
    held = min((len1 + N - 1) // 16, (len2 - 1) // 16) * 16
    assert two.kv["decode_cached_tokens"] == held > len1 // 16 * 16
    assert two.kv["raw_bytes"] == (len2 - held) * KV_BYTES_PER_TOKEN
    # Turn 3 came after the flood evicted the decode worker's cache: it is sent (almost) whole,
    # and the tokens are still exact (checked above).
    assert three.kv["decode_cached_tokens"] < len2 // 16 * 16
    assert three.kv["raw_bytes"] == (len(three.prompt_token_ids) - three.kv["decode_cached_tokens"]) \
        * KV_BYTES_PER_TOKEN
    # Selective disaggregation: computed on the decode worker, no prefill worker, no KV on the wire.
    local = results["local"]
    assert local.workers == {"decode": decode_at}
    assert local.kv["local_prefill"] == 1 and "raw_bytes" not in local.kv
    # At rest every block is free (cached ones count as free), on both workers.
    assert all(s["free_blocks"] == s["num_blocks"] for s in stats.values()), stats
    prefill, decode = stats[prefill_at], stats[decode_at]
    assert prefill["prefix_hit_tokens"] >= len1 // 16 * 16 and decode["prefix_evicted_blocks"] > 0
