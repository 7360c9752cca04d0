"""AWS KMS ``CiphertextForRecipient``: the BER CMS EnvelopedData KMS returns for an enclave.

When a KMS ``Decrypt`` (or ``GenerateDataKey``...) request carries a ``Recipient`` attestation
document, KMS does not return the plaintext; it returns it enveloped for the RSA public key in
the document's ``public_key`` field. The format (verified on real KMS output, see
``vectors/nitro/kms_cms`` and NITRO_NOTES §3) is::

    ContentInfo (BER, indefinite length: 30 80 ...)   contentType = envelopedData
     └ [0] EnvelopedData  version 2, no originatorInfo, no unprotectedAttrs
         ├ recipientInfos SET of exactly one KeyTransRecipientInfo, version 2
         │    rid = [0] subjectKeyIdentifier = SHA-256(DER SubjectPublicKeyInfo of our key)
         │    keyEncryptionAlgorithm = id-RSAES-OAEP(sha256, MGF1(sha256), empty label)
         │    encryptedKey = RSA-OAEP(CEK), 256 bytes for RSA-2048
         └ encryptedContentInfo  contentType = id-data
              contentEncryptionAlgorithm = aes256-CBC, params = 16-byte IV
              encryptedContent [0] IMPLICIT OCTET STRING, possibly constructed (chunked)

``cryptography``'s own PKCS#7 decryption refuses this BER, so we read it with a small, strict
BER TLV reader (definite and indefinite lengths, constructed OCTET STRINGs concatenated,
bounded input size, depth and element count) and check every field of the fixed structure
before doing any RSA work. The recipient identifier is compared with SHA-256 of our own SPKI
first, so a blob meant for another key is refused (``wrong_recipient``) without an RSA operation.

Secrets and memory: the plaintext is returned in a ``bytearray`` the caller owns and must zero
(:func:`trio_sign.crypto._sodium.memzero`). The content-encryption key (CEK) is copied into a
``bytearray`` that is zeroed before returning, and so is the padded plaintext on any failure.
What CPython and ``cryptography`` do not let us zero: ``RSAPrivateKey.decrypt`` returns the CEK
as an immutable ``bytes`` object (it stays in the heap until its memory is reused), and
OpenSSL's cipher context keeps its own expanded AES key schedule, which OpenSSL clears when the
context is freed. The encoder (for the local KMS stand-in) likewise holds its CEK and padded
plaintext in ``bytearray`` buffers and zeroes them (``RSAPublicKey.encrypt`` takes one
immutable copy of the CEK).

Padding oracles: AES-CBC is not authenticated, and the parent that hands us the blob is not
trusted. A parent replaying modified blobs could use "bad padding" vs. "ok" as an oracle.
:class:`EphemeralRecipientKey` therefore drops its private key after the first failure at or
after the RSA step, so each blob can be probed at most once per key (one per boot).

Error handling: everything refused raises :class:`CmsError` with a stable ``reason``:
``bad_ber`` (not well-formed BER, or the wrong shape), ``unsupported`` (a version, OID or
algorithm other than the one KMS uses; the message names it), ``wrong_recipient`` (the rid is
not our key), ``decrypt_failed`` (RSA-OAEP or AES failed) and ``bad_padding``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from types import TracebackType

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .._errors import TrioSignError
from ..crypto._sodium import memzero

#: Refuse recipient ciphertexts larger than this. KMS plaintexts are at most 4096 bytes, so a
#: real ``CiphertextForRecipient`` is well under 8 KiB; the bound only protects the parser.
MAX_RECIPIENT_CIPHERTEXT_BYTES = 64 * 1024
#: Maximum nesting of BER elements (the KMS structure is 10 deep, at the MGF1 hash OID).
MAX_BER_DEPTH = 12
#: Maximum number of BER elements in one blob (chunked content can have many OCTET STRINGs).
MAX_BER_ELEMENTS = 4096
#: RSA modulus size of :meth:`EphemeralRecipientKey.generate` (what the AWS SDK-C uses).
RECIPIENT_RSA_BITS = 2048

_AES_BLOCK = 16
_CEK_BYTES = 32

# Encoded OID contents (the bytes after 06 <len>) and their dotted forms for messages.
_OID_ENVELOPED_DATA = bytes.fromhex("2a864886f70d010703")  # 1.2.840.113549.1.7.3
_OID_DATA = bytes.fromhex("2a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_RSAES_OAEP = bytes.fromhex("2a864886f70d010107")  # 1.2.840.113549.1.1.7
_OID_MGF1 = bytes.fromhex("2a864886f70d010108")  # 1.2.840.113549.1.1.8
_OID_P_SPECIFIED = bytes.fromhex("2a864886f70d010109")  # 1.2.840.113549.1.1.9
_OID_SHA256 = bytes.fromhex("608648016503040201")  # 2.16.840.1.101.3.4.2.1
_OID_AES256_CBC = bytes.fromhex("60864801650304012a")  # 2.16.840.1.101.3.4.1.42

# BER tag classes and the universal tag numbers we use.
_UNIVERSAL, _CONTEXT = 0, 2
_INTEGER, _OCTET_STRING, _NULL, _OID, _SEQUENCE, _SET = 2, 4, 5, 6, 16, 17


class CmsError(TrioSignError):
    """A KMS ``CiphertextForRecipient`` (CMS EnvelopedData) was refused.

    Attributes:
        reason: ``"bad_ber"``, ``"unsupported"``, ``"wrong_recipient"``, ``"decrypt_failed"``
            or ``"bad_padding"``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------------------
# A strict BER TLV reader


@dataclass(frozen=True, slots=True)
class _Tlv:
    cls: int
    constructed: bool
    number: int
    offset: int
    content: bytes  # primitive content (empty for constructed)
    children: tuple[_Tlv, ...]  # constructed children (empty for primitive)


def _bad(message: str) -> CmsError:
    return CmsError(f"recipient ciphertext is not valid BER: {message}", reason="bad_ber")


class _BerReader:
    __slots__ = ("_count", "_data")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._count = 0

    def read_all(self) -> _Tlv:
        tlv, end = self._read(0, 0)
        if end != len(self._data):
            raise _bad(f"{len(self._data) - end} trailing bytes after the ContentInfo")
        return tlv

    def _read(self, pos: int, depth: int) -> tuple[_Tlv, int]:
        """One element at ``pos``; returns it and the offset just past it."""
        data = self._data
        if depth > MAX_BER_DEPTH:
            raise _bad(f"nesting deeper than {MAX_BER_DEPTH} at offset {pos}")
        self._count += 1
        if self._count > MAX_BER_ELEMENTS:
            raise _bad(f"more than {MAX_BER_ELEMENTS} elements")
        start = pos
        if pos + 2 > len(data):
            raise _bad(f"truncated element header at offset {pos}")
        ident = data[pos]
        cls, constructed, number = ident >> 6, bool(ident & 0x20), ident & 0x1F
        if number == 0x1F:
            raise _bad(f"high tag number form at offset {pos}")
        first = data[pos + 1]
        pos += 2
        if first == 0x80:
            if not constructed:
                raise _bad(f"indefinite length on a primitive element at offset {start}")
            children: list[_Tlv] = []
            while True:
                if pos + 2 > len(data):
                    raise _bad(f"missing end-of-contents for the element at offset {start}")
                if data[pos] == 0 and data[pos + 1] == 0:
                    return _Tlv(cls, True, number, start, b"", tuple(children)), pos + 2
                child, pos = self._read(pos, depth + 1)
                children.append(child)
        if first & 0x80:
            nbytes = first & 0x7F
            if nbytes > 4:
                raise _bad(f"length of {nbytes} bytes at offset {start}")
            if pos + nbytes > len(data):
                raise _bad(f"truncated length at offset {start}")
            length = int.from_bytes(data[pos : pos + nbytes], "big")
            pos += nbytes
        else:
            length = first
        end = pos + length
        if end > len(data):
            raise _bad(f"length {length} at offset {start} runs past the end of the input")
        if ident == 0 and length == 0:
            raise _bad(f"unexpected end-of-contents at offset {start}")
        if not constructed:
            return _Tlv(cls, False, number, start, data[pos:end], ()), end
        children = []
        while pos < end:
            child, pos = self._read(pos, depth + 1)
            if pos > end:
                raise _bad(f"element at offset {child.offset} overruns its parent")
            children.append(child)
        return _Tlv(cls, True, number, start, b"", tuple(children)), end


def _expect(tlv: _Tlv, what: str, cls: int, number: int, *, constructed: bool) -> _Tlv:
    if tlv.cls != cls or tlv.number != number or tlv.constructed != constructed:
        raise _bad(f"{what}: unexpected element at offset {tlv.offset}")
    return tlv


def _seq(tlv: _Tlv, what: str) -> tuple[_Tlv, ...]:
    return _expect(tlv, what, _UNIVERSAL, _SEQUENCE, constructed=True).children


def _octets(tlv: _Tlv, what: str, depth: int = 0) -> bytes:
    """The value of an OCTET STRING (or an IMPLICIT-tagged one), concatenating BER chunks."""
    if not tlv.constructed:
        return tlv.content
    if depth > 2:
        raise _bad(f"{what}: constructed OCTET STRING nested too deep")
    parts = []
    for child in tlv.children:
        _expect(child, what, _UNIVERSAL, _OCTET_STRING, constructed=child.constructed)
        parts.append(_octets(child, what, depth + 1))
    return b"".join(parts)


def _octet_string(tlv: _Tlv, what: str) -> bytes:
    if tlv.cls != _UNIVERSAL or tlv.number != _OCTET_STRING:
        raise _bad(f"{what}: expected an OCTET STRING at offset {tlv.offset}")
    return _octets(tlv, what)


def _small_int(tlv: _Tlv, what: str) -> int:
    _expect(tlv, what, _UNIVERSAL, _INTEGER, constructed=False)
    if not 1 <= len(tlv.content) <= 4:
        raise _bad(f"{what}: INTEGER of {len(tlv.content)} bytes")
    return int.from_bytes(tlv.content, "big", signed=True)


def _oid_text(content: bytes) -> str:
    """Dotted form of an encoded OID, for error messages only."""
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        return "(empty)"
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _oid(tlv: _Tlv, what: str) -> bytes:
    _expect(tlv, what, _UNIVERSAL, _OID, constructed=False)
    if not tlv.content or tlv.content[-1] & 0x80:
        raise _bad(f"{what}: malformed OBJECT IDENTIFIER at offset {tlv.offset}")
    return tlv.content


def _require_oid(tlv: _Tlv, what: str, expected: bytes, expected_name: str) -> None:
    got = _oid(tlv, what)
    if got != expected:
        raise CmsError(
            f"unsupported {what} {_oid_text(got)}; KMS uses {expected_name} "
            f"({_oid_text(expected)})",
            reason="unsupported",
        )


def _require_sha256(tlv: _Tlv, what: str) -> None:
    """An AlgorithmIdentifier for SHA-256, parameters absent or NULL (RFC 4055 allows both)."""
    alg = _seq(tlv, what)
    if not 1 <= len(alg) <= 2:
        raise _bad(f"{what}: AlgorithmIdentifier with {len(alg)} elements")
    _require_oid(alg[0], what, _OID_SHA256, "sha256")
    if len(alg) == 2:
        null = _expect(alg[1], what, _UNIVERSAL, _NULL, constructed=False)
        if null.content:
            raise _bad(f"{what}: NULL with content")


def _check_oaep_params(tlv: _Tlv) -> None:
    """RSAES-OAEP-params: hashFunc sha256, maskGenFunc MGF1(sha256), pSource empty or absent."""
    seen: set[int] = set()
    for field in _seq(tlv, "RSAES-OAEP parameters"):
        if field.cls != _CONTEXT or not field.constructed or len(field.children) != 1:
            raise _bad(f"RSAES-OAEP parameters: unexpected element at offset {field.offset}")
        if field.number in seen or (seen and field.number < max(seen)):
            raise _bad("RSAES-OAEP parameters: fields repeated or out of order")
        seen.add(field.number)
        inner = field.children[0]
        if field.number == 0:
            _require_sha256(inner, "OAEP hash function")
        elif field.number == 1:
            mgf = _seq(inner, "OAEP mask generation function")
            if len(mgf) != 2:
                raise _bad("OAEP mask generation function: expected algorithm and parameters")
            _require_oid(mgf[0], "OAEP mask generation function", _OID_MGF1, "MGF1")
            _require_sha256(mgf[1], "MGF1 hash function")
        elif field.number == 2:
            src = _seq(inner, "OAEP pSource")
            if len(src) != 2:
                raise _bad("OAEP pSource: expected algorithm and parameters")
            _require_oid(src[0], "OAEP pSource", _OID_P_SPECIFIED, "pSpecified")
            if _octet_string(src[1], "OAEP label"):
                raise CmsError("unsupported non-empty OAEP label", reason="unsupported")
        else:
            raise _bad(f"RSAES-OAEP parameters: unknown field [{field.number}]")
    # Absent hashFunc / maskGenFunc mean the SHA-1 defaults, which KMS never uses.
    if not {0, 1} <= seen:
        raise CmsError(
            "unsupported RSAES-OAEP with default (SHA-1) hash or mask generation; "
            "KMS uses SHA-256 and MGF1-SHA-256",
            reason="unsupported",
        )


@dataclass(frozen=True, slots=True)
class _Envelope:
    recipient_key_id: bytes
    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes


def _parse(blob: bytes | bytearray | memoryview) -> _Envelope:
    if len(blob) > MAX_RECIPIENT_CIPHERTEXT_BYTES:
        raise _bad(
            f"{len(blob)} bytes is more than MAX_RECIPIENT_CIPHERTEXT_BYTES "
            f"({MAX_RECIPIENT_CIPHERTEXT_BYTES})"
        )
    root = _BerReader(bytes(blob)).read_all()

    content_info = _seq(root, "ContentInfo")
    if len(content_info) != 2:
        raise _bad(f"ContentInfo has {len(content_info)} elements, expected 2")
    _require_oid(content_info[0], "ContentInfo contentType", _OID_ENVELOPED_DATA, "envelopedData")
    explicit = _expect(content_info[1], "ContentInfo content", _CONTEXT, 0, constructed=True)
    if len(explicit.children) != 1:
        raise _bad("ContentInfo [0] must hold exactly one EnvelopedData")

    enveloped = _seq(explicit.children[0], "EnvelopedData")
    if len(enveloped) != 3:
        if len(enveloped) > 3 or (enveloped and enveloped[1].cls == _CONTEXT):
            raise CmsError(
                "unsupported EnvelopedData with originatorInfo or unprotectedAttrs",
                reason="unsupported",
            )
        raise _bad(f"EnvelopedData has {len(enveloped)} elements, expected 3")
    version = _small_int(enveloped[0], "EnvelopedData version")
    if version != 2:
        raise CmsError(
            f"unsupported EnvelopedData version {version} (KMS uses 2)", reason="unsupported"
        )
    recipients = _expect(enveloped[1], "recipientInfos", _UNIVERSAL, _SET, constructed=True)
    if len(recipients.children) != 1:
        raise CmsError(
            f"unsupported EnvelopedData with {len(recipients.children)} recipients "
            "(KMS sends exactly one)",
            reason="unsupported",
        )
    ktri_tlv = recipients.children[0]
    if ktri_tlv.cls != _UNIVERSAL or ktri_tlv.number != _SEQUENCE:
        raise CmsError(
            "unsupported RecipientInfo type (only KeyTransRecipientInfo)", reason="unsupported"
        )
    ktri = _seq(ktri_tlv, "KeyTransRecipientInfo")
    if len(ktri) != 4:
        raise _bad(f"KeyTransRecipientInfo has {len(ktri)} elements, expected 4")
    ri_version = _small_int(ktri[0], "KeyTransRecipientInfo version")
    if ri_version != 2:
        raise CmsError(
            f"unsupported KeyTransRecipientInfo version {ri_version} (KMS uses 2, "
            "subjectKeyIdentifier)",
            reason="unsupported",
        )
    rid = ktri[1]
    if rid.cls != _CONTEXT or rid.number != 0:
        raise CmsError(
            "unsupported recipient identifier (only [0] subjectKeyIdentifier)",
            reason="unsupported",
        )
    recipient_key_id = _octets(rid, "subjectKeyIdentifier")
    kea = _seq(ktri[2], "keyEncryptionAlgorithm")
    if len(kea) != 2:
        raise CmsError(
            "unsupported keyEncryptionAlgorithm without RSAES-OAEP parameters",
            reason="unsupported",
        )
    _require_oid(kea[0], "keyEncryptionAlgorithm", _OID_RSAES_OAEP, "id-RSAES-OAEP")
    _check_oaep_params(kea[1])
    encrypted_key = _octet_string(ktri[3], "encryptedKey")

    eci = _seq(enveloped[2], "EncryptedContentInfo")
    if len(eci) != 3:
        if len(eci) == 2:
            raise CmsError("unsupported detached encryptedContent", reason="unsupported")
        raise _bad(f"EncryptedContentInfo has {len(eci)} elements, expected 3")
    _require_oid(eci[0], "encrypted contentType", _OID_DATA, "id-data")
    cea = _seq(eci[1], "contentEncryptionAlgorithm")
    if len(cea) != 2:
        raise _bad("contentEncryptionAlgorithm: expected algorithm and IV")
    _require_oid(cea[0], "contentEncryptionAlgorithm", _OID_AES256_CBC, "aes256-CBC")
    iv = _octet_string(cea[1], "AES-CBC IV")
    if len(iv) != _AES_BLOCK:
        raise _bad(f"AES-CBC IV of {len(iv)} bytes, expected {_AES_BLOCK}")
    content = eci[2]
    if content.cls != _CONTEXT or content.number != 0:
        raise _bad(f"encryptedContent: unexpected element at offset {content.offset}")
    ciphertext = _octets(content, "encryptedContent")
    return _Envelope(recipient_key_id, encrypted_key, iv, ciphertext)


# ------------------------------------------------------------------------------------------
# Decryption


def subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: how KMS names the recipient (``rid``)."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _unpad_length(padded: bytearray | memoryview) -> int | None:
    """Length of the PKCS#7-unpadded data, or None. No early exit over the padding bytes."""
    n = padded[-1]
    bad = int(n == 0) | int(n > _AES_BLOCK)
    for i in range(1, _AES_BLOCK + 1):
        # Only bytes within the claimed padding must equal n.
        bad |= int(i <= n) & int(padded[-i] != n)
    return None if bad else len(padded) - n


def decrypt_recipient_ciphertext(
    blob: bytes | bytearray | memoryview, private_key: rsa.RSAPrivateKey
) -> bytearray:
    """Decrypt a KMS ``CiphertextForRecipient`` addressed to ``private_key``.

    Args:
        blob: the raw (base64-decoded) ``CiphertextForRecipient``.
        private_key: the enclave's ephemeral RSA key whose SPKI was in the attestation document.

    Returns:
        The plaintext, in a ``bytearray`` the caller owns and must zero when done.

    Error handling:
        :class:`CmsError` (see the module docstring for the reasons). The structure and the
        recipient identifier are checked before any RSA operation.
    """
    env = _parse(blob)
    expected_id = subject_key_identifier(private_key.public_key())
    if env.recipient_key_id != expected_id:
        raise CmsError(
            "recipient ciphertext is addressed to another key (subjectKeyIdentifier "
            f"{env.recipient_key_id[:8].hex()}..., ours is {expected_id[:8].hex()}...)",
            reason="wrong_recipient",
        )
    if not env.ciphertext or len(env.ciphertext) % _AES_BLOCK:
        raise CmsError(
            f"encryptedContent of {len(env.ciphertext)} bytes is not a positive multiple of "
            f"the AES block size",
            reason="decrypt_failed",
        )
    cek = bytearray(_CEK_BYTES)
    # cryptography's update_into wants block_size - 1 spare bytes.
    plaintext = bytearray(len(env.ciphertext) + _AES_BLOCK - 1)
    try:
        try:
            # cryptography returns immutable bytes here; we cannot zero that copy.
            raw_cek = private_key.decrypt(env.encrypted_key, _oaep())
        except ValueError:
            raise CmsError(
                "RSA-OAEP decryption of the content key failed", reason="decrypt_failed"
            ) from None
        if len(raw_cek) != _CEK_BYTES:
            raise CmsError(
                f"content key is {len(raw_cek)} bytes, expected {_CEK_BYTES} for AES-256",
                reason="decrypt_failed",
            )
        cek[:] = raw_cek
        del raw_cek
        decryptor = Cipher(algorithms.AES(cek), modes.CBC(env.iv)).decryptor()
        n = decryptor.update_into(env.ciphertext, plaintext)
        decryptor.finalize()
        keep = _unpad_length(memoryview(plaintext)[:n])
        if keep is None:
            raise CmsError(
                "PKCS#7 padding of the decrypted content is invalid", reason="bad_padding"
            )
        # A fresh buffer of the exact size: shrinking ``plaintext`` in place could let the
        # allocator move it and leave an unzeroed copy behind.
        out = bytearray(keep)
        out[:] = memoryview(plaintext)[:keep]
        return out
    finally:
        memzero(cek)
        memzero(plaintext)


# ------------------------------------------------------------------------------------------
# Encoding (for the local KMS stand-in and tests)


def _der(ident: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([ident, n]) + content
    size = (n.bit_length() + 7) // 8
    return bytes([ident, 0x80 | size]) + n.to_bytes(size, "big") + content


def _ber_indefinite(ident: int, *parts: bytes) -> bytes:
    return bytes([ident, 0x80]) + b"".join(parts) + b"\x00\x00"


_SHA256_ALG = _der(0x30, _der(0x06, _OID_SHA256) + b"\x05\x00")
_OAEP_ALG = _der(
    0x30,
    _der(0x06, _OID_RSAES_OAEP)
    + _der(
        0x30,
        _der(0xA0, _SHA256_ALG) + _der(0xA1, _der(0x30, _der(0x06, _OID_MGF1) + _SHA256_ALG)),
    ),
)


def encrypt_for_recipient(
    public_key: rsa.RSAPublicKey,
    plaintext: bytes | bytearray | memoryview,
    *,
    chunk_size: int = 1024,
) -> bytes:
    """Envelope ``plaintext`` for ``public_key`` exactly as KMS builds ``CiphertextForRecipient``.

    BER with indefinite lengths for ContentInfo, EnvelopedData and EncryptedContentInfo (``30 80``
    ...), one KeyTransRecipientInfo with rid ``[0]`` SHA-256(SPKI), RSAES-OAEP-SHA256/MGF1-SHA256,
    AES-256-CBC with a random IV and PKCS#7 padding, and the encryptedContent as a constructed
    ``[0]`` of OCTET STRING chunks of ``chunk_size`` bytes.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    cek = bytearray(os.urandom(_CEK_BYTES))
    iv = os.urandom(_AES_BLOCK)
    pad = _AES_BLOCK - len(plaintext) % _AES_BLOCK
    padded = bytearray(len(plaintext) + pad)
    try:
        padded[: len(plaintext)] = plaintext
        padded[len(plaintext) :] = bytes([pad]) * pad
        encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
        ciphertext = encryptor.update(padded) + encryptor.finalize()
        # The typed API takes bytes: one immutable copy of the CEK we cannot zero.
        encrypted_key = public_key.encrypt(bytes(cek), _oaep())
    finally:
        memzero(cek)
        memzero(padded)
    ktri = _der(
        0x30,
        _der(0x02, b"\x02")
        + _der(0x80, subject_key_identifier(public_key))
        + _OAEP_ALG
        + _der(0x04, encrypted_key),
    )
    chunks = [
        _der(0x04, ciphertext[i : i + chunk_size]) for i in range(0, len(ciphertext), chunk_size)
    ]
    eci = _ber_indefinite(
        0x30,
        _der(0x06, _OID_DATA),
        _der(0x30, _der(0x06, _OID_AES256_CBC) + _der(0x04, iv)),
        _ber_indefinite(0xA0, *chunks),
    )
    enveloped = _ber_indefinite(0x30, _der(0x02, b"\x02"), _der(0x31, ktri), eci)
    return _ber_indefinite(0x30, _der(0x06, _OID_ENVELOPED_DATA), _ber_indefinite(0xA0, enveloped))


# ------------------------------------------------------------------------------------------
# The enclave's per-boot recipient key


class EphemeralRecipientKey:
    """The enclave's per-boot RSA key for KMS ``Recipient`` requests.

    Its :attr:`public_key_der` goes into the NSM attestation document's ``public_key``; KMS
    then envelopes its answer for it, and :meth:`decrypt_recipient_ciphertext` opens it.

    The key is dropped by :meth:`close` and, to deny the untrusted parent a padding or OAEP
    oracle, after the first decryption that fails at or after the RSA step (a blob that is
    malformed or addressed to another key does not count: nothing secret was touched).
    Dropping only releases Python's reference: OpenSSL clears the RSA private components when
    the key object is freed, but CPython cannot force that moment (another reference, e.g. a
    traceback, may keep it alive) and cannot zero the Python ints it never exposed to us.

    Generation takes tens of milliseconds of CPU; from Trio call :meth:`generate` through
    ``trio.to_thread.run_sync``. Decryption is a single RSA-2048 operation (~1 ms) and can be
    called directly.
    """

    __slots__ = ("_key", "public_key_der", "subject_key_identifier")

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._key: rsa.RSAPrivateKey | None = private_key
        public = private_key.public_key()
        #: DER SubjectPublicKeyInfo: the attestation document's ``public_key``.
        self.public_key_der: bytes = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        #: SHA-256 of :attr:`public_key_der`, the ``rid`` KMS uses.
        self.subject_key_identifier: bytes = hashlib.sha256(self.public_key_der).digest()

    @classmethod
    def generate(cls) -> EphemeralRecipientKey:
        """A fresh RSA key of :data:`RECIPIENT_RSA_BITS` bits (blocking CPU work)."""
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=RECIPIENT_RSA_BITS))

    @property
    def closed(self) -> bool:
        return self._key is None

    def decrypt_recipient_ciphertext(self, blob: bytes | bytearray | memoryview) -> bytearray:
        """Open a ``CiphertextForRecipient``; see :func:`decrypt_recipient_ciphertext`.

        Error handling:
            :class:`CmsError`; ``ValueError`` if the key was closed.
        """
        key = self._key
        if key is None:
            raise ValueError("the recipient key is closed")
        try:
            return decrypt_recipient_ciphertext(blob, key)
        except CmsError as exc:
            if exc.reason in ("decrypt_failed", "bad_padding"):
                self.close()
            raise

    def close(self) -> None:
        """Drop the private key (idempotent)."""
        self._key = None

    def __enter__(self) -> EphemeralRecipientKey:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._key is None else "open"
        return f"<EphemeralRecipientKey {state} ski={self.subject_key_identifier[:8].hex()}...>"
