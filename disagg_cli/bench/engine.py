"""`disagg bench engine`: prefill and decode speed of the batched engine, like llama.cpp's `llama-bench`.

1. load the model once (our loader) and tokenize English text into real token ids;
2. prefill points: one prompt of N tokens; the timed span is the one `LLMEngine.step()` that
   prefills it (schedule, forward, lm_head on the last row, sampling);
3. decode points: B prompts of `decode_context` tokens are prefilled in one (untimed) step, then
   exactly `decode_tokens` steps of B decodes each are timed (`ignore_eos`, so every step counts);
4. optionally the same points in plain Hugging Face transformers and/or llama.cpp (`--against
   llama-cpp`: prefill and batch-1 decode) on the same GGUF file and threads, taking turns rep by rep;
5. each point runs `reps` times and reports the median, as a Rich table or one JSON object, with
   the CPU capability, the resolved dtype/quantization and the perplexity of a fixed text per mode.

Derived figures: weight GB/s = weight bytes read per forward (decoder layers + the lm_head matrix, as
stored: quantized blocks with their scales)
× forwards / time; KV GB/s = K/V bytes attention reads / time; GFLOP/s = (2 × layer params × tokens
+ 2 × lm_head params × sampled rows + causal attention 4 × heads × head_dim × keys per query) / time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from disagg_cli import ui
from disagg_cli.bench.engine_options import EngineBenchOptions
from disagg_cli.config import EngineConfig, SamplingParams
from disagg_cli.engine.single import check_context
from disagg_cli.errors import UsageError
from disagg_cli.model.loader import LoadedModel

TEXT = ("The history of computing is a story of people who wanted to calculate faster than they could by "
        "hand. Early machines used gears and levers; later ones used relays, vacuum tubes and then "
        "transistors, each generation smaller, cheaper and more reliable than the last. Today a phone "
        "holds more memory than the rooms of machines that sent people to the moon. ")


@dataclass(frozen=True, slots=True)
class ModelCost:
    """Bytes and FLOPs of one forward, from the architecture (not measured)."""

    layer_params: int
    head_params: int  # the lm_head matrix (the embedding itself when tied)
    weight_bytes_read: int  # decoder layers + lm_head as stored (float, or quantized blocks and scales)
    kv_bytes_per_token: int
    attn_flops_per_key: int  # per query token per cached key, all layers: 4 × heads × head_dim × layers

    def weight_bytes(self) -> int:
        return self.weight_bytes_read

    def flops(self, num_tokens: int, num_sampled: int, num_keys: int) -> int:
        return (2 * self.layer_params * num_tokens + 2 * self.head_params * num_sampled
                + self.attn_flops_per_key * num_keys)


@dataclass
class Point:
    phase: str  # "prefill" or "decode"
    engine: str  # "disagg" or "transformers"
    batch_size: int
    context_len: int  # prompt length (prefill) or prompt tokens before decoding (decode)
    num_tokens: int  # tokens processed in the timed span
    num_forwards: int
    num_keys: int  # Σ over timed query tokens of the keys each attends to
    times_s: list[float] = field(default_factory=list)
    gathered_bytes: int = 0  # KV our runner copied for fragmented sequences, all reps

    def summary(self, cost: ModelCost) -> dict[str, Any]:
        t = statistics.median(self.times_s)
        sampled = self.num_tokens if self.phase == "decode" else self.batch_size
        return {"phase": self.phase, "engine": self.engine, "batch_size": self.batch_size,
                "context_len": self.context_len, "num_tokens": self.num_tokens, "num_steps": self.num_forwards,
                "time_s": t, "times_s": self.times_s, "tokens_per_s": self.num_tokens / t,
                "ms_per_token_per_seq": t * 1e3 / (self.num_forwards if self.phase == "decode" else self.num_tokens),
                "weight_gb_per_s": cost.weight_bytes() * self.num_forwards / t / 1e9,
                # decode reads cached K/V from the pool; a fresh prompt attends over its own new K/V
                "kv_gb_per_s": cost.kv_bytes_per_token * self.num_keys / t / 1e9 if self.phase == "decode" else 0.0,
                "gflop_per_s": cost.flops(self.num_tokens, sampled, self.num_keys) / t / 1e9,
                "gathered_kv_bytes": self.gathered_bytes}


def _token_ids(encode: Callable[[str], list[int]], n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids = encode(TEXT * (1 + 2 * len(ids) // 60 + 1))
    return ids[:n]


def _decode_keys(batch: int, context: int, steps: int) -> int:
    # decode step j (0-based) feeds the token at position context + j: it sees context + j + 1 keys
    return batch * sum(context + j + 1 for j in range(steps))


class OurEngine:
    name = "disagg"

    def __init__(self, lm: LoadedModel, opts: EngineBenchOptions) -> None:
        need = max(max(opts.prompt_lens) + 1, max(opts.batch_sizes) * (opts.decode_context + opts.decode_tokens + 1))
        # The default pool (512 MiB), or twice the need when that is more: a pool sized to the exact
        # need would fragment sequences that a server's roomier pool keeps contiguous.
        kv_bytes = lm.config.kv_bytes_per_token(lm.runtime.kv_cache_dtype)
        default_tokens = EngineConfig(block_size=opts.block_size).num_blocks(kv_bytes) * opts.block_size
        self.config = EngineConfig(block_size=opts.block_size, kv_cache_tokens=max(2 * need, default_tokens),
                                   max_num_seqs=max(opts.batch_sizes),
                                   max_num_batched_tokens=max(max(opts.prompt_lens),
                                                              max(opts.batch_sizes) * opts.decode_context),
                                   # Every repetition computes its prompts: a speed figure, not a cache's.
                                   enable_prefix_caching=False)
        from disagg_cli.engine.engine import LLMEngine

        self.engine = LLMEngine(lm, self.config)
        self.n = 0

    @property
    def gathered_bytes(self) -> int:
        return self.engine.runner.gathered_bytes

    def prefill_s(self, ids: list[int]) -> float:
        self._add([ids], 1)
        t0 = time.perf_counter()
        self.engine.step()
        elapsed = time.perf_counter() - t0
        assert self.engine.last_step.num_prefill_tokens == len(ids) and not self.engine.has_unfinished()
        return elapsed

    def decode_s(self, prompts: list[list[int]], steps: int) -> float:
        self._add(prompts, steps + 1)  # the first token comes from the prefill step
        self.engine.step()
        assert self.engine.last_step.num_prefill_tokens == sum(map(len, prompts)), "prefill did not fit one step"
        elapsed, counted = 0.0, 0
        while self.engine.has_unfinished():
            t0 = time.perf_counter()
            self.engine.step()
            elapsed += time.perf_counter() - t0
            assert self.engine.last_step.num_prefill_tokens == 0
            counted += self.engine.last_step.num_decode_seqs
        assert counted == len(prompts) * steps, f"counted {counted} decode tokens"
        return elapsed

    def _add(self, prompts: list[list[int]], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        for ids in prompts:
            self.n += 1
            self.engine.add_request(f"bench-{self.n}", ids, params)


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    if not ui.is_interactive():
        yield lambda _label: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=ui.err_console, transient=True) as bar:
        task = bar.add_task("bench", total=total)
        yield lambda label: bar.update(task, advance=1, description=label)


def _weight_bytes(lm: LoadedModel) -> tuple[int, int, int]:
    """(decoder layer params, lm_head params, bytes one forward reads of both, as stored)."""
    from disagg_cli.model.quant.linear import QuantizedLinear
    from disagg_cli.model.quant.panel import PanelLinear

    c = lm.config
    layer_params, nbytes = 0, 0
    for mod in lm.model.model.layers.modules():
        for t in mod.parameters(recurse=False):
            layer_params += t.numel()
            nbytes += t.numel() * t.element_size()
        if isinstance(mod, QuantizedLinear):
            layer_params += mod.in_features * mod.out_features
            nbytes += mod.weight_q.num_bytes
        elif isinstance(mod, PanelLinear):  # float32, as nn.Linear's (a quantized one's copy is in its method)
            layer_params += mod.num_weights
            nbytes += mod.num_weights * 4
    head = lm.model.lm_head
    head_params = c.vocab_size * c.hidden_size
    if isinstance(head, QuantizedLinear):
        nbytes += head.weight_q.num_bytes
    else:
        nbytes += head_params * torch.empty((), dtype=lm.dtype).element_size()
    return layer_params, head_params, nbytes


def run_engine_bench(opts: EngineBenchOptions) -> dict[str, Any]:
    from disagg_cli.bench.llama_cpp import INSTALL_HINT, LlamaCppEngine, llama_cpp_available
    from disagg_cli.bench.perplexity import PPL_TEXT, perplexity, perplexity_per_mode
    from disagg_cli.generate import prepare
    from disagg_cli.model.hardware import probe_cpu

    lm, tokenizer = prepare(opts.model, opts.cache_dir, opts.runtime)
    check_context(lm, max(opts.prompt_lens), 1)
    check_context(lm, opts.decode_context, opts.decode_tokens + 1)
    c = lm.config
    layer_params, head_params, weight_bytes = _weight_bytes(lm)
    cost = ModelCost(layer_params, head_params, weight_bytes, c.kv_bytes_per_token(lm.runtime.kv_cache_dtype),
                     4 * c.num_heads * c.head_dim * c.num_layers)
    spread = 7  # decode prompts start at different offsets so the B sequences differ
    base = _token_ids(lambda s: tokenizer.encode(s, add_bos=False),
                      max(max(opts.prompt_lens), opts.decode_context + spread * max(opts.batch_sizes)))
    ours = OurEngine(lm, opts)
    runner = ours.engine.runner
    decode_step = ("fused: one C call per decode step" if runner.fused is not None
                   else f"torch ops per layer ({runner.fused_reason})")
    engines: list[Any] = [ours]
    notes: list[str] = []
    if opts.baseline:
        try:
            from disagg_cli.bench.transformers_baseline import HFEngine

            engines.append(HFEngine(lm.path, lm.runtime.dtype))
        except ImportError as e:
            raise UsageError(f"--baseline needs transformers ({e}); pass --no-baseline") from e
    llama_version = None
    if "llama-cpp" in opts.against:
        if llama_cpp_available():
            context = max(max(opts.prompt_lens), opts.decode_context + opts.decode_tokens + 1, 64) + 16
            llama = LlamaCppEngine(lm.path, torch.get_num_threads(), context)
            llama_version = llama.version
            engines.append(llama)
        else:
            notes.append(INSTALL_HINT)
            ui.info(INSTALL_HINT)
    points: list[Point] = []
    ctx, steps = opts.decode_context, opts.decode_tokens

    def takes(eng: Any, phase: str, size: int) -> bool:
        return phase == "prefill" or size <= getattr(eng, "max_batch", size)

    def prefill(n: int) -> Callable[[Any], float]:
        return lambda eng: eng.prefill_s(base[:n])

    def decode(b: int) -> Callable[[Any], float]:
        return lambda eng: eng.decode_s([base[i * spread : i * spread + ctx] for i in range(b)], steps)

    plan = [("prefill", n, prefill(n)) for n in opts.prompt_lens] + [("decode", b, decode(b)) for b in opts.batch_sizes]
    total = sum(opts.reps for phase, size, _ in plan for eng in engines if takes(eng, phase, size))
    with _progress(total) as advance:
        for eng in engines:  # warm-up at the largest points: first-call allocations, buffers at their size
            eng.prefill_s(base[:max(opts.prompt_lens)])
            b = max((b for b in opts.batch_sizes if takes(eng, "decode", b)), default=1)
            eng.decode_s([base[i * spread : i * spread + ctx] for i in range(b)], 2)
        for phase, size, run in plan:
            # the engines take turns rep by rep, so a noisy neighbour slows both alike
            row = [Point(phase, eng.name, 1, size, size, 1, size * (size + 1) // 2) if phase == "prefill"
                   else Point(phase, eng.name, size, ctx, size * steps, steps, _decode_keys(size, ctx, steps))
                   for eng in engines if takes(eng, phase, size)]
            active = [eng for eng in engines if takes(eng, phase, size)]
            for _ in range(opts.reps):
                for eng, p in zip(active, row, strict=True):
                    g0 = eng.gathered_bytes
                    p.times_s.append(run(eng))
                    p.gathered_bytes += eng.gathered_bytes - g0
                    advance(f"{eng.name} {phase} {size}")
            points += row
    ppl_ids = tokenizer.encode(PPL_TEXT, add_bos=False)
    if opts.perplexity_modes is None:
        ppl = {f"{lm.runtime.dtype}+{lm.runtime.quantization}": perplexity(lm, ppl_ids)}
    else:
        ppl = perplexity_per_mode(lm.path, ppl_ids, opts.perplexity_modes, opts.runtime.threads, opts.cache_dir,
                                  lm.backend.name)
    return {"model": opts.model, "path": str(lm.path), "dtype": lm.runtime.dtype,
            "quantization": lm.runtime.quantization, "kernel": lm.backend.name, "runtime": lm.describe_runtime(),
            "cpu_capability": probe_cpu().capability, "decode_step": decode_step,
            "llama_cpp_version": llama_version, "notes": notes,
            "threads": torch.get_num_threads(), "block_size": opts.block_size, "reps": opts.reps,
            "num_parameters": lm.num_parameters, "weight_bytes_per_forward": cost.weight_bytes(),
            "kv_bytes_per_token": cost.kv_bytes_per_token,
            "flops": "2*layer_params*tokens + 2*lm_head_params*sampled_rows + 4*heads*head_dim*layers*keys (causal)",
            "perplexity": {"tokens": len(ppl_ids), **ppl},
            "points": [p.summary(cost) for p in points]}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    others = list(dict.fromkeys(p["engine"] for p in result["points"] if p["engine"] != "disagg"))
    short = {"transformers": "hf", "llama.cpp": "llama.cpp"}
    cols = [c for name in others for c in (f"{short.get(name, name)} tok/s", f"ours/{short.get(name, name)}")]
    table = Table("test", "ours tok/s", "ms/tok/seq", "GB/s w", "GB/s kv", "GFLOP/s", *cols,
                  title=f"{result['model']} · {result['dtype']} · weights {result['quantization']} · "
                        f"kernel {result['kernel']} · {result['threads']} threads · CPU {result['cpu_capability']} · "
                        f"median of {result['reps']}")
    ours = [p for p in result["points"] if p["engine"] == "disagg"]
    by = {(p["engine"], p["phase"], p["batch_size"], p["context_len"]): p for p in result["points"]}
    for p in ours:
        label = f"pp{p['context_len']}" if p["phase"] == "prefill" else f"tg{p['num_steps']} b{p['batch_size']}"
        cells = []
        for name in others:
            ref = by.get((name, p["phase"], p["batch_size"], p["context_len"]))
            cells += [f"{ref['tokens_per_s']:.1f}" if ref else "-",
                      f"{p['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref else "-"]
        table.add_row(label, f"{p['tokens_per_s']:.1f}", f"{p['ms_per_token_per_seq']:.2f}",
                      f"{p['weight_gb_per_s']:.2f}", f"{p['kv_gb_per_s']:.2f}", f"{p['gflop_per_s']:.1f}", *cells)
    console = Console()
    console.print(table)
    console.print(f"decode steps: {result['decode_step']}")
    ppl = result["perplexity"]
    console.print(f"perplexity on a fixed text of {ppl['tokens']} tokens: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items() if k != "tokens"))
    for note in result["notes"]:
        console.print(note)
