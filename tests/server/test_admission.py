"""Admission by load over real HTTP: with `--admission slo`, a request predicted to miss
`--slo-ttft-ms` behind the prompts queued is answered 503 with Retry-After in OpenAI's error shape,
and taken again once the queue has drained. The server runs `--planner slo` too: its decisions reach
/metrics and each response's `disagg.roles` (the long prompt misses the 50 ms target, so it may turn
the idle decode worker colocated), and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Server, assert_error, running_server

pytestmark = pytest.mark.slow

TOKEN = 28120  # "hello"
LONG_PROMPT = [TOKEN] * 2000  # seconds of prefill on one core of this machine


@pytest.fixture(scope="module")
def server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Workers on their own cores: an idle decode worker that lends its cores is never taken for
    # prefill, and this module wants the planner free to make it colocated.
    folder = tmp_path_factory.mktemp("serve-admission")
    topology = folder / "own-cores.toml"
    topology.write_text(f'model = "{default_gguf}"\n[cluster]\nlend_cores = false\n'
                        '[[workers]]\nrole = "prefill"\n[[workers]]\nrole = "decode"\n')
    with running_server(folder, default_gguf, "--admission", "slo", "--slo-ttft-ms", "50", "--planner", "slo",
                        "--planner-interval", "0.2", "--config", str(topology)) as s:
        yield s


def test_a_request_predicted_to_miss_ttft_is_503_then_taken_once_the_queue_drains(server: Server) -> None:
    with server.client() as http:
        long_body = {"prompt": LONG_PROMPT, "max_tokens": 2, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=long_body) as long:
            assert long.status_code == 200  # its headers come before its first token: the prompt is queued
            refused = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert_error(refused, 503, None, "past --slo-ttft-ms 50; retry later")
            assert "time to first token is predicted at" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) >= 1
            events = [line for line in long.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        ok = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    figures = ok.json()["disagg"][0]
    roles = figures["roles"]
    # as started, or with the decode worker made colocated to take prompts too
    assert sorted(roles.values()) in (["decode", "prefill"], ["colocated", "prefill"]), roles
    assert set(figures["workers"].values()) <= set(roles)


def test_metrics_show_roles_and_switches(server: Server) -> None:
    metrics = server.metrics()
    roles = {dict(labels)["address"]: dict(labels)["role"]
             for (name, labels), value in metrics.items() if name == "disagg:worker_role" and value == 1.0}
    switches = {(dict(labels)["from"], dict(labels)["to"]): value
                for (name, labels), value in metrics.items() if name == "disagg:role_switches_total"}
    assert len(switches) == 6  # every pair, from zero
    if sorted(roles.values()) == ["colocated", "prefill"]:  # the one switch the planner may have made
        assert switches.pop(("decode", "colocated")) == 1.0
    else:
        assert sorted(roles.values()) == ["decode", "prefill"]
    assert set(switches.values()) == {0.0}
    # The planner ticked (the long prompt missed the 50 ms target); the server kept serving.
    assert "planner:" in server.log_text()
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
