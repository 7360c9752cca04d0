"""``trio-sign attestation verify``: check an NSM attestation document and show what it says.

``--expect-spki`` and ``--expect-shares`` check what an attested-channel document binds
(DESIGN §10): its ``public_key`` is the enclave's TLS key, and its ``user_data`` the binding map
whose ``shares`` is the base bundle's SHA-256. A failure is one line with the reason code of
:data:`trio_sign.attested.CHANNEL_REASONS` (``spki_mismatch``, ``shares_mismatch``,
``bad_binding``)."""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ..nitro import (
    AWS_NITRO_ROOT_SHA256,
    MAX_DOCUMENT_BYTES,
    AttestationError,
    VerifiedAttestation,
    verify_attestation,
)
from ..nitro._binding import Binding, BindingError, decode_binding

#: Bytes shown of public_key / user_data / nonce in the text output.
HEX_PREFIX_BYTES = 16
#: Largest FILE read: a maximal document, base64-encoded, with line breaks.
_MAX_FILE_BYTES = MAX_DOCUMENT_BYTES * 2
_COSE_FIRST_BYTES = (0x84, 0xD2)  # untagged array(4), or tag 18
_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=")


def add_parser(sub: Any) -> None:
    attestation = sub.add_parser("attestation", help="verify Nitro attestation documents")
    cmds = attestation.add_subparsers(
        dest="attestation_command", required=True, metavar="SUBCOMMAND"
    )
    verify = cmds.add_parser(
        "verify",
        help="verify a document's signature, chain, validity and PCRs; print its fields",
        description="Verify an NSM attestation document (COSE_Sign1, ES384): the certificate "
        "chain to the pinned root (the AWS Nitro Enclaves root unless --root), every "
        "certificate's validity at --at, the signature, and the given PCR, nonce and "
        "production policy. Prints the decoded fields; exits 1 with the reason on failure.",
    )
    verify.add_argument(
        "file",
        metavar="FILE",
        help="the document: raw COSE bytes or base64 (detected); '-' reads stdin",
    )
    verify.add_argument(
        "--root",
        type=Path,
        metavar="PEM",
        help="pin this root certificate instead of the AWS Nitro Enclaves root "
        "(e.g. the local NSM's local-nsm-root.pem)",
    )
    verify.add_argument(
        "--pcr",
        action=_PcrAction,
        type=_pcr_arg,
        default={},
        metavar="N=HEX",
        help="require PCR N to equal HEX (repeatable)",
    )
    verify.add_argument(
        "--at",
        type=_at_arg,
        default="now",
        metavar="now|document|ISO-8601",
        help="when to check certificate validity: now (default), the document's own "
        "timestamp, or a time (UTC if no offset is given)",
    )
    verify.add_argument(
        "--production",
        action="store_true",
        help="refuse debug-mode documents (PCR0/1/2 zero)",
    )
    verify.add_argument("--nonce", type=_hex_arg, metavar="HEX", help="require this nonce")
    verify.add_argument(
        "--max-age",
        type=_seconds_arg,
        metavar="SECONDS",
        help="require the document's timestamp within SECONDS of --at",
    )
    verify.add_argument(
        "--expect-spki",
        type=_spki_arg,
        metavar="FILE|HEX",
        help="require public_key to be this key: a certificate or public key file (PEM or "
        "DER; e.g. the enclave's TLS certificate), or the DER SubjectPublicKeyInfo in hex",
    )
    verify.add_argument(
        "--expect-shares",
        type=_sha256_arg,
        metavar="HEX",
        help="require user_data to be the attested-channel binding whose shares is this "
        "SHA-256 (the sealed bundle's fingerprint, as `shares inspect` prints it)",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    document = _read_document(args.file)
    pins: dict[int, bytes] = dict(args.pcr)
    root_pem = args.root.read_bytes() if args.root is not None else None
    doc = verify_attestation(
        document,
        root_pem=root_pem,
        at=args.at,
        expected_pcrs=pins,
        expected_nonce=args.nonce,
        production=args.production,
        max_age=args.max_age,
    )
    expected = _check_binding(doc, args.expect_spki, args.expect_shares)
    root_source = str(args.root) if args.root is not None else "AWS Nitro Enclaves root (built in)"
    if args.json:
        json.dump(_as_json(doc, root_source, sorted(pins)), sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        _print_text(doc, root_source, sorted(pins), args.production, expected)
    return 0


def _check_binding(doc: VerifiedAttestation, spki: bytes | None, shares: bytes | None) -> list[str]:
    """Apply ``--expect-spki`` and ``--expect-shares``; return the names of the checks made.

    Raises:
        AttestedChannelError: ``spki_mismatch``, ``bad_binding`` or ``shares_mismatch``.
    """
    from ..attested import AttestedChannelError  # not at import: it brings Trio and gRPC

    checks = []
    if spki is not None:
        if doc.public_key is None:
            raise AttestedChannelError("the document binds no public_key", reason="spki_mismatch")
        if not hmac.compare_digest(doc.public_key, spki):
            raise AttestedChannelError(
                f"public_key is sha256 {hashlib.sha256(doc.public_key).hexdigest()[:16]}..., "
                f"--expect-spki is sha256 {hashlib.sha256(spki).hexdigest()[:16]}...",
                reason="spki_mismatch",
            )
        checks.append("public_key")
    if shares is not None:
        try:
            binding = decode_binding(doc.user_data)
        except (BindingError, TypeError, ValueError) as exc:
            raise AttestedChannelError(str(exc), reason="bad_binding") from exc
        if not hmac.compare_digest(binding.shares, shares):
            raise AttestedChannelError(
                f"the document binds shares {binding.shares.hex()}, --expect-shares is "
                f"{shares.hex()}",
                reason="shares_mismatch",
            )
        checks.append("shares")
    return checks


# -- arguments ------------------------------------------------------------------------------------


class _PcrAction(argparse.Action):
    """Collect ``--pcr N=HEX`` into ``{N: value}``; the same N twice must agree."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        index, value = values
        pins = dict(getattr(namespace, self.dest) or {})
        if pins.get(index, value) != value:
            parser.error(f"--pcr {index} is given twice with different values")
        pins[index] = value
        setattr(namespace, self.dest, pins)


def _hex_arg(text: str) -> bytes:
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex: {text[:20]!r}") from None


def _pcr_arg(text: str) -> tuple[int, bytes]:
    index_text, sep, value_text = text.partition("=")
    if not sep or not index_text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected N=HEX, got {text[:20]!r}")
    index = int(index_text)
    if not 0 <= index < 32:
        raise argparse.ArgumentTypeError(f"PCR index {index} is outside 0..31")
    value = _hex_arg(value_text.strip())
    if len(value) not in (32, 48, 64):
        raise argparse.ArgumentTypeError(
            f"PCR {index} value is {len(value)} bytes; PCRs are 32, 48 or 64 bytes"
        )
    return index, value


def _at_arg(text: str) -> datetime | str:
    if text in ("now", "document"):
        return text
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected now, document or an ISO-8601 time, got {text[:40]!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _sha256_arg(text: str) -> bytes:
    value = _hex_arg(text)
    if len(value) != 32:
        raise argparse.ArgumentTypeError(
            f"expected 64 hex digits (a SHA-256), got {len(value)} bytes"
        )
    return value


def _spki_arg(text: str) -> bytes:
    """A DER SubjectPublicKeyInfo from a certificate or key file (PEM or DER), or hex."""
    path = Path(text)
    if not path.is_file():
        value = _hex_arg(text)
        try:
            serialization.load_der_public_key(value)
        except (ValueError, UnsupportedAlgorithm):
            raise argparse.ArgumentTypeError(
                f"{text[:20]!r} is neither a file nor a hex DER SubjectPublicKeyInfo"
            ) from None
        return value
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror}") from None
    loaders = (
        lambda d: x509.load_pem_x509_certificate(d).public_key(),
        lambda d: x509.load_der_x509_certificate(d).public_key(),
        serialization.load_pem_public_key,
        serialization.load_der_public_key,
    )
    for load in loaders:
        try:
            key = load(data)
        except (ValueError, UnsupportedAlgorithm):
            continue
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    raise argparse.ArgumentTypeError(f"{text} holds no certificate or public key (PEM or DER)")


def _seconds_arg(text: str) -> timedelta:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:20]!r}") from None
    if not seconds >= 0:
        raise argparse.ArgumentTypeError("--max-age must be zero or more seconds")
    return timedelta(seconds=seconds)


def _read_document(name: str) -> bytes:
    if name == "-":
        data = sys.stdin.buffer.read(_MAX_FILE_BYTES + 1)
    else:
        with open(name, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise AttestationError(
            f"{name} is larger than {_MAX_FILE_BYTES} bytes; not an attestation document",
            reason="bad_cose",
        )
    return decode_document_bytes(data)


def decode_document_bytes(data: bytes) -> bytes:
    """Raw COSE bytes as they are, base64 (standard or URL-safe, any line breaks) decoded.

    Detection: a raw document starts with ``0x84`` (array of 4) or ``0xd2`` (tag 18), neither
    of which is a base64 character; anything made only of base64 characters and whitespace is
    decoded. Anything else is returned unchanged for the verifier to refuse.
    """
    if not data or data[0] in _COSE_FIRST_BYTES:
        return data
    text = b"".join(data.split())
    if not text or not set(text) <= _BASE64_CHARS:
        return data
    text = text.replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return data


# -- output ---------------------------------------------------------------------------------------


def _iso(when: datetime) -> str:
    when = when.astimezone(UTC)
    text = when.isoformat(timespec="milliseconds" if when.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def _field_summary(value: bytes | None) -> str:
    if value is None:
        return "absent"
    if not value:
        return "0 bytes"
    shown = value[:HEX_PREFIX_BYTES].hex()
    more = "..." if len(value) > HEX_PREFIX_BYTES else ""
    return f"{len(value)} bytes  {shown}{more}"


def _binding(doc: VerifiedAttestation) -> Binding | None:
    """The attested-channel binding in ``user_data``, or None when it is something else."""
    try:
        return decode_binding(doc.user_data)
    except (BindingError, TypeError, ValueError):
        return None


def _print_text(
    doc: VerifiedAttestation,
    root_source: str,
    pinned: list[int],
    production: bool,
    expected: Sequence[str] = (),
) -> None:
    root_sha = hashlib.sha256(doc.cabundle[0]).hexdigest()
    aws = " (the AWS root)" if root_sha == AWS_NITRO_ROOT_SHA256 else ""
    checks = ["signature", "chain", f"validity at {_iso(doc.verified_at)}"]
    if pinned:
        checks.append("PCR " + ",".join(str(i) for i in pinned))
    if production:
        checks.append("production")
    checks += list(expected)
    print(f"attestation document OK ({'; '.join(checks)})")
    rows = [
        ("module_id", doc.module_id),
        ("timestamp", f"{_iso(doc.timestamp)}  ({doc.timestamp_ms} ms)"),
        ("digest", doc.digest),
        ("mode", "DEBUG (PCR0, PCR1, PCR2 are zero)" if doc.debug_mode else "production"),
        ("window", f"{_iso(doc.not_before)} .. {_iso(doc.not_after)}"),
        ("root", f"{root_source}, sha256 {root_sha}{aws}"),
        ("public_key", _field_summary(doc.public_key)),
        ("user_data", _field_summary(doc.user_data)),
        ("nonce", _field_summary(doc.nonce)),
    ]
    binding = _binding(doc)
    if binding is not None:
        rows += [
            ("shares", binding.shares.hex()),
            ("deltas", binding.deltas.hex()),
            ("config", binding.config.hex()),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("pcrs")
    for index, pcr in doc.pcrs.items():
        marks = []
        if doc.debug_mode and index in (0, 1, 2):
            marks.append("debug")
        if index in pinned:
            marks.append("pinned")
        suffix = f"  ({', '.join(marks)})" if marks else ""
        print(f"  PCR{index:<3} {pcr.hex()}{suffix}")
    print("chain (leaf first)")
    role_width = max(len(c.role) for c in doc.chain)
    for cert in doc.chain:
        print(
            f"  {cert.role:<{role_width}}  {cert.subject}\n"
            f"  {'':<{role_width}}  valid {_iso(cert.not_before)} .. {_iso(cert.not_after)}"
        )


def _as_json(doc: VerifiedAttestation, root_source: str, pinned: list[int]) -> dict[str, Any]:
    def field(value: bytes | None) -> dict[str, Any] | None:
        return None if value is None else {"length": len(value), "hex": value.hex()}

    binding = _binding(doc)
    return {
        "valid": True,
        "module_id": doc.module_id,
        "timestamp": _iso(doc.timestamp),
        "timestamp_ms": doc.timestamp_ms,
        "digest": doc.digest,
        "debug_mode": doc.debug_mode,
        "verified_at": _iso(doc.verified_at),
        "not_before": _iso(doc.not_before),
        "not_after": _iso(doc.not_after),
        "root": {"source": root_source, "sha256": hashlib.sha256(doc.cabundle[0]).hexdigest()},
        "pcrs": {str(i): v.hex() for i, v in doc.pcrs.items()},
        "pinned_pcrs": pinned,
        "chain": [
            {
                "role": c.role,
                "subject": c.subject,
                "issuer": c.issuer,
                "serial": f"{c.serial:x}",
                "not_before": _iso(c.not_before),
                "not_after": _iso(c.not_after),
            }
            for c in doc.chain
        ],
        "public_key": field(doc.public_key),
        "user_data": field(doc.user_data),
        "nonce": field(doc.nonce),
        "binding": None
        if binding is None
        else {
            "shares": binding.shares.hex(),
            "deltas": binding.deltas.hex(),
            "config": binding.config.hex(),
        },
    }
