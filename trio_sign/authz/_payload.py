"""The approval payload (DESIGN §11): the exact bytes an approver signs. Sans-io, no keys.

::

    "trio-sign/approval/v1" || 0x00
    || u16be(len(a)) || a || u16be(len(s)) || s
    || SHA-256(message) || i64be(expires_at_unix_ms)

``a`` and ``s`` are the UTF-8 account id and session id. Other implementations (a policy
service, a phone, an HSM script) produce these bytes: docs/approvals.md has a worked example
that a test checks against this code.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

#: The domain tag, followed by one zero byte, at the start of every payload.
APPROVAL_DOMAIN: Final = b"trio-sign/approval/v1"
#: The longest account id or session id the payload can carry (a u16 length).
MAX_ID_BYTES: Final = 0xFFFF
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

_I64 = struct.Struct(">q")


def _utf8(value: str, name: str) -> bytes:
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid UTF-8 text (a lone surrogate)") from None
    if len(encoded) > MAX_ID_BYTES:
        raise ValueError(f"{name} is {len(encoded)} UTF-8 bytes; at most {MAX_ID_BYTES} fit")
    return encoded


def approval_payload_for_digest(
    account_id: str, session_id: str, message_sha256: bytes, expires_at_unix_ms: int
) -> bytes:
    """The payload for a message whose SHA-256 is ``message_sha256`` (32 bytes).

    Raises:
        ValueError: an id is not UTF-8-encodable or longer than 65535 bytes, the digest is not
            32 bytes, or ``expires_at_unix_ms`` is outside int64.
    """
    a = _utf8(account_id, "account_id")
    s = _utf8(session_id, "session_id")
    if len(message_sha256) != 32:
        raise ValueError("message_sha256 must be 32 bytes")
    if type(expires_at_unix_ms) is not int or not INT64_MIN <= expires_at_unix_ms <= INT64_MAX:
        raise ValueError("expires_at_unix_ms must be an int64")
    return b"".join(
        (
            APPROVAL_DOMAIN,
            b"\x00",
            len(a).to_bytes(2, "big"),
            a,
            len(s).to_bytes(2, "big"),
            s,
            bytes(message_sha256),
            _I64.pack(expires_at_unix_ms),
        )
    )


def approval_payload(
    account_id: str, session_id: str, message: bytes, expires_at_unix_ms: int
) -> bytes:
    """The payload an approver signs to let ``session_id`` of ``account_id`` sign ``message``
    until ``expires_at_unix_ms`` (see :func:`approval_payload_for_digest`)."""
    return approval_payload_for_digest(
        account_id, session_id, hashlib.sha256(message).digest(), expires_at_unix_ms
    )
