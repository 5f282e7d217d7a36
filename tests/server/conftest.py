"""`disagg serve` as a subprocess on a free 127.0.0.1 port, an in-process engine to compare with,
and the check of an answer in OpenAI's error shape.

Each test module starts one server (module-scoped) and reuses it; the server is stopped with
SIGTERM (its one exit path, which also stops its workers) and must exit 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.engine.request import RequestOutput
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer
from tests.workers.peer import free_port

START_TIMEOUT_S = 240.0  # two workers loading weights on a busy 2-core machine
STOP_TIMEOUT_S = 90.0  # past disagg serve's own drain limits (30 s for responses, 5 s for the rest)
HTTP_TIMEOUT_S = 120.0


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def client(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S, headers=headers)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics by (name, sorted labels), parsed by prometheus_client's parser."""
        text = httpx.get(f"{self.url}/metrics", timeout=HTTP_TIMEOUT_S).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@contextmanager
def running_server(log_dir: Path, model: Path, *args: str) -> Iterator[Server]:
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    env = {**os.environ, "COLUMNS": "200"}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "disagg_cli", "serve", "--model", str(model), "--port",
                                    str(port), *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "ready at" not in server.log_text():
            assert process.poll() is None, f"disagg serve exited with {process.returncode}:\n{server.log_text()}"
            assert time.monotonic() < deadline, f"disagg serve not ready in {START_TIMEOUT_S:.0f} s:\n" \
                                                f"{server.log_text()}"
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"disagg serve did not stop within {STOP_TIMEOUT_S:.0f} s:\n{server.log_text()}") \
                from None
    assert code == 0, f"disagg serve exited with {code}:\n{server.log_text()}"


def assert_error(response: httpx.Response, status: int, param: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    assert body["error"]["type"] == {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                                     503: "ServiceUnavailableError"}[status]
    assert body["error"]["param"] == param
    assert words in body["error"]["message"], body["error"]["message"]


def engine_output(model: LoadedModel, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                  ) -> RequestOutput:
    """The in-process engine's answer, detokenized and stop-checked as the service does it."""
    engine = LLMEngine(model, EngineConfig(kv_cache_tokens=4096))
    out = RequestOutput("ref", "", prompt_ids, params, tokenizer)
    engine.add_request("ref", prompt_ids, params, tokenizer.eos_token_ids)
    while engine.has_unfinished() and not out.is_finished:
        for event in engine.step():
            out.append(event.token_id, event.logprobs)
    return out
