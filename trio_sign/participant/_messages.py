"""The participant WebSocket contract, version 1 (docs/participants.md): the codec.

Every message is one JSON object in one WebSocket text frame, with ``"type"`` and ``"v": 1``;
byte fields are lowercase or uppercase hex (written lowercase). :func:`parse_message` turns a
frame's text into one of the frozen dataclasses below, checking every field's type and bound
before anything else looks at it; :func:`encode_message` is its inverse. Both the gateway's
endpoint (:mod:`trio_sign.gateway._participants`) and the participant library use this module,
so the two sides cannot disagree about the contract.

What the codec checks is what a message can say about itself: field names (an unknown field
is refused, so that a typo never passes silently), types, lengths, counts and ranges.
Whether an element is a valid point, whether a commitment list is in order for its
ciphersuite, whether a request id is known: those need context and belong to the session
(:mod:`._session`) and to the gateway's hub.

Error handling: :class:`MessageError` (one line naming the message type and the field; never
the field's value, which may be long or hostile) with ``close_code``, the WebSocket close code
the receiver should close with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, TypeAlias

from .._errors import TrioSignError

VERSION: Final = 1
#: The contract version that defines the DKG messages (``dkg_*``), and the highest this
#: codec speaks. A message's ``"v"`` is the version that defines its shape: the version-1
#: messages keep ``"v": 1``; the ``dkg_*`` messages are ``"v": 2``, sent only on a connection
#: whose subprotocol is ``trio-sign-participant.v2``.
DKG_VERSION: Final = 2
MAX_VERSION: Final = DKG_VERSION
#: Most participants of one DKG (the enclave's ``MAX_DKG_SIGNERS``).
MAX_DKG_SIGNERS: Final = 64
MAX_DKG_ID_BYTES: Final = 128
MAX_POLICY_BYTES: Final = 64
#: A round-2 ciphertext: nonce (24) + a scalar (32) + tag (16) = 72 bytes; bounded loosely.
MAX_DKG_CIPHERTEXT_BYTES: Final = 256
#: Largest text frame either side sends or accepts (UTF-8 bytes of the JSON text).
MAX_FRAME_BYTES: Final = 128 * 1024
#: Largest message a ``sign_request`` carries (the gateway's sign API takes 32 KiB).
MAX_MESSAGE_BYTES: Final = 32 * 1024
#: Most commitments in a ``sign_round2`` list (every signer of one session).
MAX_COMMITMENTS: Final = 255
#: Largest ``max_in_flight`` a ``welcome`` carries (the gateway's limit must fit it).
MAX_IN_FLIGHT: Final = 65535
MAX_ACCOUNT_ID_BYTES: Final = 255
MAX_SESSION_ID_BYTES: Final = 128
MAX_DETAIL_CHARS: Final = 256
CHALLENGE_BYTES: Final = 32
IDENTIFIER_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
#: The domain of the challenge signature (see :func:`auth_payload`).
AUTH_DOMAIN: Final = b"trio-sign/participant-auth/v1"
INT64_MAX: Final = 2**63 - 1

#: WebSocket close codes the two sides use (RFC 6455 §7.4; 4000-4999 are ours).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_AUTH_FAILED: Final = 4001
CLOSE_AUTH_TIMEOUT: Final = 4002
CLOSE_REPLACED: Final = 4003
CLOSE_UNSUPPORTED_VERSION: Final = 4004
CLOSE_TOO_MANY_IN_FLIGHT: Final = 4008

#: A ``decline``'s reason codes.
DECLINE_REASONS: Final = frozenset(
    {
        "policy",  # the automatic policy refused (account, size, rate)
        "rejected",  # a person said no
        "unknown_account",  # this participant holds no share of the account
        "busy",  # too many requests in flight at the participant
        "expired",  # the deadline passed before a decision
        "bad_request",  # the request is inconsistent (suite, merkle root, commitment list)
        "internal",  # the participant failed (its log says why)
    }
)
#: An ``error``'s codes.
ERROR_CODES: Final = frozenset(
    {"unknown_request", "duplicate_request", "bad_message", "not_ready", "internal"}
)
#: The DKG messages' prefix: their ``"v"`` is :data:`DKG_VERSION`.
RESERVED_PREFIX: Final = "dkg_"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
_HEX = re.compile(r"[0-9a-fA-F]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class MessageError(TrioSignError):
    """A frame that is not a valid version-1 message.

    Attributes:
        close_code: the WebSocket close code for it (1002, 1009 or 4004).
    """

    def __init__(self, message: str, *, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


# ---------------------------------------------------------------------------------------------
# The messages


@dataclass(frozen=True, slots=True)
class Hello:
    """participant → gateway, first: who connects, with which of its keys."""

    participant_id: str
    key_id: str


@dataclass(frozen=True, slots=True)
class Challenge:
    """gateway → participant: sign this within its expiry (Unix ms, gateway clock)."""

    challenge: bytes
    gateway_id: str
    expires_at_unix_ms: int

    def __repr__(self) -> str:
        return f"Challenge(gateway_id={self.gateway_id!r}, expires={self.expires_at_unix_ms})"


@dataclass(frozen=True, slots=True)
class Auth:
    """participant → gateway: the Ed25519 signature of :func:`auth_payload`."""

    signature: bytes

    def __repr__(self) -> str:
        return "Auth(<signature>)"


@dataclass(frozen=True, slots=True)
class Welcome:
    """gateway → participant: authenticated; the limits this connection runs under."""

    participant_id: str
    max_in_flight: int
    max_frame_bytes: int


@dataclass(frozen=True, slots=True)
class SignRequest:
    """gateway → participant: round one of one signing session.

    ``taproot_merkle_root`` is ``None`` (no tweak), ``b""`` (the empty BIP-341 root) or 32
    bytes, and only for ``FROST-secp256k1-SHA256-TR-v1``.
    """

    request_id: str
    account_id: str
    session_id: str
    ciphersuite: str
    message: bytes
    deadline_unix_ms: int
    taproot_merkle_root: bytes | None = None

    def __repr__(self) -> str:
        return (
            f"SignRequest(request_id={self.request_id!r}, account_id={self.account_id!r}, "
            f"session_id={self.session_id!r}, ciphersuite={self.ciphersuite!r}, "
            f"message=<{len(self.message)} bytes>, deadline_unix_ms={self.deadline_unix_ms})"
        )


@dataclass(frozen=True, slots=True)
class CommitmentEntry:
    """One signer's round-one commitment (the suite's element encodings)."""

    identifier: bytes
    hiding: bytes
    binding: bytes


@dataclass(frozen=True, slots=True)
class Commitment:
    """participant → gateway: its round-one commitment for ``request_id``."""

    request_id: str
    identifier: bytes
    hiding: bytes
    binding: bytes

    def entry(self) -> CommitmentEntry:
        return CommitmentEntry(self.identifier, self.hiding, self.binding)


@dataclass(frozen=True, slots=True)
class Decline:
    """participant → gateway: no (``reason`` from :data:`DECLINE_REASONS`)."""

    request_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SignRound2:
    """gateway → participant: every signer's commitment (sorted by identifier for the suite),
    and which identifier is the enclave's."""

    request_id: str
    commitments: tuple[CommitmentEntry, ...]
    enclave_identifier: bytes


@dataclass(frozen=True, slots=True)
class ApprovalField:
    """The DESIGN §11 approval a ``signature_share`` carries."""

    key_id: str
    signature: bytes
    expires_at_unix_ms: int


@dataclass(frozen=True, slots=True)
class SignatureShare:
    """participant → gateway: its signature share and its approval of the session."""

    request_id: str
    signature_share: bytes
    approval: ApprovalField

    def __repr__(self) -> str:
        return f"SignatureShare(request_id={self.request_id!r}, approval={self.approval!r})"


@dataclass(frozen=True, slots=True)
class Cancel:
    """gateway → participant: the session is over (its nonces can go)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: something about one request or message was wrong; the connection stays."""

    code: str
    detail: str = ""
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class DkgMember:
    """One participant of a DKG: its identifier and the key id its round-1 package is signed
    under (the enclave's is ``"enclave"``)."""

    identifier: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class DkgRound1:
    """gateway → participant (v2): take part in a DKG (key-lifecycle §5) as ``identifier``;
    answer ``dkg_package`` (or ``decline``). ``deadline_unix_ms`` bounds the whole DKG."""

    request_id: str
    dkg_id: str
    account_id: str
    ciphersuite: str
    min_signers: int
    max_signers: int
    policy: str
    participants: tuple[DkgMember, ...]
    enclave_identifier: bytes
    identifier: bytes
    deadline_unix_ms: int


@dataclass(frozen=True, slots=True)
class DkgPackageField:
    """A round-1 package (``DkgRound1Package`` of key-lifecycle §5)."""

    identifier: bytes
    commitment: tuple[bytes, ...]
    proof_of_knowledge: bytes
    encryption_key: bytes
    key_id: str
    signature: bytes


@dataclass(frozen=True, slots=True)
class DkgPackage:
    """participant → gateway (v2): its signed round-1 package."""

    request_id: str
    package: DkgPackageField


@dataclass(frozen=True, slots=True)
class DkgRound2:
    """gateway → participant (v2): every participant's round-1 package (its own included)."""

    request_id: str
    packages: tuple[DkgPackageField, ...]


@dataclass(frozen=True, slots=True)
class DkgShareField:
    """One encrypted round-2 share (``DkgEncryptedShare``)."""

    sender: bytes
    recipient: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class DkgShares:
    """participant → gateway (v2): its round-2 shares, each encrypted to its recipient."""

    request_id: str
    shares: tuple[DkgShareField, ...]


@dataclass(frozen=True, slots=True)
class DkgRound3:
    """gateway → participant (v2): the round-2 shares addressed to it."""

    request_id: str
    shares: tuple[DkgShareField, ...]


@dataclass(frozen=True, slots=True)
class DkgVerifyingShareField:
    identifier: bytes
    verifying_share: bytes


@dataclass(frozen=True, slots=True)
class DkgDone:
    """participant → gateway (v2): its key package is computed **and sealed durably in its
    store**; the DKG's public output as it computed it."""

    request_id: str
    identifier: bytes
    verifying_share: bytes
    group_public_key: bytes
    verifying_shares: tuple[DkgVerifyingShareField, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    seq: int


Message: TypeAlias = (
    Hello
    | Challenge
    | Auth
    | Welcome
    | SignRequest
    | Commitment
    | Decline
    | SignRound2
    | SignatureShare
    | Cancel
    | Error
    | Ping
    | Pong
    | DkgRound1
    | DkgPackage
    | DkgRound2
    | DkgShares
    | DkgRound3
    | DkgDone
)

#: The type names, each with its class.
TYPES: Final[Mapping[str, type[Any]]] = {
    "hello": Hello,
    "challenge": Challenge,
    "auth": Auth,
    "welcome": Welcome,
    "sign_request": SignRequest,
    "commitment": Commitment,
    "decline": Decline,
    "sign_round2": SignRound2,
    "signature_share": SignatureShare,
    "cancel": Cancel,
    "error": Error,
    "ping": Ping,
    "pong": Pong,
    "dkg_round1": DkgRound1,
    "dkg_package": DkgPackage,
    "dkg_round2": DkgRound2,
    "dkg_shares": DkgShares,
    "dkg_round3": DkgRound3,
    "dkg_done": DkgDone,
}
_NAMES: Final = {cls: name for name, cls in TYPES.items()}
#: Which side sends each type: "p" participant, "g" gateway, "*" either.
SENDER: Final[Mapping[str, str]] = {
    "hello": "p",
    "challenge": "g",
    "auth": "p",
    "welcome": "g",
    "sign_request": "g",
    "commitment": "p",
    "decline": "p",
    "sign_round2": "g",
    "signature_share": "p",
    "cancel": "g",
    "error": "*",
    "ping": "*",
    "pong": "*",
    "dkg_round1": "g",
    "dkg_package": "p",
    "dkg_round2": "g",
    "dkg_shares": "p",
    "dkg_round3": "g",
    "dkg_done": "p",
}


def version_of(kind: str) -> int:
    """The contract version that defines message type ``kind`` (its ``"v"``)."""
    return DKG_VERSION if kind.startswith(RESERVED_PREFIX) else VERSION


def type_name(message: Message) -> str:
    return _NAMES[type(message)]


def auth_payload(challenge: bytes, gateway_id: str, participant_id: str, key_id: str) -> bytes:
    """What a participant signs to authenticate::

        "trio-sign/participant-auth/v1" || 0x00 || challenge (32 bytes)
            || u16be(len(g)) || g || u16be(len(p)) || p || u16be(len(k)) || k

    with ``g``, ``p``, ``k`` the UTF-8 gateway id, participant id and key id.
    """
    if len(challenge) != CHALLENGE_BYTES:
        raise ValueError(f"a challenge is {CHALLENGE_BYTES} bytes")
    parts = [AUTH_DOMAIN, b"\x00", bytes(challenge)]
    for value in (gateway_id, participant_id, key_id):
        raw = value.encode("utf-8")
        parts += [len(raw).to_bytes(2, "big"), raw]
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Field readers: each takes the object, the message type (for the error) and the field name.

_Obj = Mapping[str, Any]


def _fail(kind: str, name: str, what: str) -> MessageError:
    return MessageError(f"{kind}.{name} must be {what}")


def _id(obj: _Obj, kind: str, name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise _fail(kind, name, "an id (1-64 of A-Z a-z 0-9 . _ : @ -, first alphanumeric)")
    return value


def _text(obj: _Obj, kind: str, name: str, max_bytes: int, *, empty: bool = False) -> str:
    value = obj.get(name)
    what = f"a string of {'0' if empty else '1'}..{max_bytes} UTF-8 bytes, no control characters"
    if not isinstance(value, str) or (not value and not empty):
        raise _fail(kind, name, what)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _fail(kind, name, what) from None
    if size > max_bytes or _CONTROL.search(value):
        raise _fail(kind, name, what)
    return value


def _hex(obj: _Obj, kind: str, name: str, sizes: tuple[int, ...] | range) -> bytes:
    value = obj.get(name)
    if isinstance(sizes, range):
        what = f"hex of {sizes.start}..{sizes.stop - 1} bytes"
    else:
        what = "hex of " + " or ".join(str(s) for s in sizes) + " bytes"
    if not isinstance(value, str) or len(value) % 2 or len(value) // 2 not in sizes:
        raise _fail(kind, name, what)
    if not _HEX.fullmatch(value):
        raise _fail(kind, name, what)
    return bytes.fromhex(value)


def _int(obj: _Obj, kind: str, name: str, low: int, high: int) -> int:
    value = obj.get(name)
    if type(value) is not int or not low <= value <= high:
        raise _fail(kind, name, f"an integer in {low}..{high}")
    return value


def _element_sizes() -> tuple[int, ...]:
    return (32, 33)


def _commitment_entry(obj: object, kind: str, index: int) -> CommitmentEntry:
    where = f"commitments[{index}]"
    if not isinstance(obj, dict) or set(obj) != {"identifier", "hiding", "binding"}:
        raise _fail(kind, where, 'an object {"identifier", "hiding", "binding"}')
    return CommitmentEntry(
        _hex_at(obj, kind, where, "identifier", (IDENTIFIER_BYTES,)),
        _hex_at(obj, kind, where, "hiding", _element_sizes()),
        _hex_at(obj, kind, where, "binding", _element_sizes()),
    )


def _hex_at(obj: _Obj, kind: str, where: str, name: str, sizes: tuple[int, ...] | range) -> bytes:
    """:func:`_hex` of a nested object's field, the error naming ``kind.where.name``."""
    try:
        return _hex(obj, kind, name, sizes)
    except MessageError as exc:
        raise MessageError(str(exc).replace(f"{kind}.{name}", f"{kind}.{where}.{name}")) from None


def _id_at(obj: _Obj, kind: str, where: str, name: str) -> str:
    try:
        return _id(obj, kind, name)
    except MessageError as exc:
        raise MessageError(str(exc).replace(f"{kind}.{name}", f"{kind}.{where}.{name}")) from None


def _int_at(obj: _Obj, kind: str, where: str, name: str, low: int, high: int) -> int:
    try:
        return _int(obj, kind, name, low, high)
    except MessageError as exc:
        raise MessageError(str(exc).replace(f"{kind}.{name}", f"{kind}.{where}.{name}")) from None


# ---------------------------------------------------------------------------------------------
# Per type: the fields (required, optional) and the parser.

_FIELDS: Final[Mapping[str, tuple[frozenset[str], frozenset[str]]]] = {
    "hello": (frozenset({"participant_id", "key_id"}), frozenset()),
    "challenge": (frozenset({"challenge", "gateway_id", "expires_at_unix_ms"}), frozenset()),
    "auth": (frozenset({"signature"}), frozenset()),
    "welcome": (frozenset({"participant_id", "max_in_flight", "max_frame_bytes"}), frozenset()),
    "sign_request": (
        frozenset(
            {
                "request_id",
                "account_id",
                "session_id",
                "ciphersuite",
                "message",
                "deadline_unix_ms",
            }
        ),
        frozenset({"taproot_merkle_root"}),
    ),
    "commitment": (frozenset({"request_id", "identifier", "hiding", "binding"}), frozenset()),
    "decline": (frozenset({"request_id", "reason"}), frozenset({"detail"})),
    "sign_round2": (
        frozenset({"request_id", "commitments", "enclave_identifier"}),
        frozenset(),
    ),
    "signature_share": (frozenset({"request_id", "signature_share", "approval"}), frozenset()),
    "cancel": (frozenset({"request_id"}), frozenset()),
    "error": (frozenset({"code"}), frozenset({"detail", "request_id"})),
    "ping": (frozenset({"seq"}), frozenset()),
    "pong": (frozenset({"seq"}), frozenset()),
    "dkg_round1": (
        frozenset(
            {
                "request_id",
                "dkg_id",
                "account_id",
                "ciphersuite",
                "min_signers",
                "max_signers",
                "policy",
                "participants",
                "enclave_identifier",
                "identifier",
                "deadline_unix_ms",
            }
        ),
        frozenset(),
    ),
    "dkg_package": (frozenset({"request_id", "package"}), frozenset()),
    "dkg_round2": (frozenset({"request_id", "packages"}), frozenset()),
    "dkg_shares": (frozenset({"request_id", "shares"}), frozenset()),
    "dkg_round3": (frozenset({"request_id", "shares"}), frozenset()),
    "dkg_done": (
        frozenset(
            {"request_id", "identifier", "verifying_share", "group_public_key", "verifying_shares"}
        ),
        frozenset(),
    ),
}


def _p_hello(o: _Obj) -> Hello:
    return Hello(_id(o, "hello", "participant_id"), _id(o, "hello", "key_id"))


def _p_challenge(o: _Obj) -> Challenge:
    k = "challenge"
    return Challenge(
        _hex(o, k, "challenge", (CHALLENGE_BYTES,)),
        _id(o, k, "gateway_id"),
        _int(o, k, "expires_at_unix_ms", 0, INT64_MAX),
    )


def _p_auth(o: _Obj) -> Auth:
    return Auth(_hex(o, "auth", "signature", (SIGNATURE_BYTES,)))


def _p_welcome(o: _Obj) -> Welcome:
    k = "welcome"
    return Welcome(
        _id(o, k, "participant_id"),
        _int(o, k, "max_in_flight", 1, MAX_IN_FLIGHT),
        _int(o, k, "max_frame_bytes", 1024, MAX_FRAME_BYTES),
    )


def _p_sign_request(o: _Obj) -> SignRequest:
    k = "sign_request"
    root: bytes | None = None
    if o.get("taproot_merkle_root") is not None:
        root = _hex(o, k, "taproot_merkle_root", (0, 32))
    suite = _suite(o, k)
    return SignRequest(
        _id(o, k, "request_id"),
        _text(o, k, "account_id", MAX_ACCOUNT_ID_BYTES),
        _text(o, k, "session_id", MAX_SESSION_ID_BYTES),
        suite,
        _hex(o, k, "message", range(MAX_MESSAGE_BYTES + 1)),
        _int(o, k, "deadline_unix_ms", 0, INT64_MAX),
        root,
    )


def _p_commitment(o: _Obj) -> Commitment:
    k = "commitment"
    return Commitment(
        _id(o, k, "request_id"),
        _hex(o, k, "identifier", (IDENTIFIER_BYTES,)),
        _hex(o, k, "hiding", _element_sizes()),
        _hex(o, k, "binding", _element_sizes()),
    )


def _p_decline(o: _Obj) -> Decline:
    k = "decline"
    reason = o.get("reason")
    if reason not in DECLINE_REASONS:
        raise _fail(k, "reason", "one of " + ", ".join(sorted(DECLINE_REASONS)))
    detail = _text(o, k, "detail", MAX_DETAIL_CHARS, empty=True) if "detail" in o else ""
    return Decline(_id(o, k, "request_id"), reason, detail)


def _p_sign_round2(o: _Obj) -> SignRound2:
    k = "sign_round2"
    raw = o.get("commitments")
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_COMMITMENTS:
        raise _fail(k, "commitments", f"a list of 2..{MAX_COMMITMENTS} commitments")
    entries = tuple(_commitment_entry(c, k, i) for i, c in enumerate(raw))
    if len({e.identifier for e in entries}) != len(entries):
        raise _fail(k, "commitments", "a list with one commitment per identifier")
    return SignRound2(
        _id(o, k, "request_id"), entries, _hex(o, k, "enclave_identifier", (IDENTIFIER_BYTES,))
    )


def _p_signature_share(o: _Obj) -> SignatureShare:
    k = "signature_share"
    approval = o.get("approval")
    if not isinstance(approval, dict) or set(approval) != {
        "key_id",
        "signature",
        "expires_at_unix_ms",
    }:
        raise _fail(k, "approval", 'an object {"key_id", "signature", "expires_at_unix_ms"}')
    return SignatureShare(
        _id(o, k, "request_id"),
        _hex(o, k, "signature_share", (32,)),
        ApprovalField(
            _id_at(approval, k, "approval", "key_id"),
            _hex_at(approval, k, "approval", "signature", (SIGNATURE_BYTES,)),
            _int_at(approval, k, "approval", "expires_at_unix_ms", 0, INT64_MAX),
        ),
    )


def _p_cancel(o: _Obj) -> Cancel:
    return Cancel(_id(o, "cancel", "request_id"))


def _p_error(o: _Obj) -> Error:
    k = "error"
    code = o.get("code")
    if code not in ERROR_CODES:
        raise _fail(k, "code", "one of " + ", ".join(sorted(ERROR_CODES)))
    detail = _text(o, k, "detail", MAX_DETAIL_CHARS, empty=True) if "detail" in o else ""
    request_id = _id(o, k, "request_id") if o.get("request_id") is not None else None
    return Error(code, detail, request_id)


def _p_ping(o: _Obj) -> Ping:
    return Ping(_int(o, "ping", "seq", 0, INT64_MAX))


def _p_pong(o: _Obj) -> Pong:
    return Pong(_int(o, "pong", "seq", 0, INT64_MAX))


def _list(o: _Obj, kind: str, name: str, low: int, high: int) -> list[Any]:
    value = o.get(name)
    if not isinstance(value, list) or not low <= len(value) <= high:
        raise _fail(kind, name, f"a list of {low}..{high} entries")
    return value


def _obj(value: object, kind: str, where: str, keys: frozenset[str]) -> _Obj:
    if not isinstance(value, dict) or set(value) != keys:
        raise _fail(kind, where, "an object {" + ", ".join(f'"{k}"' for k in sorted(keys)) + "}")
    return value


def _suite(o: _Obj, kind: str) -> str:
    suite = o.get("ciphersuite")
    if not isinstance(suite, str) or not _ID.fullmatch(suite):
        raise _fail(kind, "ciphersuite", "a ciphersuite name")
    return suite


_MEMBER_KEYS: Final = frozenset({"identifier", "key_id"})
_PACKAGE_KEYS: Final = frozenset(
    {"identifier", "commitment", "proof_of_knowledge", "encryption_key", "key_id", "signature"}
)
_SHARE_KEYS: Final = frozenset({"sender", "recipient", "ciphertext"})
_VSHARE_KEYS: Final = frozenset({"identifier", "verifying_share"})


def _p_dkg_round1(o: _Obj) -> DkgRound1:
    k = "dkg_round1"
    members = []
    for i, raw in enumerate(_list(o, k, "participants", 2, MAX_DKG_SIGNERS)):
        where = f"participants[{i}]"
        e = _obj(raw, k, where, _MEMBER_KEYS)
        members.append(
            DkgMember(
                _hex_at(e, k, where, "identifier", (IDENTIFIER_BYTES,)),
                _id_at(e, k, where, "key_id"),
            )
        )
    if len({mb.identifier for mb in members}) != len(members):
        raise _fail(k, "participants", "a list with one entry per identifier")
    return DkgRound1(
        _id(o, k, "request_id"),
        _text(o, k, "dkg_id", MAX_DKG_ID_BYTES),
        _text(o, k, "account_id", MAX_ACCOUNT_ID_BYTES),
        _suite(o, k),
        _int(o, k, "min_signers", 2, MAX_DKG_SIGNERS),
        _int(o, k, "max_signers", 2, MAX_DKG_SIGNERS),
        _text(o, k, "policy", MAX_POLICY_BYTES),
        tuple(members),
        _hex(o, k, "enclave_identifier", (IDENTIFIER_BYTES,)),
        _hex(o, k, "identifier", (IDENTIFIER_BYTES,)),
        _int(o, k, "deadline_unix_ms", 0, INT64_MAX),
    )


def _package(raw: object, kind: str, where: str) -> DkgPackageField:
    e = _obj(raw, kind, where, _PACKAGE_KEYS)
    commitment = e["commitment"]
    if not isinstance(commitment, list) or not 1 <= len(commitment) <= MAX_DKG_SIGNERS:
        raise _fail(kind, f"{where}.commitment", f"a list of 1..{MAX_DKG_SIGNERS} elements")
    elements = tuple(
        _hex_at({"e": c}, kind, f"{where}.commitment[{i}]", "e", _element_sizes())
        for i, c in enumerate(commitment)
    )
    return DkgPackageField(
        _hex_at(e, kind, where, "identifier", (IDENTIFIER_BYTES,)),
        elements,
        _hex_at(e, kind, where, "proof_of_knowledge", (64, 65)),
        _hex_at(e, kind, where, "encryption_key", (32,)),
        _id_at(e, kind, where, "key_id"),
        _hex_at(e, kind, where, "signature", (SIGNATURE_BYTES,)),
    )


def _shares(o: _Obj, kind: str) -> tuple[DkgShareField, ...]:
    out = []
    for i, raw in enumerate(_list(o, kind, "shares", 1, MAX_DKG_SIGNERS)):
        where = f"shares[{i}]"
        e = _obj(raw, kind, where, _SHARE_KEYS)
        ciphertext = _hex_at(e, kind, where, "ciphertext", range(1, MAX_DKG_CIPHERTEXT_BYTES + 1))
        sender = _hex_at(e, kind, where, "sender", (IDENTIFIER_BYTES,))
        recipient = _hex_at(e, kind, where, "recipient", (IDENTIFIER_BYTES,))
        out.append(DkgShareField(sender, recipient, ciphertext))
    return tuple(out)


def _p_dkg_package(o: _Obj) -> DkgPackage:
    return DkgPackage(
        _id(o, "dkg_package", "request_id"), _package(o.get("package"), "dkg_package", "package")
    )


def _p_dkg_round2(o: _Obj) -> DkgRound2:
    k = "dkg_round2"
    raw = _list(o, k, "packages", 2, MAX_DKG_SIGNERS)
    packages = tuple(_package(p, k, f"packages[{i}]") for i, p in enumerate(raw))
    if len({p.identifier for p in packages}) != len(packages):
        raise _fail(k, "packages", "a list with one package per identifier")
    return DkgRound2(_id(o, k, "request_id"), packages)


def _p_dkg_shares(o: _Obj) -> DkgShares:
    return DkgShares(_id(o, "dkg_shares", "request_id"), _shares(o, "dkg_shares"))


def _p_dkg_round3(o: _Obj) -> DkgRound3:
    return DkgRound3(_id(o, "dkg_round3", "request_id"), _shares(o, "dkg_round3"))


def _p_dkg_done(o: _Obj) -> DkgDone:
    k = "dkg_done"
    shares = []
    for i, raw in enumerate(_list(o, k, "verifying_shares", 2, MAX_DKG_SIGNERS)):
        where = f"verifying_shares[{i}]"
        e = _obj(raw, k, where, _VSHARE_KEYS)
        shares.append(
            DkgVerifyingShareField(
                _hex_at(e, k, where, "identifier", (IDENTIFIER_BYTES,)),
                _hex_at(e, k, where, "verifying_share", _element_sizes()),
            )
        )
    return DkgDone(
        _id(o, k, "request_id"),
        _hex(o, k, "identifier", (IDENTIFIER_BYTES,)),
        _hex(o, k, "verifying_share", _element_sizes()),
        _hex(o, k, "group_public_key", _element_sizes()),
        tuple(shares),
    )


_PARSERS: Final[Mapping[str, Callable[[_Obj], Any]]] = {
    "hello": _p_hello,
    "challenge": _p_challenge,
    "auth": _p_auth,
    "welcome": _p_welcome,
    "sign_request": _p_sign_request,
    "commitment": _p_commitment,
    "decline": _p_decline,
    "sign_round2": _p_sign_round2,
    "signature_share": _p_signature_share,
    "cancel": _p_cancel,
    "error": _p_error,
    "ping": _p_ping,
    "pong": _p_pong,
    "dkg_round1": _p_dkg_round1,
    "dkg_package": _p_dkg_package,
    "dkg_round2": _p_dkg_round2,
    "dkg_shares": _p_dkg_shares,
    "dkg_round3": _p_dkg_round3,
    "dkg_done": _p_dkg_done,
}


def _reject_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_message(
    text: str | bytes, *, max_version: int = VERSION, max_bytes: int = MAX_FRAME_BYTES
) -> Message:
    """One frame's text (or its UTF-8 bytes) as a message.

    ``max_version`` is the connection's contract version (its subprotocol's): 1 refuses the
    ``dkg_*`` messages like unknown types; 2 takes them (with ``"v": 2``). ``max_bytes`` is
    the connection's frame limit in UTF-8 bytes (at most :data:`MAX_FRAME_BYTES`).

    Raises:
        MessageError: a frame over ``max_bytes`` (``close_code`` 1009), a ``"v"``
            other than the one that defines the type (1, or 2 for ``dkg_*``; 4004), and
            anything else that is not a valid message (1002): not JSON, not an object, an
            unknown type (``dkg_*`` on a version-1 connection), a missing or unknown field, a
            field of the wrong type or out of its bound.
    """
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > min(max_bytes, MAX_FRAME_BYTES):
        raise MessageError(
            f"a frame of {size} bytes is over the {min(max_bytes, MAX_FRAME_BYTES)}-byte limit",
            close_code=CLOSE_TOO_BIG,
        )
    try:
        obj = json.loads(text, parse_constant=_reject_constants)
    except (ValueError, RecursionError):
        # The decoder's messages carry a position, never the document's text.
        raise MessageError("a frame is not valid JSON text") from None
    if not isinstance(obj, dict):
        raise MessageError("a frame must hold one JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise MessageError('a message needs "type", a string')
    if "v" not in obj or type(obj["v"]) is not int:
        raise MessageError(f'{kind[:32]!r} needs "v", an integer')
    if kind.startswith(RESERVED_PREFIX) and max_version < DKG_VERSION:
        raise MessageError(f"{kind[:32]!r} is reserved for DKG, which version 1 does not carry")
    expected = version_of(kind) if kind in _FIELDS else VERSION
    if obj["v"] != expected:
        raise MessageError(
            f"message version {obj['v']} is not supported for {kind[:32]!r} (it is {expected})",
            close_code=CLOSE_UNSUPPORTED_VERSION,
        )
    if kind not in _FIELDS:
        raise MessageError(f"unknown message type {kind[:32]!r}")
    required, optional = _FIELDS[kind]
    present = set(obj) - {"type", "v"}
    if missing := required - present:
        raise MessageError(f"{kind} lacks {', '.join(sorted(missing))}")
    if unknown := present - required - optional:
        names = ", ".join(repr(n[:32]) for n in sorted(unknown)[:4])
        raise MessageError(f"{kind} has unknown field(s) {names}")
    result: Message = _PARSERS[kind](obj)
    return result


# ---------------------------------------------------------------------------------------------
# Encoding


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    return value


def message_to_json(message: Message) -> dict[str, Any]:
    """The JSON object of ``message`` (optional fields left out when empty or ``None``)."""
    kind = type_name(message)
    out: dict[str, Any] = {"type": kind, "v": version_of(kind)}
    _, optional = _FIELDS[kind]
    for f in fields(message):
        value = getattr(message, f.name)
        if f.name in optional and (value is None or value == ""):
            continue
        out[f.name] = _to_json(value)
    return out


def encode_message(message: Message) -> str:
    """The frame text of ``message`` (compact JSON; ASCII only)."""
    return json.dumps(message_to_json(message), separators=(",", ":"), ensure_ascii=True)
