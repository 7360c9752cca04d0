"""The ``trio_sign.v1.SignService`` handlers (DESIGN §4) over the ShareStore and SessionPool.

Status codes follow the contract exactly: NOT_FOUND unknown account or session; ALREADY_EXISTS
session id in use for another account; INVALID_ARGUMENT malformed input; RESOURCE_EXHAUSTED
pool full; FAILED_PRECONDITION used session or frozen account; UNAVAILABLE draining or not
ready; DEADLINE_EXCEEDED comes from the server's deadline handling. A share that fails its
lazy verification is DATA_LOSS (the bundle is corrupt for that account). No message contains
key material.

Each account signs with its own ciphersuite (DESIGN §14): ``GetAccount`` names it, and the
account's keys, identifiers and commitments travel in that suite's encodings. ``Sign`` passes
``taproot_merkle_root`` on only when the request carries the field (proto3 ``optional``: an
empty root is not an absent one), and the pool refuses it for any suite but Taproot.

``Sign`` is authorized (DESIGN §11): once the request is well formed for a live session, its
approvals are checked against the account's policy (:class:`~trio_sign.authz.Authorizer`)
before the nonces or the share are touched; a refusal is PERMISSION_DENIED naming what is
missing and leaves the session usable. Every decision is an audit record (logger
``trio_sign.audit``, ``"audit": "sign"``) and is counted by policy and outcome.

The DKG rpcs (``DkgRound1``/``2``/``3``, DESIGN §13, docs/key-lifecycle.md §5) are served by
the :class:`~trio_sign.enclave._dkg.DkgRegistry` given as ``dkg``: PERMISSION_DENIED for
approvals that do not satisfy the ``create`` policy, INVALID_ARGUMENT naming the culprit
participant for a bad package, proof, signature or share, NOT_FOUND for an unknown or expired
dkg_id, ALREADY_EXISTS for an account that exists or a dkg_id in use with other parameters,
RESOURCE_EXHAUSTED when ``[dkg] max_open`` DKGs are open or the pool is full, UNAVAILABLE when
the delta could not be stored (nothing was created). ``DkgRound1`` with ``operation =
"refresh"`` refreshes an existing account's share under the ``refresh`` policy, and
``RepairStep1``/``RepairStep2`` help repair another participant's share under the ``repair``
policy, through the same registry (docs/refresh-repair.md). Without a registry (no ``[dkg]``,
no identity key or no delta writer) they all answer FAILED_PRECONDITION.

``Compact`` (docs/compaction.md) seals every account into a new base through the
:class:`~trio_sign.enclave._compact.Compactor` given as ``compactor``, under the reserved
``compact`` policy: PERMISSION_DENIED for a KMS key not in ``[bundles] compaction_kms_keys``
or approvals that do not satisfy the policy, INVALID_ARGUMENT for a malformed request,
ABORTED while another compaction runs or deltas keep arriving, UNAVAILABLE when KMS or the
parent did not deliver (nothing was stored, or an unreferenced object was), and
FAILED_PRECONDITION without a compactor (no identity key or no deltas channel).

Every call is counted by method and status code, Commit and Sign also as sessions and
signatures by outcome, with their latency, in :attr:`SignService.metrics` (a
:class:`~trio_sign._metrics.Registry`; docs/operations.md, "Metrics"). Its labels are
bounded: methods, status codes, outcomes and refusal reasons, never an account or session id.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import trio

from proto_min import sign_service_pb2 as pb

from .. import __version__
from .._errors import ShareFileError
from .._metrics import CounterChild, Registry
from ..authz import DEVELOPMENT_POLICIES, ApprovalDenied, Authorizer
from ..nitro._binding import NO_DELTAS
from ..rpc import (
    CallContext,
    RpcError,
    ServerStats,
    StatusCode,
    UnaryHandler,
    protobuf_handler,
)
from ..shares import AccountShare, ShareStore
from ..transport import TlsStats
from ._compact import COMPACT_POLICY, CompactionError, Compactor, compaction_approval_message
from ._dkg import DkgRegistry, largest_dkg_requests
from ._memory import MemoryWatermark, read_memory_limit_bytes, read_rss_bytes
from ._pool import (
    IDENTIFIER_BYTES,
    MAX_ELEMENT_BYTES,
    MAX_SESSION_ID_BYTES,
    MERKLE_ROOT_BYTES,
    PoolError,
    PoolErrorKind,
    SessionPool,
)

log = logging.getLogger("trio_sign.service")
audit_log = logging.getLogger("trio_sign.audit")
# Every authorization decision must leave its audit record, whatever level is chosen.
audit_log.setLevel(logging.INFO)

SERVICE = "/trio_sign.v1.SignService/"
MAX_MESSAGE_BYTES = 64 * 1024
MAX_ACCOUNT_ID_BYTES = 255
MAX_NONCE_BYTES = 512
#: The methods the public listener serves (DESIGN §10): health and attestation, nothing else.
PUBLIC_METHODS: Final = ("Ping", "GetStatus", "GetAttestation")

#: Largest Sign request message accepted by default (``max_sign_request_bytes``): room for a
#: ``MAX_MESSAGE_BYTES`` message and well over a thousand commitments.
DEFAULT_MAX_SIGN_REQUEST_BYTES = 256 * 1024
#: Largest Ping request: an echo payload for liveness checks, which send a few bytes.
MAX_PING_REQUEST_BYTES = 64 * 1024
#: Largest request of the other methods: ids (at most 255 + 128 bytes) or a 512-byte nonce.
MAX_SMALL_REQUEST_BYTES = 4 * 1024
#: The largest ``Compact`` request (a key ARN, a request id and the approvals).
MAX_COMPACT_REQUEST_BYTES: Final = 64 * 1024
#: The longest ``CompactRequest.request_id``.
MAX_COMPACT_REQUEST_ID_CHARS: Final = 128
#: ``Compact``'s status per :class:`CompactionError` reason (UNAVAILABLE otherwise).
_COMPACTION_STATUS: Final = {
    "kms_key_not_allowed": StatusCode.PERMISSION_DENIED,
    "no_identity": StatusCode.FAILED_PRECONDITION,
    "in_progress": StatusCode.ABORTED,
    "busy": StatusCode.ABORTED,
    "bad_base": StatusCode.INTERNAL,
}

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
    longest session id and message, commitment fields of the largest suite's size (33-byte
    secp256k1 points) and a 32-byte Taproot merkle root. ``max_sign_request_bytes`` must be at
    least this for the largest ``max_signers`` of any account."""
    commitment = pb.SigningCommitment(
        identifier=bytes(IDENTIFIER_BYTES),
        hiding=bytes(MAX_ELEMENT_BYTES),
        binding=bytes(MAX_ELEMENT_BYTES),
    )
    request = pb.SignRequest(
        session_id="s" * MAX_SESSION_ID_BYTES,
        message=bytes(MAX_MESSAGE_BYTES),
        commitments=[commitment] * signers,
        taproot_merkle_root=bytes(MERKLE_ROOT_BYTES),
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


#: The status codes a caller caused (its input, the session's state, or the node's load).
_REFUSED: Final = frozenset(
    {
        StatusCode.INVALID_ARGUMENT,
        StatusCode.NOT_FOUND,
        StatusCode.ALREADY_EXISTS,
        StatusCode.FAILED_PRECONDITION,
        StatusCode.RESOURCE_EXHAUSTED,
        StatusCode.UNAVAILABLE,
        StatusCode.PERMISSION_DENIED,
        StatusCode.UNAUTHENTICATED,
        StatusCode.OUT_OF_RANGE,
    }
)
_CANCELLED: Final = frozenset({StatusCode.CANCELLED, StatusCode.DEADLINE_EXCEEDED})
#: Methods whose latency is measured (a histogram each): the two rounds of a signing session.
_TIMED: Final = frozenset({"Commit", "Sign"})


def _outcome(code: StatusCode, ok: str) -> str:
    """``ok`` for OK; ``refused`` for what the caller caused; ``cancelled`` for a deadline or
    a cancelled call; ``failed`` for the rest (INTERNAL, DATA_LOSS, UNKNOWN: our side)."""
    if code == StatusCode.OK:
        return ok
    if code in _REFUSED:
        return "refused"
    if code in _CANCELLED:
        return "cancelled"
    return "failed"


def _status_of(exc: BaseException, context: CallContext) -> StatusCode:
    """The status the server answers for a handler that raised ``exc``."""
    if isinstance(exc, RpcError):
        return exc.status
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _status_of(exc.exceptions[0], context)
    if isinstance(exc, trio.Cancelled):
        if trio.current_time() >= context.deadline:
            return StatusCode.DEADLINE_EXCEEDED
        return StatusCode.CANCELLED
    return StatusCode.INTERNAL


def _memory_used_bytes() -> int:
    try:
        return read_rss_bytes()
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        return 0


def _memory_limit_bytes() -> int:
    try:
        return read_memory_limit_bytes()
    except (OSError, ValueError):  # pragma: no cover - non-Linux
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
        on_undrain: called when the gateway's ``undrain`` ends a drain it asked for.
        memory: the watermark that refuses new sessions; GetStatus reports its limit and its
            last sample (the numbers that are enforced). None (development): the process's
            RSS and the cgroup or ``MemTotal`` limit, read on each call.
        max_sign_request_bytes: the largest Sign request message accepted, in bytes (default
            :data:`DEFAULT_MAX_SIGN_REQUEST_BYTES`, 256 KiB); larger ones are refused by the
            server before parsing. It must leave room for a ``MAX_MESSAGE_BYTES`` message and a
            two-signer commitment list (:func:`largest_sign_request_bytes`); raise it if an
            account's ``max_signers`` needs more (about 104 bytes per Ed25519 commitment, 106
            per secp256k1 one).
        attestation_rate_per_s: GetAttestation calls allowed per second on average (each
            one is an NSM request); more get RESOURCE_EXHAUSTED.
        attestation_burst: GetAttestation calls allowed at once after a quiet period.
        max_concurrent_attestations: NSM requests in flight at once; callers within the rate
            limit wait for a turn (bounded by their own deadline).
        config_sha256: SHA-256 of the measured configuration file (32 bytes), reported by
            GetStatus (``config_sha256``); None: reported empty.
        authorizer: decides every Sign against the account's policy (built from the measured
            configuration's ``[approvers]`` and ``[policies]``). None: the development
            policies, where ``default`` needs no approvals (tests and ``--dev``; the enclave
            always passes its configuration's).
        dkg: the DKGs this enclave takes part in (``[dkg]``, the identity key and the delta
            writer); None: the DKG rpcs answer FAILED_PRECONDITION.

    Raises:
        ValueError: a limit is not positive, or ``max_sign_request_bytes`` is too small.

    Attributes:
        state: ``"serving"`` or ``"draining"``.
        metrics: this service's metrics (calls, sessions, signatures, latency, pool
            occupancy, refusals, build info); ``metrics.snapshot()`` is what travels to the
            parent.
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
        on_undrain: Callable[[], None] = lambda: None,
        memory: MemoryWatermark | None = None,
        max_sign_request_bytes: int = DEFAULT_MAX_SIGN_REQUEST_BYTES,
        attestation_rate_per_s: float = DEFAULT_ATTESTATION_RATE_PER_S,
        attestation_burst: int = DEFAULT_ATTESTATION_BURST,
        max_concurrent_attestations: int = DEFAULT_MAX_CONCURRENT_ATTESTATIONS,
        config_sha256: bytes | None = None,
        authorizer: Authorizer | None = None,
        dkg: DkgRegistry | None = None,
        compactor: Compactor | None = None,
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
        self.memory = memory
        self.config_sha256 = "" if config_sha256 is None else config_sha256.hex()
        #: Delta bundles loaded and the head of their chain (DESIGN §12); none yet.
        self.deltas = 0
        self.deltas_head = NO_DELTAS.hex()
        self._on_drain = on_drain
        self._on_undrain = on_undrain
        self._drain_is_final = False
        self._frozen_refused = 0
        self._server_stats: list[ServerStats] = []
        self._tls_stats: list[TlsStats] = []
        self._max_sign_request_bytes = max_sign_request_bytes
        self._attestation_bucket = _TokenBucket(attestation_rate_per_s, attestation_burst)
        self._attestation_limiter = trio.CapacityLimiter(max_concurrent_attestations)
        self.authorizer = authorizer if authorizer is not None else Authorizer(DEVELOPMENT_POLICIES)
        self.dkg = dkg
        self.compactor = compactor
        self.metrics = Registry()
        self._init_metrics()

    def has_account(self, account_id: str) -> bool:
        """Whether the store holds ``account_id`` (the SSE handler freezes only these)."""
        try:
            return account_id in self.store
        except ShareFileError:  # closed at shutdown: nothing to freeze any more
            return False

    def start_draining(self, *, reversible: bool = False) -> None:
        """Stop taking new sessions; open ones may still sign.

        Args:
            reversible: the gateway's SSE ``drain``, which its ``undrain`` may end
                (:meth:`stop_draining`). False (SIGTERM, the parent's stop): for good, also
                when the gateway had drained first.
        """
        if not reversible:
            self._drain_is_final = True
        if self.state == "draining":
            return
        self.state = "draining"
        self.pool.stop_accepting()
        self._on_drain()

    def stop_draining(self) -> bool:
        """Take new sessions again after a reversible drain (the SSE ``undrain``); returns
        whether the service is serving now. A drain for good (the process is stopping) is not
        undone: returns False."""
        if self.state != "draining":
            return True
        if self._drain_is_final:
            return False
        self.state = "serving"
        self.pool.start_accepting()
        self._on_undrain()
        return True

    def observe_server(self, stats: ServerStats) -> None:
        """Count the gRPC server's refusals (``GrpcServer.stats``) in :attr:`metrics` too."""
        self._server_stats.append(stats)

    def observe_tls(self, stats: TlsStats) -> None:
        """Count the TLS listener's refusals (``TlsListener.stats``) in :attr:`metrics` too."""
        self._tls_stats.append(stats)

    def handlers(self) -> dict[str, UnaryHandler]:
        """The method table for :class:`trio_sign.rpc.GrpcServer`; every handler is counted
        in :attr:`metrics` (a request that does not parse too)."""
        table: dict[str, UnaryHandler] = {
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
            SERVICE + "DkgRound1": protobuf_handler(
                pb.DkgRound1Request.FromString, self.dkg_round1
            ),
            SERVICE + "DkgRound2": protobuf_handler(
                pb.DkgRound2Request.FromString, self.dkg_round2
            ),
            SERVICE + "DkgRound3": protobuf_handler(
                pb.DkgRound3Request.FromString, self.dkg_round3
            ),
            SERVICE + "RepairStep1": protobuf_handler(
                pb.RepairStep1Request.FromString, self.repair_step1
            ),
            SERVICE + "RepairStep2": protobuf_handler(
                pb.RepairStep2Request.FromString, self.repair_step2
            ),
            SERVICE + "Compact": protobuf_handler(pb.CompactRequest.FromString, self.compact),
        }
        return {path: self._counted(path, handler) for path, handler in table.items()}

    def public_handlers(self) -> dict[str, UnaryHandler]:
        """The method table of the public (h2c) listener: ``Ping``, ``GetStatus`` and
        ``GetAttestation`` only (DESIGN §10); the server answers UNIMPLEMENTED to the rest."""
        table = self.handlers()
        return {SERVICE + name: table[SERVICE + name] for name in PUBLIC_METHODS}

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
            **{SERVICE + name: size for name, size in largest_dkg_requests().items()},
            SERVICE + "Compact": MAX_COMPACT_REQUEST_BYTES,
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
            memory_used_bytes=(
                self.memory.used_bytes if self.memory is not None else _memory_used_bytes()
            ),
            memory_limit_bytes=(
                self.memory.limit_bytes if self.memory is not None else _memory_limit_bytes()
            ),
            last_sse_probe=self.last_sse_probe,
            version=__version__,
            deltas=self.deltas,
            deltas_head=self.deltas_head,
            config_sha256=self.config_sha256,
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
            ciphersuite=account.ciphersuite,
            group_public_key=account.group_public_key,
            identifier=account.identifier,
            verifying_share=account.verifying_share,
            min_signers=account.min_signers,
            max_signers=account.max_signers,
        )

    async def commit(self, request: pb.CommitRequest, context: CallContext) -> pb.CommitResponse:
        _check_account_id(request.account_id)
        if request.account_id in self.frozen:
            self._frozen_refused += 1
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
        session_id = request.session_id
        # Presence, not truthiness: an empty root is a BIP-341 tweak, an absent one is none.
        merkle_root = (
            request.taproot_merkle_root if request.HasField("taproot_merkle_root") else None
        )

        def authorize(account: AccountShare) -> None:
            self._authorize(account, session_id, request)

        # The commitments go to the pool as received: it checks the session, the merkle root
        # against the account's suite, the list's length and every field's size before building
        # anything (work bounded by max_signers), then asks ``authorize`` before it touches the
        # nonces.
        with _map_errors():
            identifier, share = self.pool.sign(
                session_id,
                request.message,
                request.commitments,
                merkle_root=merkle_root,
                authorize=authorize,
            )
        return pb.SignResponse(identifier=identifier, signature_share=share)

    def _authorize(self, account: AccountShare, session_id: str, request: pb.SignRequest) -> None:
        """Decide, write the audit record, count; raise :class:`ApprovalDenied` on refusal."""
        decision = self.authorizer.decide(
            account_id=account.account_id,
            policy=account.policy,
            session_id=session_id,
            message=request.message,
            approvals=request.approvals,
            now=trio.current_time(),
        )
        audit_log.info(
            "sign authorization",
            extra={
                "audit": "sign",
                "account_id": account.account_id,
                "session_id": session_id,
                "message_sha256": decision.message_sha256,
                "approvers": ",".join(decision.approvers),
                "policy": decision.policy,
                "outcome": "allowed" if decision.allowed else "refused",
                "reason": decision.reason,
            },
        )
        self._authorizations.labels(policy=decision.policy, outcome=decision.reason).inc()
        if not decision.allowed:
            raise ApprovalDenied(decision)

    async def abort(self, request: pb.AbortRequest, context: CallContext) -> pb.AbortResponse:
        with _map_errors():
            self.pool.abort(request.session_id)
        return pb.AbortResponse()

    async def dkg_round1(
        self, request: pb.DkgRound1Request, context: CallContext
    ) -> pb.DkgRound1Response:
        registry = self._dkg_registry()
        with _map_errors():
            return registry.round1(request)

    async def dkg_round2(
        self, request: pb.DkgRound2Request, context: CallContext
    ) -> pb.DkgRound2Response:
        registry = self._dkg_registry()
        with _map_errors():
            return registry.round2(request)

    async def dkg_round3(
        self, request: pb.DkgRound3Request, context: CallContext
    ) -> pb.DkgRound3Response:
        registry = self._dkg_registry()
        with _map_errors():
            return await registry.round3(request)

    async def repair_step1(
        self, request: pb.RepairStep1Request, context: CallContext
    ) -> pb.RepairStep1Response:
        registry = self._dkg_registry()
        with _map_errors():
            return registry.repair_step1(request)

    async def repair_step2(
        self, request: pb.RepairStep2Request, context: CallContext
    ) -> pb.RepairStep2Response:
        registry = self._dkg_registry()
        with _map_errors():
            return registry.repair_step2(request)

    async def compact(self, request: pb.CompactRequest, context: CallContext) -> pb.CompactResponse:
        compactor = self.compactor
        if compactor is None:
            raise RpcError(
                StatusCode.FAILED_PRECONDITION,
                "this enclave cannot compact (no delta identity key or no deltas channel)",
            )
        kms_key_id, request_id = request.kms_key_id, request.request_id
        if not 1 <= len(request_id) <= MAX_COMPACT_REQUEST_ID_CHARS:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"request_id must be 1..{MAX_COMPACT_REQUEST_ID_CHARS} characters",
            )
        if kms_key_id not in compactor.allowed_kms_keys:
            raise RpcError(
                StatusCode.PERMISSION_DENIED,
                "not authorized (kms_key_not_allowed): the KMS key is not in [bundles] "
                "compaction_kms_keys of the measured configuration",
            )
        decision = self.authorizer.decide(
            account_id="",
            policy=COMPACT_POLICY,
            session_id=request_id,
            message=compaction_approval_message(kms_key_id),
            approvals=request.approvals,
            now=trio.current_time(),
        )
        audit_log.info(
            "compact authorization",
            extra={
                "audit": "compact",
                "request_id": request_id,
                "kms_key_id": kms_key_id,
                "approvers": ",".join(decision.approvers),
                "policy": decision.policy,
                "outcome": "allowed" if decision.allowed else "refused",
                "reason": decision.reason,
            },
        )
        if not decision.allowed:
            raise RpcError(
                StatusCode.PERMISSION_DENIED, f"not authorized ({decision.reason}): {decision}"
            )
        try:
            with _map_errors():
                result = await compactor.compact(kms_key_id)
        except CompactionError as exc:
            raise RpcError(
                _COMPACTION_STATUS.get(exc.reason, StatusCode.UNAVAILABLE),
                f"compaction failed ({exc.reason}): {exc}",
            ) from None
        return pb.CompactResponse(
            sha256=result.sha256,
            accounts=result.accounts,
            deltas=result.deltas,
            object=result.object,
        )

    def _dkg_registry(self) -> DkgRegistry:
        if self.dkg is None:
            raise RpcError(
                StatusCode.FAILED_PRECONDITION,
                "this enclave takes part in no DKG (enclave.toml has no [dkg], or there is no "
                "delta identity key or delta store)",
            )
        return self.dkg

    # -- metrics ---------------------------------------------------------------------------

    def _init_metrics(self) -> None:
        m = self.metrics
        m.build_info("enclave", __version__)
        self._requests = m.counter(
            "trio_sign_requests_total",
            "SignService calls answered, by method and gRPC status code.",
            ("method", "code"),
        )
        self._sessions = m.counter(
            "trio_sign_sessions_total",
            "Commit calls (sessions opened or refused), by outcome and gRPC status code.",
            ("outcome", "code"),
        )
        self._signatures = m.counter(
            "trio_sign_signatures_total",
            "Sign calls (signature shares made or refused), by outcome and gRPC status code.",
            ("outcome", "code"),
        )
        self._authorizations = m.counter(
            "trio_sign_authorizations_total",
            "Sign authorization decisions (DESIGN §11), by the account's policy and outcome "
            "(allowed, or the refusal reason).",
            ("policy", "outcome"),
        )
        self._latency = m.histogram(
            "trio_sign_request_duration_seconds",
            "Time a Commit or Sign call spent in its handler (parsing included), in seconds.",
            ("method",),
        )
        ended = m.counter(
            "trio_sign_sessions_ended_total",
            "Sessions that held a pool slot and ended, by how (signed, aborted, expired, "
            "shutdown, failed).",
            ("outcome",),
        )
        refusals = m.counter(
            "trio_sign_refusals_total",
            "Requests and connections refused to protect the enclave, by reason.",
            ("reason",),
        )
        open_ = m.gauge("trio_sign_pool_sessions_open", "Sessions holding a pool slot now.")
        max_ = m.gauge("trio_sign_pool_sessions_max", "Pool slots (max_sessions).")
        tracked = m.gauge(
            "trio_sign_pool_sessions_tracked",
            "Sessions the pool remembers now, signed ones kept for retries included.",
        )
        frozen = m.gauge("trio_sign_frozen_accounts", "Accounts frozen by the gateway now.")
        draining = m.gauge("trio_sign_draining", "1 while not taking new sessions (draining).")

        def collect() -> None:
            pool = self.pool
            stats = pool.stats
            open_.set(pool.open_sessions)
            max_.set(pool.max_sessions)
            tracked.set(pool.tracked_sessions)
            frozen.set(len(self.frozen))
            draining.set(1 if self.state == "draining" else 0)
            for outcome, n in (
                ("signed", stats.signed),
                ("aborted", stats.aborted),
                ("expired", stats.expired),
                ("shutdown", stats.closed_at_shutdown),
                ("failed", stats.failed),
            ):
                ended.labels(outcome=outcome).set_total(n)
            reasons = {
                "pool_full": stats.refused_full,
                "draining": stats.refused_draining,
                "memory_hard": stats.refused_memory,
                "account_frozen": stats.refused_frozen + self._frozen_refused,
                "attestation_rate": self.attestations_refused,
            }
            for server in self._server_stats:
                for reason, n in _server_refusals(server):
                    reasons[reason] = reasons.get(reason, 0) + n
            for tls in self._tls_stats:
                for reason, n in _tls_refusals(tls):
                    reasons[reason] = reasons.get(reason, 0) + n
            for reason, n in reasons.items():
                refusals.labels(reason=reason).set_total(n)

        m.on_collect(collect)

    def _counted(self, path: str, handler: UnaryHandler) -> UnaryHandler:
        method = path.removeprefix(SERVICE)
        kind = {"Commit": self._sessions, "Sign": self._signatures}.get(method)
        ok = "opened" if method == "Commit" else "signed"
        latency = self._latency.labels(method=method) if method in _TIMED else None
        # The series of each status code, bound on first use: a call costs two increments.
        series: dict[StatusCode, tuple[CounterChild, CounterChild | None]] = {}

        def count(code: StatusCode) -> None:
            bound = series.get(code)
            if bound is None:
                name = code.name
                bound = series[code] = (
                    self._requests.labels(method=method, code=name),
                    None if kind is None else kind.labels(outcome=_outcome(code, ok), code=name),
                )
            bound[0].inc()
            if bound[1] is not None:
                bound[1].inc()

        async def counted(data: bytes, context: CallContext) -> bytes:
            started = trio.current_time()
            code = StatusCode.OK
            try:
                return await handler(data, context)
            except BaseException as exc:  # only to count it; re-raised as it was
                code = _status_of(exc, context)
                raise
            finally:
                count(code)
                if latency is not None:
                    latency.observe(max(0.0, trio.current_time() - started))

        return counted

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
    except ApprovalDenied as exc:
        raise RpcError(
            StatusCode.PERMISSION_DENIED, f"not authorized ({exc.reason}): {exc}"
        ) from None
    except ShareFileError as exc:
        log.error("account share failed verification", extra={"reason": exc.reason})
        raise RpcError(
            StatusCode.DATA_LOSS, f"account share failed verification ({exc.reason})"
        ) from None


def _server_refusals(stats: ServerStats) -> tuple[tuple[str, int], ...]:
    """The gRPC server's refusal counters under their ``reason`` label."""
    return (
        ("connection_limit", stats.connections_refused),
        ("connection_evicted", stats.connections_evicted),
        ("preface_timeout", stats.preface_timeouts),
        ("idle_timeout", stats.idle_closed),
        ("request_timeout", stats.request_timeouts),
        ("send_stall", stats.send_stalls),
        ("flood", stats.floods),
        ("stream_refused", stats.streams_refused),
        ("connection_paced", stats.connections_paced),
    )


def _tls_refusals(stats: TlsStats) -> tuple[tuple[str, int], ...]:
    """The TLS listener's refusal counters under their ``reason`` label."""
    return (
        ("tls_refused", stats.refused),
        ("tls_handshake_timeout", stats.timeouts),
        ("tls_pending_evicted", stats.pending_evicted),
        ("tls_handshake_evicted", stats.handshakes_evicted),
        ("tls_no_h2", stats.no_h2),
        ("tls_rate_limited", stats.rate_limited),
    )


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
