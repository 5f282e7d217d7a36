"""Every error path of `disagg serve` over raw HTTP: its status, OpenAI's nested error shape, and a
server that still answers afterwards. The server here has an API key, a 256-token KV pool on its
decode worker and room for one waiting request."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Server, assert_error, running_server

pytestmark = pytest.mark.slow

KEY = "test-key"
MODEL = "m1"
TOKEN = 28120  # "hello"
WAIT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve-errors"), default_gguf, "--api-key", KEY,
                        "--served-model-name", MODEL, "--kv-cache-tokens", "256", "--max-queued-requests", "1",
                        "--max-worker-restarts", "0") as s:  # a dead worker stays dead: what 503s look like
        yield s


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client(KEY) as c:
        yield c
        # After every error: the server still answers a real request.
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 1


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/completions", content=b'{"prompt": "Hi", ', headers={"content-type": "application/json"})
    assert_error(r, 400, None, "not valid JSON")


def test_wrong_types_are_400_naming_the_field(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json={"prompt": 5}), 400, "prompt", "prompt")
    assert_error(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": "many"}), 400, "max_tokens",
                 "valid integer")
    assert_error(http.post("/v1/chat/completions", json={"messages": "hello"}), 400, "messages", "messages")
    assert_error(http.post("/v1/completions", json={"max_tokens": 3}), 400, "prompt", "Field required")


def test_unknown_model_is_404(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "Hi"}), 404, "model", "`gpt-4`")


def test_max_tokens_zero_or_less_is_400(http: httpx.Client) -> None:
    for n in (0, -3):
        assert_error(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": n}), 400, "max_tokens",
                     f"at least 1, got {n}")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_completion_tokens": 0}), 400, "max_tokens", "got 0")


def test_bad_sampling_values_are_400(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json={"prompt": "Hi", "temperature": -1}), 400, "temperature", "-1")
    assert_error(http.post("/v1/completions", json={"prompt": "Hi", "top_p": 0}), 400, "top_p", "(0, 1]")
    assert_error(http.post("/v1/completions", json={"prompt": [10**9]}), 400, None, "outside the vocabulary")


def test_prompt_longer_than_the_context_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": [TOKEN] * 8190, "max_tokens": 16})
    assert_error(r, 400, "max_tokens", "context is 8192 tokens, but 8206 were asked for (8190 in the prompt")


def test_more_kv_than_the_pool_holds_is_400_whole_and_an_error_event_streamed(http: httpx.Client) -> None:
    body = {"prompt": [TOKEN] * 200, "max_tokens": 100}
    assert_error(http.post("/v1/completions", json=body), 400, None, "KV blocks")
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 2 and events[1] == "[DONE]"
    error = json.loads(events[0])["error"]
    assert error["code"] == 400 and "KV blocks" in error["message"]


def test_missing_or_wrong_key_is_401_and_health_needs_none(server: Server) -> None:
    with server.client() as anonymous, server.client("wrong") as wrong:
        for c in (anonymous, wrong):
            assert_error(c.post("/v1/completions", json={"prompt": "Hi"}), 401, None, "API key")
            assert_error(c.get("/v1/models"), 401, None, "API key")
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
    with server.client(KEY) as good:
        assert good.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_queue_past_max_queued_requests_is_503_with_retry_after(server: Server, http: httpx.Client) -> None:
    # A holds the pool's first blocks while it decodes; B's 241-token prompt cannot fit until A ends,
    # so B waits for decode memory: one waiting request, the most --max-queued-requests 1 allows.
    a_body = {"prompt": [TOKEN] * 16, "max_tokens": 240, "ignore_eos": True, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
            http.stream("POST", "/v1/completions", json=a_body) as a:
        lines = a.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # A is decoding
        b = pool.submit(http.post, "/v1/completions", json={"prompt": [TOKEN] * 241, "max_tokens": 1})
        waiting = ("disagg:num_requests_waiting", (("model_name", MODEL),))
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while server.metrics()[waiting] != 1:
            assert time.monotonic() < deadline, "B never waited for decode memory"
            time.sleep(0.1)
        c = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert_error(c, 503, None, "--max-queued-requests 1")
        assert c.headers["retry-after"] == "1"
        a.close()  # hang up: A is aborted, its blocks freed, and B runs
        b_response = b.result(timeout=WAIT_TIMEOUT_S)
    assert b_response.status_code == 200, b_response.text
    assert b_response.json()["usage"] == {"prompt_tokens": 241, "completion_tokens": 1, "total_tokens": 242}


def test_health_is_503_and_requests_fail_503_once_no_decode_worker_is_alive(server: Server) -> None:
    # Last in this module: it kills the server's decode worker (the server still exits 0 afterwards).
    children = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(server.process.pid)], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    (decode_pid,) = [int(line.split()[0]) for line in children if '"role": "decode"' in line]
    os.kill(decode_pid, signal.SIGKILL)
    with server.client(KEY) as http:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while (health := http.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "the dead decode worker was never noticed"
            time.sleep(0.2)
        assert health.status_code == 503 and health.json() == {"status": "no live decode worker"}
        assert_error(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}), 503, None,
                     "no live decode worker")
    ups = {dict(labels)["role"]: v for (name, labels), v in server.metrics().items() if name == "disagg:worker_up"}
    assert ups == {"prefill": 1.0, "decode": 0.0}
