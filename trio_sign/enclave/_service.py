"""The ``trio_sign.v1.SignService`` handlers (DESIGN §4) over the ShareStore and SessionPool.

Status codes follow the contract exactly: NOT_FOUND unknown account or session; ALREADY_EXISTS
session id in use for another account; INVALID_ARGUMENT malformed input; RESOURCE_EXHAUSTED
pool full; FAILED_PRECONDITION used session or frozen account; UNAVAILABLE draining or not
ready; DEADLINE_EXCEEDED comes from the server's deadline handling. A share that fails its
lazy verification is DATA_LOSS (the bundle is corrupt for that account). No message contains
key material.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio

from proto_min import sign_service_pb2 as pb

from .. import __version__
from .._errors import ShareFileError
from ..crypto import CIPHERSUITE
from ..rpc import CallContext, RpcError, StatusCode, UnaryHandler, protobuf_handler
from ..shares import AccountShare, ShareStore
from ._pool import (
    ELEMENT_BYTES,
    IDENTIFIER_BYTES,
    MAX_SESSION_ID_BYTES,
    PoolError,
    PoolErrorKind,
    SessionPool,
)

log = logging.getLogger("trio_sign.service")

SERVICE = "/trio_sign.v1.SignService/"
MAX_MESSAGE_BYTES = 64 * 1024
MAX_ACCOUNT_ID_BYTES = 255
MAX_NONCE_BYTES = 512

#: Largest Sign request message accepted by default (``max_sign_request_bytes``): room for a
#: ``MAX_MESSAGE_BYTES`` message and well over a thousand commitments.
DEFAULT_MAX_SIGN_REQUEST_BYTES = 256 * 1024
#: Largest Ping request: an echo payload for liveness checks, which send a few bytes.
MAX_PING_REQUEST_BYTES = 64 * 1024
#: Largest request of the other methods: ids (at most 255 + 128 bytes) or a 512-byte nonce.
MAX_SMALL_REQUEST_BYTES = 4 * 1024

#: GetAttestation rate limit (token bucket on the Trio clock): refill per second and burst.
DEFAULT_ATTESTATION_RATE_PER_S = 20.0
DEFAULT_ATTESTATION_BURST = 40
#: NSM requests in flight at once; more callers (within the rate limit) wait their turn.
DEFAULT_MAX_CONCURRENT_ATTESTATIONS = 4

_STATUS = {
    PoolErrorKind.NOT_FOUND: StatusCode.NOT_FOUND,
    PoolErrorKind.ALREADY_EXISTS: StatusCode.ALREADY_EXISTS,
    PoolErrorKind.INVALID_ARGUMENT: StatusCode.INVALID_ARGUMENT,
    PoolErrorKind.RESOURCE_EXHAUSTED: StatusCode.RESOURCE_EXHAUSTED,
    PoolErrorKind.FAILED_PRECONDITION: StatusCode.FAILED_PRECONDITION,
    PoolErrorKind.UNAVAILABLE: StatusCode.UNAVAILABLE,
}

#: ``nonce -> COSE_Sign1 document``; None where there is no NSM (development mode).
Attestor = Callable[[bytes], Awaitable[bytes]]


def largest_sign_request_bytes(signers: int) -> int:
    """The encoded size of the largest valid Sign request with ``signers`` commitments: the
    longest session id and message, and full-size commitment fields. ``max_sign_request_bytes``
    must be at least this for the largest ``max_signers`` of any account."""
    commitment = pb.SigningCommitment(
        identifier=bytes(IDENTIFIER_BYTES),
        hiding=bytes(ELEMENT_BYTES),
        binding=bytes(ELEMENT_BYTES),
    )
    request = pb.SignRequest(
        session_id="s" * MAX_SESSION_ID_BYTES,
        message=bytes(MAX_MESSAGE_BYTES),
        commitments=[commitment] * signers,
    )
    return int(request.ByteSize())


class _TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``, on the Trio clock (so tests run it
    under ``autojump_clock``); starts full."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated: float | None = None  # set on first use: the Trio clock needs a run

    def take(self) -> bool:
        now = trio.current_time()
        if self._updated is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def _memory_used_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    return 0


def _memory_limit_bytes() -> int:
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw != "max":
            return int(raw)
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 0


class SignService:
    """Request handlers; the state they share is the store, the pool and a few flags.

    Every request's work is bounded before it starts: ids by length, a Sign request by its
    session and then its commitment list against the account's ``max_signers`` (DESIGN §16).
    The message-size cap per method (:meth:`receive_limits`) is enforced by the gRPC server on
    the frames as they arrive, before any parsing.

    Args:
        store: the loaded key shares.
        pool: the session pool over ``store``.
        frozen: the set of frozen account ids, shared with the pool's ``is_frozen``.
        attestor: ``nonce -> document`` from the NSM; None in development mode.
        on_drain: called once when draining starts.
        max_sign_request_bytes: the largest Sign request message accepted, in bytes (default
            :data:`DEFAULT_MAX_SIGN_REQUEST_BYTES`, 256 KiB); larger ones are refused by the
            server before parsing. It must leave room for a ``MAX_MESSAGE_BYTES`` message and a
            two-signer commitment list (:func:`largest_sign_request_bytes`); raise it if an
            account's ``max_signers`` needs more (about 104 bytes per commitment).
        attestation_rate_per_s: GetAttestation calls allowed per second on average (each
            one is an NSM request); more get RESOURCE_EXHAUSTED.
        attestation_burst: GetAttestation calls allowed at once after a quiet period.
        max_concurrent_attestations: NSM requests in flight at once; callers within the rate
            limit wait for a turn (bounded by their own deadline).

    Raises:
        ValueError: a limit is not positive, or ``max_sign_request_bytes`` is too small.

    Attributes:
        state: ``"serving"`` or ``"draining"``.
        frozen: account ids that refuse Commit and Sign (set by the gateway's SSE events).
        last_sse_probe: the nonce of the last SSE ``probe`` event, echoed by GetStatus.
        attestations_refused: GetAttestation calls refused by the rate limit so far.
    """

    def __init__(
        self,
        store: ShareStore,
        pool: SessionPool,
        *,
        frozen: set[str] | None = None,
        attestor: Attestor | None = None,
        on_drain: Callable[[], None] = lambda: None,
        max_sign_request_bytes: int = DEFAULT_MAX_SIGN_REQUEST_BYTES,
        attestation_rate_per_s: float = DEFAULT_ATTESTATION_RATE_PER_S,
        attestation_burst: int = DEFAULT_ATTESTATION_BURST,
        max_concurrent_attestations: int = DEFAULT_MAX_CONCURRENT_ATTESTATIONS,
    ) -> None:
        smallest = largest_sign_request_bytes(2)
        if max_sign_request_bytes < smallest:
            raise ValueError(
                f"max_sign_request_bytes ({max_sign_request_bytes}) must be at least {smallest}: "
                f"a Sign request with a MAX_MESSAGE_BYTES ({MAX_MESSAGE_BYTES}) message and two "
                "commitments must fit"
            )
        if not attestation_rate_per_s > 0:
            raise ValueError("attestation_rate_per_s must be > 0")
        if attestation_burst < 1:
            raise ValueError("attestation_burst must be >= 1")
        if max_concurrent_attestations < 1:
            raise ValueError("max_concurrent_attestations must be >= 1")
        self.store = store
        self.pool = pool
        self.attestor = attestor
        self.state = "serving"
        self.frozen: set[str] = frozen if frozen is not None else set()
        self.last_sse_probe = ""
        self.attestations_refused = 0
        self._on_drain = on_drain
        self._max_sign_request_bytes = max_sign_request_bytes
        self._attestation_bucket = _TokenBucket(attestation_rate_per_s, attestation_burst)
        self._attestation_limiter = trio.CapacityLimiter(max_concurrent_attestations)

    def has_account(self, account_id: str) -> bool:
        """Whether the store holds ``account_id`` (the SSE handler freezes only these)."""
        try:
            return account_id in self.store
        except ShareFileError:  # closed at shutdown: nothing to freeze any more
            return False

    def start_draining(self) -> None:
        """Stop taking new sessions; open ones may still sign (SIGTERM or the SSE ``drain``)."""
        if self.state == "draining":
            return
        self.state = "draining"
        self.pool.stop_accepting()
        self._on_drain()

    def handlers(self) -> dict[str, UnaryHandler]:
        """The method table for :class:`trio_sign.rpc.GrpcServer`."""
        return {
            SERVICE + "Ping": protobuf_handler(pb.PingRequest.FromString, self.ping),
            SERVICE + "GetStatus": protobuf_handler(
                pb.GetStatusRequest.FromString, self.get_status
            ),
            SERVICE + "GetAttestation": protobuf_handler(
                pb.GetAttestationRequest.FromString, self.get_attestation
            ),
            SERVICE + "GetAccount": protobuf_handler(
                pb.GetAccountRequest.FromString, self.get_account
            ),
            SERVICE + "Commit": protobuf_handler(pb.CommitRequest.FromString, self.commit),
            SERVICE + "Sign": protobuf_handler(pb.SignRequest.FromString, self.sign),
            SERVICE + "Abort": protobuf_handler(pb.AbortRequest.FromString, self.abort),
        }

    def receive_limits(self) -> dict[str, int]:
        """The largest request message accepted per method, in bytes, keyed like
        :meth:`handlers`; the gRPC server refuses larger ones as the frames arrive."""
        small = MAX_SMALL_REQUEST_BYTES
        return {
            SERVICE + "Ping": MAX_PING_REQUEST_BYTES,
            SERVICE + "GetStatus": small,
            SERVICE + "GetAttestation": small,
            SERVICE + "GetAccount": small,
            SERVICE + "Commit": small,
            SERVICE + "Sign": self._max_sign_request_bytes,
            SERVICE + "Abort": small,
        }

    # -- handlers --------------------------------------------------------------------------

    async def ping(self, request: pb.PingRequest, context: CallContext) -> pb.PingResponse:
        if self.state != "serving":
            raise RpcError(StatusCode.UNAVAILABLE, "draining")
        return pb.PingResponse(payload=request.payload)

    async def get_status(
        self, request: pb.GetStatusRequest, context: CallContext
    ) -> pb.GetStatusResponse:
        return pb.GetStatusResponse(
            state=self.state,
            accounts=self.store.accounts,
            shares_sha256=self.store.fingerprint or "",
            preload_ms=round(self.store.load_seconds * 1000),
            sessions_open=self.pool.open_sessions,
            sessions_max=self.pool.max_sessions,
            memory_used_bytes=_memory_used_bytes(),
            memory_limit_bytes=_memory_limit_bytes(),
            last_sse_probe=self.last_sse_probe,
            version=__version__,
        )

    async def get_attestation(
        self, request: pb.GetAttestationRequest, context: CallContext
    ) -> pb.GetAttestationResponse:
        if self.attestor is None:
            raise RpcError(
                StatusCode.UNAVAILABLE, "attestation needs the NSM; not available in --dev mode"
            )
        if len(request.nonce) > MAX_NONCE_BYTES:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, f"nonce must be at most {MAX_NONCE_BYTES} bytes"
            )
        if not self._attestation_bucket.take():
            self.attestations_refused += 1
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED, "attestation rate limit exceeded; retry later"
            )
        async with self._attestation_limiter:
            document = await self.attestor(request.nonce)
        return pb.GetAttestationResponse(document=document)

    async def get_account(
        self, request: pb.GetAccountRequest, context: CallContext
    ) -> pb.GetAccountResponse:
        account = self._account(request.account_id)
        return pb.GetAccountResponse(
            account_id=account.account_id,
            ciphersuite=CIPHERSUITE,
            group_public_key=account.group_public_key,
            identifier=account.identifier,
            verifying_share=account.verifying_share,
            min_signers=account.min_signers,
            max_signers=account.max_signers,
        )

    async def commit(self, request: pb.CommitRequest, context: CallContext) -> pb.CommitResponse:
        _check_account_id(request.account_id)
        if request.account_id in self.frozen:
            raise RpcError(StatusCode.FAILED_PRECONDITION, "account is frozen")
        with _map_errors():
            result = self.pool.commit(request.account_id, request.session_id)
        c = result.commitment
        return pb.CommitResponse(
            identifier=c.identifier,
            hiding=c.hiding,
            binding=c.binding,
            expires_at_unix_ms=result.expires_at_unix_ms,
        )

    async def sign(self, request: pb.SignRequest, context: CallContext) -> pb.SignResponse:
        if len(request.message) > MAX_MESSAGE_BYTES:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, f"message must be at most {MAX_MESSAGE_BYTES} bytes"
            )
        # The commitments go to the pool as received: it checks the session, the list's length
        # and every field's size before building anything (work bounded by max_signers).
        with _map_errors():
            identifier, share = self.pool.sign(
                request.session_id, request.message, request.commitments
            )
        return pb.SignResponse(identifier=identifier, signature_share=share)

    async def abort(self, request: pb.AbortRequest, context: CallContext) -> pb.AbortResponse:
        with _map_errors():
            self.pool.abort(request.session_id)
        return pb.AbortResponse()

    # -- helpers ---------------------------------------------------------------------------

    def _account(self, account_id: str) -> AccountShare:
        _check_account_id(account_id)
        with _map_errors():
            account = self.store.get(account_id)
        if account is None:
            raise RpcError(StatusCode.NOT_FOUND, "unknown account_id")
        return account


@contextlib.contextmanager
def _map_errors() -> Iterator[None]:
    """Translate pool and share-store errors into gRPC statuses at the handler boundary."""
    try:
        yield
    except PoolError as exc:
        raise RpcError(_STATUS[exc.kind], str(exc)) from None
    except ShareFileError as exc:
        log.error("account share failed verification", extra={"reason": exc.reason})
        raise RpcError(
            StatusCode.DATA_LOSS, f"account share failed verification ({exc.reason})"
        ) from None


def _check_account_id(account_id: str) -> None:
    # The character count first: longer in characters is longer in bytes, refused unencoded.
    if (
        not account_id
        or len(account_id) > MAX_ACCOUNT_ID_BYTES
        or len(account_id.encode("utf-8")) > MAX_ACCOUNT_ID_BYTES
    ):
        raise RpcError(
            StatusCode.INVALID_ARGUMENT, f"account_id must be 1..{MAX_ACCOUNT_ID_BYTES} bytes"
        )
