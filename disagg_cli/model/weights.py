"""Model files into one parameter layout: GGUF (via `gguf`) and Hugging Face safetensors folders.

Both readers return a `Checkpoint`: the `ModelConfig` read from the file's own metadata, a float32
state dict under Hugging Face parameter names, and a fingerprint that peers compare before they
exchange KV. GGUF tensors are dequantized with the `gguf` package; llama.cpp stores the Q and K
projections of Llama models with their rows permuted for its interleaved RoPE, which is undone here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disagg_cli.config import ModelConfig
from disagg_cli.errors import ModelFormatError, ModelNotFoundError
from disagg_cli.model.gguf_file import read_gguf

Progress = Callable[[int, int], None]  # (tensors done, tensors in all)

GGUF_ARCHITECTURES = ("llama", "qwen2")
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED = "a .gguf file (llama or qwen2) or a Hugging Face folder with config.json and *.safetensors"

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # kept raw too, for --quantization to load as they are
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    fingerprint: str
    path: Path
    file_type: str  # what the weights were stored as, e.g. "gguf Q4_1", "safetensors bfloat16"
    # GGUF matrices stored as Q8_0 / Q4_0 / Q4_1, under HF names with rows in HF order:
    # name → (GGML type name, raw rows (N, row bytes)); quantization takes these as they are.
    blocks: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)


def read_checkpoint(path: Path, progress: Progress | None = None) -> Checkpoint:
    """Read a model file or folder; refuse anything else with a one-line reason."""
    if not path.exists():
        raise ModelNotFoundError(f"no model file or folder at {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_hf_folder(path, progress)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _read_gguf(ggufs[0], progress)
        raise ModelFormatError(f"{path} is a folder without config.json ({len(ggufs)} .gguf files); "
                               f"expected {SUPPORTED}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path, progress)
    raise ModelFormatError(f"{path} is not a GGUF file (starts with {magic!r}); expected {SUPPORTED}")


# --- GGUF -------------------------------------------------------------------------------------


def _read_gguf(path: Path, progress: Progress | None) -> Checkpoint:
    import gguf  # dequantization tables; reading GGUF is the only thing that needs them

    f = read_gguf(path)
    meta = f.metadata
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelFormatError(f"{path} holds a {arch!r} model; supported GGUF architectures: "
                               f"{', '.join(GGUF_ARCHITECTURES)}")
    state: dict[str, torch.Tensor] = {}
    rope_freqs: np.ndarray | None = None
    qtypes: set[str] = set()
    blocks: dict[str, tuple[str, np.ndarray]] = {}
    for i, (name, t) in enumerate(f.tensors.items()):
        qtype = gguf.GGMLQuantizationType(t.qtype)
        try:
            data = _dequantize(gguf, t.data, qtype)
        except NotImplementedError as e:
            raise ModelFormatError(f"{path}: tensor {name} is {qtype.name}, which the gguf "
                                   f"package cannot dequantize ({e})") from e
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        data = np.array(data, dtype=np.float32).reshape(tuple(reversed(t.shape)))
        qtypes.add(qtype.name)
        if name == "rope_freqs.weight":
            rope_freqs = data
        else:
            state[_hf_name(path, name)] = torch.from_numpy(data)
            if qtype.name in _BLOCK_TYPES and data.ndim == 2:
                blocks[_hf_name(path, name)] = (qtype.name, t.data)
        if progress:
            progress(i + 1, len(f.tensors))

    config = _gguf_config(path, arch, meta, state, rope_freqs)
    if arch == "llama":  # convert_hf_to_gguf permutes Llama's Q/K rows; Qwen2's are left as they are
        for i in range(config.num_layers):
            for proj, heads in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.self_attn.{proj}.{kind}"
                    if key in state:
                        state[key] = unpermute_rope_rows(state[key], heads)
                    if key in blocks:  # the same row order for the raw blocks
                        qname, raw = blocks[key]
                        rows = unpermute_rope_rows(torch.arange(raw.shape[0]), heads).numpy()
                        blocks[key] = (qname, raw[rows])
    fingerprint = _fingerprint(config, [(t.name, t.shape, _sample(t.data)) for t in f.tensors.values()])
    return Checkpoint(config, state, fingerprint, path, "gguf " + "+".join(sorted(qtypes)), blocks)


def _dequantize(gguf: Any, data: np.ndarray, qtype: Any) -> np.ndarray:
    """The gguf package's own block formulas, so the same float32 values, applied to the whole
    tensor at once for the block types we serve: its `dequantize` cuts a tensor into groups of rows
    first, which took 3.3 s of the default model's 5.2 s load (0.3 s this way)."""
    blocks = getattr(gguf.quants, qtype.name, None) if qtype.name in _BLOCK_TYPES else None
    if blocks is None or data.dtype != np.uint8:
        return gguf.quants.dequantize(data, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    out = blocks.dequantize_blocks(rows.reshape(-1, type_size))
    return out.reshape(*data.shape[:-1], data.shape[-1] // type_size * block_size)


def _hf_name(path: Path, name: str) -> str:
    stem, _, kind = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{kind}"
    if stem in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[stem]}.{kind}"
    raise ModelFormatError(f"{path}: unexpected tensor {name!r} for a Llama-family model")


def _gguf_config(path: Path, arch: str, meta: dict, state: dict[str, torch.Tensor],
                 rope_freqs: np.ndarray | None) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFormatError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    factors: tuple[float, ...] | None = None
    if rope_freqs is not None:
        factors = tuple(float(x) for x in rope_freqs.reshape(-1))
    elif meta.get(f"{arch}.rope.scaling.type") == "linear":
        factors = (float(meta[f"{arch}.rope.scaling.factor"]),) * (head_dim // 2)
    embed = state["model.embed_tokens.weight"]
    return ModelConfig(
        architecture=arch,
        vocab_size=int(embed.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="lm_head.weight" not in state,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in state,
        rope_freq_factors=factors,
    )


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a Q or K projection (weight (out, in) or bias (out,)).

    llama.cpp interleaves each head's two rotary halves (rows 0, hd/2, 1, hd/2+1, …); Hugging Face
    keeps the halves apart. Per head: (2, hd/2) in HF order became (hd/2, 2); swap back.
    """
    rest = w.shape[1:]
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The permutation llama.cpp applies when it writes Q/K (the inverse of `unpermute_rope_rows`)."""
    rest = w.shape[1:]
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


# --- Hugging Face safetensors -----------------------------------------------------------------


def _read_hf_folder(path: Path, progress: Progress | None) -> Checkpoint:
    from safetensors import safe_open

    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ModelFormatError(f"{path} holds a {model_type!r} model; supported model types: "
                               f"{', '.join(HF_MODEL_TYPES)}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path} has config.json but no *.safetensors weights")

    config = _hf_config(path, hf)
    with_keys = []
    for f in files:
        with safe_open(f, framework="pt") as sf:
            with_keys.append((f, list(sf.keys())))
    total = sum(len(keys) for _, keys in with_keys)
    state: dict[str, torch.Tensor] = {}
    samples: list[tuple[str, tuple[int, ...], bytes]] = []
    dtypes: set[str] = set()
    done = 0
    for f, keys in with_keys:
        with safe_open(f, framework="pt") as sf:
            for key in keys:
                done += 1
                if progress:
                    progress(done, total)
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings):
                    continue  # derived from the config, or a duplicate of the tied embedding
                t = sf.get_tensor(key)
                dtypes.add(str(t.dtype).removeprefix("torch."))
                samples.append((key, tuple(t.shape), _sample(t.contiguous().view(-1).view(torch.uint8).numpy())))
                state[key] = t.float()
    return Checkpoint(config, state, _fingerprint(config, samples), path, "safetensors " + "+".join(sorted(dtypes)))


def _hf_config(path: Path, hf: dict) -> ModelConfig:
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = int(hf.get("head_dim") or hidden // heads)
        theta = float(hf.get("rope_theta", 10000.0))
        return ModelConfig(
            architecture=hf["model_type"],
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", hf["model_type"] == "qwen2")),
            rope_freq_factors=_hf_rope_factors(path, hf.get("rope_scaling"), theta, head_dim),
        )
    except KeyError as e:
        raise ModelFormatError(f"{path / 'config.json'} lacks {e.args[0]!r}") from e


def _hf_rope_factors(path: Path, scaling: dict | None, theta: float, head_dim: int) -> tuple[float, ...] | None:
    """Express HF rope scaling as one divisor per frequency, the form GGUF's rope_freqs uses."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    n = head_dim // 2
    if kind == "default":
        return None
    if kind == "linear":
        return (float(scaling["factor"]),) * n
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        factors = []
        for i in range(n):
            wavelen = 2 * np.pi * theta ** (2 * i / head_dim)
            if wavelen < old_ctx / high:
                factors.append(1.0)
            elif wavelen > old_ctx / low:
                factors.append(float(factor))
            else:  # smooth blend between the scaled and unscaled frequency
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(float(1.0 / ((1 - smooth) / factor + smooth)))
        return tuple(factors)
    raise ModelFormatError(f"{path}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")


# --- fingerprint ------------------------------------------------------------------------------


def _sample(raw: np.ndarray) -> bytes:
    """A cheap content sample of a tensor's stored bytes: its first and last 4 KiB."""
    b = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return bytes(b[:4096]) + bytes(b[-4096:])


def _fingerprint(config: ModelConfig, tensors: list[tuple[str, tuple[int, ...], bytes]]) -> str:
    """Names, shapes, config and a content sample: equal for the same weights in any --dtype."""
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for name, shape, sample in sorted(tensors):
        h.update(f"{name}:{shape}".encode())
        h.update(sample)
    return h.hexdigest()[:16]
