"""`disagg model info`: what a model is, read from its own file, without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disagg_cli import ui
from disagg_cli.config import DTYPES
from disagg_cli.model.backend import choose_backend
from disagg_cli.model.hardware import choose_dtype, choose_quantization, probe_cpu
from disagg_cli.model.registry import resolve_model
from disagg_cli.model.weights import read_checkpoint


def describe_model(spec: str, cache_dir: Path) -> dict[str, Any]:
    with ui.pull_progress(spec) as on_pull:
        path = resolve_model(spec, cache_dir, on_pull)
    with ui.load_progress(path.name) as on_load:
        ckpt = read_checkpoint(path, on_load)
    c = ckpt.config
    num_params = sum(t.numel() for t in ckpt.state_dict.values())
    blocks: dict[str, int] = {}
    for qtype, _ in ckpt.blocks.values():
        blocks[qtype] = blocks.get(qtype, 0) + 1
    return {
        "path": str(path),
        "architecture": c.architecture,
        "parameters": num_params,
        "stored_as": ckpt.file_type,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "tied_embeddings": c.tie_word_embeddings,
        **{f"kv_bytes_per_token_{d}": c.kv_bytes_per_token(d) for d in DTYPES},
        "fingerprint": ckpt.fingerprint,
        **runtime_choices(cache_dir),
        "gguf_blocks_loaded_as_is": ", ".join(f"{n} {q}" for q, n in sorted(blocks.items())) or "none",
    }


def runtime_choices(cache_dir: Path, device: str = "cpu", kernel: str = "auto") -> dict[str, str]:
    """What `--kernel`, `--dtype auto` and `--quantization auto` pick on this machine, per role, and why
    (the kernel is built here if it was not yet: whether it builds is what `--kernel auto` weighs)."""
    cpu = probe_cpu()
    backend = choose_backend(kernel, device, cache_dir)
    out = {"cpu_capability": cpu.capability, f"kernel_{kernel}": f"{backend.name} ({backend.reason})"}
    for role in ("prefill", "decode", "colocated"):
        d = choose_dtype("auto", device, cpu, role, backend.name)
        out[f"dtype_auto_{role}"] = f"{d.dtype} ({d.reason})"
        q = choose_quantization("auto", role, device, backend.name, cpu)
        out[f"quantization_auto_{role}"] = f"{q.quantization} ({q.reason})"
    return out
