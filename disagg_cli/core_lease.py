"""Cores lent between local workers: a worker with nothing to compute lends its cores to the others.

On 2 cores, one prefill and one decode worker each own one core, and whichever has no work leaves
its core idle while the other's work waits (at rate inf the prefill worker is the bottleneck while
the decode worker waits for KV). A lease fixes that without moving work between processes:

1. the local cluster (`coordinator/cluster.py`) makes a lease file of one 64-byte slot per worker
   (`create`) and gives each worker its slot, every worker's own thread count and the cores of all
   of them (`LendConfig`);
2. the worker sets its affinity to all those cores, maps the file and hands it to the C kernel
   (`CoreLease.attach`); its loop marks its slot busy while it has requests to step and idle while
   it waits for messages (`set_busy`);
3. every parallel job of the kernel (a matmul, an attention, a fused decode step's parts) reads
   the slots when it starts and runs on the worker's own threads plus those of every idle worker.
   An owner that gets work back marks itself busy at once; the borrower gives the core back at its
   next job (a matmul of a prompt step: milliseconds).

Only the C kernel's jobs borrow (torch's own ops keep the worker's threads), so `--kernel torch`
workers never lend or borrow. Threads never change a result: each output is computed by one
thread, whichever. A worker that dies busy lends nothing until it is restarted on its slot.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLOT_BYTES = 64  # one cache line per worker: the owner's writes never share a line with another's
_SLOT_INTS = SLOT_BYTES // 4


@dataclass(frozen=True, slots=True)
class LendConfig:
    """A worker's part of a lease: the file, its slot, each slot's own threads, the cores of all."""

    path: str
    slot: int
    threads: tuple[int, ...]  # by slot: each worker's own threads (what it lends while idle)
    cpus: tuple[int, ...]  # every core of the workers in the lease: this worker's affinity

    def __post_init__(self) -> None:
        if not 0 <= self.slot < len(self.threads) or min(self.threads, default=0) < 1 or not self.cpus:
            raise ValueError(f"not a lease: slot {self.slot} of threads {list(self.threads)}, cpus {list(self.cpus)}")


def create(path: Path, slots: int) -> None:
    """A lease file of `slots` slots, every worker busy until it says otherwise (none lends before
    its loop runs: a loading worker's cores are not free)."""
    data = bytearray(slots * SLOT_BYTES)
    for i in range(slots):
        data[i * SLOT_BYTES] = 1
    path.write_bytes(bytes(data))


def lendable(threads: list[int], cpus: list[tuple[int, ...]]) -> bool:
    """Whether workers with these threads and cores can share a lease: two or more, each with cores
    of its own (disjoint), each using as many threads as it has cores (a worker that already shares
    a core with another has none to lend)."""
    if len(cpus) < 2:
        return False
    flat = [c for own in cpus for c in own]
    return len(flat) == len(set(flat)) and all(t == len(own) for t, own in zip(threads, cpus, strict=True))


class CoreLease:
    """This process's view of its lease (one per process: the kernel keeps a pointer into the map)."""

    _open: dict[str, CoreLease] = {}
    _attached: CoreLease | None = None  # the one the kernel reads, once attached

    def __init__(self, config: LendConfig) -> None:
        self.config = config
        fd = os.open(config.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, len(config.threads) * SLOT_BYTES)
        finally:
            os.close(fd)
        self._ints = memoryview(self._map).cast("i")
        self._threads = (ctypes.c_int * len(config.threads))(*config.threads)
        self._busy: bool | None = None

    @classmethod
    def open(cls, config: LendConfig) -> CoreLease:
        """The lease of `config`, mapped once per process and kept for its life (a role switch
        builds a new worker on the same lease; the kernel must never see the map go)."""
        if config.path not in cls._open:
            cls._open[config.path] = CoreLease(config)
        return cls._open[config.path]

    def attach(self, lib: Any) -> None:
        """Let the kernel `lib` (its `dq_set_lease`) borrow idle workers' threads from now on."""
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        if lib.dq_set_lease(address, len(self.config.threads), self.config.slot, ctypes.addressof(self._threads)):
            raise ValueError(f"the kernel refused lease {self.config}")
        CoreLease._attached = self

    @classmethod
    def detach(cls, lib: Any) -> None:
        """The kernel `lib` runs on each job's own threads again."""
        lib.dq_set_lease(None, 0, 0, None)
        cls._attached = None

    @classmethod
    def attached(cls) -> CoreLease | None:
        """The lease this process's kernel borrows by, if any (its worker loop marks it busy or idle)."""
        return cls._attached

    def set_busy(self, busy: bool) -> None:
        """Mark this worker as having work (its cores are its own) or not (lent)."""
        if busy != self._busy:
            self._ints[self.config.slot * _SLOT_INTS] = int(busy)
            self._busy = busy

    def busy(self) -> list[bool]:
        """Every slot's flag, by slot."""
        return [bool(self._ints[i * _SLOT_INTS]) for i in range(len(self.config.threads))]
