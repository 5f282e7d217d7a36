"""Compiling `kernel.c` for this CPU: the compiler, the cache key and the build itself.

1. `build_kernel(cache_dir)` compiles `kernel.c` with the system C compiler (`-O3 -march=native
   -pthread`) into `<cache>/kernels/<hash>/libdisaggq.so`, the hash covering the source, the
   compiler's version and the CPU's flags, so a new CPU or compiler gets its own build and a
   fresh clone needs nothing beyond `pip install -e .`;
2. the build goes to a temporary name and is renamed into place, so workers starting together
   never load a half-written file;
3. when there is no compiler or the build fails, it raises `KernelUnavailable` saying why, and the
   backend choice (`model/backend.py`) decides what that means: `--kernel auto` takes torch,
   `--kernel c` stops with that reason.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernel.c")
LIB_NAME = "libdisaggq.so"


class KernelUnavailable(RuntimeError):
    """The C kernel cannot be had on this machine; the message says why."""


def cpu_flags() -> str:
    """The CPU's feature flags (Linux /proc/cpuinfo), or the machine name where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def compiler() -> str | None:
    """The C compiler a build would use: $CC, else gcc or cc on PATH."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build_key(cc: str, source: bytes) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256(source)
    for part in (version, cpu_flags(), platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_kernel(cache_dir: Path) -> Path:
    """Compile (or find the cached build of) the kernel library; raise KernelUnavailable with the reason."""
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler (gcc or cc) on PATH, and CC is not set")
    source = SOURCE.read_bytes()
    out_dir = cache_dir / "kernels" / build_key(cc, source)
    lib = out_dir / LIB_NAME
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    base = [cc, "-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=gnu11", str(SOURCE), "-o", tmp, "-lm"]
    # With OpenMP first (the work between torch's ops then runs on torch's own OpenMP threads), and
    # without it where the compiler has none (a clang without libomp): the library's own pool then.
    for cmd in (base[:4] + ["-fopenmp"] + base[4:], base):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            os.unlink(tmp)
            raise KernelUnavailable(f"the C compiler {cc} failed to run: {e}") from e
        if done.returncode == 0:
            break
    if done.returncode != 0:
        os.unlink(tmp)
        first = (done.stderr.strip().splitlines() or ["no output"])[0]
        raise KernelUnavailable(f"{' '.join(cmd[:5])} … exited {done.returncode}: {first}")
    os.replace(tmp, lib)
    return lib
