"""The signing session pool: FROST round-one state between Commit and Sign.

A session holds a pool slot (a ``trio.CapacityLimiter`` token) from ``Commit`` until ``Sign``,
``Abort`` or expiry, and its nonces from ``Commit`` until ``Sign`` consumes them, ``Abort``
drops them or the TTL runs out. Nonces are zeroed on every one of those paths.

After ``Sign`` the session keeps only public data (a digest of the request and the signature
share) until its TTL ends, so a byte-identical retry gets the same share and any different
request is refused: the nonces are never used twice.

All state changes happen without an ``await`` in between, so they are atomic under Trio.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import trio

from .._errors import FrostError, TrioSignError
from ..crypto import SigningCommitment, SigningNonces, commit, sign
from ..shares import AccountShare

log = logging.getLogger("trio_sign.pool")

DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_SESSION_TTL_S = 60.0
MAX_SESSION_ID_BYTES = 128


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


@dataclass(frozen=True, slots=True)
class CommitResult:
    commitment: SigningCommitment
    expires_at_unix_ms: int


class _Session:
    __slots__ = (
        "account_id",
        "commitment",
        "deadline",
        "expires_at_unix_ms",
        "nonces",
        "request_digest",
        "share",
        "token",
    )

    def __init__(
        self, account_id: str, nonces: SigningNonces, deadline: float, expires_at_unix_ms: int
    ) -> None:
        self.account_id = account_id
        self.commitment = nonces.commitment  # public; kept for Commit retries after Sign
        self.nonces: SigningNonces | None = nonces
        self.deadline = deadline
        self.expires_at_unix_ms = expires_at_unix_ms
        self.token: object | None = None  # the limiter borrower while the slot is held
        self.request_digest: bytes | None = None
        self.share: bytes | None = None


def _request_digest(message: bytes, commitments: Sequence[SigningCommitment]) -> bytes:
    h = hashlib.sha256()
    h.update(len(message).to_bytes(8, "big"))
    h.update(message)
    for c in commitments:
        for part in (c.identifier, c.hiding, c.binding):
            h.update(len(part).to_bytes(2, "big"))
            h.update(part)
    return h.digest()


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
        # Insertion order is expiry order because the TTL is the same for every session.
        self._sessions: dict[str, _Session] = {}
        self._wakeup = trio.Event()
        self._accepting = True

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
        return len(self._sessions)

    def stop_accepting(self) -> None:
        """Drain: refuse new sessions (UNAVAILABLE); open ones may still sign."""
        self._accepting = False

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
        if not self._accepting:
            raise PoolError(PoolErrorKind.UNAVAILABLE, "draining: not taking new sessions")
        overload = self._overloaded()
        if overload is not None:
            raise PoolError(
                PoolErrorKind.RESOURCE_EXHAUSTED, f"not taking new sessions: {overload}"
            )
        account = self._account(account_id)
        token = object()
        try:
            self._limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            raise PoolError(
                PoolErrorKind.RESOURCE_EXHAUSTED,
                f"session pool full ({self.max_sessions} open sessions); retry later "
                "or raise max_sessions",
            ) from None
        try:
            nonces = commit(account.identifier, account.signing_share)
        except BaseException:
            self._limiter.release_on_behalf_of(token)
            raise
        now = trio.current_time()
        expires_ms = int((time.time() + self._ttl) * 1000)
        session = _Session(account_id, nonces, now + self._ttl, expires_ms)
        session.token = token
        self._sessions[session_id] = session
        if len(self._sessions) == 1:
            self._wakeup.set()
        return CommitResult(nonces.commitment, expires_ms)

    def sign(
        self, session_id: str, message: bytes, commitments: Sequence[SigningCommitment]
    ) -> tuple[bytes, bytes]:
        """FROST round two: consume the session's nonces exactly once; free its slot.

        A byte-identical retry returns the same share; any other request for a signed session
        is FAILED_PRECONDITION. Invalid input (INVALID_ARGUMENT) leaves the session usable.

        Returns:
            ``(identifier, signature_share)``: this signer's identifier and its share.
        """
        session = self._live(session_id)
        if session is None:
            raise PoolError(PoolErrorKind.NOT_FOUND, "unknown or expired session_id")
        digest = _request_digest(message, commitments)
        if session.nonces is None:
            if session.request_digest == digest and session.share is not None:
                return session.commitment.identifier, session.share
            raise PoolError(
                PoolErrorKind.FAILED_PRECONDITION,
                "session already signed a different request; open a new session",
            )
        if self._is_frozen(session.account_id):
            raise PoolError(PoolErrorKind.FAILED_PRECONDITION, "account is frozen")
        account = self._account(session.account_id)
        nonces = session.nonces
        try:
            share = sign(
                nonces,
                signing_share=account.signing_share,
                group_public_key=account.group_public_key,
                message=message,
                commitments=commitments,
                min_signers=account.min_signers,
                max_signers=account.max_signers,
            )
        except FrostError as exc:
            if nonces.used:  # pragma: no cover - sign() only fails before consuming
                self._release(session)
            raise PoolError(PoolErrorKind.INVALID_ARGUMENT, str(exc)) from None
        except BaseException:
            # Anything unexpected after the nonces may have been touched: drop them for good.
            nonces.zero()
            self._release(session)
            raise
        session.request_digest = digest
        session.share = share
        self._release(session)
        return session.commitment.identifier, share

    def abort(self, session_id: str) -> None:
        """Drop the session and zero its nonces (also forgets a signed session)."""
        session = self._sessions.pop(session_id, None)
        if session is None or self._expired(session):
            if session is not None:
                self._release(session)
            raise PoolError(PoolErrorKind.NOT_FOUND, "unknown or expired session_id")
        self._release(session)

    def abort_all(self) -> int:
        """Zero every session's nonces and free every slot (shutdown). Returns how many held
        nonces."""
        count = 0
        for session in self._sessions.values():
            if session.nonces is not None:
                count += 1
            self._release(session)
        self._sessions.clear()
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
                first = next(iter(self._sessions.values()), None)
                if first is None:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                await trio.sleep_until(first.deadline)
                self.expire(trio.current_time())
        finally:
            dropped = self.abort_all()
            if dropped:
                log.info("zeroed nonces of open sessions at shutdown", extra={"sessions": dropped})

    def expire(self, now: float) -> int:
        """Drop every session whose deadline is at or before ``now``; returns how many."""
        expired = 0
        while self._sessions:
            session_id, session = next(iter(self._sessions.items()))
            if session.deadline > now:
                break
            del self._sessions[session_id]
            self._release(session)
            expired += 1
        return expired

    # -- helpers ---------------------------------------------------------------------------

    def _account(self, account_id: str) -> AccountShare:
        if self._is_frozen(account_id):
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

    def _release(self, session: _Session) -> None:
        """Zero the nonces and free the slot (idempotent)."""
        if session.nonces is not None:
            session.nonces.zero()
            session.nonces = None
        if session.token is not None:
            self._limiter.release_on_behalf_of(session.token)
            session.token = None


def _check_session_id(session_id: str) -> None:
    if not session_id or len(session_id.encode("utf-8")) > MAX_SESSION_ID_BYTES:
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
    "SessionPool",
]
