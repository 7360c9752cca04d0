"""Thin, allocation-aware access to the libsodium primitives that FROST(Ed25519) needs.

PyNaCl's public ``nacl.bindings`` return immutable ``bytes``, which cannot be zeroed, and add a
few microseconds of checking per call. Here we call the same libsodium functions through
PyNaCl's cffi module and write results into caller-owned ``bytearray`` buffers, so that secret
scalars (nonces, shares, products) stay in memory we can zero. Every function takes any
contiguous buffer (``bytes``, ``bytearray``, ``memoryview``) as input.

PyNaCl >= 1.6.2 is required: older bundled libsodium accepts points outside the prime-order
subgroup in ``crypto_core_ed25519_is_valid_point`` (CVE-2025-69277); ``tests/test_group.py``
keeps a poisoned point to prove the installed build is fixed.
"""

from __future__ import annotations

from typing import Any

from nacl._sodium import ffi, lib

Buffer = bytes | bytearray | memoryview

SCALAR_BYTES = 32
POINT_BYTES = 32
#: The order of the prime-order subgroup of edwards25519.
L = 2**252 + 27742317777372353535851937790883648493


def _ro(buf: Buffer) -> Any:
    return ffi.from_buffer(buf)


def _rw(buf: bytearray | memoryview) -> Any:
    return ffi.from_buffer(buf, require_writable=True)


def memzero(buf: bytearray | memoryview) -> None:
    """Overwrite ``buf`` with zeros in a way the compiler cannot elide."""
    if len(buf):
        lib.sodium_memzero(_rw(buf), len(buf))


def ct_equal(a: Buffer, b: Buffer) -> bool:
    """Constant-time comparison of two equal-length buffers (False if lengths differ)."""
    if len(a) != len(b):
        return False
    return bool(lib.sodium_memcmp(_ro(a), _ro(b), len(a)) == 0)


def is_valid_point(p: Buffer) -> bool:
    """True if ``p`` is a canonical encoding of a non-identity point of the prime-order subgroup."""
    return len(p) == POINT_BYTES and bool(lib.crypto_core_ed25519_is_valid_point(_ro(p)) == 1)


def point_add(out: bytearray, p: Buffer, q: Buffer) -> bool:
    """``out = p + q``. Returns False if an input does not decode (no subgroup check here)."""
    return bool(lib.crypto_core_ed25519_add(_rw(out), _ro(p), _ro(q)) == 0)


def base_mult(out: bytearray | memoryview, scalar: Buffer) -> bool:
    """``out = scalar * G`` without clamping. Returns False if the result is the identity."""
    return bool(lib.crypto_scalarmult_ed25519_base_noclamp(_rw(out), _ro(scalar)) == 0)


def scalar_mult(out: bytearray, scalar: Buffer, point: Buffer) -> bool:
    """``out = scalar * point`` without clamping.

    libsodium refuses (returns False) when ``point`` is non-canonical, small-order or outside the
    prime-order subgroup, or when the result is the identity.
    """
    return bool(lib.crypto_scalarmult_ed25519_noclamp(_rw(out), _ro(scalar), _ro(point)) == 0)


def scalar_reduce(out: bytearray | memoryview, wide: Buffer) -> None:
    """``out = wide mod L`` where ``wide`` is 64 bytes, little-endian."""
    lib.crypto_core_ed25519_scalar_reduce(_rw(out), _ro(wide))


def scalar_add(out: bytearray | memoryview, a: Buffer, b: Buffer) -> None:
    """``out = a + b mod L`` (constant time)."""
    lib.crypto_core_ed25519_scalar_add(_rw(out), _ro(a), _ro(b))


def scalar_mul(out: bytearray | memoryview, a: Buffer, b: Buffer) -> None:
    """``out = a * b mod L`` (constant time)."""
    lib.crypto_core_ed25519_scalar_mul(_rw(out), _ro(a), _ro(b))


def sha512(out: bytearray, data: Buffer) -> None:
    """``out = SHA-512(data)``; libsodium zeroes its own hash state."""
    lib.crypto_hash_sha512(_rw(out), _ro(data), len(data))


def random_bytes(out: bytearray | memoryview) -> None:
    """Fill ``out`` from the OS CSPRNG (libsodium's ``randombytes``), in place."""
    lib.randombytes(_rw(out), len(out))


def scalar_is_canonical(s: Buffer) -> bool:
    """True if the 32 little-endian bytes encode an integer below L.

    Works for secret scalars too: the value is reduced by libsodium into a scratch buffer and
    compared in constant time, so no Python ``int`` copy of the secret is made.
    """
    if len(s) != SCALAR_BYTES:
        return False
    wide = bytearray(64)
    wide[:32] = s
    reduced = bytearray(32)
    try:
        scalar_reduce(reduced, wide)
        return ct_equal(reduced, s)
    finally:
        memzero(wide)
        memzero(reduced)


def scalar_is_zero(s: Buffer) -> bool:
    """True if all bytes are zero (constant time)."""
    return ct_equal(s, bytes(len(s)))
