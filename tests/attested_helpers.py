"""A test-double enclave for the attested channel (DESIGN §10), and the relays a dishonest
parent could put in front of it.

`FakeEnclave` is a `GrpcServer` behind a `trio.SSLStream` with a self-signed P-256 certificate
made for it, TLS 1.3 only, ALPN h2, a client certificate required from the gateway CA; its
``GetAttestation`` answers a `LocalNsm` document binding that certificate's SPKI and the
binding map of its shares, deltas and configuration. It records every method called and the
client certificate of every connection. Everything runs over memory streams (no sockets), so
the tests can use the autojump clock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proto_min import sign_service_pb2 as pb
from trio_sign.attested import ChannelPolicy
from trio_sign.nitro import DEFAULT_LOCAL_PCRS, LocalNsm
from trio_sign.nitro._binding import NO_DELTAS, Binding, encode_binding
from trio_sign.rpc import (
    CallContext,
    GrpcServer,
    RpcError,
    StatusCode,
    UnaryHandler,
    open_grpc_channel,
    protobuf_handler,
)
from trio_sign.testing import CertificateAuthority, make_ca, make_leaf
from trio_sign.transport import load_cert_chain

SERVICE = "/trio_sign.v1.SignService/"
SHARES = hashlib.sha256(b"the pinned base bundle").digest()
OLD_SHARES = hashlib.sha256(b"last month's base bundle").digest()
CONFIG = hashlib.sha256(b"enclave.toml").digest()


def self_signed_p256(cn: str = "trio-sign enclave") -> tuple[bytes, bytes, bytes]:
    """``(certificate PEM, key PEM, SPKI DER)`` of a fresh self-signed P-256 certificate, as
    the enclave makes at boot."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, spki


@dataclass
class GatewayPki:
    """The gateway CA the enclave pins, and the gateway's client certificate."""

    ca: CertificateAuthority
    client_cert: bytes
    client_key: bytes

    @classmethod
    def make(cls) -> GatewayPki:
        ca = make_ca("gateway CA")
        cert, key = make_leaf(ca, "trio-sign gateway", server=False)
        return cls(ca, cert, key)

    @property
    def client_cert_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.client_cert).public_bytes(
            serialization.Encoding.DER
        )


def server_context(cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None) -> ssl.SSLContext:
    """The enclave's server context: TLS 1.3, ALPN h2, a client certificate required from
    ``client_ca_pem`` (none asked for when None)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    load_cert_chain(context, cert_pem, key_pem)
    if client_ca_pem is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca_pem.decode())
    return context


@dataclass(eq=False)
class FakeEnclave:
    """See the module docstring. Change ``shares``, ``nsm`` or ``replay`` between connections
    to make it answer something else."""

    nsm: LocalNsm
    gateway_ca_pem: bytes
    shares: bytes = SHARES
    config: bytes = CONFIG
    deltas: bytes = NO_DELTAS
    #: When set, GetAttestation answers this stored document instead of a fresh one.
    replay: bytes | None = None
    calls: list[str] = field(default_factory=list)
    client_certs: list[bytes | None] = field(default_factory=list)
    handshakes: int = 0
    #: More methods (e.g. a real ``SignService``'s handlers): served and recorded; its own
    #: ``GetAttestation`` stays the double's.
    service: dict[str, UnaryHandler] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cert_pem, self.key_pem, self.spki = self_signed_p256()
        self.server = GrpcServer(self.handlers())

    async def reboot(self, *, shares: bytes | None = None, nsm: LocalNsm | None = None) -> None:
        """A new boot: every connection closed, a new TLS key, maybe another bundle or NSM."""
        await self.server.aclose()
        if shares is not None:
            self.shares = shares
        if nsm is not None:
            self.nsm = nsm
        self.__post_init__()

    def handlers(self) -> dict[str, UnaryHandler]:
        table = {
            SERVICE + "Ping": protobuf_handler(pb.PingRequest.FromString, self._ping),
            SERVICE + "GetStatus": protobuf_handler(pb.GetStatusRequest.FromString, self._status),
        }
        table |= {name: self._recorded(name, handler) for name, handler in self.service.items()}
        table[SERVICE + "GetAttestation"] = protobuf_handler(
            pb.GetAttestationRequest.FromString, self._get_attestation
        )
        return table

    def _recorded(self, name: str, handler: UnaryHandler) -> UnaryHandler:
        async def recorded(request: bytes, context: CallContext) -> bytes:
            self.calls.append(name.rsplit("/", 1)[1])
            return await handler(request, context)

        return recorded

    def document(self, nonce: bytes, *, public_key: bytes | None = None) -> bytes:
        binding = Binding(shares=self.shares, deltas=self.deltas, config=self.config)
        return self.nsm.attestation(
            public_key=self.spki if public_key is None else public_key,
            user_data=encode_binding(binding),
            nonce=nonce,
        )

    async def _get_attestation(
        self, request: pb.GetAttestationRequest, context: CallContext
    ) -> pb.GetAttestationResponse:
        self.calls.append("GetAttestation")
        if self.replay is not None:
            return pb.GetAttestationResponse(document=self.replay)
        return pb.GetAttestationResponse(document=self.document(bytes(request.nonce)))

    async def _ping(self, request: pb.PingRequest, context: CallContext) -> pb.PingResponse:
        self.calls.append("Ping")
        return pb.PingResponse(payload=request.payload)

    async def _status(
        self, request: pb.GetStatusRequest, context: CallContext
    ) -> pb.GetStatusResponse:
        self.calls.append("GetStatus")
        return pb.GetStatusResponse(state="serving", shares_sha256=self.shares.hex())

    async def serve_tls(self, stream: trio.abc.Stream) -> None:
        """Serve one connection the way the enclave's attested port does."""
        tls = trio.SSLStream(
            stream,
            server_context(self.cert_pem, self.key_pem, self.gateway_ca_pem),
            server_side=True,
        )
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(tls)
            return
        self.handshakes += 1
        self.client_certs.append(tls.getpeercert(binary_form=True))
        await self.server.serve_stream(tls)

    async def serve_public(self, stream: trio.abc.Stream) -> None:
        """Serve one connection the way the public h2c port does (anyone may call it)."""
        await self.server.serve_stream(stream)


def connect_pair(
    nursery: trio.Nursery, serve: Callable[[trio.abc.Stream], Awaitable[None]]
) -> trio.abc.Stream:
    """A memory stream whose other end is served by ``serve`` in ``nursery``."""
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(serve, server)
    return client


@dataclass(eq=False)
class TerminatingRelay:
    """A dishonest parent that terminates the gateway's TLS itself, with its own key, and
    answers GetAttestation by relaying the gateway's nonce to the real enclave's public port
    (or, with ``stored``, answers an old document it kept)."""

    enclave: FakeEnclave
    nursery: trio.Nursery
    stored: bytes | None = None
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cert_pem, self.key_pem, self.spki = self_signed_p256("a parent pretending")
        self.server = GrpcServer(
            {
                SERVICE + "GetAttestation": protobuf_handler(
                    pb.GetAttestationRequest.FromString, self._get_attestation
                ),
                SERVICE + "Ping": protobuf_handler(pb.PingRequest.FromString, self._ping),
            }
        )

    async def _get_attestation(
        self, request: pb.GetAttestationRequest, context: CallContext
    ) -> pb.GetAttestationResponse:
        self.calls.append("GetAttestation")
        if self.stored is not None:
            return pb.GetAttestationResponse(document=self.stored)
        stream = connect_pair(self.nursery, self.enclave.serve_public)
        async with open_grpc_channel(stream) as channel:
            raw = await channel.unary_unary(SERVICE + "GetAttestation", request.SerializeToString())
        return pb.GetAttestationResponse.FromString(raw)

    async def _ping(self, request: pb.PingRequest, context: CallContext) -> pb.PingResponse:
        self.calls.append("Ping")
        raise RpcError(StatusCode.UNAVAILABLE, "a relay that never should have been reached")

    async def serve_tls(self, stream: trio.abc.Stream) -> None:
        tls = trio.SSLStream(
            stream, server_context(self.cert_pem, self.key_pem, None), server_side=True
        )
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(tls)
            return
        await self.server.serve_stream(tls)


def policy(
    *,
    shares: bytes = SHARES,
    root_pem: bytes,
    config: bytes | None = None,
    pcrs: dict[int, bytes] | None = None,
) -> ChannelPolicy:
    return ChannelPolicy(
        shares_sha256=shares,
        pcrs=dict(DEFAULT_LOCAL_PCRS) if pcrs is None else pcrs,
        root_pem=root_pem,
        config_sha256=config,
    )
