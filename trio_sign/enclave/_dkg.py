"""DKG sessions inside the enclave: the enclave as one participant of ZF FROST's DKG (DESIGN §13).

The contract is docs/key-lifecycle.md §5 (messages, the approval, the signed round-1 payload,
the round-2 encryption) and §6 (crash safety). :class:`DkgRegistry` keeps one
:class:`DkgSession` per ``dkg_id``, a small state machine::

    open ─► round1_sent ─► round2_sent ─► storing ─► done
      │          │              │            └─────► failed
      └──────────┴──────────────┴──────────────────► failed | expired

(:data:`TRANSITIONS`; any other move is an :class:`~trio_sign.InternalError`). What each
round does:

* **Round 1** (``DkgRound1``): the parameters are checked (suite, thresholds, the participant
  list against ``[dkg] participants``, the account's policy), the approvals are decided under
  the ``create`` policy (the payload of DESIGN §11 with ``a`` = account id, ``s`` = dkg id and
  ``message`` = :func:`dkg_params`), then the DKG takes a session-pool slot and one of
  ``[dkg] max_open``, draws its polynomial (``_dkg.part1``) and an X25519 key pair, and
  answers its package signed by the identity key over :func:`round1_payload`.
* **Round 2** (``DkgRound2``): every other participant's package must name the key id the
  participant list gave it and carry that pinned key's signature; a package that does not
  (a relaying gateway substituted it) is INVALID_ARGUMENT naming the participant and the DKG
  stays as it was, so the right package can still be relayed. Then ``_dkg.part2`` checks the
  proofs of knowledge (a bad one is the signer's own fault: the DKG fails, naming it) and the
  shares for the others are encrypted to their X25519 keys (:func:`encrypt_share`).
* **Round 3** (``DkgRound3``): each share addressed to the enclave is decrypted; one that fails
  authentication (moved, changed) is INVALID_ARGUMENT naming its sender and the DKG stays.
  ``_dkg.part3`` checks each share against its sender's commitment (a bad one fails the DKG,
  naming the sender), the key package becomes a ``create`` record for the
  :class:`DeltaWriter`, and the answer leaves only once the writer reports the delta stored.

**Refresh** (``operation = "refresh"``, docs/refresh-repair.md §7.1) runs the same three
rounds on an existing account: the parameters must match it, the approvals are decided under
the ``refresh`` policy over parameters and signed payloads that carry the operation, the
rounds are ZF's ``refresh_dkg_*`` (``crypto/_refresh.py``: a zero constant term, left out of
the commitment), and round 3 adds the received shares to the account's current share, refuses
an account changed since round 1, and stores the result as a ``refresh`` delta, which replaces
(and zeroes) the old share only once it is durable.

**Repair** (``RepairStep1``/``RepairStep2``, §7.2): the enclave as one helper of ZF's
repairable scheme (``crypto/_repair.py``). A :class:`RepairSession` lives in
:attr:`DkgRegistry.repairs` and shares the DKGs' slots, ``max_open``, expiry, zeroing and
shutdown (:data:`REPAIR_TRANSITIONS`: ``open -> round1_sent`` at step 1, ``-> done`` at step
2). Nothing is stored.

Retries are idempotent: the same round-1 parameters return the same package, the same round-2
packages the same ciphertexts, and a round 3 after success (also after this DKG is forgotten,
from the stored delta: :data:`FindCreated`) the same account. A round 3 that arrives while the
delta is being stored waits for that outcome; the store runs in :meth:`DkgRegistry.run`'s
nursery, so a caller's cancellation never leaves it half done.

Secrets and what zeroes them: the polynomial (``Round1Secret``), the X25519 secret key, the
share kept for ourselves (``Round2Secret``), the shares sent (zeroed once encrypted), the shares
received (zeroed by ``part3``, or here when a later one fails to decrypt), the key package
(zeroed once the writer returns, whatever it returned). A DKG that fails, expires or is
cancelled at any step is zeroed and forgotten and frees its slot, so it leaves nothing behind:
no account, no slot, no secret. What CPython cannot promise is in ``crypto/_dkg.py``.

Everything but the store is synchronous: a round's state changes happen without an ``await``
in between, so they are atomic under Trio.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol, TypeVar

import nacl.exceptions
import nacl.signing
import trio
from google.protobuf.message import Message

from proto_min import sign_service_pb2 as pb

from .._errors import FrostError, InternalError
from ..authz import (
    CREATE_POLICY,
    DEFAULT_POLICY,
    REFRESH_POLICY,
    REPAIR_POLICY,
    RESERVED_POLICIES,
    ApprovalDenied,
    Authorizer,
)
from ..crypto import _dkg, _kdf, _refresh, _repair, _sodium, _stream
from ..crypto._group import Group, group_for
from ..shares import AccountShare, ShareRecord
from ._measured import ENCLAVE_KEY_ID, DkgSettings
from ._pool import PoolError, PoolErrorKind, SessionPool

log = logging.getLogger("trio_sign.dkg")
audit_log = logging.getLogger("trio_sign.audit")
audit_log.setLevel(logging.INFO)

#: Domain tags of the bytes that are approved, signed and derived (docs/key-lifecycle.md §5).
PARAMS_DOMAIN: Final = b"trio-sign/dkg-params/v1"
ROUND1_DOMAIN: Final = b"trio-sign/dkg-round1/v1"
SHARE_INFO: Final = b"trio-sign/dkg-share/v1"
#: Repair (docs/refresh-repair.md): the approved parameters, the signed X25519 keys, and the
#: HKDF labels of the deltas between helpers and of sigma to the repaired participant.
REPAIR_PARAMS_DOMAIN: Final = b"trio-sign/repair-params/v1"
REPAIR_KEY_DOMAIN: Final = b"trio-sign/repair-key/v1"
REPAIR_DELTA_INFO: Final = b"trio-sign/repair-delta/v1"
REPAIR_SIGMA_INFO: Final = b"trio-sign/repair-sigma/v1"
#: What a DkgRound1 may do (``operation``; empty means create).
CREATE: Final = "create"
REFRESH: Final = "refresh"
DKG_OPERATIONS: Final = (CREATE, REFRESH)
#: The suites a DKG may create (DESIGN §14).
DKG_SUITES: Final = (
    "FROST-ED25519-SHA512-v1",
    "FROST-secp256k1-SHA256-v1",
    "FROST-secp256k1-SHA256-TR-v1",
)
MAX_DKG_ID_BYTES: Final = 128
MAX_ACCOUNT_ID_BYTES: Final = 255
MAX_KEY_ID_BYTES: Final = 64
#: Most participants of one DKG (bounds every request before any work; ZF allows 65535).
MAX_DKG_SIGNERS: Final = 64
#: Most approvals read from a DkgRound1 request (a policy has at most 256 approvers).
MAX_DKG_APPROVALS: Final = 256
IDENTIFIER_BYTES: Final = 32
X25519_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
#: A scalar in every suite (a round-2 share's plaintext).
SCALAR_BYTES: Final = 32
#: nonce (24) ‖ XChaCha20-Poly1305(share (32)) with its 16-byte tag.
CIPHERTEXT_BYTES: Final = _stream.AEAD_NONCE_BYTES + SCALAR_BYTES + _stream.AEAD_ABYTES
_MAX_ELEMENT_BYTES: Final = 33
_MAX_POK_BYTES: Final = _MAX_ELEMENT_BYTES + SCALAR_BYTES


class DkgState(Enum):
    """Where a DKG is (the module docstring draws the machine)."""

    OPEN = "open"
    ROUND1_SENT = "round1_sent"
    ROUND2_SENT = "round2_sent"
    STORING = "storing"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"


#: Every allowed move. ``storing`` does not expire (the store's outcome decides), ``done``
#: expires only in the sense that its answer is forgotten (the stored delta still gives it).
TRANSITIONS: Final[Mapping[DkgState, frozenset[DkgState]]] = {
    DkgState.OPEN: frozenset({DkgState.ROUND1_SENT, DkgState.FAILED, DkgState.EXPIRED}),
    DkgState.ROUND1_SENT: frozenset({DkgState.ROUND2_SENT, DkgState.FAILED, DkgState.EXPIRED}),
    DkgState.ROUND2_SENT: frozenset({DkgState.STORING, DkgState.FAILED, DkgState.EXPIRED}),
    DkgState.STORING: frozenset({DkgState.DONE, DkgState.FAILED}),
    DkgState.DONE: frozenset({DkgState.EXPIRED}),
    DkgState.FAILED: frozenset(),
    DkgState.EXPIRED: frozenset(),
}
#: A repair's moves: ``open`` until step 1 answers (``round1_sent``), then ``done`` once step 2
#: answered (nothing secret left; the answer kept for retries until the TTL).
REPAIR_TRANSITIONS: Final[Mapping[DkgState, frozenset[DkgState]]] = {
    DkgState.OPEN: frozenset({DkgState.ROUND1_SENT, DkgState.FAILED, DkgState.EXPIRED}),
    DkgState.ROUND1_SENT: frozenset({DkgState.DONE, DkgState.FAILED, DkgState.EXPIRED}),
    DkgState.DONE: frozenset({DkgState.EXPIRED}),
    DkgState.FAILED: frozenset(),
    DkgState.EXPIRED: frozenset(),
}
#: States in which a DKG holds secrets and a pool slot.
_HOLDING: Final = frozenset(
    {DkgState.OPEN, DkgState.ROUND1_SENT, DkgState.ROUND2_SENT, DkgState.STORING}
)


# -- the bytes of the contract (sans-io; the tests' other participants use them too) -----------


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _text(value: str, what: str) -> bytes:
    encoded = value.encode("utf-8")
    if len(encoded) > 0xFFFF:
        raise ValueError(f"{what} is longer than 65535 bytes")
    return encoded


def _operation_tag(operation: str) -> list[bytes]:
    """``0x00`` for ``create`` (the bytes of before refresh existed); ``0x01 ‖
    u16be(len(operation)) ‖ operation`` for any other operation."""
    if operation == CREATE:
        return [b"\x00"]
    op = _text(operation, "operation")
    return [b"\x01", _u16(len(op)), op]


def dkg_params(
    suite: str,
    min_signers: int,
    max_signers: int,
    policy: str,
    participants: Sequence[tuple[bytes, str]],
    operation: str = CREATE,
) -> bytes:
    """The DKG parameters an approval covers (its ``message``)::

        "trio-sign/dkg-params/v1" ‖ op ‖ u16be(len(suite)) ‖ suite ‖ u16be(min) ‖ u16be(max)
          ‖ u16be(len(policy)) ‖ policy ‖ u16be(n) ‖ n * (identifier(32) ‖ u16be(len(key_id))
          ‖ key_id)

    where ``op`` is ``0x00`` for ``create`` and ``0x01 ‖ u16be(len(operation)) ‖ operation``
    otherwise (``refresh``). ``participants`` are ``(identifier, key_id)`` pairs in the
    request's order.
    """
    s = _text(suite, "ciphersuite")
    p = _text(policy, "policy")
    parts = [PARAMS_DOMAIN, *_operation_tag(operation), _u16(len(s)), s]
    parts += [_u16(min_signers), _u16(max_signers)]
    parts += [_u16(len(p)), p, _u16(len(participants))]
    for identifier, key_id in participants:
        if len(identifier) != IDENTIFIER_BYTES:
            raise ValueError("a participant identifier is 32 bytes")
        k = _text(key_id, "key_id")
        parts += [bytes(identifier), _u16(len(k)), k]
    return b"".join(parts)


def round1_payload(
    dkg_id: str,
    account_id: str,
    params_sha256: bytes,
    identifier: bytes,
    commitment: Sequence[bytes],
    proof_of_knowledge: bytes,
    encryption_key: bytes,
    operation: str = CREATE,
) -> bytes:
    """What a participant's long-term key signs in its round-1 package::

    "trio-sign/dkg-round1/v1" ‖ op ‖ u16be(len(dkg_id)) ‖ dkg_id ‖ u16be(len(account_id))
      ‖ account_id ‖ SHA-256(DKG parameters) ‖ identifier(32) ‖ u16be(t) ‖ t * element
      ‖ u16be(len(pok)) ‖ pok ‖ encryption_key(32)

    ``op`` as in :func:`dkg_params`; for a refresh ``t`` is ``min_signers - 1``.
    """
    d = _text(dkg_id, "dkg_id")
    a = _text(account_id, "account_id")
    if len(params_sha256) != 32 or len(identifier) != IDENTIFIER_BYTES:
        raise ValueError("the parameters' digest and the identifier are 32 bytes")
    if len(encryption_key) != X25519_BYTES:
        raise ValueError("an encryption key is 32 bytes")
    parts = [ROUND1_DOMAIN, *_operation_tag(operation), _u16(len(d)), d, _u16(len(a)), a]
    parts.append(bytes(params_sha256))
    parts += [bytes(identifier), _u16(len(commitment)), *(bytes(e) for e in commitment)]
    parts += [_u16(len(proof_of_knowledge)), bytes(proof_of_knowledge), bytes(encryption_key)]
    return b"".join(parts)


def repair_params(
    suite: str, helpers: Sequence[tuple[bytes, str]], participant: tuple[bytes, str]
) -> bytes:
    """The repair parameters an approval covers (its ``message``; docs/refresh-repair.md)::

        "trio-sign/repair-params/v1" ‖ 0x00 ‖ u16be(len(suite)) ‖ suite ‖ u16be(n)
          ‖ n * (identifier(32) ‖ u16be(len(key_id)) ‖ key_id)
          ‖ identifier(32) ‖ u16be(len(key_id)) ‖ key_id          (the participant repaired)

    ``helpers`` are ``(identifier, key_id)`` pairs in the request's (ascending) order.
    """
    s = _text(suite, "ciphersuite")
    parts = [REPAIR_PARAMS_DOMAIN, b"\x00", _u16(len(s)), s, _u16(len(helpers))]
    for identifier, key_id in [*helpers, participant]:
        if len(identifier) != IDENTIFIER_BYTES:
            raise ValueError("an identifier is 32 bytes")
        k = _text(key_id, "key_id")
        parts += [bytes(identifier), _u16(len(k)), k]
    return b"".join(parts)


def repair_key_payload(
    repair_id: str,
    account_id: str,
    params_sha256: bytes,
    identifier: bytes,
    encryption_key: bytes,
) -> bytes:
    """What a helper's or the participant's long-term key signs in its ``RepairKey``::

    "trio-sign/repair-key/v1" ‖ 0x00 ‖ u16be(len(repair_id)) ‖ repair_id
      ‖ u16be(len(account_id)) ‖ account_id ‖ SHA-256(repair parameters) ‖ identifier(32)
      ‖ encryption_key(32)
    """
    r = _text(repair_id, "repair_id")
    a = _text(account_id, "account_id")
    if len(params_sha256) != 32 or len(identifier) != IDENTIFIER_BYTES:
        raise ValueError("the parameters' digest and the identifier are 32 bytes")
    if len(encryption_key) != X25519_BYTES:
        raise ValueError("an encryption key is 32 bytes")
    parts = [REPAIR_KEY_DOMAIN, b"\x00", _u16(len(r)), r, _u16(len(a)), a, bytes(params_sha256)]
    parts += [bytes(identifier), bytes(encryption_key)]
    return b"".join(parts)


def _share_ad(dkg_id: str, sender: bytes, recipient: bytes) -> bytes:
    d = _text(dkg_id, "dkg_id")
    return _u16(len(d)) + d + bytes(sender) + bytes(recipient)


def share_key_into(
    out: bytearray,
    *,
    dkg_id: str,
    sender: bytes,
    recipient: bytes,
    own_secret: _sodium.Buffer,
    sender_public: bytes,
    recipient_public: bytes,
    peer_public: bytes,
    label: bytes = SHARE_INFO,
) -> None:
    """The key of the share from ``sender`` to ``recipient``, either side's::

        shared = X25519(own secret, peer public)            (all-zero output refused)
        key    = HKDF-SHA256(ikm = shared, salt = SHA-256(dkg_id),
                             info = label ‖ id_i ‖ id_j ‖ pk_i ‖ pk_j)

    ``i`` is the sender and ``j`` the recipient; ``label`` is ``"trio-sign/dkg-share/v1"``
    for DKG shares, :data:`REPAIR_DELTA_INFO` and :data:`REPAIR_SIGMA_INFO` for a repair
    (whose id stands in for ``dkg_id``). Error handling: ``FrostError`` for a small-order
    ``peer_public`` (``out`` is then zeroed)."""
    shared = bytearray(X25519_BYTES)
    try:
        _kdf.x25519_into(shared, own_secret, peer_public)
        _kdf.hkdf_sha256_into(
            out,
            shared,
            salt=hashlib.sha256(_text(dkg_id, "dkg_id")).digest(),
            info=label + bytes(sender) + bytes(recipient) + sender_public + recipient_public,
        )
    finally:
        _sodium.memzero(shared)


def encrypt_share(
    key: _sodium.Buffer, share: _sodium.Buffer, *, dkg_id: str, sender: bytes, recipient: bytes
) -> bytes:
    """``nonce (24, random) ‖ XChaCha20-Poly1305(key, nonce, share, ad = u16be(len(dkg_id)) ‖
    dkg_id ‖ id_i ‖ id_j)``."""
    nonce = bytearray(_stream.AEAD_NONCE_BYTES)
    _sodium.random_bytes(nonce)
    ad = _share_ad(dkg_id, sender, recipient)
    return bytes(nonce) + _stream.aead_encrypt(share, ad=ad, nonce=nonce, key=key)


def decrypt_share_into(
    out: bytearray,
    key: _sodium.Buffer,
    ciphertext: bytes,
    *,
    dkg_id: str,
    sender: bytes,
    recipient: bytes,
) -> bool:
    """Open a share made by :func:`encrypt_share` into ``out``; False (``out`` zeroed) when it
    fails authentication: another key, DKG, sender or recipient, or a changed byte."""
    n = _stream.AEAD_NONCE_BYTES
    if len(ciphertext) != n + len(out) + _stream.AEAD_ABYTES:
        _sodium.memzero(out)
        return False
    return _stream.aead_decrypt_into(
        out,
        ciphertext[n:],
        ad=_share_ad(dkg_id, sender, recipient),
        nonce=ciphertext[:n],
        key=key,
    )


def verify_ed25519(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 verification (libsodium) of ``signature`` over ``message``."""
    if len(public_key) != 32 or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(bytes(public_key)).verify(bytes(message), bytes(signature))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True


# -- what the registry is given --------------------------------------------------------------


class Signer(Protocol):
    """The identity key, as the DKG uses it (:class:`~trio_sign.enclave.IdentityKey`)."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


class DeltaWriter(Protocol):
    """Seals records into a delta, stores it through the parent and loads it (the other half
    of issue 16, ``trio_sign/enclave/_deltas.py``).

    :meth:`store` returns ``(sequence, head)`` once the parent reported ``delta_stored`` and
    the records are in the running store (signable); ``head`` is the new chain head in hex.
    It raises (any ``Exception``) when the delta was not stored; a raise means nothing was
    created. The records' signing shares are zeroed by the caller once it returns.
    """

    async def store(
        self, records: Sequence[ShareRecord], operation: str, dkg_id: str
    ) -> tuple[int, str]: ...


@dataclass(frozen=True, slots=True)
class CreatedAccount:
    """A loaded ``create`` delta that names a DKG (docs/key-lifecycle.md §6).

    ``account_id`` is None when the chain does not record which account the delta created;
    the registry then knows it only for the DKGs it finished itself since boot.
    """

    account_id: str | None
    delta_sequence: int
    deltas_head: str


#: ``dkg_id -> CreatedAccount | None``: the loaded delta whose header names this DKG, so a
#: retried round 3 is answered after the DKG's state is gone (a reboot, the TTL).
FindCreated = Callable[[str], CreatedAccount | None]


class _FindsDkg(Protocol):
    def find_dkg(self, dkg_id: str) -> tuple[int, str] | None: ...

    def dkg_accounts(self, dkg_id: str) -> tuple[str, ...]: ...


def deltas_finder(deltas: _FindsDkg) -> FindCreated:
    """:data:`FindCreated` over the node's :class:`~trio_sign.enclave._deltas.EnclaveDeltas`
    (``find_dkg``: the sequence and fingerprint of the delta a DKG made; ``dkg_accounts``: the
    accounts the chain records for it). A create delta holds one account, so a retried round 3
    after a reboot answers with it; ``account_id`` is None only if the chain names none or
    several (see :class:`CreatedAccount`)."""

    def find(dkg_id: str) -> CreatedAccount | None:
        found = deltas.find_dkg(dkg_id)
        if found is None:
            return None
        sequence, fingerprint = found
        accounts = deltas.dkg_accounts(dkg_id)
        account_id = accounts[0] if len(accounts) == 1 else None
        return CreatedAccount(account_id, sequence, fingerprint)

    return find


class Slots(Protocol):
    """The session pool's slots, which open DKGs share with signing sessions."""

    @property
    def accepting(self) -> bool: ...

    def take(self, owner: object) -> str | None:
        """Take a slot for ``owner``; None, or why not (RESOURCE_EXHAUSTED)."""
        ...

    def give_back(self, owner: object) -> None: ...


class PoolSlots:
    """:class:`Slots` over a :class:`~trio_sign.enclave.SessionPool`: a DKG holds one of its
    ``max_sessions`` slots while open (counted in ``sessions_open``, refused with
    RESOURCE_EXHAUSTED when none is free or memory is above the hard watermark, and awaited by
    a drain like a session)."""

    def __init__(self, pool: SessionPool) -> None:
        self._pool = pool

    @property
    def accepting(self) -> bool:
        return self._pool.accepting

    def take(self, owner: object) -> str | None:
        return self._pool.take_slot(owner, what="DKGs")

    def give_back(self, owner: object) -> None:
        self._pool.free_slot(owner)


# -- one DKG ---------------------------------------------------------------------------------


class DkgSession:
    """One DKG's state; secrets only in buffers that :meth:`zero` wipes. No secret in repr."""

    __slots__ = (
        "account_id",
        "answer",
        "deadline",
        "dkg_id",
        "expires_at_unix_ms",
        "group",
        "identifier",
        "keys",
        "max_signers",
        "min_signers",
        "old_verifying_share",
        "operation",
        "outcome",
        "package",
        "params_sha256",
        "participants",
        "policy",
        "r1_packages",
        "r1_secret",
        "r2_secret",
        "request_key",
        "round2_key",
        "round2_response",
        "state",
        "stored",
        "token",
        "x25519_public",
        "x25519_secret",
    )

    def __init__(
        self,
        *,
        dkg_id: str,
        account_id: str,
        group: Group,
        min_signers: int,
        max_signers: int,
        policy: str,
        participants: list[tuple[bytes, str]],
        identifier: bytes,
        params_sha256: bytes,
        request_key: bytes,
        deadline: float,
        expires_at_unix_ms: int,
        operation: str = CREATE,
        old_verifying_share: bytes = b"",
    ) -> None:
        self.dkg_id = dkg_id
        self.operation = operation
        # A refresh: the account's verifying share at round 1 (round 3 refuses another).
        self.old_verifying_share = old_verifying_share
        self.account_id = account_id
        self.group = group
        self.min_signers = min_signers
        self.max_signers = max_signers
        self.policy = policy
        self.participants = participants
        self.identifier = identifier
        self.params_sha256 = params_sha256
        self.request_key = request_key
        self.deadline = deadline
        self.expires_at_unix_ms = expires_at_unix_ms
        self.state = DkgState.OPEN
        self.token: object | None = None
        self.r1_secret: _dkg.Round1Secret | None = None
        self.r2_secret: _dkg.Round2Secret | None = None
        self.x25519_secret = bytearray(X25519_BYTES)
        self.x25519_public = b""
        self.keys: dict[bytes, bytes] = {}  # identifier -> X25519 public key (round 2 on)
        self.r1_packages: dict[bytes, _dkg.Round1Package] = {}
        self.package: pb.DkgRound1Package | None = None
        self.round2_key = b""
        self.round2_response: pb.DkgRound2Response | None = None
        self.answer: pb.DkgRound3Response | None = None
        self.outcome: PoolError | None = None  # why the store failed, for waiting retries
        self.stored = trio.Event()  # set when the store has an outcome

    def __repr__(self) -> str:
        return (
            f"<DkgSession {self.dkg_id!r} {'refresh ' if self.refresh else ''}"
            f"{self.state.value} account={self.account_id!r} "
            f"{self.group.name} {self.min_signers}-of-{self.max_signers}>"
        )

    @property
    def others(self) -> list[tuple[bytes, str]]:
        return [(i, k) for i, k in self.participants if i != self.identifier]

    @property
    def refresh(self) -> bool:
        return self.operation == REFRESH

    @property
    def commitment_length(self) -> int:
        """Elements in a round-1 package: ``min_signers``, one fewer for a refresh (ZF leaves
        the identity out)."""
        return self.min_signers - 1 if self.refresh else self.min_signers

    def zero(self) -> None:
        """Zero every secret this DKG holds (idempotent)."""
        if self.r1_secret is not None:
            self.r1_secret.zero()
        if self.r2_secret is not None:
            self.r2_secret.zero()
        _sodium.memzero(self.x25519_secret)


class RepairSession:
    """One repair the enclave helps with; secrets (its X25519 key, the delta it keeps for
    itself) only in buffers that :meth:`zero` wipes. No secret in repr.

    The attributes the registry's shared machinery reads (``dkg_id``, ``state``,
    ``deadline``, ``token``, ``account_id``, ``zero``) have the meanings of
    :class:`DkgSession`'s; ``dkg_id`` is the repair id.
    """

    __slots__ = (
        "account_id",
        "deadline",
        "dkg_id",
        "expires_at_unix_ms",
        "group",
        "helpers",
        "identifier",
        "keys",
        "old_verifying_share",
        "operation",
        "own_delta",
        "participant",
        "request_key",
        "response",
        "state",
        "step2_key",
        "step2_response",
        "token",
        "x25519_public",
        "x25519_secret",
    )

    def __init__(
        self,
        *,
        repair_id: str,
        account_id: str,
        group: Group,
        identifier: bytes,
        helpers: list[tuple[bytes, str]],
        participant: tuple[bytes, str],
        keys: dict[bytes, bytes],
        old_verifying_share: bytes,
        request_key: bytes,
        deadline: float,
        expires_at_unix_ms: int,
    ) -> None:
        self.dkg_id = repair_id
        self.operation = "repair"
        self.account_id = account_id
        self.group = group
        self.identifier = identifier
        self.helpers = helpers
        self.participant = participant
        self.keys = keys  # identifier -> X25519 public key (the others, the participant)
        self.old_verifying_share = old_verifying_share
        self.request_key = request_key
        self.deadline = deadline
        self.expires_at_unix_ms = expires_at_unix_ms
        self.state = DkgState.OPEN
        self.token: object | None = None
        self.x25519_secret = bytearray(X25519_BYTES)
        self.x25519_public = b""
        self.own_delta = group.new_scalar()
        self.response: pb.RepairStep1Response | None = None
        self.step2_key = b""
        self.step2_response: pb.RepairStep2Response | None = None

    def __repr__(self) -> str:
        return (
            f"<RepairSession {self.dkg_id!r} {self.state.value} account={self.account_id!r} "
            f"{self.group.name} helpers={len(self.helpers)}>"
        )

    @property
    def others(self) -> list[tuple[bytes, str]]:
        """The other helpers."""
        return [(i, k) for i, k in self.helpers if i != self.identifier]

    def zero(self) -> None:
        """Zero every secret this repair holds (idempotent)."""
        _sodium.memzero(self.own_delta)
        _sodium.memzero(self.x25519_secret)


_Session = DkgSession | RepairSession
_S = TypeVar("_S", DkgSession, RepairSession)
_T = TypeVar("_T")


# -- the registry ----------------------------------------------------------------------------


def _refuse(kind: PoolErrorKind, message: str) -> PoolError:
    return PoolError(kind, message)


def _invalid(message: str) -> PoolError:
    return PoolError(PoolErrorKind.INVALID_ARGUMENT, message)


def _check_text(value: str, name: str, limit: int) -> None:
    # The character count first: longer in characters is longer in bytes, refused unencoded.
    if not value or len(value) > limit or len(value.encode("utf-8")) > limit:
        raise _invalid(f"{name} must be 1..{limit} bytes")


def _each_once(
    group: Group,
    entries: Sequence[_T],
    ident_of: Callable[[_T], bytes],
    allowed: Container[bytes],
    *,
    entry: str,
    field: str,
    among: str,
    plural: str,
) -> Iterator[tuple[_T, bytes, str]]:
    """Each entry of a request with its identifier and description, once that identifier is
    known to be one of ``allowed`` (else ``"<entry> <index>: <field> ... is not <among>"``) and not
    one seen before (else ``"participant <who>: two <plural>"``)."""
    seen: set[bytes] = set()
    for index, item in enumerate(entries):
        ident = ident_of(item)
        who = group.describe_identifier(ident)
        if ident not in allowed:
            raise _invalid(f"{entry} {index}: {field} {who} is not {among}")
        if ident in seen:
            raise _invalid(f"participant {who}: two {plural}")
        seen.add(ident)
        yield item, ident, who


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


class DkgRegistry:
    """The open DKGs of this enclave, bounded in number and lifetime.

    Args:
        settings: ``[dkg]`` of the measured configuration (pinned participant keys, ``ttl_s``,
            ``max_open``).
        identity: the delta identity key; it signs the enclave's round-1 packages.
        writer: stores the new account's delta (:class:`DeltaWriter`).
        authorizer: decides the approvals under the ``create`` policy; its policies also name
            the policies a new account may choose.
        lookup: ``account_id -> AccountShare | None`` (the ShareStore's ``get``).
        slots: the session pool's slots (:class:`PoolSlots`).
        find_created: the stored delta naming a DKG (:data:`FindCreated`); default: none.

    Run :meth:`run` in the service's nursery (``nursery.start``): it expires DKGs at their
    deadline and hosts the stores.

    Attributes:
        sessions: the DKGs known now (holding or done), by dkg_id.
    """

    def __init__(
        self,
        *,
        settings: DkgSettings,
        identity: Signer,
        writer: DeltaWriter,
        authorizer: Authorizer,
        lookup: Callable[[str], AccountShare | None],
        slots: Slots,
        find_created: FindCreated = lambda _dkg_id: None,
    ) -> None:
        self.settings = settings
        self._identity = identity
        self._writer = writer
        self._authorizer = authorizer
        self._lookup = lookup
        self._slots = slots
        self._find_created = find_created
        self.sessions: dict[str, DkgSession] = {}
        #: The repairs this enclave helps with, by repair_id (docs/refresh-repair.md).
        self.repairs: dict[str, RepairSession] = {}
        # dkg_id -> account_id of every DKG finished since boot (public; one entry per account
        # created, as the store grows by one), for answers from a delta that names no account.
        self._created: dict[str, str] = {}
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()

    @property
    def open_count(self) -> int:
        """DKGs and repairs holding secrets and a slot (``max_open`` bounds them together)."""
        return sum(1 for s in self._all() if s.state in _HOLDING)

    # -- state (shared by DKGs and repairs) ------------------------------------------------

    def _all(self) -> list[_Session]:
        return [*self.sessions.values(), *self.repairs.values()]

    def _table(self, session: _Session) -> dict[str, Any]:
        return self.repairs if isinstance(session, RepairSession) else self.sessions

    def _move(self, session: _Session, new: DkgState) -> None:
        table = REPAIR_TRANSITIONS if isinstance(session, RepairSession) else TRANSITIONS
        if new not in table[session.state]:
            raise InternalError(f"DKG state {session.state.value} cannot become {new.value}")
        session.state = new

    def _end(self, session: _Session, state: DkgState) -> None:
        """Failed or expired: zero, free the slot, forget."""
        self._move(session, state)
        session.zero()
        self._give_back(session)
        table = self._table(session)
        if table.get(session.dkg_id) is session:
            del table[session.dkg_id]

    def _give_back(self, session: _Session) -> None:
        if session.token is not None:
            self._slots.give_back(session.token)
            session.token = None

    def _fail(self, session: _Session, error: PoolError) -> PoolError:
        log.info(
            "DKG failed",
            extra={
                "dkg_id": session.dkg_id,
                "operation": session.operation,
                "state": session.state.value,
                "kind": error.kind.value,
            },
        )
        self._end(session, DkgState.FAILED)
        return error

    def _live(self, table: dict[str, _S], session_id: str) -> _S | None:
        """The DKG (or repair) of ``table`` with this id, unless it is past its deadline."""
        session = table.get(session_id)
        if session is not None and session.deadline <= trio.current_time():
            self.expire(trio.current_time())
            session = table.get(session_id)
        return session

    def _begin(self, session: _S, table: dict[str, _S], first: Callable[[], _T]) -> _T:
        """Take a slot for a new DKG (or repair) and run its first step; if that raises, the
        session is zeroed and its slot given back, else it is kept (``round1_sent``)."""
        token = object()
        refused = self._slots.take(token)
        if refused is not None:
            raise _refuse(PoolErrorKind.RESOURCE_EXHAUSTED, refused)
        session.token = token
        try:
            answer = first()
        except BaseException:
            session.zero()
            self._give_back(session)
            raise
        table[session.dkg_id] = session
        self._move(session, DkgState.ROUND1_SENT)
        self._wakeup.set()
        return answer

    # -- round 1 -------------------------------------------------------------------------

    def round1(self, request: pb.DkgRound1Request) -> pb.DkgRound1Response:
        """Open a DKG (or answer a retry of the one with these parameters)."""
        _check_text(request.dkg_id, "dkg_id", MAX_DKG_ID_BYTES)
        _check_text(request.account_id, "account_id", MAX_ACCOUNT_ID_BYTES)
        if request.ciphersuite not in DKG_SUITES:
            raise _invalid(
                f"ciphersuite {request.ciphersuite[:64]!r} is not one of {', '.join(DKG_SUITES)}"
            )
        group = group_for(request.ciphersuite)
        t, n = request.min_signers, request.max_signers
        if not 2 <= t <= n <= MAX_DKG_SIGNERS:
            raise _invalid(
                f"need 2 <= min_signers <= max_signers <= {MAX_DKG_SIGNERS}, got min_signers "
                f"{t}, max_signers {n}"
            )
        if len(request.participants) != n:
            raise _invalid(
                f"participants must list all {n} participants (max_signers), got "
                f"{len(request.participants)}"
            )
        if len(request.approvals) > MAX_DKG_APPROVALS:
            raise _invalid(f"at most {MAX_DKG_APPROVALS} approvals")
        operation = request.operation or CREATE
        if operation not in DKG_OPERATIONS:
            raise _invalid(
                f"operation {operation[:64]!r} is not one of {', '.join(DKG_OPERATIONS)} "
                "(empty means create)"
            )
        old_verifying_share = b""
        if operation == REFRESH:
            account = self._refreshable(request)
            policy = account.policy
            old_verifying_share = account.verifying_share
        else:
            policy = request.policy or DEFAULT_POLICY
            self._check_policy(policy)
        participants = self._participants(group, request)
        params = dkg_params(group.name, t, n, policy, participants, operation)
        request_key = _digest(
            request.dkg_id.encode(), request.account_id.encode(), bytes(request.identifier), params
        )
        existing = self._live(self.sessions, request.dkg_id)
        if existing is not None:
            if existing.request_key != request_key or existing.package is None:
                raise _refuse(
                    PoolErrorKind.ALREADY_EXISTS,
                    f"dkg_id {request.dkg_id!r} is in use with other parameters",
                )
            return pb.DkgRound1Response(
                package=existing.package, expires_at_unix_ms=existing.expires_at_unix_ms
            )
        created = self._find_created(request.dkg_id)
        if created is not None:
            raise _refuse(
                PoolErrorKind.ALREADY_EXISTS,
                f"dkg_id {request.dkg_id!r} already created account {created.account_id!r} "
                "(or stored its refresh)",
            )
        if operation == REFRESH:
            self._check_not_busy(request.account_id)
        else:
            self._check_new_account(request.account_id)
        self._check_capacity()
        self._decide(
            request.account_id,
            request.dkg_id,
            params,
            request.approvals,
            REFRESH_POLICY if operation == REFRESH else CREATE_POLICY,
        )
        return self._open(
            request,
            group,
            policy,
            participants,
            params,
            request_key,
            operation=operation,
            old_verifying_share=old_verifying_share,
        )

    def _refreshable(self, request: pb.DkgRound1Request) -> AccountShare:
        """A refresh's account: it exists and keeps its suite, thresholds, identifier (this
        enclave's) and policy; INVALID_ARGUMENT naming what differs."""
        account = self._lookup(request.account_id)
        if account is None:
            raise _refuse(PoolErrorKind.NOT_FOUND, f"account {request.account_id!r} does not exist")
        differs = []
        if account.ciphersuite != request.ciphersuite:
            differs.append(f"ciphersuite (the account's is {account.ciphersuite})")
        if (account.min_signers, account.max_signers) != (
            request.min_signers,
            request.max_signers,
        ):
            differs.append(
                f"min_signers/max_signers (the account's are {account.min_signers}/"
                f"{account.max_signers})"
            )
        if bytes(account.identifier) != bytes(request.identifier):
            differs.append("identifier (not the account's share of this enclave)")
        if request.policy and request.policy != account.policy:
            differs.append(f"policy (the account's is {account.policy!r}; leave it empty)")
        if differs:
            raise _invalid(
                f"refresh of account {request.account_id!r}: {'; '.join(differs)} must match "
                "the account"
            )
        return account

    def _check_not_busy(self, account_id: str) -> None:
        """One refresh or repair of an account at a time: a repair from a mix of shares from
        before and after a refresh would restore a wrong share."""
        for other in self._all():
            if other.account_id == account_id and other.state in _HOLDING:
                raise _refuse(
                    PoolErrorKind.ALREADY_EXISTS,
                    f"account {account_id!r} is in DKG {other.dkg_id!r} ({other.operation})",
                )

    def _participants(self, group: Group, request: pb.DkgRound1Request) -> list[tuple[bytes, str]]:
        """The participant list, checked: identifiers valid and ascending, key ids pinned (the
        enclave's own entry is ``"enclave"``), one key per participant."""
        own = bytes(request.identifier)
        if len(own) != IDENTIFIER_BYTES:
            raise _invalid(f"identifier must be {IDENTIFIER_BYTES} bytes, got {len(own)}")
        # Every length first (the count is checked already): nothing is decoded for a
        # request that is refused on sizes.
        for index, p in enumerate(request.participants):
            if len(p.identifier) != IDENTIFIER_BYTES:
                raise _invalid(f"participant {index}: identifier must be {IDENTIFIER_BYTES} bytes")
            key_id = p.key_id
            if len(key_id) > MAX_KEY_ID_BYTES or len(key_id.encode("utf-8")) > MAX_KEY_ID_BYTES:
                raise _invalid(f"participant {index}: key_id longer than {MAX_KEY_ID_BYTES} bytes")
        out: list[tuple[bytes, str]] = []
        seen_keys: set[str] = set()
        previous = -1
        for index, p in enumerate(request.participants):
            ident = bytes(p.identifier)
            try:
                value = group.identifier_from_bytes(ident)
            except FrostError as exc:
                raise _invalid(f"participant {index}: {exc}") from None
            who = group.describe(value)
            if value <= previous:
                raise _invalid(
                    f"participants must be ascending by identifier without repeats "
                    f"(participant {who} at position {index})"
                )
            previous = value
            key_id = p.key_id
            if ident == own:
                if key_id != ENCLAVE_KEY_ID:
                    raise _invalid(
                        f"participant {who} is this enclave; its key_id must be {ENCLAVE_KEY_ID!r}"
                    )
            elif key_id == ENCLAVE_KEY_ID:
                raise _invalid(
                    f"participant {who} has key_id {ENCLAVE_KEY_ID!r}, but identifier (this "
                    f"enclave's) is {group.describe_identifier(own)}"
                )
            elif key_id not in self.settings.participants:
                raise _invalid(
                    f"participant {who}: key_id {key_id!r} is not pinned in [dkg] participants"
                )
            if key_id in seen_keys:
                raise _invalid(f"participant {who}: key_id {key_id!r} is used twice")
            seen_keys.add(key_id)
            out.append((ident, key_id))
        if ENCLAVE_KEY_ID not in seen_keys:
            raise _invalid("identifier (this enclave's) is not in the participant list")
        return out

    def _check_policy(self, policy: str) -> None:
        known = self._authorizer.policies
        if policy in RESERVED_POLICIES or policy not in known.policies:
            raise _invalid(
                f"policy {policy[:64]!r} is not a signing policy of this enclave "
                f"(known: {', '.join(sorted(set(known.policies) - RESERVED_POLICIES))})"
            )

    def _check_new_account(self, account_id: str) -> None:
        if self._lookup(account_id) is not None:
            raise _refuse(PoolErrorKind.ALREADY_EXISTS, f"account {account_id!r} exists")
        for other in self.sessions.values():
            if other.account_id == account_id:
                raise _refuse(
                    PoolErrorKind.ALREADY_EXISTS,
                    f"account {account_id!r} is being created by DKG {other.dkg_id!r}",
                )

    def _check_capacity(self) -> None:
        if self._nursery is None:
            raise _refuse(PoolErrorKind.UNAVAILABLE, "not ready: the DKG service is not running")
        if not self._slots.accepting:
            raise _refuse(PoolErrorKind.UNAVAILABLE, "draining: not taking new DKGs")
        if self.open_count >= self.settings.max_open:
            raise _refuse(
                PoolErrorKind.RESOURCE_EXHAUSTED,
                f"{self.settings.max_open} DKGs are open ([dkg] max_open); retry later",
            )

    def _decide(
        self,
        account_id: str,
        session_id: str,
        params: bytes,
        approvals: Sequence[pb.Approval],
        policy: str,
    ) -> None:
        decision = self._authorizer.decide(
            account_id=account_id,
            policy=policy,
            session_id=session_id,
            message=params,
            approvals=approvals,
            now=trio.current_time(),
        )
        audit_log.info(
            f"{policy} authorization",
            extra={
                "audit": "dkg",
                "operation": policy,
                "account_id": account_id,
                "dkg_id": session_id,
                "params_sha256": decision.message_sha256,
                "approvers": ",".join(decision.approvers),
                "policy": decision.policy,
                "outcome": "allowed" if decision.allowed else "refused",
                "reason": decision.reason,
            },
        )
        if not decision.allowed:
            raise ApprovalDenied(decision)

    def _open(
        self,
        request: pb.DkgRound1Request,
        group: Group,
        policy: str,
        participants: list[tuple[bytes, str]],
        params: bytes,
        request_key: bytes,
        *,
        operation: str,
        old_verifying_share: bytes,
    ) -> pb.DkgRound1Response:
        ttl = self.settings.ttl_s
        session = DkgSession(
            dkg_id=request.dkg_id,
            account_id=request.account_id,
            group=group,
            min_signers=request.min_signers,
            max_signers=request.max_signers,
            policy=policy,
            participants=participants,
            identifier=bytes(request.identifier),
            params_sha256=hashlib.sha256(params).digest(),
            request_key=request_key,
            deadline=trio.current_time() + ttl,
            expires_at_unix_ms=int((time.time() + ttl) * 1000),
            operation=operation,
            old_verifying_share=old_verifying_share,
        )
        session.package = self._begin(session, self.sessions, lambda: self._part1(session))
        log.info(
            "DKG opened",
            extra={
                "dkg_id": session.dkg_id,
                "operation": session.operation,
                "account_id": session.account_id,
                "ciphersuite": group.name,
                "min_signers": session.min_signers,
                "max_signers": session.max_signers,
            },
        )
        return pb.DkgRound1Response(
            package=session.package, expires_at_unix_ms=session.expires_at_unix_ms
        )

    def _part1(self, session: DkgSession) -> pb.DkgRound1Package:
        """Draw the polynomial (``part1``) and the X25519 key pair into ``session``; the
        package, signed by the identity key over :func:`round1_payload`."""
        part1 = _refresh.refresh_part1 if session.refresh else _dkg.part1
        secret, package = part1(
            session.identifier, session.max_signers, session.min_signers, suite=session.group.name
        )
        session.r1_secret = secret
        session.x25519_public = _kdf.x25519_keypair(session.x25519_secret)
        payload = round1_payload(
            session.dkg_id,
            session.account_id,
            session.params_sha256,
            session.identifier,
            package.commitment,
            package.proof_of_knowledge,
            session.x25519_public,
            session.operation,
        )
        return pb.DkgRound1Package(
            identifier=session.identifier,
            commitment=list(package.commitment),
            proof_of_knowledge=package.proof_of_knowledge,
            encryption_key=session.x25519_public,
            key_id=ENCLAVE_KEY_ID,
            signature=self._identity.sign(payload),
        )

    # -- round 2 -------------------------------------------------------------------------

    def round2(self, request: pb.DkgRound2Request) -> pb.DkgRound2Response:
        """Check every other participant's signed package, then answer our encrypted shares."""
        session = self._session(request.dkg_id)
        # The count bounds the work: nothing is hashed or checked for a request with the
        # wrong number of packages (it cannot be a retry of round 2, nor a valid round 2).
        counted = len(request.packages) == len(session.others)
        if session.state in (DkgState.ROUND2_SENT, DkgState.STORING, DkgState.DONE):
            if (
                counted
                and session.round2_response is not None
                and session.round2_key == _retry_key(request.packages)
            ):
                return session.round2_response
            raise _refuse(
                PoolErrorKind.FAILED_PRECONDITION,
                f"DKG {session.dkg_id!r} already ran round 2 with other packages",
            )
        if session.state is not DkgState.ROUND1_SENT:  # pragma: no cover - no other live state
            raise _refuse(PoolErrorKind.FAILED_PRECONDITION, "round 1 has not run")
        group = session.group
        received = self._check_packages(session, request.packages)
        key = _retry_key(request.packages)
        # The share keys first, from the packages' X25519 keys: a small-order key fails here,
        # before the round-1 secret is consumed. Then part2, then encrypt and zero.
        keys: dict[bytes, bytearray] = {}
        shares: dict[bytes, _dkg.Round2Package] = {}
        try:
            for ident, _key_id in session.others:
                out = keys[ident] = bytearray(_stream.KEY_BYTES)
                try:
                    share_key_into(
                        out,
                        dkg_id=session.dkg_id,
                        sender=session.identifier,
                        recipient=ident,
                        own_secret=session.x25519_secret,
                        sender_public=session.x25519_public,
                        recipient_public=received[ident][1],
                        peer_public=received[ident][1],
                    )
                except FrostError as exc:
                    who = group.describe_identifier(ident)
                    raise self._fail(
                        session, _invalid(f"participant {who}: encryption_key refused: {exc}")
                    ) from None
            assert session.r1_secret is not None
            r1 = {ident: package for ident, (package, _pk) in received.items()}
            part2 = _refresh.refresh_part2 if session.refresh else _dkg.part2
            try:
                r2_secret, shares = part2(session.r1_secret, r1)
            except _dkg.DkgError as exc:
                raise self._fail(session, _invalid(_culprit_message(group, exc))) from None
            response = pb.DkgRound2Response(
                shares=[
                    pb.DkgEncryptedShare(
                        sender=session.identifier,
                        recipient=ident,
                        ciphertext=encrypt_share(
                            keys[ident],
                            shares[ident].signing_share,
                            dkg_id=session.dkg_id,
                            sender=session.identifier,
                            recipient=ident,
                        ),
                    )
                    for ident, _key_id in session.others
                ]
            )
        except BaseException:
            secret = session.r1_secret
            if session.state is DkgState.ROUND1_SENT and secret is not None and secret.used:
                self._end(session, DkgState.FAILED)  # part2 ran: this DKG cannot go on
            raise
        finally:
            for buf in keys.values():
                _sodium.memzero(buf)
            for share in shares.values():
                share.zero()
        session.r2_secret = r2_secret
        session.r1_packages = r1
        session.keys = {ident: pk for ident, (_package, pk) in received.items()}
        session.round2_key = key
        session.round2_response = response
        self._move(session, DkgState.ROUND2_SENT)
        return response

    def _check_packages(
        self, session: DkgSession, packages: Sequence[pb.DkgRound1Package]
    ) -> dict[bytes, tuple[_dkg.Round1Package, bytes]]:
        """The count, then every package's identifier, sizes and key id, then (only once all
        of those hold) each package's signature under the pinned key. Nothing is consumed: a
        refusal leaves the DKG as it was."""
        group = session.group
        expected = session.others
        if len(packages) != len(expected):
            raise _invalid(
                f"packages must hold the {len(expected)} other participants' round-1 packages, "
                f"got {len(packages)}"
            )
        key_ids = dict(expected)
        pok_bytes = 64 if group.taproot else group.element_size + group.scalar_size
        for p, ident, who in _each_once(
            group,
            packages,
            lambda p: bytes(p.identifier),
            key_ids,
            entry="package",
            field="identifier",
            among="another participant of this DKG",
            plural="round-1 packages",
        ):
            if (
                len(p.commitment) != session.commitment_length
                or any(len(e) != group.element_size for e in p.commitment)
                or len(p.proof_of_knowledge) != pok_bytes
                or len(p.encryption_key) != X25519_BYTES
                or len(p.signature) != SIGNATURE_BYTES
            ):
                raise _invalid(
                    f"participant {who}: round-1 package must have {session.commitment_length} "
                    f"commitment elements of {group.element_size} bytes, a {pok_bytes}-byte "
                    f"proof, a {X25519_BYTES}-byte encryption_key and a {SIGNATURE_BYTES}-byte "
                    "signature"
                )
            if p.key_id != key_ids[ident]:
                raise _invalid(
                    f"participant {who}: package signed as key_id {p.key_id[:64]!r}, but the "
                    f"participant list names {key_ids[ident]!r}"
                )
        out: dict[bytes, tuple[_dkg.Round1Package, bytes]] = {}
        for p in packages:
            ident = bytes(p.identifier)
            who = group.describe_identifier(ident)
            payload = round1_payload(
                session.dkg_id,
                session.account_id,
                session.params_sha256,
                ident,
                list(p.commitment),
                p.proof_of_knowledge,
                p.encryption_key,
                session.operation,
            )
            if not verify_ed25519(self.settings.participants[p.key_id], payload, p.signature):
                raise _invalid(
                    f"participant {who}: round-1 signature does not verify under key_id "
                    f"{p.key_id!r} for this DKG (a substituted package, commitment or "
                    "encryption key)"
                )
            out[ident] = (
                _dkg.Round1Package(tuple(bytes(e) for e in p.commitment), p.proof_of_knowledge),
                bytes(p.encryption_key),
            )
        return out

    # -- round 3 -------------------------------------------------------------------------

    async def round3(self, request: pb.DkgRound3Request) -> pb.DkgRound3Response:
        """Decrypt and check our shares, store the account's delta, answer once it is durable.

        Cancellation: the store runs in :meth:`run`'s nursery; a cancelled caller leaves it
        running, and a retry waits for the same outcome.
        """
        _check_text(request.dkg_id, "dkg_id", MAX_DKG_ID_BYTES)
        session = self._live(self.sessions, request.dkg_id)
        if session is None:
            return self._from_delta(request.dkg_id)
        if session.state in (DkgState.STORING, DkgState.DONE):
            return await self._outcome(session)
        if session.state is not DkgState.ROUND2_SENT:
            raise _refuse(
                PoolErrorKind.FAILED_PRECONDITION,
                f"DKG {session.dkg_id!r} has not run round 2",
            )
        received = self._decrypt(session, request.shares)
        try:
            if session.refresh:
                key, public = self._refreshed(session, received)
            else:
                if self._lookup(session.account_id) is not None:
                    raise self._fail(
                        session,
                        _refuse(
                            PoolErrorKind.ALREADY_EXISTS, f"account {session.account_id!r} exists"
                        ),
                    )
                assert session.r2_secret is not None
                try:
                    key, public = _dkg.part3(session.r2_secret, session.r1_packages, received)
                except _dkg.DkgError as exc:
                    raise self._fail(
                        session, _invalid(_culprit_message(session.group, exc))
                    ) from None
        finally:
            for package in received.values():
                package.zero()
        self._move(session, DkgState.STORING)
        _sodium.memzero(session.x25519_secret)
        if self._nursery is None:  # pragma: no cover - round 1 needs it running
            key.zero()
            raise self._fail(session, _refuse(PoolErrorKind.UNAVAILABLE, "not running"))
        self._nursery.start_soon(self._store, session, key, public)
        return await self._outcome(session)

    def _refreshed(
        self, session: DkgSession, received: dict[bytes, _dkg.Round2Package]
    ) -> tuple[_dkg.KeyPackage, _dkg.PublicKeyPackage | None]:
        """A refresh's round 3: the account's current share plus the zero-secret shares. The
        account must be as it was at round 1 and the group key come out unchanged."""
        account = self._lookup(session.account_id)
        if account is None or account.verifying_share != session.old_verifying_share:
            raise self._fail(
                session,
                _refuse(
                    PoolErrorKind.FAILED_PRECONDITION,
                    f"account {session.account_id!r} changed since round 1 (another refresh or "
                    "repair delta loaded); start a new refresh",
                ),
            )
        assert session.r2_secret is not None
        try:
            key, public = _refresh.refresh_part3(
                session.r2_secret,
                session.r1_packages,
                received,
                signing_share=account.signing_share,
                verifying_share=account.verifying_share,
                group_public_key=account.group_public_key,
            )
        except _dkg.DkgError as exc:
            raise self._fail(session, _invalid(_culprit_message(session.group, exc))) from None
        if key.verifying_key != account.group_public_key or key.verifying_share == (
            account.verifying_share
        ):
            key.zero()
            raise self._fail(
                session,
                _refuse(
                    PoolErrorKind.FAILED_PRECONDITION,
                    "the refresh would change the group key or keep the share; nothing stored",
                ),
            )
        return key, public

    def _decrypt(
        self,
        session: _Session,
        shares: Sequence[pb.DkgEncryptedShare],
        label: bytes = SHARE_INFO,
    ) -> dict[bytes, _dkg.Round2Package]:
        """Every share (a repair: every delta) addressed to us, opened; a refusal zeroes what
        was opened and leaves the DKG (the repair) as it was."""
        group = session.group
        others = dict(session.others)
        if len(shares) != len(others):
            raise _invalid(
                f"shares must hold the {len(others)} shares addressed to this enclave, got "
                f"{len(shares)}"
            )
        # Every share's sender, recipient and size before any key is derived.
        for s, _sender, who in _each_once(
            group,
            shares,
            lambda s: bytes(s.sender),
            others,
            entry="share",
            field="sender",
            among="another participant of this DKG",
            plural="shares",
        ):
            if bytes(s.recipient) != session.identifier:
                raise _invalid(
                    f"participant {who}: share addressed to "
                    f"{group.describe_identifier(bytes(s.recipient))}, not to this enclave"
                )
            if len(s.ciphertext) != CIPHERTEXT_BYTES:
                raise _invalid(
                    f"participant {who}: ciphertext must be {CIPHERTEXT_BYTES} bytes, got "
                    f"{len(s.ciphertext)}"
                )
        opened: dict[bytes, _dkg.Round2Package] = {}
        key = bytearray(_stream.KEY_BYTES)
        try:
            for s in shares:
                sender = bytes(s.sender)
                who = group.describe_identifier(sender)
                share_key_into(
                    key,
                    dkg_id=session.dkg_id,
                    sender=sender,
                    recipient=session.identifier,
                    own_secret=session.x25519_secret,
                    sender_public=session.keys[sender],
                    recipient_public=session.x25519_public,
                    peer_public=session.keys[sender],
                    label=label,
                )
                plain = bytearray(SCALAR_BYTES)
                if not decrypt_share_into(
                    plain,
                    key,
                    bytes(s.ciphertext),
                    dkg_id=session.dkg_id,
                    sender=sender,
                    recipient=session.identifier,
                ):
                    raise _invalid(
                        f"participant {who}: share fails authentication (not made by it for "
                        "this enclave in this DKG, or changed)"
                    )
                opened[sender] = _dkg.Round2Package(plain)
        except BaseException:
            for package in opened.values():
                package.zero()
            raise
        finally:
            _sodium.memzero(key)
        return opened

    async def _store(
        self, session: DkgSession, key: _dkg.KeyPackage, public: _dkg.PublicKeyPackage | None
    ) -> None:
        """Seal and store the account's delta (``create`` or ``refresh``); the session ends
        done or failed. A refresh's old share is replaced (and zeroed) by the writer, once the
        delta is durable; until then, and whatever fails, the old share signs as before."""
        record = ShareRecord(
            session.account_id,
            key.identifier,
            key.signing_share,
            key.verifying_share,
            key.verifying_key,
            session.min_signers,
            session.max_signers,
            policy=session.policy,
            ciphersuite=session.group.name,
        )
        try:
            sequence, head = await self._writer.store([record], session.operation, session.dkg_id)
        except Exception as exc:  # the writer's: nothing was stored
            log.warning(
                "DKG delta not stored",
                extra={"dkg_id": session.dkg_id, "error": type(exc).__name__},
            )
            session.outcome = _refuse(
                PoolErrorKind.UNAVAILABLE,
                f"the delta could not be stored ({type(exc).__name__}: {str(exc)[:200]}); "
                + ("the account keeps its old share" if session.refresh else "nothing was created"),
            )
            self._end(session, DkgState.FAILED)
            return
        except BaseException:  # cancelled (shutdown): the outcome is unknown here
            session.outcome = _refuse(
                PoolErrorKind.UNAVAILABLE, "shutting down while storing the delta; retry"
            )
            self._end(session, DkgState.FAILED)
            raise
        finally:
            key.zero()
            record.zero()
            session.stored.set()
            self._wakeup.set()  # its deadline counts again (done: forget it then)
        session.answer = pb.DkgRound3Response(
            account_id=session.account_id,
            ciphersuite=session.group.name,
            group_public_key=key.verifying_key,
            identifier=key.identifier,
            verifying_share=key.verifying_share,
            verifying_shares=[]
            if public is None
            else [
                pb.DkgVerifyingShare(identifier=ident, verifying_share=share)
                for ident, share in sorted(
                    public.verifying_shares.items(),
                    key=lambda item: session.group.identifier_from_bytes(item[0]),
                )
            ],
            delta_sequence=sequence,
            deltas_head=head,
        )
        self._move(session, DkgState.DONE)
        self._created[session.dkg_id] = session.account_id
        session.zero()
        if session.token is not None:
            self._slots.give_back(session.token)
            session.token = None
        self._forget_oldest_done()
        log.info(
            "DKG refreshed account" if session.refresh else "DKG created account",
            extra={
                "dkg_id": session.dkg_id,
                "account_id": session.account_id,
                "delta_sequence": sequence,
            },
        )

    def _forget_oldest_done(self, table: Mapping[str, _Session] | None = None) -> None:
        """Keep at most ``max_open`` finished DKGs' (or repairs') answers (public data, or
        ciphertexts); older DKGs are answered from their stored delta instead
        (:data:`FindCreated`)."""
        sessions = self.sessions if table is None else table
        done = [s for s in sessions.values() if s.state is DkgState.DONE]
        for session in done[: max(0, len(done) - self.settings.max_open)]:
            self._end(session, DkgState.EXPIRED)

    async def _outcome(self, session: DkgSession) -> pb.DkgRound3Response:
        await session.stored.wait()
        if session.answer is not None:
            return session.answer
        assert session.outcome is not None
        raise session.outcome

    def _from_delta(self, dkg_id: str) -> pb.DkgRound3Response:
        """A retried round 3 after the DKG is gone: answered from the delta that names it."""
        created = self._find_created(dkg_id)
        if created is None:
            raise _refuse(
                PoolErrorKind.NOT_FOUND,
                f"unknown or expired dkg_id {dkg_id!r}; no stored delta names it, so it created "
                "no account",
            )
        account_id = created.account_id or self._created.get(dkg_id)
        if account_id is None:
            raise _refuse(
                PoolErrorKind.UNAVAILABLE,
                f"dkg_id {dkg_id!r} created the account in delta {created.delta_sequence}, but "
                "this enclave's delta chain does not record which account; ask GetAccount",
            )
        account = self._lookup(account_id)
        if account is None:  # pragma: no cover - a loaded delta's account is in the store
            raise _refuse(
                PoolErrorKind.UNAVAILABLE,
                f"the delta of dkg_id {dkg_id!r} is not loaded yet; retry",
            )
        return pb.DkgRound3Response(
            account_id=account.account_id,
            ciphersuite=account.ciphersuite,
            group_public_key=account.group_public_key,
            identifier=account.identifier,
            verifying_share=account.verifying_share,
            delta_sequence=created.delta_sequence,
            deltas_head=created.deltas_head,
        )

    def _session(self, dkg_id: str) -> DkgSession:
        _check_text(dkg_id, "dkg_id", MAX_DKG_ID_BYTES)
        session = self._live(self.sessions, dkg_id)
        if session is None:
            raise _refuse(PoolErrorKind.NOT_FOUND, f"unknown or expired dkg_id {dkg_id!r}")
        return session

    # -- repair (docs/refresh-repair.md) ---------------------------------------------------

    def repair_step1(self, request: pb.RepairStep1Request) -> pb.RepairStep1Response:
        """Help repair a participant's share: check the helpers, the participant and their
        signed X25519 keys, authorize under the ``repair`` policy, then answer this enclave's
        step-1 deltas, each encrypted to its helper, and its own X25519 key signed by the
        identity key. A retry with the same request returns the same answer."""
        _check_text(request.repair_id, "repair_id", MAX_DKG_ID_BYTES)
        _check_text(request.account_id, "account_id", MAX_ACCOUNT_ID_BYTES)
        if len(request.helpers) > MAX_DKG_SIGNERS or len(request.keys) > MAX_DKG_SIGNERS:
            raise _invalid(f"at most {MAX_DKG_SIGNERS} helpers and keys")
        if len(request.approvals) > MAX_DKG_APPROVALS:
            raise _invalid(f"at most {MAX_DKG_APPROVALS} approvals")
        account = self._lookup(request.account_id)
        if account is None:
            raise _refuse(PoolErrorKind.NOT_FOUND, f"account {request.account_id!r} does not exist")
        if account.ciphersuite not in DKG_SUITES:  # pragma: no cover - every suite is one
            raise _invalid(f"account {request.account_id!r}: no repair for its ciphersuite")
        group = group_for(account.ciphersuite)
        n = len(request.helpers)
        if not account.min_signers <= n <= account.max_signers - 1:
            raise _invalid(
                f"helpers must number min_signers..max_signers - 1 "
                f"({account.min_signers}..{account.max_signers - 1}) for this account, got {n}"
            )
        # One key per helper but this enclave, and the participant's: as many as helpers.
        if len(request.keys) != n:
            raise _invalid(
                f"keys must hold the {n} X25519 keys of the other helpers and the "
                f"participant, got {len(request.keys)}"
            )
        helpers, participant = self._repair_parties(group, request, account)
        params = repair_params(group.name, helpers, participant)
        params_sha256 = hashlib.sha256(params).digest()
        keys = self._repair_keys(group, request, helpers, participant, params_sha256)
        request_key = _digest(
            request.repair_id.encode(),
            request.account_id.encode(),
            params,
            *(k.SerializeToString(deterministic=True) for k in request.keys),
        )
        existing = self._live(self.repairs, request.repair_id)
        if existing is not None:
            if existing.request_key != request_key or existing.response is None:
                raise _refuse(
                    PoolErrorKind.ALREADY_EXISTS,
                    f"repair_id {request.repair_id!r} is in use with other parameters",
                )
            return existing.response
        self._check_not_busy(request.account_id)
        self._check_capacity()
        self._decide(
            request.account_id, request.repair_id, params, request.approvals, REPAIR_POLICY
        )
        ttl = self.settings.ttl_s
        session = RepairSession(
            repair_id=request.repair_id,
            account_id=request.account_id,
            group=group,
            identifier=bytes(account.identifier),
            helpers=helpers,
            participant=participant,
            keys=keys,
            old_verifying_share=account.verifying_share,
            request_key=request_key,
            deadline=trio.current_time() + ttl,
            expires_at_unix_ms=int((time.time() + ttl) * 1000),
        )
        session.response = self._begin(
            session, self.repairs, lambda: self._step1(session, account, params_sha256)
        )
        log.info(
            "repair opened",
            extra={
                "dkg_id": session.dkg_id,
                "account_id": session.account_id,
                "helpers": len(helpers),
            },
        )
        return session.response

    def _repair_parties(
        self, group: Group, request: pb.RepairStep1Request, account: AccountShare
    ) -> tuple[list[tuple[bytes, str]], tuple[bytes, str]]:
        """The helpers (ascending, this enclave's entry ``"enclave"`` with the account's
        identifier, the others pinned, ``min_signers .. max_signers - 1`` of them) and the
        participant (pinned, not a helper)."""
        own = bytes(account.identifier)
        n = len(request.helpers)  # in range: repair_step1 checked it
        parties = [*request.helpers, request.participant]
        for index, h in enumerate(parties):  # every length before any decoding
            if len(h.identifier) != IDENTIFIER_BYTES:
                what = "participant" if index == n else f"helper {index}"
                raise _invalid(f"{what}: identifier must be {IDENTIFIER_BYTES} bytes")
        helpers: list[tuple[bytes, str]] = []
        seen_keys: set[str] = set()
        previous = -1
        for index, h in enumerate(parties):
            last = index == n
            what = "participant" if last else f"helper {index}"
            ident = bytes(h.identifier)
            try:
                value = group.identifier_from_bytes(ident)
            except FrostError as exc:
                raise _invalid(f"{what}: {exc}") from None
            who = group.describe(value)
            if not last:
                if value <= previous:
                    raise _invalid(
                        f"helpers must be ascending by identifier without repeats (helper "
                        f"{who} at position {index})"
                    )
                previous = value
            key_id = h.key_id
            if ident == own:
                if last:
                    raise _invalid(
                        f"participant {who} is this enclave, whose share is never repaired "
                        "(it lives in the bundle chain)"
                    )
                if key_id != ENCLAVE_KEY_ID:
                    raise _invalid(f"helper {who} is this enclave; its key_id must be 'enclave'")
            elif key_id not in self.settings.participants:
                raise _invalid(f"{what} {who}: key_id {key_id[:64]!r} is not pinned in [dkg]")
            if key_id in seen_keys or (last and any(ident == i for i, _k in helpers)):
                raise _invalid(f"{what} {who}: appears twice (key_id {key_id[:64]!r})")
            seen_keys.add(key_id)
            if not last:
                helpers.append((ident, key_id))
        if ENCLAVE_KEY_ID not in seen_keys:
            raise _invalid("this enclave (the account's identifier) is not among the helpers")
        return helpers, (bytes(request.participant.identifier), request.participant.key_id)

    def _repair_keys(
        self,
        group: Group,
        request: pb.RepairStep1Request,
        helpers: list[tuple[bytes, str]],
        participant: tuple[bytes, str],
        params_sha256: bytes,
    ) -> dict[bytes, bytes]:
        """Every other helper's and the participant's X25519 key, each signed by the pinned
        key its entry names over :func:`repair_key_payload`; a substituted one is refused
        naming whose it claims to be."""
        # As many entries as ``expected`` (repair_step1 checked the count): 'enclave' is
        # reserved, so exactly one helper, this enclave, is left out.
        expected = {i: k for i, k in [*helpers, participant] if k != ENCLAVE_KEY_ID}
        # Every entry's identifier, sizes and key id before any signature or X25519 work.
        for k, ident, who in _each_once(
            group,
            request.keys,
            lambda k: bytes(k.identifier),
            expected,
            entry="key",
            field="identifier",
            among="another helper or the participant of this repair",
            plural="keys",
        ):
            if len(k.encryption_key) != X25519_BYTES or len(k.signature) != SIGNATURE_BYTES:
                raise _invalid(
                    f"participant {who}: a key is {X25519_BYTES} bytes and its signature "
                    f"{SIGNATURE_BYTES}"
                )
            if k.key_id != expected[ident]:
                raise _invalid(
                    f"participant {who}: key signed as key_id {k.key_id[:64]!r}, but the "
                    f"request names {expected[ident]!r}"
                )
        out: dict[bytes, bytes] = {}
        scratch = bytearray(X25519_BYTES)
        probe = bytearray(X25519_BYTES)
        try:
            _kdf.x25519_keypair(probe)
            for k in request.keys:
                ident = bytes(k.identifier)
                who = group.describe_identifier(ident)
                payload = repair_key_payload(
                    request.repair_id,
                    request.account_id,
                    params_sha256,
                    ident,
                    bytes(k.encryption_key),
                )
                if not verify_ed25519(self.settings.participants[k.key_id], payload, k.signature):
                    raise _invalid(
                        f"participant {who}: key signature does not verify under key_id "
                        f"{k.key_id!r} for this repair (a substituted key)"
                    )
                try:  # a small-order key would make the shared secret all zero
                    _kdf.x25519_into(scratch, probe, bytes(k.encryption_key))
                except FrostError as exc:
                    raise _invalid(f"participant {who}: encryption_key refused: {exc}") from None
                out[ident] = bytes(k.encryption_key)
        finally:
            _sodium.memzero(scratch)
            _sodium.memzero(probe)
        return out

    def _step1(
        self, session: RepairSession, account: AccountShare, params_sha256: bytes
    ) -> pb.RepairStep1Response:
        """ZF ``repair_share_step_1`` with the account's share; the others' deltas encrypted
        and zeroed, our own kept for step 2."""
        own = session.identifier
        session.x25519_public = _kdf.x25519_keypair(session.x25519_secret)
        deltas = _repair.repair_share_step_1(
            [i for i, _k in session.helpers],
            own,
            account.signing_share,
            session.participant[0],
            suite=session.group.name,
        )
        key = bytearray(_stream.KEY_BYTES)
        try:
            out = []
            for ident, _key_id in session.others:
                share_key_into(
                    key,
                    dkg_id=session.dkg_id,
                    sender=own,
                    recipient=ident,
                    own_secret=session.x25519_secret,
                    sender_public=session.x25519_public,
                    recipient_public=session.keys[ident],
                    peer_public=session.keys[ident],
                    label=REPAIR_DELTA_INFO,
                )
                ciphertext = encrypt_share(
                    key, deltas[ident], dkg_id=session.dkg_id, sender=own, recipient=ident
                )
                out.append(pb.DkgEncryptedShare(sender=own, recipient=ident, ciphertext=ciphertext))
            session.own_delta[:] = deltas[own]
        finally:
            _sodium.memzero(key)
            for delta in deltas.values():
                _sodium.memzero(delta)
        payload = repair_key_payload(
            session.dkg_id, session.account_id, params_sha256, own, session.x25519_public
        )
        return pb.RepairStep1Response(
            key=pb.RepairKey(
                identifier=own,
                encryption_key=session.x25519_public,
                key_id=ENCLAVE_KEY_ID,
                signature=self._identity.sign(payload),
            ),
            deltas=out,
            expires_at_unix_ms=session.expires_at_unix_ms,
        )

    def repair_step2(self, request: pb.RepairStep2Request) -> pb.RepairStep2Response:
        """Sum our delta and the other helpers' (each decrypted and checked) into sigma and
        answer it encrypted to the participant; every secret of the repair is then zeroed. A
        delta that fails authentication is INVALID_ARGUMENT naming its sender and the repair
        stays as it was; a retry with the same deltas returns the same answer."""
        _check_text(request.repair_id, "repair_id", MAX_DKG_ID_BYTES)
        session = self._live(self.repairs, request.repair_id)
        if session is None:
            raise _refuse(
                PoolErrorKind.NOT_FOUND, f"unknown or expired repair_id {request.repair_id!r}"
            )
        # The count bounds the work: nothing is hashed or decrypted for a request with the
        # wrong number of deltas (it cannot be a retry of step 2, nor a valid step 2).
        counted = len(request.deltas) == len(session.others)
        if session.state is DkgState.DONE:
            if (
                counted
                and session.step2_response is not None
                and session.step2_key == _retry_key(request.deltas)
            ):
                return session.step2_response
            raise _refuse(
                PoolErrorKind.FAILED_PRECONDITION,
                f"repair {session.dkg_id!r} already ran step 2 with other deltas",
            )
        if session.state is not DkgState.ROUND1_SENT:  # pragma: no cover - no other live state
            raise _refuse(PoolErrorKind.FAILED_PRECONDITION, "step 1 has not run")
        if not counted:
            raise _invalid(
                f"deltas must hold the {len(session.others)} deltas addressed to this enclave, "
                f"got {len(request.deltas)}"
            )
        account = self._lookup(session.account_id)
        if account is None or account.verifying_share != session.old_verifying_share:
            raise self._fail(
                session,
                _refuse(
                    PoolErrorKind.FAILED_PRECONDITION,
                    f"account {session.account_id!r} changed since step 1 (a refresh loaded); "
                    "start a new repair",
                ),
            )
        received = self._decrypt(session, request.deltas, REPAIR_DELTA_INFO)
        key = _retry_key(request.deltas)
        sigma = bytearray(0)
        try:
            values = {ident: p.signing_share for ident, p in received.items()}
            values[session.identifier] = session.own_delta
            try:
                sigma = _repair.repair_share_step_2(values, suite=session.group.name)
            except _dkg.DkgError as exc:
                raise self._fail(session, _invalid(_culprit_message(session.group, exc))) from None
            participant = session.participant[0]
            box = bytearray(_stream.KEY_BYTES)
            try:
                share_key_into(
                    box,
                    dkg_id=session.dkg_id,
                    sender=session.identifier,
                    recipient=participant,
                    own_secret=session.x25519_secret,
                    sender_public=session.x25519_public,
                    recipient_public=session.keys[participant],
                    peer_public=session.keys[participant],
                    label=REPAIR_SIGMA_INFO,
                )
                ciphertext = encrypt_share(
                    box,
                    sigma,
                    dkg_id=session.dkg_id,
                    sender=session.identifier,
                    recipient=participant,
                )
            finally:
                _sodium.memzero(box)
        finally:
            _sodium.memzero(sigma)
            for package in received.values():
                package.zero()
        response = pb.RepairStep2Response(
            sigma=pb.DkgEncryptedShare(
                sender=session.identifier, recipient=participant, ciphertext=ciphertext
            )
        )
        session.zero()
        session.step2_key = key
        session.step2_response = response
        self._move(session, DkgState.DONE)
        self._give_back(session)
        self._forget_oldest_done(self.repairs)
        log.info(
            "repair step 2 answered",
            extra={"dkg_id": session.dkg_id, "account_id": session.account_id},
        )
        return response

    # -- expiry and the stores -------------------------------------------------------------

    def expire(self, now: float) -> int:
        """End every DKG whose deadline is at or before ``now`` (a storing one finishes first);
        returns how many."""
        ended = 0
        for session in self._all():
            if session.deadline > now or session.state is DkgState.STORING:
                continue
            self._end(session, DkgState.EXPIRED)
            ended += 1
        return ended

    def close(self) -> int:
        """Zero every DKG that holds secrets and forget them all (shutdown); returns how many
        held secrets."""
        count = 0
        for session in self._all():
            if session.state in (DkgState.OPEN, DkgState.ROUND1_SENT, DkgState.ROUND2_SENT):
                self._end(session, DkgState.EXPIRED)
                count += 1
        self.sessions.clear()
        self.repairs.clear()
        return count

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire DKGs at their deadline (zeroing their secrets) and host the delta stores.

        Cancellation: on cancel, stores in progress are cancelled (their DKGs fail, zeroed)
        and every open DKG is zeroed.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    deadlines = [s.deadline for s in self._all() if s.state is not DkgState.STORING]
                    if not deadlines:
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
                        continue
                    with trio.move_on_at(min(deadlines)):
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
                    self.expire(trio.current_time())
        finally:
            self._nursery = None
            zeroed = self.close()
            if zeroed:
                log.info("zeroed open DKGs at shutdown", extra={"dkgs": zeroed})


def largest_dkg_requests() -> dict[str, int]:
    """The encoded size of the largest valid request of each DKG rpc (every list at its
    bound, every field at its longest): the gRPC server's per-method receive caps."""
    participant = pb.DkgParticipant(identifier=bytes(IDENTIFIER_BYTES), key_id="k" * 64)
    approval = pb.Approval(key_id="k" * 64, signature=bytes(64), expires_at_unix_ms=-(2**63))
    round1 = pb.DkgRound1Request(
        dkg_id="d" * MAX_DKG_ID_BYTES,
        account_id="a" * MAX_ACCOUNT_ID_BYTES,
        ciphersuite=max(DKG_SUITES, key=len),
        min_signers=MAX_DKG_SIGNERS,
        max_signers=MAX_DKG_SIGNERS,
        participants=[participant] * MAX_DKG_SIGNERS,
        identifier=bytes(IDENTIFIER_BYTES),
        policy="p" * 64,
        approvals=[approval] * MAX_DKG_APPROVALS,
        operation=REFRESH,
    )
    package = pb.DkgRound1Package(
        identifier=bytes(IDENTIFIER_BYTES),
        commitment=[bytes(_MAX_ELEMENT_BYTES)] * MAX_DKG_SIGNERS,
        proof_of_knowledge=bytes(_MAX_POK_BYTES),
        encryption_key=bytes(X25519_BYTES),
        key_id="k" * MAX_KEY_ID_BYTES,
        signature=bytes(SIGNATURE_BYTES),
    )
    round2 = pb.DkgRound2Request(
        dkg_id="d" * MAX_DKG_ID_BYTES, packages=[package] * (MAX_DKG_SIGNERS - 1)
    )
    share = pb.DkgEncryptedShare(
        sender=bytes(IDENTIFIER_BYTES),
        recipient=bytes(IDENTIFIER_BYTES),
        ciphertext=bytes(CIPHERTEXT_BYTES),
    )
    round3 = pb.DkgRound3Request(
        dkg_id="d" * MAX_DKG_ID_BYTES, shares=[share] * (MAX_DKG_SIGNERS - 1)
    )
    repair_key = pb.RepairKey(
        identifier=bytes(IDENTIFIER_BYTES),
        encryption_key=bytes(X25519_BYTES),
        key_id="k" * MAX_KEY_ID_BYTES,
        signature=bytes(SIGNATURE_BYTES),
    )
    step1 = pb.RepairStep1Request(
        repair_id="d" * MAX_DKG_ID_BYTES,
        account_id="a" * MAX_ACCOUNT_ID_BYTES,
        helpers=[participant] * MAX_DKG_SIGNERS,
        participant=participant,
        keys=[repair_key] * MAX_DKG_SIGNERS,
        approvals=[approval] * MAX_DKG_APPROVALS,
    )
    step2 = pb.RepairStep2Request(
        repair_id="d" * MAX_DKG_ID_BYTES, deltas=[share] * (MAX_DKG_SIGNERS - 1)
    )
    return {
        "DkgRound1": int(round1.ByteSize()),
        "DkgRound2": int(round2.ByteSize()),
        "DkgRound3": int(round3.ByteSize()),
        "RepairStep1": int(step1.ByteSize()),
        "RepairStep2": int(step2.ByteSize()),
    }


def _retry_key(entries: Sequence[Message]) -> bytes:
    """What a retry of round 2 (its packages) or of repair step 2 (its deltas) must repeat;
    hash it only once its count is right."""
    return _digest(*(e.SerializeToString(deterministic=True) for e in entries))


def _culprit_message(group: Group, exc: _dkg.DkgError) -> str:
    """A DKG refusal's line, naming its culprit (its messages already do; this makes sure)."""
    text = str(exc)
    if exc.culprit is None:
        return text
    who = group.describe_identifier(exc.culprit)
    return text if who in text else f"participant {who}: {text}"


__all__ = [
    "CIPHERTEXT_BYTES",
    "CREATE",
    "DKG_OPERATIONS",
    "DKG_SUITES",
    "MAX_DKG_ID_BYTES",
    "MAX_DKG_SIGNERS",
    "REFRESH",
    "REFRESH_POLICY",
    "REPAIR_DELTA_INFO",
    "REPAIR_POLICY",
    "REPAIR_SIGMA_INFO",
    "REPAIR_TRANSITIONS",
    "RESERVED_POLICIES",
    "TRANSITIONS",
    "CreatedAccount",
    "DeltaWriter",
    "DkgRegistry",
    "DkgSession",
    "DkgState",
    "FindCreated",
    "PoolSlots",
    "RepairSession",
    "Signer",
    "Slots",
    "decrypt_share_into",
    "deltas_finder",
    "dkg_params",
    "encrypt_share",
    "largest_dkg_requests",
    "repair_key_payload",
    "repair_params",
    "round1_payload",
    "share_key_into",
    "verify_ed25519",
]
