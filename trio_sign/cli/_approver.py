"""``trio-sign approver``: approver keys and approvals (DESIGN §11, docs/approvals.md).

``keygen`` makes an Ed25519 or P-256 approver key (a 0600 JSON file) and prints the
``[approvers.<key_id>]`` lines for ``enclave.toml``; ``approve`` signs the approval payload
for one account, session and message and prints the approval as JSON (hex and base64), so a
gateway or policy service in any language can attach it to ``SignRequest.approvals``.

The key file (``"format": "trio-sign/approver-key"``) holds the private key in hex: the
32-byte Ed25519 seed (RFC 8032) or the 32-byte P-256 scalar (big-endian). It is a secret:
written 0600, never printed or logged.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Final

from ..authz import KEY_TYPES, approval_payload
from ..authz._keys import KEY_ID_PATTERN

#: The largest message file ``approve`` reads (every policy's largest message fits).
MAX_MESSAGE_FILE_BYTES: Final = 64 * 1024
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")


def add_parser(sub: Any) -> None:
    approver = sub.add_parser(
        "approver",
        help="approver keys and approvals for the enclave's policies (docs/approvals.md)",
        description="Make approver keys (Ed25519 or P-256) and sign approvals: the signatures "
        "an account's policy needs before the enclave signs (DESIGN §11).",
    )
    commands = approver.add_subparsers(dest="approver_command", required=True, metavar="COMMAND")
    keygen = commands.add_parser(
        "keygen",
        help="make an approver key (0600 file); prints its enclave.toml lines",
        description="Make an approver key, write it to --out (mode 0600, refused if it "
        "exists) and print its key id, public key and the [approvers.KEY_ID] lines for "
        "enclave.toml.",
    )
    keygen.add_argument("--type", choices=KEY_TYPES, default="ed25519", help="default ed25519")
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE", help="the key file")
    keygen.add_argument(
        "--key-id",
        metavar="ID",
        help="the key's name in enclave.toml and in approvals (default: the file's name "
        "without its extension)",
    )
    keygen.set_defaults(func=cmd_keygen)
    approve = commands.add_parser(
        "approve",
        help="sign an approval for one account, session and message; prints JSON",
        description="Sign the approval payload (docs/approvals.md) for --account, --session "
        "and the message in --message-file, valid for --expires-in; print the approval as "
        "JSON (key_id, signature in hex and base64, expires_at_unix_ms).",
    )
    approve.add_argument("--key", type=Path, required=True, metavar="FILE", help="the key file")
    approve.add_argument("--account", required=True, metavar="ID", help="the account id")
    approve.add_argument("--session", required=True, metavar="ID", help="the session id")
    approve.add_argument(
        "--message-file",
        type=Path,
        required=True,
        metavar="FILE",
        help="the exact message bytes to be signed ('-': standard input)",
    )
    approve.add_argument(
        "--expires-in",
        default="60s",
        metavar="DURATION",
        help="how long the approval is valid: 500ms, 60s, 5m, 1h (default 60s)",
    )
    approve.set_defaults(func=cmd_approve)


def parse_duration_ms(text: str) -> int:
    """``"60s"`` -> 60000 (units ms, s, m, h; no unit: seconds)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 60s, 5m, 500ms)")
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[match.group(2) or "s"]
    return round(float(match.group(1)) * scale)


def cmd_keygen(args: argparse.Namespace) -> int:
    from ._listen import UsageError

    out: Path = args.out
    key_id = args.key_id if args.key_id is not None else out.name.split(".")[0]
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise UsageError(
            f"key id {key_id!r} must be 1..64 characters of A-Z a-z 0-9 . _ : @ - (--key-id)"
        )
    if out.exists():
        raise UsageError(f"{out} exists; refusing to overwrite a key (choose another --out)")
    from ..gateway._approvals import ApproverKeyFileError, ApproverSigningKey

    with ApproverSigningKey.generate(args.type) as key:
        try:
            key.save(out, key_id=key_id)
        except ApproverKeyFileError as exc:
            raise UsageError(str(exc)) from None
        public, toml = key.public_key, key.enclave_toml(key_id)
    print(f"key id: {key_id}")
    print(f"type: {args.type}")
    print(f"public key: {public.hex()}")
    print(f"key file: {out} (mode 0600; keep it secret)")
    print()
    print("# enclave.toml: add this approver, then name it in a policy's approvers")
    print(toml, end="")
    return 0


def make_approval(
    key_file: Path, *, account: str, session: str, message: bytes, expires_in_ms: int
) -> dict[str, Any]:
    """The approval as JSON-ready values (see :func:`cmd_approve`)."""
    from ..gateway._approvals import ApproverKeyFileError, ApproverSigningKey
    from ._listen import UsageError

    try:
        key = ApproverSigningKey.load(key_file)  # refuses a file others may read
    except ApproverKeyFileError as exc:
        raise UsageError(str(exc)) from None
    with key:
        key_id, kind = key.key_id, key.type
        if key_id is None:
            raise UsageError(f"{key_file} names no key_id (trio-sign approver keygen writes one)")
        expires = time.time_ns() // 1_000_000 + expires_in_ms
        payload = approval_payload(account, session, message, expires)
        signature = key.sign(payload)
    return {
        "key_id": key_id,
        "type": kind,
        "account_id": account,
        "session_id": session,
        "message_sha256": hashlib.sha256(message).hexdigest(),
        "expires_at_unix_ms": expires,
        "signature_hex": signature.hex(),
        "signature_base64": base64.b64encode(signature).decode("ascii"),
        "payload_hex": payload.hex(),
    }


def cmd_approve(args: argparse.Namespace) -> int:
    from ._listen import UsageError

    try:
        expires_in = parse_duration_ms(args.expires_in)
    except ValueError as exc:
        raise UsageError(f"--expires-in: {exc}") from None
    if expires_in <= 0:
        raise UsageError("--expires-in must be positive")
    source: Path = args.message_file
    try:
        if str(source) == "-":
            message = sys.stdin.buffer.read(MAX_MESSAGE_FILE_BYTES + 1)
        else:
            with source.open("rb") as f:
                message = f.read(MAX_MESSAGE_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read --message-file {source}: {exc.strerror or exc}") from exc
    if len(message) > MAX_MESSAGE_FILE_BYTES:
        raise UsageError(f"--message-file is larger than {MAX_MESSAGE_FILE_BYTES} bytes")
    try:
        approval = make_approval(
            args.key,
            account=args.account,
            session=args.session,
            message=message,
            expires_in_ms=expires_in,
        )
    except ValueError as exc:  # an id too long or not UTF-8
        raise UsageError(str(exc)) from None
    print(json.dumps(approval, indent=2))
    return 0
