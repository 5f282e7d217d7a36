"""Which worker serves the next request: the coordinator's view of its workers and the policies.

Pure: no sockets, no clock of its own. The router owns its `WorkerRecord`s: others read them and
change them only through its methods, called by `WorkerConnections` (`membership.py`) and the
`Coordinator` (`coordinator.py`):
1. a `WorkerRecord` per worker (`add`, `remove`); `note_capacity` sizes its prefix view from the
   hello answer;
2. `pick(role)` chooses a live worker and counts the request in flight there; `queue_prefill` /
   `unqueue_prefill` count a prompt's tokens a prefill worker has yet to compute, `note_cached`
   what a worker's prefix cache now holds;
3. heartbeats refresh `last_stats` (`note_stats`: the worker's own queue and pool figures);
4. `release(record)` when the request ends there; `mark_dead` when the worker falls silent,
   `mark_alive` when it answers again;
5. `begin_switch` / `end_switch` around a change of the worker's role (elastic roles): routable
   (`WorkerRecord.routable`) only outside one.

Policies: `round-robin` cycles through live workers of the role in the order given;
`least-loaded` takes the smallest in-flight + waiting count, then the most free KV blocks, then
the earliest listed; `cache-aware` weighs each worker's cached prefix of the prompt against its
load (as SGLang's cache_aware router and Dynamo's KV router do):
- a prefill worker's cost is the prompt tokens it has yet to compute for requests routed there
  (queued work) plus the tokens of this prompt it does not hold: the shortest time to first token;
- decode workers are balanced first (those within one request of the least loaded), then the one
  holding the longest prefix wins (fewer KV bytes cross the wire).
What a worker holds is this coordinator's own view (`PrefixView`): the block hashes of what it
routed there, bounded by the worker's pool and forgotten oldest first, as the worker's LRU does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from disagg_cli.coordinator.predictions import prefill_rate_or_borrowed
from disagg_cli.errors import DisaggError, UsageError
from disagg_cli.kv.pool import BlockHash, hash_blocks
from disagg_cli.protocol import WORKER_ROLES, WorkerCapacity, WorkerStats

POLICIES = ("round-robin", "least-loaded", "cache-aware")
_BALANCE_SLACK = 1  # cache-aware decode: workers this close to the least loaded compete on prefix


# `--disagg-threshold auto` before any worker has measured its speed: a few blocks' worth.
AUTO_THRESHOLD_FALLBACK = 64
_ITL_BUDGET_STEPS = 4  # a local prefill may stall the decode batch this many of its steps…
_ITL_BUDGET_MIN_S = 0.1  # …or this long, whichever is more
_HOP_S = 0.02  # what the disaggregated path adds beyond compute: two extra hops and a transfer


def local_prefill_pays(uncached: int, decode: WorkerRecord, prefills: Sequence[WorkerRecord]) -> bool:
    """`--disagg-threshold auto`: compute a prompt's uncached part on its decode worker when that is
    both sooner than the first token could come from a prefill worker (its queued work plus this
    prompt, at its measured speed, plus the hops) and short enough not to stall the decode batch
    for more than a few of its steps; from the workers' heartbeat figures (`prefill_tokens_per_s`,
    `decode_step_ms`)."""
    rates = [_prefill_rate(w) for w in prefills]
    rate_p = max(rates, default=0.0)
    rate_d = _prefill_rate(decode)
    if rate_d <= 0 and rate_p > 0:  # not measured here yet: a prefill worker's, per thread
        threads_p = max(1.0, _threads(prefills[rates.index(rate_p)]))
        rate_d = rate_p * max(1.0, _threads(decode)) / threads_p
    if rate_d <= 0:
        return uncached <= AUTO_THRESHOLD_FALLBACK
    stall_s = uncached / rate_d
    step_ms = decode.last_stats.decode_step_ms if decode.last_stats is not None else 0.0
    budget_s = max(_ITL_BUDGET_MIN_S, _ITL_BUDGET_STEPS * step_ms / 1e3)
    if not prefills:
        return stall_s <= budget_s
    remote_s = min((w.queued_tokens + uncached) / r if r > 0 else float("inf")
                   for w, r in zip(prefills, rates, strict=True)) + _HOP_S
    return stall_s <= budget_s and stall_s <= remote_s


def prompt_wait_s(w: WorkerRecord, prompt_tokens: int, others: Sequence[WorkerRecord]) -> float:
    """Seconds until a prompt of `prompt_tokens` sent to worker `w` would be computed: the prompt tokens
    queued there and its own at the speed it measured; until it has, as fast per thread as the
    fastest of `others` that has (the planner's borrowing)."""
    rate = prefill_rate_or_borrowed(_prefill_rate(w), _threads(w), ((_prefill_rate(o), _threads(o)) for o in others))
    return (w.queued_tokens + prompt_tokens) / rate


def _prefill_rate(w: WorkerRecord) -> float:
    """Prompt tokens per second the worker measured (0 until measured or heard)."""
    return w.last_stats.prefill_tokens_per_s if w.last_stats is not None else 0.0


def _threads(w: WorkerRecord) -> float:
    return max(1.0, float(w.last_stats.threads)) if w.last_stats is not None else 1.0


class NoWorkerError(DisaggError):
    """No live worker of a role is left to take a request."""


class PrefixView:
    """The block hashes this coordinator believes a worker's prefix cache holds, LRU-bounded."""

    def __init__(self, block_size: int = 16, capacity: int = 1 << 16) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self._blocks: OrderedDict[BlockHash, None] = OrderedDict()

    def hashes(self, token_ids: Sequence[int]) -> list[BlockHash]:
        return hash_blocks(token_ids, self.block_size)

    def match_tokens(self, hashes: Sequence[BlockHash]) -> int:
        """Leading prompt tokens held, by the view (full blocks only)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n * self.block_size

    def insert(self, hashes: Sequence[BlockHash]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()

    def __len__(self) -> int:
        return len(self._blocks)


@dataclass
class WorkerRecord:
    address: str
    role: str
    num_inflight: int = 0  # requests this coordinator has routed here and not yet seen end
    last_stats: WorkerStats | None = None  # the last heartbeat's figures; None until one is answered
    is_alive: bool = True
    prefix: PrefixView = field(default_factory=PrefixView)  # what its prefix cache holds, as we think
    queued_tokens: int = 0  # prompt tokens routed here to compute whose first token has not come
    max_step_ms: float = 0.0  # its hello's: the step time it cuts prompt chunks to while decoding; 0: none
    switching: bool = False  # changing role (`coordinator/role_switch.py`): alive, but takes no new request

    @property
    def routable(self) -> bool:
        """Alive and taking new requests."""
        return self.is_alive and not self.switching

    @property
    def stats(self) -> dict[str, float]:
        """The last heartbeat's figures by name, for display ({} until one is answered)."""
        return self.last_stats.as_dict() if self.last_stats is not None else {}

    @property
    def load(self) -> float:
        return self.num_inflight + (self.last_stats.waiting if self.last_stats is not None else 0)

    @property
    def free_blocks(self) -> float:
        return float(self.last_stats.free_blocks) if self.last_stats is not None else 0.0


class Router:
    def __init__(self, workers: list[WorkerRecord], policy: str = "round-robin") -> None:
        if policy not in POLICIES:
            raise UsageError(f"--router must be one of {', '.join(POLICIES)}, got {policy!r}")
        for w in workers:
            assert w.role in WORKER_ROLES, w.role
        addresses = [w.address for w in workers]
        assert len(set(addresses)) == len(addresses), f"duplicate worker addresses in {addresses}"
        self.workers = list(workers)
        self.policy = policy
        self._next: dict[str, int] = {}  # role → index into that role's list for round-robin

    def by_role(self, role: str) -> list[WorkerRecord]:
        return [w for w in self.workers if w.role == role]

    def get(self, address: str) -> WorkerRecord:
        for w in self.workers:
            if w.address == address:
                return w
        raise KeyError(address)

    def pick(self, role: str, avoid: Collection[str] = (), prompt_ids: Sequence[int] = ()) -> WorkerRecord:
        """A live worker of `role`, counted as having one more request in flight; workers whose
        address is in `avoid` (they stalled this request before) only when no other is alive;
        `prompt_ids` is what the cache-aware policy matches against each worker's cached prefix."""
        everyone = self.by_role(role)
        live = [w for w in everyone if w.routable]
        if not live:
            known = ", ".join(w.address for w in everyone) or "none configured"
            raise NoWorkerError(f"no live {role} worker left (known: {known})")
        if any(w.address not in avoid for w in live):
            live = [w for w in live if w.address not in avoid]
        if self.policy == "round-robin":
            start = self._next.get(role, 0)
            # Walk from the cursor over the full list so a dead worker's turn passes to the next.
            for step in range(len(everyone)):
                w = everyone[(start + step) % len(everyone)]
                if w in live:
                    self._next[role] = (start + step + 1) % len(everyone)
                    break
        elif self.policy == "least-loaded":
            w = min(live, key=lambda r: (r.load, -r.free_blocks, everyone.index(r)))
        else:
            w = self._cache_aware(role, live, everyone, prompt_ids)
        w.num_inflight += 1
        return w

    def _cache_aware(self, role: str, live: list[WorkerRecord], everyone: list[WorkerRecord],
                     prompt_ids: Sequence[int]) -> WorkerRecord:
        held = {w.address: w.prefix.match_tokens(w.prefix.hashes(prompt_ids)) for w in live}
        if role == "decode":
            least = min(w.load for w in live)
            close = [w for w in live if w.load <= least + _BALANCE_SLACK]
            return min(close, key=lambda r: (-held[r.address], r.load, everyone.index(r)))
        return min(live, key=lambda r: (r.queued_tokens + len(prompt_ids) - held[r.address], r.load,
                                        everyone.index(r)))

    def add(self, record: WorkerRecord) -> None:
        assert record.role in WORKER_ROLES, record.role
        assert all(w.address != record.address for w in self.workers), record.address
        self.workers.append(record)

    def remove(self, address: str) -> None:
        self.workers.remove(self.get(address))

    def release(self, record: WorkerRecord) -> None:
        assert record.num_inflight > 0, f"release without pick on {record.address}"
        record.num_inflight -= 1

    def note_stats(self, address: str, stats: WorkerStats | None) -> None:
        self.get(address).last_stats = stats

    def note_capacity(self, address: str, capacity: WorkerCapacity) -> None:
        """The worker's hello answer: what its prefix cache can hold (nothing with caching off), and
        how long it lets a step that decodes run."""
        record = self.get(address)
        record.prefix = PrefixView(capacity.block_size if capacity.block_size > 0 else 16,
                                   capacity.num_blocks if capacity.prefix_caching else 0)
        record.max_step_ms = capacity.max_step_ms

    def queue_prefill(self, record: WorkerRecord, prompt_ids: Sequence[int]) -> int:
        """A prompt sent to prefill (or colocated) worker `record`: count the tokens it has yet to compute (those
        its cache lacks, by our view) as queued there and note its blocks as cached; returns that
        count, for `unqueue_prefill` once its first token comes."""
        hashes = record.prefix.hashes(prompt_ids[:-1])
        tokens = len(prompt_ids) - record.prefix.match_tokens(hashes)
        record.queued_tokens += tokens
        record.prefix.insert(hashes)
        return tokens

    def unqueue_prefill(self, record: WorkerRecord, tokens: int) -> None:
        record.queued_tokens -= tokens

    def note_cached(self, record: WorkerRecord, token_ids: Sequence[int]) -> None:
        """The worker computed `token_ids`: its prefix cache holds their full blocks."""
        record.prefix.insert(record.prefix.hashes(token_ids))

    def mark_dead(self, address: str) -> None:
        self.get(address).is_alive = False

    def begin_switch(self, address: str) -> WorkerRecord:
        """A worker is changing role: no new request goes there until `end_switch`."""
        w = self.get(address)
        w.switching = True
        return w

    def end_switch(self, address: str, role: str | None) -> None:
        """The switch ended: the worker takes requests of `role` (None: the switch failed, its role
        is what it was). Its prefix cache went with it, so our view of it stays."""
        assert role is None or role in WORKER_ROLES, role
        w = self.get(address)
        w.switching = False
        if role is not None:
            w.role = role
            self._next.pop(role, None)

    def follow(self, address: str, role: str, switching_to: str) -> bool:
        """A worker's own word on its role (a heartbeat, a hello answer): the truth where no switch
        of ours is under way (one that timed out or was cancelled, a worker restarted as configured).
        True when the record changed."""
        w = self.get(address)
        switching = bool(switching_to)
        if role not in WORKER_ROLES or (w.role, w.switching) == (role, switching):
            return False
        w.role, w.switching = role, switching
        self._next.pop(role, None)
        return True

    def roles(self) -> dict[str, str]:
        """Each worker's role now, by address (for /metrics and the planner)."""
        return {w.address: w.role for w in self.workers}

    def mark_alive(self, address: str) -> None:
        """A worker that was taken as dead answered a new hello (restarted): route to it again."""
        w = self.get(address)
        w.is_alive = True
        w.last_stats = None
        w.prefix.clear()  # a restarted worker starts with an empty cache
