"""One enclave node as the gateway sees it: an address, a kept-open gRPC channel, typed calls
and the health state the prober maintains."""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from proto_min import sign_service_pb2 as pb

from ..crypto import SigningCommitment
from ..rpc import GrpcChannel, RpcError, StatusCode, open_grpc_channel
from ..transport import TransportError, connect
from ._tls import connect_tls

log = logging.getLogger("trio_sign.gateway.node")

_SERVICE = "/trio_sign.v1.SignService/"
_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Per-call timeouts towards one enclave node (seconds).

    Attributes:
        connect_timeout_s: opening the connection (TCP/UNIX, and the TLS handshake).
        ping_timeout_s, status_timeout_s: the prober's calls.
        account_timeout_s: ``GetAccount``.
        commit_timeout_s, sign_timeout_s: FROST rounds one and two.
        abort_timeout_s: ``Abort`` (best-effort cleanup; keep it short).
    """

    connect_timeout_s: float = 5.0
    ping_timeout_s: float = 2.0
    status_timeout_s: float = 2.0
    account_timeout_s: float = 5.0
    commit_timeout_s: float = 5.0
    sign_timeout_s: float = 5.0
    abort_timeout_s: float = 2.0


class EnclaveNode:
    """One enclave node: ``node_id``, an address and a gRPC channel opened on first use and
    kept open across calls (re-opened after the connection fails).

    Addresses: ``tcp://host:port`` with ``ssl_context`` (and ``server_hostname``) is the
    parent's mTLS ingress; without ``ssl_context``, ``tcp://`` or ``unix://`` reach a
    development enclave directly (h2c).

    The node owns no tasks until :meth:`run` is started in a nursery (``await
    nursery.start(node.run)``); the channel's reader task lives under it.

    Health state (written by `run_prober`, read by `Coordinator`):
        healthy: the last probe round passed.
        last_ok: Trio time of the last passing probe round, or None.
        failing_since: Trio time of the first failed check of the current failing run, or
            None while passing.
        evicted: failing for longer than the prober's ``evict_after_s``; the coordinator does
            not use an evicted node.

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
        settings: NodeSettings = NodeSettings(),
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.settings = settings
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
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

    def _authority(self) -> str:
        if self._server_hostname:
            return self._server_hostname
        return "localhost"

    async def _open_stream(self) -> trio.abc.Stream:
        if self._ssl_context is None:
            return await connect(self.address)
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
            opened: GrpcChannel = await self._nursery.start(self._hold, stream, release)
            self._channel, self._release_channel = opened, release
            self.connects += 1
            log.debug("connected to node", extra={"node": self.node_id, "address": self.address})
            return opened

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
        self, session_id: str, message: bytes, commitments: Sequence[SigningCommitment]
    ) -> pb.SignResponse:
        """``Sign`` (FROST round two). A byte-identical retry returns the same share."""
        request = pb.SignRequest(
            session_id=session_id,
            message=message,
            commitments=[
                pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding)
                for c in commitments
            ],
        )
        return await self._call("Sign", request, pb.SignResponse, self.settings.sign_timeout_s)

    async def abort(self, session_id: str) -> pb.AbortResponse:
        """``Abort``: drop the session and zero its nonces (NOT_FOUND if already gone)."""
        return await self._call(
            "Abort",
            pb.AbortRequest(session_id=session_id),
            pb.AbortResponse,
            self.settings.abort_timeout_s,
        )
