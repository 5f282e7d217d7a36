"""Tiny random Llama-family checkpoints written to disk in both formats, for fast exact tests.

`write_hf_folder` writes config.json + model.safetensors under Hugging Face names;
`write_gguf` writes the same weights as llama.cpp would: GGUF names, Q/K rows permuted for its RoPE
(Llama only), each matrix stored in a chosen GGML type. `dequantized` gives the weights a GGUF
reader must recover, so both files can be compared logit for logit.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from disagg_cli.model.weights import permute_rope_rows

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, context=128)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def random_weights(seed: int = 0, tied: bool = True, bias: bool = False, cfg: dict = TINY) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    h, kv = cfg["num_heads"], cfg["num_kv_heads"]

    def w(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"model.embed_tokens.weight": w(cfg["vocab_size"], d, scale=0.5),
             "model.norm.weight": 1 + w(d, scale=0.1)}
    if not tied:
        state["lm_head.weight"] = w(cfg["vocab_size"], d)
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": w(h * hd, d), p + "self_attn.k_proj.weight": w(kv * hd, d),
            p + "self_attn.v_proj.weight": w(kv * hd, d), p + "self_attn.o_proj.weight": w(d, h * hd),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": 1 + w(d, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + w(d, scale=0.1),
        }
        if bias:
            state |= {p + "self_attn.q_proj.bias": w(h * hd), p + "self_attn.k_proj.bias": w(kv * hd),
                      p + "self_attn.v_proj.bias": w(kv * hd)}
    return state


def write_hf_folder(path: Path, state: dict[str, torch.Tensor], model_type: str = "llama",
                    cfg: dict = TINY, dtype: torch.dtype = torch.float32) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": model_type, "architectures": ["LlamaForCausalLM"], "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_layers"], "num_attention_heads": cfg["num_heads"],
        "num_key_value_heads": cfg["num_kv_heads"], "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_theta": cfg["rope_theta"], "max_position_embeddings": cfg["context"],
        "tie_word_embeddings": "lm_head.weight" not in state,
    }
    if model_type == "llama":
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in state
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        stem, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{LAYER_NAMES[stem]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _is_matrix(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and not name.endswith("norm.weight")


def to_gguf_layout(state: dict[str, torch.Tensor], arch: str, cfg: dict = TINY) -> dict[str, torch.Tensor]:
    """HF names and layout → GGUF names and llama.cpp's permuted Q/K rows."""
    out = {}
    for name, t in state.items():
        if arch == "llama" and ".q_proj." in name:
            t = permute_rope_rows(t, cfg["num_heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = permute_rope_rows(t, cfg["num_kv_heads"])
        out[gguf_name(name)] = t
    return out


def write_gguf(path: Path, state: dict[str, torch.Tensor], arch: str = "llama", qtype: str = "F32",
               cfg: dict = TINY, tokenizer: dict | None = None) -> Path:
    """Matrices in `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1 quantized by gguf; Q4_K, Q6_K as random
    valid blocks, since gguf has no quantizer for them); norms and biases stay F32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_layers"])
    w.add_context_length(cfg["context"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_heads"])
    w.add_head_count_kv(cfg["num_kv_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    if tokenizer:
        for key, value in tokenizer.items():
            w.add_key_value(key, value[0], value[1])
    q = gguf.GGMLQuantizationType[qtype]
    for name, t in to_gguf_layout(state, arch, cfg).items():
        arr = t.float().numpy()
        if not _is_matrix(name, t) or q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif qtype in ("Q4_K", "Q6_K"):
            w.add_tensor(name, random_kquant_blocks(arr.shape, q), raw_dtype=q)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_kquant_blocks(shape: tuple[int, ...], q: gguf.GGMLQuantizationType) -> np.ndarray:
    """Random bytes shaped as K-quant blocks, with finite small fp16 scales where the format keeps them."""
    rng = np.random.default_rng(abs(hash(shape)) % 2**32)
    block, type_size = gguf.GGML_QUANT_SIZES[q]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    scale = np.full((rows, cols // block, 1), 0.002, dtype=np.float16).view(np.uint8)
    if q == gguf.GGMLQuantizationType.Q4_K:  # d and dmin lead the block
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K ends with d; its int8 scales sit before it
        raw[..., -2:] = scale
    return raw.reshape(rows, cols // block * type_size)


def dequantized(state: dict[str, torch.Tensor], arch: str, qtype: str, cfg: dict = TINY) -> dict[str, torch.Tensor]:
    """What a reader must recover from `write_gguf(state, arch, qtype)`, under HF names and layout."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        # Independent of our reader: decode each tensor with gguf's own GGUFReader.
        path = write_gguf(Path(tmp) / "m.gguf", state, arch, qtype, cfg)
        reader = gguf.GGUFReader(str(path))
        by_gguf = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}
        del reader
    out = {}
    for name in state:
        t = torch.from_numpy(np.array(by_gguf[gguf_name(name)], dtype=np.float32))
        if arch == "llama" and ".q_proj." in name:
            t = _unpermute_reference(t, cfg["num_heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = _unpermute_reference(t, cfg["num_kv_heads"])
        out[name] = t
    return out


def _unpermute_reference(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute, written index by index as an independent check."""
    rows = w.shape[0]
    hd = rows // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(hd // 2):
            out[h * hd + i] = w[h * hd + 2 * i]  # first rotary half came from even rows
            out[h * hd + hd // 2 + i] = w[h * hd + 2 * i + 1]  # second half from odd rows
    return out
