"""How each message the I/O thread hands the engine loop reaches the role, and how it is refused.

`MessageIntake` is the part of a `Worker` (`workers/worker.py`) that takes what arrived: `Abort`
and a silent coordinator's orphans end requests here; while draining or switching roles, a message
that starts a request is refused ("draining"); every other message has its fields checked
(`workers/checks.py`) before the role's `handle` (or the role switch, for `SwitchRole` and
`MoveOut`) sees it. A message that fails its checks, or raises while handled, fails only the
request it belongs to (`_refuse`), never the loop. Kept apart from the loop, the engine steps and
the stats (`worker.py`), which calls `_drain` once per turn; `Worker` sets the state it reads
(listed on the class).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

from disagg_cli.config import WorkerConfig
from disagg_cli.protocol import Abort, Error, Generate, MoveOut, Prefill, Reserve, SwitchRole, WireError
from disagg_cli.workers.base import CoordinatorGone, Dest, log
from disagg_cli.workers.checks import Limits, check_message
from disagg_cli.workers.stop import StopFlag
from disagg_cli.workers.switch import RoleSwitch

# Messages that start a request: refusing one must not touch a request of the same id already here.
_STARTS = (Prefill, Reserve, Generate)


class MessageIntake:
    """Messages into a `Worker`'s role; see the module docstring."""

    # Set by `Worker`, which this is a part of.
    config: WorkerConfig
    stop: StopFlag
    switch: RoleSwitch | None
    limits: Limits
    io: Any
    address: str
    requests: dict[str, Any]  # the role's records (`WorkerRequest`s), by request id
    abort: Callable[..., None]
    handle: Callable[[Dest, Any], None]
    begin_switch: Callable[[], None]

    def _drain(self, block: bool) -> None:
        try:
            item = self.io.inbox.get(timeout=0.2) if block else self.io.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            dest, msg = item
            try:
                if isinstance(msg, Abort):
                    self.abort(msg.request_id, notify=False)
                elif isinstance(msg, CoordinatorGone):
                    self._abort_orphans(msg)
                elif (self.stop.count or self.switch) and isinstance(msg, _STARTS):
                    why = "is shutting down" if self.stop.count or self.switch is None else \
                        f"is switching to {self.switch.role}"
                    self.io.send(dest, Error(msg.request_id, "draining", f"{self.config.role} worker {self.address} "
                                                                         f"{why}"))
                else:
                    check_message(self.limits, msg)
                    if isinstance(msg, SwitchRole | MoveOut):
                        self._switch_message(dest, msg)
                    else:
                        self.handle(dest, msg)
            except WireError as e:
                self._refuse(dest, msg, e.reason, e.detail)
            except Exception as e:  # a bug or a value no check foresaw: this request's, not the loop's
                self._refuse(dest, msg, "internal-error", f"{type(e).__name__}: {e}", broke=True)
            try:
                item = self.io.inbox.get_nowait()
            except queue.Empty:
                return

    def _switch_message(self, dest: Dest, msg: SwitchRole | MoveOut) -> None:
        if isinstance(msg, MoveOut):
            if self.switch is None:
                self.io.send(dest, Error(msg.request_id, "unknown", f"{self.address} is not switching roles"))
            else:
                self.switch.move_out(dest, msg)
            return
        switch = RoleSwitch(self, dest, msg)
        refused = switch.refusal(self.switch, bool(self.stop.count))
        if refused or msg.role == self.config.role:
            self.io.send(dest, switch.answer(refused))
            return
        self.switch = switch
        self.begin_switch()

    def _refuse(self, dest: Dest, msg: Any, reason: str, text: str, broke: bool = False) -> None:
        """Fail the request `msg` belongs to, or answer its sender when none lives here; `broke`: the
        message raised half-way, so whatever it set up for its request is undone too."""
        rid = getattr(msg, "request_id", None)
        rid = rid if isinstance(rid, str) else None
        log(self.config.role, f"refused {getattr(msg, 'kind', type(msg).__name__)} of request {rid!r:.60}: "
                              f"{text:.300} [{reason}]")
        if isinstance(msg, Error):
            return  # answering an error with one could ping-pong between two workers forever
        mine = rid is not None and rid in self.requests and (broke or not isinstance(msg, _STARTS))
        if rid is not None and mine:
            self.abort(rid, notify=True, reason=reason, message=text)
            return
        if rid is not None and broke:
            self.abort(rid, notify=False)
        if dest[0] == "router":  # a peer connected to us; events of our own links have no one to tell
            self.io.send(dest, Error(rid, reason, text))

    def _abort_orphans(self, gone: CoordinatorGone) -> None:
        """Abort the requests of a coordinator that went silent (killed, cut off, hung)."""
        orphans = [rid for rid, r in self.requests.items() if r.owner == ("router", gone.who)]
        if orphans:
            log(self.config.role, f"a coordinator was silent for over {self.config.client_timeout_s:g} s; "
                                  f"aborting its {len(orphans)} request(s)")
        for rid in orphans:
            self.abort(rid, notify=False)
