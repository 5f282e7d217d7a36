"""Every limit the HTTP edge puts on one request, and the defaults of `disagg serve`'s limits.

Pure constants (imported by the CLI without loading FastAPI). Each bounds work or memory that one
request could otherwise make the service spend: a body read whole, stop strings checked against
every new token, choices that each become a request of their own in the service.
"""

from __future__ import annotations

# Several times the longest honest body: a full 8,192-token context of token ids as JSON
# ("12345, " each) is under 64 KiB, a 128K-token context's under 1 MiB.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# Requests waiting for decode memory before new ones get 503 with Retry-After (`disagg serve`;
# the batch front ends, `generate` and `bench serve`, queue without a bound).
DEFAULT_MAX_QUEUED_REQUESTS = 1024

MAX_N = 16
MAX_CHOICES = 256  # prompts × n of one request: each is a request of its own in the service
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_BYTES = 1024  # UTF-8 bytes of one stop string
MAX_STOP_BYTES = 4096  # of all of them together
MAX_TOKENS_FIELD = 2**31 - 1  # past any model's context; the context refuses most of these first
