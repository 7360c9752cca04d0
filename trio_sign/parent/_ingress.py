"""The gRPC ingress proxy: mTLS from the Sign Gateway, raw bytes to the enclave's gRPC port.

Per connection: TLS 1.3 handshake with a client certificate from the configured CA required
and ``h2`` negotiated by ALPN (bounded by ``handshake_timeout_s``), then, if the
`AttestationGate` is verified, a connection to the enclave (vsock in production, UNIX/TCP
locally) and two pumps moving bytes both ways. The proxy never parses HTTP/2: the h2
connection runs end to end between the gateway and the enclave's gRPC server, so deadlines
and statuses pass through untouched.

When the gate is not verified the proxy completes the TLS handshake and closes the connection
at once (TLS close_notify, no HTTP/2 bytes): a gRPC client sees the connection drop before
the server's SETTINGS and reports UNAVAILABLE, as for a server that is down. Speaking h2 just
to send GOAWAY would need an h2 stack in the proxy for no gain to the client. When a periodic
check fails, connections being forwarded are closed too (their in-flight calls fail
UNAVAILABLE), since the enclave behind them is no longer trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import trio
from cryptography import x509

from ..rpc import BurstListener, RateLimitedLog, connection_limit
from ..transport import TransportError, connect, load_cert_chain, open_listeners
from ._attestation_gate import AttestationGate

log = logging.getLogger("trio_sign.parent.ingress")

#: The only application protocol served.
ALPN_H2: Final = "h2"
_CHUNK: Final = 64 * 1024


@dataclass(frozen=True)
class IngressSettings:
    """Limits of the ingress proxy.

    Attributes:
        handshake_timeout_s: a client must finish the TLS handshake within this (counted
            from the TCP accept, waiting included).
        max_pending: connections accepted but not in a TLS handshake yet: those that have
            sent nothing, and those waiting for a handshake slot. No TLS state exists for
            them (a descriptor and a sleeping task each), so bare TCP connections are cheap
            to hold. At the limit the oldest pending connection is closed.
        max_handshakes: TLS handshakes in progress at once (they take no connection slot).
            Connections that have sent their first bytes wait for a slot, newest first; at
            the limit the oldest handshake in progress is ended once it is older than
            ``handshake_evict_age_s`` (a client that starts a handshake and stalls cannot
            keep a real client out, and a burst of real handshakes is not thrown away).
        handshake_evict_age_s: how old a handshake in progress must be before a waiting
            connection may end it to take its slot.
        idle_timeout_s: a forwarded connection with no bytes either way for this long is
            closed (gRPC clients keep busy connections alive with HTTP/2 PINGs).
        enclave_connect_timeout_s: bound on connecting to the enclave's port.
        close_timeout_s: bound on a graceful close (TLS close_notify) before dropping.
        max_connections: forwarded connections at once. At the limit a newly authenticated
            connection closes the forwarded one that has been quiet longest, if it has been
            quiet at least ``evict_quiet_s``; otherwise the newcomer is closed.
        evict_quiet_s: how long a forwarded connection must have moved no bytes before a
            newcomer may take its slot.
        log_interval_s: refusals of one kind are logged at most once per this.
    """

    handshake_timeout_s: float = 5.0
    max_pending: int = 4096
    max_handshakes: int = 64
    handshake_evict_age_s: float = 1.0
    idle_timeout_s: float = 600.0
    enclave_connect_timeout_s: float = 5.0
    close_timeout_s: float = 1.0
    max_connections: int = 1024
    evict_quiet_s: float = 1.0
    log_interval_s: float = 10.0


def make_server_ssl_context(
    cert_pem: bytes | str, key_pem: bytes | str, client_ca_pem: bytes | str
) -> ssl.SSLContext:
    """A server context for the ingress: TLS 1.3 only, client certificates required and
    checked against ``client_ca_pem``, ALPN ``h2``.

    Args:
        cert_pem: the server certificate chain, PEM (leaf first).
        key_pem: its private key, PEM, unencrypted.
        client_ca_pem: the CA(s) whose client certificates are accepted, PEM.

    Raises:
        ssl.SSLError: a certificate or key does not load (or they do not match).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    ca = client_ca_pem.decode() if isinstance(client_ca_pem, bytes) else client_ca_pem
    context.load_verify_locations(cadata=ca)
    context.set_alpn_protocols([ALPN_H2])
    # load_cert_chain reads files only; an anonymous in-memory file (memfd, Linux) keeps the
    # key off the disk.
    load_cert_chain(context, cert_pem, key_pem)
    return context


ConnectEnclave = Callable[[], Awaitable[trio.abc.Stream]]


async def serve_ingress(
    listen_url: str,
    enclave_url: str,
    ssl_context: ssl.SSLContext,
    gate: AttestationGate,
    *,
    settings: IngressSettings = IngressSettings(),
    connect_enclave: ConnectEnclave | None = None,
    observer: IngressObserver | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept mTLS gRPC connections on ``listen_url`` and forward them to ``enclave_url``.

    Args:
        listen_url: e.g. ``tcp://0.0.0.0:50051``.
        enclave_url: the enclave's gRPC port, e.g. ``vsock://16:50051`` (or ``unix://`` locally).
        ssl_context: from `make_server_ssl_context`.
        gate: forwarding happens only while ``gate.verified`` (run `run_attestation_gate`
            beside this).
        settings: limits and timeouts.
        connect_enclave: overrides how the enclave is reached (default ``connect(enclave_url)``).
        observer: told about every forwarded connection (opened/closed) and every refusal,
            for metrics (the parent's ``ParentState``).

    ``nursery.start`` returns the listeners once they are bound.

    Raises:
        TransportError: the listen address cannot be bound.

    Error handling: a refused or failed connection (TLS refusal, no ``h2``, gate closed,
    enclave unreachable, either side breaking) is logged and closed; it never stops the
    service. While the gate is not verified, connections are closed right after the TLS
    handshake (clients see UNAVAILABLE); when the gate closes, forwarded connections are
    closed too.

    Cancellation: stops accepting and closes every connection (a TLS close_notify is
    attempted for at most ``close_timeout_s``).
    """
    opener: ConnectEnclave = connect_enclave or (lambda: connect(enclave_url))
    watch: IngressObserver = observer if observer is not None else _NoObserver()
    settings = _fit_open_file_limit(settings)
    slots = _Slots(settings, watch)
    listeners = await open_listeners(listen_url)

    async def handler(stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        try:
            await _serve_connection(
                stream, peer, enclave_url, opener, ssl_context, gate, settings, watch, slots
            )
        except Exception:
            # A bug while serving one connection closes that connection only: one client
            # must not be able to stop the ingress for every other (as GrpcServer does).
            log.exception("ingress connection failed unexpectedly; closed it", extra={"peer": peer})

    log.info(
        "ingress listening",
        extra={"listen": listen_url, "enclave": enclave_url},
    )
    async with trio.open_nursery() as nursery:
        # A burst is accepted in one pass, into an accept queue as long as max_pending.
        burst = [BurstListener(listener, backlog=settings.max_pending) for listener in listeners]
        await nursery.start(trio.serve_listeners, handler, burst)
        task_status.started(listeners)


def _fit_open_file_limit(settings: IngressSettings) -> IngressSettings:
    """Lower the limits so that every pending connection and handshake (one descriptor
    each) and every forwarded connection (two) fits the open-file limit: out of descriptors,
    the ingress could not even accept a connection to refuse it."""
    wanted = settings.max_pending + settings.max_handshakes + 2 * settings.max_connections
    room = connection_limit(wanted)
    if room >= wanted:
        return settings
    pending = max(1, min(settings.max_pending, room // 4))
    handshakes = max(1, min(settings.max_handshakes, room // 8))
    connections = max(1, (room - pending - handshakes) // 2)
    log.warning(
        "ingress limits lowered to fit the open-file limit",
        extra={
            "max_pending": pending,
            "max_handshakes": handshakes,
            "max_connections": connections,
        },
    )
    return dataclasses.replace(
        settings, max_pending=pending, max_handshakes=handshakes, max_connections=connections
    )


class _Conn:
    """One connection's place in `_Slots`: its cancel scope, when it last moved bytes (or
    entered its place), and the event that tells a waiting connection to look again."""

    __slots__ = ("last_active", "scope", "wake")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.last_active = trio.current_time()
        self.wake = trio.Event()


class _Slots:
    """Admission for the ingress: pending connections, handshakes in progress and forwarded
    connections, each bounded, each making room by ending the stalest holder rather than
    refusing newcomers (an attacker's connections are the stale ones; a real gateway's are
    busy)."""

    def __init__(self, settings: IngressSettings, watch: IngressObserver) -> None:
        self._settings = settings
        self._watch = watch
        self.pending: dict[_Conn, None] = {}  # insertion order: oldest first
        self.queue: dict[_Conn, None] = {}  # pending and ready for a handshake: newest last
        self.handshaking: dict[_Conn, None] = {}  # oldest first
        self.forwarding: set[_Conn] = set()
        self.pending_evicted = 0
        self.handshakes_evicted = 0
        self.connections_evicted = 0
        self.connections_refused = 0

        rated = functools.partial(
            RateLimitedLog, log, interval_s=settings.log_interval_s, clock=trio.current_time
        )

        self.log_pending_evicted = rated(
            "ingress: max_pending connections; closed the oldest", level=logging.INFO
        )
        self.log_handshake_evicted = rated(
            "ingress: max_handshakes in progress; ended the oldest handshake", level=logging.INFO
        )
        self.log_evicted = rated(
            "ingress: max_connections reached; closed the quietest connection", level=logging.INFO
        )
        self.log_refused = rated("ingress connection refused: max_connections, all busy")
        self.log_tls_refused = rated("ingress TLS handshake refused", level=logging.INFO)
        self.log_not_attested = rated("ingress connection refused: enclave not attested")
        self.log_no_h2 = rated("ingress connection refused: ALPN h2 not negotiated")
        self.log_unreachable = rated("ingress cannot reach the enclave")

    def start_pending(self, conn: _Conn) -> None:
        if len(self.pending) >= self._settings.max_pending:
            oldest = next(iter(self.pending))
            self.end_pending(oldest)
            oldest.scope.cancel()
            self.pending_evicted += 1
            self._watch.proxy_connection_refused()
            self.log_pending_evicted(max_pending=self._settings.max_pending)
        self.pending[conn] = None

    def end_pending(self, conn: _Conn) -> None:
        self.pending.pop(conn, None)
        if self.queue.pop(conn, 0) is None:
            self._wake_first()

    async def start_handshake(self, conn: _Conn) -> None:
        """Take a handshake slot; while all are taken, wait, newest first.

        Newest first: under a burst of handshakes (1500 at once in the bench) a client that
        arrives later, such as a gateway reconnecting, does not queue behind the whole burst;
        the oldest waiters are the ones that reach ``handshake_timeout_s``.

        Cancellation: the connection leaves the queue (the next in line is told).
        """
        settings = self._settings
        self.queue[conn] = None
        while True:
            if next(reversed(self.queue)) is conn:
                if len(self.handshaking) < settings.max_handshakes:
                    break
                oldest = next(iter(self.handshaking))
                evict_at = oldest.last_active + settings.handshake_evict_age_s
                if trio.current_time() >= evict_at:
                    del self.handshaking[oldest]
                    oldest.scope.cancel()
                    self.handshakes_evicted += 1
                    self._watch.proxy_connection_refused()
                    self.log_handshake_evicted(max_handshakes=settings.max_handshakes)
                    break
                with trio.move_on_at(evict_at):
                    await conn.wake.wait()
            else:
                await conn.wake.wait()
            conn.wake = trio.Event()
        self.end_pending(conn)
        conn.last_active = trio.current_time()
        self.handshaking[conn] = None

    def end_handshake(self, conn: _Conn) -> None:
        if self.handshaking.pop(conn, 0) is None:
            self._wake_first()

    def _wake_first(self) -> None:
        if self.queue:
            next(reversed(self.queue)).wake.set()

    def refuse_if_full(self) -> bool:
        """At max_connections with every forwarded connection busy, count and log a refusal
        and return True: a connection arriving now would be refused, so it is refused before
        its handshake costs anything (in the bench's burst of 1500, about 500 handshakes)."""
        if len(self.forwarding) < self._settings.max_connections:
            return False
        quietest = min(self.forwarding, key=lambda c: c.last_active)
        if trio.current_time() - quietest.last_active >= self._settings.evict_quiet_s:
            return False
        self.connections_refused += 1
        self._watch.proxy_connection_refused()
        self.log_refused(max_connections=self._settings.max_connections)
        return True

    def start_forwarding(self, conn: _Conn) -> bool:
        if len(self.forwarding) >= self._settings.max_connections:
            if self.refuse_if_full():
                return False
            quietest = min(self.forwarding, key=lambda c: c.last_active)
            self.forwarding.discard(quietest)
            quietest.scope.cancel()
            self.connections_evicted += 1
            self.log_evicted(max_connections=self._settings.max_connections)
        self.forwarding.add(conn)
        return True

    def end_forwarding(self, conn: _Conn) -> None:
        self.forwarding.discard(conn)


class IngressObserver(Protocol):
    """What the proxy reports for metrics (``ParentState`` implements it)."""

    def proxy_connection_opened(self) -> None: ...

    def proxy_connection_closed(self) -> None: ...

    def proxy_connection_refused(self) -> None: ...


class _NoObserver:
    def proxy_connection_opened(self) -> None:
        pass

    def proxy_connection_closed(self) -> None:
        pass

    def proxy_connection_refused(self) -> None:
        pass


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) or "unix"


def _client_subject(tls: trio.SSLStream[trio.SocketStream]) -> str:
    der = tls.getpeercert(binary_form=True)
    if not der:
        return ""
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return "?"


def _log_handshake_failure(peer: str, exc: trio.BrokenResourceError, slots: _Slots) -> None:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError) and cause.reason:
        # A TLS-level refusal (no or untrusted client certificate, TLS < 1.3, ...): worth
        # an operator's attention. A bare disconnect (load balancer TCP probe) is not.
        slots.log_tls_refused(peer=peer, tls=cause.reason)
    else:
        log.debug("ingress TLS handshake aborted by the peer", extra={"peer": peer})


async def _close(stream: trio.abc.AsyncResource, timeout_s: float) -> None:
    # aclose closes the resource even when cancelled; the bound only stops a graceful
    # close_notify from waiting on a peer that does not read.
    with trio.move_on_after(timeout_s, shield=True):
        await stream.aclose()


async def _serve_connection(
    tcp: trio.SocketStream,
    peer: str,
    enclave_url: str,
    opener: ConnectEnclave,
    ssl_context: ssl.SSLContext,
    gate: AttestationGate,
    settings: IngressSettings,
    watch: IngressObserver,
    slots: _Slots,
) -> None:
    hello = _Conn()  # pending, then handshaking (a scope is entered once: two places)
    tls: trio.SSLStream[trio.SocketStream] | None = None
    try:
        slots.start_pending(hello)
        try:
            with hello.scope, trio.move_on_after(settings.handshake_timeout_s) as handshake:
                # No TLS state until the client says something: a bare TCP connection costs
                # a descriptor and this sleeping task, nothing more.
                await trio.lowlevel.wait_readable(tcp.socket)
                await slots.start_handshake(hello)
                if slots.refuse_if_full():
                    return
                tls = trio.SSLStream(tcp, ssl_context, server_side=True)
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    _log_handshake_failure(peer, exc, slots)
                    watch.proxy_connection_refused()
                    return
        finally:
            slots.end_pending(hello)
            slots.end_handshake(hello)
        if tls is None or handshake.cancelled_caught or hello.scope.cancelled_caught:
            log.debug("ingress TLS handshake timed out or made room", extra={"peer": peer})
            return
        subject = _client_subject(tls)
        alpn = tls.selected_alpn_protocol()
        if alpn != ALPN_H2:
            slots.log_no_h2(peer=peer, client=subject, alpn=alpn)
            watch.proxy_connection_refused()
            return
        if not gate.verified:
            slots.log_not_attested(peer=peer, client=subject, reason=gate.last_failure)
            watch.proxy_connection_refused()
            return
        conn = _Conn()
        if not slots.start_forwarding(conn):
            return
        try:
            await _forward(
                tls, peer, subject, enclave_url, opener, gate, settings, watch, slots, conn
            )
        finally:
            slots.end_forwarding(conn)
    finally:
        await _close(tcp if tls is None else tls, settings.close_timeout_s)


async def _forward(
    tls: trio.SSLStream[trio.SocketStream],
    peer: str,
    subject: str,
    enclave_url: str,
    opener: ConnectEnclave,
    gate: AttestationGate,
    settings: IngressSettings,
    watch: IngressObserver,
    slots: _Slots,
    conn: _Conn,
) -> None:
    log.debug("ingress connection opened", extra={"peer": peer, "client": subject})
    with conn.scope:
        try:
            with trio.fail_after(settings.enclave_connect_timeout_s):
                enclave = await opener()
        except (TransportError, trio.TooSlowError) as exc:
            slots.log_unreachable(peer=peer, enclave=enclave_url, error=str(exc) or "timeout")
            return
        watch.proxy_connection_opened()
        try:
            counts = await _pump_both_ways(tls, enclave, gate, settings, conn)
        finally:
            watch.proxy_connection_closed()
            await _close(enclave, settings.close_timeout_s)
        log.debug(
            "ingress connection closed",
            extra={
                "peer": peer,
                "client": subject,
                "bytes_in": counts[0],
                "bytes_out": counts[1],
                "end": counts[2],
            },
        )


async def _pump_both_ways(
    client: trio.abc.Stream,
    enclave: trio.abc.Stream,
    gate: AttestationGate,
    settings: IngressSettings,
    conn: _Conn | None = None,
) -> tuple[int, int, str]:
    """Move bytes both ways until either side ends; return (bytes in, bytes out, why)."""
    conn = conn if conn is not None else _Conn()
    counts = [0, 0]
    ended = ["idle"]
    scope = trio.CancelScope(deadline=trio.current_time() + settings.idle_timeout_s)

    def finish(why: str) -> None:
        if not scope.cancel_called:
            ended[0] = why
        scope.cancel()

    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream, index: int) -> None:
        try:
            while True:
                data = await source.receive_some(_CHUNK)
                if not data:
                    break
                # Back-pressure: the next receive waits until the other side took this.
                await sink.send_all(data)
                counts[index] += len(data)
                conn.last_active = trio.current_time()
                scope.deadline = conn.last_active + settings.idle_timeout_s
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            finish("broken")
            return
        if index == 0 and isinstance(sink, trio.abc.HalfCloseableStream):
            # The client finished sending: pass the half-close on and keep the reply flowing.
            try:
                await sink.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                finish("broken")
            return
        # TLS has no half-close in Trio (close_notify ends both directions): end it all.
        finish("client_eof" if index == 0 else "enclave_eof")

    async def watch_gate() -> None:
        await gate.wait_revoked()
        finish("attestation_failed")

    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, enclave, 0)
            nursery.start_soon(pump, enclave, client, 1)
            nursery.start_soon(watch_gate)
    return counts[0], counts[1], ended[0]
