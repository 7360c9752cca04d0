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
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from .. import __version__
from .._metrics import (
    MetricsSnapshotError,
    Registry,
    escape_help,
    format_number,
    label_part,
    merge_snapshots,
    render_snapshot,
)
from ..rpc import RateLimitedLog
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
from ._deltas import DeltaStats
from ._lifecycle import ALERTS, ENCLAVE_STATES, Alerts, Lifecycle, ParentPhase
from ._logs import CloudWatchStats, LogStats, LogTail, TailFull
from ._relay import RelayStats

log = logging.getLogger("trio_sign.parent.health")

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
    """What health reports: the parent's :class:`Lifecycle` (its phase and its view of the
    enclave) and :class:`Alerts`, read live, never copied; plus the counters the parent's
    services own (the supervisor passes these same objects to them).

    Attributes:
        lifecycle: the parent's phase machine and the enclave's reported state.
        alerts: every alert raised (the last one, counts per code).
        attestation_gate: the live gate (None before the first run attests).
        attestation_max_age_s: if set, readiness also needs an attestation check this recent.
        enclave_sessions_open, enclave_sessions_max, enclave_memory_used_bytes,
            enclave_memory_limit_bytes: from the enclave's last ``GetStatus``, at Unix time
            ``enclave_status_at``.
        ingress_required: an ingress is configured, so readiness also needs it listening
            (``ingress_listening``, set by the supervisor once its socket is bound): a load
            balancer or gateway that waits for ``/readyz`` must not be refused at the door.
        relay, logs, cloudwatch: counters owned by the SSE relay and the log forwarder.
        tail: the live tail behind ``/v1/logs/tail`` (404 when None).
        deltas: the delta store's head and the enclave's position, owned by the deltas
            channel (None without ``[deltas]``).
        identity_public_key: the delta identity key the parent sends the enclave (hex, from
            ``[identity] sealed_file``; public), shown on ``/readyz``; None without one.
    """

    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    alerts: Alerts = field(default_factory=Alerts)
    attestation_gate: AttestationSource | None = None
    attestation_max_age_s: float | None = None
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
    deltas: DeltaStats | None = None
    identity_public_key: str | None = None
    ingress_required: bool = False
    ingress_listening: bool = False
    wall_clock: Callable[[], float] = time.time

    # -- the ingress proxy's observer ------------------------------------------------------

    def proxy_connection_opened(self) -> None:
        self.proxy_connections_active += 1
        self.proxy_connections_total += 1

    def proxy_connection_closed(self) -> None:
        self.proxy_connections_active = max(0, self.proxy_connections_active - 1)

    def proxy_connection_refused(self) -> None:
        self.proxy_connections_refused += 1

    # -- readers (of the machine) ----------------------------------------------------------

    @property
    def enclave_state(self) -> str:
        return self.lifecycle.enclave.state

    @property
    def enclave_exit_code(self) -> int | None:
        return self.lifecycle.enclave.exit_code

    @property
    def phase(self) -> ParentPhase:
        return self.lifecycle.phase

    @property
    def attestation_verified(self) -> bool:
        return self.attestation()[0]

    # -- readers ---------------------------------------------------------------------------

    def attestation(self) -> tuple[bool, float | None, str | None]:
        """(verified, checked at as Unix time, failure reason): from the gate if attached."""
        gate = self.attestation_gate
        if gate is None:
            return False, None, None
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
        return (
            self.lifecycle.phase is ParentPhase.SERVING
            and self.enclave_state == "serving"
            and self.attestation_fresh
            and ingress_ok
        )

    def report(self) -> dict[str, Any]:
        """The readiness report (JSON-ready; public facts only)."""
        verified, checked_at, failure = self.attestation()
        lifecycle = self.lifecycle
        enclave = lifecycle.enclave
        last = self.alerts.last
        report = {
            "ready": self.ready,
            "phase": lifecycle.phase.value,
            "phase_since": _rfc3339(lifecycle.phase_since),
            "restarts": lifecycle.restarts,
            "enclave_state": enclave.state,
            "enclave_reason": enclave.reason,
            "enclave_exit": enclave.exit_description,
            "accounts": enclave.accounts,
            "shares_sha256": enclave.shares_sha256,
            "preload_ms": enclave.preload_ms,
            "attestation_verified": verified,
            "attestation_checked_at": _rfc3339(checked_at),
            "attestation_failure": failure,
            "attestation_fresh": self.attestation_fresh,
            "ingress_listening": self.ingress_listening if self.ingress_required else None,
            "last_alert": None if last is None else f"{last[0]}: {last[1]}",
            "last_alert_code": None if last is None else last[0],
            "last_alert_at": _rfc3339(self.alerts.last_at),
        }
        if self.deltas is not None:  # with [deltas] only
            report["deltas_stored"] = self.deltas.store_head  # the store's head sequence
            report["deltas_loaded"] = self.deltas.enclave_sequence  # its last delta_loaded
            report["deltas_head"] = self.deltas.enclave_head
        if self.identity_public_key is not None:  # with [identity] sealed_file only
            report["identity_public_key"] = self.identity_public_key
        return report


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    ms = round(ts * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


# -- Prometheus text exposition (sans-io) ------------------------------------------------------


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
        self._lines.append(f"# HELP {name} {escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self._lines.append(f"{name}{label_part(labels.items())} {format_number(value)}")

    def gauge(self, name: str, help_text: str, value: float) -> None:
        self.family(name, "gauge", help_text, [({}, value)])

    def counter(self, name: str, help_text: str, value: float) -> None:
        self.family(name, "counter", help_text, [({}, value)])

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._names)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def render_metrics(state: ParentState) -> str:
    """The ``/metrics`` body for ``state``: the parent's own families, its build info, and the
    enclave's numbers from its last ``metrics`` message (sessions, signatures, latency, pool,
    refusals). The enclave's snapshot is checked before it is rendered; a bad one is left
    out (and logged), never a reason to fail the scrape."""
    own = _parent_families(state)
    registry = Registry()
    registry.build_info("parent", __version__)
    extra = registry.snapshot()
    enclave = state.lifecycle.enclave_metrics
    if enclave is not None:
        try:
            extra = merge_snapshots(extra, enclave)
        except MetricsSnapshotError as exc:
            _bad_snapshot_log(error=str(exc)[:200])
    families = [f for f in extra["families"] if f["name"] not in own.names]
    return own.text() + render_snapshot({**extra, "families": families})


_bad_snapshot_log = RateLimitedLog(
    log, "the enclave's metrics snapshot is refused", interval_s=60.0, clock=time.monotonic
)


def _parent_families(state: ParentState) -> MetricsWriter:
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
    lifecycle = state.lifecycle
    m.family(
        "trio_sign_parent_phase",
        "gauge",
        "The parent's lifecycle phase (1 for the current phase, 0 for the others).",
        [({"phase": p.value}, 1 if p is lifecycle.phase else 0) for p in ParentPhase],
    )
    m.counter(
        "trio_sign_enclave_restarts_total",
        "Enclave runs started again after a failure ([failure] restart).",
        lifecycle.restarts,
    )
    m.family(
        "trio_sign_alerts_total",
        "counter",
        "Alerts raised, by their stable code (the log's alert field).",
        [({"alert": code}, state.alerts.counts.get(code, 0)) for code in ALERTS],
    )
    m.counter(
        "trio_sign_alert_hook_failures_total",
        "Alert command hooks that failed, timed out or could not run.",
        state.alerts.hooks_failed,
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
        state.lifecycle.enclave.accounts or 0,
    )
    m.gauge(
        "trio_sign_enclave_preload_seconds",
        "How long the enclave's preload took, in seconds (0 before preload).",
        (state.lifecycle.enclave.preload_ms or 0) / 1000,
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
    if state.deltas is not None:
        _delta_families(m, state.deltas)
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
    dropped = [
        ({"where": "enclave"}, float(logs.enclave_dropped)),
        ({"where": "file"}, float(logs.sink_dropped)),
    ]
    if state.cloudwatch is not None:
        dropped.append(({"where": "cloudwatch"}, float(state.cloudwatch.dropped)))
    m.family(
        "trio_sign_log_lines_dropped_total",
        "counter",
        "Log lines dropped: in the enclave (its queue was full) or before CloudWatch.",
        dropped,
    )
    m.counter(
        "trio_sign_log_write_errors_total",
        "Failed writes, fsyncs and reopens of the log file or stdout (disk full, permissions).",
        logs.write_errors,
    )
    m.counter(
        "trio_sign_audit_records_synced_total",
        "Boot audit records written to the log file and fsynced.",
        logs.audit_synced,
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
    return m


def _delta_families(m: MetricsWriter, deltas: DeltaStats) -> None:
    m.gauge(
        "trio_sign_parent_deltas_stored",
        "The delta store's head sequence at its last listing (deltas after a gap not counted).",
        deltas.store_head or 0,
    )
    m.gauge(
        "trio_sign_parent_deltas_loaded",
        "The enclave's delta position: its last delta_loaded sequence (at boot, what it loaded).",
        deltas.enclave_sequence or 0,
    )
    m.gauge(
        "trio_sign_parent_deltas_connected",
        "1 while the enclave's deltas channel is connected.",
        1 if deltas.connected else 0,
    )
    m.counter(
        "trio_sign_parent_deltas_pushed_total",
        "Deltas pushed to the running enclave on the deltas channel.",
        deltas.pushed_total,
    )
    m.counter(
        "trio_sign_parent_deltas_written_total",
        "New deltas this parent stored for its enclave.",
        deltas.written_total,
    )
    m.counter(
        "trio_sign_parent_deltas_conflicts_total",
        "Delta stores that found another delta at their sequence (another replica won).",
        deltas.conflicts_total,
    )
    m.counter(
        "trio_sign_parent_deltas_refused_total",
        "Pushed deltas the enclave refused or did not answer.",
        deltas.refused_total,
    )
    m.counter(
        "trio_sign_parent_deltas_store_failures_total",
        "Failed delta store reads and writes (disk, S3).",
        deltas.store_failures_total,
    )


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
