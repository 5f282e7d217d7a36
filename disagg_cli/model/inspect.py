"""`disagg model info`: what a model is, read from its own file, without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disagg_cli import ui
from disagg_cli.config import DTYPES
from disagg_cli.model.registry import resolve_model
from disagg_cli.model.weights import read_checkpoint


def describe_model(spec: str, cache_dir: Path) -> dict[str, Any]:
    with ui.pull_progress(spec) as on_pull:
        path = resolve_model(spec, cache_dir, on_pull)
    with ui.load_progress(path.name) as on_load:
        ckpt = read_checkpoint(path, on_load)
    c = ckpt.config
    num_params = sum(t.numel() for t in ckpt.state_dict.values())
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
    }
