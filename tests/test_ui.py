"""The live timing table and the run summary of `disagg generate`: exact cells, "–" for what is not
known yet, summary arithmetic on hand-made numbers, and streamed stdout while the table is drawn."""

from __future__ import annotations

import io
import re
import sys

import numpy as np
import pytest
import tokenizers
from rich.console import Console
from tokenizers import models, pre_tokenizers, trainers

from disagg_cli.config import SamplingParams
from disagg_cli.engine.request import RequestOutput, Timings
from disagg_cli.model.tokenizer import Tokenizer, load_tokenizer
from disagg_cli.stats import percentile
from disagg_cli.timing_table import (
    live_table,
    plain_summary_lines,
    request_table,
    summarize,
    summary_table,
)
from disagg_cli.ui import human_bytes


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A tiny byte-level BPE written as tokenizer.json and loaded the way a checkpoint is."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["hello world, tiny tables"] * 5, trainer=trainer)
    folder = tmp_path_factory.mktemp("tok")
    backend.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


def make(tok: Tokenizer, rid: str, num_prompt: int, num_out: int, state: str, arrival_s: float = 0.0,
         first_s: float | None = None, finish_s: float | None = None, stages: dict | None = None,
         kv: dict | None = None, workers: dict | None = None) -> RequestOutput:
    r = RequestOutput(rid, "p", list(range(num_prompt)), SamplingParams(max_tokens=64), tok)
    r.token_ids = list(range(num_out))
    r.state = state
    r.timings = Timings(arrival_s=arrival_s, first_token_s=first_s, finish_s=finish_s, stages_ms=stages or {})
    r.kv = kv or {}
    r.workers = workers or {}
    return r


@pytest.fixture
def run(tok: Tokenizer) -> list[RequestOutput]:
    """Times are sums of powers of two, so every figure below is exact in float."""
    return [
        # TTFT 125, TPOT (625 − 125) / 4 = 125, 5 tokens over 625 ms = 8 tok/s.
        make(tok, "req-a", 7, 5, "done", 0.0, 0.125, 0.625, {"queue_ms": 1.5, "prefill_ms": 12.5},
             {"raw_bytes": 24_000, "wire_bytes": 20_000, "transfer_ms": 4.0, "hidden_ms": 3.0},
             {"prefill": "tcp://10.0.0.1:5601", "decode": "tcp://10.0.0.2:5701"}),
        # TTFT 250, TPOT 750 / 8 = 93.75, 9 tokens over 1000 ms = 9 tok/s.
        make(tok, "req-b", 4, 9, "done", 0.25, 0.5, 1.25, {"queue_ms": 0.25, "prefill_ms": 6.0},
             {"raw_bytes": 46_000, "wire_bytes": 23_000, "transfer_ms": 8.0, "hidden_ms": 2.0},
             {"colocated": "ipc:///tmp/disagg/colo-0.sock"}),
        # TTFT 1000, TPOT 1000 / 2 = 500, 3 tokens over 2000 ms = 1.5 tok/s; no KV numbers.
        make(tok, "req-c", 2, 3, "done", 0.0, 1.0, 2.0),
        make(tok, "req-d", 3, 0, "failed", 0.5, None, 0.75),
    ]


def rows(console_text: str) -> dict[str, list[str]]:
    """Rendered table rows by request id, split into cells (columns are 2+ spaces apart)."""
    cells = [re.split(r"\s{2,}", line.strip()) for line in console_text.splitlines()]
    return {c[0]: c for c in cells if c and c[0].startswith("req-")}


def render(renderable: object) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (None, 0, 512, 999, 23_000, 19_166, 1_500_000, 999_960, 2.5e9)] == [
        "–", "0 B", "512 B", "999 B", "23.0 KB", "19.2 KB", "1.5 MB", "1.0 MB", "2.5 GB"]


def test_table_cells(run: list[RequestOutput], tok: Tokenizer) -> None:
    running = make(tok, "req-e", 6, 2, "decoding", 0.0, 0.0625, None, {"queue_ms": 2.0},
                   {"raw_bytes": 512, "transfer_ms": 1.0}, {"prefill": "tcp://h:1"})
    queued = make(tok, "req-q", 3, 0, "queued")
    got = rows(render(request_table([*run, running, queued])))
    assert got["req-a"] == ["req-a", "done", "7", "5", "1.5", "12.5", "24.0 KB", "20.0 KB", "1.20×",
                            "4.0 (hidden 75%)", "125.0", "125.0", "8.0", "10.0.0.1:5601→10.0.0.2:5701"]
    assert got["req-b"] == ["req-b", "done", "4", "9", "0.2", "6.0", "46.0 KB", "23.0 KB", "2.00×",
                            "8.0 (hidden 25%)", "250.0", "93.8", "9.0", "colo-0.sock"]
    assert got["req-d"][-4:] == ["–", "–", "0.0", "–"]  # failed before its first token: 0 tok/s
    # Mid-run: TTFT known, TPOT and tok/s not yet; no wire size means no ratio; half a worker pair.
    assert got["req-e"] == ["req-e", "decoding", "6", "2", "2.0", "–", "512 B", "–", "–", "1.0",
                            "62.5", "–", "–", "h:1→–"]
    assert got["req-q"] == ["req-q", "queued", "3", "0", *["–"] * 9, "–"]


def test_percentile_is_numpy_linear() -> None:
    values = [93.75, 500.0, 125.0, 7.0, 42.0]
    for q in (0, 25, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0


def test_summary_arithmetic(run: list[RequestOutput]) -> None:
    s = summarize(run)
    assert (s["requests"], s["finished"], s["failed"]) == (4, 3, 1)
    # TTFT 125, 250, 1000: p99 = 250 + 0.98 × 750; TPOT 93.75, 125, 500: p99 = 125 + 0.98 × 375.
    assert (s["ttft_ms_mean"], s["ttft_ms_p50"], s["ttft_ms_p99"]) == pytest.approx((1375 / 3, 250.0, 985.0))
    assert (s["tpot_ms_mean"], s["tpot_ms_p50"], s["tpot_ms_p99"]) == pytest.approx((718.75 / 3, 125.0, 492.5))
    assert s["output_tokens"] == 17
    assert s["tokens_per_s"] == 8.5  # 17 tokens from the first arrival (0 s) to the last finish (2 s)
    assert (s["kv_raw_bytes"], s["kv_wire_bytes"]) == (70_000, 43_000)
    assert s["kv_ratio"] == pytest.approx(70 / 43)
    assert (s["transfer_ms_mean"], s["hidden_pct_mean"]) == (6.0, 50.0)

    shown = dict(re.split(r"\s{2,}", line.strip()) for line in render(summary_table(run)).splitlines()
                 if line.strip())
    assert shown == {
        "requests": "4 (3 finished, 1 failed)",
        "TTFT ms mean / p50 / p99": "458.3 / 250.0 / 985.0",
        "TPOT ms mean / p50 / p99": "239.6 / 125.0 / 492.5",
        "output tokens": "17",
        "throughput tok/s": "8.5",
        "KV raw / wire": "70.0 KB / 43.0 KB (1.63×)",
        "KV transfer ms mean (hidden)": "6.0 (50%)",
    }


def test_summary_of_nothing_known(tok: Tokenizer) -> None:
    s = summarize([make(tok, "req-q", 3, 0, "queued")])
    assert [k for k, v in s.items() if v is not None] == ["requests", "finished", "failed", "output_tokens",
                                                         "kv_raw_bytes", "kv_wire_bytes"]
    assert "– / – / –" in render(summary_table([make(tok, "req-q", 3, 0, "queued")]))


def test_plain_lines(run: list[RequestOutput], tok: Tokenizer) -> None:
    lines = plain_summary_lines(run)
    assert len(lines) == 5
    assert lines[0] == (
        "request id=req-a state=done prompt_tokens=7 output_tokens=5 queue_ms=1.500 prefill_ms=12.500 "
        "kv_raw_bytes=24000 kv_wire_bytes=20000 kv_ratio=1.200 transfer_ms=4.000 hidden_pct=75.000 "
        "ttft_ms=125.000 tpot_ms=125.000 tokens_per_s=8.000 workers=10.0.0.1:5601->10.0.0.2:5701")
    assert lines[3] == (
        "request id=req-d state=failed prompt_tokens=3 output_tokens=0 queue_ms=- prefill_ms=- kv_raw_bytes=- "
        "kv_wire_bytes=- kv_ratio=- transfer_ms=- hidden_pct=- ttft_ms=- tpot_ms=- tokens_per_s=0.000 workers=-")
    assert lines[4] == (
        "total requests=4 finished=3 failed=1 ttft_ms_mean=458.333 ttft_ms_p50=250.000 ttft_ms_p99=985.000 "
        "tpot_ms_mean=239.583 tpot_ms_p50=125.000 tpot_ms_p99=492.500 output_tokens=17 tokens_per_s=8.500 "
        "kv_raw_bytes=70000 kv_wire_bytes=43000 kv_ratio=1.628 transfer_ms_mean=6.000 hidden_pct_mean=50.000")
    assert all(line.isascii() for line in lines)  # for scripts and logs
    half = make(tok, "req-e", 1, 0, "reserving", workers={"prefill": "tcp://h:1"})
    assert plain_summary_lines([half])[0].endswith(" ttft_ms=- tpot_ms=- tokens_per_s=- workers=h:1->-")


def stream(pieces: list[str]) -> None:
    for piece in pieces:  # the way ui.stream_text writes tokens
        sys.stdout.write(piece)
        sys.stdout.flush()


def test_streamed_stdout_keeps_whole_lines_above_the_table(run: list[RequestOutput]) -> None:
    # Not a terminal, so the only drawing is the final table: what is above it is exactly what
    # the proxy printed.
    console = Console(file=io.StringIO(), record=True, width=200)
    before = sys.stdout
    with live_table(run, True, console=console, redirect_stdout=True) as table:
        assert sys.stdout is not before
        stream(["Hel", "lo wor", "ld\n", "second ", "line\n\nthi", "rd"])
        assert table.renderable().renderables[0].plain == "third"  # the unfinished line, drawn live
        table.refresh()
    assert sys.stdout is before
    text = console.export_text()
    assert text.startswith("Hello world\nsecond line\n\nthird\n")  # the last partial line ends before the table
    assert set(rows(text)) == {"req-a", "req-b", "req-c", "req-d"}


def test_live_on_a_terminal_redraws_and_keeps_the_final_table(run: list[RequestOutput]) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with live_table(run, True, console=console, redirect_stdout=True) as table:
        stream(["Hel", "lo\n", "par"])
        table.refresh()
        run[3].state = "done"  # a later refresh shows the change
        table.refresh()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "Hello\n" in plain and plain.count("Hello") == 1  # printed once, above the table
    assert rows(plain.rsplit("par\n", 1)[1])["req-d"][1] == "done"  # the table after the last line is current


def test_stdout_left_alone_when_not_redirected(run: list[RequestOutput], capsys: pytest.CaptureFixture[str]) -> None:
    console = Console(file=io.StringIO(), record=True, width=200)
    with live_table(run, True, console=console, redirect_stdout=False):
        stream(["to ", "a pipe\n"])
    assert capsys.readouterr().out == "to a pipe\n"
    assert "to a pipe" not in console.export_text()


def test_disabled_is_a_no_op(run: list[RequestOutput], capsys: pytest.CaptureFixture[str]) -> None:
    console = Console(file=io.StringIO(), record=True, width=200)
    before = sys.stdout
    with live_table(run, False, console=console) as table:
        assert sys.stdout is before
        table.refresh()
        stream(["plain\n"])
    assert console.export_text() == ""
    assert capsys.readouterr().out == "plain\n"


def test_stdout_restored_after_an_error(run: list[RequestOutput]) -> None:
    console = Console(file=io.StringIO(), width=200)
    before = sys.stdout
    with pytest.raises(KeyboardInterrupt), live_table(run, True, console=console, redirect_stdout=True):
        raise KeyboardInterrupt
    assert sys.stdout is before


def test_stdout_not_redirected_by_default_when_it_is_not_a_terminal(run: list[RequestOutput]) -> None:
    # Auto-detection: stdout is captured by pytest (not a tty), so nothing is redirected.
    console = Console(file=io.StringIO(), width=200)
    before = sys.stdout
    with live_table(run, True, console=console):
        assert sys.stdout is before


def test_worker_rows_show_queues_and_free_blocks() -> None:
    from disagg_cli.timing_table import worker_table

    console = Console(record=True, width=200)
    console.print(worker_table({
        "tcp://127.0.0.1:7200": ("decode", {"waiting": 2, "running": 5, "queued_reservations": 3,
                                            "free_blocks": 12, "num_blocks": 728}),
        "tcp://127.0.0.1:7100": ("prefill", {"waiting": 1, "running": 0}),
    }))
    text = console.export_text()
    decode_row = next(line for line in text.splitlines() if "7200" in line).split()
    prefill_row = next(line for line in text.splitlines() if "7100" in line).split()
    assert decode_row == ["127.0.0.1:7200", "decode", "2", "5", "3", "12/728"]
    assert prefill_row == ["127.0.0.1:7100", "prefill", "1", "0", "–", "–"]


def test_worker_rows_show_why_the_planner_gave_each_its_role() -> None:
    from disagg_cli.timing_table import worker_table

    console = Console(record=True, width=200)
    workers: dict[str, tuple[str, dict[str, float]]] = {"tcp://127.0.0.1:7200": ("colocated", {"running": 5.0}),
                                                        "tcp://127.0.0.1:7100": ("prefill", {})}
    console.print(worker_table(workers, {"tcp://127.0.0.1:7200": "decode → colocated: TTFT missed"}))
    text = console.export_text()
    assert "planner" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if "7200" in line)
    assert row.rstrip().endswith("decode → colocated: TTFT missed")
    assert next(line for line in text.splitlines() if "7100" in line).split()[-1] == "–"
    console = Console(record=True, width=200)
    console.print(worker_table(workers))  # no planner: no column
    assert "planner" not in console.export_text()
