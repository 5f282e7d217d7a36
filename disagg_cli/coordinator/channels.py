"""Side channels of a role switch (`role_switch.py`) beside the per-request queues of
`WorkerConnections` (`membership.py`), which routes every reply through `route` first:
- a worker's control channel: its `Parked` and `RoleSwitched` while a switch is asked of it;
- a tap: one request's replies from one worker (a moved request's reservation on its new worker),
  taken ahead of the request's own queue until `untap`.
A worker taken as dead puts `WorkerGone` on both (`lose`), so no switch waits on a dead worker."""

from __future__ import annotations

import asyncio
import logging

from disagg_cli.coordinator.worker_link import WorkerGone, WorkerLink
from disagg_cli.protocol import Message, Parked, RoleSwitched

log = logging.getLogger(__name__)
Reply = tuple[WorkerLink, Message | WorkerGone]


class SwitchChannels:
    def __init__(self) -> None:
        self._control: dict[str, asyncio.Queue[Reply]] = {}
        self._taps: dict[tuple[str, str], asyncio.Queue[Reply]] = {}

    def open_control(self, address: str) -> asyncio.Queue[Reply]:
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._control[address] = queue
        return queue

    def close_control(self, address: str) -> None:
        self._control.pop(address, None)

    def switching(self, address: str) -> bool:
        """Whether a switch of this coordinator's is under way at `address`."""
        return address in self._control

    def tap(self, address: str, request_id: str) -> asyncio.Queue[Reply]:
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._taps[(address, request_id)] = queue
        return queue

    def untap(self, address: str, request_id: str) -> None:
        self._taps.pop((address, request_id), None)

    def route(self, conn: WorkerLink, msg: Message) -> bool:
        """Take `msg` if it belongs to a side channel; False to route it by its request id."""
        address = conn.record.address
        if isinstance(msg, Parked | RoleSwitched):
            control = self._control.get(address)
            if control is None:
                log.warning("%s: %s with no switch asked of it", conn.name, msg.kind)
            else:
                control.put_nowait((conn, msg))
            return True
        rid = getattr(msg, "request_id", None)
        tap = self._taps.get((address, rid)) if isinstance(rid, str) else None
        if tap is None:
            return False
        tap.put_nowait((conn, msg))
        return True

    def lose(self, conn: WorkerLink, reason: str) -> None:
        """The worker is taken as dead: its taps and its control channel hear it."""
        address = conn.record.address
        for (where, _), tap in list(self._taps.items()):
            if where == address:
                tap.put_nowait((conn, WorkerGone(reason)))
        if address in self._control:
            self._control[address].put_nowait((conn, WorkerGone(reason)))
