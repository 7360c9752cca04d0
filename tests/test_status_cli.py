"""``trio-sign status --url``: a human summary of a running node from its health URL, read from
a tiny fake health server on loopback (issue 12 defect 4); and ``trio-sign --version``."""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from trio_sign import __version__
from trio_sign._metrics import Registry
from trio_sign.cli import _status
from trio_sign.cli._main import build_parser

READY: dict[str, Any] = {
    "ready": True,
    "phase": "serving",
    "enclave_state": "serving",
    "enclave_reason": None,
    "accounts": 10000,
    "shares_sha256": "3f2a9c0d1e2b3a4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4",
    "attestation_verified": True,
    "attestation_checked_at": "2026-12-03T08:00:00.000Z",
    "attestation_failure": None,
    "attestation_fresh": True,
    "last_alert": None,
    "last_alert_at": None,
}


def _metrics_page() -> str:
    reg = Registry()
    reg.build_info("enclave", __version__)
    sig = reg.counter("trio_sign_signatures_total", "S.", ("outcome", "code"))
    sig.labels(outcome="signed", code="OK").inc(41)
    sig.labels(outcome="refused", code="NOT_FOUND").inc(2)
    sig.labels(outcome="refused", code="INVALID_ARGUMENT").inc(1)
    reg.gauge("trio_sign_pool_sessions_open", "O.").set(3)
    reg.gauge("trio_sign_pool_sessions_max", "M.").set(10000)
    return reg.render()


@contextmanager
def fake_health(readyz: tuple[int, str], metrics: str) -> Iterator[str]:
    """A health listener on loopback answering /readyz and /metrics; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/readyz":
                status, body = readyz
                kind = "application/json"
            elif self.path == "/metrics":
                status, body = 200, metrics
                kind = "text/plain; version=0.0.4"
            else:
                status, body, kind = 404, "", "text/plain"
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_status(argv: list[str]) -> int:
    """Parse as ``trio-sign`` would once ``status`` is registered (a parser of our own here)."""
    parser = argparse.ArgumentParser(prog="trio-sign")
    sub = parser.add_subparsers(dest="command", required=True)
    _status.add_parser(sub)
    args = parser.parse_args(["status", *argv])
    code: int = args.func(args)
    return code


def test_a_ready_node_is_summed_up_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_health((200, json.dumps(READY)), _metrics_page()) as url:
        assert run_status(["--url", url]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "state:       serving (parent phase serving)",
        "ready:       yes",
        "accounts:    10000 (shares sha256 3f2a9c0d1e2b3a4c...)",
        "attestation: verified at 2026-12-03T08:00:00.000Z",
        "sessions:    3 open of 10000; signatures: 41 signed, 3 refused, 0 cancelled, 0 failed",
        "last alert:  none",
        f"version:     enclave {__version__}",
    ]


def test_a_node_that_is_not_ready_exits_1_with_its_alert(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = {
        **READY,
        "ready": False,
        "phase": "restarting",
        "enclave_state": "exited",
        "enclave_reason": "killed",
        "attestation_verified": False,
        "attestation_failure": "PCR0 mismatch",
        "last_alert": "enclave_killed: the enclave died without its exit message",
        "last_alert_at": "2026-12-03T08:01:00.000Z",
    }
    with fake_health((503, json.dumps(report)), "") as url:
        assert run_status(["--url", url + "/"]) == 1
    out = capsys.readouterr().out
    assert "state:       exited (parent phase restarting): killed" in out
    assert "ready:       NO" in out
    assert "attestation: FAILED: PCR0 mismatch" in out
    assert "sessions:    ? open of ?" in out
    assert (
        "last alert:  enclave_killed: the enclave died without its exit message"
        " (at 2026-12-03T08:01:00.000Z)"
    ) in out


def test_an_unreachable_node_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert run_status(["--url", f"http://127.0.0.1:{port}", "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "cannot reach the health listener" in captured.err


def test_a_health_url_that_is_not_a_health_listener_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with fake_health((200, "<html>hello</html>"), "") as url:
        assert run_status(["--url", url]) == 1
    assert "/readyz answered 200 without a readiness report" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url", ["127.0.0.1:9", "https://127.0.0.1:9", "http://127.0.0.1", "http://h:9/x", "http://h:x"]
)
def test_a_bad_url_is_usage(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_status(["--url", url]) == 2
    assert "--url must be http://HOST:PORT" in capsys.readouterr().err


def test_prometheus_text_parsing_keeps_labels_and_unescapes() -> None:
    reg = Registry()
    reg.gauge("g", "G.", ("v",)).labels(v='a"b\\c\nd').set(2.5)
    parsed = _status.parse_prometheus_text(reg.render() + "garbage line\nx{y} nan-ish\n")
    assert parsed == {"g": [({"v": 'a"b\\c\nd'}, 2.5)]}


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"trio-sign {__version__}\n"
