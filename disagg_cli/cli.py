"""The `disagg` command line: parse flags, build frozen configs, call in. No logic lives here.

Every expected failure (`DisaggError`, a bad flag) ends as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from disagg_cli import ui
from disagg_cli.cli_bench import bench_app
from disagg_cli.cli_options import ModelOpt, cache_dir, placement_options, worker_options
from disagg_cli.cli_serve import serve
from disagg_cli.cli_workers import colocated_worker, decode_worker, prefill_worker, run_worker
from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.options import ServeOptions
from disagg_cli.errors import DisaggError, Interrupted, UsageError
from disagg_cli.worker_settings import WorkerSettings

app = typer.Typer(
    name="disagg",
    help="Serve a real LLM with prefill-decode disaggregation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
model_app = typer.Typer(help="Named models: list, inspect, fetch.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")


@app.command()
@worker_options()
@placement_options(in_process=True)
def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts; '-' reads stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="One prompt per line; .jsonl: JSON.")] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate per prompt.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 keeps all.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling (per request).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable); not printed.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past end-of-sequence.")] = False,
    chat: Annotated[bool, typer.Option(help="Wrap each prompt in the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message for --chat.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per prompt on stdout.")] = False,
    *, settings: WorkerSettings, serve: ServeOptions,
) -> None:
    """Generate text for prompts, streaming it as it is produced.

    With no addresses, starts a local 1 prefill + 1 decode cluster and stops it afterwards."""
    from disagg_cli.generate import GenerateOptions, read_prompts, run_generate

    opts = GenerateOptions(
        model=model,
        cache_dir=cache_dir(),
        runtime=settings.runtime(),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos),
        engine=settings.engine(),
        chat=chat,
        system=system,
        json_output=json_output,
        serve=replace(serve, kv_codec=settings.kv_codec, elastic=settings.elastic),
    )
    if system is not None and not chat:
        raise UsageError("--system only applies with --chat")
    try:
        run_generate(read_prompts(prompts or [], file), opts)
    except KeyboardInterrupt:
        # Raised out of asyncio.run once every request task has sent its aborts; Click would
        # otherwise swallow it and exit 0.
        raise Interrupted("interrupted; in-flight requests were aborted on their workers") from None


keys_app = typer.Typer(help="CurveZMQ keys for authenticated, encrypted worker traffic.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(directory: Annotated[Path, typer.Argument(help="Folder to write the key pairs into.")]) -> None:
    """Write a key pair per role and an allowed/ folder of their public keys."""
    from disagg_cli.keys import generate_keys

    for path in generate_keys(directory):
        print(path)


@model_app.command("list")
def model_list(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Named models and whether they are in the local cache."""
    from disagg_cli.model.registry import REGISTRY, cached_path, is_cached

    cache = cache_dir()
    rows: list[dict[str, Any]] = [{"name": e.name, "cached": is_cached(e, cache), "size_bytes": e.size_bytes,
             "path": str(cached_path(e, cache)), "source": f"pypi:{e.pypi_package}=={e.pypi_version}",
             "description": e.description} for e in REGISTRY.values()]
    if json_output:
        print(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "cached", "size", "source", "description")
    for r in rows:
        table.add_row(r["name"], "yes" if r["cached"] else "no", f"{r['size_bytes'] / 1e6:.0f} MB",
                      r["source"], r["description"])
    Console().print(table)


@model_app.command("pull")
def model_pull(name: Annotated[str, typer.Argument(help="A model name from `disagg model list`.")]) -> None:
    """Fetch a named model into the local cache (checks its sha256)."""
    from disagg_cli.model.registry import REGISTRY, pull

    if name not in REGISTRY:
        raise UsageError(f"unknown model {name!r}; known names: {', '.join(REGISTRY)}")
    with ui.pull_progress(name) as progress:
        path = pull(REGISTRY[name], cache_dir(), progress)
    print(path)


@model_app.command("info")
def model_info(
    model: Annotated[str, typer.Argument(help="A model name, a .gguf file or a checkpoint folder.")],
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Architecture, parameters, stored dtype, KV bytes per token and fingerprint of a model."""
    from disagg_cli.model.inspect import describe_model

    info = describe_model(model, cache_dir())
    if json_output:
        print(json.dumps(info))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


# After `generate`, so `disagg --help` lists the main job first.
app.command("serve")(serve)
app.command("prefill-worker")(prefill_worker)
app.command("decode-worker")(decode_worker)
app.command("colocated-worker")(colocated_worker)
app.command("run-worker", hidden=True)(run_worker)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: run the app and turn expected failures into one line and an exit code."""
    # SIGTERM ends a front end (generate, bench) as Ctrl-C does: its requests are aborted and the
    # workers it started are stopped, not orphaned. Worker commands install their own handler.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app(prog_name="disagg", standalone_mode=False)
    except DisaggError as e:
        ui.print_error(str(e))
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        ui.print_error("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:
        # Click's usage errors (bad option, bad value); typer may vendor its own click, so match
        # on behaviour rather than on a class from one particular click.
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `disagg` or `disagg model`: show help
            sys.stderr.write(e.format_message() + "\n")
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        ui.print_error(e.format_message().replace("\n", " ") + hint)
        sys.exit(e.exit_code)
