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
DISAGG_THRESHOLD_HELP = ("Selective disaggregation: prompts whose part not cached on their decode worker is at "
                         "most this many tokens are prefilled there, with no transfer; 0: never; auto: when that is "
                         "sooner than a prefill worker and stalls decoding at most a few steps (from the workers' "
                         "measured speeds).")
DisaggThresholdOpt = Annotated[str, typer.Option("--disagg-threshold", help=DISAGG_THRESHOLD_HELP)]
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


def with_options(options: list[inspect.Parameter], param: str,
                  build: Callable[[dict[str, Any]], Any]) -> Callable[[Command], Command]:
    """Add `options` (keyword parameters whose annotations are Typer options) to a command's signature
    and hand the command, as `param`, what `build` makes of their values instead of each value."""

    def wrap(command: Command) -> Command:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != param]
        hints = {k: v for k, v in typing.get_type_hints(command, include_extras=True).items() if k != param}
        hints.update({o.name: o.annotation for o in options})

        @functools.wraps(command)
        def with_options(*args: Any, **kwargs: Any) -> Any:
            values = {o.name: kwargs.pop(o.name) for o in options}
            return command(*args, **{param: build(values)}, **kwargs)

        with_options.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name]) for p in own]
            + options)
        with_options.__annotations__ = hints
        return with_options  # type: ignore[return-value]

    return wrap


def keyword_option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def worker_options(role: str | None = None) -> Callable[[Command], Command]:
    """Give a command every worker setting as an option (those of `role` only, for a worker command),
    grouped in `--help`; the command takes `settings: WorkerSettings` instead of one parameter each."""
    rows = [s for s in WORKER_SETTINGS if role is None or role in s.roles]
    return with_options([keyword_option(s.name, _option(s.name), DEFAULTS[s.name]) for s in rows], "settings",
                         lambda values: WorkerSettings(**values))


PLACEMENT_PANEL = "Where the workers run"
COORDINATOR_PANEL = "Coordinator: routing and deadlines"


PLANNER_PANEL = "Coordinator: planner (elastic roles) and admission"


def planner_option_list(admission: bool = False) -> list[inspect.Parameter]:
    """`--planner`, `--slo-ttft-ms`, `--slo-tpot-ms`, `--planner-interval` (and `--admission` for a
    server), with `PlannerConfig`'s defaults; `planner_config` makes the config of their values."""
    from disagg_cli.coordinator.planner import ADMISSIONS, PLANNERS, PlannerConfig

    d, kw = PlannerConfig(), keyword_option

    def opt(help: str) -> Any:
        return typer.Option(help=help, rich_help_panel=PLANNER_PANEL)

    options = [
        kw("planner", Annotated[str, opt(f"{' or '.join(PLANNERS)}: slo switches workers between prefill, decode "
                                         "and colocated in place to meet --slo-ttft-ms and --slo-tpot-ms (workers "
                                         "load for every role); off keeps the topology as started.")], d.mode),
        kw("slo_ttft_ms", Annotated[float, opt("Target time to first token (ms) for the planner (and "
                                               "`disagg serve --admission slo`).")], d.slo_ttft_ms),
        kw("slo_tpot_ms", Annotated[float, opt("Target time per output token (ms) for the planner.")], d.slo_tpot_ms),
        kw("planner_interval", Annotated[float, opt("Seconds between the planner's decisions (each must hold "
                                                    f"{d.hold_ticks} in a row; none within {d.min_dwell_s:g} s of "
                                                    "the last switch).")], d.interval_s),
    ]
    if admission:
        options.append(kw("admission", Annotated[str, opt(
            f"{' or '.join(ADMISSIONS)}: slo answers 503 with Retry-After to a request predicted to miss "
            "--slo-ttft-ms behind the prompts queued, instead of queueing it.")], d.admission))
    return options


def planner_config(v: dict[str, Any]) -> Any:
    """The `PlannerConfig` of `planner_option_list`'s values."""
    from disagg_cli.coordinator.planner import PlannerConfig

    return PlannerConfig(mode=v["planner"], slo_ttft_ms=v["slo_ttft_ms"], slo_tpot_ms=v["slo_tpot_ms"],
                         interval_s=v["planner_interval"], admission=v.get("admission", "off"))


def planner_options() -> Callable[[Command], Command]:
    """The planner's options for a command that builds its own service (`bench serve`): it takes
    them as one `planner: PlannerConfig`."""
    return with_options(planner_option_list(), "planner", planner_config)


def placement_options(in_process: bool = False, admission: bool = False) -> Callable[[Command], Command]:
    """Give a front end (`generate`, `serve`) the options that pick where its workers run (with
    `--in-process` where it can run in its own process) and how its coordinator routes and times
    requests, and its planner (with `--admission` for a server); the command takes them as one
    `serve: ServeOptions` (whose `kv_codec` it fills in from its worker settings)."""
    from disagg_cli.coordinator.options import CoordinatorConfig, ServeOptions
    from disagg_cli.coordinator.placement import DEFAULT_MAX_WORKER_RESTARTS, placement_from_flags

    def opt(*decls: str, help: str, panel: str = PLACEMENT_PANEL, **kw: Any) -> Any:
        return typer.Option(*decls, help=help, rich_help_panel=panel, **kw)

    d, kw = DEFAULT_DEADLINES, keyword_option
    options = [
        kw("prefill", Annotated[list[str] | None, opt(help="Address (host:port) of a running prefill worker; "
                                                              "repeatable. Needs --decode.")], None),
        kw("decode", Annotated[list[str] | None, opt(help="Address of a running decode worker; repeatable.")],
                 None),
        kw("colocated_addr", Annotated[str | None, opt(help="Address of a running colocated worker.")], None),
        kw("config", Annotated[Path | None, opt("--config", help="Start this TOML topology (see "
                                                                       "configs/).")], None),
        kw("colocated", Annotated[bool, opt(help="Start one worker doing both phases (the baseline).")], False),
        kw("prefill_replicas", Annotated[int | None, opt(help="Prefill workers to start (default 1, or the "
                                                                    "topology's).")], None),
        kw("decode_replicas", Annotated[int | None, opt(help="Decode workers to start (default 1, or the "
                                                                   "topology's).")], None),
        kw("ray", Annotated[str | None, opt("--ray", metavar="ADDRESS|auto", help="Run the workers as Ray "
                                                  "actors in the Ray cluster at ADDRESS (the head node's host:port; "
                                                  "auto: RAY_ADDRESS or the one on this machine). Needs "
                                                  "disagg-cli[ray].")], None),
        kw("keys", Annotated[Path | None, opt(help="CurveZMQ keys to reach workers started with --keys; with "
                                                        "--ray, the workers' own (the same folder on every "
                                                        "node).")], None),
        kw("max_worker_restarts", Annotated[int, opt(help="Start a local worker that exits again, at most this "
                                                          "many times within 10 minutes (back-off 1 s, doubling "
                                                          "to 30 s); 0: never.")], DEFAULT_MAX_WORKER_RESTARTS),
        kw("router", Annotated[str, opt(help="round-robin, least-loaded, or cache-aware (the longest cached "
                                                   "prefix weighed against queued work).",
                                              panel=COORDINATOR_PANEL)], "round-robin"),
        kw("disagg_threshold", Annotated[str, opt("--disagg-threshold", help=DISAGG_THRESHOLD_HELP,
                                                        panel=COORDINATOR_PANEL)], "0"),
        kw("worker_timeout", Annotated[float, opt(help="Seconds of silence after which a worker is dead.",
                                                        panel=COORDINATOR_PANEL)], 10.0),
        kw("connect_timeout", Annotated[float, opt(help="Seconds to wait for every worker's hello.",
                                                         panel=COORDINATOR_PANEL)], 120.0),
        kw("reserve_timeout", ReserveTimeoutOpt, d.reserve_s),
        kw("first_token_timeout", FirstTokenTimeoutOpt, d.first_token_s),
        kw("token_timeout", TokenTimeoutOpt, d.token_s),
        kw("request_timeout", RequestTimeoutOpt, d.request_s),
    ]
    options += planner_option_list(admission)
    if in_process:
        options.append(kw("in_process", Annotated[bool, opt(help="Run in this process's own engine, no workers.")],
                          False))

    def build(v: dict[str, Any]) -> ServeOptions:
        planner = planner_config(v)
        placement = placement_from_flags(
            in_process=v.get("in_process", False), prefill=v["prefill"] or (), decode=v["decode"] or (),
            colocated=v["colocated"], colocated_addr=v["colocated_addr"], config=v["config"], ray=v["ray"],
            keys=v["keys"], prefill_replicas=v["prefill_replicas"], decode_replicas=v["decode_replicas"],
            max_worker_restarts=v["max_worker_restarts"])
        coordinator = CoordinatorConfig(
            policy=v["router"], worker_timeout_s=v["worker_timeout"], handshake_timeout_s=v["connect_timeout"],
            disagg_threshold=disagg_threshold(v["disagg_threshold"]),
            deadlines=Deadlines(v["reserve_timeout"], v["first_token_timeout"], v["token_timeout"],
                                v["request_timeout"]))
        if planner.is_on and v.get("in_process", False):
            raise UsageError("--planner slo switches the roles of workers; --in-process runs none")
        return ServeOptions(placement, coordinator, planner=planner)

    return with_options(options, "serve", build)


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
ReserveTimeoutOpt = Annotated[float, typer.Option(
    "--reserve-timeout", rich_help_panel=COORDINATOR_PANEL,
    help="Seconds a KV reservation may queue for decode memory before the request counts as stalled.")]
FirstTokenTimeoutOpt = Annotated[float, typer.Option(
    "--first-token-timeout", rich_help_panel=COORDINATOR_PANEL,
    help="Seconds from sending a prompt to its first token before it counts as stalled.")]
TokenTimeoutOpt = Annotated[float, typer.Option(
    "--token-timeout", rich_help_panel=COORDINATOR_PANEL,
    help="Seconds between tokens (and from the first token to the KV landing) before a request counts as stalled "
         "and is retried elsewhere.")]
RequestTimeoutOpt = Annotated[float, typer.Option(
    "--request-timeout", rich_help_panel=COORDINATOR_PANEL,
    help="Seconds a request may take in all, retries and waits for a worker to come back included.")]
