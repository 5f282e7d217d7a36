"""The live timing table and the run summary, as `disagg generate` and `disagg serve` draw them.

One row per request (`request_facts`: its tokens, stage times, KV sizes, TTFT/TPOT), the workers
under it (`worker_table`), drawn live on stderr while requests run (`live_table`, with streamed
stdout kept above it), and the run's totals at the end (`summary_table`, or `plain_summary_lines`
off a terminal). Separate from `ui.py`, which holds the console, status lines and progress bars
every command uses; this is the one view that reads requests' timings.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO, cast

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from disagg_cli.stats import percentile
from disagg_cli.ui import MISSING, err_console, human_bytes

if TYPE_CHECKING:  # only attribute access at run time; keeps tokenizers out of CLI start-up
    from disagg_cli.engine.request import RequestOutput

_STATE_STYLE = {"done": "green", "failed": "red", "queued": "dim"}


def _num(x: float | None, fmt: str = ".1f") -> str:
    return MISSING if x is None else format(x, fmt)


def _short_address(address: str | None, missing: str) -> str:
    if not address:
        return missing
    scheme, sep, rest = address.partition("://")
    # ipc paths are long and only the file name tells two workers apart.
    return rest.rsplit("/", 1)[-1] if sep and scheme == "ipc" else rest if sep else address


def _workers(r: RequestOutput, arrow: str = "→", missing: str = MISSING) -> str:
    w = r.workers
    if w.get("colocated") or not w:
        return _short_address(w.get("colocated"), missing)
    return f"{_short_address(w.get('prefill'), missing)}{arrow}{_short_address(w.get('decode'), missing)}"


def request_facts(r: RequestOutput) -> dict[str, float | None]:
    """One request's numbers, None where not known yet.

    Reads fields one key at a time (never iterating the dicts, as `result()` does) because the
    live refresh thread calls this while the coordinator is still filling them in.
    """
    t, stages, kv = r.timings, r.timings.stages_ms, r.kv
    n = len(r.token_ids)
    e2e = t.e2e_ms()
    raw, wire = kv.get("raw_bytes"), kv.get("wire_bytes")
    transfer = kv.get("transfer_ms", stages.get("kv_transfer_ms"))
    hidden = kv.get("hidden_ms")
    return {
        "prompt_tokens": len(r.prompt_token_ids),
        "output_tokens": n,
        "queue_ms": stages.get("queue_ms"),
        "prefill_ms": stages.get("prefill_ms"),
        "kv_raw_bytes": raw,
        "kv_wire_bytes": wire,
        "kv_ratio": raw / wire if raw is not None and wire else None,
        "transfer_ms": transfer,
        "hidden_pct": 100 * hidden / transfer if hidden is not None and transfer else None,
        "ttft_ms": t.ttft_ms(),
        "tpot_ms": t.tpot_ms(n),
        "tokens_per_s": n / e2e * 1e3 if e2e else None,  # same definition as RequestOutput.result()
    }


def request_table(requests: list[RequestOutput]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("id", overflow="ellipsis", no_wrap=True)
    table.add_column("state")
    for name in ("prompt tok", "out tok", "queue ms", "prefill ms", "KV raw", "KV wire", "ratio",
                 "transfer ms", "TTFT ms", "TPOT ms", "tok/s"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("workers", overflow="ellipsis", no_wrap=True)
    for r in list(requests):  # a copy: the coordinator may append while we draw
        f = request_facts(r)
        transfer = _num(f["transfer_ms"])
        if f["transfer_ms"] is not None and f["hidden_pct"] is not None:
            transfer += f" (hidden {f['hidden_pct']:.0f}%)"
        table.add_row(
            r.request_id, Text(r.state, style=_STATE_STYLE.get(r.state, "")),
            str(f["prompt_tokens"]), str(f["output_tokens"]), _num(f["queue_ms"]), _num(f["prefill_ms"]),
            human_bytes(f["kv_raw_bytes"]), human_bytes(f["kv_wire_bytes"]),
            MISSING if f["kv_ratio"] is None else f"{f['kv_ratio']:.2f}×", transfer,
            _num(f["ttft_ms"]), _num(f["tpot_ms"]), _num(f["tokens_per_s"]), _workers(r),
        )
    return table


class _StdoutAboveLive:
    """Stands in for sys.stdout while the table is drawn on the same terminal.

    Finished lines are printed above the table; the unfinished last line is drawn as the live
    region's first row, so streamed tokens show at once. (Rich's own proxy prints every flush as
    a whole line, which splits a token stream into one line per token.)
    """

    def __init__(self, console: Console, real: TextIO) -> None:
        self._console = console
        self._real = real
        self.partial = ""

    def write(self, text: str) -> int:
        done, newline, self.partial = (self.partial + text).rpartition("\n")
        if newline:
            self._console.print(Text(done), soft_wrap=True)  # soft wrap: copy-paste gets the real line
        return len(text)

    def flush(self) -> None:  # the partial line shows on the next refresh
        pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer, …
        return getattr(self._real, name)


class LiveTable:
    """The table drawn while requests run; built disabled, every method is a no-op."""

    def __init__(self, requests: list[RequestOutput]) -> None:
        self.requests = requests  # held by reference: rows appended later are drawn too
        # Per worker (address → heartbeat stats), set by whoever polls the workers: shown under
        # the requests so queues and free KV blocks are visible while requests wait for memory.
        self.workers: dict[str, tuple[str, dict[str, float]]] = {}
        self.planner: dict[str, str] = {}  # address → why the planner keeps or changes its role (--planner slo)
        self._live: Live | None = None
        self._stdout: _StdoutAboveLive | None = None

    def refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def renderable(self) -> RenderableType:
        table: RenderableType = request_table(self.requests)
        if self.workers:
            table = Group(table, worker_table(self.workers, self.planner))
        partial = self._stdout.partial if self._stdout is not None else ""
        return Group(Text(partial), table) if partial else table


def worker_table(workers: dict[str, tuple[str, dict[str, float]]], planner: dict[str, str] | None = None) -> Table:
    """One row per worker: role, address, waiting/running requests, queued reservations, KV blocks,
    and with a planner, why it has its role."""
    table = Table("worker", "role", "waiting", "running", "queued reserve", "KV blocks free", box=None,
                  title_justify="left")
    if planner:
        table.add_column("planner", overflow="fold")
    for address, (role, stats) in workers.items():
        cells = {k: MISSING if k not in stats else f"{stats[k]:.0f}"
                 for k in ("waiting", "running", "queued_reservations")}
        blocks = (f"{stats['free_blocks']:.0f}/{stats['num_blocks']:.0f}"
                  if "free_blocks" in stats and "num_blocks" in stats else MISSING)
        row = [address.removeprefix("tcp://"), role, cells["waiting"], cells["running"],
               cells["queued_reservations"] if role == "decode" else MISSING, blocks]
        table.add_row(*row, *([planner.get(address, MISSING)] if planner else []))
    return table


@contextmanager
def live_table(requests: list[RequestOutput], enabled: bool, *, console: Console | None = None,
               redirect_stdout: bool | None = None) -> Iterator[LiveTable]:
    """A Rich live table on stderr for the duration of the block; the final table stays.

    stdout is routed above the table only when it is a terminal too (None: detect); when piped it
    is left alone, since the table on stderr cannot garble it.
    """
    table = LiveTable(requests)
    if not enabled:
        yield table
        return
    console = console or err_console
    if redirect_stdout is None:
        redirect_stdout = console.is_terminal and sys.stdout.isatty()
    table._live = Live(get_renderable=table.renderable, console=console, refresh_per_second=4,
                       transient=False, redirect_stdout=False)
    real_stdout = sys.stdout
    with table._live:
        if redirect_stdout:
            table._stdout = _StdoutAboveLive(console, real_stdout)
            sys.stdout = cast(TextIO, table._stdout)
        try:
            yield table
        finally:
            if table._stdout is not None:
                sys.stdout = real_stdout
                if table._stdout.partial:  # above the final table, not after it
                    table._stdout.write("\n")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


_COUNTS = {"requests", "finished", "failed", "prompt_tokens", "output_tokens", "kv_raw_bytes", "kv_wire_bytes"}


def summarize(requests: list[RequestOutput]) -> dict[str, float | None]:
    """The run's totals, keyed as the plain `total` line prints them; None where nothing is known."""
    facts = [request_facts(r) for r in requests]

    def known(key: str) -> list[float]:
        return [v for f in facts if (v := f[key]) is not None]

    both = [f for f in facts if f["kv_raw_bytes"] is not None and f["kv_wire_bytes"]]
    ends = [r.timings.finish_s for r in requests if r.timings.finish_s is not None]
    # Aggregate throughput as vLLM's benchmark reports it: all output tokens over the run's span.
    span_s = max(ends) - min(r.timings.arrival_s for r in requests) if ends else 0.0
    num_output_tokens = sum(len(r.token_ids) for r in requests)
    out: dict[str, float | None] = {
        "requests": len(requests),
        "finished": sum(r.state == "done" for r in requests),
        "failed": sum(r.state == "failed" for r in requests),
    }
    for key in ("ttft_ms", "tpot_ms"):
        v = known(key)
        out |= {f"{key}_mean": _mean(v), f"{key}_p50": percentile(v, 50), f"{key}_p99": percentile(v, 99)}
    return out | {
        "output_tokens": num_output_tokens,
        "tokens_per_s": num_output_tokens / span_s if span_s > 0 else None,
        "kv_raw_bytes": sum(known("kv_raw_bytes")),
        "kv_wire_bytes": sum(known("kv_wire_bytes")),
        # Only requests reporting both sizes, so a missing wire size cannot inflate the ratio.
        "kv_ratio": sum(f["kv_raw_bytes"] or 0 for f in both) / sum(f["kv_wire_bytes"] or 0 for f in both)
        if both else None,
        "transfer_ms_mean": _mean(known("transfer_ms")),
        "hidden_pct_mean": _mean(known("hidden_pct")),
    }


def summary_table(requests: list[RequestOutput]) -> Table:
    s = summarize(requests)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("requests", f"{s['requests']} ({s['finished']} finished, {s['failed']} failed)")
    for name in ("TTFT", "TPOT"):
        key = name.lower() + "_ms"
        table.add_row(f"{name} ms mean / p50 / p99", " / ".join(_num(s[f"{key}_{x}"]) for x in ("mean", "p50", "p99")))
    table.add_row("output tokens", str(s["output_tokens"]))
    table.add_row("throughput tok/s", _num(s["tokens_per_s"]))
    ratio = MISSING if s["kv_ratio"] is None else f"{s['kv_ratio']:.2f}×"
    table.add_row("KV raw / wire", f"{human_bytes(s['kv_raw_bytes'])} / {human_bytes(s['kv_wire_bytes'])} ({ratio})")
    hidden = MISSING if s["hidden_pct_mean"] is None else f"{s['hidden_pct_mean']:.0f}%"
    table.add_row("KV transfer ms mean (hidden)", f"{_num(s['transfer_ms_mean'])} ({hidden})")
    return table


def _plain_pairs(values: dict[str, float | None]) -> str:
    # For scripts and logs: ASCII "-" for unknown, counts and bytes as integers.
    return " ".join(f"{k}={'-' if v is None else format(v, '.0f' if k in _COUNTS else '.3f')}"
                    for k, v in values.items())


def plain_summary_lines(requests: list[RequestOutput]) -> list[str]:
    """`key=value` lines, one per request then one `total` line, for when stderr is not a terminal."""
    lines = [f"request id={r.request_id} state={r.state} {_plain_pairs(request_facts(r))} "
             f"workers={_workers(r, arrow='->', missing='-')}" for r in requests]
    return [*lines, "total " + _plain_pairs(summarize(requests))]
