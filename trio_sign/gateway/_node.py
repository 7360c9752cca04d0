"""One enclave node as the gateway sees it: an address, a kept-open gRPC channel, typed calls
and the health state the prober maintains.

With an attestation policy, every connection is an attested channel (DESIGN §10;
:func:`trio_sign.attested.open_attested_channel`): TLS to the enclave itself, ``GetAttestation``
with a fresh nonce on that connection, the check against the node's pins, and only then the
calls. A refused check is an alert and evicts the node at once (`record_refusal`); the prober's
next passing round, over a new connection that passes the check, re-admits it."""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from proto_min import sign_service_pb2 as pb

from ..attested import (
    AttestedChannelError,
    ChannelPolicy,
    VerifiedChannel,
    open_attested_channel,
)
from ..crypto._schemes import Commitment
from ..rpc import GrpcChannel, RpcError, StatusCode, open_grpc_channel
from ..transport import TransportError, connect
from ._prober import record_refusal
from ._tls import connect_tls

log = logging.getLogger("trio_sign.gateway.node")

_SERVICE = "/trio_sign.v1.SignService/"
_M = TypeVar("_M", bound=Message)

#: Opens a stream to an address URL (`trio_sign.transport.connect`; tests pass memory streams).
Connector = Callable[[str], Awaitable[trio.abc.Stream]]

#: ``EnclaveNode.attestation`` when the node's connections are not attested by the gateway.
ATTESTATION_OFF: Final = "off"


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Per-call timeouts towards one enclave node (seconds).

    Attributes:
        connect_timeout_s: opening the connection (TCP/UNIX, and the TLS handshake).
        attest_timeout_s: an attested channel's TLS handshake, ``GetAttestation`` and check.
        ping_timeout_s, status_timeout_s: the prober's calls.
        account_timeout_s: ``GetAccount``.
        commit_timeout_s, sign_timeout_s: FROST rounds one and two.
        abort_timeout_s: ``Abort`` (best-effort cleanup; keep it short).
    """

    connect_timeout_s: float = 5.0
    attest_timeout_s: float = 10.0
    ping_timeout_s: float = 2.0
    status_timeout_s: float = 2.0
    account_timeout_s: float = 5.0
    commit_timeout_s: float = 5.0
    sign_timeout_s: float = 5.0
    abort_timeout_s: float = 2.0


class EnclaveNode:
    """One enclave node: ``node_id``, an address and a gRPC channel opened on first use and
    kept open across calls (re-opened after the connection fails).

    How it connects:

    * ``attestation`` (a :class:`~trio_sign.attested.ChannelPolicy`) with ``ssl_context`` from
      :func:`~trio_sign.attested.make_attested_client_context`: the attested channel to the
      enclave through its parent's byte pipe (any address URL); ``server_hostname`` is only
      sent as SNI. The default of the reference gateway.
    * ``ssl_context`` alone: TLS as that context checks it, ALPN ``h2`` required; the gateway
      does not check the enclave's attestation (``[dev] skip_attestation`` with ``[tls]``).
    * neither: h2c to a development enclave (``tcp://`` or ``unix://``).

    The node owns no tasks until :meth:`run` is started in a nursery (``await
    nursery.start(node.run)``); the channel's reader task lives under it.

    Health state (written by `run_prober`, read by `Coordinator`):
        healthy: the last probe round passed.
        last_ok: Trio time of the last passing probe round, or None.
        failing_since: Trio time of the first failed check of the current failing run, or
            None while passing.
        evicted: failing for longer than the prober's ``evict_after_s``; the coordinator does
            not use an evicted node.

    Attestation state (attested nodes):
        verified: what the enclave proved on the current connection, or None.
        attestations_verified: connections whose check passed.
        attestation_failures: refused checks by reason (connection failures are not counted:
            they are the prober's business).
        last_refusal: the reason of the last refused check, None once one passes.

    Attributes:
        in_flight: sessions the coordinator is running on this node now (for load spreading).
    """

    def __init__(
        self,
        node_id: str,
        address: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        attestation: ChannelPolicy | None = None,
        settings: NodeSettings = NodeSettings(),
        connector: Connector = connect,
    ) -> None:
        if attestation is not None and ssl_context is None:
            raise ValueError("an attested node needs ssl_context from make_attested_client_context")
        self.node_id = node_id
        self.address = address
        self.settings = settings
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._policy = attestation
        self._connector = connector
        self.verified: VerifiedChannel | None = None
        self.attestations_verified = 0
        self.attestation_failures: dict[str, int] = {}
        self.last_refusal: str | None = None
        self.healthy = True  # optimistic until the first probe says otherwise
        self.last_ok: float | None = None
        self.failing_since: float | None = None
        self.evicted = False
        self.in_flight = 0
        self.connects = 0
        self._nursery: trio.Nursery | None = None
        self._channel: GrpcChannel | None = None
        self._release_channel: trio.Event | None = None
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        state = "evicted" if self.evicted else ("healthy" if self.healthy else "failing")
        return f"<EnclaveNode {self.node_id} {self.address} {state}>"

    @property
    def attested(self) -> bool:
        """The gateway checks this node's attestation on every connection."""
        return self._policy is not None

    @property
    def attestation(self) -> str:
        """One word for ``/v1/nodes``: ``verified`` (the current connection passed),
        ``pending`` (no connection yet, or it closed), the reason code of the last refused
        check, or ``off`` (connections are not attested by the gateway)."""
        if self._policy is None:
            return ATTESTATION_OFF
        if self.verified is not None:
            return "verified"
        return self.last_refusal or "pending"

    # -- lifetime ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the node's connection tasks until cancelled.

        Cancellation: the channel is closed; calls in flight fail UNAVAILABLE.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._channel = None

    async def _hold(
        self,
        stream: trio.abc.Stream,
        release: trio.Event,
        *,
        task_status: trio.TaskStatus[GrpcChannel] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with open_grpc_channel(stream, authority=self._authority()) as channel:
            task_status.started(channel)
            await release.wait()

    async def _hold_attested(
        self,
        stream: trio.abc.Stream,
        release: trio.Event,
        policy: ChannelPolicy,
        *,
        task_status: trio.TaskStatus[GrpcChannel] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self._ssl_context is not None  # checked in __init__
        verified: VerifiedChannel | None = None
        try:
            async with open_attested_channel(
                stream,
                policy=policy,
                ssl_context=self._ssl_context,
                server_hostname=self._server_hostname,
                authority=self._authority(),
            ) as attested:
                self.verified = verified = attested.verified
                task_status.started(attested.channel)
                await release.wait()
        finally:
            # A newer connection may have replaced this one already: clear only our own.
            if verified is not None and self.verified is verified:
                self.verified = None

    def _authority(self) -> str:
        if self._server_hostname:
            return self._server_hostname
        return "localhost"

    async def _open_stream(self) -> trio.abc.Stream:
        if self._ssl_context is None or self._policy is not None:
            return await self._connector(self.address)  # TLS, if any, comes after
        return await connect_tls(
            self.address, self._ssl_context, server_hostname=self._server_hostname or "localhost"
        )

    async def _get_channel(self) -> GrpcChannel:
        channel = self._channel
        if channel is not None and channel.accepting_calls:
            return channel
        async with self._lock:  # one task reconnects; the others wait and reuse its channel
            channel = self._channel
            if channel is not None and channel.accepting_calls:
                return channel
            if self._nursery is None:
                raise RpcError(
                    StatusCode.UNAVAILABLE, f"node {self.node_id} is not running (start node.run)"
                )
            if self._release_channel is not None:
                self._release_channel.set()  # let the dead channel's holder finish
                self._channel = self._release_channel = None
            try:
                with trio.fail_after(self.settings.connect_timeout_s):
                    stream = await self._open_stream()
            except (TransportError, trio.TooSlowError) as exc:
                raise RpcError(
                    StatusCode.UNAVAILABLE,
                    f"cannot connect to node {self.node_id} at {self.address}: {exc or 'timeout'}",
                ) from exc
            release = trio.Event()
            if self._policy is None:
                opened: GrpcChannel = await self._nursery.start(self._hold, stream, release)
            else:
                opened = await self._open_attested(stream, release, self._policy)
            self._channel, self._release_channel = opened, release
            self.connects += 1
            log.debug("connected to node", extra={"node": self.node_id, "address": self.address})
            return opened

    async def _open_attested(
        self, stream: trio.abc.Stream, release: trio.Event, policy: ChannelPolicy
    ) -> GrpcChannel:
        """The attested channel over ``stream``, or `RpcError` UNAVAILABLE; a refused check
        is recorded (alert, eviction) before that is raised."""
        assert self._nursery is not None
        timeout_s = self.settings.attest_timeout_s
        try:
            with trio.fail_after(timeout_s):
                opened: GrpcChannel = await self._nursery.start(
                    self._hold_attested, stream, release, policy
                )
        except trio.TooSlowError as exc:
            raise RpcError(
                StatusCode.UNAVAILABLE,
                f"node {self.node_id}: no attested channel within {timeout_s} s (attest_timeout_s)",
            ) from exc
        except AttestedChannelError as exc:
            if not exc.connection_failure:
                self._refused(exc)
            raise RpcError(
                StatusCode.UNAVAILABLE, f"node {self.node_id}: attested channel: {exc}"
            ) from exc
        self.attestations_verified += 1
        self.last_refusal = None
        log.info(
            "node attested: channel verified",
            extra={
                "node": self.node_id,
                "module_id": self.verified.attestation.module_id if self.verified else None,
                "shares_sha256": self.verified.binding.shares.hex() if self.verified else None,
            },
        )
        return opened

    def _refused(self, exc: AttestedChannelError) -> None:
        """An alert the first time (and when the reason changes); a repeat is a warning. The
        metrics count every one."""
        repeat = self.last_refusal == exc.reason
        self.attestation_failures[exc.reason] = self.attestation_failures.get(exc.reason, 0) + 1
        self.last_refusal = exc.reason
        record_refusal(self, trio.current_time())
        if repeat:
            log.warning(
                "node still refused: attestation check failed (%s)",
                exc.reason,
                extra={"node": self.node_id, "reason": exc.reason},
            )
            return
        log.error(
            "node refused and evicted: attestation check failed (%s): %s",
            exc.reason,
            exc.message,
            extra={"alert": "node_attestation_failed", "node": self.node_id, "reason": exc.reason},
        )

    async def aclose(self) -> None:
        """Close the channel (a later call reconnects). Idempotent."""
        if self._channel is not None:
            await self._channel.aclose()
        if self._release_channel is not None:
            self._release_channel.set()
        self._channel = self._release_channel = None

    # -- calls ---------------------------------------------------------------------------------

    async def _call(
        self, method: str, request: Message, response_type: type[_M], timeout_s: float
    ) -> _M:
        # One overall deadline for connecting and the call, so a slow connect cannot stretch
        # the call's budget.
        deadline = trio.current_time() + timeout_s
        channel = await self._get_channel()
        remaining = deadline - trio.current_time()
        if remaining <= 0 or math.isnan(remaining):
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while connecting")
        data = await channel.unary_unary(
            _SERVICE + method, request.SerializeToString(), timeout=remaining
        )
        try:
            return response_type.FromString(data)
        except DecodeError as exc:
            raise RpcError(
                StatusCode.INTERNAL, f"node {self.node_id}: malformed {method} response"
            ) from exc

    async def ping(self, payload: bytes = b"") -> pb.PingResponse:
        """``Ping``: an echo; the enclave answers only while serving."""
        return await self._call(
            "Ping", pb.PingRequest(payload=payload), pb.PingResponse, self.settings.ping_timeout_s
        )

    async def get_status(self) -> pb.GetStatusResponse:
        """``GetStatus``: state, accounts, sessions, memory and the last SSE probe nonce."""
        return await self._call(
            "GetStatus",
            pb.GetStatusRequest(),
            pb.GetStatusResponse,
            self.settings.status_timeout_s,
        )

    async def get_account(self, account_id: str) -> pb.GetAccountResponse:
        """``GetAccount``: the enclave's public data for the account (NOT_FOUND if unknown)."""
        return await self._call(
            "GetAccount",
            pb.GetAccountRequest(account_id=account_id),
            pb.GetAccountResponse,
            self.settings.account_timeout_s,
        )

    async def commit(self, account_id: str, session_id: str) -> pb.CommitResponse:
        """``Commit`` (FROST round one): opens ``session_id`` and takes a pool slot."""
        return await self._call(
            "Commit",
            pb.CommitRequest(account_id=account_id, session_id=session_id),
            pb.CommitResponse,
            self.settings.commit_timeout_s,
        )

    async def sign(
        self,
        session_id: str,
        message: bytes,
        commitments: Sequence[Commitment],
        approvals: Sequence[pb.Approval] = (),
        *,
        taproot_merkle_root: bytes | None = None,
    ) -> pb.SignResponse:
        """``Sign`` (FROST round two) with the ``approvals`` the account's policy needs
        (DESIGN §11; PERMISSION_DENIED without enough). A byte-identical retry returns the
        same share.

        ``taproot_merkle_root`` (a ``FROST-secp256k1-SHA256-TR-v1`` account only) is sent
        only when given: absent and empty differ on the wire (DESIGN §4)."""
        request = pb.SignRequest(
            session_id=session_id,
            message=message,
            commitments=[
                pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding)
                for c in commitments
            ],
            approvals=approvals,
        )
        if taproot_merkle_root is not None:
            request.taproot_merkle_root = taproot_merkle_root
        return await self._call("Sign", request, pb.SignResponse, self.settings.sign_timeout_s)

    async def abort(self, session_id: str) -> pb.AbortResponse:
        """``Abort``: drop the session and zero its nonces (NOT_FOUND if already gone)."""
        return await self._call(
            "Abort",
            pb.AbortRequest(session_id=session_id),
            pb.AbortResponse,
            self.settings.abort_timeout_s,
        )
