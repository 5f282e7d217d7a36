"""One worker process of a local cluster: its spec, address, process and log (`cluster.py` starts it,
`supervisor.py` starts it again when it exits)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from disagg_cli.coordinator.topology import WorkerSpec


@dataclass
class WorkerProcess:
    spec: WorkerSpec  # with port, threads and cpus filled in
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def name(self) -> str:
        return f"{self.spec.role} worker {self.address}"

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""
