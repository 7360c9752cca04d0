"""The parent's health server over real loopback HTTP (hypercorn, Trio worker): liveness,
readiness flipping with the state, Prometheus text, and the live log tail as SSE."""

from __future__ import annotations

import datetime
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from trio_sign.nitro import ExitMessage, LogMessage, StateMessage
from trio_sign.parent._health import MetricsWriter, ParentState, render_metrics, serve_health
from trio_sign.parent._lifecycle import Lifecycle, ParentPhase
from trio_sign.parent._logs import CloudWatchStats, LogForwarder, LogTail
from trio_sign.sse import BodyData, MessageEvent, ResponseHead, ResponseParser, run_sse_client

SHA = "cd" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_790_000_000.0

    def __call__(self) -> float:
        return self.now


async def http(port: int, path: str, method: str = "GET") -> tuple[ResponseHead, bytes]:
    """A tiny HTTP/1.1 client: one request, ``Connection: close``, the whole response."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        parser = ResponseParser()
        head: ResponseHead | None = None
        body = b""
        while True:
            data = await stream.receive_some()
            events = parser.receive_data(data) if data else parser.receive_eof()
            for event in events:
                if isinstance(event, ResponseHead):
                    head = event
                elif isinstance(event, BodyData):
                    body += event.data
                else:
                    assert head is not None
                    return head, body
            assert data, "connection closed before the end of the response"


@dataclass
class FakeGate:
    verified: bool = False
    last_checked: datetime.datetime | None = None
    last_failure: str | None = None


def to_serving(state: ParentState) -> None:
    """Walk the parent's machine to ``serving`` the legal way (as a run would)."""
    for phase in ("fetching", "launching", "preloading", "attesting", "serving"):
        state.lifecycle.advance(ParentPhase(phase))


def attest(state: ParentState, verified: bool = True, failure: str | None = None) -> FakeGate:
    """Attach a gate that has just checked (at the state's clock)."""
    gate = FakeGate(
        verified, datetime.datetime.fromtimestamp(state.wall_clock(), datetime.UTC), failure
    )
    state.attestation_gate = gate
    return gate


@pytest.fixture
async def server(nursery: trio.Nursery) -> tuple[int, ParentState]:
    clock = Clock()
    state = ParentState(
        wall_clock=clock, lifecycle=Lifecycle(clock=clock), tail=LogTail(queue_size=8)
    )
    binds = await nursery.start(serve_health, "tcp://127.0.0.1:0", state)
    port = int(binds[0].rsplit(":", 1)[1])
    return port, state


async def get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    head, body = await http(port, path)
    assert head.get("content-type") == "application/json"
    result: dict[str, Any] = json.loads(body)
    return head.status, result


async def test_healthz_is_always_ok(server: tuple[int, ParentState]) -> None:
    port, _ = server
    with trio.fail_after(5):
        head, body = await http(port, "/healthz")
    assert head.status == 200
    assert json.loads(body) == {"status": "alive"}


async def test_readiness_flips_with_state(server: tuple[int, ParentState]) -> None:
    port, state = server
    with trio.fail_after(10):
        status, report = await get_json(port, "/readyz")
        assert status == 503
        assert report["enclave_state"] == "unknown"
        assert report["attestation_verified"] is False
        for key in (
            "enclave_state",
            "accounts",
            "shares_sha256",
            "preload_ms",
            "attestation_verified",
            "attestation_checked_at",
            "last_alert",
        ):
            assert key in report

        to_serving(state)
        lifecycle = state.lifecycle
        lifecycle.on_status_message(StateMessage("preloading"))
        lifecycle.on_status_message(
            StateMessage("serving", accounts=1000, sha256=SHA, preload_ms=1234)
        )
        status, report = await get_json(port, "/readyz")
        assert status == 503  # serving, but attestation not verified yet
        assert report["accounts"] == 1000

        gate = attest(state)
        status, report = await get_json(port, "/readyz")
        assert status == 200
        assert report == {
            "ready": True,
            "phase": "serving",
            "phase_since": "2026-09-21T14:13:20.000Z",
            "restarts": 0,
            "enclave_state": "serving",
            "enclave_reason": None,
            "enclave_exit": None,
            "accounts": 1000,
            "shares_sha256": SHA,
            "preload_ms": 1234,
            "attestation_verified": True,
            "attestation_checked_at": "2026-09-21T14:13:20.000Z",
            "attestation_failure": None,
            "attestation_fresh": True,
            "ingress_listening": None,
            "last_alert": None,
            "last_alert_code": None,
            "last_alert_at": None,
        }

        lifecycle.on_status_message(StateMessage("draining"))
        status, report = await get_json(port, "/readyz")
        assert status == 503
        assert report["shares_sha256"] == SHA  # preload facts survive state changes

        lifecycle.on_status_message(StateMessage("serving"))
        gate.verified, gate.last_failure = False, "pcr_mismatch"
        state.alerts.raise_alert("attestation_failed", "pcr_mismatch: PCR0 differs")
        status, report = await get_json(port, "/readyz")
        assert status == 503
        assert report["last_alert"] == "attestation_failed: pcr_mismatch: PCR0 differs"
        assert report["last_alert_code"] == "attestation_failed"

        gate.verified, gate.last_failure = True, None
        lifecycle.on_status_message(StateMessage("failed", reason="bundle truncated"))
        lifecycle.on_status_message(ExitMessage(3))
        status, report = await get_json(port, "/readyz")
        assert status == 503
        assert report["enclave_state"] == "exited"
        assert report["enclave_reason"] == "bundle truncated"
        assert report["enclave_exit"] == "the enclave exited with code 3: preload refused"


async def test_stale_attestation_is_not_ready() -> None:
    clock = Clock()
    state = ParentState(wall_clock=clock, attestation_max_age_s=60)
    to_serving(state)
    state.lifecycle.enclave_reported("serving")
    attest(state)
    assert state.ready
    clock.now += 61
    assert not state.ready
    attest(state)
    assert state.ready


def test_a_configured_ingress_must_be_listening_to_be_ready() -> None:
    """Serving and attested is not ready while the ingress socket is not bound yet: a gateway
    that waits for /readyz would be refused at the door (a race CI once hit)."""
    state = ParentState(ingress_required=True)
    to_serving(state)
    state.lifecycle.enclave_reported("serving")
    attest(state)
    assert not state.ready
    assert state.report()["ingress_listening"] is False
    state.ingress_listening = True
    assert state.ready
    report = state.report()
    assert report["ready"] is True
    assert report["ingress_listening"] is True


async def test_attestation_read_live_from_the_gate() -> None:
    clock = Clock()
    gate = FakeGate()
    state = ParentState(wall_clock=clock, attestation_gate=gate, attestation_max_age_s=120)
    to_serving(state)
    state.lifecycle.enclave_reported("serving")
    assert not state.ready
    gate.verified = True
    gate.last_checked = datetime.datetime.fromtimestamp(clock.now - 10, datetime.UTC)
    assert state.ready
    assert state.report()["attestation_checked_at"] == "2026-09-21T14:13:10.000Z"
    assert parse_exposition(render_metrics(state))["trio_sign_attestation_verified"] == 1
    gate.verified = False
    gate.last_failure = "pcr_mismatch"
    state.alerts.raise_alert("attestation_failed", "pcr_mismatch: PCR 0 differs")
    report = state.report()
    assert not report["ready"]
    assert report["attestation_failure"] == "pcr_mismatch"
    assert report["last_alert"] == "attestation_failed: pcr_mismatch: PCR 0 differs"


async def test_unknown_paths_and_methods(server: tuple[int, ParentState]) -> None:
    port, _ = server
    with trio.fail_after(5):
        assert (await http(port, "/nope"))[0].status == 404
        assert (await http(port, "/readyz", "POST"))[0].status == 405
        assert (await http(port, "/v1/logs/tail", "DELETE"))[0].status == 405
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = b""
            while data := await stream.receive_some():
                raw += data
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"\r\n\r\n")  # the head only


# -- metrics -----------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABELS = r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:\\[\\"n]|[^"\\\n])*",?)*\}'
_SAMPLE = re.compile(rf"({_NAME})({_LABELS})? (-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?|NaN|[+-]Inf)")
_HELP = re.compile(rf"# HELP ({_NAME}) (?:[^\\\n]|\\[\\n])*")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")


def parse_exposition(text: str) -> dict[str, float]:
    """Check every line against the text format; return {name{labels}: value}."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    helped: set[str] = set()
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if match := _HELP.fullmatch(line):
            assert match.group(1) not in helped
            helped.add(match.group(1))
        elif match := _TYPE.fullmatch(line):
            assert match.group(1) in helped
            assert match.group(1) not in typed
            typed[match.group(1)] = match.group(2)
        else:
            match = _SAMPLE.fullmatch(line)
            assert match is not None, f"not exposition format: {line!r}"
            name = match.group(1)
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            if family != name and typed.get(family) == "histogram":
                samples[name + (match.group(2) or "")] = float(match.group(3))
                continue
            assert name in typed, f"{name} has no # TYPE"
            if typed[name] == "counter":
                assert name.endswith("_total")
            samples[name + (match.group(2) or "")] = float(match.group(3))
    return samples


async def test_metrics_over_http(server: tuple[int, ParentState]) -> None:
    port, state = server
    to_serving(state)
    state.lifecycle.enclave_reported("serving", accounts=500, shares_sha256=SHA, preload_ms=2500)
    attest(state)
    state.alerts.raise_alert("enclave_killed", "kill -9")
    state.relay.active = 1
    state.relay.refused = 4
    state.proxy_connection_opened()
    state.proxy_connection_opened()
    state.proxy_connection_closed()
    forwarder = LogForwarder(stats=state.logs, tail=state.tail)
    forwarder.on_message(LogMessage('{"msg":"x"}'))
    with trio.fail_after(5):
        head, body = await http(port, "/metrics")
    assert head.status == 200
    assert head.get("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse_exposition(body.decode())
    assert samples['trio_sign_enclave_state{state="serving"}'] == 1
    assert samples['trio_sign_enclave_state{state="booting"}'] == 0
    assert samples["trio_sign_ready"] == 1
    assert samples["trio_sign_ingress_listening"] == 0  # no [ingress] in this state
    assert samples["trio_sign_enclave_accounts"] == 500
    assert samples["trio_sign_enclave_preload_seconds"] == 2.5
    assert samples["trio_sign_attestation_verified"] == 1
    assert samples["trio_sign_attestation_last_check_timestamp_seconds"] == 1_790_000_000
    assert samples["trio_sign_log_lines_forwarded_total"] == 1
    assert samples['trio_sign_log_lines_dropped_total{where="enclave"}'] == 0
    assert samples["trio_sign_relay_connections_active"] == 1
    assert samples["trio_sign_relay_refused_total"] == 4
    assert samples["trio_sign_proxy_connections_active"] == 1
    assert samples["trio_sign_proxy_connections_total"] == 2
    assert samples["trio_sign_log_tail_subscribers"] == 0
    assert samples['trio_sign_parent_phase{phase="serving"}'] == 1
    assert samples['trio_sign_parent_phase{phase="starting"}'] == 0
    assert samples['trio_sign_alerts_total{alert="enclave_killed"}'] == 1
    assert samples['trio_sign_alerts_total{alert="config"}'] == 0
    assert samples["trio_sign_enclave_restarts_total"] == 0


def test_metrics_escaping_and_optional_families() -> None:
    state = ParentState(cloudwatch=CloudWatchStats(sent=3, dropped=2))
    state.lifecycle.enclave_reported('we"ird\\state\nx')
    samples = parse_exposition(render_metrics(state))
    assert samples['trio_sign_enclave_state{state="we\\"ird\\\\state\\nx"}'] == 1
    assert samples['trio_sign_log_lines_dropped_total{where="cloudwatch"}'] == 2
    assert samples["trio_sign_cloudwatch_events_sent_total"] == 3
    writer = MetricsWriter()
    writer.gauge("g", "line one\nback\\slash", 0.25)
    assert writer.text() == "# HELP g line one\\nback\\\\slash\n# TYPE g gauge\ng 0.25\n"
    with pytest.raises(ValueError, match="_total"):
        writer.counter("c", "no suffix", 1)


# -- live tail ---------------------------------------------------------------------------------


async def test_live_tail_streams_lines_over_sse(server: tuple[int, ParentState]) -> None:
    port, state = server
    assert state.tail is not None
    forwarder = LogForwarder(stats=state.logs, tail=state.tail)
    received: list[MessageEvent] = []
    done = trio.Event()

    def on_event(event: MessageEvent) -> None:
        received.append(event)
        if len(received) == 2:
            done.set()

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    run_sse_client,
                    f"http://127.0.0.1:{port}/v1/logs/tail",
                    connect=connect,
                    on_event=on_event,
                )
            )
            while state.tail.subscribers == 0:  # noqa: ASYNC110  (real sockets: no event to wait on)
                await trio.sleep(0.01)
            forwarder.on_message(LogMessage('{"msg":"one"}'))
            forwarder.on_message(LogMessage('{"msg":"two","signing_share":"%s"}' % ("ab" * 32)))
            await done.wait()
            nursery.cancel_scope.cancel()
    assert [json.loads(e.data)["msg"] for e in received] == ["one", "two"]
    assert json.loads(received[1].data)["signing_share"] == "<redacted>"


async def test_live_tail_without_a_tail_is_404(nursery: trio.Nursery) -> None:
    binds = await nursery.start(serve_health, "tcp://127.0.0.1:0", ParentState())
    port = int(binds[0].rsplit(":", 1)[1])
    with trio.fail_after(5):
        head, _ = await http(port, "/v1/logs/tail")
    assert head.status == 404


async def test_live_tail_subscriber_limit_is_503(nursery: trio.Nursery) -> None:
    state = ParentState(tail=LogTail(max_subscribers=1))
    binds = await nursery.start(serve_health, "tcp://127.0.0.1:0", state)
    port = int(binds[0].rsplit(":", 1)[1])
    assert state.tail is not None
    async with state.tail.subscribe():
        with trio.fail_after(5):
            head, body = await http(port, "/v1/logs/tail")
    assert head.status == 503
    assert b"max_subscribers" in body


def test_the_enclaves_numbers_travel_to_the_parents_metrics() -> None:
    """The enclave's metrics message (sessions, signatures, latency) is served by the parent
    beside its own families, with both build infos; a malformed snapshot is left out and the
    scrape still answers."""
    from trio_sign import __version__
    from trio_sign._metrics import Registry
    from trio_sign.nitro import MetricsMessage

    enclave = Registry()
    enclave.build_info("enclave", __version__)
    sessions = enclave.counter("trio_sign_sessions_total", "Sessions.", ["outcome"])
    sessions.labels(outcome="signed").inc(7)
    enclave.histogram("trio_sign_sign_duration_seconds", "Sign latency.").observe(0.003)
    state = ParentState()
    state.lifecycle.on_status_message(MetricsMessage(enclave.snapshot()))
    text = render_metrics(state)
    samples = parse_exposition(text)
    assert samples['trio_sign_sessions_total{outcome="signed"}'] == 7
    assert samples["trio_sign_sign_duration_seconds_count"] == 1
    builds = [line for line in text.splitlines() if line.startswith("trio_sign_build_info{")]
    assert len(builds) == 2
    assert any('component="parent"' in b for b in builds)
    assert any('component="enclave"' in b for b in builds)
    assert text.count("# TYPE trio_sign_build_info ") == 1

    state.lifecycle.enclave_metrics = {"format": "trio_sign.metrics/1", "families": [{}]}
    samples = parse_exposition(render_metrics(state))
    assert "trio_sign_sessions_total" not in str(samples)
    assert samples["trio_sign_ready"] == 0
