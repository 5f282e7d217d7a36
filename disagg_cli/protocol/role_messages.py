"""The elastic-role messages: a worker changes role in place (`coordinator/role_switch.py`,
`workers/switch.py`), registered with the other kinds of `messages.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg_cli.protocol.messages import Message, _message

# --- elastic roles: a worker changes role in place (`coordinator/role_switch.py`) -------------
#
# 1. coordinator → worker: `SwitchRole(role, move)`. The coordinator has stopped routing new
#    requests there. The worker refuses new ones ("draining"), lets prompts in flight finish and
#    reservations whose KV is on its way land;
# 2. with `move` (another decode worker can take them) and a new role that does not decode, each
#    request it is decoding is parked between engine steps (out of the running batch, its KV kept)
#    and listed in `Parked` (its tokens so far); without, they decode here to the end;
# 3. per parked request, the coordinator reserves blocks on a decode worker for all its tokens but
#    the last (`Reserve`, `Reserved`, as for a prompt), then coordinator → worker: `MoveOut`; the
#    worker streams that KV to the target as a prefill worker does (`KVLayers`, then `KVDone` with
#    the last token and the sampler state) and frees its blocks; the target decodes on from the
#    next token and streams `Tokens` to the coordinator;
# 4. once no request is left here (between decode and colocated, both of which decode, the decoding
#    ones stay, adopted by the new role), the worker takes the new role (weights, pool and prefix
#    cache kept) and answers `RoleSwitched`.


@_message("switch_role")
@dataclass(frozen=True, slots=True)
class SwitchRole(Message):
    role: str  # "prefill", "decode" or "colocated"
    move: bool = False  # another decode worker can take this worker's decoding requests with their KV


@dataclass(frozen=True, slots=True)
class ParkedRequest:
    """A decoding request taken out of the running batch to be moved: every token it has (prompt and
    outputs; the KV of all but the last is in the pool) and how many outputs it may still make."""

    request_id: str
    token_ids: tuple[int, ...]
    max_tokens: int  # outputs left to make after the last of `token_ids`, plus that one


@_message("parked_requests")
@dataclass(frozen=True, slots=True)
class Parked(Message):
    requests: tuple[ParkedRequest, ...]


@_message("move_out")
@dataclass(frozen=True, slots=True)
class MoveOut(Message):
    """To a switching worker: stream parked request `request_id`'s KV to the decode worker at
    `decode_addr` (instance `decode_instance`), which holds its first `cached_tokens` already."""

    request_id: str
    decode_addr: str
    decode_instance: str = ""
    cached_tokens: int = 0


@_message("role_switched")
@dataclass(frozen=True, slots=True)
class RoleSwitched(Message):
    previous: str
    role: str
    moved: int  # requests whose KV left for another worker
    finished: int  # requests that ended here during the switch (decoded to the end, refused, aborted)
    elapsed_ms: float  # `SwitchRole` arrived → the new role took over; this worker's clock
    refused: str = ""  # why the worker did not switch (not elastic, already switching); "" when it did
    kept: int = 0  # requests decoding there that decode on in the new role (decode ⇄ colocated)
