"""TLS to a node without the gateway's attestation check, and a CA-verified client context.

Node connections are attested channels (:mod:`trio_sign.attested`): TLS that ends in the
enclave, checked by its attestation. :func:`connect_tls` is how a node connects when that check
is skipped (``[dev] skip_attestation`` with ``[tls]``: the context from
``make_attested_client_context`` then trusts any server). The parent terminated TLS once (the
gateway's former ``[tls] mode = "ingress"``); it is a byte pipe now, so nothing in the gateway
uses :func:`make_client_ssl_context` any more: it stays as a helper for tools and tests that
speak mTLS to a server with a CA-issued certificate.

The connector refuses a connection where ``h2`` was not negotiated (a gRPC client must not
speak HTTP/2 over a connection the server did not agree to).

A refused *client* certificate shows up differently by TLS version: in TLS 1.3 the client
considers the handshake done before the server checks the client's certificate, so
`connect_tls` succeeds and the server's alert arrives on the first read (a gRPC call then
fails UNAVAILABLE). Callers must treat both the same.
"""

from __future__ import annotations

import ssl
from typing import Final

import trio

from ..transport import TransportError, connect, load_cert_chain

#: The only application protocol an enclave serves.
ALPN_H2: Final = "h2"


def make_client_ssl_context(
    ca_pem: bytes | str, cert_pem: bytes | str, key_pem: bytes | str
) -> ssl.SSLContext:
    """A client context for an mTLS server with a CA-issued certificate: TLS 1.3 minimum, the
    server's certificate verified against ``ca_pem`` (host name checked), our client
    certificate, ALPN ``h2``. Not for enclaves: their certificate is self-signed and checked by
    their attestation (:func:`trio_sign.attested.make_attested_client_context`).

    The private key is loaded through an anonymous in-memory file (Linux ``memfd``), so it is
    never written to disk (elsewhere: a private temporary directory removed at once).

    Args:
        ca_pem: the CA(s) that issued the server's certificate, PEM.
        cert_pem: the gateway's client certificate chain, PEM (leaf first).
        key_pem: its private key, PEM, unencrypted.

    Raises:
        ssl.SSLError: a certificate or the key does not load (or they do not match).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    ca = ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem
    context.load_verify_locations(cadata=ca)
    context.set_alpn_protocols([ALPN_H2])
    load_cert_chain(context, cert_pem, key_pem)
    return context


async def connect_tls(
    url: str, ssl_context: ssl.SSLContext, *, server_hostname: str
) -> trio.SSLStream[trio.SocketStream]:
    """Connect to ``url`` (``tcp://host:port``), complete the TLS handshake and check ALPN.

    Args:
        url: the node's address (``tcp://`` or ``unix://``).
        ssl_context: a client context (ALPN ``h2`` offered).
        server_hostname: the name the server's certificate must carry (also sent as SNI).

    Returns:
        The TLS stream, handshake done and ``h2`` negotiated.

    Raises:
        TransportError: the TCP connection, the handshake or ALPN ``h2`` failed (the reason
            is in the message; the ``ssl.SSLError`` is chained).

    Cancellation: safe; a half-open connection is closed.
    """
    tcp = await connect(url)
    if not isinstance(tcp, trio.SocketStream):  # pragma: no cover - connect returns one
        raise TransportError(f"cannot connect to {url}: not a socket stream")
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname)
    try:
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = getattr(cause, "reason", None) or str(cause or exc) or "connection lost"
            raise TransportError(f"TLS handshake with {url} failed: {reason}") from exc
        alpn = tls.selected_alpn_protocol()
        if alpn != ALPN_H2:
            raise TransportError(
                f"TLS connection to {url} did not negotiate ALPN h2 (got {alpn!r}); "
                "is it an enclave's gRPC port?"
            )
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls
