"""`disagg serve --colocated`: one worker computes both phases; a first token that is also the last
(max_tokens 1) is an answer, streamed or not (it once ended as a 500 'ended without an answer')."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import Server, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve-colocated"), default_gguf, "--colocated",
                        "--served-model-name", "m") as s:
        yield s


def test_one_token_answers_are_answers(server: Server) -> None:
    with server.client() as c:
        for max_tokens in (1, 2):
            r = c.post("/v1/completions", json={"model": "m", "prompt": "The capital of France is",
                                                "max_tokens": max_tokens})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] == max_tokens
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["disagg"][0]["workers"] == {"colocated": body["disagg"][0]["workers"]["colocated"]}
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                "stream": True}) as s:
            assert s.status_code == 200
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"
        assert not any("error" in ch for ch in chunks)
