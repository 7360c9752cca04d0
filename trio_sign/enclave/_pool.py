"""The signing session pool: FROST round-one state between Commit and Sign.

A session holds a pool slot (a ``trio.CapacityLimiter`` token) from ``Commit`` until ``Sign``,
``Abort`` or expiry, and its nonces from ``Commit`` until ``Sign`` consumes them, ``Abort``
drops them or the TTL runs out. Nonces are zeroed on every one of those paths.

After ``Sign`` the session keeps only public data (a digest of the request and the signature
share) until its TTL ends, so a byte-identical retry gets the same share and any different
request is refused: the nonces are never used twice.

Every account signs with its own ciphersuite (DESIGN §14): the pool looks up the account's
:class:`~trio_sign.crypto.Scheme` by the name its share carries and lets it draw the nonces,
build the commitments and sign, so these guarantees hold alike for every suite. Only the
Taproot suite takes a BIP-341 merkle root.

All state changes happen without an ``await`` in between, so they are atomic under Trio.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import trio

from .._errors import FrostError, TrioSignError
from ..crypto import SCHEMES, SECP256K1_TR, Scheme, scheme_by_name
from ..shares import AccountShare

log = logging.getLogger("trio_sign.pool")

DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_SESSION_TTL_S = 60.0
MAX_SESSION_ID_BYTES = 128
#: Wire size of a commitment's identifier in every suite (a 32-byte scalar, DESIGN §4); its two
#: points are the account's suite's ``element_size`` (32 for Ed25519, 33 for secp256k1). Both
#: are checked before any commitment object is built.
IDENTIFIER_BYTES = 32
#: The largest element of any suite (a compressed secp256k1 point), for request-size bounds.
MAX_ELEMENT_BYTES = max(s.element_size for s in SCHEMES)
#: A BIP-341 merkle root (a TapBranch hash); an empty root is allowed too (DESIGN §4).
MERKLE_ROOT_BYTES = 32


class PoolErrorKind(Enum):
    """What went wrong, mapped one-to-one onto gRPC status codes by the service."""

    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"


class PoolError(TrioSignError):
    """A session request was refused; ``kind`` says why in gRPC terms."""

    def __init__(self, kind: PoolErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class CommitmentFields(Protocol):
    """What :meth:`SessionPool.sign` reads of each commitment: a suite's ``SigningCommitment``
    or the ``SigningCommitment`` protobuf message as received (so nothing is built before the
    list is known to be in bounds)."""

    @property
    def identifier(self) -> bytes: ...

    @property
    def hiding(self) -> bytes: ...

    @property
    def binding(self) -> bytes: ...


class _Nonces(Protocol):
    """A suite's round-one secret: single use, zeroed by :meth:`zero`."""

    used: bool

    @property
    def commitment(self) -> Any: ...

    def zero(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CommitResult:
    """A session's commitment (in its account's suite's encoding) and when it expires."""

    commitment: CommitmentFields
    expires_at_unix_ms: int


class _Session:
    __slots__ = (
        "account_id",
        "commitment",
        "deadline",
        "expires_at_unix_ms",
        "nonces",
        "token",
    )

    def __init__(
        self, account_id: str, nonces: _Nonces, deadline: float, expires_at_unix_ms: int
    ) -> None:
        self.account_id = account_id
        # public; kept for Commit retries after Sign
        self.commitment: CommitmentFields = nonces.commitment
        self.nonces: _Nonces | None = nonces
        self.deadline = deadline
        self.expires_at_unix_ms = expires_at_unix_ms
        self.token: object | None = None  # the limiter borrower while the slot is held


#: A signed session, kept only for byte-identical retries until its deadline. A plain tuple of
#: str/bytes/numbers: CPython's GC stops tracking such tuples, so tens of thousands of them
#: (60 s of traffic) add nothing to full collections. Fields: deadline, account_id, request
#: digest, signature share, identifier, hiding, binding, expires_at_unix_ms, and the suite's
#: code (``Scheme.code``, to rebuild the commitment for a Commit retry).
_Signed = tuple[float, str, bytes, bytes, bytes, bytes, bytes, int, int]


@dataclass(slots=True)
class PoolStats:
    """What the pool did since it started, for metrics; updated in place, never reset.

    Attributes:
        opened: sessions opened by a Commit (retries of a Commit not counted).
        signed: sessions whose nonces a Sign consumed (retries of a Sign not counted).
        aborted: open sessions ended by Abort (the gateway's call or its SSE event).
        expired: open sessions whose TTL ran out before they signed.
        closed_at_shutdown: open sessions zeroed when the pool stopped.
        failed: sessions whose nonces were dropped after an unexpected error in Sign.
        refused_full: Commits refused because every slot was taken (``max_sessions``).
        refused_draining: Commits refused while draining.
        refused_memory: Commits refused above the memory hard watermark.
        refused_frozen: Commits and Signs refused for a frozen account.
    """

    opened: int = 0
    signed: int = 0
    aborted: int = 0
    expired: int = 0
    closed_at_shutdown: int = 0
    failed: int = 0
    refused_full: int = 0
    refused_draining: int = 0
    refused_memory: int = 0
    refused_frozen: int = 0


def _request_digest(
    message: bytes, commitments: Sequence[CommitmentFields], merkle_root: bytes | None
) -> bytes:
    """A digest of the whole Sign request, for recognising a byte-identical retry.

    Every part is length-prefixed with 8 bytes, so no field size can overflow the prefix (a
    2-byte prefix once made a 64 KiB field an OverflowError) and no two requests collide by
    moving bytes between fields. The merkle root's presence is a byte of its own: no root,
    an empty root and a 32-byte root are three different requests (they sign differently).
    """
    h = hashlib.sha256()
    h.update(len(message).to_bytes(8, "big"))
    h.update(message)
    h.update(len(commitments).to_bytes(8, "big"))
    for c in commitments:
        for part in (c.identifier, c.hiding, c.binding):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    if merkle_root is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01")
        h.update(len(merkle_root).to_bytes(8, "big"))
        h.update(merkle_root)
    return h.digest()


def _commitments_problem(
    commitments: Sequence[CommitmentFields], min_signers: int, max_signers: int, element_size: int
) -> str | None:
    """Why the list is out of bounds for the account, or None; the work is bounded by
    ``max_signers``, never by the request (the length is checked before any element is read).
    ``element_size`` is the account's suite's (a commitment of another suite is refused here).
    """
    n = len(commitments)
    if n < min_signers:
        return f"too few signers: {n} commitments, at least {min_signers} required"
    if n > max_signers:
        return f"too many signers: {n} commitments, at most {max_signers} allowed"
    for index, c in enumerate(commitments):
        for name, value, size in (
            ("identifier", c.identifier, IDENTIFIER_BYTES),
            ("hiding", c.hiding, element_size),
            ("binding", c.binding, element_size),
        ):
            if len(value) != size:
                return f"commitment {index}: {name} must be {size} bytes, got {len(value)}"
    return None


def _merkle_root_problem(scheme: Scheme, merkle_root: bytes | None) -> str | None:
    """Why ``merkle_root`` does not fit the account's suite, or None (checked by length only:
    any 32 bytes are a merkle root)."""
    if merkle_root is None:
        return None
    if not scheme.taproot:
        return (
            f"taproot_merkle_root applies only to {SECP256K1_TR.name} accounts; "
            f"this account's ciphersuite is {scheme.name}"
        )
    if len(merkle_root) not in (0, MERKLE_ROOT_BYTES):
        return (
            f"taproot_merkle_root must be empty or {MERKLE_ROOT_BYTES} bytes, "
            f"got {len(merkle_root)}"
        )
    return None


def _problem(
    scheme: Scheme,
    account: AccountShare,
    commitments: Sequence[CommitmentFields],
    merkle_root: bytes | None,
) -> str | None:
    """Every bound of a Sign request for ``account``, checked by length only."""
    return _merkle_root_problem(scheme, merkle_root) or _commitments_problem(
        commitments, account.min_signers, account.max_signers, scheme.element_size
    )


class SessionPool:
    """Open FROST sessions, bounded in number and lifetime.

    Args:
        lookup: ``account_id -> AccountShare | None`` (the ShareStore's ``get``).
        max_sessions: concurrent sessions holding nonces (slots); more Commits are refused
            with RESOURCE_EXHAUSTED rather than queued, so the gateway can go elsewhere.
        session_ttl_s: how long a session (and a signed session's retry record) lives.
        is_frozen: ``account_id -> bool``; frozen accounts refuse Commit and Sign.
        overloaded: ``() -> str | None``; when it returns a reason (memory above the hard
            watermark), new sessions are refused with RESOURCE_EXHAUSTED. Open sessions finish.

    Run :meth:`run_reaper` in the service's nursery; it zeroes nonces of expired sessions.

    Attributes:
        stats: counts of sessions opened and ended, and of refusals (:class:`PoolStats`).
    """

    def __init__(
        self,
        lookup: Callable[[str], AccountShare | None],
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_ttl_s: float = DEFAULT_SESSION_TTL_S,
        is_frozen: Callable[[str], bool] = lambda _account_id: False,
        overloaded: Callable[[], str | None] = lambda: None,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if session_ttl_s <= 0:
            raise ValueError("session_ttl_s must be > 0")
        self._lookup = lookup
        self._is_frozen = is_frozen
        self._overloaded = overloaded
        self._limiter = trio.CapacityLimiter(max_sessions)
        self._ttl = session_ttl_s
        # Open sessions hold nonces. Insertion order is expiry order (one TTL for all).
        self._sessions: dict[str, _Session] = {}
        # Signed sessions, in signing order: expiry order up to one TTL (access checks exact).
        self._signed: dict[str, _Signed] = {}
        self._wakeup = trio.Event()
        self._accepting = True
        self._idle: trio.Event | None = None  # set when the last slot is freed, if awaited
        self.stats = PoolStats()

    # -- introspection ---------------------------------------------------------------------

    @property
    def max_sessions(self) -> int:
        return int(self._limiter.total_tokens)

    @property
    def open_sessions(self) -> int:
        """Sessions holding a slot (committed, not yet signed, aborted or expired)."""
        return int(self._limiter.borrowed_tokens)

    @property
    def tracked_sessions(self) -> int:
        """Sessions the pool remembers, including signed ones kept for retries."""
        return len(self._sessions) + len(self._signed)

    @property
    def accepting(self) -> bool:
        """Whether new sessions are taken (False while draining)."""
        return self._accepting

    def stop_accepting(self) -> None:
        """Drain: refuse new sessions (UNAVAILABLE); open ones may still sign."""
        self._accepting = False

    def start_accepting(self) -> None:
        """Undo :meth:`stop_accepting` (the gateway's ``undrain``): take new sessions again."""
        self._accepting = True

    async def wait_idle(self) -> None:
        """Return once no session holds a slot: every open one has signed, been aborted or
        expired (a drain waits for this, bounded by its grace, before closing the server)."""
        while self.open_sessions:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    # -- the three operations --------------------------------------------------------------

    def commit(self, account_id: str, session_id: str) -> CommitResult:
        """FROST round one for ``account_id`` under ``session_id``.

        A retry with the same ids returns the same commitment without taking another slot.
        """
        _check_session_id(session_id)
        existing = self._live(session_id)
        if existing is not None:
            if existing.account_id != account_id:
                raise PoolError(
                    PoolErrorKind.ALREADY_EXISTS,
                    "session_id is already in use for another account",
                )
            return CommitResult(existing.commitment, existing.expires_at_unix_ms)
        signed = self._live_signed(session_id)
        if signed is not None:
            _deadline, signed_account, _digest, _share, ident, hiding, binding, ms, code = signed
            if signed_account != account_id:
                raise PoolError(
                    PoolErrorKind.ALREADY_EXISTS,
                    "session_id is already in use for another account",
                )
            return CommitResult(SCHEMES[code].commitment(ident, hiding, binding), ms)
        if not self._accepting:
            self.stats.refused_draining += 1
            raise PoolError(PoolErrorKind.UNAVAILABLE, "draining: not taking new sessions")
        overload = self._overloaded()
        if overload is not None:
            self.stats.refused_memory += 1
            raise PoolError(
                PoolErrorKind.RESOURCE_EXHAUSTED, f"not taking new sessions: {overload}"
            )
        account = self._account(account_id)
        scheme = scheme_by_name(account.ciphersuite)
        token = object()
        try:
            self._limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            self.stats.refused_full += 1
            raise PoolError(
                PoolErrorKind.RESOURCE_EXHAUSTED,
                f"session pool full ({self.max_sessions} open sessions); retry later "
                "or raise max_sessions",
            ) from None
        try:
            nonces: _Nonces = scheme.commit(account.identifier, account.signing_share)
        except BaseException:
            self._free(token)
            raise
        now = trio.current_time()
        expires_ms = int((time.time() + self._ttl) * 1000)
        session = _Session(account_id, nonces, now + self._ttl, expires_ms)
        session.token = token
        self._sessions[session_id] = session
        self.stats.opened += 1
        self._wakeup.set()
        return CommitResult(nonces.commitment, expires_ms)

    def sign(
        self,
        session_id: str,
        message: bytes,
        commitments: Sequence[CommitmentFields],
        *,
        merkle_root: bytes | None = None,
        authorize: Callable[[AccountShare], None] | None = None,
    ) -> tuple[bytes, bytes]:
        """FROST round two: consume the session's nonces exactly once; free its slot.

        A byte-identical retry returns the same share; any other request for a signed session
        is FAILED_PRECONDITION (a different ``merkle_root``, or one given or left out, makes a
        different request). Invalid input (INVALID_ARGUMENT) leaves the session usable.

        ``merkle_root`` is the BIP-341 tweak's merkle root, only for a
        ``FROST-secp256k1-SHA256-TR-v1`` account: None signs with the key as it is, ``b""``
        or 32 bytes tweak it (DESIGN §4). Given for any other suite, or of another length, it
        is INVALID_ARGUMENT, checked with the other bounds (before ``authorize`` and before
        the nonces are touched, so the session still signs a corrected request).

        ``authorize(account)`` (the account's policy, DESIGN §11) runs once the request is
        known to be well formed for a live session and before the nonces or the signing share
        are touched; whatever it raises propagates and leaves the session usable, so a
        corrected request still signs. A byte-identical retry of a signed session returns the
        share it already released for that exact request without asking again (no secret is
        touched, and the message and commitments are the ones that were authorized).

        The work is bounded before it starts: the session id's length, then the session, then
        the merkle root against the account's suite, the list's length against the account's
        ``min_signers``/``max_signers`` and every field's length against the suite's (element
        size; identifiers 32 bytes), all before a commitment object is built or anything is
        hashed. The caller bounds ``message`` (the service's ``MAX_MESSAGE_BYTES``).

        Returns:
            ``(identifier, signature_share)``: this signer's identifier and its share.
        """
        _check_session_id(session_id)
        session = self._live(session_id)
        if session is None or session.nonces is None:
            signed = self._live_signed(session_id)
            if signed is None:
                raise PoolError(PoolErrorKind.NOT_FOUND, "unknown or expired session_id")
            if self._is_signed_retry(signed, message, commitments, merkle_root):
                return signed[4], signed[3]
            raise PoolError(
                PoolErrorKind.FAILED_PRECONDITION,
                "session already signed a different request; open a new session",
            )
        if self._is_frozen(session.account_id):
            self.stats.refused_frozen += 1
            raise PoolError(PoolErrorKind.FAILED_PRECONDITION, "account is frozen")
        account = self._account(session.account_id)
        scheme = scheme_by_name(account.ciphersuite)
        problem = _problem(scheme, account, commitments, merkle_root)
        if problem is not None:
            raise PoolError(PoolErrorKind.INVALID_ARGUMENT, problem)
        if authorize is not None:
            authorize(account)
        make = scheme.commitment
        parsed = [make(bytes(c.identifier), bytes(c.hiding), bytes(c.binding)) for c in commitments]
        if merkle_root is not None:
            merkle_root = bytes(merkle_root)
        nonces = session.nonces
        try:
            share = scheme.sign(
                nonces,
                signing_share=account.signing_share,
                group_public_key=account.group_public_key,
                message=message,
                commitments=parsed,
                min_signers=account.min_signers,
                max_signers=account.max_signers,
                merkle_root=merkle_root,
            )
        except FrostError as exc:
            if nonces.used:  # pragma: no cover - sign() only fails before consuming
                self._release(session)
            raise PoolError(PoolErrorKind.INVALID_ARGUMENT, str(exc)) from None
        except BaseException:
            # Anything unexpected after the nonces may have been touched: drop them for good.
            nonces.zero()
            self._release(session)
            self.stats.failed += 1
            raise
        self._release(session)
        self.stats.signed += 1
        del self._sessions[session_id]
        c = session.commitment
        self._signed[session_id] = (
            session.deadline,
            session.account_id,
            _request_digest(message, parsed, merkle_root),
            share,
            c.identifier,
            c.hiding,
            c.binding,
            session.expires_at_unix_ms,
            scheme.code,
        )
        return c.identifier, share

    def _is_signed_retry(
        self,
        signed: _Signed,
        message: bytes,
        commitments: Sequence[CommitmentFields],
        merkle_root: bytes | None,
    ) -> bool:
        """Whether the request is byte-identical to the one the session signed. The signed
        request was in bounds, so one that is not cannot match: refused without hashing."""
        account = self._lookup(signed[1])
        if account is None:  # pragma: no cover - the store does not shrink while serving
            return False
        if _problem(SCHEMES[signed[8]], account, commitments, merkle_root) is not None:
            return False
        return signed[2] == _request_digest(message, commitments, merkle_root)

    def abort(self, session_id: str) -> None:
        """Drop the session and zero its nonces (also forgets a signed session)."""
        _check_session_id(session_id)
        session = self._sessions.pop(session_id, None)
        if session is not None:
            held_nonces = session.nonces is not None
            self._release(session)
            if session.deadline > trio.current_time():
                if held_nonces:
                    self.stats.aborted += 1
                return
        signed = self._signed.pop(session_id, None)
        if signed is not None and signed[0] > trio.current_time():
            return
        raise PoolError(PoolErrorKind.NOT_FOUND, "unknown or expired session_id")

    def abort_all(self) -> int:
        """Zero every session's nonces and free every slot (shutdown). Returns how many held
        nonces."""
        count = 0
        for session in self._sessions.values():
            if session.nonces is not None:
                count += 1
            self._release(session)
        self._sessions.clear()
        self.stats.closed_at_shutdown += count
        self._signed.clear()
        return count

    # -- expiry ----------------------------------------------------------------------------

    async def run_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Expire sessions at their deadline, zeroing nonces and freeing slots. Runs forever.

        Cancellation: on cancel, every remaining session's nonces are zeroed too.
        """
        task_status.started()
        try:
            while True:
                deadline = self._next_deadline()
                if deadline is None:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                await trio.sleep_until(deadline)
                self.expire(trio.current_time())
        finally:
            zeroed_count = self.abort_all()  # a count: nothing of the sessions is logged
            if zeroed_count:
                log.info(
                    "zeroed nonces of open sessions at shutdown", extra={"sessions": zeroed_count}
                )

    def _next_deadline(self) -> float | None:
        first_open = next(iter(self._sessions.values()), None)
        first_signed = next(iter(self._signed.values()), None)
        deadlines = [
            d
            for d in (
                None if first_open is None else first_open.deadline,
                None if first_signed is None else first_signed[0],
            )
            if d is not None
        ]
        return min(deadlines, default=None)

    def expire(self, now: float) -> int:
        """Drop every session whose deadline is at or before ``now``; returns how many.

        Open sessions go exactly on time (their nonces are zeroed); signed ones are kept in
        signing order, so one may outlive its deadline by up to a TTL, but it is refused as
        expired from its deadline on.
        """
        expired = 0
        while self._sessions:
            session_id, session = next(iter(self._sessions.items()))
            if session.deadline > now:
                break
            del self._sessions[session_id]
            if session.nonces is not None:
                self.stats.expired += 1
            self._release(session)
            expired += 1
        while self._signed:
            session_id, signed = next(iter(self._signed.items()))
            if signed[0] > now:
                break
            del self._signed[session_id]
            expired += 1
        return expired

    # -- helpers ---------------------------------------------------------------------------

    def _account(self, account_id: str) -> AccountShare:
        if self._is_frozen(account_id):
            self.stats.refused_frozen += 1
            raise PoolError(PoolErrorKind.FAILED_PRECONDITION, "account is frozen")
        account = self._lookup(account_id)
        if account is None:
            raise PoolError(PoolErrorKind.NOT_FOUND, "unknown account_id")
        return account

    def _expired(self, session: _Session) -> bool:
        return session.deadline <= trio.current_time()

    def _live(self, session_id: str) -> _Session | None:
        session = self._sessions.get(session_id)
        if session is not None and self._expired(session):
            self.expire(trio.current_time())
            return None
        return session

    def _live_signed(self, session_id: str) -> _Signed | None:
        signed = self._signed.get(session_id)
        if signed is not None and signed[0] <= trio.current_time():
            del self._signed[session_id]
            return None
        return signed

    def _release(self, session: _Session) -> None:
        """Zero the nonces and free the slot (idempotent)."""
        if session.nonces is not None:
            session.nonces.zero()
            session.nonces = None
        if session.token is not None:
            self._free(session.token)
            session.token = None

    def take_slot(self, owner: object, *, what: str) -> str | None:
        """Take one of the ``max_sessions`` slots for ``owner`` (an open DKG holds one, like a
        signing session: counted in ``open_sessions``, awaited by a drain). Returns None, or
        why not (memory above the hard watermark, or no slot free), counted like a refused
        Commit. ``what`` names the refused thing in that message. :meth:`free_slot` returns it.
        """
        overload = self._overloaded()
        if overload is not None:
            self.stats.refused_memory += 1
            return f"not taking new {what}: {overload}"
        try:
            self._limiter.acquire_on_behalf_of_nowait(owner)
        except trio.WouldBlock:
            self.stats.refused_full += 1
            return (
                f"session pool full ({self.max_sessions} slots, shared by signing sessions and "
                f"open DKGs); retry later or raise max_sessions"
            )
        return None

    def free_slot(self, owner: object) -> None:
        """Give back the slot :meth:`take_slot` took for ``owner``."""
        self._free(owner)

    def _free(self, token: object) -> None:
        self._limiter.release_on_behalf_of(token)
        if self._idle is not None and not self._limiter.borrowed_tokens:
            self._idle.set()


def _check_session_id(session_id: str) -> None:
    # The character count first: a string longer than the limit in characters is longer in
    # bytes too, and is refused without encoding it.
    if (
        not session_id
        or len(session_id) > MAX_SESSION_ID_BYTES
        or len(session_id.encode("utf-8")) > MAX_SESSION_ID_BYTES
    ):
        raise PoolError(
            PoolErrorKind.INVALID_ARGUMENT,
            f"session_id must be 1..{MAX_SESSION_ID_BYTES} bytes",
        )


__all__ = [
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_SESSION_TTL_S",
    "CommitResult",
    "PoolError",
    "PoolErrorKind",
    "PoolStats",
    "SessionPool",
]
