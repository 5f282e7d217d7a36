"""Elastic roles' messages on the wire (protocol 6): each one round-trips; a role that is no role is
refused where it enters, in `WorkerStats` (the coordinator's side) and in `SwitchRole` and
`MoveOut` (a worker's, `workers/checks.py`)."""

from __future__ import annotations

import dataclasses

import pytest

from disagg_cli.protocol import (
    PROTOCOL_VERSION,
    Heartbeat,
    MoveOut,
    Parked,
    ParkedRequest,
    RoleSwitched,
    SwitchRole,
    WireError,
    decode_message,
    encode_message,
)
from disagg_cli.workers.checks import Limits, check_message
from tests.protocol.test_worker_stats import STATS

LIMITS = Limits(vocab_size=100, context_tokens=64, num_layers=2, num_kv_heads=1, head_dim=4, fingerprint="fp")


@pytest.mark.parametrize("msg", [
    SwitchRole("prefill", move=True),
    Parked((ParkedRequest("r1", (1, 2, 3), 5), ParkedRequest("r2", (4,), 2))),
    MoveOut("r1", "tcp://127.0.0.1:5000", "abcd", 16),
    RoleSwitched("decode", "prefill", 4, 1, 12.5),
    RoleSwitched("decode", "decode", 0, 0, 0.1, refused="it was not started --elastic"),
    Heartbeat(3, dataclasses.replace(STATS, role="colocated", switching_to="prefill")),
])
def test_round_trip(msg: object) -> None:
    assert PROTOCOL_VERSION == 7
    assert decode_message(encode_message(msg)) == msg


def test_worker_stats_say_the_role_and_refuse_another_word() -> None:
    assert dataclasses.replace(STATS, role="decode").role == "decode"
    assert "role" not in dataclasses.replace(STATS, role="decode").as_dict()  # a name, not a figure
    with pytest.raises(WireError, match="role 'janitor'"):
        dataclasses.replace(STATS, role="janitor")
    with pytest.raises(WireError, match="switching_to 'up'"):
        dataclasses.replace(STATS, role="decode", switching_to="up")


@pytest.mark.parametrize(("msg", "match"), [
    (SwitchRole("janitor"), "role 'janitor' is not one of"),
    (MoveOut("r", "http://x:1"), "decode_addr"),
    (MoveOut("r", "tcp://h:1", "x" * 65), "decode_instance"),
    (MoveOut("r", "tcp://h:1", cached_tokens=-1), "cached_tokens -1"),
])
def test_worker_checks_switch_fields(msg: object, match: str) -> None:
    with pytest.raises(WireError, match=match):
        check_message(LIMITS, msg)


def test_good_switch_fields_pass() -> None:
    check_message(LIMITS, SwitchRole("colocated"))
    check_message(LIMITS, MoveOut("r", "tcp://127.0.0.1:1", "abc", 0))
