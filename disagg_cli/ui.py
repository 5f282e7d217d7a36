"""What a person sees on the terminal: progress bars, status lines, streamed text, byte counts.
The live timing table and the run summary are `timing_table.py`'s.

Progress and status go to stderr and only when stderr is a terminal, so stdout stays clean for
`--json` and for pipes. Nothing here touches the model or sockets.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

err_console = Console(stderr=True, highlight=False)


def is_interactive() -> bool:
    return err_console.is_terminal


def print_error(message: str) -> None:
    # Plain write: one line, no markup interpretation of user text, no wrapping.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def info(message: str) -> None:
    """A status line for people; silent when stderr is not a terminal."""
    if is_interactive():
        err_console.print(f"[dim]{message}[/dim]")


@contextmanager
def pull_progress(name: str) -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A download + extract bar for fetching a named model; None (no drawing) off a terminal."""
    if not is_interactive():
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                label = "downloading" if stage == "download" else "unpacking + sha256"
                tasks[stage] = bar.add_task(f"{label} {name}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update
    info(f"fetched {name}")


@contextmanager
def load_progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A tensors-loaded bar for reading and dequantizing weights; None off a terminal."""
    if not is_interactive():
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("tensors"), console=err_console, transient=True) as bar:
        task = bar.add_task(f"loading {label}", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def stream_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# What a table or summary shows for a value not known (yet).
MISSING = "–"


def human_bytes(n: float | None) -> str:
    """Decimal units (1 KB = 1000 B), the way link speeds and DESIGN.md's "23 KB per token" read."""
    if n is None:
        return MISSING
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if round(n, 1) < 1000 or unit == "TB":
            break
    return f"{n:.1f} {unit}"
