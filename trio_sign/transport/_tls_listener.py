"""A TLS listener with bounded handshakes, for any server that takes a ``trio.abc.Listener``.

:class:`TlsListener` wraps plain listeners: it accepts connections, runs their server-side TLS
handshakes in its own tasks, bounded (DESIGN §16), and hands out only connections whose
handshake finished, so the server behind it (the enclave's gRPC server) never holds a slot
for a client that has not authenticated:

* a connection that has sent nothing holds no TLS state (a descriptor and a sleeping task);
  at most ``max_pending`` such connections, the oldest closed beyond that;
* at most ``max_handshakes`` handshakes run at once; connections ready for one wait, newest
  first, and at the limit the oldest handshake in progress is ended once it is
  ``handshake_evict_age_s`` old (a client that starts a handshake and stalls cannot keep a
  real one out, and a burst of real handshakes is not thrown away);
* at most ``max_handshake_rate`` handshakes start per second (a token bucket holding
  ``max_handshakes``): a full handshake costs the server about 0.65 ms of OpenSSL CPU (3.0,
  no session tickets) and more in Python and trio on these machines, so an unthrottled
  flood of authenticated clients would take the whole event loop from the connections
  already serving; the cap keeps handshakes to a share of it;
* each connection must finish its handshake within ``handshake_timeout_s`` of its accept.

:func:`self_signed_server_context` makes the enclave's per-boot TLS identity (DESIGN §10): a
fresh P-256 key that never leaves memory, a self-signed certificate, TLS 1.3 only, ALPN
``h2``, client certificates required and checked against the pinned CA.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._tls import load_cert_chain

log = logging.getLogger("trio_sign.transport.tls")

#: The only application protocol served.
ALPN_H2: Final = "h2"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Bounds of a :class:`TlsListener` (DESIGN §16).

    Attributes:
        handshake_timeout_s: a client must finish its handshake within this of its accept
            (waiting for a slot included).
        max_pending: accepted connections not in a handshake yet (silent, or waiting for a
            slot); at the limit the oldest is closed.
        max_handshakes: handshakes in progress at once.
        handshake_evict_age_s: how old the oldest handshake in progress must be before a
            waiting connection may end it to take its slot.
        max_ready: finished connections the server has not taken yet; handshakes wait (holding
            their slot) beyond this.
        max_handshake_rate: handshakes started per second at most (``math.inf``: no limit);
            bursts of up to ``max_handshakes`` start at once.
        log_interval_s: refusals of one kind are logged at most once per this.
    """

    handshake_timeout_s: float = 5.0
    max_pending: int = 4096
    max_handshakes: int = 64
    handshake_evict_age_s: float = 1.0
    max_ready: int = 64
    max_handshake_rate: float = 50.0
    log_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.handshake_timeout_s > 0:
            raise ValueError("handshake_timeout_s must be > 0")
        for name in ("max_pending", "max_handshakes", "max_ready"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.handshake_evict_age_s < 0:
            raise ValueError("handshake_evict_age_s must be >= 0")
        if not self.max_handshake_rate > 0:
            raise ValueError("max_handshake_rate must be > 0")


@dataclass(slots=True)
class TlsStats:
    """What a :class:`TlsListener` did (counters only grow)."""

    #: Handshakes that finished and were handed to the server.
    handshakes: int = 0
    #: Handshakes the TLS layer refused (no or untrusted client certificate, TLS < 1.3, ...).
    refused: int = 0
    #: Connections that did not finish their handshake within ``handshake_timeout_s``.
    timeouts: int = 0
    #: Silent connections closed to keep ``max_pending``.
    pending_evicted: int = 0
    #: Handshakes in progress ended to make room (``max_handshakes``).
    handshakes_evicted: int = 0
    #: Connections that negotiated no ALPN ``h2``.
    no_h2: int = 0
    #: Handshakes that waited for the rate limit (``max_handshake_rate``).
    rate_limited: int = 0


class _Conn:
    __slots__ = ("scope", "started", "wake")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.started = trio.current_time()
        self.wake = trio.Event()


class _Slots:
    """Pending connections and handshakes in progress, each bounded; room is made by ending
    the stalest holder rather than refusing newcomers (an attacker's are the stale ones)."""

    def __init__(self, settings: TlsSettings, stats: TlsStats, on_evict: Callable[[str], None]):
        self._settings = settings
        self._stats = stats
        self._on_evict = on_evict
        self._tokens = float(settings.max_handshakes)
        self._refilled: float | None = None
        self.pending: dict[_Conn, None] = {}  # insertion order: oldest first
        self.queue: dict[_Conn, None] = {}  # ready for a handshake: newest last
        self.handshaking: dict[_Conn, None] = {}  # oldest first

    def start_pending(self, conn: _Conn) -> None:
        if len(self.pending) >= self._settings.max_pending:
            oldest = next(iter(self.pending))
            self.end_pending(oldest)
            oldest.scope.cancel()
            self._stats.pending_evicted += 1
            self._on_evict("pending")
        self.pending[conn] = None

    def end_pending(self, conn: _Conn) -> None:
        self.pending.pop(conn, None)
        if self.queue.pop(conn, 0) is None:
            self._wake_newest()

    async def start_handshake(self, conn: _Conn) -> None:
        """Take a handshake slot; while all are taken wait, newest first.

        Cancellation: the connection leaves the queue (the next in line is told).
        """
        settings = self._settings
        self.queue[conn] = None
        limited = False
        while True:
            if next(reversed(self.queue)) is conn:
                token_at = self._next_token_at()
                if token_at > trio.current_time():
                    if not limited:
                        limited = True
                        self._stats.rate_limited += 1
                        self._on_evict("rate")
                    with trio.move_on_at(token_at):
                        await conn.wake.wait()
                    conn.wake = trio.Event()
                    continue
                if len(self.handshaking) < settings.max_handshakes:
                    break
                oldest = next(iter(self.handshaking))
                evict_at = oldest.started + settings.handshake_evict_age_s
                if trio.current_time() >= evict_at:
                    del self.handshaking[oldest]
                    oldest.scope.cancel()
                    self._stats.handshakes_evicted += 1
                    self._on_evict("handshake")
                    break
                with trio.move_on_at(evict_at):
                    await conn.wake.wait()
            else:
                await conn.wake.wait()
            conn.wake = trio.Event()
        self._tokens -= 1.0
        self.end_pending(conn)
        conn.started = trio.current_time()
        self.handshaking[conn] = None

    def _next_token_at(self) -> float:
        """When the bucket next holds a whole token (now, if it does)."""
        rate = self._settings.max_handshake_rate
        now = trio.current_time()
        if math.isinf(rate):
            return now
        if self._refilled is not None:
            burst = float(self._settings.max_handshakes)
            self._tokens = min(burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1.0:
            return now
        return now + (1.0 - self._tokens) / rate

    def end_handshake(self, conn: _Conn) -> None:
        if self.handshaking.pop(conn, 0) is None:
            self._wake_newest()

    def _wake_newest(self) -> None:
        if self.queue:
            next(reversed(self.queue)).wake.set()


class TlsListener(trio.abc.Listener[trio.SSLStream[trio.abc.Stream]]):
    """Server-side TLS over ``listeners``, with bounded handshakes.

    Start :meth:`run` in a nursery (``await nursery.start(listener.run)``), then give the
    listener to a server (``serve_grpc([listener], ...)``): its :meth:`accept` returns only
    connections whose handshake finished with ALPN ``h2`` when ``require_h2``.

    Args:
        listeners: where connections arrive (tcp, unix or vsock; memory listeners in tests).
        ssl_context: a server context (:func:`self_signed_server_context`).
        settings: the handshake bounds.
        require_h2: close connections that did not negotiate ALPN ``h2``.

    Attributes:
        stats: counters of handshakes and refusals.
    """

    def __init__(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        ssl_context: ssl.SSLContext,
        *,
        settings: TlsSettings | None = None,
        require_h2: bool = True,
    ) -> None:
        self._listeners = list(listeners)
        self._context = ssl_context
        self._settings = settings if settings is not None else TlsSettings()
        self._require_h2 = require_h2
        self.stats = TlsStats()
        self._send, self._receive = trio.open_memory_channel[trio.SSLStream[trio.abc.Stream]](
            self._settings.max_ready
        )
        self._scope = trio.CancelScope()
        self._closed = False
        self._slots = _Slots(self._settings, self.stats, self._evicted)
        self._last_log: dict[str, float] = {}

    @property
    def listeners(self) -> list[trio.abc.Listener[trio.abc.Stream]]:
        """The plain listeners underneath."""
        return list(self._listeners)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and handshake until :meth:`aclose` (or cancellation), which also closes the
        plain listeners and every connection not handed out yet.

        Cancellation: stops at once; connections in a handshake are closed.
        """
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for listener in self._listeners:
                        nursery.start_soon(self._accept_loop, listener, nursery)
                    task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._close_all()

    async def accept(self) -> trio.SSLStream[trio.abc.Stream]:
        """The next connection whose handshake finished.

        Raises:
            trio.ClosedResourceError: after :meth:`aclose`.
        """
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the TLS listener is closed") from None

    async def aclose(self) -> None:
        """Stop accepting; close the plain listeners and what was not handed out. Idempotent."""
        self._scope.cancel()
        await self._close_all()
        await trio.lowlevel.checkpoint()

    async def _close_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._send.close()
        for listener in self._listeners:
            await trio.aclose_forcefully(listener)
        while True:
            try:
                stream = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            await trio.aclose_forcefully(stream)
        self._receive.close()

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: wait a little, as serve_listeners does
                self._log("accept", "TLS listener: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._handshake, stream)

    async def _handshake(self, plain: trio.abc.Stream) -> None:
        settings = self._settings
        conn = _Conn()
        tls: trio.SSLStream[trio.abc.Stream] | None = None
        handed = False
        try:
            self._slots.start_pending(conn)
            try:
                with conn.scope, trio.move_on_after(settings.handshake_timeout_s) as deadline:
                    # No TLS state until the client says something.
                    sock = getattr(plain, "socket", None)
                    if sock is not None:
                        await trio.lowlevel.wait_readable(sock)
                    await self._slots.start_handshake(conn)
                    tls = trio.SSLStream(plain, self._context, server_side=True)
                    try:
                        await tls.do_handshake()
                    except trio.BrokenResourceError as exc:
                        self._refused(exc)
                        return
            finally:
                self._slots.end_pending(conn)
                self._slots.end_handshake(conn)
            if tls is None or deadline.cancelled_caught or conn.scope.cancelled_caught:
                if deadline.cancelled_caught:
                    self.stats.timeouts += 1
                    self._log("timeout", "TLS handshake not finished in time; closed")
                return
            if self._require_h2 and tls.selected_alpn_protocol() != ALPN_H2:
                self.stats.no_h2 += 1
                self._log("no_h2", "TLS connection refused: ALPN h2 not negotiated")
                return
            self.stats.handshakes += 1
            try:
                await self._send.send(tls)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            handed = True
        finally:
            if not handed:
                await trio.aclose_forcefully(plain if tls is None else tls)

    def _refused(self, exc: trio.BrokenResourceError) -> None:
        self.stats.refused += 1
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLError) and cause.reason:
            # A TLS-level refusal (no or untrusted client certificate, TLS < 1.3, ...); a bare
            # disconnect (a TCP probe) is not worth a line.
            self._log("refused", "TLS handshake refused: %s", cause.reason, level=logging.INFO)

    def _evicted(self, what: str) -> None:
        if what == "rate":
            self._log(
                "rate",
                "TLS handshakes at their rate limit (max_handshake_rate); new ones wait",
                level=logging.INFO,
            )
            return
        self._log(
            f"evict_{what}",
            "TLS listener at its %s limit; ended the oldest",
            "max_pending" if what == "pending" else "max_handshakes",
            level=logging.INFO,
        )

    def _log(self, kind: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        now = trio.current_time()
        last = self._last_log.get(kind, -math.inf)
        if now - last >= self._settings.log_interval_s:
            self._last_log[kind] = now
            log.log(level, message, *args)


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """A per-boot TLS identity: the context serving it and what the attestation binds.

    Attributes:
        context: TLS 1.3 server context, client certificates required, ALPN ``h2``.
        certificate_der: the self-signed certificate (DER).
        spki_der: its DER SubjectPublicKeyInfo (the attestation document's ``public_key``).
    """

    context: ssl.SSLContext
    certificate_der: bytes
    spki_der: bytes

    def __repr__(self) -> str:
        return f"ServerIdentity(spki_sha256={hashlib.sha256(self.spki_der).hexdigest()[:16]})"


def self_signed_server_context(
    client_ca_pem: str | bytes,
    *,
    common_name: str = "trio-sign enclave",
    lifetime: datetime.timedelta = datetime.timedelta(days=365),
) -> ServerIdentity:
    """A fresh P-256 key, a self-signed certificate for it, and a TLS server context.

    TLS 1.3 only; client certificates required and verified against ``client_ca_pem``; ALPN
    ``h2``. The private key exists only in this process's memory: it goes into OpenSSL
    through an anonymous memory file (``load_cert_chain``), is never written to a file
    system, and the Python objects holding it are dropped on return (CPython cannot promise
    their memory is overwritten; docs/security.md). Verifiers do not trust the certificate by
    a CA: they compare its SPKI with the attestation document's ``public_key``.

    Raises:
        ssl.SSLError: ``client_ca_pem`` does not load.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("trio-sign-enclave")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    ca = client_ca_pem.decode() if isinstance(client_ca_pem, bytes) else client_ca_pem
    context.load_verify_locations(cadata=ca)
    context.set_alpn_protocols([ALPN_H2])
    # No TLS 1.3 session tickets: a per-boot identity whose clients re-attest on every
    # connection has no use for resumption, and minting the two default tickets is half the
    # server's handshake CPU (1.27 -> 0.64 ms with OpenSSL 3.0 here), which an attacker's
    # handshakes would spend (DESIGN §16).
    context.num_tickets = 0
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        load_cert_chain(context, cert.public_bytes(serialization.Encoding.PEM), key_pem)
    finally:
        del key_pem, key
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ServerIdentity(
        context=context,
        certificate_der=cert.public_bytes(serialization.Encoding.DER),
        spki_der=spki,
    )


__all__ = [
    "ALPN_H2",
    "ServerIdentity",
    "TlsListener",
    "TlsSettings",
    "TlsStats",
    "self_signed_server_context",
]
