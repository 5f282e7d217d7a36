"""Elastic roles with real worker processes and the default model: workers switched in place while
requests run through them. A decode worker switched to prefill while decoding 4 requests moves them
with their KV to the other decode worker, and every request's tokens equal the same request served
without a switch (greedy, exact ids); prefill → decode and prefill → colocated likewise, with
prompts in flight; decode → colocated keeps its 4 there; colocated → prefill moves the ones it
decodes; a switch whose source or target is SIGKILLed mid-move loses no request; every KV block
ends free on every worker."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.coordinator.cluster import LocalCluster
from disagg_cli.coordinator.coordinator import Coordinator, CoordinatorConfig, SwitchOutcome
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.request import RequestOutput
from disagg_cli.errors import DisaggError
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, in a small village,",
           "1, 2, 3, 4, 5,"]
NUM_TOKENS = 40
SAMPLING = SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)
# float32 everywhere: the tokens are checked against the float32 reference
PREFILL = WorkerSpec("prefill", dtype="float32", kv_codec="none", kv_cache_tokens=1024, threads=1)
DECODE = WorkerSpec("decode", dtype="float32", kv_cache_tokens=1024, threads=1)
# a worker silent 5 s is dead: kills are noticed soon, a heartbeat late on a loaded machine is not a death
CONFIG = CoordinatorConfig(worker_timeout_s=5.0, heartbeat_interval_s=0.5)


def elastic(spec: WorkerSpec) -> WorkerSpec:
    return WorkerSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "elastic": True})


def served_alone(model: LoadedModel, tokenizer: Tokenizer, prompts: list[str]) -> dict[str, list[int]]:
    """Each prompt's greedy tokens, served in one process without any switch."""
    engine = LLMEngine(model, EngineConfig(kv_cache_tokens=4096))
    for p in prompts:
        engine.add_request(p, tokenizer.encode(p), SAMPLING)
    got: dict[str, list[int]] = {p: [] for p in prompts}
    while engine.has_unfinished():
        for ev in engine.step():
            got[ev.request_id].append(ev.token_id)
    return got


@pytest.fixture(scope="module")
def expected(default_model: LoadedModel, default_tokenizer: Tokenizer) -> dict[str, list[int]]:
    return served_alone(default_model, default_tokenizer, PROMPTS)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, default_gguf: Path) -> Iterator[LocalCluster]:
    with LocalCluster(ClusterConfig(str(default_gguf), request.param), str(default_gguf)) as c:
        yield c


Scenario = Callable[[Coordinator, list[RequestOutput], list["asyncio.Task[None]"]], Awaitable[None]]


def run(cluster: LocalCluster, tokenizer: Tokenizer, scenario: Scenario, prompts: list[str] = PROMPTS,
        rounds: int = 1) -> tuple[list[list[RequestOutput]], dict[str, dict[str, float]], Coordinator]:
    """Run `rounds` times: every prompt at once, with `scenario` beside them; then every worker's stats
    once all its blocks are free (or 20 s passed)."""
    outs_by_round: list[list[RequestOutput]] = []

    async def go() -> tuple[dict[str, dict[str, float]], Coordinator]:
        async with Coordinator(cluster.addresses(), tokenizer.eos_token_ids, CONFIG, cluster.is_gone) as coordinator:
            await asyncio.wait_for(coordinator.connect(cluster.check), 150)
            for _ in range(rounds):
                outs = [RequestOutput(f"r{len(outs_by_round)}-{i}", p, tokenizer.encode(p), SAMPLING, tokenizer)
                        for i, p in enumerate(prompts)]
                outs_by_round.append(outs)
                tasks = [asyncio.create_task(coordinator.run_request(o)) for o in outs]
                await asyncio.wait_for(scenario(coordinator, outs, tasks), 240)
                await asyncio.wait_for(asyncio.gather(*tasks), 240)
            return await coordinator.connections.wait_idle(timeout_s=20), coordinator

    stats, coordinator = asyncio.run(go())
    return outs_by_round, stats, coordinator


async def until(ready: Callable[[], bool], tasks: list[asyncio.Task[None]], what: str) -> None:
    """Wait for `ready`; fail (never hang) if every request ended first."""
    while not ready():
        assert not all(t.done() for t in tasks), f"every request ended before {what}"
        await asyncio.sleep(0.005)


def assert_exact(outs: list[RequestOutput], expected: dict[str, list[int]]) -> None:
    for o in outs:
        assert o.finish_reason == "length", (o.request_id, o.finish_reason, o.error)
        assert o.token_ids == expected[o.prompt], (o.request_id, o.kv, o.workers)


def assert_free(stats: dict[str, dict[str, float]]) -> None:
    for address, s in stats.items():
        assert s["free_blocks"] == s["num_blocks"] and s["reserved_blocks"] == 0, (address, s)


@pytest.mark.parametrize("cluster", [(PREFILL, elastic(DECODE), elastic(PREFILL))], indirect=True)
def test_switches_move_decoding_requests_with_their_kv_and_change_nothing(
        cluster: LocalCluster, default_tokenizer: Tokenizer, expected: dict[str, list[int]]) -> None:
    p, e1, e2 = (w.address for w in cluster.workers)
    outcomes: list[SwitchOutcome] = []

    async def scenario(c: Coordinator, outs: list[RequestOutput], tasks: list[asyncio.Task[None]]) -> None:
        if outcomes:
            await to_a_colocated_taker(c, outs, tasks)
            return
        # e2 (prefill) becomes a decode worker while prompts are in flight there
        await until(lambda: any(o.workers.get("prefill") == e2 for o in outs), tasks, "e2 prefilled")
        outcomes.append(await c.switch_role(e2, "decode"))
        # every request decodes on e1 (the only decode worker when they came): e1 becomes a prefill
        # worker while decoding all 4, which move with their KV to e2
        await until(lambda: all(len(o.token_ids) >= 8 for o in outs), tasks, "8 tokens each")
        assert all(o.workers["decode"] == e1 and not o.is_finished for o in outs), [o.workers for o in outs]
        outcomes.append(await c.switch_role(e1, "prefill"))
        assert c.router.roles() == {p: "prefill", e1: "prefill", e2: "decode"}
        # e2 becomes colocated while decoding all 4: both roles decode, so they stay there
        await until(lambda: all(len(o.token_ids) >= 16 for o in outs), tasks, "16 tokens each")
        outcomes.append(await c.switch_role(e2, "colocated"))
        assert c.router.roles() == {p: "prefill", e1: "prefill", e2: "colocated"}
        await asyncio.gather(*tasks)
        outcomes.append(await c.switch_role(e1, "decode"))  # idle: at once

    async def to_a_colocated_taker(c: Coordinator, outs: list[RequestOutput], tasks: list[asyncio.Task[None]]) -> None:
        # round 2, roles p prefill, e1 decode, e2 colocated: two requests decode on e1, which becomes a
        # prefill worker; the only worker left to decode them is e2, colocated, and they move there
        def e1_decoding() -> bool:
            on_e1 = [o for o in outs if o.workers.get("decode") == e1]
            return len(on_e1) == 2 and all(len(o.token_ids) >= 4 for o in on_e1)

        await until(e1_decoding, tasks, "e1 decoding")
        outcomes.append(await c.switch_role(e1, "prefill"))

    rounds, stats, coordinator = run(cluster, default_tokenizer, scenario, rounds=2)
    for outs in rounds:
        assert_exact(outs, expected)
    assert all(o.workers["decode"] == e2 for o in rounds[0])
    to_decode, to_prefill, to_colocated, back, to_taker = outcomes
    assert (to_decode.previous, to_decode.role, to_decode.moved) == ("prefill", "decode", 0), to_decode
    assert (to_prefill.previous, to_prefill.role, to_prefill.moved, to_prefill.failed_over) == \
        ("decode", "prefill", 4, 0), to_prefill
    assert 0 < to_prefill.max_pause_s < 10, to_prefill
    assert (to_colocated.role, to_colocated.kept, to_colocated.moved, to_colocated.finished) == \
        ("colocated", 4, 0, 0), to_colocated
    assert (back.role, back.moved, back.finished) == ("decode", 0, 0), back
    assert (to_taker.role, to_taker.moved, to_taker.failed_over) == ("prefill", 2, 0), to_taker
    served = [o.workers for o in rounds[1]]
    assert sum(w.get("colocated") == e2 for w in served) == 2, served  # served whole there
    assert sum(w.get("decode") == e2 for w in served) == 2, served  # moved there
    assert coordinator.switches.counts == {("prefill", "decode"): 2, ("decode", "prefill"): 2,
                                           ("decode", "colocated"): 1}, coordinator.switches.counts
    assert_free(stats)
    print(f"\nprefill→decode {to_decode.elapsed_s * 1e3:.0f} ms (worker {to_decode.worker_ms:.0f} ms); "
          f"decode→prefill {to_prefill.elapsed_s * 1e3:.0f} ms (worker {to_prefill.worker_ms:.0f} ms), 4 moved, "
          f"pauses {[round(s * 1e3) for s in to_prefill.pauses_s]} ms; decode→colocated "
          f"{to_colocated.elapsed_s * 1e3:.0f} ms (worker {to_colocated.worker_ms:.0f} ms), 4 kept; decode→prefill "
          f"{to_taker.elapsed_s * 1e3:.0f} ms, 2 moved to a colocated worker, pauses "
          f"{[round(s * 1e3) for s in to_taker.pauses_s]} ms")


@pytest.mark.parametrize("cluster", [(PREFILL, elastic(DECODE))], indirect=True)
def test_decode_to_colocated_keeps_the_requests_whose_kv_is_still_on_its_way(
        cluster: LocalCluster, default_model: LoadedModel, default_tokenizer: Tokenizer) -> None:
    p, e = (w.address for w in cluster.workers)
    # long prompts: the prefill worker is still computing them when the switch comes
    prompts = [f"{q} " + "and then some more, " * 30 for q in PROMPTS]  # 4 x (150 + 40) tokens fit a pool
    expected = served_alone(default_model, default_tokenizer, prompts)
    outcomes: list[SwitchOutcome] = []
    untouched: list[bool] = []

    async def scenario(c: Coordinator, outs: list[RequestOutput], tasks: list[asyncio.Task[None]]) -> None:
        await until(lambda: all(o.state == "prefilling" for o in outs), tasks, "every prompt sent to prefill")
        outcomes.append(await c.switch_role(e, "colocated"))
        untouched.extend(not o.token_ids for o in outs)  # no first token yet: its KV was still to come

    [outs], stats, coordinator = run(cluster, default_tokenizer, scenario, prompts=prompts)
    assert_exact(outs, expected)
    [switch] = outcomes
    # the switch took them as they were, reserved with their KV still to come, and did not wait for it
    assert (switch.role, switch.kept, switch.moved, switch.finished, switch.failed_over) == \
        ("colocated", 4, 0, 0, 0), switch
    assert any(untouched), untouched
    assert all(o.workers == {"prefill": p, "decode": e} for o in outs), [o.workers for o in outs]
    assert coordinator.router.roles() == {p: "prefill", e: "colocated"}
    assert_free(stats)


@pytest.mark.parametrize("cluster", [(PREFILL, elastic(DECODE))], indirect=True)
def test_beside_a_prefill_worker_a_colocated_one_takes_prompts_and_decodes_the_prefill_workers(
        cluster: LocalCluster, default_tokenizer: Tokenizer, expected: dict[str, list[int]]) -> None:
    p, e = (w.address for w in cluster.workers)
    switched: list[SwitchOutcome] = []

    async def scenario(c: Coordinator, outs: list[RequestOutput], tasks: list[asyncio.Task[None]]) -> None:
        if not switched:  # round 1 ends as 1P+1D did; then the decode worker becomes colocated
            await asyncio.gather(*tasks)
            switched.append(await c.switch_role(e, "colocated"))

    rounds, stats, coordinator = run(cluster, default_tokenizer, scenario, rounds=2)
    for outs in rounds:
        assert_exact(outs, expected)
    served = sorted(tuple(sorted(o.workers.items())) for o in rounds[1])
    # each prompt went where it would wait least: both workers computed prompts, and the colocated
    # one decoded them all (no decode worker is left)
    assert (("colocated", e),) in served and (("decode", e), ("prefill", p)) in served, served
    assert set(served) == {(("colocated", e),), (("decode", e), ("prefill", p))}, served
    assert coordinator.router.roles() == {p: "prefill", e: "colocated"}
    assert_free(stats)


@pytest.mark.parametrize("cluster", [(PREFILL, elastic(PREFILL), DECODE)], indirect=True)
def test_prefill_to_colocated_with_prompts_in_flight_and_back_while_decoding(
        cluster: LocalCluster, default_tokenizer: Tokenizer, expected: dict[str, list[int]]) -> None:
    p, e, d = (w.address for w in cluster.workers)
    outcomes: list[SwitchOutcome] = []
    served: list[dict[str, str]] = []

    async def to_colocated_and_back(c: Coordinator, outs: list[RequestOutput],
                                    tasks: list[asyncio.Task[None]]) -> None:
        if not outcomes:  # round 1: e becomes colocated while prompts are in flight there
            await until(lambda: any(o.workers.get("prefill") == e for o in outs), tasks, "e prefilled")
            outcomes.append(await c.switch_role(e, "colocated"))
            return
        # round 2: a colocated worker beside prefill and decode ones serves requests whole, when it is
        # as loaded as the decode worker; once those decode there, it becomes a prefill worker again
        # and they move with their KV to the decode worker
        def mine() -> list[RequestOutput]:
            return [o for o in outs if o.workers.get("colocated") == e]

        await until(lambda: len(mine()) == 2 and all(len(o.token_ids) >= 4 for o in mine()), tasks, "e decoding")
        served.extend(dict(o.workers) for o in outs)
        outcomes.append(await c.switch_role(e, "prefill"))

    rounds, stats, coordinator = run(cluster, default_tokenizer, to_colocated_and_back, rounds=2)
    for outs in rounds:
        assert_exact(outs, expected)
    assert sorted(tuple(w) for w in served) == [("colocated",)] * 2 + [("prefill", "decode")] * 2
    to_colocated, back = outcomes
    assert (to_colocated.previous, to_colocated.role, to_colocated.moved) == ("prefill", "colocated", 0)
    assert (back.previous, back.role, back.moved, back.failed_over) == ("colocated", "prefill", 2, 0)
    assert all(o.workers["decode"] == d for o in rounds[1])
    assert coordinator.router.roles() == {p: "prefill", e: "prefill", d: "decode"}
    assert_free(stats)
    print(f"\nprefill→colocated {to_colocated.elapsed_s * 1e3:.0f} ms (worker {to_colocated.worker_ms:.0f} ms); "
          f"colocated→prefill {back.elapsed_s * 1e3:.0f} ms (worker {back.worker_ms:.0f} ms), 2 moved, pauses "
          f"{[round(s * 1e3) for s in back.pauses_s]} ms")


@pytest.mark.parametrize("cluster", [(elastic(PREFILL), DECODE)], indirect=True)
def test_a_fresh_coordinator_takes_a_switched_worker_in_the_role_it_has_now(
        cluster: LocalCluster, default_tokenizer: Tokenizer, expected: dict[str, list[int]]) -> None:
    """A coordinator restarted after a switch is given the workers' first roles (its flags or file):
    the elastic worker's hello says what it is now, and it is routed as that, not refused."""
    e, d = (w.address for w in cluster.workers)
    outcomes: list[SwitchOutcome] = []

    async def switch_when_done(c: Coordinator, outs: list[RequestOutput], tasks: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*tasks)
        outcomes.append(await c.switch_role(e, "colocated"))

    async def nothing(c: Coordinator, outs: list[RequestOutput], tasks: list[asyncio.Task[None]]) -> None:
        assert c.router.roles() == {e: "colocated", d: "decode"}  # from the hello, before any heartbeat

    first, _, _ = run(cluster, default_tokenizer, switch_when_done)
    assert [(o.previous, o.role) for o in outcomes] == [("prefill", "colocated")]
    assert [w.role for w in cluster.config.workers] == ["prefill", "decode"]  # what a new coordinator is given
    second, stats, coordinator = run(cluster, default_tokenizer, nothing)
    for outs in first + second:
        assert_exact(outs, expected)
    assert all("prefill" not in o.workers for o in second[0])  # no prefill worker any more
    assert coordinator.router.roles() == {e: "colocated", d: "decode"}
    assert_free(stats)


@pytest.mark.parametrize("cluster", [(PREFILL, elastic(DECODE), DECODE)], indirect=True)
@pytest.mark.parametrize(("victim", "moment"), [("target", "reserving"), ("target", "shipping"),
                                               ("source", "reserving")])
def test_a_worker_killed_mid_move_loses_nothing(cluster: LocalCluster, default_tokenizer: Tokenizer,
                                                expected: dict[str, list[int]], victim: str, moment: str) -> None:
    """`reserving`: killed once a move asked the target for blocks; `shipping`: once the source was
    told to send the KV there."""
    _, source, target = (w.address for w in cluster.workers)
    index = 2 if victim == "target" else 1
    raised: list[BaseException] = []

    def move_began(c: Coordinator, outs: list[RequestOutput]) -> bool:
        if moment == "shipping":
            return any(o.workers.get("decode") == target for o in outs)
        return any({target, source} <= {a.record.address for a in run.active} for run in c.attempts.values())

    async def kill_mid_move(c: Coordinator, outs: list[RequestOutput], tasks: list[asyncio.Task[None]]) -> None:
        await until(lambda: sum(o.workers.get("decode") == source and len(o.token_ids) >= 5 for o in outs) >= 2,
                    tasks, "two requests decoding on the source")
        switch = asyncio.create_task(c.switch_role(source, "prefill"))
        await until(lambda: move_began(c, outs), tasks, f"a move was {moment}")
        cluster.workers[index].process.send_signal(signal.SIGKILL)
        try:
            await switch
        except DisaggError as e:  # the source died: it never switched
            raised.append(e)
        cluster.restart(index)  # requests wait for a decode worker to come back, then retry

    (outs,), stats, _ = run(cluster, default_tokenizer, kill_mid_move)
    assert_exact(outs, expected)  # retried ones re-prefill prompt + tokens so far: the same greedy text
    assert any(o.kv.get("retries") for o in outs)  # the kill did cut a move (or the source's requests)
    assert bool(raised) == (victim == "source")
    assert_free(stats)
