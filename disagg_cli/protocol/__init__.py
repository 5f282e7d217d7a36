"""The wire protocol: what crosses a process boundary and how.

- `names.py`: worker roles, codec names, KV dtypes, finish reasons (defined once);
- `messages.py`: every message kind, as frozen dataclasses; `role_messages.py`: elastic roles' `SwitchRole` …;
- `errors.py`: `WireError` and its reason codes;
- `stats.py`: `RequestStats` (per request), `WorkerCapacity` and `WorkerStats` (per worker);
- `frames.py`: messages ⇄ zmq frames, trusting nothing on the way in;
- `schema.py`: type hints as the schema (dataclasses ⇄ msgpack-ready maps, checked).
"""

from disagg_cli.protocol.errors import REASONS, WireError
from disagg_cli.protocol.frames import (
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_RAW_BYTES,
    decode_message,
    encode_message,
)
from disagg_cli.protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    Error,
    FirstToken,
    Frame,
    Generate,
    Heartbeat,
    Hello,
    HelloAck,
    KVDone,
    KVLayers,
    KVLayout,
    KVMeta,
    LinkAck,
    Message,
    Prefill,
    PrefillHere,
    Refuse,
    RequestStats,
    Reserve,
    Reserved,
    Tokens,
)
from disagg_cli.protocol.names import (
    CODEC_NAMES,
    COMPLETED_REASONS,
    DTYPE_BYTES,
    FINISH_REASONS,
    PEER_ROLES,
    WORKER_ROLES,
)
from disagg_cli.protocol.role_messages import MoveOut, Parked, ParkedRequest, RoleSwitched, SwitchRole
from disagg_cli.protocol.stats import WorkerCapacity, WorkerStats

__all__ = [
    "COMPLETED_REASONS",
    "Abort",
    "CODEC_NAMES",
    "DTYPE_BYTES",
    "Error",
    "FINISH_REASONS",
    "FirstToken",
    "Frame",
    "Generate",
    "Heartbeat",
    "Hello",
    "HelloAck",
    "KVDone",
    "KVLayers",
    "KVLayout",
    "KVMeta",
    "LinkAck",
    "MAX_FRAMES",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_RAW_BYTES",
    "Message",
    "MoveOut",
    "Parked",
    "ParkedRequest",
    "PEER_ROLES",
    "PROTOCOL_VERSION",
    "Prefill",
    "PrefillHere",
    "REASONS",
    "Refuse",
    "RequestStats",
    "Reserve",
    "Reserved",
    "RoleSwitched",
    "SwitchRole",
    "Tokens",
    "WORKER_ROLES",
    "WorkerCapacity",
    "WorkerStats",
    "WireError",
    "decode_message",
    "encode_message",
]
