"""How a worker is asked to stop: `StopFlag`, counted, checked by the engine loop between steps."""

from __future__ import annotations

import signal


class StopFlag:
    """Counts stop requests; the engine loop checks it between steps (first: drain, second: now).

    `Worker.request_stop()` sets it from any thread; only a process's main thread may also let
    SIGINT/SIGTERM set it (`on_signals`), so a worker hosted in a thread or an actor never touches
    its host's signal handlers."""

    def __init__(self) -> None:
        self.count = 0

    def set(self) -> None:
        self.count += 1

    def on_signals(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda s, f: self.set())
