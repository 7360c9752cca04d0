"""HMAC-SHA256, HKDF-SHA256 (RFC 5869) and X25519 (RFC 7748) on caller-owned buffers.

Used where a secret is derived from another secret: the delta key-encryption key from the
identity key's seed, and the end-to-end keys of DKG round-2 shares (docs/key-lifecycle.md
§2, §5). Python's ``hmac`` and ``cryptography``'s HKDF would return derived keys as immutable
``bytes``; here every secret input, intermediate and output is a ``bytearray`` (or a writable
``memoryview``) that libsodium writes into and that is zeroed when no longer needed.

libsodium (through PyNaCl's cffi module) gives us one-shot SHA-256 and X25519; HMAC is built
from the one-shot hash over a scratch buffer ``(K ⊕ pad) ‖ m``, so the message is copied once
into a zeroed-after-use buffer. What CPython cannot guarantee: public inputs (salt, info) are
ordinary ``bytes``, and nothing stops the kernel from swapping a page that holds a buffer.
"""

from __future__ import annotations

from typing import Final

from nacl._sodium import ffi, lib

from .._errors import FrostError
from . import _sodium

Buffer = bytes | bytearray | memoryview

HASH_BYTES: Final = 32
_BLOCK: Final = 64
X25519_BYTES: Final = 32


def _sha256_into(out: bytearray | memoryview, data: Buffer) -> None:
    lib.crypto_hash_sha256(
        ffi.from_buffer(out, require_writable=True), ffi.from_buffer(data), len(data)
    )


def hmac_sha256_into(out: bytearray | memoryview, key: Buffer, message: Buffer) -> None:
    """``out = HMAC-SHA256(key, message)`` (32 bytes); every intermediate is zeroed."""
    if len(out) != HASH_BYTES:
        raise ValueError("HMAC-SHA256 output is 32 bytes")
    k = bytearray(_BLOCK)
    scratch = bytearray(_BLOCK + max(len(message), HASH_BYTES))
    inner = bytearray(HASH_BYTES)
    try:
        if len(key) > _BLOCK:
            _sha256_into(memoryview(k)[:HASH_BYTES], key)
        else:
            k[: len(key)] = key
        for i in range(_BLOCK):
            scratch[i] = k[i] ^ 0x36
        scratch[_BLOCK : _BLOCK + len(message)] = message
        _sha256_into(inner, memoryview(scratch)[: _BLOCK + len(message)])
        for i in range(_BLOCK):
            scratch[i] = k[i] ^ 0x5C
        scratch[_BLOCK : _BLOCK + HASH_BYTES] = inner
        _sha256_into(out, memoryview(scratch)[: _BLOCK + HASH_BYTES])
    finally:
        _sodium.memzero(k)
        _sodium.memzero(scratch)
        _sodium.memzero(inner)


def hkdf_sha256_into(
    out: bytearray | memoryview, ikm: Buffer, *, salt: Buffer = b"", info: Buffer = b""
) -> None:
    """RFC 5869 HKDF-SHA256: extract with ``salt``, expand with ``info`` into ``len(out)``
    bytes (at most 255 * 32). The pseudo-random key and every block are zeroed."""
    length = len(out)
    if not 0 < length <= 255 * HASH_BYTES:
        raise ValueError("HKDF-SHA256 output must be 1..8160 bytes")
    prk = bytearray(HASH_BYTES)
    block = bytearray(HASH_BYTES)
    msg = bytearray(HASH_BYTES + len(info) + 1)
    try:
        hmac_sha256_into(prk, salt if len(salt) else bytes(HASH_BYTES), ikm)
        done = 0
        prev = 0
        counter = 1
        while done < length:
            msg[:prev] = block[:prev]
            msg[prev : prev + len(info)] = info
            msg[prev + len(info)] = counter
            hmac_sha256_into(block, prk, memoryview(msg)[: prev + len(info) + 1])
            take = min(HASH_BYTES, length - done)
            out[done : done + take] = block[:take]
            done += take
            prev = HASH_BYTES
            counter += 1
    finally:
        _sodium.memzero(prk)
        _sodium.memzero(block)
        _sodium.memzero(msg)


def x25519_keypair(secret_out: bytearray) -> bytes:
    """A fresh X25519 secret key written into ``secret_out`` (32 bytes); returns the public
    key."""
    if len(secret_out) != X25519_BYTES:
        raise ValueError("an X25519 secret key is 32 bytes")
    _sodium.random_bytes(secret_out)
    public = bytearray(X25519_BYTES)
    lib.crypto_scalarmult_base(
        ffi.from_buffer(public, require_writable=True), ffi.from_buffer(secret_out)
    )
    return bytes(public)


def x25519_public(secret: Buffer) -> bytes:
    """The public key of an X25519 secret key."""
    public = bytearray(X25519_BYTES)
    lib.crypto_scalarmult_base(
        ffi.from_buffer(public, require_writable=True), ffi.from_buffer(secret)
    )
    return bytes(public)


def x25519_into(out: bytearray | memoryview, secret: Buffer, peer_public: Buffer) -> None:
    """``out = X25519(secret, peer_public)``; a peer key that gives the all-zero output (a
    small-order point) is refused with :class:`~trio_sign.FrostError`, and ``out`` zeroed."""
    if len(out) != X25519_BYTES or len(secret) != X25519_BYTES:
        raise ValueError("X25519 keys and outputs are 32 bytes")
    if len(peer_public) != X25519_BYTES:
        raise FrostError(f"X25519 public key must be 32 bytes, got {len(peer_public)}")
    rc = lib.crypto_scalarmult(
        ffi.from_buffer(out, require_writable=True),
        ffi.from_buffer(secret),
        ffi.from_buffer(peer_public),
    )
    if rc != 0:
        _sodium.memzero(out)
        raise FrostError("X25519 public key is a small-order point (shared secret is zero)")
