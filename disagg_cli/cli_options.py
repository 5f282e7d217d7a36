"""Option types and helpers the `disagg` commands share (cli.py, cli_workers.py, cli_bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disagg_cli.config import DTYPE_CHOICES, Deadlines
from disagg_cli.errors import UsageError

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="A model name (see `disagg model list`), "
                                       "a .gguf file or a Hugging Face checkpoint folder.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help=f"Weights and KV dtype: {', '.join(DTYPE_CHOICES)} (auto: bfloat16 "
                                       "where the CPU computes it natively (AVX512-BF16/AMX) or on CUDA, "
                                       "else float32).")]
QuantizationOpt = Annotated[str, typer.Option(help="Weight-only quantization: none, int8, int4 or auto (int4 for "
                                              "decode, float for prefill, both for colocated; the GGUF's own "
                                              "Q8_0/Q4_0/Q4_1 blocks load as they are).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="Torch intra-op threads (default: torch's choice).")]
BlockSizeOpt = Annotated[int, typer.Option(help="Tokens per KV block.")]
KVTokensOpt = Annotated[int | None, typer.Option(help="KV pool size in tokens (default: sized by memory).")]
KVMemoryOpt = Annotated[float, typer.Option(help="KV pool size in MiB when --kv-cache-tokens is not given.")]
MaxSeqsOpt = Annotated[int, typer.Option(help="Most sequences decoding at once.")]
MaxBatchedOpt = Annotated[int, typer.Option(help="Token budget of one engine step.")]
ChunkedOpt = Annotated[bool, typer.Option(help="Split long prompts into chunks that share steps with decodes.")]
PrefixCachingOpt = Annotated[bool, typer.Option("--enable-prefix-caching/--no-enable-prefix-caching",
                                                help="Keep full KV blocks after their request and reuse them for "
                                                     "prompts that start with the same tokens.")]
DisaggThresholdOpt = Annotated[str, typer.Option(
    "--disagg-threshold", help="Selective disaggregation: prompts whose part not cached on their decode worker is "
                               "at most this many tokens are prefilled there, with no transfer; 0: never; auto: "
                               "when that is sooner than a prefill worker and stalls decoding at most a few steps "
                               "(from the workers' measured speeds).")]
RouterOpt = Annotated[str, typer.Option(help="round-robin, least-loaded, or cache-aware (the longest cached prefix "
                                             "weighed against queued work).")]


def disagg_threshold(text: str) -> int | str:
    """`--disagg-threshold`: a token count >= 0, or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"--disagg-threshold takes a token count >= 0 or auto, got {text!r}")
    return value


def cache_dir() -> Path:
    """Where named models are cached (DISAGG_CACHE_DIR, XDG_CACHE_HOME or ~/.cache)."""
    from disagg_cli.model.registry import default_cache_dir

    return default_cache_dir()


def int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers like 1,8,32, got {text!r}") from None


# A request's progress deadlines (config.Deadlines), shared by every command that sends requests.
DEFAULT_DEADLINES = Deadlines()
ReserveTimeoutOpt = Annotated[float, typer.Option("--reserve-timeout", help="Seconds a KV reservation may queue "
                                                  "for decode memory before the request counts as stalled.")]
FirstTokenTimeoutOpt = Annotated[float, typer.Option("--first-token-timeout", help="Seconds from sending a "
                                                     "prompt to its first token before it counts as stalled.")]
TokenTimeoutOpt = Annotated[float, typer.Option("--token-timeout", help="Seconds between tokens (and from the "
                                                "first token to the KV landing) before a request counts as "
                                                "stalled and is retried elsewhere.")]
RequestTimeoutOpt = Annotated[float, typer.Option("--request-timeout", help="Seconds a request may take in all, "
                                                  "retries and waits for a worker to come back included.")]
