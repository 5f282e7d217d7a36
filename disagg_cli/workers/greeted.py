"""The peers a worker has greeted, remembered within a bound.

A ROUTER socket names each connection by an identity, and a peer must say `Hello` before anything
else; so the I/O thread remembers which identities greeted it. zmq does not tell a ROUTER when a
peer goes away (its disconnect notices are a draft API), so without a bound a flood of hellos from
fresh connections would grow this set for ever. At most `cap` peers are kept, in two tiers:
1. `greet`: a peer that said `Hello` joins the quiet tier (most recent last);
2. `heard`: the first message after that moves it to the active tier, and every later one to
   that tier's end (coordinators heartbeat every second, prefill workers stream KV);
3. past `cap`, the longest-quiet peer that never spoke after hello is forgotten first; only when
   none is left, the least recently heard active one. A forgotten peer that speaks again is told
   `no-hello` and greets anew (a worker's link retires and its requests are retried).
So a flood of bare hellos forgets only itself. Owned by the I/O thread; not thread-safe.
"""

from __future__ import annotations

from collections import OrderedDict

# Peers greeted at once: coordinators and prefill workers, a few dozen in a big deployment.
MAX_GREETED_PEERS = 1024


class GreetedPeers:
    def __init__(self, cap: int = MAX_GREETED_PEERS) -> None:
        assert cap >= 1
        self.cap = cap
        self._quiet: OrderedDict[bytes, None] = OrderedDict()  # hello only, oldest first
        self._active: OrderedDict[bytes, None] = OrderedDict()  # least recently heard first

    def __len__(self) -> int:
        return len(self._quiet) + len(self._active)

    def __contains__(self, who: bytes) -> bool:
        return who in self._active or who in self._quiet

    def greet(self, who: bytes) -> None:
        """`who` said hello (again, perhaps)."""
        if who in self._active:
            self._active.move_to_end(who)
            return
        if who in self._quiet:
            self._quiet.move_to_end(who)
            return
        while len(self) >= self.cap:  # make room; the newcomer itself is always kept
            (self._quiet if self._quiet else self._active).popitem(last=False)
        self._quiet[who] = None

    def heard(self, who: bytes) -> bool:
        """`who` sent something other than hello: True when it had greeted us (and is remembered)."""
        if who in self._active:
            self._active.move_to_end(who)
            return True
        if who in self._quiet:
            del self._quiet[who]
            self._active[who] = None
            return True
        return False
