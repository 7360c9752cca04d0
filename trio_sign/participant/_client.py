"""The participant's connection to the gateway, on anyio: the same code runs under asyncio
and under Trio.

Layers: ``anyio.connect_tcp`` (TLS through anyio for ``wss://``) moves bytes; ``wsproto``
(sans-io) turns them into WebSocket frames; :class:`~._session.ParticipantSession` (sans-io)
turns frames into events and decisions into frames; this module only moves data between them
and waits for decisions. One writer per connection (a lock around ``send``).

Supervision (one task group per connection, drawn in :meth:`ParticipantClient._connection`):
the reader, the sweeper (drops requests past their deadline, zeroing their nonces) and one
task per pending decision, each under its request's deadline, so a slow decision (a person
who does not answer) never blocks another request. The in-flight bound is the session's
``max_in_flight`` (requests beyond it are declined ``busy`` before any decision starts).
:meth:`ParticipantClient.run` reconnects forever with capped exponential back-off and full
jitter (:func:`trio_sign._backoff.full_jitter_delay`); the back-off resets once a connection
has been welcomed.

Cancellation: cancelling :meth:`~ParticipantClient.run` (or :meth:`run_once`) closes the
connection and zeroes every nonce the session held.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .._backoff import full_jitter_delay
from .._errors import TrioSignError
from ..gateway._approvals import ApproverSigningKey
from ..rpc import LogThrottle
from ..shares import ShareRecord
from . import _messages as m
from . import _session as s
from ._policy import Decision, Policy

log = logging.getLogger("trio_sign.participant")

SUBPROTOCOL: Final = "trio-sign-participant.v1"
#: Version 2 adds DKG (``dkg_*``); the client proposes both, the gateway picks.
SUBPROTOCOL_V2: Final = "trio-sign-participant.v2"
_VERSIONS: Final = {SUBPROTOCOL_V2: 2, SUBPROTOCOL: 1}
_RECEIVE_BYTES: Final = 65536
#: The gateway's error frames: one log line per this at most.
ERROR_LOG_INTERVAL_S: Final = 10.0
_GONE: Final = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, LocalProtocolError)


class ParticipantConnectionError(TrioSignError):
    """A connection to the gateway failed or ended.

    Attributes:
        close_code: the WebSocket close code, when the connection was closed with one.
    """

    def __init__(self, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the gateway is and the connection's limits.

    Attributes:
        url: ``ws://host:port/v1/participants`` or ``wss://...``.
        ssl_context: for ``wss://`` (default: the system's trust store).
        connect_timeout_s: TCP (+ TLS) connect and the WebSocket and auth handshake.
        reconnect_initial_s, reconnect_max_s: back-off between attempts.
        max_in_flight: requests held at once.
        sweep_interval_s: how often requests past their deadline are dropped.
        approval_lifetime_s: how long each approval this participant makes is valid.
        idle_timeout_s: a connection on which nothing arrives for this long is closed (1001)
            and made again; the gateway pings every 15 s, so only a dead or half-open
            connection (a gateway that vanished without a FIN) stays silent that long.
        max_frame_bytes: the largest text message taken from the gateway (1009 above it).
    """

    url: str
    ssl_context: ssl.SSLContext | None = None
    connect_timeout_s: float = 10.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_in_flight: int = s.DEFAULT_MAX_IN_FLIGHT
    sweep_interval_s: float = 1.0
    approval_lifetime_s: float = 60.0
    idle_timeout_s: float = 60.0
    max_frame_bytes: int = m.MAX_FRAME_BYTES

    def endpoint(self) -> tuple[str, int, str, bool]:
        """(host, port, path, tls) from :attr:`url`."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(
                f"participant url {self.url!r} must be ws://HOST[:PORT]/PATH or wss://"
            )
        tls = parts.scheme == "wss"
        port = parts.port or (443 if tls else 80)
        return parts.hostname, port, parts.path or "/", tls


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class ParticipantClient:
    """A participant's long-lived connection to one gateway.

    Args:
        settings: where and how.
        participant_id, key_id: this participant and its authentication key's id in the
            gateway's ``[participants]``.
        auth_key: Ed25519 key for the challenge.
        approver, approver_key_id: the key that approves each session (DESIGN §11) and its
            id in the enclave's ``[approvers]``; may be the same key as ``auth_key``.
        shares: the participant's shares (:class:`~._store.SealedShareStore`).
        policy: decides each request.
        gateway_id: if given, a challenge from a gateway calling itself otherwise is refused.
        wall_clock_ms: Unix time in ms (tests pin it).
        rng: the back-off's jitter (tests seed it).
        connect: opens the byte stream to the gateway (default: TCP, and TLS for ``wss://``,
            to the URL's host and port); tests and applications with their own transport
            inject it.

    The keys and the store belong to the caller (close them after :meth:`run` ends).
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        participant_id: str,
        key_id: str,
        auth_key: ApproverSigningKey,
        approver: ApproverSigningKey,
        approver_key_id: str,
        shares: s.ShareSource,
        policy: Policy,
        gateway_id: str | None = None,
        wall_clock_ms: Callable[[], int] = _wall_clock_ms,
        rng: random.Random | None = None,
        connect: Callable[[], Awaitable[anyio.abc.ByteStream]] | None = None,
    ) -> None:
        self.settings = settings
        self._endpoint = settings.endpoint()
        self.participant_id = participant_id
        self._key_id = key_id
        self._auth_key = auth_key
        self._approver = approver
        self._approver_key_id = approver_key_id
        self._shares = shares
        self.policy = policy
        self._gateway_id = gateway_id
        self._wall_clock_ms = wall_clock_ms
        self._rng = rng or random.Random()
        self._connect = connect or self._connect_tcp
        self._authenticated = anyio.Event()
        self.session: s.ParticipantSession | None = None
        # Group commit of new DKG shares: every put() bumps _generation; one save() covers
        # every put before it (Argon2id costs about a second, so concurrent DKGs share it).
        self._save_lock = anyio.Lock()
        self._generation = 0
        self._saved = 0
        #: counters (no secrets)
        self.counts: dict[str, int] = {
            "connections": 0,
            "welcomed": 0,
            "decisions": 0,
            "dkg_stored": 0,
            "store_saves": 0,
        }

    def __repr__(self) -> str:
        return f"ParticipantClient({self.participant_id!r}, url={self.settings.url!r})"

    async def wait_authenticated(self) -> None:
        """Return once a connection has been welcomed (the current one, or the next)."""
        await self._authenticated.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, serve, and reconnect after any failure, until cancelled."""
        task_status.started()
        failures = 0
        while True:
            welcomed_before = self.counts["welcomed"]
            try:
                await self.run_once()
            except (ParticipantConnectionError, OSError, anyio.BrokenResourceError) as exc:
                log.warning("participant %s: connection ended: %s", self.participant_id, exc)
            if self.counts["welcomed"] > welcomed_before:
                failures = 0
            delay = full_jitter_delay(
                self._rng,
                base=self.settings.reconnect_initial_s,
                maximum=self.settings.reconnect_max_s,
                failures=failures,
            )
            failures += 1
            await anyio.sleep(delay)

    async def run_once(self) -> None:
        """One connection, from connect to close.

        Raises:
            ParticipantConnectionError: the connection could not be made, was refused, or
                ended (with its close code).
        """
        host, port, path, _ = self._endpoint
        self.counts["connections"] += 1
        try:
            with anyio.fail_after(self.settings.connect_timeout_s):
                stream = await self._connect()
        except TimeoutError:
            raise ParticipantConnectionError(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise ParticipantConnectionError(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            ) from None
        async with stream:
            await _Connection(self, stream, f"{host}:{port}", path).run()

    async def store_share(self, record: ShareRecord) -> None:
        """Seal ``record`` into the store durably (``put`` then ``save`` in a worker thread,
        group-committed with concurrent DKGs). Returns once it is on disk.

        Error handling: :class:`~._store.ParticipantStoreError` (or ``OSError``) from the
        store, the record then taken back out of it (``discard``) and zeroed; a store without
        ``put``/``save`` raises :class:`TypeError`."""
        put = getattr(self._shares, "put", None)
        save = getattr(self._shares, "save", None)
        if put is None or save is None:
            raise TypeError("this participant's share source cannot keep new shares")
        put(record)
        self._generation += 1
        mine = self._generation
        try:
            async with self._save_lock:
                if self._saved >= mine:
                    return  # another save after our put covered it
                target = self._generation
                await anyio.to_thread.run_sync(save)
                self._saved = target
                self.counts["store_saves"] += 1
        except BaseException:
            # Not saved, so never announced: the share leaves the store's memory, or the
            # next save would seal a share the gateway never heard of (and a retry of the
            # account would be refused as held already).
            discard = getattr(self._shares, "discard", None)
            if discard is not None:
                discard(record)
            raise

    async def _connect_tcp(self) -> anyio.abc.ByteStream:
        host, port, _, tls = self._endpoint
        if tls:
            return await anyio.connect_tcp(
                host,
                port,
                tls=True,
                ssl_context=self.settings.ssl_context,
                tls_standard_compatible=False,
            )
        return await anyio.connect_tcp(host, port)


class _Connection:
    def __init__(
        self, client: ParticipantClient, stream: anyio.abc.ByteStream, host: str, path: str
    ) -> None:
        self.client = client
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.host, self.path = host, path
        self.lock = anyio.Lock()
        self.buffer: list[str] = []
        self.buffered = 0
        self.session = s.ParticipantSession(
            participant_id=client.participant_id,
            key_id=client._key_id,
            auth_key=client._auth_key,
            shares=client._shares,
            approver=client._approver,
            approver_key_id=client._approver_key_id,
            gateway_id=client._gateway_id,
            max_in_flight=client.settings.max_in_flight,
            approval_lifetime_ms=round(client.settings.approval_lifetime_s * 1000),
        )
        self.closing: tuple[int, str] | None = None
        # The gateway's error frames are logged at most once per interval (it could send
        # a million); the line says how many were held back.
        self.error_log = LogThrottle(ERROR_LOG_INTERVAL_S, time.monotonic)

    def now_ms(self) -> int:
        return self.client._wall_clock_ms()

    async def _send_bytes(self, data: bytes) -> None:
        """Send raw bytes (one writer: the lock). A dead connection is recorded, not raised:
        the reader sees the end and the connection's task group winds down."""
        if data:
            try:
                async with self.lock:
                    await self.stream.send(data)
            except _GONE:
                if self.closing is None:
                    self.closing = (m.CLOSE_GOING_AWAY, "the connection broke while sending")

    async def flush(self) -> None:
        """Send every frame the session queued (one writer: the lock). Before the WebSocket
        handshake completes (and after a close) they stay queued: nothing can be sent."""
        if self.ws.state is not ConnectionState.OPEN or self.closing is not None:
            return
        frames = self.session.frames_to_send()
        if frames:
            data = b"".join(self.ws.send(TextMessage(data=f)) for f in frames)
            await self._send_bytes(data)

    async def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
            if self.ws.state is ConnectionState.OPEN:
                await self._send_bytes(
                    self.ws.send(CloseConnection(code=code, reason=reason[:120]))
                )

    async def run(self) -> None:
        client = self.client
        client.session = self.session
        try:
            await self._send_bytes(
                self.ws.send(
                    Request(host=self.host, target=self.path, subprotocols=list(_VERSIONS))
                )
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sweeper)
                with anyio.move_on_after(client.settings.connect_timeout_s) as handshake:
                    self.handshake = handshake
                    await self._reader(tg)
                tg.cancel_scope.cancel()
            if handshake.cancelled_caught:
                await self.close(m.CLOSE_AUTH_TIMEOUT, "handshake timed out")
                raise ParticipantConnectionError("the WebSocket or auth handshake timed out")
        finally:
            self.session.close()  # zero every nonce still held
            if client._authenticated.is_set():
                client._authenticated = anyio.Event()
        if self.closing is not None and self.closing[0] != m.CLOSE_NORMAL:
            code, reason = self.closing
            raise ParticipantConnectionError(
                f"the connection closed with {code} ({reason})", close_code=code
            )

    async def _reader(self, tg: anyio.abc.TaskGroup) -> None:
        idle_s = self.client.settings.idle_timeout_s
        while True:
            data = None
            try:
                with anyio.move_on_after(idle_s):
                    data = await self.stream.receive(_RECEIVE_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                if self.closing is None:
                    self.closing = (m.CLOSE_GOING_AWAY, "the gateway went away")
                return
            if data is None:
                # No close frame: on a dead connection sending one could block as well.
                self.closing = (m.CLOSE_GOING_AWAY, f"nothing from the gateway for {idle_s:g} s")
                return
            try:
                self.ws.receive_data(data)
            except RemoteProtocolError as exc:
                # Only the HTTP upgrade raises (a bad response, a wrong accept key, a head
                # over h11's limit); a bad frame after it becomes a CloseConnection event.
                self.closing = (
                    m.CLOSE_PROTOCOL_ERROR,
                    f"the gateway's handshake is invalid: {exc}",
                )
                return
            for event in self.ws.events():
                await self._on_ws_event(event, tg)
                if self.closing is not None:
                    return

    async def _on_ws_event(self, event: object, tg: anyio.abc.TaskGroup) -> None:
        if isinstance(event, AcceptConnection):
            if event.subprotocol not in _VERSIONS:
                await self.close(m.CLOSE_PROTOCOL_ERROR, "the gateway did not accept v1 or v2")
                return
            self.session.version = _VERSIONS[event.subprotocol]
            await self.flush()  # hello
        elif isinstance(event, (RejectConnection, RejectData)):
            status = getattr(event, "status_code", None)
            self.closing = (m.CLOSE_PROTOCOL_ERROR, f"the gateway refused the WebSocket ({status})")
        elif isinstance(event, TextMessage):
            self.buffer.append(event.data)
            # UTF-8 bytes, as the limit (and parse_message's) is: characters would let
            # 4-byte ones carry four times max_frame_bytes into memory.
            self.buffered += len(event.data.encode("utf-8"))
            if self.buffered > self.client.settings.max_frame_bytes:
                await self.close(m.CLOSE_TOO_BIG, "a frame over max_frame_bytes")
                return
            if event.message_finished:
                text = "".join(self.buffer)
                self.buffer, self.buffered = [], 0
                for ev in self.session.receive_frame(text, self.now_ms()):
                    await self._on_session_event(ev, tg)
                await self.flush()
        elif isinstance(event, BytesMessage):
            await self.close(m.CLOSE_UNSUPPORTED_DATA, "binary frames are not part of v1")
        elif isinstance(event, Ping):
            await self._send_bytes(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.closing = (event.code, event.reason or "")
            await self._send_bytes(self.ws.send(event.response()))

    async def _on_session_event(self, event: s.Event, tg: anyio.abc.TaskGroup) -> None:
        if isinstance(event, s.Authenticated):
            self.handshake.deadline = float("inf")
            self.client.counts["welcomed"] += 1
            self.client._authenticated.set()
            log.info("participant %s: authenticated", self.client.participant_id)
        elif isinstance(event, s.SignRequested):
            tg.start_soon(self._decide, event.request)
        elif isinstance(event, s.DkgRequested):
            tg.start_soon(self._decide_dkg, event.request)
        elif isinstance(event, s.DkgKeyReady):
            tg.start_soon(self._store_dkg, event)
        elif isinstance(event, s.CloseConnection):
            await self.close(event.code, event.reason)
        elif isinstance(event, s.RemoteError):
            held = self.error_log.allow()
            if held is not None:
                log.info(
                    "participant %s: gateway error %s (%d more since the last such line)",
                    self.client.participant_id,
                    event.error.code,
                    held,
                )

    async def _decide(self, request: m.SignRequest) -> None:
        policy = self.client.policy
        await self._decision(request, lambda: policy.decide(request), self.session.accept, "")

    async def _decide_dkg(self, request: m.DkgRound1) -> None:
        decide = getattr(self.client.policy, "decide_dkg", None) or _no_dkg
        await self._decision(request, lambda: decide(request), self.session.accept_dkg, "DKG ")

    async def _decision(
        self,
        request: m.SignRequest | m.DkgRound1,
        decide: Callable[[], Awaitable[Decision]],
        accept: Callable[[str, int], object],
        what: str,
    ) -> None:
        """Wait for the policy's decision until the request's deadline, then answer: accept,
        decline with the policy's reason, or decline ``expired`` when no decision came."""
        remaining = (request.deadline_unix_ms - self.now_ms()) / 1000
        decision: Decision | None = None
        with anyio.move_on_after(max(0.0, remaining)):
            try:
                decision = await decide()
            except Exception as exc:  # a policy's bug declines its request, nothing more
                log.warning(
                    "participant %s: the %spolicy failed (%s) on request %s",
                    self.client.participant_id,
                    what,
                    type(exc).__name__,
                    request.request_id,
                )
                decision = Decision(False, "internal", "the policy failed")
        self.client.counts["decisions"] += 1
        if decision is None:
            self.session.decline(request.request_id, "expired", "no decision before the deadline")
        elif decision.approve:
            accept(request.request_id, self.now_ms())
        else:
            self.session.decline(request.request_id, decision.reason, decision.detail)
        await self.flush()

    async def _store_dkg(self, event: s.DkgKeyReady) -> None:
        """Seal the new share durably, then (only then) say ``dkg_done``. A store that fails
        declines the DKG ``internal``: the gateway never hears "done" for a share not kept."""
        try:
            await self.client.store_share(event.record)
        except (TrioSignError, OSError, TypeError) as exc:
            log.error(
                "participant %s: could not store the share of DKG request %s (%s)",
                self.client.participant_id,
                event.request_id,
                type(exc).__name__,
            )
            if isinstance(exc, TypeError):
                event.record.zero()  # never reached the store; otherwise the store owns it
            self.session.decline(event.request_id, "internal", "the share could not be stored")
        else:
            self.client.counts["dkg_stored"] += 1
            log.info(
                "participant %s: stored a new share (DKG request %s)",
                self.client.participant_id,
                event.request_id,
            )
            self.session.dkg_stored(event.request_id)
        await self.flush()

    async def _sweeper(self) -> None:
        while True:
            await anyio.sleep(self.client.settings.sweep_interval_s)
            self.session.expire(self.now_ms())
            await self.flush()


async def _no_dkg(request: m.DkgRound1) -> Decision:
    """The decision of a policy without ``decide_dkg``."""
    return Decision(False, "policy", "this participant takes no part in DKGs")
