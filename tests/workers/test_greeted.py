"""The greeted-peer set stays within its bound and, under a flood of bare hellos, forgets only
peers that never spoke after their hello."""

from __future__ import annotations

from disagg_cli.workers.greeted import GreetedPeers


def test_a_flood_of_bare_hellos_forgets_only_itself() -> None:
    peers = GreetedPeers(cap=4)
    for who in (b"coordinator", b"prefill"):
        peers.greet(who)
        assert peers.heard(who)
    for i in range(1000):
        peers.greet(b"stranger-%d" % i)
        assert len(peers) <= 4
    assert b"coordinator" in peers and b"prefill" in peers
    assert b"stranger-999" in peers and b"stranger-0" not in peers
    assert not peers.heard(b"stranger-0")  # forgotten: it would be told no-hello


def test_when_every_peer_is_active_the_least_recently_heard_goes() -> None:
    peers = GreetedPeers(cap=3)
    for who in (b"a", b"b", b"c"):
        peers.greet(who)
        peers.heard(who)
    peers.heard(b"a")  # b is now the least recently heard
    peers.greet(b"d")
    assert len(peers) == 3 and b"b" not in peers and all(w in peers for w in (b"a", b"c", b"d"))
    peers.greet(b"a")  # a hello again keeps it active, not quiet
    peers.greet(b"e")  # evicts the quiet newcomer d before any active peer
    assert b"d" not in peers and all(w in peers for w in (b"a", b"c", b"e"))


def test_an_unknown_peer_is_not_heard() -> None:
    peers = GreetedPeers(cap=2)
    assert not peers.heard(b"x") and len(peers) == 0
