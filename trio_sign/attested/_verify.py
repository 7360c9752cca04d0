"""The attested-channel check (DESIGN §10), sans-io: a document in, a verdict out.

A client that opened TLS to an enclave and called ``GetAttestation`` with a fresh nonce on that
same connection hands the answer to :func:`verify_channel` with the SPKI of the certificate
the server presented on the connection. The document must:

1. verify as an attestation document (:func:`trio_sign.nitro.verify_attestation`): the chain
   to the pinned root, the ES384 signature, certificate validity at ``now``, the pinned PCRs,
   the debug-mode policy, the nonce, and freshness (``max_age_s`` around ``now``);
2. bind this connection: its ``public_key`` is byte-for-byte the peer's DER
   SubjectPublicKeyInfo (a relay that terminates TLS itself presents another key);
3. bind the pinned state: ``user_data`` is the canonical binding map
   (:func:`trio_sign.nitro._binding.decode_binding`) whose ``shares`` is the pinned base-bundle
   fingerprint (another or an older bundle is refused) and, when pinned, whose ``config`` is
   the pinned measured-configuration digest.

Every refusal is one :class:`AttestedChannelError` whose ``reason`` is a stable code from
:data:`CHANNEL_REASONS`; the checks run in the order above, so the reason names the first that
failed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .._errors import TrioSignError
from ..nitro import REASONS, AttestationError, VerifiedAttestation, verify_attestation
from ..nitro._binding import DIGEST_BYTES, Binding, BindingError, decode_binding

#: PCRs a policy must pin: the image, the kernel and boot ramfs, the application.
REQUIRED_PCRS: Final = frozenset({0, 1, 2})

#: What :func:`verify_channel` adds to the document checks (:data:`trio_sign.nitro.REASONS`).
_BINDING_REASONS: Final = {
    "spki_mismatch": "the document binds no public_key, or another key than the certificate "
    "the server presented on this connection (a relay terminating TLS itself)",
    "bad_binding": "user_data is not the canonical binding map (shares, deltas, config)",
    "shares_mismatch": "the enclave bound another shares fingerprint than the one pinned for "
    "this shard (another bundle, or an older one: a rollback)",
    "config_mismatch": "the enclave bound another measured-configuration SHA-256 than the "
    "pinned one",
}
#: What :func:`~trio_sign.attested.open_attested_channel` adds: the connection itself.
CONNECTION_REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "tls_failed": "the TLS handshake failed (refused, reset or not TLS)",
        "bad_tls": "the handshake did not give TLS 1.3 with ALPN h2 and a server certificate "
        "(with a public key that parses)",
        "unreachable": "the connection broke before GetAttestation was answered",
        "rpc_failed": "GetAttestation answered a non-OK gRPC status",
        "bad_response": "the GetAttestation response is not a GetAttestationResponse",
    }
)
#: Every ``AttestedChannelError.reason``, with what it means: the document checks of
#: :data:`trio_sign.nitro.REASONS`, the binding checks, and the connection's.
CHANNEL_REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {**REASONS, **_BINDING_REASONS, **CONNECTION_REASONS}
)


class AttestedChannelError(TrioSignError):
    """An enclave's channel was refused: it did not prove it is the pinned enclave.

    ``str(exc)`` is ``"<reason>: <message>"``, one line.

    Attributes:
        reason: a stable code from :data:`CHANNEL_REASONS` (``"spki_mismatch"``,
            ``"shares_mismatch"``, ``"nonce_mismatch"``, ...).
        message: the one-line explanation without the reason prefix.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    @property
    def connection_failure(self) -> bool:
        """True for a connection that failed (:data:`CONNECTION_REASONS` but ``bad_tls`` and
        ``bad_response``): the enclave may be down. False for a refused proof: it answered,
        and what it answered is not the pinned enclave."""
        return self.reason in ("tls_failed", "unreachable", "rpc_failed")


def _check_digest(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise ValueError(f"channel policy: {what} must be {DIGEST_BYTES} bytes (a SHA-256)")


@dataclass(frozen=True)
class ChannelPolicy:
    """What an enclave must prove on a connection before anything else is sent on it.

    Attributes:
        shares_sha256: the SHA-256 of the base bundle this shard must serve (32 raw bytes;
            ``bytes.fromhex`` of ``shares_sha256`` in the enclave's ``GetStatus`` and of the
            sealed file's fingerprint in ``trio-sign shares inspect``).
        pcrs: index -> exact value; must pin 0, 1 and 2 (add 8 for a signed EIF).
        root_pem: the root to pin, PEM; ``None`` is the AWS Nitro Enclaves root (the local
            NSM's root in development).
        config_sha256: when set, the SHA-256 the enclave must bind for its measured
            configuration (``GetStatus.config_sha256``). PCR2 covers the file already on
            Nitro; pinning it here also names the file in the client's own terms.
        max_age_s: the document's timestamp must be within this many seconds of the check.
        allow_debug: accept a debug-mode enclave (PCR0/1/2 all zero). Never in production:
            a debug enclave's memory can be read by its host.

    Raises:
        ValueError: a digest that is not 32 bytes, PCR0/1/2 not pinned, a pinned PCR of a
            wrong length, all-zero PCR pins without ``allow_debug``, a non-positive age.
    """

    shares_sha256: bytes
    pcrs: Mapping[int, bytes]
    root_pem: bytes | str | None = None
    config_sha256: bytes | None = None
    max_age_s: float = 60.0
    allow_debug: bool = False

    def __post_init__(self) -> None:
        _check_digest(self.shares_sha256, "shares_sha256")
        if self.config_sha256 is not None:
            _check_digest(self.config_sha256, "config_sha256")
        missing = REQUIRED_PCRS - set(self.pcrs)
        if missing:
            raise ValueError(
                f"channel policy: pin PCR{', PCR'.join(map(str, sorted(missing)))} "
                "(the enclave image's measurements)"
            )
        for index, value in self.pcrs.items():
            if not 0 <= index < 32 or len(value) not in (32, 48, 64):
                raise ValueError(
                    f"channel policy: PCR{index} must be an index 0..31 with a 48-byte value"
                )
        if not self.allow_debug and not any(any(self.pcrs[i]) for i in REQUIRED_PCRS):
            raise ValueError(
                "channel policy: the pinned PCR0/1/2 are all zero, a debug-mode enclave's; "
                "pin the image's measurements"
            )
        if not self.max_age_s > 0:
            raise ValueError("channel policy: max_age_s must be > 0")
        object.__setattr__(
            self, "pcrs", MappingProxyType({i: bytes(v) for i, v in sorted(self.pcrs.items())})
        )


@dataclass(frozen=True)
class VerifiedChannel:
    """A connection whose enclave proved who it is and what it serves.

    Attributes:
        attestation: the verified document.
        binding: what it binds: ``shares`` (the pinned fingerprint), ``deltas`` (the delta
            chain's head, or 32 zero bytes), ``config`` (the measured configuration's SHA-256).
        peer_spki_der: the SubjectPublicKeyInfo of the connection's server certificate, which
            the document binds.
    """

    attestation: VerifiedAttestation
    binding: Binding
    peer_spki_der: bytes

    def __repr__(self) -> str:
        return (
            f"<VerifiedChannel {self.attestation.module_id} "
            f"shares={self.binding.shares.hex()[:16]}... "
            f"config={self.binding.config.hex()[:16]}...>"
        )


def spki_of_certificate(certificate_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a DER certificate (what the enclave binds).

    Raises:
        AttestedChannelError: ``bad_tls`` when the certificate or its key does not parse.
    """
    try:
        key = x509.load_der_x509_certificate(certificate_der).public_key()
        return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError) as exc:
        raise AttestedChannelError(
            "the server's certificate or its public key does not parse", reason="bad_tls"
        ) from exc


def verify_channel(
    document: bytes,
    *,
    peer_spki_der: bytes,
    nonce: bytes,
    policy: ChannelPolicy,
    now: datetime,
) -> VerifiedChannel:
    """Check that ``document`` proves the enclave behind this connection is the pinned one.

    Args:
        document: the ``GetAttestationResponse.document`` received on the connection.
        peer_spki_der: the DER SubjectPublicKeyInfo of the certificate the server presented on
            the same connection (:func:`spki_of_certificate`).
        nonce: the fresh nonce sent in that ``GetAttestationRequest``.
        policy: the pins (:class:`ChannelPolicy`).
        now: the time of the check (aware): certificate validity and freshness are checked at
            it, never at the document's own timestamp.

    Returns:
        The verified channel.

    Raises:
        AttestedChannelError: the first check that failed, its ``reason`` from
            :data:`CHANNEL_REASONS` (the document's reasons first, then ``spki_mismatch``,
            ``bad_binding``, ``shares_mismatch``, ``config_mismatch``).
        ValueError: ``now`` is naive (a caller bug).
    """
    if not nonce:
        raise ValueError("verify_channel needs the nonce that was sent (non-empty)")
    try:
        verified = verify_attestation(
            document,
            root_pem=policy.root_pem,
            at=now,
            expected_pcrs=policy.pcrs,
            expected_nonce=nonce,
            production=not policy.allow_debug,
            max_age=timedelta(seconds=policy.max_age_s),
        )
    except AttestationError as exc:
        raise AttestedChannelError(exc.message, reason=exc.reason) from exc
    bound_key = verified.public_key
    if bound_key is None:
        raise AttestedChannelError(
            "the document binds no public_key (not the attested channel's document)",
            reason="spki_mismatch",
        )
    if not hmac.compare_digest(bound_key, peer_spki_der):
        raise AttestedChannelError(
            "the document binds another key than the server certificate of this connection "
            f"(bound {_short(bound_key)}, presented {_short(peer_spki_der)})",
            reason="spki_mismatch",
        )
    try:
        binding = decode_binding(verified.user_data)
    # The decoder parses what the enclave sent: any failure of it is a bad binding (a map with
    # keys of mixed types once made it raise TypeError).
    except (BindingError, TypeError, ValueError) as exc:
        raise AttestedChannelError(str(exc), reason="bad_binding") from exc
    if not hmac.compare_digest(binding.shares, policy.shares_sha256):
        raise AttestedChannelError(
            f"the enclave serves shares {binding.shares.hex()[:16]}..., the pinned "
            f"shares_sha256 is {policy.shares_sha256.hex()[:16]}...",
            reason="shares_mismatch",
        )
    if policy.config_sha256 is not None and not hmac.compare_digest(
        binding.config, policy.config_sha256
    ):
        raise AttestedChannelError(
            f"the enclave's measured configuration is {binding.config.hex()[:16]}..., the "
            f"pinned config_sha256 is {policy.config_sha256.hex()[:16]}...",
            reason="config_mismatch",
        )
    return VerifiedChannel(attestation=verified, binding=binding, peer_spki_der=peer_spki_der)


def _short(spki: bytes) -> str:
    """A short, comparable name for a public key: the first bytes of its SHA-256."""
    return f"sha256 {hashlib.sha256(spki).hexdigest()[:16]}..."
