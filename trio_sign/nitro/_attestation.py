"""Decode and verify AWS Nitro Enclaves attestation documents. Sans-io, synchronous, no network.

A document is an ES384 ``COSE_Sign1`` (see :mod:`._cose`) whose payload is a CBOR map:
``module_id``, ``digest`` (``"SHA384"``), ``timestamp`` (ms since the epoch, UTC), ``pcrs``
(index -> measurement), ``certificate`` (the leaf, DER), ``cabundle`` (DER, root first), and the
optional ``public_key``, ``user_data``, ``nonce`` (present as CBOR null when unused). Newer
documents encode the map with indefinite length; unknown keys are skipped.

Verification (AWS ``docs/attestation_process.md`` §3, plus practice):

1. decode the COSE_Sign1 (ES384 only) and the payload, checking every field's type and size;
2. build the chain ``leaf <- cabundle[-1] <- ... <- cabundle[1] <- pinned root``. ``cabundle[0]``
   must be byte-identical to the pinned root, and the trust decision is made against the pinned
   root only (never against what the document carries). Each certificate must be P-384 and
   ECDSA-SHA384, signed by the next one, valid at the chosen time, CAs must say
   ``basicConstraints CA`` with a respected ``pathLen`` and ``keyUsage keyCertSign``, the leaf
   must be a non-CA with ``keyUsage digitalSignature``;
3. verify ES384 over the ``Sig_structure`` with the leaf key;
4. apply the caller's policy: debug mode (PCR0/1/2 all zero) refused in production, pinned PCRs,
   expected nonce, maximum age.

Every failure is one :class:`AttestationError` whose ``reason`` is a stable code (see
:data:`REASONS`). CRLs are not consulted (AWS's own flow disables them).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from .._errors import TrioSignError
from ._cose import CoseError, CoseSign1, decode_sign1, loads_one

#: The AWS Nitro Enclaves root certificate (``AWS_NitroEnclaves_Root-G1``; CN=aws.nitro-enclaves,
#: valid 2019-10-28 .. 2049-10-28), from https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip
#: (zip SHA-256 8cf60e2b2efca96c6a9e71e851d00c1b6991cc09eadbe64a6a1d1b1eb9faff7c, as AWS publishes).
AWS_NITRO_ROOT_PEM: Final = """\
-----BEGIN CERTIFICATE-----
MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEMMAoGA1UECwwDQVdTMRswGQYD
VQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4
MTQyODA1WjBJMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQL
DANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqGSM49AgEG
BSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb
48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs990d0JX28TcPQXCEPZ3BABIeTPYwEoCWZE
h8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkF
R+eWw5b6cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYC
MQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEevL8uO1XYru5xtMPW
rfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6N
IwLz3/Y=
-----END CERTIFICATE-----
"""
#: SHA-256 of the DER encoding of :data:`AWS_NITRO_ROOT_PEM`.
AWS_NITRO_ROOT_SHA256: Final = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"

#: Largest document accepted. Real ones are 4.4-7.5 KB; KMS accepts up to 256 KiB.
MAX_DOCUMENT_BYTES: Final = 64 * 1024
#: Largest ``public_key``, ``user_data`` and ``nonce`` (NSM API spec §2.2; real docs reach it).
MAX_USER_FIELD_BYTES: Final = 1024
#: PCR indexes are 0..31 and a document carries 1..32 of them.
MAX_PCRS: Final = 32
#: Allowed PCR lengths (SHA-256, SHA-384, SHA-512 banks).
PCR_LENGTHS: Final = frozenset({32, 48, 64})
#: Largest ``cabundle`` accepted (AWS sends 4: root, regional, zonal, instance).
MAX_CABUNDLE: Final = 8
#: The PCRs that are all zero in a debug-mode enclave (image, kernel+boot, application).
DEBUG_PCRS: Final = (0, 1, 2)

#: Every ``AttestationError.reason``, with what it means.
REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "bad_cose": "not a COSE_Sign1 with ES384 (or too large)",
        "bad_payload": "the payload map is malformed: missing field, wrong type or size",
        "bad_root": "the pinned root given by the caller is not a PEM certificate",
        "bad_cert": "a certificate does not parse, or is not P-384 / ECDSA-SHA384",
        "chain_untrusted": "the chain does not lead to the pinned root",
        "cert_not_yet_valid": "a certificate's validity starts after the verification time",
        "cert_expired": "a certificate's validity ended before the verification time",
        "bad_cert_usage": "basicConstraints / pathLen / keyUsage do not allow the cert's role",
        "bad_signature": "the ES384 signature does not verify with the leaf key",
        "debug_mode": "a debug-mode enclave (PCR0/1/2 zero) was refused in production",
        "pcr_mismatch": "a pinned PCR is absent or differs",
        "nonce_mismatch": "the nonce is absent or differs from the expected one",
        "stale_document": "the document's timestamp is further than max_age from the check time",
    }
)


class AttestationError(TrioSignError):
    """An attestation document was refused.

    ``str(exc)`` is ``"<reason>: <message>"``, one line.

    Attributes:
        reason: a stable code from :data:`REASONS` (``"bad_signature"``, ``"pcr_mismatch"``, ...).
        message: the one-line explanation without the reason prefix.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class CertificateInfo:
    """Who a certificate of the verified chain is, and when it is valid.

    Attributes:
        role: ``"leaf"``, ``"cabundle[N]"`` for an intermediate, or ``"root"`` (the pinned root).
        subject: RFC 4514 subject.
        issuer: RFC 4514 issuer.
        serial: the serial number.
        not_before: start of validity (UTC).
        not_after: end of validity (UTC).
    """

    role: str
    subject: str
    issuer: str
    serial: int
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class AttestationDocument:
    """The decoded payload of an attestation document (signature *not* verified).

    Attributes:
        module_id: the enclave's NSM module id (``i-...-enc...``).
        digest: the PCR bank digest, ``"SHA384"``.
        timestamp: when the NSM made the document (UTC, millisecond precision).
        timestamp_ms: the same, as sent: ms since the epoch.
        pcrs: index -> measurement, read-only, in index order.
        certificate: the leaf (enclave) certificate, DER.
        cabundle: the CA bundle, DER, root first.
        public_key: the optional public key the enclave bound (``None`` when absent or null).
        user_data: the optional user data (``None`` when absent or null).
        nonce: the optional nonce (``None`` when absent or null).
        debug_mode: ``True`` when PCR0, PCR1 and PCR2 are all present and all zero bytes,
            which is how a debug-mode enclave reports (its memory is inspectable).
    """

    module_id: str
    digest: str
    timestamp: datetime
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    debug_mode: bool


@dataclass(frozen=True)
class VerifiedAttestation(AttestationDocument):
    """An attestation document whose chain, signature and policy checks passed.

    Attributes:
        chain: the verified chain, leaf first, the pinned root last.
        not_before: the latest ``not_before`` of the chain (start of the document's window).
        not_after: the earliest ``not_after`` of the chain (end of the window; the leaf's, ~3 h).
        verified_at: the time the certificates were checked at.
    """

    chain: tuple[CertificateInfo, ...]
    not_before: datetime
    not_after: datetime
    verified_at: datetime


def decode_attestation(document: bytes) -> AttestationDocument:
    """Decode a document's COSE envelope and payload, checking structure only.

    This does **not** verify anything cryptographic; use :func:`verify_attestation` for that.

    Raises:
        AttestationError: ``bad_cose`` or ``bad_payload``.
    """
    return _decode(document)[1]


def verify_attestation(
    document: bytes,
    *,
    root_pem: bytes | str | None = None,
    at: datetime | Literal["now", "document"] | None = None,
    expected_pcrs: Mapping[int, bytes] = MappingProxyType({}),
    expected_nonce: bytes | None = None,
    production: bool = False,
    max_age: timedelta | None = None,
) -> VerifiedAttestation:
    """Verify an attestation document and return its decoded, verified fields.

    Args:
        document: the raw COSE_Sign1 bytes, as the NSM returns them.
        root_pem: the root to pin, PEM; default the AWS Nitro Enclaves root
            (:data:`AWS_NITRO_ROOT_PEM`). A local NSM's root is pinned here in development.
        at: when to check certificate validity: ``None`` or ``"now"`` for the current time (live
            handshakes), ``"document"`` for the document's own timestamp (stored documents; this
            trusts the leaf-signed timestamp, so only use it for archived evidence), or an aware
            ``datetime``.
        expected_pcrs: index -> value that must be present and equal.
        expected_nonce: when given, the document's nonce must be exactly this.
        production: refuse debug-mode documents (PCR0/1/2 zero, or PCR0 absent).
        max_age: when given, ``|at - timestamp|`` must not exceed it.

    Raises:
        AttestationError: with the ``reason`` of the first check that failed, in the order
            ``bad_cose``, ``bad_payload``, ``bad_root``, ``bad_cert``, ``chain_untrusted``,
            ``cert_not_yet_valid``/``cert_expired``, ``bad_cert_usage``, ``bad_signature``,
            ``debug_mode``, ``pcr_mismatch``, ``nonce_mismatch``, ``stale_document``.
        ValueError: ``at`` is a naive datetime or an unknown string (a caller bug).
    """
    fixed_time = _resolve_time(at)  # first: a bad ``at`` is a caller bug, whatever the document
    sign1, doc = _decode(document)
    when = doc.timestamp if fixed_time is None else fixed_time
    root = _load_root(root_pem)

    chain = _build_chain(doc, root)
    _check_signatures(chain)
    _check_validity(chain, when)
    _check_usage(chain)
    leaf_key = chain[0][1].public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not sign1.verify(leaf_key):
        raise AttestationError(
            "the ES384 signature over the document does not verify with the leaf key",
            reason="bad_signature",
        )
    _check_policy(doc, expected_pcrs, expected_nonce, production, max_age, when)

    infos = tuple(_info(role, cert) for role, cert in chain)
    return VerifiedAttestation(
        module_id=doc.module_id,
        digest=doc.digest,
        timestamp=doc.timestamp,
        timestamp_ms=doc.timestamp_ms,
        pcrs=doc.pcrs,
        certificate=doc.certificate,
        cabundle=doc.cabundle,
        public_key=doc.public_key,
        user_data=doc.user_data,
        nonce=doc.nonce,
        debug_mode=doc.debug_mode,
        chain=infos,
        not_before=max(i.not_before for i in infos),
        not_after=min(i.not_after for i in infos),
        verified_at=when,
    )


# -- decoding -------------------------------------------------------------------------------------


def _decode(document: bytes) -> tuple[CoseSign1, AttestationDocument]:
    if len(document) > MAX_DOCUMENT_BYTES:
        raise AttestationError(
            f"document is {len(document)} bytes, the limit is {MAX_DOCUMENT_BYTES}",
            reason="bad_cose",
        )
    try:
        sign1 = decode_sign1(bytes(document))
    except CoseError as exc:
        raise AttestationError(str(exc), reason="bad_cose") from exc
    try:
        payload = loads_one(sign1.payload, "payload")
    except CoseError as exc:
        raise AttestationError(str(exc), reason="bad_payload") from exc
    return sign1, _parse_payload(payload)


def _bad(message: str) -> AttestationError:
    return AttestationError(message, reason="bad_payload")


def _parse_payload(payload: Any) -> AttestationDocument:
    if not isinstance(payload, dict):
        raise _bad("payload is not a CBOR map")

    def required(key: str) -> Any:
        if key not in payload:
            raise _bad(f"payload has no {key!r}")
        return payload[key]

    module_id = required("module_id")
    if not isinstance(module_id, str) or not module_id:
        raise _bad("module_id is not a non-empty text string")
    digest = required("digest")
    if not isinstance(digest, str):
        raise _bad("digest is not a text string")
    if digest != "SHA384":
        raise _bad(f"digest is {digest!r}, only 'SHA384' is supported")
    timestamp_ms = required("timestamp")
    if type(timestamp_ms) is not int or timestamp_ms <= 0:
        raise _bad("timestamp is not a positive integer (ms since the epoch)")
    try:
        timestamp = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=timestamp_ms)
    except OverflowError as exc:
        raise _bad(f"timestamp {timestamp_ms} is out of range") from exc

    pcrs_in = required("pcrs")
    if not isinstance(pcrs_in, dict) or not 1 <= len(pcrs_in) <= MAX_PCRS:
        raise _bad(f"pcrs is not a map of 1..{MAX_PCRS} entries")
    pcrs: dict[int, bytes] = {}
    for index, value in pcrs_in.items():
        if type(index) is not int or not 0 <= index < MAX_PCRS:
            raise _bad(f"pcrs has an index {index!r} outside 0..{MAX_PCRS - 1}")
        if not isinstance(value, bytes) or len(value) not in PCR_LENGTHS:
            raise _bad(f"PCR {index} is not a byte string of 32, 48 or 64 bytes")
        pcrs[index] = value

    certificate = required("certificate")
    if not isinstance(certificate, bytes) or not certificate:
        raise _bad("certificate is not a non-empty byte string")
    cabundle = required("cabundle")
    if not isinstance(cabundle, list) or not 1 <= len(cabundle) <= MAX_CABUNDLE:
        raise _bad(f"cabundle is not an array of 1..{MAX_CABUNDLE} certificates")
    for i, cert in enumerate(cabundle):
        if not isinstance(cert, bytes) or not cert:
            raise _bad(f"cabundle[{i}] is not a non-empty byte string")

    optional: dict[str, bytes | None] = {}
    for key in ("public_key", "user_data", "nonce"):
        value = payload.get(key)
        if value is not None and not isinstance(value, bytes):
            raise _bad(f"{key} is neither a byte string nor null")
        if value is not None and len(value) > MAX_USER_FIELD_BYTES:
            raise _bad(f"{key} is {len(value)} bytes, the limit is {MAX_USER_FIELD_BYTES}")
        optional[key] = value

    return AttestationDocument(
        module_id=module_id,
        digest=digest,
        timestamp=timestamp,
        timestamp_ms=timestamp_ms,
        pcrs=MappingProxyType(dict(sorted(pcrs.items()))),
        certificate=certificate,
        cabundle=tuple(cabundle),
        public_key=optional["public_key"],
        user_data=optional["user_data"],
        nonce=optional["nonce"],
        debug_mode=_is_debug(pcrs),
    )


def _is_debug(pcrs: Mapping[int, bytes]) -> bool:
    return all(i in pcrs and not any(pcrs[i]) for i in DEBUG_PCRS)


# -- the chain ------------------------------------------------------------------------------------

_Chain = list[tuple[str, x509.Certificate]]
_ExtT = TypeVar("_ExtT", bound=x509.ExtensionType)


def _resolve_time(at: datetime | str | None) -> datetime | None:
    if at is None or at == "now":
        return datetime.now(UTC)
    if at == "document":
        return None  # filled in once the payload is decoded
    if isinstance(at, datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("verify_attestation(at=...) needs an aware datetime")
        return at.astimezone(UTC)
    raise ValueError(f"verify_attestation(at={at!r}): expected a datetime, 'now' or 'document'")


def _load_root(root_pem: bytes | str | None) -> x509.Certificate:
    pem = AWS_NITRO_ROOT_PEM if root_pem is None else root_pem
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise AttestationError(
            "the pinned root is not a PEM certificate (check --root / root_pem)",
            reason="bad_root",
        ) from exc


def _build_chain(doc: AttestationDocument, root: x509.Certificate) -> _Chain:
    """``[(role, cert)]`` from the leaf up to the pinned root; each issued by the next."""
    root_der = root.public_bytes(Encoding.DER)
    if not hmac.compare_digest(doc.cabundle[0], root_der):
        carried = _parse_cert("cabundle[0]", doc.cabundle[0], check_key=False)
        raise AttestationError(
            f"cabundle[0] ({_name(carried.subject)}) is not the pinned root "
            f"({_name(root.subject)}, sha256 {hashlib.sha256(root_der).hexdigest()[:16]}...)",
            reason="chain_untrusted",
        )
    chain: _Chain = [("leaf", _parse_cert("leaf", doc.certificate))]
    for i in range(len(doc.cabundle) - 1, 0, -1):
        role = f"cabundle[{i}]"
        chain.append((role, _parse_cert(role, doc.cabundle[i])))
    _check_cert_algorithms("root", root)
    chain.append(("root", root))
    return chain


def _parse_cert(role: str, der: bytes, *, check_key: bool = True) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        # cryptography parses some fields lazily: touch them all here, so that a malformed
        # certificate is one clear error instead of a ValueError from deep inside a later check.
        _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
        _ = (cert.extensions, cert.public_key(), cert.serial_number)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AttestationError(f"{role} is not a DER X.509 certificate", reason="bad_cert") from exc
    if check_key:
        _check_cert_algorithms(role, cert)
    return cert


def _check_cert_algorithms(role: str, cert: x509.Certificate) -> None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError(
            f"{role} certificate {_name(cert.subject)} does not have a P-384 key",
            reason="bad_cert",
        )
    try:
        hash_alg = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise AttestationError(
            f"{role} certificate {_name(cert.subject)} has an unknown signature algorithm",
            reason="bad_cert",
        ) from exc
    if not isinstance(hash_alg, hashes.SHA384):
        raise AttestationError(
            f"{role} certificate {_name(cert.subject)} is not signed with ECDSA-SHA384",
            reason="bad_cert",
        )


def _check_signatures(chain: _Chain) -> None:
    for (role, cert), (issuer_role, issuer) in itertools.pairwise(chain):
        try:
            cert.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError) as exc:  # bad sig, name or algorithm
            raise AttestationError(
                f"{role} certificate {_name(cert.subject)} is not issued by "
                f"{issuer_role} {_name(issuer.subject)}",
                reason="chain_untrusted",
            ) from exc


def _check_validity(chain: _Chain, when: datetime) -> None:
    for role, cert in chain:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        window = f"valid {_iso(start)}..{_iso(end)}, checked at {_iso(when)}"
        if when < start:
            raise AttestationError(
                f"{role} certificate {_name(cert.subject)} is not yet valid ({window})",
                reason="cert_not_yet_valid",
            )
        if when > end:
            raise AttestationError(
                f"{role} certificate {_name(cert.subject)} has expired ({window})",
                reason="cert_expired",
            )


def _check_usage(chain: _Chain) -> None:
    for depth, (role, cert) in enumerate(chain):
        what = f"{role} certificate {_name(cert.subject)}"
        bc = _extension(cert, x509.BasicConstraints)
        ku = _extension(cert, x509.KeyUsage)
        if depth == 0:
            if bc is not None and bc.ca:
                raise AttestationError(
                    f"{what} is a CA, not an end entity", reason="bad_cert_usage"
                )
            if ku is None or not ku.digital_signature:
                raise AttestationError(
                    f"{what} does not allow digitalSignature", reason="bad_cert_usage"
                )
            continue
        if bc is None or not bc.ca:
            raise AttestationError(
                f"{what} is not a CA (basicConstraints)", reason="bad_cert_usage"
            )
        below = depth - 1  # intermediate CAs between this one and the leaf
        if bc.path_length is not None and below > bc.path_length:
            raise AttestationError(
                f"{what} allows pathLen {bc.path_length} but {below} CAs follow it",
                reason="bad_cert_usage",
            )
        if ku is None or not ku.key_cert_sign:
            raise AttestationError(f"{what} does not allow keyCertSign", reason="bad_cert_usage")


def _extension(cert: x509.Certificate, kind: type[_ExtT]) -> _ExtT | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # duplicate or malformed extension
        raise AttestationError(
            f"certificate {_name(cert.subject)} has malformed extensions", reason="bad_cert"
        ) from exc


# -- policy ---------------------------------------------------------------------------------------


def _check_policy(
    doc: AttestationDocument,
    expected_pcrs: Mapping[int, bytes],
    expected_nonce: bytes | None,
    production: bool,
    max_age: timedelta | None,
    when: datetime,
) -> None:
    if production:
        if doc.debug_mode:
            raise AttestationError(
                "debug-mode enclave (PCR0, PCR1 and PCR2 are zero) refused in production",
                reason="debug_mode",
            )
        pcr0 = doc.pcrs.get(0)
        if pcr0 is None or not any(pcr0):
            raise AttestationError(
                "PCR0 is absent or zero (debug-mode image) and refused in production",
                reason="debug_mode",
            )
    for index, want in sorted(expected_pcrs.items()):
        got = doc.pcrs.get(index)
        if got is None:
            raise AttestationError(f"PCR {index} is not in the document", reason="pcr_mismatch")
        if not hmac.compare_digest(got, bytes(want)):
            raise AttestationError(
                f"PCR {index} is {_hex(got)}, expected {_hex(want)}", reason="pcr_mismatch"
            )
    if expected_nonce is not None:
        if doc.nonce is None:
            raise AttestationError("the document carries no nonce", reason="nonce_mismatch")
        if not hmac.compare_digest(doc.nonce, bytes(expected_nonce)):
            raise AttestationError(
                f"nonce is {_hex(doc.nonce)} ({len(doc.nonce)} bytes), expected "
                f"{_hex(expected_nonce)} ({len(expected_nonce)} bytes)",
                reason="nonce_mismatch",
            )
    if max_age is not None and abs(when - doc.timestamp) > max_age:
        raise AttestationError(
            f"document made at {_iso(doc.timestamp)} is more than {max_age} from {_iso(when)}",
            reason="stale_document",
        )


# -- formatting -----------------------------------------------------------------------------------


def _info(role: str, cert: x509.Certificate) -> CertificateInfo:
    return CertificateInfo(
        role=role,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def _name(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return f"CN={cns[0].value!s}"
    return name.rfc4514_string() or "(empty subject)"


def _iso(when: datetime) -> str:
    when = when.astimezone(UTC)
    text = when.isoformat(timespec="milliseconds" if when.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def _hex(data: bytes, prefix: int = 8) -> str:
    if len(data) <= prefix:
        return data.hex()
    return data[:prefix].hex() + "..."
