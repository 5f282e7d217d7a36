"""`--dtype auto` and `--quantization auto`: one exact case per CPU capability, device and role."""

from __future__ import annotations

import pytest

from disagg_cli.config import RuntimeConfig
from disagg_cli.errors import UsageError
from disagg_cli.model.hardware import CPUInfo, choose_dtype, choose_quantization
from disagg_cli.model.loader import resolve_runtime

NO_FLAGS: frozenset[str] = frozenset()


@pytest.mark.parametrize("capability,flags,expected", [
    ("DEFAULT", NO_FLAGS, "float32"),
    ("NO AVX", NO_FLAGS, "float32"),
    ("AVX2", frozenset({"avx2", "fma"}), "float32"),
    ("AVX512", frozenset({"avx512f", "avx512bw"}), "float32"),  # AVX-512 without its BF16 extension
    ("AVX512", frozenset({"avx512f", "avx512_bf16"}), "bfloat16"),  # torch says AVX512, the flags say bf16
    ("AVX512_BF16", NO_FLAGS, "bfloat16"),
    ("AMX_BF16", NO_FLAGS, "bfloat16"),
    ("AMX", NO_FLAGS, "bfloat16"),
    ("AVX2", frozenset({"amx_bf16"}), "bfloat16"),
    ("SVE256", NO_FLAGS, "float32"),
])
def test_dtype_auto_per_cpu_capability(capability: str, flags: frozenset[str], expected: str) -> None:
    choice = choose_dtype("auto", "cpu", CPUInfo(capability, flags))
    assert choice.dtype == expected
    assert choice.reason.startswith("auto: ") and capability in choice.reason


@pytest.mark.parametrize("role,kernel,expected", [
    ("prefill", "c", "float32"),  # bf16 prompts parted greedy text from float32's (81.5 % end to end)
    ("decode", "c", "float32"),  # the fused decode step is float32
    ("colocated", "c", "float32"),
    ("prefill", "torch", "bfloat16"), ("decode", "torch", "bfloat16"), ("colocated", "torch", "bfloat16"),
])
def test_dtype_auto_per_role_on_native_bf16(role: str, kernel: str, expected: str) -> None:
    zen4 = CPUInfo("AVX512", frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))
    choice = choose_dtype("auto", "cpu", zen4, role, kernel)
    assert choice.dtype == expected and "avx512_bf16" in choice.reason
    # without native bf16 every role is float32, kernel or not
    assert choose_dtype("auto", "cpu", CPUInfo("AVX2", NO_FLAGS), role, kernel).dtype == "float32"
    assert choose_dtype("bfloat16", "cpu", zen4, role, kernel).dtype == "bfloat16"  # as asked
    assert choose_dtype("auto", "cuda", zen4, role, kernel).dtype == "bfloat16"


def test_dtype_auto_on_gpus_and_as_asked() -> None:
    avx2 = CPUInfo("AVX2", NO_FLAGS)
    assert choose_dtype("auto", "cuda", avx2).dtype == "bfloat16"
    assert choose_dtype("auto", "cuda:1", avx2).dtype == "bfloat16"
    assert choose_dtype("auto", "mps", avx2).dtype == "float32"
    asked = choose_dtype("bfloat16", "cpu", avx2)
    assert asked.dtype == "bfloat16" and "no native bf16" in asked.reason  # obeyed, with a warning
    assert choose_dtype("float16", "cpu", avx2).reason == "--dtype float16 as asked"


@pytest.mark.parametrize("role,expected,keep_dense,float_gemm", [
    ("prefill", "none", False, True), ("decode", "int4", False, False), ("colocated", "int4", True, True)])
def test_quantization_auto_per_role(role: str, expected: str, keep_dense: bool, float_gemm: bool) -> None:
    choice = choose_quantization("auto", role, "cpu", "c")
    assert (choice.quantization, choice.keep_dense, choice.float_gemm) == (expected, keep_dense, float_gemm)
    # asked for, float weights on the CPU take the kernel's GEMM too, wherever it built
    assert choose_quantization("none", role, "cpu", "c").float_gemm
    assert not choose_quantization("none", role, "cpu", "torch").float_gemm
    assert not choose_quantization("none", role, "cuda", "c").float_gemm


def test_quantization_auto_without_kernel_or_cpu_and_as_asked() -> None:
    assert choose_quantization("auto", "decode", "cpu", "torch").quantization == "none"
    assert not choose_quantization("auto", "prefill", "cpu", "torch").float_gemm  # no kernel, no kernel GEMM
    assert choose_quantization("auto", "decode", "cuda", "c").quantization == "none"
    asked = choose_quantization("int8", "prefill", "cpu", "torch")
    assert (asked.quantization, asked.keep_dense) == ("int8", False) and "fallback" in asked.reason
    with pytest.raises(UsageError, match="CPU only"):
        choose_quantization("int4", "decode", "cuda", "c")


def test_runtime_config_validates_and_resolves() -> None:
    assert RuntimeConfig().dtype == "auto" and RuntimeConfig().quantization == "auto"
    with pytest.raises(UsageError, match="--quantization must be one of none, int8, int4, auto"):
        RuntimeConfig(quantization="int3")
    with pytest.raises(UsageError, match="--dtype must be one of auto, float32"):
        RuntimeConfig(dtype="fp8")
    resolved, dtype_reason, quant, _ = resolve_runtime(
        RuntimeConfig(quantization="auto"), "decode", CPUInfo("AVX2", NO_FLAGS), "c")
    assert (resolved.dtype, resolved.quantization, quant.keep_dense) == ("float32", "int4", False)
    assert "AVX2" in dtype_reason and "decode" in quant.reason
    zen4 = CPUInfo("AVX512", frozenset({"avx512_bf16"}))
    for role in ("prefill", "decode"):
        resolved, _, _, _ = resolve_runtime(RuntimeConfig(quantization="auto"), role, zen4, "c")
        assert resolved.dtype == "float32"
    resolved, _, _, _ = resolve_runtime(RuntimeConfig(dtype="bfloat16", quantization="auto"), "prefill", zen4, "c")
    assert resolved.dtype == "bfloat16"  # as asked
    resolved, _, _, _ = resolve_runtime(RuntimeConfig(), "decode", zen4, "torch")  # torch backend: bf16
    assert resolved.dtype == "bfloat16"


def test_colocated_keeps_bf16_copies_for_wide_steps_where_asked_and_the_cpu_multiplies_bf16() -> None:
    zen4 = CPUInfo("AVX512", frozenset({"avx512f", "avx512_bf16"}))
    amx = CPUInfo("AMX_BF16", NO_FLAGS)
    avx2 = CPUInfo("AVX2", frozenset({"avx2", "fma"}))
    for cpu in (zen4, amx):
        # float32 unless asked: bfloat16 parts greedy text from float32's (README, "Speed")
        assert choose_quantization("auto", "colocated", "cpu", "c", cpu).wide_dtype == "float32"
        choice = choose_quantization("auto", "colocated", "cpu", "c", cpu, wide_dtype="bfloat16")
        assert (choice.quantization, choice.keep_dense, choice.wide_dtype, choice.wide_min_rows) == (
            "int4", True, "bfloat16", 16)
        assert cpu.capability in choice.reason
    plain = choose_quantization("auto", "colocated", "cpu", "c", avx2, wide_dtype="bfloat16")  # no native bf16
    assert (plain.quantization, plain.keep_dense, plain.wide_dtype, plain.wide_min_rows) == (
        "int4", True, "float32", 64)
    assert choose_quantization("auto", "colocated", "cpu", "c").wide_dtype == "float32"  # no CPU said: float32
    # decode and prefill keep one copy: int4, and float as the dtype says
    assert not choose_quantization("auto", "decode", "cpu", "c", zen4).keep_dense
    assert choose_quantization("auto", "prefill", "cpu", "c", zen4).quantization == "none"


def test_quantization_auto_is_the_default() -> None:
    assert RuntimeConfig().quantization == "auto"


def test_quantization_auto_keeps_a_float_checkpoint_float() -> None:
    zen4 = CPUInfo("AVX512", frozenset({"avx512f", "avx512_bf16"}))
    for role in ("decode", "colocated", "prefill"):
        choice = choose_quantization("auto", role, "cpu", "c", zen4, stored_quantized=False)
        assert (choice.quantization, choice.keep_dense, choice.float_gemm) == ("none", False, True), role
    assert "as the checkpoint stores them" in choose_quantization("auto", "decode", "cpu", "c", zen4, False).reason
    # asked for, int4 is made from float weights all the same
    assert choose_quantization("int4", "decode", "cpu", "c", zen4, stored_quantized=False).quantization == "int4"


ZEN4_VNNI = CPUInfo("AVX512", frozenset({"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}))


@pytest.mark.parametrize("role,expected", [("prefill", "int4"), ("decode", "int4"), ("colocated", "int4")])
def test_int16_tiles_keep_only_the_int4_blocks_in_every_role(role: str, expected: str) -> None:
    """Where the kernel has int16 tiles (AVX512-VNNI) they beat float32 GEMM at prompt sizes with the
    same greedy text, so no role keeps float copies; without them prefill and colocated do."""
    assert ZEN4_VNNI.has_int16_tiles
    choice = choose_quantization("auto", role, "cpu", "c", ZEN4_VNNI)
    assert (choice.quantization, choice.keep_dense) == (expected, False)
    no_vnni = CPUInfo("AVX512", frozenset({"avx512f", "avx512bw", "avx512_bf16"}))
    assert not no_vnni.has_int16_tiles
    without = choose_quantization("auto", role, "cpu", "c", no_vnni)
    assert (without.quantization, without.keep_dense) == {
        "prefill": ("none", False), "decode": ("int4", False), "colocated": ("int4", True)}[role]
    # a float checkpoint stays float, tiles or not; the torch backend never quantizes by itself
    assert choose_quantization("auto", role, "cpu", "c", ZEN4_VNNI, stored_quantized=False).quantization == "none"
    assert choose_quantization("auto", role, "cpu", "torch", ZEN4_VNNI).quantization == "none"
    # bfloat16 copies, where asked, are still what a colocated worker keeps for wide steps
    asked = choose_quantization("auto", "colocated", "cpu", "c", ZEN4_VNNI, wide_dtype="bfloat16")
    assert (asked.keep_dense, asked.wide_dtype) == (True, "bfloat16")
