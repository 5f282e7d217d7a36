"""What an attacker or a broken client sends, against one real `disagg serve` (issue 24's probes):
each is refused with its exact status in OpenAI's error shape, or served as the request it amounts
to, and afterwards the same server answers a normal request and frees every KV block. Last, a
bounded fuzz over the server's own OpenAPI schema: no 5xx, every 4xx in OpenAI's shape.

The server takes bodies up to `BODY_LIMIT`, larger than the default, so that a prompt list big
enough to stall an event loop for many seconds gets through to the tokenizer."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import Server, assert_error, running_server

pytestmark = pytest.mark.slow

BODY_LIMIT = 32 * 1024 * 1024
PROMPT = "The old lighthouse keeper climbed the stairs every evening because"
MESSAGES = [{"role": "user", "content": "Say hi"}]
HEALTH_TIMEOUT_S = 5.0  # /health answers in milliseconds; the stall this guards against lasted 12 s
FREE_TIMEOUT_S = 30.0
SOCKET_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve-hostile"), default_gguf, "--max-body-bytes",
                        str(BODY_LIMIT)) as s:
        yield s


def assert_normal_request_served_and_blocks_free(server: Server) -> None:
    with server.client() as c:
        ok = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 2
    deadline = time.monotonic() + FREE_TIMEOUT_S
    workers = {dict(labels)["address"] for (name, labels), v in server.metrics().items()
               if name == "disagg:worker_up" and v == 1.0}  # the default topology's: one or two
    while True:
        usage = {dict(labels)["address"]: v for (name, labels), v in server.metrics().items()
                 if name == "disagg:kv_cache_usage_perc"}
        if (set(usage) == workers and all(u == 0 for u in usage.values())) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert workers and usage == {address: 0.0 for address in workers}


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
    assert_normal_request_served_and_blocks_free(server)


def post_raw(http: httpx.Client, path: str, body: str) -> httpx.Response:
    """A body as written, so it may hold JSON's escapes of what Python's json would not write."""
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


def test_a_temperature_too_small_to_divide_by_is_greedy(http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True}
    greedy = http.post("/v1/completions", json=body | {"temperature": 0})
    tiny = http.post("/v1/completions", json=body | {"temperature": 1e-40})
    assert (greedy.status_code, tiny.status_code) == (200, 200), tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("fields,param,words", [
    ({"seed": 2**64}, "seed", "got 18446744073709551616"),
    ({"seed": -(2**63) - 1}, "seed", "between -9223372036854775808 and 18446744073709551615"),
    ({"seed": 2**64 - 1, "n": 2}, "seed", "with n=2"),
    ({"top_k": 2**64}, "top_k", f"up to {2**63 - 1}"),
    ({"max_tokens": 2**64}, "max_tokens", "at most 2147483647"),
    ({"logprobs": 2**64}, "logprobs", "between 0 and 20"),
    ({"n": 2**64}, "n", "between 1 and 16"),
])
def test_numbers_past_what_a_worker_takes_are_400_naming_the_field(http: httpx.Client, fields: dict[str, int],
                                                                   param: str, words: str) -> None:
    assert_error(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2} | fields), 400, param, words)


def test_numbers_at_the_edges_of_their_ranges_are_served(http: httpx.Client) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True}
    for fields in ({"seed": 2**64 - 1}, {"seed": 2**64 - 2, "n": 2}, {"seed": -(2**63)},
                   {"top_k": 10**9, "temperature": 1.0}):  # a top_k past the vocabulary is off
        r = http.post("/v1/completions", json=body | fields)
        assert r.status_code == 200, (fields, r.text)
        assert r.json()["usage"]["completion_tokens"] == 2 * fields.get("n", 1)
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True, "top_logprobs": 2**64})
    assert_error(chat, 400, "top_logprobs", "between 0 and 20")


def test_stop_strings_past_their_bounds_are_400_at_once(http: httpx.Client) -> None:
    # 16 stop strings of 100 KB each once held a request past 120 s.
    r = http.post("/v1/completions", json={"prompt": "Hi", "stop": ["x" * 100_000] * 16}, timeout=30)
    assert_error(r, 400, "stop", "at most 1024 bytes each and 4096 together")
    assert_error(http.post("/v1/chat/completions", json={"messages": MESSAGES, "stop": "é" * 600}), 400, "stop",
                 "got 1200 at most")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", '{"prompt": "Hi \\ud800 there"}', "prompt"),
    ("/v1/completions", '{"prompt": ["fine", "\\udfff"]}', "prompt"),
    ("/v1/completions", '{"prompt": "Hi", "stop": ["\\ud800"]}', "stop"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
])
def test_a_lone_surrogate_is_400_naming_the_field(http: httpx.Client, path: str, body: str, param: str) -> None:
    assert_error(post_raw(http, path, body), 400, param, "lone surrogate")


def _raw_exchange(server: Server, head: bytes, body_parts: Iterable[bytes] = ()) -> tuple[int, dict[str, Any]]:
    """Send a request by hand (headers, then body parts) and read the status and JSON answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536) or pytest.fail(f"connection closed mid-answer: {answer!r}")
        head_part, _, body = answer.partition(b"\r\n\r\n")
        lines = head_part.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536) or pytest.fail(f"connection closed mid-answer: {answer!r}")
    return int(lines[0].split()[1]), json.loads(body)


def _assert_413(status: int, body: dict[str, Any], words: str) -> None:
    assert status == 413, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["code"], body["error"]["param"]) == (413, None)
    assert words in body["error"]["message"] and f"({BODY_LIMIT} bytes, --max-body-bytes)" in body["error"]["message"]


def test_a_body_over_the_limit_is_413_before_it_is_read(server: Server) -> None:
    # Only the headers are sent: the 413 must come without the server waiting for the body.
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * 1024 * 1024}\r\n\r\n").encode()
    _assert_413(*_raw_exchange(server, head), f"the request body is {100 * 1024 * 1024} bytes")
    # Chunked, the size is known only as it arrives: the body never ends, and the answer comes anyway
    # once it is one byte past the limit.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
           b"Transfer-Encoding: chunked\r\n\r\n"
    part = 1024 * 1024
    chunks = [b"%x\r\n%s\r\n" % (part, b"x" * part)] * (BODY_LIMIT // part) + [b"1\r\nx\r\n"]
    _assert_413(*_raw_exchange(server, head, chunks), "the request body is over")
    assert_normal_request_served_and_blocks_free(server)


def test_prompts_times_n_past_the_cap_is_400_and_nothing_is_queued(server: Server, http: httpx.Client) -> None:
    # 2,000 prompts × n 16 once became 32,000 requests in the service.
    r = http.post("/v1/completions", json={"prompt": ["Hi"] * 2000, "n": 16, "max_tokens": 1})
    assert_error(r, 400, "prompt", "at most 256 choices (prompts × n), got 2000 × 16 = 32000")
    assert_error(http.post("/v1/completions", json={"prompt": ["Hi"] * 17, "n": 16}), 400, "n", "17 × 16 = 272")
    waiting = [v for (name, _), v in server.metrics().items() if name == "disagg:num_requests_waiting"]
    assert waiting == [0]


def test_a_text_too_long_for_any_tokenization_is_refused_before_tokenizing(http: httpx.Client) -> None:
    # The context (8,192 tokens) times the vocabulary's longest token (81 characters), times 4.
    text = "hello world " * 230_000  # 2.76M characters
    assert_error(http.post("/v1/completions", json={"prompt": text}), 400, "prompt",
                 "the prompt is 2760000 characters long")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]}), 400,
                 "messages", "characters long")


def test_huge_prompts_are_tokenized_off_the_event_loop(server: Server, http: httpx.Client) -> None:
    # Twelve prompts each just under the character bound, ~400K tokens each: tokenized on the event
    # loop, they stalled /health and the coordinator's heartbeats for many seconds (workers taken
    # as dead). In a thread, /health answers throughout, and the first prompt is refused.
    prompts = ["hello world " * 200_000] * 12
    probes: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
            httpx.Client(base_url=server.url, timeout=HEALTH_TIMEOUT_S) as probe:
        big = pool.submit(http.post, "/v1/completions", json={"prompt": prompts, "max_tokens": 1})
        while not big.done():
            start = time.monotonic()
            try:
                health = probe.get("/health")
            except httpx.TimeoutException:
                pytest.fail(f"/health did not answer in {HEALTH_TIMEOUT_S} s while huge prompts were tokenized")
            assert health.status_code == 200, health.text
            probes.append(time.monotonic() - start)
            time.sleep(0.05)
        r = big.result(timeout=SOCKET_TIMEOUT_S)
    assert_error(r, 400, "max_tokens", "this model's context is 8192 tokens, but 400002 were asked for")
    assert len(probes) >= 3, probes  # the probes overlapped the request


def test_openapi_schema_is_served(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= set(schema["paths"])


FUZZ_EXAMPLES = {"POST": 40, "GET": 2}  # per operation and generation mode
FUZZ_TOKENS = 4
FUZZ_CALL_TIMEOUT_S = 60.0


def _bounded(body: Any) -> Any:
    """A fuzzed body, with what makes a served example slow cut down (tokens to generate, choices,
    prompts): the fuzz looks for 5xx and wrong error shapes, not for throughput. Values outside
    their fields' ranges are kept, so every refusal is still exercised."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str):
        del body["model"]  # a random name is a 404; the default model lets the rest be checked
    for key in ("max_tokens", "max_completion_tokens"):
        if FUZZ_TOKENS < _number(body.get(key)) <= 8192:
            body[key] = FUZZ_TOKENS
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = FUZZ_TOKENS  # chat's default is the rest of the context
    if 2 < _number(body.get("n")) <= 16:
        body["n"] = 2
    if isinstance(body.get("prompt"), list):
        body["prompt"] = [p[:64] if isinstance(p, list) else p for p in body["prompt"][:4]]
    return body


def _number(value: Any) -> float:
    """What pydantic's lax mode makes of a value for an int field (5, 5.0, "5"), else NaN."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _assert_openai_answer(response: Any, what: str) -> None:
    status = response.status_code
    assert status < 500, f"{what} → {status}: {response.text[:500]}"
    if status >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, \
            f"{what} → {body}"
        assert body["error"]["code"] == status and isinstance(body["error"]["message"], str), f"{what} → {body}"
    elif "text/event-stream" in str(response.headers.get("content-type")):
        for line in response.text.splitlines():  # an error event in a stream must not hide a 5xx
            if line.startswith("data: {") and '"error"' in line:
                assert json.loads(line.removeprefix("data: "))["error"]["code"] < 500, f"{what} → {line}"


def test_fuzzed_requests_over_the_openapi_schema_get_no_5xx(server: Server, http: httpx.Client) -> None:
    """schemathesis draws bodies from /openapi.json (valid ones, and ones that break the schema),
    derandomized so every run sends the same examples; a bounded number per operation."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=FUZZ_CALL_TIMEOUT_S)
    statuses: collections.Counter[int] = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # a GET without parameters has nothing to break
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=FUZZ_EXAMPLES[operation.method.upper()], deadline=None, database=None,
                      derandomize=True, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                if isinstance(case.body, dict):
                    case.body = _bounded(case.body)
                response = case.call(base_url=server.url, timeout=FUZZ_CALL_TIMEOUT_S)
                statuses[response.status_code] += 1
                _assert_openai_answer(response, f"{case.method} {case.path} {case.body!r:.300}")

            check()
    assert statuses[200] >= 50 and sum(statuses.values()) >= 300, statuses  # served and refused alike
