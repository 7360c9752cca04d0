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

from proto_min import sign_service_pb2 as pb

from .. import __version__
from .._errors import ShareFileError
from ..crypto import CIPHERSUITE, SigningCommitment
from ..rpc import CallContext, RpcError, StatusCode, UnaryHandler, protobuf_handler
from ..shares import AccountShare, ShareStore
from ._pool import PoolError, PoolErrorKind, SessionPool

log = logging.getLogger("trio_sign.service")

SERVICE = "/trio_sign.v1.SignService/"
MAX_MESSAGE_BYTES = 64 * 1024
MAX_ACCOUNT_ID_BYTES = 255

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

    Attributes:
        state: ``"serving"`` or ``"draining"``.
        frozen: account ids that refuse Commit and Sign (set by the gateway's SSE events).
        last_sse_probe: the nonce of the last SSE ``probe`` event, echoed by GetStatus.
    """

    def __init__(
        self,
        store: ShareStore,
        pool: SessionPool,
        *,
        frozen: set[str] | None = None,
        attestor: Attestor | None = None,
        on_drain: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.attestor = attestor
        self.state = "serving"
        self.frozen: set[str] = frozen if frozen is not None else set()
        self.last_sse_probe = ""
        self._on_drain = on_drain

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
        if len(request.nonce) > 512:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "nonce must be at most 512 bytes")
        return pb.GetAttestationResponse(document=await self.attestor(request.nonce))

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
        commitments = [
            SigningCommitment(bytes(c.identifier), bytes(c.hiding), bytes(c.binding))
            for c in request.commitments
        ]
        with _map_errors():
            identifier, share = self.pool.sign(request.session_id, request.message, commitments)
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
    if not account_id or len(account_id.encode("utf-8")) > MAX_ACCOUNT_ID_BYTES:
        raise RpcError(
            StatusCode.INVALID_ARGUMENT, f"account_id must be 1..{MAX_ACCOUNT_ID_BYTES} bytes"
        )
