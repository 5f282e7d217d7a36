"""`disagg serve` through the real `openai` client: greedy float32 answers equal the in-process
engine's text and token counts, streamed or whole; stop strings; seeded n=2; a client that hangs up
mid-stream frees every KV block; /metrics counters move by exactly what was sent."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from disagg_cli.config import SamplingParams
from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.tokenizer import Tokenizer
from tests.server.conftest import HTTP_TIMEOUT_S, STOP_TIMEOUT_S, Server, engine_output, running_server

pytestmark = pytest.mark.slow

MODEL = "smollm2"  # --served-model-name
PROMPT = "The old lighthouse keeper climbed the stairs every evening because"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
FREE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve"), default_gguf, "--served-model-name", MODEL,
                        "--kv-codec", "none", "--dtype", "float32", "--quantization", "none",
                        "--no-colocated") as s:  # the split: KV crosses between two workers
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def test_completion_greedy_equals_in_process_engine(client: openai.OpenAI, default_model: LoadedModel,
                                                    default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode(PROMPT)
    ref = engine_output(default_model, default_tokenizer, ids, SamplingParams(max_tokens=16, ignore_eos=True))
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.object == "text_completion" and got.model == MODEL
    assert [c.text for c in got.choices] == [ref.text]
    assert got.choices[0].finish_reason == "length"
    assert got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 16)
    figures = got.model_extra["disagg"][0]
    assert figures["kv_raw_bytes"] == len(ids) * 2 * 30 * 3 * 64 * 4  # float32 KV of the prompt, lossless
    assert set(figures["workers"]) == {"prefill", "decode"}


def test_streamed_completion_equals_whole_with_usage_last(client: openai.OpenAI, default_model: LoadedModel,
                                                          default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode(PROMPT)
    ref = engine_output(default_model, default_tokenizer, ids, SamplingParams(max_tokens=12, ignore_eos=True))
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), 12)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_greedy_equals_in_process_engine_whole_and_streamed(
        client: openai.OpenAI, default_model: LoadedModel, default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode(default_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    ref = engine_output(default_model, default_tokenizer, ids, SamplingParams(max_tokens=24))
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == ref.text
    assert whole.choices[0].finish_reason == ref.finish_reason
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), len(ref.token_ids))
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=24,
                                                 temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI, default_model: LoadedModel,
                                             default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode(PROMPT)
    full = engine_output(default_model, default_tokenizer, ids, SamplingParams(max_tokens=16, ignore_eos=True)).text
    stop = full.split()[3]  # a word well inside the greedy answer
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_n2_with_a_seed_gives_two_reproducible_choices(client: openai.OpenAI) -> None:
    def ask(n: int) -> list[str]:
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, n=n, seed=1234,
                                        temperature=1.0, extra_body={"ignore_eos": True})
        assert [c.index for c in got.choices] == list(range(n))
        assert got.usage is not None and got.usage.completion_tokens == 12 * n
        return [c.text for c in got.choices]

    first, again, alone = ask(2), ask(2), ask(1)
    assert first == again
    assert first[0] == alone[0]  # choice 0 draws with the request's own seed
    assert first[0] != first[1]


def test_prompt_as_token_ids_and_as_a_list(client: openai.OpenAI, default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert by_ids.choices[0].text == default_tokenizer.decode(ids) + by_text.choices[0].text
    two = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == by_text.choices[0].text


def test_models_health_version_tokenize(server: Server, client: openai.OpenAI,
                                        default_tokenizer: Tokenizer) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    with server.client() as http:
        assert http.get("/health").status_code == 200
        assert set(http.get("/version").json()) == {"version"}
        tok = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
        assert tok["tokens"] == default_tokenizer.encode(PROMPT) and tok["count"] == len(tok["tokens"])
        assert tok["max_model_len"] == 8192
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": PROMPT}


def _usage_by_worker(server: Server) -> dict[str, float]:
    return {dict(labels)["address"]: value for (name, labels), value in server.metrics().items()
            if name == "disagg:kv_cache_usage_perc"}


def test_client_hanging_up_mid_stream_frees_every_block(server: Server) -> None:
    before = server.metrics()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        chunks: list[str] = []
        for line in events:
            if line.startswith("data: "):
                chunks.append(line)
            if len(chunks) == 3:
                break  # hang up with the request still decoding (2000 tokens asked for)
    deadline = time.monotonic() + FREE_TIMEOUT_S
    while True:
        usage, after = _usage_by_worker(server), server.metrics()
        running = after[("disagg:num_requests_running", (("model_name", MODEL),))]
        if (running == 0 and len(usage) == 2 and all(u == 0 for u in usage.values())) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert running == 0
    assert usage == {address: 0.0 for address in usage} and len(usage) == 2
    key = ("disagg:request_success_total", (("finished_reason", "abort"), ("model_name", MODEL)))
    assert after[key] - before[key] == 1
    assert after[("disagg:generation_tokens_total", (("model_name", MODEL),))] \
        - before[("disagg:generation_tokens_total", (("model_name", MODEL),))] < 2000


def test_metrics_counters_move_by_exactly_the_requests_and_tokens_sent(server: Server, client: openai.OpenAI,
                                                                       default_tokenizer: Tokenizer) -> None:
    label = (("model_name", MODEL),)

    def value(metrics: dict, name: str, labels: tuple = label) -> float:
        return metrics[(name, labels)]

    prompts = [PROMPT, "Hello there"]
    before = server.metrics()
    figures = []
    for p in prompts:
        done = client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
        figures += done.model_extra["disagg"]
    after = server.metrics()
    assert len(figures) == 2
    sent_prompt_tokens = sum(len(default_tokenizer.encode(p)) for p in prompts)
    assert value(after, "disagg:prompt_tokens_total") - value(before, "disagg:prompt_tokens_total") \
        == sent_prompt_tokens
    assert value(after, "disagg:generation_tokens_total") - value(before, "disagg:generation_tokens_total") == 10
    length = (("finished_reason", "length"), ("model_name", MODEL))
    assert value(after, "disagg:request_success_total", length) \
        - value(before, "disagg:request_success_total", length) == 2
    for name, per_request in [("disagg:time_to_first_token_seconds_count", 1),
                              ("disagg:e2e_request_latency_seconds_count", 1),
                              ("disagg:inter_token_latency_seconds_count", 4)]:
        assert value(after, name) - value(before, name) == 2 * per_request, name
    raw = (("kind", "raw"), ("model_name", MODEL))
    assert value(after, "disagg:kv_transfer_bytes_total", raw) - value(before, "disagg:kv_transfer_bytes_total", raw) \
        == (sent_prompt_tokens - sum(f["decode_cached_tokens"] for f in figures)) * 2 * 30 * 3 * 64 * 4
    for name, key in [("disagg:prefix_cache_hits_total", "prefix_cached_tokens"),
                      ("disagg:decode_prefix_cache_hits_total", "decode_cached_tokens")]:
        assert value(after, name) - value(before, name) == sum(f[key] for f in figures), name
    assert value(after, "disagg:prefix_cache_queries_total") - value(before, "disagg:prefix_cache_queries_total") \
        == sent_prompt_tokens
    ups = {dict(labels)["role"]: v for (name, labels), v in after.items() if name == "disagg:worker_up"}
    assert ups == {"prefill": 1.0, "decode": 1.0}


def test_logprobs_agree_with_the_in_process_engine(client: openai.OpenAI, default_model: LoadedModel,
                                                   default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode(PROMPT)
    ref = engine_output(default_model, default_tokenizer, ids, SamplingParams(max_tokens=6, ignore_eos=True,
                                                                             logprobs=3))
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs
    assert lp.tokens == [default_tokenizer.decode([t]) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([r.logprob for r in ref.logprobs if r], abs=1e-3)
    for top, r in zip(lp.top_logprobs, ref.logprobs, strict=True):
        assert r is not None
        assert list(top) == [default_tokenizer.decode([i]) for i in r.top_ids]
        assert list(top.values()) == pytest.approx(list(r.top_logprobs), abs=1e-3)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content)  # greedy


def _rx_queued(server_port: int, client_port: int) -> int:
    """Bytes the kernel holds unread on the server's end of one 127.0.0.1 connection (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":"), fields[2].split(":")
        if int(local[1], 16) == server_port and int(remote[1], 16) == client_port:
            return int(fields[4].split(":")[1], 16)
    return 0


def test_health_is_503_while_draining_after_sigterm_with_a_request_in_flight(server: Server) -> None:
    """Last in this module: it stops the server. SIGTERM makes the service drain (its health turns
    503) and uvicorn close the listening socket within its 0.1 s tick, so a /health sent afterwards
    cannot get in; a request that reached the server before that tick is still answered. To ask at
    that moment, the server is stopped (SIGSTOP) while SIGTERM and a keep-alive /health are queued
    for it. Once continued, what the client sees depends on which of three things the server does
    first, and each is what a load balancer would see at that moment:
    - the signal handler runs, then the loop reads the request: 503 while draining (the usual case);
    - the loop reads the request first (the kernel may hand the signal to another thread): 200,
      healthy (seen once in CI);
    - the handler runs and uvicorn's shutdown closes the idle connection before the loop reads the
      request: the connection is reset with no answer (seen once in CI).
    An answer is accepted only as exactly the draining or the healthy one; the draining body is
    pinned without a race in `test_health_route.py`. The streamed request in flight finishes with
    every token and the process exits 0."""
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux's /proc/net/tcp to see the request queued at the server")
    port = int(server.url.rsplit(":", 1)[1])
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT_S) as http_client, \
            http_client.stream("POST", "/v1/completions", json=body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        events = [next(line for line in lines if line.startswith("data: "))]  # decoding: in flight
        probe.request("GET", "/health")  # a kept-alive connection, known to the server
        first = probe.getresponse()
        assert first.status == 200 and not first.will_close, first.status
        first.read()
        client_port = probe.sock.getsockname()[1]
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            os.kill(server.process.pid, signal.SIGTERM)
            probe.sock.sendall(request)
            deadline = time.monotonic() + 10
            while _rx_queued(port, client_port) < len(request):
                assert time.monotonic() < deadline, "the probe request never reached the server's socket"
                time.sleep(0.01)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        draining = http.client.HTTPResponse(probe.sock, method="GET")
        try:
            draining.begin()
            status, answer = draining.status, draining.read()
        except (ConnectionResetError, http.client.RemoteDisconnected):
            status, answer = None, b""  # closed as idle by the shutdown before it was read
        probe.close()
        events += [line for line in lines if line.startswith("data: ")]
    if status == 503:
        assert json.loads(answer) == {"status": "draining"}
    elif status is not None:  # read before the handler ran: the healthy answer, nothing else
        assert (status, answer) == (200, b""), (status, answer)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2].removeprefix("data: "))["usage"]
    assert usage["completion_tokens"] == 32, events[-3:]  # the request in flight was finished, not cut
    assert server.process.wait(STOP_TIMEOUT_S) == 0, server.log_text()
