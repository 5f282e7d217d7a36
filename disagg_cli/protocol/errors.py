"""What a message that cannot be trusted raises: `WireError`, with one of the `REASONS` codes that
travel back in an `Error`. Pure: the coordinator imports it without loading torch."""

from __future__ import annotations

import typing

from disagg_cli.errors import DisaggError

REASONS = frozenset(
    [
        "bad-version",
        "bad-msgpack",
        "unknown-kind",
        "oversized",
        "truncated",
        "bad-checksum",
        "bad-payload",
        "fingerprint-mismatch",
        "bad-field",
    ]
)


class WireError(DisaggError):
    """A message that cannot be trusted; `reason` is a short code, `request_id` set when known."""

    def __init__(self, reason: str, message: str, request_id: str | None = None) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.request_id = request_id
        self.detail = message
        where = f"request {request_id!r}: " if request_id is not None else ""
        super().__init__(f"{where}{message} [{reason}]")


def bad_field(message: str, request_id: str | None = None) -> typing.NoReturn:
    """Raise `WireError("bad-field")`: a field of the message holds what this side cannot use."""
    raise WireError("bad-field", message, request_id)


