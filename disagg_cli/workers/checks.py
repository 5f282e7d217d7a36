"""What a worker checks of every wire field it uses, before it uses it.

The schema (`protocol/schema.py`) checks types, and `SamplingParams` its own ranges; these check
values against this worker's model: token ids inside the vocabulary, prompt plus `max_tokens`
inside the context, a sampler state torch can load, a decode address zmq can connect to, KV headers
that fit the reservation they fill. A failed check raises `WireError("bad-field")` naming the field,
what was expected and what came; the worker answers it with a typed `Error` and goes on serving.

`ReservedKV` is the decode worker's one structure shared by both threads: which requests may
receive KV and how much. Life of a request's window:
1. the engine thread opens it when the reservation is admitted, before `Reserved` goes out (the
   prefill worker sends KV only after the coordinator got `Reserved`, so KV never beats it);
2. the I/O thread checks each `KVLayers` header against it before decompressing anything, and
   takes the message's share of the budget (each layer of each uncached prompt token comes once);
3. the engine thread closes it when the request stops taking KV (`KVDone`, `PrefillHere`, abort).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, NoReturn

from disagg_cli.model.loader import LoadedModel
from disagg_cli.model.sampling import state_problem
from disagg_cli.protocol import (
    DTYPE_BYTES,
    WORKER_ROLES,
    Generate,
    KVDone,
    KVLayers,
    MoveOut,
    Prefill,
    Reserve,
    SwitchRole,
    WireError,
)

MAX_REQUEST_ID_CHARS = 512  # ids are dict keys and go into every answer; ours are ~40 characters
MAX_INSTANCE_CHARS = 64  # an `instance_id` is 16 hex digits
# Where a prefill worker may be told to stream KV: what zmq connects a DEALER to.
_ENDPOINT = re.compile(r"tcp://[^\s/]{1,253}:\d{1,5}|ipc://[^\s]{1,200}")


@dataclass(frozen=True, slots=True)
class Limits:
    """What this worker's model takes: the ranges wire fields are checked against."""

    vocab_size: int
    context_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str

    @classmethod
    def of(cls, lm: LoadedModel) -> Limits:
        c = lm.config
        return cls(c.vocab_size, c.max_position_embeddings, c.num_layers, c.num_kv_heads, c.head_dim,
                   lm.fingerprint)


def check_message(limits: Limits, msg: Any) -> None:
    """Raise `WireError("bad-field")` at the first field of `msg` this worker could not use."""
    rid = getattr(msg, "request_id", None)
    if isinstance(rid, str) and len(rid) > MAX_REQUEST_ID_CHARS:
        _bad(f"request_id of {len(rid)} characters; at most {MAX_REQUEST_ID_CHARS}", rid[:40] + "…")
    if isinstance(msg, Reserve | Prefill | Generate):
        check_prompt(limits, msg.request_id, msg.prompt_ids, msg.sampling.max_tokens)
    if isinstance(msg, Prefill) and not 0 <= msg.decode_cached_tokens < len(msg.prompt_ids):
        _bad(f"decode_cached_tokens {msg.decode_cached_tokens} is not in 0..{len(msg.prompt_ids) - 1} "
             f"(a prompt of {len(msg.prompt_ids)} tokens, at least one of whose KV must go)", rid)
    if isinstance(msg, Prefill | MoveOut):
        if not _ENDPOINT.fullmatch(msg.decode_addr):
            _bad(f"decode_addr {msg.decode_addr!r:.80} is not tcp://host:port or ipc://path", rid)
        if len(msg.decode_instance) > MAX_INSTANCE_CHARS:
            _bad(f"decode_instance of {len(msg.decode_instance)} characters; at most {MAX_INSTANCE_CHARS}", rid)
    if isinstance(msg, MoveOut) and msg.cached_tokens < 0:
        _bad(f"cached_tokens {msg.cached_tokens} is negative", rid)
    if isinstance(msg, SwitchRole) and msg.role not in WORKER_ROLES:
        _bad(f"role {msg.role!r:.40} is not one of {', '.join(WORKER_ROLES)}", None)
    if isinstance(msg, KVDone):
        check_token(limits, msg.request_id, msg.first_token, "first_token")
        if msg.num_tokens < 1:
            _bad(f"num_tokens {msg.num_tokens}; a prompt has at least 1", rid)
        if msg.sampler_state and (why := state_problem(msg.sampler_state)):
            _bad(why, rid)


def check_prompt(limits: Limits, rid: str, prompt_ids: tuple[int, ...], max_tokens: int) -> None:
    if not prompt_ids:
        _bad("prompt_ids is empty; a prompt has at least one token", rid)
    if not (min(prompt_ids) >= 0 and max(prompt_ids) < limits.vocab_size):
        bad = next(t for t in prompt_ids if not 0 <= t < limits.vocab_size)
        _bad(f"prompt_ids holds token id {bad}; the vocabulary is 0..{limits.vocab_size - 1}", rid)
    if len(prompt_ids) + max_tokens > limits.context_tokens:
        _bad(f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
             f"{limits.context_tokens}", rid)


def check_token(limits: Limits, rid: str, token: int, name: str) -> None:
    if not 0 <= token < limits.vocab_size:
        _bad(f"{name} {token} is outside the vocabulary 0..{limits.vocab_size - 1}", rid)


@dataclass
class _Window:
    first: int  # the first token whose KV may come (those before are cached here)
    end: int  # the prompt's length
    budget: int  # (layer, token) pairs still to come


class ReservedKV:
    """Requests reserved here and the KV each may still receive; any thread (one lock)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def open(self, request_id: str, cached_tokens: int, num_prompt_tokens: int) -> None:
        budget = (num_prompt_tokens - cached_tokens) * self.limits.num_layers
        with self._lock:
            self._windows[request_id] = _Window(cached_tokens, num_prompt_tokens, budget)

    def close(self, request_id: str) -> None:
        with self._lock:
            self._windows.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._windows)

    def admit(self, msg: KVLayers) -> None:
        """Raise `WireError` unless `msg` is KV this worker reserved room for and still expects; on
        success its share is taken, so a repeat of it is refused. Reads the header only."""
        rid, lim = msg.request_id, self.limits
        if msg.model_fingerprint != lim.fingerprint:
            raise WireError("fingerprint-mismatch", f"KV of model {msg.model_fingerprint!r:.40} sent to a worker "
                                                    f"serving {lim.fingerprint!r}", rid)
        if msg.layer_end > lim.num_layers:
            _bad(f"layers [{msg.layer_start}, {msg.layer_end}) of a model with {lim.num_layers}", rid)
        if tuple(msg.kv.shape[2:]) != (lim.num_kv_heads, lim.head_dim):
            _bad(f"KV shape {msg.kv.shape}; this model's (kv_heads, head_dim) is "
                 f"{(lim.num_kv_heads, lim.head_dim)}", rid)
        layers, tokens = msg.layer_end - msg.layer_start, msg.num_tokens
        expected = 2 * layers * tokens * lim.num_kv_heads * lim.head_dim * DTYPE_BYTES[msg.kv.dtype]
        if msg.kv.raw_bytes != expected:
            _bad(f"raw_bytes {msg.kv.raw_bytes}; {layers} layers x {tokens} tokens of {msg.kv.dtype} KV "
                 f"are {expected}", rid)
        with self._lock:
            w = self._windows.get(rid)
            if w is None:
                _bad("KV for a request that holds no reservation here (never reserved, aborted or complete)", rid)
            if not (w.first <= msg.token_start and msg.token_start + tokens <= w.end):
                _bad(f"KV of tokens {msg.token_start}..{msg.token_start + tokens - 1}; this reservation "
                     f"takes tokens {w.first}..{w.end - 1}", rid)
            if layers * tokens > w.budget:
                _bad(f"KV of {layers} layers x {tokens} tokens; the reservation expects only {w.budget} "
                     "(layer, token) pairs more", rid)
            w.budget -= layers * tokens


def _bad(message: str, request_id: str | None) -> NoReturn:
    raise WireError("bad-field", message, request_id)
