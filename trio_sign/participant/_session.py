"""The participant's side of the protocol as a sans-io state machine (docs/participants.md).

:class:`ParticipantSession` has no ``await`` and no sockets: feed it each text frame the
gateway sent (:meth:`~ParticipantSession.receive_frame`) and the current wall-clock time, get
:mod:`events <._session>` back, give it decisions (:meth:`~ParticipantSession.accept`,
:meth:`~ParticipantSession.decline`), and send what :meth:`~ParticipantSession.frames_to_send`
returns. The connection code (:mod:`._client`) only moves frames and waits for decisions.

Connection states, in order: ``HELLO`` (``hello`` queued, waiting for ``challenge``), ``AUTH``
(``auth`` sent, waiting for ``welcome``), ``READY``, ``CLOSED``. A message that is not valid
in the current state is a protocol violation: the event :class:`CloseConnection` says with
which close code, and the session is closed.

Per request (``request_id``): ``PENDING`` (the policy is deciding) → ``COMMITTED`` (nonces
held, waiting for ``sign_round2``) → gone. A request leaves its table entry, and its nonces
are zeroed, when it is signed, declined, cancelled by the gateway, expired
(:meth:`~ParticipantSession.expire` past its deadline), or when the session closes. Nonces are
therefore single use: a second ``sign_round2`` for a request finds nothing and is answered
with ``error unknown_request``.

DKG (contract version 2, key-lifecycle §5): ``dkg_round1`` → :class:`DkgRequested` (the
policy decides: :meth:`~ParticipantSession.accept_dkg` or
:meth:`~ParticipantSession.decline`) → ``dkg_package``; ``dkg_round2`` → ``dkg_shares``;
``dkg_round3`` → :class:`DkgKeyReady` with the new share's record, which the caller must seal
**durably** into its store before it calls :meth:`~ParticipantSession.dkg_stored`, which
queues ``dkg_done`` (so the gateway never hears "done" for a share that a crash could lose).
The DKG's secrets (its X25519 key, ZF's round secrets) live in a
:class:`~trio_sign.gateway.LocalParticipant` keyed by request, zeroed when the DKG ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from proto_min import sign_service_pb2 as pb

from .._errors import FrostError, TrioSignError
from ..crypto._schemes import Scheme, scheme_by_name
from ..gateway._approvals import ApproverSigningKey
from ..gateway._dkg import Ceremony, LocalParticipant
from ..shares import ShareRecord
from . import _messages as m

DEFAULT_MAX_IN_FLIGHT: Final = 1024
#: How long an approval this participant makes is valid (the enclave's
#: ``approval_max_lifetime_s`` is 600 s by default).
DEFAULT_APPROVAL_LIFETIME_MS: Final = 60_000


class ShareSource(Protocol):
    """Where the session finds an account's share (:class:`._store.SealedShareStore`)."""

    def share(self, account_id: str) -> ShareRecord | None: ...


#: The suites a DKG may create (the enclave's ``DKG_SUITES``).
DKG_SUITES: Final = (
    "FROST-ED25519-SHA512-v1",
    "FROST-secp256k1-SHA256-v1",
    "FROST-secp256k1-SHA256-TR-v1",
)


class State(enum.Enum):
    HELLO = "hello"
    AUTH = "auth"
    READY = "ready"
    CLOSED = "closed"


class RequestState(enum.Enum):
    PENDING = "pending"
    COMMITTED = "committed"


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The gateway's ``welcome``: the session is ready for requests."""

    welcome: m.Welcome


@dataclass(frozen=True, slots=True)
class SignRequested:
    """A request the policy must decide: answer with ``accept`` or ``decline``."""

    request: m.SignRequest
    share_identifier: bytes


@dataclass(frozen=True, slots=True)
class Signed:
    """Round two answered: the share and approval are queued; the nonces are zeroed."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Declined:
    """This side declined a request (by decision, or by a check before any decision)."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RequestEnded:
    """A request left without a share: ``cancelled`` by the gateway, or ``expired``."""

    request_id: str
    why: str


@dataclass(frozen=True, slots=True)
class RemoteError:
    """The gateway sent ``error``."""

    error: m.Error


@dataclass(frozen=True, slots=True)
class DkgRequested:
    """A DKG the policy must decide: answer with ``accept_dkg`` or ``decline``."""

    request: m.DkgRound1


@dataclass(frozen=True, slots=True)
class DkgKeyReady:
    """Round 3 done: seal ``record`` durably, then call ``dkg_stored(request_id)`` (or
    ``decline(request_id, "internal")`` if it could not be stored). The record belongs to the
    caller from here (its store keeps it)."""

    request_id: str
    record: ShareRecord = field(repr=False)


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """A protocol violation (either side's): close the WebSocket with ``code``."""

    code: int
    reason: str


Event = (
    Authenticated
    | SignRequested
    | Signed
    | Declined
    | RequestEnded
    | RemoteError
    | DkgRequested
    | DkgKeyReady
    | CloseConnection
)


class _Dkg:
    """One DKG this participant takes part in."""

    __slots__ = ("ceremony", "done", "phase", "request")

    def __init__(self, request: m.DkgRound1, ceremony: Ceremony) -> None:
        self.request = request
        self.ceremony = ceremony
        self.phase = "pending"  # -> round1 -> round2 -> storing
        self.done: m.DkgDone | None = None


@dataclass(slots=True, eq=False)
class _Request:
    request: m.SignRequest
    share: ShareRecord
    scheme: Scheme
    state: RequestState = RequestState.PENDING
    nonces: Any = None
    commitment: m.CommitmentEntry | None = field(default=None)

    def zero(self) -> None:
        if self.nonces is not None:
            self.nonces.zero()
            self.nonces = None


class SessionError(Exception):
    """A command that is not valid now (a bug in the caller, not a peer's fault)."""


class ParticipantSession:
    """One connection's protocol state, from ``hello`` to close.

    Args:
        participant_id: this participant's id in the gateway's ``[participants]``.
        key_id: the id of ``auth_key`` there.
        auth_key: the Ed25519 key that signs the challenge (used, not owned).
        shares: where account shares are found.
        approver: the key that signs each session's DESIGN §11 approval (used, not owned).
        approver_key_id: its id in the enclave's ``[approvers]``.
        gateway_id: when given, a challenge naming another gateway is refused (a relay).
        max_in_flight: requests held at once; more are declined ``busy``.
        approval_lifetime_ms: an approval's validity from the moment it is made.
        version: the connection's contract version (1 or 2; the client sets it from the
            subprotocol the gateway accepted): version 1 refuses the ``dkg_*`` messages.

    Secrets: nonces live in the suite's zeroable objects and are zeroed as each request
    leaves; :meth:`close` zeroes every one still held. The keys and shares belong to the
    caller.
    """

    def __init__(
        self,
        *,
        participant_id: str,
        key_id: str,
        auth_key: ApproverSigningKey,
        shares: ShareSource,
        approver: ApproverSigningKey,
        approver_key_id: str,
        gateway_id: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        approval_lifetime_ms: int = DEFAULT_APPROVAL_LIFETIME_MS,
        version: int = m.MAX_VERSION,
    ) -> None:
        if auth_key.type != "ed25519":
            raise ValueError("a participant's authentication key must be Ed25519")
        if max_in_flight < 1 or approval_lifetime_ms < 1:
            raise ValueError("max_in_flight and approval_lifetime_ms must be positive")
        self.participant_id = participant_id
        self.key_id = key_id
        self._auth_key = auth_key
        self._shares = shares
        self._approver = approver
        self._approver_key_id = approver_key_id
        self._gateway_id = gateway_id
        self.max_in_flight = max_in_flight
        #: the contract version of the connection (its subprotocol's): 1 refuses dkg_*
        self.version = version
        self._approval_lifetime_ms = approval_lifetime_ms
        self.state = State.HELLO
        self.welcome: m.Welcome | None = None
        self._requests: dict[str, _Request] = {}
        self._dkgs: dict[str, _Dkg] = {}
        #: the DKG rounds (the auth key is the participant's long-term DKG key, pinned in the
        #: enclave's [dkg] participants under ``key_id``); never closed here: the key is the
        #: caller's
        self._dkg = LocalParticipant(participant_id, key_id, auth_key)
        self._out: list[str] = [m.encode_message(m.Hello(participant_id, key_id))]
        #: counters (no secrets): requests signed, declined, expired, cancelled
        self.counts: dict[str, int] = {
            "signed": 0,
            "declined": 0,
            "expired": 0,
            "cancelled": 0,
            "dkg_done": 0,
        }

    def __repr__(self) -> str:
        return (
            f"ParticipantSession({self.participant_id!r}, state={self.state.value}, "
            f"in_flight={len(self._requests)})"
        )

    @property
    def in_flight(self) -> int:
        return len(self._requests) + len(self._dkgs)

    def request_state(self, request_id: str) -> RequestState | None:
        entry = self._requests.get(request_id)
        return entry.state if entry is not None else None

    # -- output ----------------------------------------------------------------------------------

    def frames_to_send(self) -> list[str]:
        """The text frames queued since the last call, in order."""
        out, self._out = self._out, []
        return out

    def _send(self, message: m.Message) -> None:
        self._out.append(m.encode_message(message))

    # -- input -----------------------------------------------------------------------------------

    def receive_frame(self, text: str | bytes, now_ms: int) -> list[Event]:
        """One text frame from the gateway; ``now_ms`` is this side's Unix time in ms."""
        if self.state is State.CLOSED:
            return []
        try:
            message = m.parse_message(text, max_version=self.version)
        except m.MessageError as exc:
            return self._violation(exc.close_code, str(exc))
        kind = m.type_name(message)
        if m.SENDER[kind] == "p":
            return self._violation(m.CLOSE_PROTOCOL_ERROR, f"a gateway does not send {kind}")
        if isinstance(message, m.Ping):
            self._send(m.Pong(message.seq))
            return []
        if isinstance(message, m.Pong):
            return []
        if isinstance(message, m.Error):
            return [RemoteError(message)]
        if isinstance(message, m.Challenge):
            return self._on_challenge(message)
        if isinstance(message, m.Welcome):
            return self._on_welcome(message)
        if self.state is not State.READY:
            return self._violation(m.CLOSE_PROTOCOL_ERROR, f"{kind} before welcome")
        if isinstance(message, m.SignRequest):
            return self._on_sign_request(message, now_ms)
        if isinstance(message, m.SignRound2):
            return self._on_round2(message, now_ms)
        if isinstance(message, m.DkgRound1):
            return self._on_dkg_round1(message, now_ms)
        if isinstance(message, (m.DkgRound2, m.DkgRound3)):
            return self._on_dkg_step(message, now_ms)
        assert isinstance(message, m.Cancel), message
        if message.request_id in self._dkgs:
            self._end_dkg(message.request_id)
            self.counts["cancelled"] += 1
            return [RequestEnded(message.request_id, "cancelled")]
        return self._end(message.request_id, "cancelled")

    def _violation(self, code: int, reason: str) -> list[Event]:
        self.close()
        return [CloseConnection(code, reason)]

    def _on_challenge(self, msg: m.Challenge) -> list[Event]:
        if self.state is not State.HELLO:
            return self._violation(m.CLOSE_PROTOCOL_ERROR, "a second challenge")
        if self._gateway_id is not None and msg.gateway_id != self._gateway_id:
            return self._violation(
                m.CLOSE_AUTH_FAILED,
                f"the challenge names gateway {msg.gateway_id!r}, not {self._gateway_id!r}",
            )
        payload = m.auth_payload(msg.challenge, msg.gateway_id, self.participant_id, self.key_id)
        self._send(m.Auth(self._auth_key.sign(payload)))
        self.state = State.AUTH
        return []

    def _on_welcome(self, msg: m.Welcome) -> list[Event]:
        if self.state is not State.AUTH or msg.participant_id != self.participant_id:
            return self._violation(m.CLOSE_PROTOCOL_ERROR, "an unexpected welcome")
        self.state = State.READY
        self.welcome = msg
        return [Authenticated(msg)]

    def _decline_now(self, request_id: str, reason: str, detail: str = "") -> list[Event]:
        self._send(m.Decline(request_id, reason, detail))
        self.counts["declined"] += 1
        return [Declined(request_id, reason)]

    def _on_sign_request(self, req: m.SignRequest, now_ms: int) -> list[Event]:
        rid = req.request_id
        if rid in self._requests or rid in self._dkgs:
            self._send(m.Error("duplicate_request", "request_id is in flight", rid))
            return []
        if self.in_flight >= self.max_in_flight:
            return self._decline_now(rid, "busy", f"{self.max_in_flight} requests in flight")
        if req.deadline_unix_ms <= now_ms:
            return self._decline_now(rid, "expired", "the deadline had passed on arrival")
        share = self._shares.share(req.account_id)
        if share is None:
            return self._decline_now(rid, "unknown_account")
        if share.ciphersuite != req.ciphersuite:
            return self._decline_now(
                rid, "bad_request", f"the account's ciphersuite is {share.ciphersuite}"
            )
        scheme = scheme_by_name(share.ciphersuite)
        if req.taproot_merkle_root is not None and not scheme.taproot:
            return self._decline_now(rid, "bad_request", "a merkle root for a non-Taproot suite")
        self._requests[rid] = _Request(req, share, scheme)
        return [SignRequested(req, share.identifier)]

    # -- decisions -------------------------------------------------------------------------------

    def accept(self, request_id: str, now_ms: int) -> list[Event]:
        """The policy said yes: commit (round one) and queue the commitment.

        A request that is no longer pending (cancelled or expired meanwhile) is ignored;
        one past its deadline is declined ``expired`` instead.
        """
        entry = self._requests.get(request_id)
        if entry is None or entry.state is not RequestState.PENDING or self.state is State.CLOSED:
            return []
        if entry.request.deadline_unix_ms <= now_ms:
            del self._requests[request_id]
            self.counts["expired"] += 1
            return self._decline_now(request_id, "expired", "decided after the deadline")
        entry.nonces = entry.scheme.commit(entry.share.identifier, entry.share.signing_share)
        c = entry.nonces.commitment
        own = m.CommitmentEntry(bytes(c.identifier), bytes(c.hiding), bytes(c.binding))
        entry.commitment = own
        entry.state = RequestState.COMMITTED
        self._send(m.Commitment(request_id, own.identifier, own.hiding, own.binding))
        return []

    def decline(self, request_id: str, reason: str, detail: str = "") -> list[Event]:
        """The policy said no (``reason`` from :data:`~._messages.DECLINE_REASONS`); for a
        signing request or a DKG."""
        if reason not in m.DECLINE_REASONS:
            raise SessionError(f"unknown decline reason {reason!r}")
        if request_id in self._dkgs:
            self._end_dkg(request_id)
            if self.state is State.CLOSED:
                return []
            return self._decline_now(request_id, reason, detail[: m.MAX_DETAIL_CHARS])
        entry = self._requests.pop(request_id, None)
        if entry is None or self.state is State.CLOSED:
            return []
        entry.zero()
        return self._decline_now(request_id, reason, detail[: m.MAX_DETAIL_CHARS])

    def expire(self, now_ms: int) -> list[Event]:
        """Drop every request whose deadline is at or before ``now_ms``: nonces zeroed; a
        pending one is declined ``expired`` (the gateway has given up on it anyway)."""
        events: list[Event] = []
        for rid, dkg in list(self._dkgs.items()):
            if dkg.request.deadline_unix_ms <= now_ms and dkg.phase != "storing":
                self._end_dkg(rid)
                self.counts["expired"] += 1
                if self.state is not State.CLOSED:
                    self._send(m.Decline(rid, "expired", "the DKG's deadline passed"))
                events.append(RequestEnded(rid, "expired"))
        for rid, entry in list(self._requests.items()):
            if entry.request.deadline_unix_ms <= now_ms:
                del self._requests[rid]
                pending = entry.state is RequestState.PENDING
                entry.zero()
                self.counts["expired"] += 1
                if pending and self.state is not State.CLOSED:
                    self._send(m.Decline(rid, "expired", "no decision before the deadline"))
                events.append(RequestEnded(rid, "expired"))
        return events

    def next_deadline_ms(self) -> int | None:
        """The earliest deadline of a request held, if any."""
        deadlines = [e.request.deadline_unix_ms for e in self._requests.values()]
        deadlines += [d.request.deadline_unix_ms for d in self._dkgs.values()]
        return min(deadlines, default=None)

    # -- round two -------------------------------------------------------------------------------

    def _on_round2(self, msg: m.SignRound2, now_ms: int) -> list[Event]:
        rid = msg.request_id
        entry = self._requests.get(rid)
        if entry is None or entry.state is not RequestState.COMMITTED:
            self._send(m.Error("unknown_request", "no committed request with this id", rid))
            return []
        del self._requests[rid]  # from here the nonces are used or dropped: single use
        try:
            problem = self._check_round2(entry, msg)
            if problem is not None:
                return self._decline_now(rid, "bad_request", problem)
            if entry.request.deadline_unix_ms <= now_ms:
                self.counts["expired"] += 1
                return self._decline_now(rid, "expired", "round two after the deadline")
            scheme, share, req = entry.scheme, entry.share, entry.request
            try:
                commitments = [
                    scheme.commitment(c.identifier, c.hiding, c.binding) for c in msg.commitments
                ]
                signature_share = scheme.sign(
                    entry.nonces,
                    signing_share=share.signing_share,
                    group_public_key=share.group_public_key,
                    message=req.message,
                    commitments=commitments,
                    min_signers=share.min_signers,
                    max_signers=share.max_signers,
                    merkle_root=req.taproot_merkle_root,
                )
            except FrostError as exc:
                return self._decline_now(rid, "bad_request", str(exc)[: m.MAX_DETAIL_CHARS])
            approval = self._approver.approve(
                self._approver_key_id,
                account_id=req.account_id,
                session_id=req.session_id,
                message=req.message,
                expires_at_unix_ms=now_ms + self._approval_lifetime_ms,
            )
        finally:
            entry.zero()
        self._send(
            m.SignatureShare(
                rid,
                bytes(signature_share),
                m.ApprovalField(approval.key_id, approval.signature, approval.expires_at_unix_ms),
            )
        )
        self.counts["signed"] += 1
        return [Signed(rid)]

    @staticmethod
    def _check_round2(entry: _Request, msg: m.SignRound2) -> str | None:
        scheme, own = entry.scheme, entry.commitment
        assert own is not None
        try:
            values = [scheme.identifier_from_bytes(c.identifier) for c in msg.commitments]
        except FrostError:
            return "a commitment's identifier is not a valid scalar"
        if values != sorted(values):
            return "the commitments are not sorted by identifier"
        if own not in msg.commitments:
            return "the commitment list lacks this participant's commitment, or changed it"
        if msg.enclave_identifier == own.identifier or msg.enclave_identifier not in {
            c.identifier for c in msg.commitments
        }:
            return "enclave_identifier is not another signer of the list"
        if not entry.share.min_signers <= len(msg.commitments) <= entry.share.max_signers:
            return f"{len(msg.commitments)} signers for a {entry.share.min_signers}-of-" + str(
                entry.share.max_signers
            )
        return None

    def _end(self, request_id: str, why: str) -> list[Event]:
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return []  # already gone: a cancel crossing our answer is normal
        entry.zero()
        self.counts[why] += 1
        return [RequestEnded(request_id, why)]

    # -- DKG (version 2) -------------------------------------------------------------------------

    def _on_dkg_round1(self, req: m.DkgRound1, now_ms: int) -> list[Event]:
        rid = req.request_id
        if rid in self._requests or rid in self._dkgs:
            self._send(m.Error("duplicate_request", "request_id is in flight", rid))
            return []
        if self.in_flight >= self.max_in_flight:
            return self._decline_now(rid, "busy", f"{self.max_in_flight} requests in flight")
        if req.deadline_unix_ms <= now_ms:
            return self._decline_now(rid, "expired", "the deadline had passed on arrival")
        problem = self._check_dkg(req)
        if problem is not None:
            return self._decline_now(rid, "bad_request", problem)
        ceremony = Ceremony(
            req.dkg_id,
            req.account_id,
            req.ciphersuite,
            req.min_signers,
            req.max_signers,
            req.policy,
            tuple((mb.identifier, mb.key_id) for mb in req.participants),
            req.enclave_identifier,
        )
        self._dkgs[rid] = _Dkg(req, ceremony)
        return [DkgRequested(req)]

    def _check_dkg(self, req: m.DkgRound1) -> str | None:
        if req.ciphersuite not in DKG_SUITES:
            return f"DKG ciphersuite {req.ciphersuite} is not one of {', '.join(DKG_SUITES)}"
        if not 2 <= req.min_signers <= req.max_signers == len(req.participants):
            return "need 2 <= min_signers <= max_signers = the number of participants"
        if self._shares.share(req.account_id) is not None:
            return "this participant holds a share of the account already"
        scheme = scheme_by_name(req.ciphersuite)
        try:
            values = [scheme.identifier_from_bytes(mb.identifier) for mb in req.participants]
        except FrostError:
            return "a participant's identifier is not a valid scalar"
        if values != sorted(values):
            return "the participants are not sorted by identifier"
        members = {mb.identifier: mb.key_id for mb in req.participants}
        if members.get(req.identifier) != self.key_id:
            return f"the participant list does not name this participant's key {self.key_id!r}"
        if (
            req.enclave_identifier == req.identifier
            or members.get(req.enclave_identifier) != "enclave"
        ):
            return "enclave_identifier is not the enclave's entry of the participant list"
        if any(d.request.dkg_id == req.dkg_id for d in self._dkgs.values()):
            return "this DKG is in progress here already"
        return None

    def accept_dkg(self, request_id: str, now_ms: int) -> list[Event]:
        """The policy said yes to a DKG: round 1 (a fresh secret polynomial and X25519 key),
        queue the signed package. Ignored if the DKG is no longer pending."""
        dkg = self._dkgs.get(request_id)
        if dkg is None or dkg.phase != "pending" or self.state is State.CLOSED:
            return []
        if dkg.request.deadline_unix_ms <= now_ms:
            self._end_dkg(request_id)
            self.counts["expired"] += 1
            return self._decline_now(request_id, "expired", "decided after the deadline")
        try:
            package = self._dkg.round1_now(dkg.ceremony, dkg.request.identifier)
        except (FrostError, TrioSignError) as exc:
            self._end_dkg(request_id)
            return self._decline_now(request_id, "internal", str(exc)[: m.MAX_DETAIL_CHARS])
        dkg.phase = "round1"
        self._send(m.DkgPackage(request_id, package_field(package)))
        return []

    def _on_dkg_step(self, msg: m.DkgRound2 | m.DkgRound3, now_ms: int) -> list[Event]:
        rid = msg.request_id
        dkg = self._dkgs.get(rid)
        want = "round1" if isinstance(msg, m.DkgRound2) else "round2"
        if dkg is None or dkg.phase != want:
            self._send(m.Error("unknown_request", f"no DKG waiting for {m.type_name(msg)}", rid))
            return []
        if dkg.request.deadline_unix_ms <= now_ms:
            self._end_dkg(rid)
            self.counts["expired"] += 1
            return self._decline_now(rid, "expired", "the DKG's deadline passed")
        c = dkg.ceremony
        try:
            if isinstance(msg, m.DkgRound2):
                ids = {mb.identifier for mb in dkg.request.participants}
                if {p.identifier for p in msg.packages} != ids:
                    raise _Refused("the packages are not one per participant of the DKG")
                shares = self._dkg.round2_now(c, [package_pb(p) for p in msg.packages])
                dkg.phase = "round2"
                self._send(m.DkgShares(rid, tuple(share_field(x) for x in shares)))
                return []
            own = dkg.request.identifier
            addressed = [x for x in msg.shares if x.recipient == own]
            if len(addressed) != len(dkg.request.participants) - 1:
                raise _Refused("round 3 needs one share from every other participant")
            output = self._dkg.round3_now(c, [share_pb(x) for x in addressed])
        except (FrostError, TrioSignError, _Refused) as exc:
            self._end_dkg(rid)
            return self._decline_now(rid, "bad_request", str(exc)[: m.MAX_DETAIL_CHARS])
        self._dkg.forget(c.dkg_id)  # round secrets zeroed; the record is the caller's now
        record = output.record
        assert record is not None
        dkg.phase = "storing"
        dkg.done = m.DkgDone(
            rid,
            output.identifier,
            output.verifying_share,
            output.group_public_key,
            tuple(
                m.DkgVerifyingShareField(i, v)
                for i, v in sorted(
                    output.verifying_shares.items(),
                    key=lambda kv: scheme_by_name(c.suite).identifier_from_bytes(kv[0]),
                )
            ),
        )
        return [DkgKeyReady(rid, record)]

    def dkg_stored(self, request_id: str) -> list[Event]:
        """The new share of ``request_id`` is sealed durably: queue ``dkg_done``."""
        dkg = self._dkgs.pop(request_id, None)
        if dkg is None or dkg.done is None:
            raise SessionError(f"no DKG {request_id!r} waiting to be stored")
        self.counts["dkg_done"] += 1
        if self.state is not State.CLOSED:
            self._send(dkg.done)
        return []

    def _end_dkg(self, request_id: str) -> None:
        dkg = self._dkgs.pop(request_id, None)
        if dkg is not None:
            self._dkg.forget(dkg.ceremony.dkg_id)

    def close(self) -> None:
        """Zero every nonce and DKG secret held and refuse further input. Idempotent."""
        self.state = State.CLOSED
        for entry in self._requests.values():
            entry.zero()
        self._requests.clear()
        for rid in list(self._dkgs):
            if self._dkgs[rid].phase != "storing":  # a share being sealed is the caller's
                self._end_dkg(rid)


class _Refused(Exception):
    """A DKG step refused here (declined ``bad_request`` with this text)."""


# -- the wire form of the DKG's protobuf messages (both sides use these) ------------------------


def package_field(p: pb.DkgRound1Package) -> m.DkgPackageField:
    return m.DkgPackageField(
        bytes(p.identifier),
        tuple(bytes(e) for e in p.commitment),
        bytes(p.proof_of_knowledge),
        bytes(p.encryption_key),
        p.key_id,
        bytes(p.signature),
    )


def package_pb(p: m.DkgPackageField) -> pb.DkgRound1Package:
    return pb.DkgRound1Package(
        identifier=p.identifier,
        commitment=list(p.commitment),
        proof_of_knowledge=p.proof_of_knowledge,
        encryption_key=p.encryption_key,
        key_id=p.key_id,
        signature=p.signature,
    )


def share_field(x: pb.DkgEncryptedShare) -> m.DkgShareField:
    return m.DkgShareField(bytes(x.sender), bytes(x.recipient), bytes(x.ciphertext))


def share_pb(x: m.DkgShareField) -> pb.DkgEncryptedShare:
    return pb.DkgEncryptedShare(sender=x.sender, recipient=x.recipient, ciphertext=x.ciphertext)
