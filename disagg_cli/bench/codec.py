"""`disagg bench codec`: every KV codec measured on real KV of a real prompt, and over a real link.

1. load the model and tokenizer; build a prompt of exactly `prompt_tokens` tokens from English text;
2. prefill it in a prefill-only `LLMEngine` and export its KV (the "exact" KV, in the model dtype);
3. open a ZeroMQ link to a child process (`bench/link.py`) and time `none` over it: that is the
   link speed `auto` is told about;
4. per codec: encode and decode every layer (median of `REPS`), errors against the exact KV, and
   the end-to-end time over the link (encode + send + receive + decode, median of `LINK_REPS`
   rounds, each round sending every codec once);
5. per lossy codec: greedy token agreement of decoding from its restored KV versus the exact KV;
6. print a Rich table (or one JSON object with `--json`).

Codecs are timed on one torch thread (the receiver process has one too), as a worker runs them.

Agreement: both runs decode `agreement_tokens` tokens greedily, free-running (no teacher forcing)
after the same first token; `agreement` is the fraction of those positions whose tokens are equal,
`agreement_prefix` the fraction before the first difference.
Break-even: a codec beats `none` on links slower than (raw − wire bytes) / (its encode + decode
time − none's) if nothing overlaps (serial), and slower than raw bytes / max(encode, decode time)
if layers fully overlap (pipelined); the measured transfer times fall between the two.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from disagg_cli import ui
from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.errors import UsageError
from disagg_cli.kv.codec import KVCodec
from disagg_cli.kv.registry import get_codec
from disagg_cli.kv.transfer import assemble_request_kv, encode_request_kv
from disagg_cli.protocol import CODEC_NAMES

REPS = 3
LINK_REPS = 7
AGREEMENT_DEFINITION = ("fraction of the N greedily decoded positions (free-running, after the same first "
                        "token) whose token from the restored KV equals the token from the exact KV")
_TEXT = (
    "The river town woke slowly. Fishermen pushed their boats into the grey water while the baker "
    "pulled the first loaves from his oven, and the smell of bread drifted over the square. "
    "Children ran along the stone wall, counting the gulls that circled the harbour. ",
    "In the library on the hill, an old map of the coast lay open on the table. It showed the "
    "islands, the reefs, and a lighthouse that had fallen into the sea a hundred years before. ",
    "Trains carry goods across the plain every night: grain from the north, timber from the "
    "forests in the east, and machines built in the cities along the southern railway. ",
    "A good experiment changes one thing at a time, measures the result more than once, and "
    "compares it with a baseline taken on the same day, on the same machine, by the same hands. ",
)

KV = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True, slots=True)
class CodecBenchOptions:
    model: str
    cache_dir: Path
    runtime: RuntimeConfig
    prompt_tokens: int = 1024
    agreement_tokens: int = 64
    link_gbps: float | None = None
    codecs: tuple[str, ...] = CODEC_NAMES
    json_output: bool = False

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise UsageError(f"--prompt-tokens must be at least 1, got {self.prompt_tokens}")
        if self.agreement_tokens < 1:
            raise UsageError(f"--agreement-tokens must be at least 1, got {self.agreement_tokens}")
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise UsageError(f"--link-gbps must be positive, got {self.link_gbps}")
        if unknown := [c for c in self.codecs if c not in CODEC_NAMES]:
            raise UsageError(f"--codecs: unknown {', '.join(unknown)}; choose from {', '.join(CODEC_NAMES)}")
        if not self.codecs:
            raise UsageError("--codecs: name at least one codec")


def prompt_ids(tokenize: Any, num_tokens: int) -> list[int]:
    """Exactly `num_tokens` ids of English text: the paragraphs in order, in numbered parts.

    The order never changes, so what comes next is never a coin toss between paragraphs (a
    rotating order made greedy decoding flip on a near-tie that no codec error causes).
    """
    ids: list[int] = []
    part = 0
    while len(ids) < num_tokens:
        ids += tokenize(f"Part {part + 1}. " + "".join(_TEXT), add_bos=part == 0)
        part += 1
    return ids[:num_tokens]


def _engine_config(num_tokens: int) -> EngineConfig:
    return EngineConfig(kv_cache_tokens=num_tokens + 64, max_num_seqs=1,
                        max_num_batched_tokens=max(2048, num_tokens), enable_prefix_caching=False)


def prefill(lm: Any, ids: list[int]) -> tuple[KV, int]:
    """The exact KV of prompt `ids` (per layer, token-major) and the greedy first token."""
    from disagg_cli.engine.engine import LLMEngine

    engine = LLMEngine(lm, _engine_config(len(ids)), prefill_only=True)
    engine.add_request("prefill", ids, SamplingParams(max_tokens=1))
    events: list[Any] = []
    while not events:
        events = engine.step()
    kv = engine.export_kv("prefill")
    engine.release("prefill")
    return kv, events[0].token_id


def greedy_tokens(lm: Any, ids: list[int], first_token: int, kv: KV, num_tokens: int) -> list[int]:
    """`num_tokens` greedy tokens decoded after `first_token` from imported KV `kv`."""
    from disagg_cli.engine.engine import LLMEngine

    engine = LLMEngine(lm, _engine_config(len(ids) + num_tokens))
    engine.add_imported("decode", ids, first_token, SamplingParams(max_tokens=num_tokens + 1, ignore_eos=True),
                        kv=kv)
    out: list[int] = []
    while engine.has_unfinished():
        out += [e.token_id for e in engine.step()]
    return out[:num_tokens]


def agreement(a: list[int], b: list[int]) -> tuple[float, float]:
    """(fraction of positions equal, fraction before the first difference)."""
    equal = [x == y for x, y in zip(a, b, strict=True)]
    prefix = equal.index(False) if False in equal else len(equal)
    return sum(equal) / len(equal), prefix / len(equal)


def _errors(exact: KV, restored: KV) -> tuple[float, float]:
    """(max |restored − exact|, ‖restored − exact‖ / ‖exact‖) over all of k and v, in float32."""
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    for pair, back in zip(exact, restored, strict=True):
        for x, y in zip(pair, back, strict=True):
            d = y.float() - x.float()
            max_abs = max(max_abs, d.abs().max().item())
            diff_sq += d.square().sum().item()
            ref_sq += x.float().square().sum().item()
    return max_abs, (diff_sq / ref_sq) ** 0.5 if ref_sq else 0.0


def measure_codec(codec: KVCodec, fingerprint: str, exact: KV) -> tuple[dict[str, Any], KV]:
    """Sizes, speeds (median of REPS) and errors of one codec on `exact`; also the restored KV."""
    ks, vs = [k for k, _ in exact], [v for _, v in exact]
    enc_s, dec_s = [], []
    for _ in range(REPS):
        start = time.perf_counter()
        msgs = list(encode_request_kv(codec, "bench", fingerprint, ks, vs))
        enc_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        rk, rv = assemble_request_kv(msgs, len(exact))
        dec_s.append(time.perf_counter() - start)
    restored = list(zip(rk, rv, strict=True))
    raw = sum(m.kv.raw_bytes for m in msgs)
    wire = sum(m.kv.wire_bytes for m in msgs)
    max_abs, rel = _errors(exact, restored)
    row = {"codec": codec.name, "lossless": codec.lossless, "raw_bytes": raw, "wire_bytes": wire,
           "raw_mb": raw / 1e6, "wire_mb": wire / 1e6, "ratio": raw / wire,
           "encode_s": statistics.median(enc_s), "decode_s": statistics.median(dec_s),
           "encode_gbps": raw / statistics.median(enc_s) / 1e9, "decode_gbps": raw / statistics.median(dec_s) / 1e9,
           "max_abs_error": max_abs, "rel_error": rel}
    if codec.name == "auto":
        row["auto_choices"] = sorted({str(m.kv.params.get(s)) for m in msgs for s in "kv"})
    return row, restored


def breakeven(row: dict[str, Any], none: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """Link speeds (Gbit/s) below which `row`'s codec beats `none`: (serial, pipelined, in words).

    Serial: codec time adds to wire time. Pipelined: layers overlap, so the codec only needs to
    keep up with the link, i.e. encode and decode faster than raw bytes would cross it.
    """
    if row["codec"] == "none":
        return None, None, "baseline"
    saved_bytes = row["raw_bytes"] - row["wire_bytes"]
    if saved_bytes <= 0:
        return 0.0, 0.0, "sent raw" if row.get("auto_choices") == ["none"] else "never"
    pipelined = row["raw_bytes"] / max(row["encode_s"], row["decode_s"]) * 8 / 1e9
    extra_s = row["encode_s"] + row["decode_s"] - none["encode_s"] - none["decode_s"]
    if extra_s <= 0:
        return None, pipelined, "always"
    serial = saved_bytes / extra_s * 8 / 1e9
    return serial, pipelined, f"below {serial:.2f}–{pipelined:.2f} Gbit/s"


def run_codec_bench(opts: CodecBenchOptions) -> dict[str, Any]:
    from disagg_cli.bench.link import KVLink
    from disagg_cli.generate import prepare

    t_start = time.perf_counter()
    lm, tokenizer = prepare(opts.model, opts.cache_dir, opts.runtime)
    ids = prompt_ids(tokenizer.encode, opts.prompt_tokens)
    ui.info(f"prefilling {len(ids)} tokens ({opts.runtime.dtype})")
    exact, first_token = prefill(lm, ids)
    ks, vs = [k for k, _ in exact], [v for _, v in exact]
    pace = opts.link_gbps * 1e9 / 8 if opts.link_gbps is not None else None
    rows: dict[str, dict[str, Any]] = {}
    restored: dict[str, KV] = {}
    model_threads = torch.get_num_threads()
    # Codecs run on one thread: their ops on one layer are too small to gain from more, and on
    # shared cores waking a torch thread pool per op measured 10-100x slower (0.13 vs 17 ms).
    torch.set_num_threads(1)
    with KVLink(len(exact)) as link:
        ui.info("timing `none` over the link to measure its speed")
        none_e2e = statistics.median(link.transfer(get_codec("none"), lm.fingerprint, ks, vs, pace)[0]
                                     for _ in range(REPS))
        link_bytes_per_s = 2 * sum(k.nbytes for k in ks) / none_e2e
        names = list(dict.fromkeys(("none", *opts.codecs)))  # none first: the baseline of break-even
        codecs = {n: get_codec(n, link_bytes_per_s=link_bytes_per_s) for n in names}
        for name, codec in codecs.items():
            ui.info(f"codec {name}: encode, decode, errors")
            rows[name], restored[name] = measure_codec(codec, lm.fingerprint, exact)
            row = rows[name]
            row["breakeven_gbps"], row["breakeven_pipelined_gbps"], row["breakeven"] = breakeven(row, rows["none"])
        ui.info(f"{', '.join(names)} over the link, {LINK_REPS} rounds")
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for _ in range(LINK_REPS):  # round-robin, so a busy moment of a shared machine hits all alike
            for name, codec in codecs.items():
                times[name].append(link.transfer(codec, lm.fingerprint, ks, vs, pace))
        for name in names:
            rows[name]["transfer_ms"] = statistics.median(t for t, _ in times[name]) * 1e3
            rows[name]["receiver_decode_ms"] = statistics.median(d for _, d in times[name]) * 1e3
    torch.set_num_threads(model_threads)
    lossy = [n for n in opts.codecs if not rows[n]["lossless"]]
    if lossy:
        ui.info(f"greedy agreement over {opts.agreement_tokens} tokens: exact, {', '.join(lossy)}")
        reference = greedy_tokens(lm, ids, first_token, exact, opts.agreement_tokens)
        for name in lossy:
            got = greedy_tokens(lm, ids, first_token, restored[name], opts.agreement_tokens)
            rows[name]["agreement"], rows[name]["agreement_prefix"] = agreement(reference, got)
    return {
        "model": lm.path.name, "dtype": opts.runtime.dtype, "prompt_tokens": len(ids),
        "num_layers": lm.config.num_layers, "agreement_tokens": opts.agreement_tokens,
        "agreement_definition": AGREEMENT_DEFINITION,
        "link": {"transport": "zmq tcp://127.0.0.1, PUSH→PULL to a child process",
                 "paced_gbps": opts.link_gbps, "measured_gbps": link_bytes_per_s * 8 / 1e9},
        "codecs": [rows[n] for n in opts.codecs],
        "runtime_s": time.perf_counter() - t_start,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    link = result["link"]
    paced = f"paced to {link['paced_gbps']} Gbit/s" if link["paced_gbps"] else "unpaced"
    table = Table(title=f"KV codecs: {result['prompt_tokens']} tokens of {result['model']} in {result['dtype']}; "
                        f"link {paced}, measured {link['measured_gbps']:.2f} Gbit/s")
    for col in ("codec", "raw MB", "wire MB", "ratio", "enc GB/s", "dec GB/s", "max abs err", "rel err",
                "agreement", "transfer ms", "pays off"):
        table.add_column(col, justify="left" if col in ("codec", "pays off") else "right")
    for r in result["codecs"]:
        agree = f"{r['agreement']:.1%} ({r['agreement_prefix']:.0%} prefix)" if "agreement" in r else "-"
        table.add_row(r["codec"], f"{r['raw_mb']:.2f}", f"{r['wire_mb']:.2f}", f"{r['ratio']:.3f}",
                      f"{r['encode_gbps']:.2f}", f"{r['decode_gbps']:.2f}",
                      f"{r['max_abs_error']:.3g}", f"{r['rel_error']:.2%}", agree, f"{r['transfer_ms']:.1f}",
                      r["breakeven"])
    Console().print(table)
    print(f"agreement: {result['agreement_definition']} (over {result['agreement_tokens']} tokens)")


def run(opts: CodecBenchOptions) -> None:
    result = run_codec_bench(opts)
    if opts.json_output:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(result)
