"""Option types and helpers the `disagg` commands share (cli.py, cli_workers.py, cli_bench.py, cli_serve.py).

The worker settings (`worker_settings.WORKER_SETTINGS`) are not spelled out per command: `worker_options`
adds them to a command's signature from the table and hands the command one `WorkerSettings`.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from disagg_cli.config import Deadlines
from disagg_cli.errors import UsageError
from disagg_cli.worker_settings import DEFAULTS, WORKER_SETTINGS, WorkerSettings

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="A model name (see `disagg model list`), "
                                       "a .gguf file or a Hugging Face checkpoint folder.")]
DisaggThresholdOpt = Annotated[str, typer.Option(
    "--disagg-threshold", help="Selective disaggregation: prompts whose part not cached on their decode worker is "
                               "at most this many tokens are prefilled there, with no transfer; 0: never; auto: "
                               "when that is sooner than a prefill worker and stalls decoding at most a few steps "
                               "(from the workers' measured speeds).")]
RouterOpt = Annotated[str, typer.Option(help="round-robin, least-loaded, or cache-aware (the longest cached prefix "
                                             "weighed against queued work).")]

Command = TypeVar("Command", bound=Callable[..., Any])
_SETTING_TYPES = typing.get_type_hints(WorkerSettings)
_ROWS = {s.name: s for s in WORKER_SETTINGS}


def _option(name: str) -> Any:
    """The Typer option of one worker setting, as its table row describes it."""
    s = _ROWS[name]
    return Annotated[_SETTING_TYPES[name], typer.Option(*s.flags, help=s.help, rich_help_panel=s.panel)]


# Single settings, for commands that load a model without being a worker (`bench engine`, `bench codec`).
DtypeOpt = _option("dtype")
QuantizationOpt = _option("quantization")
ThreadsOpt = _option("threads")
KernelOpt = _option("kernel")
BlockSizeOpt = _option("block_size")


def worker_options(role: str | None = None) -> Callable[[Command], Command]:
    """Give a command every worker setting as an option (those of `role` only, for a worker command),
    grouped in `--help`; the command takes `settings: WorkerSettings` instead of one parameter each."""
    rows = [s for s in WORKER_SETTINGS if role is None or role in s.roles]

    def wrap(command: Command) -> Command:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "settings"]
        hints = {k: v for k, v in typing.get_type_hints(command, include_extras=True).items() if k != "settings"}
        added = []
        for s in rows:
            annotation = _option(s.name)
            added.append(inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=DEFAULTS[s.name],
                                           annotation=annotation))
            hints[s.name] = annotation

        @functools.wraps(command)
        def with_settings(*args: Any, **kwargs: Any) -> Any:
            values = {s.name: kwargs.pop(s.name) for s in rows}
            return command(*args, settings=WorkerSettings(**values), **kwargs)

        own_positional = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
        own_keyword = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]
        with_settings.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
                        for p in own_positional + own_keyword] + added)
        with_settings.__annotations__ = hints
        return with_settings  # type: ignore[return-value]

    return wrap


def disagg_threshold(text: str) -> int | str:
    """`--disagg-threshold`: a token count >= 0, or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"--disagg-threshold takes a token count >= 0 or auto, got {text!r}")
    return value


def cache_dir() -> Path:
    """Where named models are cached (DISAGG_CACHE_DIR, XDG_CACHE_HOME or ~/.cache)."""
    from disagg_cli.model.registry import default_cache_dir

    return default_cache_dir()


def int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers like 1,8,32, got {text!r}") from None


# A request's progress deadlines (config.Deadlines), shared by every command that sends requests.
DEFAULT_DEADLINES = Deadlines()
ReserveTimeoutOpt = Annotated[float, typer.Option("--reserve-timeout", help="Seconds a KV reservation may queue "
                                                  "for decode memory before the request counts as stalled.")]
FirstTokenTimeoutOpt = Annotated[float, typer.Option("--first-token-timeout", help="Seconds from sending a "
                                                     "prompt to its first token before it counts as stalled.")]
TokenTimeoutOpt = Annotated[float, typer.Option("--token-timeout", help="Seconds between tokens (and from the "
                                                "first token to the KV landing) before a request counts as "
                                                "stalled and is retried elsewhere.")]
RequestTimeoutOpt = Annotated[float, typer.Option("--request-timeout", help="Seconds a request may take in all, "
                                                  "retries and waits for a worker to come back included.")]
