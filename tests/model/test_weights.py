"""GGUF and safetensors loaders: same weights in, same logits out; bad files refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disagg_cli.config import RuntimeConfig
from disagg_cli.errors import ModelFormatError, ModelNotFoundError
from disagg_cli.model.kv_cache import DenseKVCache
from disagg_cli.model.loader import LoadedModel, load_model
from disagg_cli.model.weights import permute_rope_rows, read_checkpoint, unpermute_rope_rows
from tests.tiny_models import TINY, dequantized, random_weights, write_gguf, write_hf_folder

TOKENS = torch.tensor([3, 17, 42, 5, 88, 1, 60, 7, 7, 19])


def logits(lm: LoadedModel, ids: torch.Tensor = TOKENS) -> torch.Tensor:
    cache = DenseKVCache(lm.config, len(ids), lm.dtype, "cpu")
    hidden = lm.model(ids, torch.arange(len(ids)), cache)
    return lm.model.compute_logits(hidden)  # (T, V)


@pytest.mark.parametrize("arch,tied,bias", [("llama", True, False), ("llama", False, False), ("qwen2", False, True)])
def test_gguf_and_safetensors_give_identical_logits(tmp_path: Path, arch: str, tied: bool, bias: bool) -> None:
    state = random_weights(seed=1, tied=tied, bias=bias)
    hf = load_model(write_hf_folder(tmp_path / "hf", state, model_type=arch), RuntimeConfig())
    gg = load_model(write_gguf(tmp_path / "m.gguf", state, arch=arch), RuntimeConfig())
    assert hf.config.attention_bias == gg.config.attention_bias == bias
    assert hf.config.tie_word_embeddings == gg.config.tie_word_embeddings == tied
    for name, t in hf.model.state_dict().items():
        assert torch.equal(t, gg.model.state_dict()[name]), name
    assert torch.equal(logits(hf), logits(gg))


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_quantized_gguf_matches_its_dequantized_weights(tmp_path: Path, qtype: str) -> None:
    cfg = dict(TINY, hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    state = random_weights(seed=2, tied=False, cfg=cfg)
    ckpt = read_checkpoint(write_gguf(tmp_path / f"{qtype}.gguf", state, qtype=qtype, cfg=cfg))
    expected = dequantized(state, "llama", qtype, cfg)
    assert qtype in ckpt.file_type
    assert ckpt.state_dict.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(ckpt.state_dict[name], t), name
    # The quantized weights are close to the originals, so the test would notice garbage blocks.
    if qtype not in ("Q4_K", "Q6_K"):
        err = (ckpt.state_dict["model.layers.0.self_attn.q_proj.weight"]
               - state["model.layers.0.self_attn.q_proj.weight"]).abs().max()
        assert err < 0.05


def test_rope_permutation_round_trip() -> None:
    w = torch.arange(8 * 3 * 5, dtype=torch.float32).reshape(24, 5)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)
    # Per head of 8 rows: llama.cpp interleaves the halves → rows 0,4,1,5,2,6,3,7.
    assert permute_rope_rows(w, 3)[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]


def test_fingerprint_ignores_runtime_dtype_but_not_weights(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "a.gguf", random_weights(seed=3))
    other = write_gguf(tmp_path / "b.gguf", random_weights(seed=4))
    f32 = load_model(path, RuntimeConfig(dtype="float32"))
    bf16 = load_model(path, RuntimeConfig(dtype="bfloat16"))
    assert f32.fingerprint == bf16.fingerprint
    assert bf16.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.model.rotary.inv_freq.dtype == torch.float32
    assert read_checkpoint(other).fingerprint != f32.fingerprint


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model file"):
        read_checkpoint(tmp_path / "nope.gguf")


def test_text_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        read_checkpoint(bad)


def test_truncated_gguf_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", random_weights())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated|past the end"):
        read_checkpoint(path)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="'gpt2' model; supported GGUF architectures: llama, qwen2"):
        read_checkpoint(path)


def test_missing_weight_fails_strict_load(tmp_path: Path) -> None:
    state = random_weights()
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelFormatError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(write_hf_folder(tmp_path / "hf", state), RuntimeConfig())


def test_folder_without_weights_is_refused(tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "hf", random_weights())
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no \\*.safetensors"):
        read_checkpoint(tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="without config.json"):
        read_checkpoint(tmp_path / "empty")


def test_unknown_hf_model_type_is_refused(tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "hf", random_weights(), model_type="gpt_neox")
    with pytest.raises(ModelFormatError, match="'gpt_neox' model; supported model types"):
        read_checkpoint(tmp_path / "hf")
