"""Open an attested gRPC channel to an enclave (DESIGN §10): TLS that ends inside the enclave,
checked by the enclave's own attestation on that same connection before anything else is sent.

The enclave's server certificate is self-signed, made at boot: no CA can vouch for it. What
vouches for it is the attestation document, whose ``public_key`` is the certificate's key.
So the client:

1. completes a TLS 1.3 handshake with ALPN ``h2`` and its client certificate (the enclave
   requires one from the gateway CA pinned in its measured configuration); the server's
   certificate is not chain-verified, but it must be present, and the handshake itself proves
   the server holds its private key;
2. calls ``GetAttestation`` with a fresh 32-byte nonce on that connection;
3. checks the answer with :func:`~trio_sign.attested.verify_channel` against the SPKI of the
   certificate this connection presented;
4. only then hands the gRPC channel to the caller.

A relay that terminates TLS itself (a dishonest parent) presents its own key: ``spki_mismatch``
even if it forwards the nonce to the real enclave. A stored document fails the nonce; a node
serving another or an older bundle fails ``shares_mismatch``.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import trio
from google.protobuf.message import DecodeError

from proto_min import sign_service_pb2 as pb

from ..rpc import GrpcChannel, GrpcProtocolError, RpcError, open_grpc_channel
from ..transport import TransportError, load_cert_chain
from ._verify import (
    AttestedChannelError,
    ChannelPolicy,
    VerifiedChannel,
    spki_of_certificate,
    verify_channel,
)

#: The method called first on every attested connection.
GET_ATTESTATION: Final = "/trio_sign.v1.SignService/GetAttestation"
#: Bytes of the fresh random nonce sent with it.
NONCE_BYTES: Final = 32
#: The only application protocol the enclave serves.
ALPN_H2: Final = "h2"

Clock = Callable[[], datetime]


def make_attested_client_context(
    client_cert_pem: bytes | str, client_key_pem: bytes | str
) -> ssl.SSLContext:
    """A client TLS context for an enclave's attested port: TLS 1.3 only, ALPN ``h2``, the
    client certificate presented, and the server certificate *not* verified by a CA (it is
    self-signed; :func:`open_attested_channel` checks it against the attestation instead).

    Never use this context without :func:`open_attested_channel`: on its own it trusts any
    server.

    The private key is loaded through an anonymous in-memory file, never written to disk.

    Raises:
        ssl.SSLError: the certificate or the key does not load, or they do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # The chain is not what proves the server: the attestation binding is. The handshake still
    # proves the server holds the key of the certificate it sent (CertificateVerify).
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN_H2])
    load_cert_chain(context, client_cert_pem, client_key_pem)
    return context


@dataclass(frozen=True, eq=False)
class AttestedChannel:
    """An open gRPC channel whose enclave passed the check.

    Attributes:
        channel: the gRPC channel over the attested TLS connection; use it for every call.
        verified: what the enclave proved (its document and binding).
    """

    channel: GrpcChannel
    verified: VerifiedChannel


@asynccontextmanager
async def open_attested_channel(
    stream: trio.abc.Stream,
    *,
    policy: ChannelPolicy,
    client_cert_pem: bytes | str | None = None,
    client_key_pem: bytes | str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    authority: str = "localhost",
    clock: Clock | None = None,
) -> AsyncIterator[AttestedChannel]:
    """TLS over ``stream``, ``GetAttestation`` with a fresh nonce on it, the check, and only
    then the gRPC channel, for the duration of the block.

    Args:
        stream: a connected stream to the enclave's attested port (through the parent's byte
            pipe): TCP, UNIX or vsock, as :func:`trio_sign.transport.connect` opens it.
        policy: the pins (:class:`~trio_sign.attested.ChannelPolicy`).
        client_cert_pem, client_key_pem: the client certificate (chain, PEM) and its key; or
        ssl_context: a context from :func:`make_attested_client_context` (build it once and
            reuse it for many connections).
        server_hostname: sent as SNI (not checked); default none.
        authority: the HTTP/2 ``:authority`` of the calls.
        clock: the wall clock the document is checked at; default UTC now.

    Yields:
        The :class:`AttestedChannel`. On exit the connection is closed.

    Raises:
        AttestedChannelError: the handshake, the call or a check failed (``reason`` from
            :data:`~trio_sign.attested.CHANNEL_REASONS`). Nothing but ``GetAttestation`` was
            sent on the connection, and it is closed.
        ValueError: neither or both of the PEM pair and ``ssl_context`` (a caller bug).

    Cancellation: safe at any point; the connection is closed. Bound the whole opening with
    the caller's own deadline (``trio.fail_after``): this function takes no timeout.
    """
    if ssl_context is None:
        if client_cert_pem is None or client_key_pem is None:
            raise ValueError("give client_cert_pem and client_key_pem, or ssl_context")
        ssl_context = make_attested_client_context(client_cert_pem, client_key_pem)
    elif client_cert_pem is not None or client_key_pem is not None:
        raise ValueError("give client_cert_pem and client_key_pem, or ssl_context, not both")
    now = clock or (lambda: datetime.now(UTC))
    tls = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname)
    try:
        peer_spki = await _handshake(tls)
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    nonce = secrets.token_bytes(NONCE_BYTES)
    failure: AttestedChannelError | None = None
    verified: VerifiedChannel | None = None
    try:
        async with open_grpc_channel(tls, authority=authority) as channel:
            try:
                document = await _get_attestation(channel, nonce)
                verified = verify_channel(
                    document, peer_spki_der=peer_spki, nonce=nonce, policy=policy, now=now()
                )
            except AttestedChannelError as exc:
                failure = exc  # raised below, once the connection is closed
            else:
                yield AttestedChannel(channel, verified)
    # A connection that broke under the channel surfaces from its nursery, maybe grouped
    # (never Cancelled: a BaseException, not caught here).
    except (TransportError, GrpcProtocolError, OSError, trio.BrokenResourceError) as exc:
        if verified is not None:
            raise  # the caller's block failed: not ours to rename
        failure = AttestedChannelError(f"{type(exc).__name__}: {exc}", reason="unreachable")
    except ExceptionGroup as group:
        if verified is not None:
            raise
        failure = AttestedChannelError(
            f"the connection failed during GetAttestation: {group!r}", reason="unreachable"
        )
    if failure is not None:
        raise failure


async def _handshake(tls: trio.SSLStream[trio.abc.Stream]) -> bytes:
    """Complete the handshake; return the SPKI of the server's certificate."""
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        reason = getattr(cause, "reason", None) or str(cause or exc) or "connection lost"
        raise AttestedChannelError(
            f"TLS handshake with the enclave failed: {reason}", reason="tls_failed"
        ) from exc
    version = tls.version()
    alpn = tls.selected_alpn_protocol()
    if version != "TLSv1.3" or alpn != ALPN_H2:
        raise AttestedChannelError(
            f"the enclave's handshake gave {version} with ALPN {alpn!r}; TLS 1.3 with h2 is "
            "required",
            reason="bad_tls",
        )
    certificate = tls.getpeercert(binary_form=True)
    if not certificate:
        raise AttestedChannelError(
            "the server presented no certificate (nothing the attestation could bind)",
            reason="bad_tls",
        )
    return spki_of_certificate(certificate)


async def _get_attestation(channel: GrpcChannel, nonce: bytes) -> bytes:
    request = pb.GetAttestationRequest(nonce=nonce).SerializeToString()
    try:
        raw = await channel.unary_unary(GET_ATTESTATION, request)
    except RpcError as exc:
        raise AttestedChannelError(f"GetAttestation failed: {exc}", reason="rpc_failed") from exc
    try:
        return bytes(pb.GetAttestationResponse.FromString(raw).document)
    except DecodeError as exc:
        raise AttestedChannelError(
            "the GetAttestation response does not decode", reason="bad_response"
        ) from exc
