"""HMAC-SHA256, HKDF-SHA256 and X25519 on buffers, against their RFC vectors and the stdlib."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sign import FrostError
from trio_sign.crypto._kdf import (
    hkdf_sha256_into,
    hmac_sha256_into,
    x25519_into,
    x25519_keypair,
    x25519_public,
)

# RFC 5869 Appendix A, test cases 1-3 (SHA-256).
HKDF_CASES = [
    (
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        bytes(range(0x00, 0x50)).hex(),
        bytes(range(0x60, 0xB0)).hex(),
        bytes(range(0xB0, 0x100)).hex(),
        82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87",
    ),
    (
        "0b" * 22,
        "",
        "",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), HKDF_CASES)
def test_hkdf_rfc5869_vectors(ikm: str, salt: str, info: str, length: int, okm: str) -> None:
    out = bytearray(length)
    hkdf_sha256_into(out, bytes.fromhex(ikm), salt=bytes.fromhex(salt), info=bytes.fromhex(info))
    assert out.hex() == okm


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_hmac_matches_the_stdlib(key: bytes, message: bytes) -> None:
    out = bytearray(32)
    hmac_sha256_into(out, bytearray(key), message)
    assert bytes(out) == hmac.new(key, message, hashlib.sha256).digest()


def test_hkdf_refuses_impossible_lengths() -> None:
    with pytest.raises(ValueError, match=r"1\.\.8160"):
        hkdf_sha256_into(bytearray(0), b"k")
    with pytest.raises(ValueError, match=r"1\.\.8160"):
        hkdf_sha256_into(bytearray(255 * 32 + 1), b"k")


def test_x25519_rfc7748_vector_and_agreement() -> None:
    # RFC 7748 §6.1.
    alice = bytearray.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytearray.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert (
        x25519_public(alice).hex()
        == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    out = bytearray(32)
    x25519_into(out, alice, x25519_public(bob))
    assert out.hex() == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    a_sk, b_sk = bytearray(32), bytearray(32)
    a_pk, b_pk = x25519_keypair(a_sk), x25519_keypair(b_sk)
    ab, ba = bytearray(32), bytearray(32)
    x25519_into(ab, a_sk, b_pk)
    x25519_into(ba, b_sk, a_pk)
    assert ab == ba


def test_x25519_refuses_small_order_and_bad_lengths() -> None:
    sk = bytearray(32)
    x25519_keypair(sk)
    out = bytearray(b"\x01" * 32)
    with pytest.raises(FrostError, match="small-order"):
        x25519_into(out, sk, bytes(32))
    assert out == bytearray(32)
    with pytest.raises(FrostError, match="32 bytes"):
        x25519_into(out, sk, bytes(31))
