"""The gRPC ingress: a byte pipe from the Sign Gateway to the enclave's gRPC port.

TLS ends inside the enclave (DESIGN §10): the gateway's TLS 1.3 connection, with its client
certificate, runs end to end to the enclave, which checks the certificate against the CA in
its measured configuration and proves its own key by attestation. The parent cannot read,
change or inject anything: it forwards the bytes of each connection as they come, TLS records
it has no key for. What it keeps is the bounding (DESIGN §16): connections that have not sent
their first byte are pending (a descriptor and a sleeping task each, no enclave connection;
``max_pending``, the oldest closed, ``first_byte_timeout_s``); forwarded connections are
bounded by ``max_connections`` (the quietest one makes room) and closed after
``idle_timeout_s`` without a byte either way. Handshake bounds are the enclave's own
(``enclave.toml`` ``[limits]``: ``tls_handshake_timeout_s``, ``max_tls_handshakes``).

The parent's `AttestationGate` (over the enclave's public port) stays as defence in depth and
for health, never as the security boundary: while it is not verified new connections are
closed at once (a client sees UNAVAILABLE), and when a periodic check fails the connections
being forwarded are closed too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from ..rpc import BurstListener, RateLimitedLog, connection_limit
from ..transport import TransportError, connect, load_cert_chain, open_listeners
from ..transport._pacer import BatchPacer
from ._attestation_gate import AttestationGate
from ._sources import SourceBudget, source_key

log = logging.getLogger("trio_sign.parent.ingress")

#: The application protocol the enclave serves (the pipe does not look).
ALPN_H2: Final = "h2"
_CHUNK: Final = 64 * 1024


@dataclass(frozen=True)
class IngressSettings:
    """Limits of the ingress pipe.

    Attributes:
        first_byte_timeout_s: a connection that has sent nothing for this long after its
            accept is closed (it never reached the enclave).
        max_pending: accepted connections that have not sent their first byte: no enclave
            connection exists for them (a descriptor and a sleeping task each), so bare TCP
            connections are cheap to hold. At the limit the oldest pending one is closed.
        idle_timeout_s: a forwarded connection with no bytes either way for this long is
            closed (gRPC clients keep busy connections alive with HTTP/2 PINGs).
        enclave_connect_timeout_s: bound on connecting to the enclave's port.
        close_timeout_s: bound on a close before dropping.
        max_connections: forwarded connections at once. At the limit a new connection closes
            the forwarded one that has been quiet longest, if it has been quiet at least
            ``evict_quiet_s``; otherwise the newcomer is closed.
        evict_quiet_s: how long a forwarded connection must have moved no bytes before a
            newcomer may take its slot.
        setups_per_batch: connections that start forwarding per pass of the event loop; the
            others wait, newest first, still pending (`BatchPacer`). A burst of thousands of
            connections otherwise lands in a few passes that every forwarded call waits
            behind.
        socket_buffer_bytes: the kernel's receive buffer of a forwarded client connection and
            send buffer toward the enclave (what a client can have in flight through the
            pipe; the kernel doubles it for its bookkeeping).
        per_source_rate: connections one client address (an IPv4 address, an IPv6 /64) may
            start forwarding per second, after a burst of ``per_source_burst``
            (`SourceBudget`); ``inf``: no limit. Behind the pipe the enclave cannot tell
            clients apart, so this is where one client reconnecting in a loop is slowed.
        per_source_burst: connections one address may start at once.
        per_source_max_wait_s: a connection that comes early waits for its turn at most this
            long (still pending: ``first_byte_timeout_s`` and ``max_pending`` apply), else it
            is closed.
        log_interval_s: refusals of one kind are logged at most once per this.
    """

    first_byte_timeout_s: float = 5.0
    max_pending: int = 4096
    idle_timeout_s: float = 600.0
    enclave_connect_timeout_s: float = 5.0
    close_timeout_s: float = 1.0
    max_connections: int = 4096
    evict_quiet_s: float = 1.0
    setups_per_batch: int = 16
    socket_buffer_bytes: int = 64 * 1024
    per_source_rate: float = 10.0
    per_source_burst: int = 20
    per_source_max_wait_s: float = 1.0
    log_interval_s: float = 10.0


def make_server_ssl_context(
    cert_pem: bytes | str, key_pem: bytes | str, client_ca_pem: bytes | str
) -> ssl.SSLContext:
    """A TLS 1.3 server context (client certificates required and checked against
    ``client_ca_pem``, ALPN ``h2``) for a development TLS terminator. The ingress no longer
    terminates TLS (the enclave does); kept for tools that check a development PKI.

    Raises:
        ssl.SSLError: a certificate or key does not load (or they do not match).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    ca = client_ca_pem.decode() if isinstance(client_ca_pem, bytes) else client_ca_pem
    context.load_verify_locations(cadata=ca)
    context.set_alpn_protocols([ALPN_H2])
    load_cert_chain(context, cert_pem, key_pem)
    return context


ConnectEnclave = Callable[[], Awaitable[trio.abc.Stream]]


async def serve_ingress(
    listen_url: str,
    enclave_url: str,
    gate: AttestationGate,
    *,
    settings: IngressSettings = IngressSettings(),
    connect_enclave: ConnectEnclave | None = None,
    observer: IngressObserver | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listen_url`` and pipe their bytes to ``enclave_url``.

    Args:
        listen_url: e.g. ``tcp://0.0.0.0:50051``.
        enclave_url: the enclave's gRPC port, e.g. ``vsock://16:50051`` (or ``unix://`` locally),
            where TLS ends.
        gate: forwarding happens only while ``gate.verified`` (run `run_attestation_gate`
            beside this).
        settings: limits and timeouts.
        connect_enclave: overrides how the enclave is reached (default ``connect(enclave_url)``).
        observer: told about every forwarded connection (opened/closed) and every refusal,
            for metrics (the parent's ``ParentState``).

    ``nursery.start`` returns the listeners once they are bound.

    Raises:
        TransportError: the listen address cannot be bound.

    Error handling: a refused or failed connection (silent too long, gate closed, limits,
    enclave unreachable, either side breaking) is logged and closed; it never stops the
    service. When the gate closes, forwarded connections are closed too.

    Cancellation: stops accepting and closes every connection.
    """
    opener: ConnectEnclave = connect_enclave or (lambda: connect(enclave_url))
    watch: IngressObserver = observer if observer is not None else _NoObserver()
    settings = _fit_open_file_limit(settings)
    slots = _Slots(settings, watch)
    pacer = BatchPacer(settings.setups_per_batch)
    listeners = await open_listeners(listen_url)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            address = stream.socket.getpeername()
        except OSError:
            address = None
        peer = _peer_name(address)
        try:
            await _serve_connection(
                stream,
                peer,
                source_key(address),
                enclave_url,
                opener,
                gate,
                settings,
                watch,
                slots,
                pacer,
            )
        except Exception:
            # A bug while serving one connection closes that connection only: one client
            # must not be able to stop the ingress for every other (as GrpcServer does).
            log.exception("ingress connection failed unexpectedly; closed it", extra={"peer": peer})

    log.info(
        "ingress listening (byte pipe: TLS ends in the enclave)",
        extra={"listen": listen_url, "enclave": enclave_url},
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.run)
        nursery.start_soon(_end_forwarding_when_revoked, gate, slots)
        # A burst is accepted in one pass, into an accept queue as long as max_pending.
        burst = [BurstListener(listener, backlog=settings.max_pending) for listener in listeners]
        await nursery.start(trio.serve_listeners, handler, burst)
        task_status.started(listeners)


def _fit_open_file_limit(settings: IngressSettings) -> IngressSettings:
    """Lower the limits so that every pending connection (one descriptor) and every
    forwarded connection (two) fits the open-file limit: out of descriptors, the ingress could
    not even accept a connection to refuse it."""
    wanted = settings.max_pending + 2 * settings.max_connections
    room = connection_limit(wanted)
    if room >= wanted:
        return settings
    pending = max(1, min(settings.max_pending, room // 4))
    connections = max(1, (room - pending) // 2)
    log.warning(
        "ingress limits lowered to fit the open-file limit",
        extra={"max_pending": pending, "max_connections": connections},
    )
    return dataclasses.replace(settings, max_pending=pending, max_connections=connections)


class _Conn:
    """One connection's place in `_Slots`: its cancel scope (which also carries its deadline),
    when it last moved bytes (or entered its place), and why it ended."""

    __slots__ = ("ended", "last_active", "order", "scope")

    def __init__(self, deadline: float = math.inf) -> None:
        self.scope = trio.CancelScope(deadline=deadline)
        self.last_active = trio.current_time()
        # The forwarded connections, least recently active first (`_Slots.forwarding`).
        self.order: dict[_Conn, None] | None = None
        self.ended = "idle"

    def end(self, why: str) -> None:
        """End it (its scope), remembering the first reason given."""
        if not self.scope.cancel_called:
            self.ended = why
        self.scope.cancel()

    def touch(self) -> None:
        """It moved bytes now: the last in line to be evicted as the quietest."""
        self.last_active = trio.current_time()
        order = self.order
        if order is not None and order.pop(self, 0) is None:
            order[self] = None


class _Slots:
    """Admission for the ingress: pending connections and forwarded connections, each bounded,
    each making room by ending the stalest holder rather than refusing newcomers (an
    attacker's connections are the stale ones; a real gateway's are busy)."""

    def __init__(self, settings: IngressSettings, watch: IngressObserver) -> None:
        self._settings = settings
        self._watch = watch
        self.pending: dict[_Conn, None] = {}  # insertion order: oldest first
        # Least recently active first (`_Conn.touch`): the quietest is found in O(1).
        self.forwarding: dict[_Conn, None] = {}
        self.pending_evicted = 0
        self.connections_evicted = 0
        self.connections_refused = 0
        self.sources = SourceBudget(
            settings.per_source_rate,
            settings.per_source_burst,
            settings.per_source_max_wait_s,
            trio.current_time,
        )
        self.source_refused = 0

        rated = functools.partial(
            RateLimitedLog, log, interval_s=settings.log_interval_s, clock=trio.current_time
        )

        self.log_pending_evicted = rated(
            "ingress: max_pending connections; closed the oldest", level=logging.INFO
        )
        self.log_evicted = rated(
            "ingress: max_connections reached; closed the quietest connection", level=logging.INFO
        )
        self.log_refused = rated("ingress connection refused: max_connections, all busy")
        self.log_not_attested = rated("ingress connection refused: enclave not attested")
        self.log_unreachable = rated("ingress cannot reach the enclave")
        self.log_source_refused = rated(
            "ingress connection refused: its address opens connections faster than per_source_rate"
        )

    def refuse_source(self, peer: str) -> None:
        self.source_refused += 1
        self._watch.proxy_connection_refused()
        self.log_source_refused(
            peer=peer,
            per_source_rate=self._settings.per_source_rate,
            per_source_burst=self._settings.per_source_burst,
        )

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

    def start_forwarding(self, conn: _Conn) -> bool:
        if len(self.forwarding) >= self._settings.max_connections:
            quietest = next(iter(self.forwarding))
            if trio.current_time() - quietest.last_active < self._settings.evict_quiet_s:
                self.connections_refused += 1
                self._watch.proxy_connection_refused()
                self.log_refused(max_connections=self._settings.max_connections)
                return False
            self.end_forwarding(quietest)
            quietest.end("evicted")
            self.connections_evicted += 1
            self.log_evicted(max_connections=self._settings.max_connections)
        conn.last_active = trio.current_time()
        conn.order = self.forwarding
        self.forwarding[conn] = None
        return True

    def end_forwarding(self, conn: _Conn) -> None:
        self.forwarding.pop(conn, None)
        conn.order = None

    def end_all_forwarding(self, why: str) -> None:
        for conn in list(self.forwarding):
            conn.end(why)


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


def _peer_name(address: object) -> str:
    if address is None:
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) or "unix"


async def _close(stream: trio.abc.AsyncResource, timeout_s: float) -> None:
    if isinstance(stream, trio.SocketStream):
        # What its aclose does, less a checkpoint and the bound's cancel scope: a socket
        # closes at once (and a burst of connections ends in bulk; DESIGN §16).
        stream.socket.close()
        return
    # aclose closes the resource even when cancelled; the bound is a safety net.
    with trio.move_on_after(timeout_s, shield=True):
        await stream.aclose()


async def _serve_connection(
    client: trio.SocketStream,
    peer: str,
    source: str | None,
    enclave_url: str,
    opener: ConnectEnclave,
    gate: AttestationGate,
    settings: IngressSettings,
    watch: IngressObserver,
    slots: _Slots,
    pacer: BatchPacer,
) -> None:
    hello = _Conn(deadline=trio.current_time() + settings.first_byte_timeout_s)
    try:
        slots.start_pending(hello)
        try:
            with hello.scope:
                # Nothing is opened toward the enclave until the client says something: a
                # bare TCP connection costs a descriptor and this sleeping task.
                await trio.lowlevel.wait_readable(client.socket)
                # Still pending (bounded, evictable) while it waits for its turns: its
                # source's (time), then the event loop's (a few per pass).
                start = slots.sources.reserve(source)
                if start is None:
                    slots.refuse_source(peer)
                    return
                await trio.sleep_until(start)
                await pacer.turn()
        finally:
            slots.end_pending(hello)
        if hello.scope.cancelled_caught:
            log.debug("ingress connection silent too long or made room", extra={"peer": peer})
            return
        if await _closed_without_a_byte(client):
            return  # readable, but only its end: nothing to open toward the enclave for
        if not gate.verified:
            slots.log_not_attested(peer=peer, reason=gate.last_failure)
            watch.proxy_connection_refused()
            return
        conn = _Conn()
        if not slots.start_forwarding(conn):
            return
        try:
            await _forward(client, peer, enclave_url, opener, settings, watch, slots, conn)
        finally:
            slots.end_forwarding(conn)
    finally:
        await _close(client, settings.close_timeout_s)


async def _closed_without_a_byte(client: trio.SocketStream) -> bool:
    """Whether a readable connection is readable only because the peer closed it (a peek;
    the bytes stay for the pipe)."""
    try:
        return await client.socket.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # reset: gone as well
        return True


async def _forward(
    client: trio.SocketStream,
    peer: str,
    enclave_url: str,
    opener: ConnectEnclave,
    settings: IngressSettings,
    watch: IngressObserver,
    slots: _Slots,
    conn: _Conn,
) -> None:
    log.debug("ingress connection opened", extra={"peer": peer})
    # Made room for (or the gate closed) while connecting: its scope is cancelled already,
    # and the pumps below end at once.
    try:
        with trio.fail_after(settings.enclave_connect_timeout_s):
            enclave = await opener()
    except (TransportError, trio.TooSlowError) as exc:
        slots.log_unreachable(peer=peer, enclave=enclave_url, error=str(exc) or "timeout")
        return
    watch.proxy_connection_opened()
    _bound_buffers(client, enclave, settings.socket_buffer_bytes)
    try:
        counts = await _pump_both_ways(client, enclave, settings, conn)
    finally:
        watch.proxy_connection_closed()
        await _close(enclave, settings.close_timeout_s)
    log.debug(
        "ingress connection closed",
        extra={"peer": peer, "bytes_in": counts[0], "bytes_out": counts[1], "end": counts[2]},
    )


def _bound_buffers(client: trio.abc.Stream, enclave: trio.abc.Stream, size: int) -> None:
    """Fix the kernel's buffers of a forwarded connection (what the client may have in flight
    toward the enclave) at ``size`` instead of letting them grow to megabytes: a client cut
    by the enclave for a flood (which then reconnects) had pushed about 1 MB per connection
    through the pipe before the cut reached it; a gateway's calls are a few KiB."""
    for stream, option in ((client, socket.SO_RCVBUF), (enclave, socket.SO_SNDBUF)):
        sock = getattr(stream, "socket", None)
        if sock is None:
            continue
        with contextlib.suppress(OSError):  # vsock and friends: their own buffer settings
            sock.setsockopt(socket.SOL_SOCKET, option, size)


async def _end_forwarding_when_revoked(gate: AttestationGate, slots: _Slots) -> None:
    """Whenever the gate closes (a periodic check failed), end every forwarded connection:
    one task for all of them, not one per connection."""
    while True:
        await gate.wait_verified()
        await gate.wait_revoked()
        slots.end_all_forwarding("attestation_failed")


async def _pump_both_ways(
    client: trio.abc.Stream,
    enclave: trio.abc.Stream,
    settings: IngressSettings,
    conn: _Conn | None = None,
) -> tuple[int, int, str]:
    """Move bytes both ways until either side ends, ``conn`` is ended (made room for, the
    gate closed) or ``idle_timeout_s`` passes without a byte; return (bytes in, bytes out,
    why)."""
    conn = conn if conn is not None else _Conn()
    counts = [0, 0]
    scope = conn.scope
    scope.deadline = trio.current_time() + settings.idle_timeout_s
    finish = conn.end

    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream, index: int) -> None:
        try:
            while True:
                data = await source.receive_some(_CHUNK)
                if not data:
                    break
                # Back-pressure: the next receive waits until the other side took this.
                await sink.send_all(data)
                counts[index] += len(data)
                conn.touch()
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
        # The enclave closed (its TLS close_notify went through already): end it all.
        finish("client_eof" if index == 0 else "enclave_eof")

    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, enclave, client, 1)
            await pump(client, enclave, 0)
    return counts[0], counts[1], conn.ended
