"""``trio-sign attestation verify``: check an NSM attestation document and show what it says."""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..nitro import (
    AWS_NITRO_ROOT_SHA256,
    MAX_DOCUMENT_BYTES,
    AttestationError,
    VerifiedAttestation,
    verify_attestation,
)

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
    root_source = str(args.root) if args.root is not None else "AWS Nitro Enclaves root (built in)"
    if args.json:
        json.dump(_as_json(doc, root_source, sorted(pins)), sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        _print_text(doc, root_source, sorted(pins), args.production)
    return 0


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


def _print_text(
    doc: VerifiedAttestation, root_source: str, pinned: list[int], production: bool
) -> None:
    root_sha = hashlib.sha256(doc.cabundle[0]).hexdigest()
    aws = " (the AWS root)" if root_sha == AWS_NITRO_ROOT_SHA256 else ""
    checks = ["signature", "chain", f"validity at {_iso(doc.verified_at)}"]
    if pinned:
        checks.append("PCR " + ",".join(str(i) for i in pinned))
    if production:
        checks.append("production")
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
    }
