"""The parent's health, readiness and metrics over HTTP (hypercorn, Trio worker, our own ASGI).

``GET /healthz``: the process is alive (always 200). ``GET /readyz``: 200 only while the enclave
is ``serving`` and its attestation was verified (and, if configured, recently); the body is the
report the seed asks the parent to make (enclave state, accounts, shares fingerprint, preload
time, attestation result and time, last alert), the same body with 503 otherwise.
``GET /metrics``: Prometheus text exposition (version 0.0.4). ``GET /v1/logs/tail``: new
enclave log lines as Server-Sent Events.

:class:`ParentState` is the one place the parent's services write what health reports; the
supervisor creates it and passes it around. Its setters are synchronous and never block.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from ..nitro import ChannelMessage, ExitMessage, StateMessage
from ..transport import hypercorn_bind, serve_asgi
from ..transport._asgi import (
    Receive,
    Scope,
    Send,
    asgi_lifespan,
    cancel_on_disconnect,
    respond,
    send_chunk,
)
from ._logs import CloudWatchStats, LogStats, LogTail, TailFull
from ._relay import RelayStats

log = logging.getLogger("trio_sign.parent.health")

#: Every state the enclave reports (the status channel's ``STATES``), plus the parent's own
#: ``unknown`` (nothing heard yet) and ``exited``: each gets a sample in ``/metrics``.
ENCLAVE_STATES: Final = (
    "unknown",
    "booting",
    "preloading",
    "serving",
    "draining",
    "failed",
    "exiting",
    "exited",
)
#: Seconds between comment lines on an idle ``/v1/logs/tail`` stream.
DEFAULT_TAIL_KEEPALIVE_S: Final = 15.0
#: Grace period for open health requests when the server is cancelled.
DEFAULT_GRACEFUL_TIMEOUT_S: Final = 1.0


class AttestationSource(Protocol):
    """What health reads from the ingress proxy's attestation gate
    (:class:`~trio_sign.parent.AttestationGate` satisfies it)."""

    @property
    def verified(self) -> bool: ...

    @property
    def last_checked(self) -> datetime.datetime | None: ...

    @property
    def last_failure(self) -> str | None: ...


@dataclass(slots=True)
class ParentState:
    """What the parent knows, for ``/readyz`` and ``/metrics``. Written by the parent's services
    through the setters below; read by the health server.

    Attributes:
        enclave_state: the last ``state`` from the enclave's status channel (``"unknown"`` before
            the first one), or ``"exited"`` after its exit message.
        attestation_max_age_s: if set, readiness also needs an attestation check this recent.
        attestation_gate: if set, the attestation facts are read from it (live) instead of the
            ``attestation_*`` fields that :meth:`set_attestation` writes.
        enclave_sessions_open, enclave_sessions_max, enclave_memory_used_bytes,
            enclave_memory_limit_bytes: from the enclave's last ``GetStatus`` (polled by
            :func:`run_enclave_status_poller`), at Unix time ``enclave_status_at``.
        ingress_required: an ingress is configured, so readiness also needs it listening
            (``ingress_listening``, set by the supervisor once its socket is bound): a load
            balancer or gateway that waits for ``/readyz`` must not be refused at the door.
        relay, logs, cloudwatch: counters owned by the SSE relay and the log forwarder (the
            supervisor passes the same objects to those services).
        tail: the live tail behind ``/v1/logs/tail`` (404 when None).
    """

    enclave_state: str = "unknown"
    enclave_reason: str | None = None
    enclave_exit_code: int | None = None
    accounts: int | None = None
    shares_sha256: str | None = None
    preload_ms: int | None = None
    attestation_verified: bool = False
    attestation_checked_at: float | None = None
    attestation_reason: str | None = None
    attestation_max_age_s: float | None = None
    last_alert: str | None = None
    last_alert_at: float | None = None
    proxy_connections_active: int = 0
    proxy_connections_total: int = 0
    proxy_connections_refused: int = 0
    enclave_sessions_open: int | None = None
    enclave_sessions_max: int | None = None
    enclave_memory_used_bytes: int | None = None
    enclave_memory_limit_bytes: int | None = None
    enclave_status_at: float | None = None
    relay: RelayStats = field(default_factory=RelayStats)
    logs: LogStats = field(default_factory=LogStats)
    cloudwatch: CloudWatchStats | None = None
    tail: LogTail | None = None
    attestation_gate: AttestationSource | None = None
    ingress_required: bool = False
    ingress_listening: bool = False
    wall_clock: Callable[[], float] = time.time

    # -- setters ---------------------------------------------------------------------------

    def set_enclave_state(
        self,
        state: str,
        *,
        reason: str | None = None,
        accounts: int | None = None,
        shares_sha256: str | None = None,
        preload_ms: int | None = None,
    ) -> None:
        """Record the enclave's lifecycle state; ``failed`` also raises an alert. Preload facts
        are kept from earlier states when not given again."""
        self.enclave_state = state
        self.enclave_reason = reason
        if accounts is not None:
            self.accounts = accounts
        if shares_sha256 is not None:
            self.shares_sha256 = shares_sha256
        if preload_ms is not None:
            self.preload_ms = preload_ms
        if state == "failed":
            self.alert(f"enclave failed: {reason or 'no reason given'}")

    def on_status_message(self, message: ChannelMessage) -> None:
        """Pass as ``on`` to :func:`~trio_sign.parent.serve_status_connection`."""
        if isinstance(message, StateMessage):
            self.set_enclave_state(
                message.state,
                reason=message.reason,
                accounts=message.accounts,
                shares_sha256=message.sha256,
                preload_ms=message.preload_ms,
            )
        elif isinstance(message, ExitMessage):
            self.set_enclave_exited(message.code)

    def set_enclave_exited(self, code: int) -> None:
        """The enclave process exited (its exit message, or the launcher saw it go)."""
        self.enclave_state = "exited"
        self.enclave_exit_code = code
        if code != 0:
            self.alert(f"enclave exited with code {code}")

    def set_attestation(
        self, verified: bool, *, reason: str | None = None, checked_at: float | None = None
    ) -> None:
        """Record an attestation check (by the ingress proxy); a failure raises an alert."""
        self.attestation_verified = verified
        self.attestation_reason = reason
        self.attestation_checked_at = checked_at if checked_at is not None else self.wall_clock()
        if not verified:
            self.alert(f"attestation check failed: {reason or 'no reason given'}")

    def on_attestation_alert(self, reason: str, message: str) -> None:
        """Pass as the attestation gate's ``on_alert``: records the alert."""
        self.alert(f"attestation check failed ({reason}): {message}")

    def alert(self, message: str) -> None:
        """Record an alert (shown in ``/readyz``) and log it at ERROR."""
        self.last_alert = message
        self.last_alert_at = self.wall_clock()
        log.error("alert: %s", message)

    def proxy_connection_opened(self) -> None:
        self.proxy_connections_active += 1
        self.proxy_connections_total += 1

    def proxy_connection_closed(self) -> None:
        self.proxy_connections_active = max(0, self.proxy_connections_active - 1)

    def proxy_connection_refused(self) -> None:
        self.proxy_connections_refused += 1

    # -- readers ---------------------------------------------------------------------------

    def attestation(self) -> tuple[bool, float | None, str | None]:
        """(verified, checked at as Unix time, failure reason): from the gate if attached."""
        gate = self.attestation_gate
        if gate is None:
            return (
                self.attestation_verified,
                self.attestation_checked_at,
                self.attestation_reason,
            )
        checked = gate.last_checked
        return (
            gate.verified,
            checked.timestamp() if checked is not None else None,
            gate.last_failure,
        )

    @property
    def attestation_fresh(self) -> bool:
        verified, checked_at, _ = self.attestation()
        if not verified or checked_at is None:
            return False
        if self.attestation_max_age_s is None:
            return True
        return self.wall_clock() - checked_at <= self.attestation_max_age_s

    @property
    def ready(self) -> bool:
        """Serving, attested, and (when configured) the ingress listening: the parent may route
        signing traffic to the enclave."""
        ingress_ok = self.ingress_listening or not self.ingress_required
        return self.enclave_state == "serving" and self.attestation_fresh and ingress_ok

    def report(self) -> dict[str, Any]:
        """The readiness report (JSON-ready; public facts only)."""
        verified, checked_at, failure = self.attestation()
        return {
            "ready": self.ready,
            "enclave_state": self.enclave_state,
            "enclave_reason": self.enclave_reason,
            "accounts": self.accounts,
            "shares_sha256": self.shares_sha256,
            "preload_ms": self.preload_ms,
            "attestation_verified": verified,
            "attestation_checked_at": _rfc3339(checked_at),
            "attestation_failure": failure,
            "attestation_fresh": self.attestation_fresh,
            "ingress_listening": self.ingress_listening if self.ingress_required else None,
            "last_alert": self.last_alert,
            "last_alert_at": _rfc3339(self.last_alert_at),
        }


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    ms = round(ts * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


# -- Prometheus text exposition (sans-io) ------------------------------------------------------


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class MetricsWriter:
    """Build a Prometheus text exposition: one ``# HELP``/``# TYPE`` block per metric family."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        """Add a family; ``samples`` are (labels, value). Counters' names end in ``_total``."""
        if name in self._names:
            raise ValueError(f"metric family {name} added twice")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self._names.add(name)
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            rendered = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            label_part = f"{{{rendered}}}" if rendered else ""
            self._lines.append(f"{name}{label_part} {_number(value)}")

    def gauge(self, name: str, help_text: str, value: float) -> None:
        self.family(name, "gauge", help_text, [({}, value)])

    def counter(self, name: str, help_text: str, value: float) -> None:
        self.family(name, "counter", help_text, [({}, value)])

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def render_metrics(state: ParentState) -> str:
    """The ``/metrics`` body for ``state``."""
    m = MetricsWriter()
    verified, checked_at, _ = state.attestation()
    known = list(ENCLAVE_STATES)
    if state.enclave_state not in known:
        known.append(state.enclave_state)
    m.family(
        "trio_sign_enclave_state",
        "gauge",
        "The enclave's lifecycle state (1 for the current state, 0 for the others).",
        [({"state": s}, 1 if s == state.enclave_state else 0) for s in known],
    )
    m.gauge(
        "trio_sign_ready",
        "1 when the enclave is serving and attested and the ingress listens (the /readyz result).",
        1 if state.ready else 0,
    )
    m.gauge(
        "trio_sign_ingress_listening",
        "1 while the mTLS ingress proxy's socket is bound (0 without an [ingress]).",
        1 if state.ingress_listening else 0,
    )
    m.gauge(
        "trio_sign_enclave_accounts",
        "Accounts preloaded by the enclave (0 before preload).",
        state.accounts or 0,
    )
    m.gauge(
        "trio_sign_enclave_preload_seconds",
        "How long the enclave's preload took, in seconds (0 before preload).",
        (state.preload_ms or 0) / 1000,
    )
    m.gauge(
        "trio_sign_attestation_verified",
        "1 if the last attestation check of the enclave succeeded.",
        1 if verified else 0,
    )
    m.gauge(
        "trio_sign_attestation_last_check_timestamp_seconds",
        "Unix time of the last attestation check (0 if none yet).",
        checked_at or 0,
    )
    if state.enclave_status_at is not None:
        m.gauge(
            "trio_sign_enclave_sessions_open",
            "Signing sessions open in the enclave (its last GetStatus).",
            state.enclave_sessions_open or 0,
        )
        m.gauge(
            "trio_sign_enclave_sessions_max",
            "The enclave's session pool size.",
            state.enclave_sessions_max or 0,
        )
        m.gauge(
            "trio_sign_enclave_memory_used_bytes",
            "Memory the enclave uses (its last GetStatus).",
            state.enclave_memory_used_bytes or 0,
        )
        m.gauge(
            "trio_sign_enclave_memory_limit_bytes",
            "The enclave's memory limit.",
            state.enclave_memory_limit_bytes or 0,
        )
        m.gauge(
            "trio_sign_enclave_status_timestamp_seconds",
            "Unix time of the enclave's last GetStatus answer.",
            state.enclave_status_at,
        )
    logs = state.logs
    m.counter(
        "trio_sign_log_lines_received_total",
        "Enclave log lines received.",
        logs.received,
    )
    m.counter(
        "trio_sign_log_lines_forwarded_total",
        "Log lines forwarded to the sinks.",
        logs.forwarded,
    )
    dropped = [({"where": "enclave"}, float(logs.enclave_dropped))]
    if state.cloudwatch is not None:
        dropped.append(({"where": "cloudwatch"}, float(state.cloudwatch.dropped)))
    m.family(
        "trio_sign_log_lines_dropped_total",
        "counter",
        "Log lines dropped: in the enclave (its queue was full) or before CloudWatch.",
        dropped,
    )
    m.counter(
        "trio_sign_log_redactions_total",
        "Values the parent's redaction pass replaced in enclave log lines.",
        logs.redactions,
    )
    if state.cloudwatch is not None:
        cw = state.cloudwatch
        m.counter("trio_sign_cloudwatch_events_sent_total", "Events CloudWatch accepted.", cw.sent)
        m.counter("trio_sign_cloudwatch_requests_total", "PutLogEvents calls made.", cw.requests)
        m.counter(
            "trio_sign_cloudwatch_retries_total",
            "PutLogEvents calls retried (throttling, transient failures).",
            cw.retries,
        )
        m.gauge("trio_sign_cloudwatch_queue_events", "Events waiting for CloudWatch.", cw.queued)
    if state.tail is not None:
        m.gauge(
            "trio_sign_log_tail_subscribers", "Live log tail subscribers.", state.tail.subscribers
        )
        m.counter(
            "trio_sign_log_tail_dropped_subscribers_total",
            "Live log tail subscribers dropped for falling behind.",
            state.tail.dropped_subscribers,
        )
    relay = state.relay
    m.gauge("trio_sign_relay_connections_active", "SSE relay connections open now.", relay.active)
    m.counter(
        "trio_sign_relay_connections_total", "SSE relay connections accepted.", relay.accepted
    )
    m.counter(
        "trio_sign_relay_refused_total",
        "SSE relay requests refused (not allowlisted, malformed, too many).",
        relay.refused,
    )
    m.counter(
        "trio_sign_relay_upstream_failures_total",
        "SSE relay upstream failures (connect, TLS, timeouts, redirects, broken streams).",
        relay.upstream_failures,
    )
    m.gauge(
        "trio_sign_proxy_connections_active",
        "gRPC ingress proxy connections open now.",
        state.proxy_connections_active,
    )
    m.counter(
        "trio_sign_proxy_connections_total",
        "gRPC ingress proxy connections accepted.",
        state.proxy_connections_total,
    )
    m.counter(
        "trio_sign_proxy_connections_refused_total",
        "gRPC ingress proxy connections refused (not ready, attestation failed).",
        state.proxy_connections_refused,
    )
    return m.text()


# -- the ASGI application ----------------------------------------------------------------------


_JSON: Final = b"application/json"
_TEXT: Final = b"text/plain; charset=utf-8"
_PROMETHEUS: Final = b"text/plain; version=0.0.4; charset=utf-8"


class HealthApp:
    """The ASGI app behind :func:`serve_health` (no framework)."""

    def __init__(
        self, state: ParentState, *, tail_keepalive_s: float = DEFAULT_TAIL_KEEPALIVE_S
    ) -> None:
        self.state = state
        self.tail_keepalive_s = tail_keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await asgi_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        if path not in ("/healthz", "/readyz", "/metrics", "/v1/logs/tail"):
            await _respond(send, 404, _TEXT, b"not found\n")
            return
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, _TEXT, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
            return
        if path == "/v1/logs/tail" and method != "GET":
            await _respond(send, 405, _TEXT, b"method not allowed\n", [(b"allow", b"GET")])
            return
        head_only = method == "HEAD"
        if path == "/healthz":
            await _respond(send, 200, _JSON, b'{"status":"alive"}\n', head_only=head_only)
        elif path == "/readyz":
            state = self.state
            body = json.dumps(state.report(), separators=(",", ":")).encode() + b"\n"
            await _respond(send, 200 if state.ready else 503, _JSON, body, head_only=head_only)
        elif path == "/metrics":
            body = render_metrics(self.state).encode("utf-8")
            await _respond(send, 200, _PROMETHEUS, body, head_only=head_only)
        else:
            await self._tail(receive, send)

    async def _tail(self, receive: Receive, send: Send) -> None:
        tail = self.state.tail
        if tail is None:
            await _respond(send, 404, _TEXT, b"no live log tail configured\n")
            return
        try:
            async with tail.subscribe() as lines:
                await self._stream_tail(lines, receive, send)
        except TailFull as exc:
            await _respond(send, 503, _TEXT, f"{exc}\n".encode())

    async def _stream_tail(
        self, lines: trio.MemoryReceiveChannel[str], receive: Receive, send: Send
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-cache"),
                    ],
                }
            )
            await send_chunk(send, b": trio-sign log tail\n\n")
            while True:
                with trio.move_on_after(self.tail_keepalive_s) as idle:
                    try:
                        line = await lines.receive()
                    except trio.EndOfChannel:
                        break  # fell behind and was dropped
                if idle.cancelled_caught:
                    await send_chunk(send, b": keepalive\n\n")
                    continue
                await send_chunk(send, b"data: " + line.encode("utf-8") + b"\n\n")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()


#: Health answers are never cached.
_respond = functools.partial(respond, no_store=True)


# -- the server --------------------------------------------------------------------------------


async def serve_health(
    listen_url: str,
    state: ParentState,
    *,
    tail_keepalive_s: float = DEFAULT_TAIL_KEEPALIVE_S,
    graceful_timeout_s: float = DEFAULT_GRACEFUL_TIMEOUT_S,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/logs/tail`` until cancelled.

    Args:
        listen_url: ``tcp://host:port`` (port 0 picks one) or ``unix:///path``.

    Readiness: ``task_status.started(binds)`` once listening; ``binds`` are hypercorn's
    ``http://host:port`` strings (with the real port).

    Cancellation: stops the server; open requests get ``graceful_timeout_s``.

    Error handling: a bad ``listen_url`` raises :class:`~trio_sign.transport.TransportError` or
    ``ValueError``; a bind failure ``OSError``, before ``started``.
    """
    hypercorn_bind(listen_url)  # a bad URL raises here, not wrapped by the nursery below
    app = HealthApp(state, tail_keepalive_s=tail_keepalive_s)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            functools.partial(
                serve_asgi, app, listen_url, logger=log, graceful_timeout_s=graceful_timeout_s
            )
        )
        log.info("health server listening on %s", ", ".join(binds))
        task_status.started(binds)
