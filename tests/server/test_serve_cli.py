"""`disagg serve` refusals that need no model: each is one line on stderr and a non-zero exit."""

from __future__ import annotations

import socket

import pytest

from tests.cli.test_generate_cli import assert_one_line_error, disagg


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_binding_beyond_loopback_without_a_key_is_refused(host: str) -> None:
    proc = disagg("serve", "--host", host, timeout=60)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"refusing to listen on {host} without --api-key")


def test_a_port_in_use_is_refused_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = disagg("serve", "--port", str(port), timeout=60)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"port {port} on 127.0.0.1 is in use")


@pytest.mark.parametrize("args,fragment", [
    (["--max-queued-requests", "0"], "--max-queued-requests must be at least 1"),
    (["--api-key", ""], "--api-key must not be empty"),
    (["--prefill", "127.0.0.1:1"], "--prefill and --decode go together"),
])
def test_bad_flags_are_one_line_errors(args: list[str], fragment: str) -> None:
    assert_one_line_error(disagg("serve", *args, timeout=60), fragment)


def test_serve_bounds_bodies_and_the_queue_by_default() -> None:
    # One request once queued 32,000 choices, and a 100 MB body was read whole: both are bounded
    # unless a flag says otherwise.
    proc = disagg("serve", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "--max-queued-requests <int> Answer 503" in text and "[default: 1024]" in text
    assert "--max-body-bytes <int> Answer 413" in text and f"[default: {8 * 1024 * 1024}]" in text
