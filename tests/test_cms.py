"""KMS ``CiphertextForRecipient`` (BER CMS EnvelopedData): the KMS vector, our encoder, refusals."""

from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_sign import TrioSignError
from trio_sign.nitro import (
    CmsError,
    EphemeralRecipientKey,
    _cms,
    decrypt_recipient_ciphertext,
    encrypt_for_recipient,
    subject_key_identifier,
)

# Offsets into the KMS vector (see the hex dump in NITRO_NOTES §3).
_SKI_AT = 0x21  # 32-byte subjectKeyIdentifier content
_ENCRYPTED_KEY_AT = 0x83  # 256-byte encryptedKey content
_PREFIX_END = _ENCRYPTED_KEY_AT  # everything before is fixed for a given recipient key


@functools.cache
def _vector(vectors_dir: Path) -> tuple[rsa.RSAPrivateKey, bytes, bytes]:
    d = vectors_dir / "nitro" / "kms_cms"
    der = base64.b64decode((d / "enclaver_recipient_rsa2048_pkcs8.der.b64").read_text())
    key = serialization.load_der_private_key(der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    blob = base64.b64decode((d / "enclaver_ciphertext_for_recipient.b64").read_text())
    return key, blob, (d / "expected_plaintext.txt").read_bytes()


@pytest.fixture
def vector(vectors_dir: Path) -> tuple[rsa.RSAPrivateKey, bytes, bytes]:
    return _vector(vectors_dir)


@functools.cache
def _other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _reason(blob: bytes, key: rsa.RSAPrivateKey) -> str:
    with pytest.raises(CmsError) as info:
        decrypt_recipient_ciphertext(blob, key)
    return info.value.reason


def test_kms_vector_decrypts(vector: tuple[rsa.RSAPrivateKey, bytes, bytes]) -> None:
    key, blob, expected = vector
    out = decrypt_recipient_ciphertext(blob, key)
    assert isinstance(out, bytearray)
    assert out == expected == b"Hello, World"


def test_kms_vector_rid_is_sha256_of_spki(vector: tuple[rsa.RSAPrivateKey, bytes, bytes]) -> None:
    key, blob, _ = vector
    assert blob[_SKI_AT : _SKI_AT + 32] == subject_key_identifier(key.public_key())


def test_encoder_matches_kms_layout(vector: tuple[rsa.RSAPrivateKey, bytes, bytes]) -> None:
    """Same recipient, same 12-byte plaintext: byte-identical except the random key, IV, content."""
    key, blob, expected = vector
    ours = encrypt_for_recipient(key.public_key(), expected, chunk_size=16)
    assert ours[:2] == b"\x30\x80"
    assert len(ours) == len(blob)
    assert ours[:_PREFIX_END] == blob[:_PREFIX_END]
    # encryptedContentInfo header up to the IV, and the closing end-of-contents octets.
    eci_at = _ENCRYPTED_KEY_AT + 256
    assert ours[eci_at : eci_at + 0x1A] == blob[eci_at : eci_at + 0x1A]
    assert ours[-10:] == blob[-10:] == bytes(10)
    assert decrypt_recipient_ciphertext(ours, key) == expected


@pytest.mark.parametrize(("size", "chunk"), [(0, 1024), (1, 1), (15, 4), (16, 16), (4096, 1000)])
def test_round_trip(size: int, chunk: int) -> None:
    key = _other_key()
    plaintext = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    blob = encrypt_for_recipient(key.public_key(), plaintext, chunk_size=chunk)
    assert blob.startswith(b"\x30\x80")
    assert decrypt_recipient_ciphertext(blob, key) == plaintext


def test_encoder_rejects_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        encrypt_for_recipient(_other_key().public_key(), b"x", chunk_size=0)


def test_wrong_recipient_without_rsa(vector: tuple[rsa.RSAPrivateKey, bytes, bytes]) -> None:
    key, _, _ = vector
    blob = encrypt_for_recipient(_other_key().public_key(), b"secret")
    with mock.patch.object(type(key), "decrypt", side_effect=AssertionError("RSA attempted")):
        assert _reason(blob, key) == "wrong_recipient"


def test_flipped_encrypted_key_is_decrypt_failed(
    vector: tuple[rsa.RSAPrivateKey, bytes, bytes],
) -> None:
    key, blob, _ = vector
    bad = bytearray(blob)
    bad[_ENCRYPTED_KEY_AT + 100] ^= 0x01
    assert _reason(bytes(bad), key) == "decrypt_failed"


def test_flipped_last_block_is_bad_padding_or_garbage() -> None:
    key = _other_key()
    blob = bytearray(encrypt_for_recipient(key.public_key(), b"x" * 16))
    # Ciphertext is 32 bytes (16 data + 16 padding); the IV-like previous block is bytes
    # [-10-2-32 : -10-2-16]. Flipping its last byte changes the padding byte -> bad_padding.
    content_end = len(blob) - 10
    blob[content_end - 16 - 1] ^= 0x01
    assert _reason(bytes(blob), key) == "bad_padding"


def test_unpad_length() -> None:
    assert _cms._unpad_length(bytearray(b"a" * 12 + b"\x04" * 4)) == 12
    assert _cms._unpad_length(bytearray(b"\x10" * 16)) == 0
    assert _cms._unpad_length(bytearray(b"a" * 15 + b"\x00")) is None
    assert _cms._unpad_length(bytearray(b"a" * 15 + b"\x11")) is None
    assert _cms._unpad_length(bytearray(b"a" * 12 + b"\x03\x04\x04\x04")) is None


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b[:-1], id="truncated-eoc"),
        pytest.param(lambda b: b[:100], id="truncated-middle"),
        pytest.param(lambda b: b[:1], id="one-byte"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b + b"\x00", id="trailing"),
        pytest.param(lambda b: b[:0x16] + b"\x31\x84\xff\xff\xff\xff" + b[0x1A:], id="bad-length"),
        pytest.param(lambda b: b[:0x16] + b"\x31\x85" + b[0x18:], id="length-of-length"),
        pytest.param(lambda b: b"\x04\x80" + b[2:], id="indefinite-primitive"),
        pytest.param(lambda b: b"\x1f\x80" + b[2:], id="high-tag"),
        pytest.param(lambda b: b"\x30\x80" * 40 + b"\x00\x00" * 40, id="deep-nesting"),
        pytest.param(lambda b: b"\x30\x03\x00\x00\x00", id="eoc-in-definite"),
        pytest.param(lambda b: b"\x30\x03\x30\x03\x00", id="child-overruns-parent"),
        pytest.param(lambda b: b"\x02\x01\x02", id="not-a-sequence"),
        pytest.param(lambda b: b"\x30" + b"\x80" + b"\x04\x00" * 5000 + b"\x00\x00", id="many"),
        pytest.param(lambda b: b"\x30\x02\x06\x00", id="empty-oid"),
    ],
)
def test_corrupt_ber(vector: tuple[rsa.RSAPrivateKey, bytes, bytes], mutate: object) -> None:
    key, blob, _ = vector
    bad = mutate(blob)  # type: ignore[operator]
    assert _reason(bad, key) == "bad_ber"


def test_oversized_blob(vector: tuple[rsa.RSAPrivateKey, bytes, bytes]) -> None:
    key, _, _ = vector
    with pytest.raises(CmsError, match="MAX_RECIPIENT_CIPHERTEXT_BYTES") as info:
        decrypt_recipient_ciphertext(bytes(_cms.MAX_RECIPIENT_CIPHERTEXT_BYTES + 1), key)
    assert info.value.reason == "bad_ber"


def _replace(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert blob.count(old) == 1
    return blob.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        # contentType signedData instead of envelopedData
        ("06092a864886f70d010703", "06092a864886f70d010702", "1.2.840.113549.1.7.2"),
        # RSAES-PKCS1-v1_5 instead of OAEP
        ("06092a864886f70d010107", "06092a864886f70d010101", "1.2.840.113549.1.1.1"),
        # aes128-CBC instead of aes256-CBC
        ("060960864801650304012a", "0609608648016503040102", "2.16.840.1.101.3.4.1.2"),
        # MGF1 -> something else
        ("06092a864886f70d010108", "06092a864886f70d010109", "1.2.840.113549.1.1.9"),
        # EnvelopedData version 0
        ("3080020102318201", "3080020100318201", "version 0"),
        # KeyTransRecipientInfo version 0
        ("3082016702010280", "3082016702010080", "version 0"),
    ],
)
def test_unsupported(
    vector: tuple[rsa.RSAPrivateKey, bytes, bytes], old: str, new: str, names: str
) -> None:
    key, blob, _ = vector
    bad = _replace(blob, bytes.fromhex(old), bytes.fromhex(new))
    with pytest.raises(CmsError, match=names.replace(".", r"\.")) as info:
        decrypt_recipient_ciphertext(bad, key)
    assert info.value.reason == "unsupported"


_der = _cms._der
_SHA256_NULL = _der(0x30, _der(0x06, _cms._OID_SHA256) + b"\x05\x00")
_SHA256_ABSENT = _der(0x30, _der(0x06, _cms._OID_SHA256))
_SHA1 = _der(0x30, _der(0x06, bytes.fromhex("2b0e03021a")))


def _mgf1(hash_alg: bytes) -> bytes:
    return _der(0x30, _der(0x06, _cms._OID_MGF1) + hash_alg)


def _p_specified(label: bytes) -> bytes:
    return _der(0x30, _der(0x06, _cms._OID_P_SPECIFIED) + _der(0x04, label))


def _oaep_alg(*fields: tuple[int, bytes]) -> bytes:
    params = b"".join(_der(0xA0 | n, inner) for n, inner in fields)
    return _der(0x30, _der(0x06, _cms._OID_RSAES_OAEP) + _der(0x30, params))


@pytest.mark.parametrize(
    ("fields", "reason", "match"),
    [
        pytest.param((), "unsupported", "SHA-1", id="all-defaults"),
        pytest.param(
            ((0, _SHA1), (1, _mgf1(_SHA256_NULL))),
            "unsupported",
            r"1\.3\.14\.3\.2\.26",
            id="sha1",
        ),
        pytest.param(((0, _SHA256_NULL),), "unsupported", "SHA-1", id="mgf-default"),
        pytest.param(
            ((0, _SHA256_NULL), (1, _mgf1(_SHA1))), "unsupported", r"1\.3\.14", id="mgf1-sha1"
        ),
        pytest.param(
            ((0, _SHA256_NULL), (1, _mgf1(_SHA256_NULL)), (2, _p_specified(b"x"))),
            "unsupported",
            "label",
            id="label",
        ),
        pytest.param(((1, _mgf1(_SHA256_NULL)), (0, _SHA256_NULL)), "bad_ber", "order", id="order"),
        pytest.param(((3, _SHA256_NULL),), "bad_ber", "unknown field", id="unknown-field"),
    ],
)
def test_oaep_parameters(
    monkeypatch: pytest.MonkeyPatch, fields: tuple[tuple[int, bytes], ...], reason: str, match: str
) -> None:
    key = _other_key()
    monkeypatch.setattr(_cms, "_OAEP_ALG", _oaep_alg(*fields))
    blob = encrypt_for_recipient(key.public_key(), b"x")
    with pytest.raises(CmsError, match=match) as info:
        decrypt_recipient_ciphertext(blob, key)
    assert info.value.reason == reason


def test_oaep_sha256_without_null_and_explicit_empty_label(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = _other_key()
    alg = _oaep_alg((0, _SHA256_ABSENT), (1, _mgf1(_SHA256_ABSENT)), (2, _p_specified(b"")))
    monkeypatch.setattr(_cms, "_OAEP_ALG", alg)
    blob = encrypt_for_recipient(key.public_key(), b"x")
    assert decrypt_recipient_ciphertext(blob, key) == b"x"


def test_encoder_oaep_alg_is_the_kms_one(vector: tuple[rsa.RSAPrivateKey, bytes, bytes]) -> None:
    _, blob, _ = vector
    assert _oaep_alg((0, _SHA256_NULL), (1, _mgf1(_SHA256_NULL))) == _cms._OAEP_ALG
    assert _cms._OAEP_ALG in blob


def test_error_is_trio_sign_error() -> None:
    assert issubclass(CmsError, TrioSignError)


def test_ephemeral_key_round_trip_and_close() -> None:
    with EphemeralRecipientKey.generate() as rk:
        spki = serialization.load_der_public_key(rk.public_key_der)
        assert isinstance(spki, rsa.RSAPublicKey)
        assert spki.key_size == 2048
        assert rk.subject_key_identifier == subject_key_identifier(spki)
        assert "ski=" in repr(rk)
        blob = encrypt_for_recipient(spki, b"data key")
        assert rk.decrypt_recipient_ciphertext(blob) == b"data key"
        assert rk.decrypt_recipient_ciphertext(blob) == b"data key"
        assert not rk.closed
    assert rk.closed
    with pytest.raises(ValueError, match="closed"):
        rk.decrypt_recipient_ciphertext(blob)


def test_ephemeral_key_is_dropped_after_a_decryption_failure(
    vector: tuple[rsa.RSAPrivateKey, bytes, bytes],
) -> None:
    key, blob, _ = vector
    rk = EphemeralRecipientKey(key)
    with pytest.raises(CmsError):  # malformed: nothing secret touched, key kept
        rk.decrypt_recipient_ciphertext(blob[:-1])
    assert not rk.closed
    bad = bytearray(blob)
    bad[_ENCRYPTED_KEY_AT] ^= 0x80
    with pytest.raises(CmsError) as info:
        rk.decrypt_recipient_ciphertext(bytes(bad))
    assert info.value.reason == "decrypt_failed"
    assert rk.closed  # no second oracle query


_REASONS = {"bad_ber", "unsupported", "wrong_recipient", "decrypt_failed", "bad_padding"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_never_crashes(data: st.DataObject, vectors_dir: Path) -> None:
    key, blob, expected = _vector(vectors_dir)
    mutated = bytearray(blob)
    action = data.draw(st.sampled_from(["truncate", "flip", "both"]))
    if action in ("flip", "both"):
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= 1 << data.draw(st.integers(0, 7))
    if action in ("truncate", "both"):
        del mutated[data.draw(st.integers(0, len(mutated) - 1)) :]
    reason = "ok"
    try:
        out = decrypt_recipient_ciphertext(bytes(mutated), key)
    except CmsError as exc:
        reason = exc.reason
    else:
        # Only flips in the ciphertext or IV can still decrypt (CBC is not authenticated).
        assert isinstance(out, bytearray)
        assert len(out) <= len(expected) + 16
    assert reason in {"ok", *_REASONS}


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(raw: bytes) -> None:
    with pytest.raises(CmsError):
        decrypt_recipient_ciphertext(raw, _other_key())


# -- structural variants, built field by field ----------------------------------------------

_ind = _cms._ber_indefinite


def _build(
    key: rsa.RSAPrivateKey,
    plaintext: bytes = b"structural test",
    *,
    definite: bool = False,
    version: int = 2,
    originator: bytes = b"",
    unprotected: bytes = b"",
    recipients: list[bytes] | None = None,
    ktri_version: int = 2,
    rid: bytes | None = None,
    cek_len: int = 32,
    data_oid: bytes = _cms._OID_DATA,
    iv_len: int = 16,
    content: bytes | None = None,
    chop: int = 0,
) -> bytes:
    cek = bytes(range(cek_len))
    iv = bytes(iv_len)
    pad = 16 - len(plaintext) % 16
    enc = Cipher(algorithms.AES(bytes(range(32))), modes.CBC(bytes(16))).encryptor()
    ciphertext = enc.update(plaintext + bytes([pad]) * pad) + enc.finalize()
    ciphertext = ciphertext[: len(ciphertext) - chop]
    encrypted_key = key.public_key().encrypt(cek, _cms._oaep())
    if rid is None:
        rid = _der(0x80, subject_key_identifier(key.public_key()))
    ktri = _der(
        0x30,
        _der(0x02, bytes([ktri_version])) + rid + _cms._OAEP_ALG + _der(0x04, encrypted_key),
    )
    wrap = (lambda ident, *p: _der(ident, b"".join(p))) if definite else _ind
    if content is None:
        content = wrap(0xA0, _der(0x04, ciphertext))
    eci = wrap(
        0x30,
        _der(0x06, data_oid),
        _der(0x30, _der(0x06, _cms._OID_AES256_CBC) + _der(0x04, iv)),
        content,
    )
    ris = _der(0x31, b"".join(recipients if recipients is not None else [ktri]))
    enveloped = wrap(0x30, _der(0x02, bytes([version])), originator, ris, eci, unprotected)
    return wrap(0x30, _der(0x06, _cms._OID_ENVELOPED_DATA), wrap(0xA0, enveloped))


def test_builder_baseline_and_definite_lengths() -> None:
    key = _other_key()
    assert decrypt_recipient_ciphertext(_build(key), key) == b"structural test"
    assert decrypt_recipient_ciphertext(_build(key, definite=True), key) == b"structural test"


def test_chunked_and_nested_content() -> None:
    key = _other_key()
    enc = Cipher(algorithms.AES(bytes(range(32))), modes.CBC(bytes(16))).encryptor()
    ct = enc.update(b"x" * 20 + b"\x0c" * 12) + enc.finalize()
    nested = _ind(
        0xA0,
        _der(0x04, ct[:5]),
        _ind(0x24, _der(0x04, ct[5:9]), _der(0x04, b"")),
        _der(0x04, ct[9:]),
    )
    assert decrypt_recipient_ciphertext(_build(key, content=nested), key) == b"x" * 20
    primitive = _der(0x80, ct)
    assert decrypt_recipient_ciphertext(_build(key, content=primitive), key) == b"x" * 20
    wrong_chunk = _ind(0xA0, _der(0x02, ct))
    assert _reason(_build(key, content=wrong_chunk), key) == "bad_ber"


def test_non_minimal_length_is_accepted() -> None:
    key = _other_key()
    blob = _build(key)
    # The encoder writes "02 01 02" for the version; BER allows "02 81 01 02".
    patched = blob.replace(b"\x30\x80\x02\x01\x02\x31", b"\x30\x80\x02\x81\x01\x02\x31", 1)
    assert patched != blob
    assert decrypt_recipient_ciphertext(patched, key) == b"structural test"


@pytest.mark.parametrize(
    ("kwargs", "reason", "match"),
    [
        ({"version": 0}, "unsupported", "version 0"),
        ({"ktri_version": 0}, "unsupported", "version 0"),
        ({"originator": _der(0xA0, b"")}, "unsupported", "originatorInfo"),
        ({"unprotected": _der(0xA1, _der(0x30, b""))}, "unsupported", "unprotectedAttrs"),
        ({"recipients": []}, "unsupported", "0 recipients"),
        ({"rid": _der(0x30, _der(0x30, b"") + _der(0x02, b"\x01"))}, "unsupported", "identifier"),
        ({"data_oid": bytes.fromhex("2a864886f70d010702")}, "unsupported", "contentType"),
        ({"iv_len": 8}, "bad_ber", "IV of 8 bytes"),
        ({"chop": 1}, "decrypt_failed", "multiple"),
        ({"cek_len": 16}, "decrypt_failed", "16 bytes"),
        ({"content": b""}, "unsupported", "detached"),
    ],
)
def test_structural_refusals(kwargs: dict[str, Any], reason: str, match: str) -> None:
    key = _other_key()
    with pytest.raises(CmsError, match=match) as info:
        decrypt_recipient_ciphertext(_build(key, **kwargs), key)
    assert info.value.reason == reason


def test_two_recipients_and_other_recipient_types() -> None:
    key = _other_key()
    one = _build(key)
    # Take our KeyTransRecipientInfo out of a good blob and repeat it.
    ktri_start = one.index(b"\x31\x82") + 4
    ktri = one[ktri_start : ktri_start + 4 + int.from_bytes(one[ktri_start + 2 : ktri_start + 4])]
    with pytest.raises(CmsError, match="2 recipients") as info:
        decrypt_recipient_ciphertext(_build(key, recipients=[ktri, ktri]), key)
    assert info.value.reason == "unsupported"
    kari = _der(0xA1, _der(0x02, b"\x03"))
    with pytest.raises(CmsError, match="KeyTransRecipientInfo") as info:
        decrypt_recipient_ciphertext(_build(key, recipients=[kari]), key)
    assert info.value.reason == "unsupported"
