"""The `disagg generate` command: prompts in, text out, with timings.

1. gather prompts (arguments, a file, or stdin), optionally wrapped in the model's chat template;
2. pick where they run: a local 1 prefill + 1 decode cluster started here (the default), a
   `--config` topology started here, running workers (`--prefill`/`--decode`, `--colocated-addr`),
   one colocated worker (`--colocated`), or this process's own engine (`--in-process`);
3. run all prompts at once; stream the first unfinished one's text to stdout as it is produced
   (later ones are held so outputs never interleave), or collect it for `--json`; a live timing
   table on stderr when it is a terminal;
4. print per-request timings (stderr) or one JSON object per prompt (stdout); stop what was started.
Ctrl-C or SIGTERM at any point: the requests still running are aborted on their workers (their
KV blocks freed), what was started is stopped, and the command exits 130 within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from disagg_cli import timing_table, ui
from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.coordinator.options import ServeOptions
from disagg_cli.coordinator.placement import InProcess
from disagg_cli.coordinator.service import CoordinatorService, ServiceConfig
from disagg_cli.coordinator.stream import RequestStream
from disagg_cli.engine.request import RequestOutput
from disagg_cli.errors import DisaggError, UsageError
from disagg_cli.model.registry import resolve_model
from disagg_cli.model.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:  # torch stays out of the coordinator's process unless --in-process
    from disagg_cli.model.loader import LoadedModel

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class GenerateOptions:
    model: str
    cache_dir: Path
    runtime: RuntimeConfig
    sampling: SamplingParams
    engine: EngineConfig
    chat: bool = False
    system: str | None = None
    json_output: bool = False
    serve: ServeOptions = field(default_factory=ServeOptions)


def read_prompts(args: list[str], file: Path | None) -> list[str]:
    """Arguments, else the file, else stdin ("-" as an argument also means stdin).

    A file or stdin holds one prompt per line; in a `.jsonl` file each line is a JSON string or
    an object with a "prompt" key, so prompts may span several lines.
    """
    prompts = [a for a in args if a != "-"]
    if file is not None:
        if not file.is_file():
            raise UsageError(f"--file {file}: no such file")
        prompts += _parse_lines(file.read_text(encoding="utf-8"), jsonl=file.suffix == ".jsonl")
    if "-" in args or (not prompts and file is None and not sys.stdin.isatty()):
        prompts += _parse_lines(sys.stdin.read(), jsonl=False)
    if not prompts:
        raise UsageError("no prompt given: pass one as an argument, with --file, or on stdin")
    return prompts


def _parse_lines(text: str, jsonl: bool) -> list[str]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"line {n} of the .jsonl file is not JSON: {e.msg}") from e
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise UsageError(f"line {n} of the .jsonl file has no string 'prompt'")
        prompts.append(prompt)
    return prompts


def prepare(model_spec: str, cache_dir: Path, runtime: RuntimeConfig) -> tuple[LoadedModel, Tokenizer]:
    from disagg_cli.model.loader import load_model

    with ui.pull_progress(model_spec) as on_pull:
        path = resolve_model(model_spec, cache_dir, on_pull)
    tokenizer = load_tokenizer(path)
    with ui.load_progress(path.name) as on_load:
        loaded = load_model(path, runtime, on_load, cache_dir=cache_dir)
    ui.info(f"{loaded.runtime.dtype}: {loaded.dtype_reason}; weights {loaded.runtime.quantization}: "
            f"{loaded.quantization_reason}; KV {loaded.runtime.kv_cache_dtype}: {loaded.kv_cache_dtype_reason}"
            + (f"; {loaded.kernel_reason}" if loaded.kernel_reason else ""))
    return loaded, tokenizer


def chat_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    """`--chat`: the prompt as the user's message, after `--system`'s if given."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def run_generate(prompts: list[str], opts: GenerateOptions) -> list[RequestOutput]:
    match opts.serve.placement:
        case InProcess():
            requests = _run_in_process(prompts, opts)
        case _:  # workers started here or running elsewhere, through the coordinator service
            requests = _run_served(prompts, opts)
    failed = [r for r in requests if r.state == "failed"]
    if failed:
        first = failed[0]
        raise DisaggError(f"{len(failed)} of {len(requests)} requests failed; {first.request_id}: {first.error}")
    return requests


def _run_in_process(prompts: list[str], opts: GenerateOptions) -> list[RequestOutput]:
    """This process's own batched engine: the exactness reference, and handy for debugging."""
    from disagg_cli.engine.engine import LLMEngine
    from disagg_cli.engine.single import check_context

    loaded, tokenizer = prepare(opts.model, opts.cache_dir, opts.runtime)
    requests = []
    for i, prompt in enumerate(prompts):
        text = tokenizer.apply_chat_template(chat_messages(prompt, opts.system)) if opts.chat else prompt
        ids = tokenizer.encode(text)
        check_context(loaded, len(ids), opts.sampling.max_tokens)  # refuse before any work is done
        requests.append(RequestOutput(f"req-{i}", prompt, ids, opts.sampling, tokenizer))
    engine = LLMEngine(loaded, opts.engine)
    by_id = {}
    for out in requests:
        engine.add_request(out.request_id, out.prompt_token_ids, opts.sampling, tokenizer.eos_token_ids)
        out.timings.arrival_s = time.perf_counter()
        by_id[out.request_id] = out
    printer = _OrderedPrinter(requests, opts.json_output)
    while engine.has_unfinished():
        for event in engine.step():
            out = by_id[event.request_id]
            printer.text(out, out.append(event.token_id))
            if out.is_finished:
                printer.end(out)
                if event.finish_reason is None:
                    engine.abort(out.request_id)  # a stop string the engine cannot see
        printer.flush()
    return requests


def _run_served(prompts: list[str], opts: GenerateOptions) -> list[RequestOutput]:
    """Through workers, by way of the coordinator service: started here (the default, --config,
    --colocated) or running. Every prompt is checked before any worker starts."""
    service = CoordinatorService(ServiceConfig(opts.model, opts.cache_dir, opts.runtime, opts.engine, opts.serve,
                                               wait_for_workers=True))
    service.prepare()  # the tokenizer and the model's context; the coordinator holds no weights
    prompt_ids = []
    for prompt in prompts:
        ids = service.tokenize(service.render_chat(chat_messages(prompt, opts.system)) if opts.chat else prompt)
        service.validate(ids, opts.sampling)  # refuse before any worker starts
        prompt_ids.append(ids)
    return _run_until_signal(_serve(service, prompts, prompt_ids, opts))


def _run_until_signal(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, with SIGTERM taken as Ctrl-C is: `main` is cancelled once, so its
    `finally` aborts the requests and stops the workers, then `KeyboardInterrupt` (exit 130).

    (`cli.main`'s own SIGTERM handler raises `KeyboardInterrupt` wherever the loop happens to be,
    which may be inside a zmq callback; asyncio.run then cancels every task at once, the requests'
    own ones beside the task that was to abort them in order.)"""
    terminated = False

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal terminated
            if not terminated:  # a second SIGTERM must not interrupt the aborts of the first
                terminated = True
                task.cancel()

        with contextlib.suppress(NotImplementedError):  # no loop signal handlers on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        return await main

    previous = signal.getsignal(signal.SIGTERM)
    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)  # the loop's close put back SIG_DFL, not this


async def _serve(service: CoordinatorService, prompts: list[str], prompt_ids: list[list[int]],
                 opts: GenerateOptions) -> list[RequestOutput]:
    await service.start()  # ... and its worker rows are filled in for the live table
    streams: list[RequestStream] = []
    try:
        streams = [service.submit(ids, opts.sampling, request_id=f"req-{i}", prompt_text=prompt)
                   for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids, strict=True))]
        requests: list[RequestOutput] = [stream.out for stream in streams]
        printer = _OrderedPrinter(requests, opts.json_output)

        async def one(stream: RequestStream) -> None:
            async for delta in stream:
                printer.text(stream.out, delta.text)
                if delta.is_last:
                    printer.end(stream.out)
                printer.flush()

        with timing_table.live_table(requests, enabled=ui.is_interactive() and not opts.json_output) as table:
            def show_workers() -> None:  # the service's latest heartbeat answers
                table.workers = {w.address: (w.role, w.stats) for w in service.workers()}
                table.planner = service.planner.reasons() if service.planner is not None else {}

            async def watch_workers() -> None:
                while True:
                    show_workers()
                    await asyncio.sleep(0.5)

            watcher = asyncio.create_task(watch_workers())
            try:
                await asyncio.gather(*(one(stream) for stream in streams))
            finally:
                watcher.cancel()
            show_workers()
            table.refresh()
    finally:
        # Ctrl-C: abort what still runs on its workers, all at once (each abort may wait on a send).
        for stream in streams:
            stream.cancel()
        for stream in streams:
            await stream.aclose()
        await service.stop()
    if not opts.json_output:
        if ui.is_interactive():
            if len(requests) > 1:
                ui.err_console.print(timing_table.summary_table(requests))
        else:
            for line in timing_table.plain_summary_lines(requests):
                sys.stderr.write(line + "\n")
    return requests


class _OrderedPrinter:
    """Prints requests in prompt order: the first unfinished one streams live, later ones are
    held until it is done (on a terminal), so concurrent outputs never interleave."""

    def __init__(self, requests: list[RequestOutput], json_output: bool) -> None:
        self.pending = list(requests)
        self.held: dict[str, list[str]] = {r.request_id: [] for r in requests}
        self.json_output = json_output
        self.multi = len(requests) > 1
        self.header_done: set[str] = set()
        self.ended: set[str] = set()

    def text(self, out: RequestOutput, text: str) -> None:
        if text:
            self.held[out.request_id].append(text)

    def end(self, out: RequestOutput) -> None:
        """All of `out`'s text has been given (its output may finish before its last text is read)."""
        self.ended.add(out.request_id)

    def flush(self) -> None:
        while self.pending:
            head = self.pending[0]
            if not self.json_output:
                if self.multi and head.request_id not in self.header_done:
                    ui.info(f"── {head.request_id}: {head.prompt[:70]!r}")
                    self.header_done.add(head.request_id)
                ui.stream_text("".join(self.held[head.request_id]))
                self.held[head.request_id].clear()
            if head.request_id not in self.ended:
                return
            self.pending.pop(0)
            if self.json_output:
                print(json.dumps(head.result(), ensure_ascii=False), flush=True)
            else:
                ui.stream_text("\n")
                ui.info(summary_line(head))


def summary_line(out: RequestOutput) -> str:
    r = out.result()
    parts = [f"{r['prompt_tokens']} prompt + {len(out.token_ids)} output tokens",
             f"finish={r['finish_reason']}"]
    if r["ttft_ms"] is not None:
        parts.append(f"TTFT {r['ttft_ms']:.0f} ms")
    if r["tpot_ms"] is not None:
        parts.append(f"TPOT {r['tpot_ms']:.1f} ms ({r['decode_tokens_per_s']:.1f} tok/s)")
    return "[" + ", ".join(parts) + "]"
