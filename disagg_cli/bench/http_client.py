"""`disagg bench serve --base-url URL`: the same workloads against any OpenAI-compatible server.

Measured as `vllm bench serve` measures it (`--backend openai` → `/v1/completions`, `openai-chat` →
`/v1/chat/completions`): each request streams (`stream_options.include_usage`); TTFT is the first
SSE chunk carrying text, ITL every gap between later text chunks, E2EL the last chunk's time, all
from the moment the request was sent; output tokens come from the final usage chunk (counted by
our tokenizer when a server sends none). Prompts are sent as text (the workload's token ids
decoded), so any server takes them; the prefix and multi-turn workloads send token-id lists instead
(`/v1/completions` only), so a later turn's prompt is exactly the history's ids. A turn's generated
ids are the `token_ids` a server streams when asked (`return_token_ids`, as vLLM does), else its
text tokenized again. A `disagg serve` answer's `disagg` figures (KV bytes, transfer time, stages,
prefix-cache hits) fill the same sections the in-process benchmark prints; a server's
`usage.prompt_tokens_details.cached_tokens` (OpenAI's, vLLM's) counts as prefix-cache hits.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from disagg_cli import ui
from disagg_cli.bench.metrics import RequestRecord
from disagg_cli.engine.request import Timings
from disagg_cli.errors import UsageError

if TYPE_CHECKING:
    from disagg_cli.bench.runs import RunResult, ServeBenchOptions
    from disagg_cli.bench.workload import BenchRequest
    from disagg_cli.model.tokenizer import Tokenizer

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
REQUEST_TIMEOUT_S = 6 * 3600.0  # vLLM's AIOHTTP_TIMEOUT: a benchmark request may wait long in a queue
CONNECT_TIMEOUT_S = 30.0
TOKEN_ID_WORKLOADS = ("multi-turn", "prefix")  # prompts sent as token ids


@dataclass(frozen=True, slots=True)
class HttpTarget:
    base_url: str
    backend: str = "openai"
    endpoint: str | None = None  # None: the backend's route
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise UsageError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.endpoint is not None and not self.endpoint.startswith("/"):
            raise UsageError(f"--endpoint must be a path starting with /, got {self.endpoint!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + (self.endpoint or BACKENDS[self.backend])


@dataclass(eq=False)
class HttpOutput:
    """One benchmark request's answer over HTTP, in the shape the report reads (as `TimedOutput`)."""

    request_id: str
    prompt_token_ids: list[int]
    output_len: int
    timings: Timings = field(default_factory=Timings)
    token_times_s: list[float] = field(default_factory=list)  # arrival of every chunk with text
    num_output_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # what it generated (the next turn's history)
    state: str = "queued"
    finish_reason: str | None = None
    error: str | None = None
    kv: dict[str, float] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)

    def fail(self, reason: str, message: str) -> None:
        self.state = "failed"
        self.finish_reason = reason
        self.error = message
        self.timings.finish_s = time.perf_counter()

    def record(self) -> RequestRecord:
        t = self.timings
        if self.state != "done" or not self.token_times_s or t.finish_s is None:
            return RequestRecord(False, len(self.prompt_token_ids), 0, error=self.error or f"ended {self.state}")
        times = self.token_times_s
        return RequestRecord(True, len(self.prompt_token_ids), self.num_output_tokens, times[0] - t.arrival_s,
                             t.finish_s - t.arrival_s, tuple(b - a for a, b in zip(times, times[1:], strict=False)))


def payload(target: HttpTarget, model: str, prompt: str | list[int], max_tokens: int, ignore_eos: bool,
            token_ids: bool = False) -> dict[str, Any]:
    """One streamed request; `prompt` as text, or as token ids (`/v1/completions` only), and with
    `token_ids` asking for the generated ids too."""
    body: dict[str, Any] = {"model": model, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if target.backend == "openai-chat":
        assert isinstance(prompt, str), "chat messages are text"
        body |= {"messages": [{"role": "user", "content": prompt}], "max_completion_tokens": max_tokens}
    else:
        body |= {"prompt": prompt, "max_tokens": max_tokens}
    if ignore_eos:
        body["ignore_eos"] = True
    if token_ids:
        body["return_token_ids"] = True
    return body


async def send(client: httpx.AsyncClient, target: HttpTarget, body: dict[str, Any], out: HttpOutput,
               tokenizer: Tokenizer) -> None:
    """Stream one request, stamping every text chunk; never raises but for cancellation."""
    out.timings.arrival_s = time.perf_counter()
    text: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", target.url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:300]
                raise _Failed("http", f"HTTP {response.status_code}: {detail}")
            out.state = "decoding"
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    raise _Failed("error", err.get("message", str(err)) if isinstance(err, dict) else str(err))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("disagg"):
                    _take_figures(out, chunk["disagg"])
                for choice in chunk.get("choices") or []:
                    out.token_ids.extend(int(t) for t in choice.get("token_ids") or ())
                    piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if piece:
                        out.token_times_s.append(time.perf_counter())
                        text.append(piece)
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
        if not out.token_times_s:
            raise _Failed("empty", "the server streamed no text")
        out.timings.first_token_s = out.token_times_s[0]
        out.timings.finish_s = out.token_times_s[-1]
        if not out.token_ids:  # the server sent no ids: the text's, tokenized again
            out.token_ids = tokenizer.encode("".join(text), add_bos=False)
        out.num_output_tokens = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else \
            len(out.token_ids)
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None and "prefix_cached_tokens" not in out.kv:
            out.kv["prefix_cached_tokens"] = float(cached)
        out.state = "done"
    except _Failed as e:
        out.fail(e.reason, e.message)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        out.fail("http", f"{type(e).__name__}: {e}")


class _Failed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _take_figures(out: HttpOutput, figures: dict[str, Any]) -> None:
    """`disagg serve`'s per-request figures → the fields the in-process benchmark fills."""
    for ours, theirs in [("raw_bytes", "kv_raw_bytes"), ("wire_bytes", "kv_wire_bytes"),
                         ("transfer_ms", "kv_transfer_ms"), ("retries", "retries"),
                         ("prefix_cached_tokens", "prefix_cached_tokens"),
                         ("decode_cached_tokens", "decode_cached_tokens")]:
        if figures.get(theirs) is not None:
            out.kv[ours] = float(figures[theirs])
    if figures.get("kv_transfer_ms") and figures.get("kv_hidden_share") is not None:
        out.kv["hidden_ms"] = float(figures["kv_hidden_share"]) * float(figures["kv_transfer_ms"])
    out.timings.stages_ms.update({k: float(v) for k, v in (figures.get("stages_ms") or {}).items()})
    out.workers = dict(figures.get("workers") or {})


def run_http_bench(target: HttpTarget, opts: ServeBenchOptions) -> None:
    """The command with --base-url: the workload(s), each run against the server, the report."""
    from disagg_cli.bench import serve_report
    from disagg_cli.bench.serve import prepare_workloads

    if opts.mode != "disagg" or opts.config is not None or opts.chaos_kill_every_s is not None:
        raise UsageError("--base-url benchmarks a server running elsewhere; --mode, --config and "
                         "--chaos-kill-every start clusters here, so leave them out")
    if opts.workload in TOKEN_ID_WORKLOADS and target.backend != "openai":
        raise UsageError(f"--workload {opts.workload} sends token-id prompts, which only /v1/completions "
                         f"takes: use --backend openai, not {target.backend}")
    tokenizer, workloads = prepare_workloads(opts)
    runs = asyncio.run(_run_all(target, opts.model, tokenizer, workloads, opts))
    serve_report.report({target.backend: runs}, opts)


async def _run_all(target: HttpTarget, model: str, tokenizer: Tokenizer,
                   workloads: list[tuple[float, list[BenchRequest]]], opts: ServeBenchOptions) -> list[RunResult]:
    from disagg_cli.bench.runs import RunResult
    from disagg_cli.coordinator.cluster import available_cpus

    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=opts.max_concurrency or 10_000, max_keepalive_connections=None)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    topology: list[dict[str, object]] = [{"role": target.backend, "address": target.url}]
    results = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        if opts.num_warmups and workloads and workloads[0][1]:
            first = workloads[0][1][0]
            warm = [HttpOutput(f"warmup-{i}", list(first.prompt_ids), first.output_len)
                    for i in range(opts.num_warmups)]
            body = _body(target, model, tokenizer, warm[0], opts)
            await asyncio.gather(*(send(client, target, body, o, tokenizer) for o in warm))
            if any(o.state != "done" for o in warm):
                raise UsageError(f"warm-up request to {target.url} failed: {next(o.error for o in warm if o.error)}")
        for rate, workload in workloads:
            ui.info(f"[{target.backend}] {len(workload)} requests at {rate:g} req/s to {target.url}")
            outputs, duration_s, start_s = await _bench(client, target, model, tokenizer, workload, opts)
            results.append(RunResult(target.backend, rate, workload, outputs, duration_s,  # type: ignore[arg-type]
                                     start_s, topology, len(available_cpus()), base_url=target.base_url))
    return results


def _body(target: HttpTarget, model: str, tokenizer: Tokenizer, out: HttpOutput,
          opts: ServeBenchOptions) -> dict[str, Any]:
    # The cache workloads send ids: decoding and re-encoding a history need not give the same ids.
    as_ids = opts.workload in TOKEN_ID_WORKLOADS
    prompt = out.prompt_token_ids if as_ids else tokenizer.decode(out.prompt_token_ids)
    return payload(target, model, prompt, out.output_len, opts.ignores_eos, token_ids=opts.workload == "multi-turn")


async def _bench(client: httpx.AsyncClient, target: HttpTarget, model: str, tokenizer: Tokenizer,
                 workload: list[BenchRequest], opts: ServeBenchOptions) -> tuple[list[HttpOutput], float, float]:
    """Each request at its send time, a conversation's turns in order (`bench/replay.py`): outputs,
    duration, start."""
    from disagg_cli.bench.replay import replay

    def make(index: int, prompt_ids: list[int]) -> HttpOutput:
        return HttpOutput(f"{target.backend}-{index}", prompt_ids, workload[index].output_len)

    async def one(out: HttpOutput) -> None:
        await send(client, target, _body(target, model, tokenizer, out, opts), out, tokenizer)

    return await replay(workload, make, one, f"{target.backend} requests", opts.max_concurrency)
