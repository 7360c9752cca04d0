"""Data-key wrapping: the ``DataKeyProvider`` protocol and ``DevKeyFile``, its dev stand-in.

A sealed bundle is encrypted under a fresh 32-byte data key; the bundle header carries that key
wrapped ("encrypted data key") by a provider. In production the provider is AWS KMS (a later
change adds it behind this same protocol); for development and tests :class:`DevKeyFile` wraps
with a local key file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

from .._atomic import atomic_file
from .._errors import KeyWrapError
from ..crypto import _sodium, _stream

DEV_KEY_FORMAT: Final = "trio-sign/dev-kms-key"
DEV_KEY_VERSION: Final = 1
DEV_PROVIDER: Final = "dev-key-file"

_BLOB_MAGIC: Final = b"TSDEVKW1"
_KEY_ID = re.compile(r"dev-[0-9a-f]{16}")
_MAX_KEY_FILE_BYTES: Final = 4096


@runtime_checkable
class DataKeyProvider(Protocol):
    """Something that makes and unwraps data keys (AWS KMS, or :class:`DevKeyFile`).

    Attributes:
        provider: the provider kind recorded in the bundle header (``"dev-key-file"``, ...).
        key_id: the wrapping key's id recorded in the bundle header.
    """

    @property
    def provider(self) -> str: ...

    @property
    def key_id(self) -> str: ...

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytearray, bytes]:
        """Return ``(plaintext 32-byte data key, encrypted blob)``; the caller zeroes the key."""
        ...

    def decrypt_data_key(self, blob: bytes, context: Mapping[str, str]) -> bytearray:
        """Unwrap ``blob`` bound to ``context``; raise ``KeyWrapError`` if that is impossible."""
        ...

    def names_key(self, key_id: str) -> bool:
        """Whether a header's ``kms_key_id`` may name this provider's key (checked before
        unwrapping; KMS accepts several names for one key)."""
        ...


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8: the form we authenticate."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _check_context(context: Mapping[str, str]) -> dict[str, str]:
    ctx = dict(context)
    for k, v in ctx.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise KeyWrapError("encryption context keys and values must be strings")
    return ctx


class DevKeyFile:
    """A development key-wrapping key held in a local JSON file (NOT for production).

    File: ``{"format": "trio-sign/dev-kms-key", "version": 1, "key_id": "dev-<16 hex>",
    "key": <64 hex>}``, mode 0600. Wrapping is XChaCha20-Poly1305-IETF with a random 24-byte
    nonce; the associated data is the canonical JSON of the key id and the encryption context,
    so a blob only unwraps under the same key and the same context.

    Blob layout: ``b"TSDEVKW1"`` ‖ ``u8 len`` ‖ key_id ‖ nonce (24) ‖ ciphertext (32 + 16).

    The wrapping key is kept in a ``bytearray``; :meth:`close` zeroes it. The hex text read
    from the file passes through immutable ``str``/``bytes`` that CPython cannot zero.
    """

    provider: str = DEV_PROVIDER

    def __init__(self, key_id: str, key: bytearray) -> None:
        if _KEY_ID.fullmatch(key_id) is None:
            raise KeyWrapError(f"dev key id must look like dev-<16 hex digits>, got {key_id!r}")
        if len(key) != _stream.KEY_BYTES:
            raise KeyWrapError("dev key must be 32 bytes")
        self.key_id = key_id
        self._key = key
        self._closed = False

    def __repr__(self) -> str:
        return f"DevKeyFile(key_id={self.key_id!r}, key=<secret>)"

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> DevKeyFile:
        """Make a new random key file at ``path`` (mode 0600, written atomically); refuses to
        overwrite."""
        key = bytearray(_stream.KEY_BYTES)
        _sodium.random_bytes(key)
        kid = bytearray(8)
        _sodium.random_bytes(kid)
        key_id = "dev-" + kid.hex()
        text = canonical_json(
            {
                "format": DEV_KEY_FORMAT,
                "version": DEV_KEY_VERSION,
                "key_id": key_id,
                "key": key.hex(),
            }
        )
        try:
            with atomic_file(Path(path)) as f:
                f.write(text + b"\n")
        except FileExistsError:
            _sodium.memzero(key)
            raise KeyWrapError(
                f"refusing to overwrite existing key file {os.fspath(path)}"
            ) from None
        except BaseException:
            _sodium.memzero(key)
            raise
        return cls(key_id, key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DevKeyFile:
        """Read a key file made by :meth:`create`."""
        where = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise KeyWrapError(f"cannot read dev key file {where}: {exc.strerror}") from None
        if len(raw) > _MAX_KEY_FILE_BYTES:
            raise KeyWrapError(f"dev key file {where} is too large to be a key file")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KeyWrapError(f"dev key file {where} is not valid JSON") from None
        if (
            not isinstance(obj, dict)
            or obj.get("format") != DEV_KEY_FORMAT
            or type(obj.get("version")) is not int
            or obj.get("version") != DEV_KEY_VERSION
        ):
            raise KeyWrapError(
                f"dev key file {where} is not a {DEV_KEY_FORMAT} version {DEV_KEY_VERSION} file"
            )
        key_id, key_hex = obj.get("key_id"), obj.get("key")
        if not isinstance(key_id, str) or _KEY_ID.fullmatch(key_id) is None:
            raise KeyWrapError(f"dev key file {where}: key_id must be dev-<16 hex digits>")
        if not isinstance(key_hex, str) or re.fullmatch(r"[0-9a-f]{64}", key_hex) is None:
            raise KeyWrapError(f"dev key file {where}: key must be 64 lowercase hex digits")
        return cls(key_id, bytearray.fromhex(key_hex))

    def close(self) -> None:
        """Zero the wrapping key. Idempotent; later use raises ``KeyWrapError``."""
        _sodium.memzero(self._key)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise KeyWrapError(f"dev key {self.key_id} is closed")

    def names_key(self, key_id: str) -> bool:
        """A development key has one name: its ``key_id``."""
        return key_id == self.key_id

    def _ad(self, context: Mapping[str, str]) -> bytes:
        return canonical_json(
            {"encryption_context": _check_context(context), "key_id": self.key_id}
        )

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytearray, bytes]:
        """A fresh random data key and its wrapped blob bound to ``context``."""
        self._check_open()
        data_key = bytearray(_stream.KEY_BYTES)
        _sodium.random_bytes(data_key)
        nonce = bytearray(_stream.AEAD_NONCE_BYTES)
        _sodium.random_bytes(nonce)
        ct = _stream.aead_encrypt(data_key, ad=self._ad(context), nonce=nonce, key=self._key)
        kid = self.key_id.encode("ascii")
        return data_key, _BLOB_MAGIC + bytes([len(kid)]) + kid + bytes(nonce) + ct

    def decrypt_data_key(self, blob: bytes, context: Mapping[str, str]) -> bytearray:
        """Unwrap a blob made by :meth:`generate_data_key` with the same key and context."""
        self._check_open()
        if not blob.startswith(_BLOB_MAGIC) or len(blob) < len(_BLOB_MAGIC) + 1:
            raise KeyWrapError("encrypted data key is not a dev-key-file blob")
        n = blob[len(_BLOB_MAGIC)]
        p = len(_BLOB_MAGIC) + 1
        blob_kid = blob[p : p + n].decode("ascii", errors="replace")
        p += n
        expected_len = p + _stream.AEAD_NONCE_BYTES + _stream.KEY_BYTES + _stream.AEAD_ABYTES
        if len(blob) != expected_len:
            raise KeyWrapError("encrypted data key blob has the wrong length (corrupted?)")
        if blob_kid != self.key_id:
            raise KeyWrapError(
                f"bundle was sealed under key {blob_kid}, but the key file holds {self.key_id}"
            )
        nonce = blob[p : p + _stream.AEAD_NONCE_BYTES]
        ct = blob[p + _stream.AEAD_NONCE_BYTES :]
        out = bytearray(_stream.KEY_BYTES)
        if not _stream.aead_decrypt_into(out, ct, ad=self._ad(context), nonce=nonce, key=self._key):
            raise KeyWrapError(
                f"cannot unwrap the data key with {self.key_id}: "
                "the encryption context differs or the blob was tampered with"
            )
        return out
