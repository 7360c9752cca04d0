"""Approver keys and their signatures (DESIGN §11): Ed25519 and P-256, verification only.

* ``ed25519``: a 32-byte public key (a valid point of the prime-order subgroup) and a 64-byte
  RFC 8032 signature over the payload, verified by libsodium (strict: a non-canonical ``S``,
  ``S >= L``, is refused before libsodium is asked, with its own reason).
* ``p256``: a 65-byte uncompressed SEC1 public key (``04 || X || Y``, on the curve) and a
  64-byte ``r || s`` (big-endian) ECDSA signature with SHA-256 over the payload, verified by
  ``cryptography``; ``r`` or ``s`` zero or ``>= n`` is refused before it.

Nothing here is secret: public keys and signatures only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from ..crypto import _sodium

KeyType = Literal["ed25519", "p256"]
KEY_TYPES: Final[tuple[KeyType, ...]] = ("ed25519", "p256")
#: Public key size per type.
PUBLIC_KEY_BYTES: Final = {"ed25519": 32, "p256": 65}
SIGNATURE_BYTES: Final = 64
#: The order of the P-256 group.
P256_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: What a key id may be: it names the key in enclave.toml and in logs, so printable ASCII only.
KEY_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
MAX_KEY_ID_BYTES: Final = 64


class ApproverKeyError(ValueError):
    """A public key that cannot be an approver key of its type (the message names why)."""


@dataclass(frozen=True, slots=True)
class ApproverKey:
    """One approver's public key, from ``[approvers.<key_id>]``.

    Attributes:
        key_id: the name approvals carry (``Approval.key_id``).
        type: ``"ed25519"`` or ``"p256"``.
        public_key: 32 bytes (Ed25519) or 65 bytes (P-256, uncompressed SEC1).
    """

    key_id: str
    type: KeyType
    public_key: bytes
    _p256: ec.EllipticCurvePublicKey | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(cls, key_id: str, type: str, public_key: bytes) -> ApproverKey:
        """Check and build a key.

        Raises:
            ApproverKeyError: a bad key id, an unknown type, or a key that is not a valid
                public key of its type.
        """
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise ApproverKeyError(
                f"key id {key_id!r} must be 1..64 characters of A-Z a-z 0-9 . _ : @ - "
                "(starting with a letter or digit)"
            )
        if type == "ed25519":
            if len(public_key) != 32 or not _sodium.is_valid_point(public_key):
                raise ApproverKeyError("not a valid Ed25519 public key (32 bytes, a valid point)")
            return cls(key_id, "ed25519", bytes(public_key))
        if type == "p256":
            if len(public_key) != 65 or public_key[0] != 0x04:
                raise ApproverKeyError(
                    "not a P-256 public key: 65 bytes, uncompressed SEC1 (04 || X || Y)"
                )
            try:
                loaded = ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), bytes(public_key)
                )
            except ValueError:
                raise ApproverKeyError("not a point on P-256") from None
            return cls(key_id, "p256", bytes(public_key), loaded)
        raise ApproverKeyError(f"unknown key type {type!r} (known: {', '.join(KEY_TYPES)})")

    def check_signature(self, signature: bytes, payload: bytes) -> str | None:
        """None if ``signature`` by this key verifies over ``payload``; otherwise the refusal
        reason: ``malformed_signature`` (wrong size, non-canonical Ed25519 ``S``, P-256 ``r``
        or ``s`` zero or ``>= n``) or ``bad_signature`` (well formed, does not verify)."""
        if len(signature) != SIGNATURE_BYTES:
            return "malformed_signature"
        if self.type == "ed25519":
            if int.from_bytes(signature[32:], "little") >= _sodium.L:
                return "malformed_signature"
            try:
                crypto_sign_open(bytes(signature) + payload, self.public_key)
            except BadSignatureError:
                return "bad_signature"
            return None
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        if not (0 < r < P256_N and 0 < s < P256_N):
            return "malformed_signature"
        assert self._p256 is not None
        try:
            self._p256.verify(encode_dss_signature(r, s), payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return "bad_signature"
        return None
