"""llama.cpp (via llama-cpp-python) as a baseline of `disagg bench engine --against llama-cpp`.

It runs the very GGUF file we load, with the same threads, token ids from the same vocabulary,
and takes turns with our engine rep by rep. llama-cpp-python's API decodes one sequence at a
time, so it has prefill points and batch-1 decode points only. It is never a dependency: without
it, `INSTALL_HINT` says how to get it (in a separate venv or this one; it compiles for minutes).
"""

from __future__ import annotations

import time
from pathlib import Path

INSTALL_HINT = ("llama.cpp baseline skipped: llama_cpp is not importable; install it with "
                "`pip install 'llama-cpp-python==0.3.36'` (it compiles llama.cpp, ~10 min on 2 cores)")


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppEngine:
    name = "llama.cpp"
    gathered_bytes = 0
    max_batch = 1

    def __init__(self, path: Path, threads: int, context: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.version = getattr(llama_cpp, "__version__", "?")
        self.llm = Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)

    def prefill_s(self, ids: list[int]) -> float:
        self.llm.reset()  # no reuse of a cached prefix: the whole prompt is computed
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def decode_s(self, prompts: list[list[int]], steps: int) -> float:
        assert len(prompts) == 1, "llama-cpp-python decodes one sequence at a time"
        self.llm.reset()
        stamps: list[float] = []
        # The first token comes after the prompt's forward; then `steps` single-token forwards.
        for _ in self.llm.generate(prompts[0], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == steps + 1:
                break
        assert len(stamps) == steps + 1, f"llama.cpp stopped after {len(stamps)} tokens"
        return stamps[-1] - stamps[0]
