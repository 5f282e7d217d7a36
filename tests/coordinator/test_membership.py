"""Workers that join while the coordinator runs: one that was down when it connected, and one added
later by address. Both are greeted in the background and routed to once they answer."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.coordinator import Coordinator, CoordinatorConfig
from disagg_cli.engine.request import RequestOutput
from disagg_cli.errors import DisaggError
from disagg_cli.model.tokenizer import Tokenizer
from tests.workers.peer import free_port, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def test_late_and_added_workers_are_used(default_gguf: Path, default_tokenizer: Tokenizer, tmp_path: Path) -> None:
    pp, d1, d2, d3 = (free_port() for _ in range(4))
    procs: list[subprocess.Popen] = [start_worker("prefill", pp, default_gguf, log=tmp_path / "p.log"),
                                     start_worker("decode", d1, default_gguf, log=tmp_path / "d1.log")]
    late, added = f"tcp://127.0.0.1:{d2}", f"tcp://127.0.0.1:{d3}"

    def request(rid: str) -> RequestOutput:
        ids = default_tokenizer.encode("The capital of France is")
        return RequestOutput(rid, "", ids, PARAMS, default_tokenizer)

    async def until_alive(coordinator: Coordinator, address: str) -> None:
        for _ in range(1200):
            if coordinator.router.get(address).is_alive:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{address} never joined")

    async def run() -> list[RequestOutput]:
        workers = [("prefill", f"tcp://127.0.0.1:{pp}"), ("decode", f"tcp://127.0.0.1:{d1}"), ("decode", late)]
        config = CoordinatorConfig(heartbeat_interval_s=0.3)
        async with Coordinator(workers, default_tokenizer.eos_token_ids, config) as coordinator:
            await asyncio.wait_for(coordinator.connect(join_grace_s=1.0), 150)  # `late` is not running yet
            assert not coordinator.router.get(late).is_alive
            procs.append(start_worker("decode", d2, default_gguf, log=tmp_path / "d2.log"))
            await until_alive(coordinator, late)
            procs.append(start_worker("decode", d3, default_gguf, log=tmp_path / "d3.log"))
            await coordinator.connections.add_worker("decode", added)
            with pytest.raises(DisaggError, match="already a worker"):
                await coordinator.connections.add_worker("decode", added)
            await until_alive(coordinator, added)
            outs = [request(f"r{i}") for i in range(6)]
            for out in outs:  # one at a time: round-robin visits every decode worker
                await asyncio.wait_for(coordinator.run_request(out), 120)
            return outs

    try:
        outs = asyncio.run(run())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    assert all(o.state == "done" for o in outs), [o.error for o in outs]
    assert len({tuple(o.token_ids) for o in outs}) == 1
    assert {o.workers["decode"] for o in outs} == {f"tcp://127.0.0.1:{d1}", late, added}


def test_a_role_nobody_answers_for_is_an_error_naming_it(default_tokenizer: Tokenizer) -> None:
    async def run() -> None:
        workers = [("prefill", f"tcp://127.0.0.1:{free_port()}"), ("decode", f"tcp://127.0.0.1:{free_port()}")]
        config = CoordinatorConfig(handshake_timeout_s=1.0)
        async with Coordinator(workers, default_tokenizer.eos_token_ids, config) as coordinator:
            await coordinator.connect(join_grace_s=0.5)

    with pytest.raises(DisaggError, match="no answer to hello from prefill worker .* decode worker"):
        asyncio.run(run())
