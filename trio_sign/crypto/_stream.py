"""Authenticated encryption into caller-owned buffers: secretstream and XChaCha20-Poly1305-IETF.

PyNaCl's ``nacl.bindings`` return immutable ``bytes`` for decrypted data, which cannot be zeroed.
These wrappers call the same libsodium functions through PyNaCl's cffi module and write
plaintext into ``bytearray`` (or writable ``memoryview``) buffers the caller owns and zeroes.
The secretstream state (which holds the derived key) lives in a ``bytearray`` that is zeroed
with ``sodium_memzero`` by :meth:`SecretStreamPush.close` / :meth:`SecretStreamPull.close`.

Authentication failures are reported as ``False``/``None`` return values, not exceptions: the
callers know what the failure means (which chunk, which key) and raise their own precise errors.
"""

from __future__ import annotations

from typing import Any

from nacl._sodium import ffi, lib

from ._sodium import Buffer, _ro, _rw

KEY_BYTES = 32
#: secretstream header (the stream's nonce) length.
HEADER_BYTES = int(lib.crypto_secretstream_xchacha20poly1305_headerbytes())
#: secretstream per-message expansion (1 tag byte + 16 MAC bytes).
ABYTES = int(lib.crypto_secretstream_xchacha20poly1305_abytes())
STATE_BYTES = int(lib.crypto_secretstream_xchacha20poly1305_statebytes())
TAG_MESSAGE = int(lib.crypto_secretstream_xchacha20poly1305_tag_message())
TAG_FINAL = int(lib.crypto_secretstream_xchacha20poly1305_tag_final())

#: XChaCha20-Poly1305-IETF nonce and MAC lengths.
AEAD_NONCE_BYTES = int(lib.crypto_aead_xchacha20poly1305_ietf_npubbytes())
AEAD_ABYTES = int(lib.crypto_aead_xchacha20poly1305_ietf_abytes())


def _ad(ad: Buffer | None) -> tuple[Any, int]:
    if ad is None or len(ad) == 0:
        return ffi.NULL, 0
    return _ro(ad), len(ad)


def _check_key(key: Buffer) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")


class SecretStreamPush:
    """The encrypting side of ``crypto_secretstream_xchacha20poly1305``.

    Args:
        key: the 32-byte stream key. Only read during construction; the caller still owns it
            and zeroes it.

    Attributes:
        header: the 24-byte stream header to send before the first message.
    """

    __slots__ = ("_closed", "_state", "header")

    def __init__(self, key: Buffer) -> None:
        _check_key(key)
        self._state = bytearray(STATE_BYTES)
        header = bytearray(HEADER_BYTES)
        lib.crypto_secretstream_xchacha20poly1305_init_push(_rw(self._state), _rw(header), _ro(key))
        self.header = bytes(header)
        self._closed = False

    def push_into(
        self, out: bytearray | memoryview, message: Buffer, *, ad: Buffer | None, tag: int
    ) -> int:
        """Encrypt ``message`` into ``out[: len(message) + ABYTES]``; returns the bytes written."""
        if self._closed:
            raise ValueError("secretstream state is closed")
        clen = len(message) + ABYTES
        if len(out) < clen:
            raise ValueError(f"output buffer too small: need {clen}, have {len(out)}")
        ad_ptr, ad_len = _ad(ad)
        rc = lib.crypto_secretstream_xchacha20poly1305_push(
            _rw(self._state),
            _rw(out),
            ffi.NULL,
            _ro(message) if len(message) else ffi.NULL,
            len(message),
            ad_ptr,
            ad_len,
            tag,
        )
        if rc != 0:  # pragma: no cover - libsodium only fails on absurd lengths
            raise ValueError("secretstream push failed")
        return clen

    def push(self, message: Buffer, *, ad: Buffer | None, tag: int) -> bytes:
        """Encrypt ``message`` and return the ciphertext (ciphertext is not secret)."""
        out = bytearray(len(message) + ABYTES)
        self.push_into(out, message, ad=ad, tag=tag)
        return bytes(out)

    def close(self) -> None:
        """Zero the stream state. Idempotent."""
        lib.sodium_memzero(_rw(self._state), len(self._state))
        self._closed = True


class SecretStreamPull:
    """The decrypting side of ``crypto_secretstream_xchacha20poly1305``.

    Args:
        header: the 24-byte stream header.
        key: the 32-byte stream key, only read during construction (the caller zeroes it).

    Raises:
        ValueError: the header or key has the wrong length, or libsodium refused the header.
    """

    __slots__ = ("_closed", "_state")

    def __init__(self, header: Buffer, key: Buffer) -> None:
        _check_key(key)
        if len(header) != HEADER_BYTES:
            raise ValueError(f"secretstream header must be {HEADER_BYTES} bytes")
        self._state = bytearray(STATE_BYTES)
        self._closed = False
        rc = lib.crypto_secretstream_xchacha20poly1305_init_pull(
            _rw(self._state), _ro(header), _ro(key)
        )
        if rc != 0:  # pragma: no cover - init_pull cannot fail for well-sized input
            self.close()
            raise ValueError("secretstream header refused")

    def pull_into(
        self, out: bytearray | memoryview, ciphertext: Buffer, *, ad: Buffer | None
    ) -> int | None:
        """Decrypt ``ciphertext`` into ``out[: len(ciphertext) - ABYTES]``.

        Returns:
            The message tag (``TAG_MESSAGE``, ``TAG_FINAL``, ...), or None if authentication
            failed (wrong key, tampered, reordered or truncated data). On failure ``out`` is
            zeroed and the state is unchanged.
        """
        if self._closed:
            raise ValueError("secretstream state is closed")
        if len(ciphertext) < ABYTES:
            return None
        mlen = len(ciphertext) - ABYTES
        if len(out) < mlen:
            raise ValueError(f"output buffer too small: need {mlen}, have {len(out)}")
        tag = ffi.new("unsigned char *")
        ad_ptr, ad_len = _ad(ad)
        rc = lib.crypto_secretstream_xchacha20poly1305_pull(
            _rw(self._state),
            _rw(out) if len(out) else ffi.NULL,
            ffi.NULL,
            tag,
            _ro(ciphertext),
            len(ciphertext),
            ad_ptr,
            ad_len,
        )
        if rc != 0:
            if mlen:
                lib.sodium_memzero(_rw(out), mlen)
            return None
        return int(tag[0])

    def close(self) -> None:
        """Zero the stream state. Idempotent."""
        lib.sodium_memzero(_rw(self._state), len(self._state))
        self._closed = True


def aead_encrypt(message: Buffer, *, ad: Buffer | None, nonce: Buffer, key: Buffer) -> bytes:
    """XChaCha20-Poly1305-IETF encryption; returns ciphertext ‖ 16-byte tag."""
    _check_key(key)
    if len(nonce) != AEAD_NONCE_BYTES:
        raise ValueError(f"nonce must be {AEAD_NONCE_BYTES} bytes")
    out = bytearray(len(message) + AEAD_ABYTES)
    clen = ffi.new("unsigned long long *")
    ad_ptr, ad_len = _ad(ad)
    lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        _rw(out),
        clen,
        _ro(message) if len(message) else ffi.NULL,
        len(message),
        ad_ptr,
        ad_len,
        ffi.NULL,
        _ro(nonce),
        _ro(key),
    )
    return bytes(out)


def aead_decrypt_into(
    out: bytearray | memoryview,
    ciphertext: Buffer,
    *,
    ad: Buffer | None,
    nonce: Buffer,
    key: Buffer,
) -> bool:
    """XChaCha20-Poly1305-IETF decryption into ``out[: len(ciphertext) - 16]``.

    Returns:
        True on success; False if authentication failed (``out`` is then zeroed).
    """
    _check_key(key)
    if len(nonce) != AEAD_NONCE_BYTES or len(ciphertext) < AEAD_ABYTES:
        return False
    mlen = len(ciphertext) - AEAD_ABYTES
    if len(out) < mlen:
        raise ValueError(f"output buffer too small: need {mlen}, have {len(out)}")
    outlen = ffi.new("unsigned long long *")
    ad_ptr, ad_len = _ad(ad)
    rc = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        _rw(out) if len(out) else ffi.NULL,
        outlen,
        ffi.NULL,
        _ro(ciphertext),
        len(ciphertext),
        ad_ptr,
        ad_len,
        _ro(nonce),
        _ro(key),
    )
    if rc != 0:
        if mlen:
            lib.sodium_memzero(_rw(out), mlen)
        return False
    return True
