"""COSE_Sign1 with ES384 (RFC 9052), as the Nitro Security Module emits it. Sans-io.

The NSM emits an *untagged* ``COSE_Sign1`` array ``[protected, unprotected, payload, signature]``
with ``protected = bstr(a1 01 38 22) = {1: -35}`` (ES384), ``unprotected = {}`` and a raw 96-byte
``r || s`` signature. Tag 18 is legal COSE and is accepted too.

The signed bytes are ``CBOR(["Signature1", protected, b"", payload])`` built from the *original*
``protected`` and ``payload`` byte strings: never re-encode a decoded map.

Errors: decoding raises :class:`CoseError` (a ``ValueError``); the attestation verifier maps it
to ``AttestationError(reason="bad_cose")`` at its boundary.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

#: COSE algorithm identifier of ECDSA P-384 with SHA-384.
ES384 = -35
#: Tag of a tagged COSE_Sign1 (RFC 9052 §4.2).
COSE_SIGN1_TAG = 18
_TAG18 = bytes([0xC0 | COSE_SIGN1_TAG])
#: The protected header bytes the NSM emits: ``{1: -35}``.
ES384_PROTECTED = b"\xa1\x01\x38\x22"
#: Size of one P-384 scalar, and of a raw ``r || s`` signature.
P384_SCALAR_BYTES = 48
ES384_SIGNATURE_BYTES = 2 * P384_SCALAR_BYTES
#: COSE header label of ``alg`` and ``crit``.
_ALG = 1
_CRIT = 2


class CoseError(ValueError):
    """The bytes are not a COSE_Sign1 this module accepts (one-line message)."""


@dataclass(frozen=True)
class CoseSign1:
    """A decoded COSE_Sign1 that keeps the original byte strings.

    Attributes:
        protected: the protected header exactly as received (the signed bytes).
        unprotected: the unprotected header map (not signed; the NSM sends ``{}``).
        payload: the payload exactly as received (the signed bytes).
        signature: the raw 96-byte ``r || s`` ES384 signature.
    """

    protected: bytes
    payload: bytes
    signature: bytes
    unprotected: dict[Any, Any] = field(default_factory=dict)

    def sig_structure(self) -> bytes:
        """The bytes the signature covers."""
        return sig_structure(self.protected, self.payload)

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> bool:
        """``True`` when the ES384 signature over the Sig_structure verifies with ``public_key``.

        The key must be on P-384; any other curve returns ``False``.
        """
        if not isinstance(public_key.curve, ec.SECP384R1):
            return False
        try:
            public_key.verify(
                raw_to_der(self.signature), self.sig_structure(), ec.ECDSA(hashes.SHA384())
            )
        except InvalidSignature:
            return False
        return True

    def encode(self) -> bytes:
        """The untagged COSE_Sign1 encoding (what the NSM emits)."""
        return cbor2.dumps([self.protected, self.unprotected, self.payload, self.signature])


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """``CBOR(["Signature1", protected, external_aad, payload])`` (RFC 9052 §4.4)."""
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def raw_to_der(signature: bytes) -> bytes:
    """A raw ``r || s`` P-384 signature as the DER ``ECDSA-Sig-Value`` ``cryptography`` takes."""
    if len(signature) != ES384_SIGNATURE_BYTES:
        raise CoseError(
            f"ES384 signature is {len(signature)} bytes, expected {ES384_SIGNATURE_BYTES}"
        )
    r = int.from_bytes(signature[:P384_SCALAR_BYTES], "big")
    s = int.from_bytes(signature[P384_SCALAR_BYTES:], "big")
    return encode_dss_signature(r, s)


def der_to_raw(signature: bytes) -> bytes:
    """A DER ``ECDSA-Sig-Value`` as the raw fixed-size ``r || s`` COSE uses."""
    r, s = decode_dss_signature(signature)
    return r.to_bytes(P384_SCALAR_BYTES, "big") + s.to_bytes(P384_SCALAR_BYTES, "big")


def decode_sign1(data: bytes) -> CoseSign1:
    """Decode a COSE_Sign1 (untagged, or tagged 18) whose protected header says ES384.

    Requirements: exactly one CBOR item with no trailing bytes; a 4-element array; ``protected``
    a byte string holding a map with ``1: -35`` and no ``crit`` (we understand no critical
    headers); ``unprotected`` a map; ``payload`` a byte string (detached payloads are refused);
    ``signature`` 96 bytes.

    Raises:
        CoseError: naming the first requirement that failed.
    """
    # Strip the one-byte tag 18 ourselves: cbor2 turns what is under a tag into immutable
    # containers (tuple, frozendict), and we want the same plain types either way.
    if data[:1] == _TAG18:
        data = data[1:]
    item = loads_one(data, "COSE_Sign1")
    if isinstance(item, cbor2.CBORTag):
        if item.tag == COSE_SIGN1_TAG:
            raise CoseError("COSE_Sign1 tag 18 must be encoded in one byte (0xd2)")
        raise CoseError(f"CBOR tag {item.tag} is not COSE_Sign1 (18)")
    if not isinstance(item, list) or len(item) != 4:
        raise CoseError("COSE_Sign1 is not a 4-element CBOR array")
    protected, unprotected, payload, signature = item
    if not isinstance(protected, bytes):
        raise CoseError("COSE_Sign1 protected header is not a byte string")
    if not isinstance(unprotected, dict):
        raise CoseError("COSE_Sign1 unprotected header is not a map")
    if not isinstance(payload, bytes):
        raise CoseError("COSE_Sign1 payload is not a byte string (detached payloads refused)")
    if not isinstance(signature, bytes):
        raise CoseError("COSE_Sign1 signature is not a byte string")
    header = loads_one(protected, "protected header") if protected else {}
    if not isinstance(header, dict):
        raise CoseError("COSE_Sign1 protected header is not a CBOR map")
    alg = header.get(_ALG)
    if type(alg) is not int or alg != ES384:
        raise CoseError(f"COSE_Sign1 algorithm is {alg!r}, expected ES384 (-35)")
    if _CRIT in header:
        raise CoseError("COSE_Sign1 has critical headers, none are supported")
    if _ALG in unprotected:
        raise CoseError("COSE_Sign1 carries alg in the unprotected header")
    if len(signature) != ES384_SIGNATURE_BYTES:
        raise CoseError(
            f"ES384 signature is {len(signature)} bytes, expected {ES384_SIGNATURE_BYTES}"
        )
    return CoseSign1(
        protected=protected, payload=payload, signature=signature, unprotected=unprotected
    )


def sign1_es384(payload: bytes, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign ``payload`` and return the untagged COSE_Sign1 bytes, exactly as the NSM shapes them."""
    if not isinstance(private_key.curve, ec.SECP384R1):
        raise ValueError("ES384 needs a P-384 key")
    der = private_key.sign(sig_structure(ES384_PROTECTED, payload), ec.ECDSA(hashes.SHA384()))
    return CoseSign1(protected=ES384_PROTECTED, payload=payload, signature=der_to_raw(der)).encode()


def loads_one(data: bytes, what: str) -> Any:
    """One CBOR item from ``data``, refusing trailing bytes (``cbor2.loads`` ignores them)."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CoseError(f"{what} is not valid CBOR: {exc}") from exc
    if stream.tell() != len(data):
        raise CoseError(f"{what} has {len(data) - stream.tell()} trailing bytes")
    return item
