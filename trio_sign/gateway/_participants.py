"""The gateway's participant endpoint: remote signers over WebSocket (DESIGN §15,
docs/participants.md).

A participant (a user's device, an operations signer, a backup) connects to
``ws[s]://gateway/v1/participants`` with the subprotocol ``trio-sign-participant.v1``, says
``hello`` (participant id, key id), signs the ``challenge`` with its Ed25519 key (keys from
``gateway.toml`` ``[participants]``, :func:`parse_participants_table`) and, once welcomed,
answers signing requests. :class:`ParticipantHub` keeps the authenticated connections (a new
connection of the same participant replaces the old one only once it has authenticated) and
gives the coordinator two calls per session::

    c = await hub.sign("ops-1", account_id=..., session_id=..., ciphersuite=...,
                       message=..., timeout_s=5)          # -> its round-one commitment
    s = await hub.round2(c, commitments, enclave_identifier, timeout_s=5)
    check_signature_share(scheme, s, ...)                 # names the participant if bad

Each call raises :class:`ParticipantError` naming the participant on a timeout, a decline, a
disconnect, a malformed answer or too many requests in flight; nothing one participant does
(or fails to do) blocks a call to another, or another session of the same one beyond its own
bounded queue.

Supervision: :meth:`ParticipantHub.serve` runs ``trio.serve_listeners``; each socket is one
task (its upgrade by ``trio_websocket.wrap_server_stream``), each connection one handler
with three tasks (reader, writer, heartbeat) in its own nursery.
Bounded: open sockets (``max_connections + max_handshakes``, counted from accept, before
the HTTP upgrade), handshakes (``handshake_timeout_s``), frame size (``max_frame_bytes``,
larger frames close with 1009), requests in flight per connection (``max_in_flight``; more
are refused with ``busy`` before anything is sent), the outgoing queue per connection, idle time
(``idle_timeout_s``, heartbeats every ``ping_interval_s``), and log lines a peer can cause
over and over (a refused handshake, a participant's stray ``error``: at most one per
``log_interval_s``, per participant for the latter, saying how many were held back).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import secrets
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from .._errors import FrostError, TrioSignError
from ..authz import ApproverKey, ApproverKeyError
from ..crypto._schemes import Scheme, scheme_by_name
from ..participant import _messages as m
from ..rpc import LogThrottle
from ._approvals import Approval

log = logging.getLogger("trio_sign.gateway.participants")

SUBPROTOCOL: Final = "trio-sign-participant.v1"
#: Version 2 adds the DKG messages (``dkg_*``); preferred when a participant proposes it.
SUBPROTOCOL_V2: Final = "trio-sign-participant.v2"
#: subprotocol -> contract version, most preferred first.
SUBPROTOCOLS: Final = {SUBPROTOCOL_V2: 2, SUBPROTOCOL: 1}
DEFAULT_PATH: Final = "/v1/participants"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")


class ParticipantError(TrioSignError):
    """A participant could not give what a session needed.

    Attributes:
        participant_id: who.
        reason: ``not_connected``, ``busy``, ``timeout``, ``declined``, ``disconnected``,
            ``malformed``, ``bad_share``, ``error``.
        request_id: the request, when there was one.
        decline_reason: the participant's reason, for ``declined``.
    """

    def __init__(
        self,
        message: str,
        *,
        participant_id: str,
        reason: str,
        request_id: str | None = None,
        decline_reason: str | None = None,
    ) -> None:
        super().__init__(f"participant {participant_id!r}: {message}")
        self.participant_id = participant_id
        self.reason = reason
        self.request_id = request_id
        self.decline_reason = decline_reason


class ParticipantConfigError(TrioSignError):
    """``[participants]`` in gateway.toml is wrong (the message names the entry)."""


@dataclass(frozen=True, slots=True)
class ParticipantKey:
    """One participant's authentication key (``[participants.<id>]``)."""

    participant_id: str
    key_id: str
    public_key: bytes


def parse_participants_table(table: object) -> dict[str, ParticipantKey]:
    """``gateway.toml`` ``[participants]``: ``<id> = {key_id = "...", public_key = "<hex>"}``.

    ``public_key`` is the participant's Ed25519 key (32 bytes, 64 hex digits): what
    ``trio-sign approver keygen --type ed25519`` prints for its key file.

    Raises:
        ParticipantConfigError: naming the entry and the field.
    """
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ParticipantConfigError("[participants] must be a table of participant tables")
    out: dict[str, ParticipantKey] = {}
    for pid, entry in table.items():
        where = f"[participants.{pid}]"
        if not isinstance(pid, str) or not _ID.fullmatch(pid):
            raise ParticipantConfigError(
                f"{where}: a participant id is 1-64 of A-Z a-z 0-9 . _ : @ - (first alphanumeric)"
            )
        if not isinstance(entry, Mapping) or set(entry) != {"key_id", "public_key"}:
            raise ParticipantConfigError(f"{where} needs exactly key_id and public_key")
        key_id, pk = entry["key_id"], entry["public_key"]
        if not isinstance(key_id, str) or not _ID.fullmatch(key_id):
            raise ParticipantConfigError(f"{where} key_id is not a valid key id")
        if not isinstance(pk, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", pk):
            raise ParticipantConfigError(
                f"{where} public_key must be 64 hex digits (an Ed25519 key)"
            )
        out[pid] = ParticipantKey(pid, key_id, bytes.fromhex(pk))
    return out


@dataclass(frozen=True, slots=True)
class HubSettings:
    """The endpoint's limits (named, unit-bearing; DESIGN §16)."""

    gateway_id: str = "gateway"
    path: str = DEFAULT_PATH
    handshake_timeout_s: float = 10.0
    challenge_ttl_s: float = 10.0
    max_frame_bytes: int = m.MAX_FRAME_BYTES
    max_in_flight: int = 1024
    #: Outgoing frames queued per connection beyond which new requests are refused.
    max_queued_frames: int = 2048
    ping_interval_s: float = 15.0
    idle_timeout_s: float = 45.0
    max_connections: int = 1024
    #: Connections still in the challenge/auth handshake (bounded separately, DESIGN §16).
    max_handshakes: int = 64
    #: A line a peer can repeat (a refused handshake; a participant's ``error`` frame, per
    #: participant) is logged at most once per this; the rest are counted in the next line.
    log_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.gateway_id):
            raise ValueError("gateway_id must be an id (A-Z a-z 0-9 . _ : @ -)")
        if not 1 <= self.max_in_flight <= m.MAX_IN_FLIGHT:  # the welcome frame carries it
            raise ValueError(f"max_in_flight must be 1..{m.MAX_IN_FLIGHT}")
        if self.max_queued_frames < 1 or self.max_connections < 1 or self.max_handshakes < 1:
            raise ValueError("max_queued_frames, max_connections, max_handshakes must be >= 1")
        if not 1024 <= self.max_frame_bytes <= m.MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be 1024..{m.MAX_FRAME_BYTES}")
        for name in ("handshake_timeout_s", "challenge_ttl_s", "ping_interval_s", "idle_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite")
        if not self.idle_timeout_s > self.ping_interval_s:
            raise ValueError(
                "idle_timeout_s must be longer than ping_interval_s (idleness is checked at "
                "each ping, and a participant's pong is what it hears)"
            )
        if not 0 <= self.log_interval_s < math.inf:
            raise ValueError("log_interval_s must not be negative")


@dataclass(frozen=True, slots=True)
class ParticipantCommitment:
    """A participant's round-one answer; pass it back to :meth:`ParticipantHub.round2`."""

    participant_id: str
    request_id: str
    commitment: m.CommitmentEntry
    _conn: _Connection = field(repr=False, compare=False)
    _scheme: Scheme = field(repr=False, compare=False)

    def suite_commitment(self) -> Any:
        """The commitment as the suite's object (what ``Scheme.sign``/``aggregate`` take)."""
        c = self.commitment
        return self._scheme.commitment(c.identifier, c.hiding, c.binding)


def commitment_entries(commitments: Sequence[Any]) -> list[m.CommitmentEntry]:
    """The wire form of a suite's commitment objects (for :meth:`ParticipantHub.round2`),
    in the order given: sort them by ``scheme.identifier_from_bytes`` first."""
    return [
        m.CommitmentEntry(bytes(c.identifier), bytes(c.hiding), bytes(c.binding))
        for c in commitments
    ]


@dataclass(frozen=True, slots=True)
class ParticipantShare:
    """A participant's round-two answer: its signature share and its approval."""

    participant_id: str
    request_id: str
    identifier: bytes
    signature_share: bytes
    approval: Approval

    def __repr__(self) -> str:
        return (
            f"ParticipantShare({self.participant_id!r}, request_id={self.request_id!r}, "
            f"approval_key_id={self.approval.key_id!r})"
        )


def check_signature_share(
    scheme: Scheme,
    share: ParticipantShare,
    *,
    verifying_share: bytes,
    commitments: Sequence[Any],
    group_public_key: bytes,
    message: bytes,
    merkle_root: bytes | None = None,
) -> None:
    """Verify a participant's signature share against its verifying share (the coordinator
    calls this before aggregating; ``commitments`` are the suite's commitment objects).

    Raises:
        ParticipantError: ``bad_share``, naming the participant and its identifier.
    """
    try:
        ok = scheme.verify_signature_share(
            identifier=share.identifier,
            verifying_share=verifying_share,
            signature_share=share.signature_share,
            commitments=commitments,
            group_public_key=group_public_key,
            message=message,
            merkle_root=merkle_root,
        )
    except FrostError as exc:
        raise ParticipantError(
            f"its signature share could not be checked: {exc}",
            participant_id=share.participant_id,
            reason="bad_share",
            request_id=share.request_id,
        ) from exc
    if not ok:
        raise ParticipantError(
            f"the signature share of identifier {share.identifier.hex()} is invalid",
            participant_id=share.participant_id,
            reason="bad_share",
            request_id=share.request_id,
        )


# -- one connection ------------------------------------------------------------------------------


class _Slot:
    """One request awaiting an answer: the phase it is in and the answer when it comes."""

    __slots__ = ("answer", "done", "identifier", "phase", "scheme")

    def __init__(self, scheme: Scheme) -> None:
        self.phase = "commit"
        self.scheme = scheme
        self.identifier = b""
        self.done = trio.Event()
        self.answer: m.Message | ParticipantError | None = None

    def next_phase(self, identifier: bytes) -> None:
        """Round one answered: wait for round two's answer from here."""
        self.phase = "round2"
        self.identifier = identifier
        self.done = trio.Event()
        self.answer = None

    def resolve(self, answer: m.Message | ParticipantError) -> None:
        if not self.done.is_set():
            self.answer = answer
            self.done.set()


class _Connection:
    def __init__(
        self, hub: ParticipantHub, ws: WebSocketConnection, participant_id: str, version: int = 1
    ):
        self.hub = hub
        self.ws = ws
        self.participant_id = participant_id
        self.version = version
        self.slots: dict[str, _Slot] = {}
        self.send_channel, self.receive_channel = trio.open_memory_channel[str](
            hub.settings.max_queued_frames
        )
        self.cancel_scope = trio.CancelScope()
        self.closed = False
        self.close_code = m.CLOSE_NORMAL
        self.close_reason = ""
        self.last_heard = trio.current_time()
        self._seq = 0

    def __repr__(self) -> str:
        return f"<participant connection {self.participant_id!r} in_flight={len(self.slots)}>"

    def error(self, message: str, reason: str, **kw: Any) -> ParticipantError:
        return ParticipantError(message, participant_id=self.participant_id, reason=reason, **kw)

    def queue(self, message: m.Message) -> bool:
        """Queue one frame for the writer; False if the connection is closed or its queue is
        full (back-pressure: the caller refuses the request)."""
        if self.closed:
            return False
        try:
            self.send_channel.send_nowait(m.encode_message(message))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self, code: int, reason: str, *, fail_with: str = "disconnected") -> None:
        """Stop this connection (its handler closes the socket with ``code``) and fail every
        request it holds with ``fail_with`` (``disconnected``, or ``malformed`` when the
        participant broke the protocol)."""
        if not self.closed:
            self.closed = True
            self.close_code = code
            self.close_reason = reason
            self.cancel_scope.cancel()
        for rid, slot in list(self.slots.items()):
            slot.resolve(self.error(f"the connection closed ({reason})", fail_with, request_id=rid))

    async def writer(self) -> None:
        async for frame in self.receive_channel:
            try:
                await self.ws.send_message(frame)
            except ConnectionClosed:
                self.close(m.CLOSE_NORMAL, "the participant closed the connection")
                return

    async def heartbeat(self) -> None:
        settings = self.hub.settings
        while True:
            await trio.sleep(settings.ping_interval_s)
            if trio.current_time() - self.last_heard > settings.idle_timeout_s:
                self.close(m.CLOSE_GOING_AWAY, "idle")
                return
            self._seq += 1
            self.queue(m.Ping(self._seq))

    async def reader(self) -> None:
        while True:
            try:
                text = await self.ws.get_message()
            except ConnectionClosed:
                self.close(m.CLOSE_NORMAL, "the participant closed the connection")
                return
            self.last_heard = trio.current_time()
            if not isinstance(text, str):
                self.hub.counts["malformed"] += 1
                self.close(
                    m.CLOSE_UNSUPPORTED_DATA,
                    "binary frames are not part of v1",
                    fail_with="malformed",
                )
                return
            try:
                # serve() has trio-websocket enforce the limit too, as the bytes arrive; here
                # it is counted in UTF-8 bytes as well (1009), not in characters
                message = m.parse_message(
                    text, max_version=self.version, max_bytes=self.hub.settings.max_frame_bytes
                )
            except m.MessageError as exc:
                self.hub.counts["malformed"] += 1
                self.close(exc.close_code, str(exc), fail_with="malformed")
                return
            self._dispatch(message)
            if self.closed:
                return

    def _dispatch(self, message: m.Message) -> None:
        kind = m.type_name(message)
        if isinstance(message, m.Ping):
            self.queue(m.Pong(message.seq))
            return
        if isinstance(message, m.Pong):
            return
        if m.SENDER[kind] == "g" or isinstance(message, (m.Hello, m.Auth)):
            self.hub.counts["malformed"] += 1
            self.close(
                m.CLOSE_PROTOCOL_ERROR,
                f"{kind} is not a participant's message now",
                fail_with="malformed",
            )
            return
        if isinstance(message, m.Error):
            self.hub.counts["errors"] += 1
            rid = message.request_id
            slot = self.slots.get(rid) if rid is not None else None
            if slot is None:
                # An authenticated participant can send these as fast as it likes.
                held = self.hub._error_log(self.participant_id).allow()
                if held is not None:
                    log.info(
                        "participant %s sent error %s (%d more since the last such line)",
                        self.participant_id,
                        message.code,
                        held,
                    )
                return
            slot.resolve(self.error(f"answered error {message.code}", "error", request_id=rid))
            return
        assert isinstance(
            message,
            (m.Commitment, m.Decline, m.SignatureShare, m.DkgPackage, m.DkgShares, m.DkgDone),
        ), message
        slot = self.slots.get(message.request_id)
        if isinstance(message, m.Commitment) and slot is not None and slot.phase != "commit":
            slot = None  # a second commitment: round one is over
        if (
            slot is not None
            and type(message) in _DKG_PHASE_OF
            and (_DKG_PHASE_OF[type(message)] != slot.phase)
        ):
            slot = None  # a DKG answer of another round: late, or twice
        if slot is None or slot.done.is_set():
            # Late (after a timeout) or twice: the session has moved on; never an answer.
            self.hub.counts["late_answers"] += 1
            return
        slot.resolve(message)


#: A DKG round's phase -> the answer it waits for (besides ``decline``).
_DKG_ANSWERS: Final[dict[str, type[Any]]] = {
    "dkg1": m.DkgPackage,
    "dkg2": m.DkgShares,
    "dkg3": m.DkgDone,
}
_DKG_PHASE_OF: Final = {cls: phase for phase, cls in _DKG_ANSWERS.items()}


@dataclass(frozen=True, slots=True)
class RemoteDkg:
    """One DKG a remote participant is taking part in (from :meth:`ParticipantHub.dkg_round1`);
    pass it to the next rounds, and to :meth:`ParticipantHub.dkg_cancel` if it ends early."""

    participant_id: str
    request_id: str
    _conn: _Connection = field(repr=False, compare=False)
    _slot: _Slot = field(repr=False, compare=False)


# -- the hub -------------------------------------------------------------------------------------


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class ParticipantHub:
    """The registry of authenticated participants and the coordinator's calls to them.

    Args:
        keys: participant id -> key (:func:`parse_participants_table`).
        settings: limits.
        wall_clock_ms: Unix time in ms for the wire's deadlines and expiries (tests pin it);
            every timeout the hub enforces runs on Trio's clock.
    """

    def __init__(
        self,
        keys: Mapping[str, ParticipantKey],
        settings: HubSettings | None = None,
        *,
        wall_clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        self.keys = dict(keys)
        self.settings = settings or HubSettings()
        self._wall_clock_ms = wall_clock_ms
        self._connections: dict[str, _Connection] = {}
        self._open_connections = 0
        self._handshaking = 0
        self._changed = trio.Event()
        #: counters (no secrets)
        self.counts: dict[str, int] = {
            "auth_ok": 0,
            "auth_failed": 0,
            "replaced": 0,
            "malformed": 0,
            "late_answers": 0,
            "busy": 0,
            "timeouts": 0,
            #: ``error`` frames from participants (answering a request or not).
            "errors": 0,
        }
        # Per participant id (only authenticated ones, so bounded by ``keys``): survives
        # reconnects, which would otherwise reset it.
        self._error_logs: dict[str, LogThrottle] = {}
        self._refusal_log = LogThrottle(self.settings.log_interval_s, trio.current_time)

    def __repr__(self) -> str:
        return f"ParticipantHub(connected={sorted(self._connections)!r})"

    # -- the registry ----------------------------------------------------------------------------

    def connected(self) -> list[str]:
        """The participants with an authenticated connection now."""
        return sorted(self._connections)

    def in_flight(self, participant_id: str) -> int:
        conn = self._connections.get(participant_id)
        return len(conn.slots) if conn is not None else 0

    async def wait_connected(self, participant_id: str) -> None:
        """Return once ``participant_id`` has an authenticated connection (the caller sets a
        deadline)."""
        while participant_id not in self._connections:
            await self._changed.wait()

    def disconnect(self, participant_id: str, reason: str = "disconnected by the gateway") -> bool:
        """Close ``participant_id``'s connection (1001; its requests fail ``disconnected``).
        It may reconnect: to keep it out, remove its key first. False if not connected."""
        conn = self._connections.get(participant_id)
        if conn is None:
            return False
        conn.close(m.CLOSE_GOING_AWAY, reason)
        return True

    async def wait_disconnected(self, participant_id: str) -> None:
        """Return once ``participant_id`` has no authenticated connection."""
        while participant_id in self._connections:
            await self._changed.wait()

    def _error_log(self, participant_id: str) -> LogThrottle:
        throttle = self._error_logs.get(participant_id)
        if throttle is None:
            throttle = LogThrottle(self.settings.log_interval_s, trio.current_time)
            self._error_logs[participant_id] = throttle
        return throttle

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- serving ---------------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled; ``started`` with the
        port once listening (the first listener's, if ``host`` gives several).

        At most ``max_connections + max_handshakes`` sockets are open at once, counted from
        accept (a socket that never sends its HTTP upgrade holds a place for up to
        ``handshake_timeout_s``); beyond that, a new socket is closed at once. Past the
        upgrade, :meth:`handle_request` refuses with 503 beyond
        ``max_connections`` or ``max_handshakes``."""

        sockets = await trio.open_tcp_listeners(port, host=host)
        listeners: list[trio.abc.Listener[Any]] = list(sockets)
        if ssl_context is not None:
            listeners = [trio.SSLListener(s, ssl_context, https_compatible=True) for s in sockets]
        # One limit over every listener: a socket holds a place from accept to close.
        places = trio.CapacityLimiter(self.settings.max_connections + self.settings.max_handshakes)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                trio.serve_listeners, functools.partial(self._serve_socket, places), listeners
            )
            task_status.started(sockets[0].socket.getsockname()[1])

    async def _serve_socket(self, places: trio.CapacityLimiter, stream: trio.abc.Stream) -> None:
        """One accepted socket, from accept to close: closed at once when every place is
        taken; else its HTTP upgrade within ``handshake_timeout_s``, then
        :meth:`handle_request`. The socket is closed, and its place given back, when this
        returns, whatever the peer does (trio-websocket's own server leaves a rejected or
        abruptly dropped socket open until the peer closes it)."""
        try:
            places.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            async with trio.open_nursery() as nursery:
                request = None
                with trio.move_on_after(self.settings.handshake_timeout_s):
                    request = await wrap_server_stream(
                        nursery, stream, max_message_size=self.settings.max_frame_bytes
                    )
                if request is not None:
                    await self.handle_request(request)
                nursery.cancel_scope.cancel()  # the connection's reader task too
        except* ConnectionClosed:
            # The peer went away before a reply (reject, accept, or the reader's own 400 to
            # a request that is not HTTP): that ends only its socket, never serve().
            pass
        finally:
            places.release()
            await trio.aclose_forcefully(stream)

    async def handle_request(self, request: WebSocketRequest) -> None:
        """One WebSocket handshake request: check path, subprotocol and the connection
        limit, accept, authenticate, then serve until the connection ends."""
        if request.path != self.settings.path:
            await request.reject(404)
            return
        offered = [p for p in SUBPROTOCOLS if p in request.proposed_subprotocols]
        if not offered:
            await request.reject(400, body=f"subprotocol {SUBPROTOCOL} required".encode())
            return
        if (
            self._open_connections >= self.settings.max_connections
            or self._handshaking >= self.settings.max_handshakes
        ):
            await request.reject(503)
            return
        self._open_connections += 1
        self._handshaking += 1
        handshaking = [True]
        try:
            ws = await request.accept(subprotocol=offered[0])
            await self._serve_connection(ws, handshaking, SUBPROTOCOLS[offered[0]])
        finally:
            self._open_connections -= 1
            if handshaking[0]:
                self._handshaking -= 1

    async def _serve_connection(
        self, ws: WebSocketConnection, handshaking: list[bool], version: int = 1
    ) -> None:
        participant_id: str | None = None
        code, reason = m.CLOSE_AUTH_TIMEOUT, "authentication took too long"
        with trio.move_on_after(self.settings.handshake_timeout_s):
            try:
                participant_id, code, reason = await self._authenticate(ws)
            except ConnectionClosed:
                return
        handshaking[0] = False
        self._handshaking -= 1
        if participant_id is None:
            if code in (m.CLOSE_AUTH_FAILED, m.CLOSE_AUTH_TIMEOUT):
                self.counts["auth_failed"] += 1
            # Anyone who can connect can cause this line: bounded like the rest.
            held = self._refusal_log.allow()
            if held is not None:
                log.info(
                    "participant connection refused: %s (%d more since the last such line)",
                    reason,
                    held,
                )
            with trio.move_on_after(2.0, shield=True):
                await ws.aclose(code, reason)
            return
        conn = _Connection(self, ws, participant_id, version)
        old = self._connections.get(participant_id)
        if old is not None:
            self.counts["replaced"] += 1
            old.close(m.CLOSE_REPLACED, "replaced by a newer connection")
        self._connections[participant_id] = conn
        self._notify()
        log.info("participant %s connected", participant_id)
        try:
            conn.queue(
                m.Welcome(
                    participant_id, self.settings.max_in_flight, self.settings.max_frame_bytes
                )
            )
            with conn.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.writer)
                    nursery.start_soon(conn.heartbeat)
                    await conn.reader()
                    nursery.cancel_scope.cancel()
        finally:
            if not conn.closed:
                conn.close(m.CLOSE_GOING_AWAY, "the gateway is stopping")
            if self._connections.get(participant_id) is conn:
                del self._connections[participant_id]
                self._notify()
            log.info("participant %s disconnected (%s)", participant_id, conn.close_reason)
            with trio.move_on_after(2.0, shield=True):
                await ws.aclose(conn.close_code, conn.close_reason[:120])

    async def _authenticate(self, ws: WebSocketConnection) -> tuple[str | None, int, str]:
        """hello → challenge → auth; returns (participant id or None, close code, reason)."""
        hello = await self._first(ws)
        if not isinstance(hello, m.Hello):
            return None, m.CLOSE_PROTOCOL_ERROR, "the first message must be hello"
        challenge = secrets.token_bytes(m.CHALLENGE_BYTES)
        ttl_ms = math.ceil(self.settings.challenge_ttl_s * 1000)
        expires_at = trio.current_time() + self.settings.challenge_ttl_s
        await ws.send_message(
            m.encode_message(
                m.Challenge(challenge, self.settings.gateway_id, self._wall_clock_ms() + ttl_ms)
            )
        )
        auth = await self._first(ws)
        if not isinstance(auth, m.Auth):
            return None, m.CLOSE_PROTOCOL_ERROR, "the message after challenge must be auth"
        if trio.current_time() > expires_at:
            return None, m.CLOSE_AUTH_FAILED, "authentication failed (challenge expired)"
        key = self.keys.get(hello.participant_id)
        # Unknown participant, other key id and bad signature look the same from outside.
        payload = m.auth_payload(
            challenge, self.settings.gateway_id, hello.participant_id, hello.key_id
        )
        if key is None or key.key_id != hello.key_id or not _verify(key, payload, auth):
            return None, m.CLOSE_AUTH_FAILED, "authentication failed"
        self.counts["auth_ok"] += 1
        return hello.participant_id, m.CLOSE_NORMAL, ""

    @staticmethod
    async def _first(ws: WebSocketConnection) -> m.Message | None:
        text = await ws.get_message()
        if not isinstance(text, str):
            return None
        try:
            return m.parse_message(text)
        except m.MessageError:
            return None

    # -- the coordinator's calls -----------------------------------------------------------------

    def _connection(self, participant_id: str) -> _Connection:
        conn = self._connections.get(participant_id)
        if conn is None or conn.closed:
            raise ParticipantError(
                "not connected", participant_id=participant_id, reason="not_connected"
            )
        return conn

    async def sign(
        self,
        participant_id: str,
        *,
        account_id: str,
        session_id: str,
        ciphersuite: str,
        message: bytes,
        timeout_s: float,
        taproot_merkle_root: bytes | None = None,
    ) -> ParticipantCommitment:
        """Round one: ask ``participant_id`` to take part in ``session_id``; returns its
        commitment. ``timeout_s`` bounds the whole call (and is the request's deadline on the
        wire, so the participant declines or drops it after that).

        Cancellation: cancelling the call frees its slot and sends ``cancel`` (the
        participant drops its nonces); it never blocks on the participant's socket.

        Error handling:
            ParticipantError: ``not_connected``, ``busy`` (too many in flight, or its queue is
                full), ``timeout``, ``declined``, ``disconnected``, ``malformed`` (a
                commitment of the wrong size for the suite), ``error``.
            FrostError: ``ciphersuite`` is unknown (the caller's bug).
        """
        scheme = scheme_by_name(ciphersuite)
        conn = self._connection(participant_id)
        self._check_room(conn)
        rid = secrets.token_hex(12)
        request = m.SignRequest(
            rid,
            account_id,
            session_id,
            ciphersuite,
            bytes(message),
            self._wall_clock_ms() + math.ceil(timeout_s * 1000),
            taproot_merkle_root,
        )
        slot = _Slot(scheme)
        conn.slots[rid] = slot
        keep = sent = False
        try:
            self._send(conn, request, rid)
            sent = True
            answer = await self._await(conn, slot, rid, timeout_s, "commitment")
            if isinstance(answer, m.Commitment):
                n = scheme.element_size
                if len(answer.hiding) != n or len(answer.binding) != n:
                    raise conn.error(
                        f"its commitment's elements are not {n} bytes ({scheme.name})",
                        "malformed",
                        request_id=rid,
                    )
                keep = True
                slot.next_phase(answer.identifier)
                return ParticipantCommitment(participant_id, rid, answer.entry(), conn, scheme)
            raise self._unexpected(conn, answer, rid, "commitment")
        finally:
            if not keep:
                self._end(conn, slot, rid, sent)

    async def round2(
        self,
        commitment: ParticipantCommitment,
        commitments: Sequence[m.CommitmentEntry],
        enclave_identifier: bytes,
        *,
        timeout_s: float,
    ) -> ParticipantShare:
        """Round two on the connection round one used: send every signer's commitment
        (sorted by identifier for the suite) and the enclave's identifier; returns the
        participant's signature share and approval (not yet verified: the coordinator calls
        :func:`check_signature_share`).

        Cancellation: as :meth:`sign`.

        Error handling:
            ParticipantError: as :meth:`sign` (``disconnected`` too when the participant
                reconnected since round one: its nonces went with the old connection).
        """
        conn, rid = commitment._conn, commitment.request_id
        slot = conn.slots.get(rid)
        if slot is None:
            raise conn.error("disconnected since round one", "disconnected", request_id=rid)
        try:
            if conn.closed:
                raise conn.error("disconnected since round one", "disconnected", request_id=rid)
            self._send(conn, m.SignRound2(rid, tuple(commitments), enclave_identifier), rid)
            answer = await self._await(conn, slot, rid, timeout_s, "signature share")
            if isinstance(answer, m.SignatureShare):
                a = answer.approval
                return ParticipantShare(
                    commitment.participant_id,
                    rid,
                    slot.identifier,
                    answer.signature_share,
                    Approval(a.key_id, a.signature, a.expires_at_unix_ms),
                )
            raise self._unexpected(conn, answer, rid, "signature_share")
        finally:
            self._end(conn, slot, rid, True)

    # -- DKG (contract version 2) ---------------------------------------------------------------

    def speaks_dkg(self, participant_id: str) -> bool:
        """``participant_id`` is connected with contract version 2 (it can take part in DKGs)."""
        conn = self._connections.get(participant_id)
        return conn is not None and not conn.closed and conn.version >= m.DKG_VERSION

    async def dkg_round1(
        self,
        participant_id: str,
        *,
        dkg_id: str,
        account_id: str,
        ciphersuite: str,
        min_signers: int,
        max_signers: int,
        policy: str,
        participants: Sequence[tuple[bytes, str]],
        enclave_identifier: bytes,
        identifier: bytes,
        timeout_s: float,
        dkg_timeout_s: float,
    ) -> tuple[RemoteDkg, m.DkgPackageField]:
        """Ask ``participant_id`` to take part in a DKG as ``identifier``; its signed round-1
        package. ``dkg_timeout_s`` is the whole DKG's deadline on the wire (the participant
        drops it after that); ``timeout_s`` bounds this call.

        Error handling: :class:`ParticipantError` as :meth:`sign`, and ``error`` when the
        participant's connection is version 1 (no DKG)."""
        scheme = scheme_by_name(ciphersuite)
        conn = self._connection(participant_id)
        if conn.version < m.DKG_VERSION:
            raise conn.error("its connection is version 1: it takes no part in DKGs", "error")
        self._check_room(conn)
        rid = secrets.token_hex(12)
        request = m.DkgRound1(
            rid,
            dkg_id,
            account_id,
            ciphersuite,
            min_signers,
            max_signers,
            policy,
            tuple(m.DkgMember(i, k) for i, k in participants),
            enclave_identifier,
            identifier,
            self._wall_clock_ms() + math.ceil(dkg_timeout_s * 1000),
        )
        slot = _Slot(scheme)
        slot.phase = "dkg1"
        conn.slots[rid] = slot
        keep = sent = False
        try:
            self._send(conn, request, rid)
            sent = True
            answer = await self._await(conn, slot, rid, timeout_s, "DKG round-1 package")
            if isinstance(answer, m.DkgPackage):
                keep = True
                return RemoteDkg(participant_id, rid, conn, slot), answer.package
            raise self._unexpected(conn, answer, rid, "dkg_package")
        finally:
            if not keep:
                self._end(conn, slot, rid, sent)

    async def dkg_round2(
        self, dkg: RemoteDkg, packages: Sequence[m.DkgPackageField], *, timeout_s: float
    ) -> tuple[m.DkgShareField, ...]:
        """Every participant's round-1 package to it; its encrypted round-2 shares."""
        answer = await self._dkg_step(
            dkg, "dkg2", m.DkgRound2(dkg.request_id, tuple(packages)), timeout_s
        )
        assert isinstance(answer, m.DkgShares)
        return answer.shares

    async def dkg_round3(
        self, dkg: RemoteDkg, shares: Sequence[m.DkgShareField], *, timeout_s: float
    ) -> m.DkgDone:
        """The shares addressed to it; its public output, sent only once its new share is
        sealed durably in its store. The request ends here (answered or not)."""
        answer = await self._dkg_step(
            dkg, "dkg3", m.DkgRound3(dkg.request_id, tuple(shares)), timeout_s, last=True
        )
        assert isinstance(answer, m.DkgDone)
        return answer

    async def _dkg_step(
        self,
        dkg: RemoteDkg,
        phase: str,
        request: m.Message,
        timeout_s: float,
        *,
        last: bool = False,
    ) -> m.Message:
        conn, slot, rid = dkg._conn, dkg._slot, dkg.request_id
        if conn.slots.get(rid) is not slot or conn.closed:
            conn.slots.pop(rid, None)
            raise conn.error("disconnected during the DKG", "disconnected", request_id=rid)
        slot.next_phase(slot.identifier)
        slot.phase = phase
        keep = False
        try:
            self._send(conn, request, rid)
            answer = await self._await(conn, slot, rid, timeout_s, m.type_name(request))
            if isinstance(answer, _DKG_ANSWERS[phase]):
                keep = not last
                result: m.Message = answer
                return result
            raise self._unexpected(conn, answer, rid, _DKG_ANSWERS[phase].__name__)
        finally:
            if not keep:
                self._end(conn, slot, rid, True)

    def dkg_cancel(self, dkg: RemoteDkg) -> None:
        """The DKG ended early: tell the participant (its secrets go now). Never blocks."""
        conn = dkg._conn
        if conn.slots.pop(dkg.request_id, None) is not None:
            conn.queue(m.Cancel(dkg.request_id))

    def cancel(self, commitment: ParticipantCommitment) -> None:
        """The session is over without round two (the enclave failed): tell the participant,
        so its nonces go now rather than at the deadline. Never blocks; best effort."""
        conn = commitment._conn
        if conn.slots.pop(commitment.request_id, None) is not None:
            conn.queue(m.Cancel(commitment.request_id))

    def _check_room(self, conn: _Connection) -> None:
        """Refuse a new request (``busy``, nothing sent) beyond ``max_in_flight``."""
        if len(conn.slots) >= self.settings.max_in_flight:
            self.counts["busy"] += 1
            raise conn.error(f"{len(conn.slots)} requests in flight (max_in_flight)", "busy")

    def _send(self, conn: _Connection, request: m.Message, rid: str) -> None:
        """Queue ``request``, or refuse it ``busy`` when the connection's queue is full."""
        if not conn.queue(request):
            self.counts["busy"] += 1
            raise conn.error("its outgoing queue is full", "busy", request_id=rid)

    async def _await(
        self, conn: _Connection, slot: _Slot, rid: str, timeout_s: float, what: str
    ) -> m.Message:
        with trio.move_on_after(timeout_s):
            await slot.done.wait()
        answer = slot.answer
        if answer is None:
            self.counts["timeouts"] += 1
            raise conn.error(f"no {what} within {timeout_s:g} s", "timeout", request_id=rid)
        if isinstance(answer, ParticipantError):
            raise answer
        return answer

    @staticmethod
    def _unexpected(
        conn: _Connection, answer: m.Message, rid: str, wanted: str
    ) -> ParticipantError:
        if isinstance(answer, m.Decline):
            return ParticipantError(
                f"declined ({answer.reason}{': ' + answer.detail if answer.detail else ''})",
                participant_id=conn.participant_id,
                reason="declined",
                request_id=rid,
                decline_reason=answer.reason,
            )
        return conn.error(
            f"answered {m.type_name(answer)} where {wanted} was due", "malformed", request_id=rid
        )

    @staticmethod
    def _end(conn: _Connection, slot: _Slot, rid: str, sent: bool) -> None:
        """A request leaves the hub (answered, refused, timed out, or its caller cancelled).
        Unless the participant answered the step's final word (a signature share or a
        decline), it may still hold nonces for it: tell it to drop them (``cancel``; never
        blocks, and harmless if it already has)."""
        conn.slots.pop(rid, None)
        if sent and not isinstance(slot.answer, (m.SignatureShare, m.Decline, m.DkgDone)):
            conn.queue(m.Cancel(rid))


def _verify(key: ParticipantKey, payload: bytes, auth: m.Auth) -> bool:
    """RFC 8032 verification by the approvals' own verifier (:class:`ApproverKey`)."""
    try:
        verifier = ApproverKey.create(key.key_id, "ed25519", key.public_key)
    except ApproverKeyError:
        return False
    return verifier.check_signature(auth.signature, payload) is None
