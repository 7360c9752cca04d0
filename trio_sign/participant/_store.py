"""The participant's key shares, sealed at rest.

One file (JSON, mode 0600, written atomically and durably through
:func:`trio_sign._atomic.atomic_file`)::

    {"format": "trio-sign/participant-store", "version": 1, "participant_id": "...",
     "key": {"type": "passphrase", "kdf": "argon2id13", "opslimit": 2,
             "memlimit": 67108864, "salt": "<16 bytes hex>"}
          | {"type": "kms", "key_id": "...", "encrypted_data_key": "<base64>"},
     "cipher": "xchacha20poly1305-ietf", "nonce": "<24 bytes hex>",
     "ciphertext": "<base64>"}

The plaintext is the share file of docs/share-file.md (JSON Lines: header, one
:class:`~trio_sign.shares.ShareRecord` per account with its ciphersuite, trailer), read back
through the same validating reader as every other share file. The 32-byte data key comes from
the passphrase (libsodium ``crypto_pwhash`` Argon2id with the parameters and salt recorded in
``key``) or from KMS (``GenerateDataKey`` when sealing, ``Decrypt`` when opening, with the
encryption context ``{"trio-sign:participant": <participant_id>}``; the client is injected).
The associated data is the file's header (everything but ``nonce`` and ``ciphertext``, as
sorted compact JSON), so changing any header field is detected like changing the ciphertext.
A wrong passphrase and a tampered file are indistinguishable by design: both are
``wrong_key_or_tampered``.

Secrets: the data key, the passphrase and the decrypted plaintext are ``bytearray``s (or
``BytesIO`` buffers) zeroed after use; each record's signing share is a ``bytearray`` that
:meth:`SealedShareStore.close` zeroes. CPython cannot zero the immutable copies made on the
way: the hex text of each record while it is parsed or written, and KMS's plaintext data key
(boto3 returns ``bytes``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import nacl.bindings as nb
from nacl._sodium import ffi, lib

from .._atomic import atomic_file
from .._errors import ShareFileError, TrioSignError
from ..crypto import _sodium
from ..crypto._stream import AEAD_NONCE_BYTES, aead_decrypt_into, aead_encrypt
from ..shares import ShareRecord, read_plaintext, write_plaintext

STORE_FORMAT: Final = "trio-sign/participant-store"
STORE_VERSION: Final = 1
CIPHER: Final = "xchacha20poly1305-ietf"
KEY_BYTES: Final = 32
SALT_BYTES: Final = int(nb.crypto_pwhash_SALTBYTES)
#: Argon2id defaults: libsodium's "interactive" (2 passes, 64 MiB).
DEFAULT_OPSLIMIT: Final = int(nb.crypto_pwhash_argon2id_OPSLIMIT_INTERACTIVE)
DEFAULT_MEMLIMIT: Final = int(nb.crypto_pwhash_argon2id_MEMLIMIT_INTERACTIVE)
#: Bounds on a file's recorded parameters, checked before the KDF runs (a hostile file must
#: not make us spend minutes or gigabytes).
MAX_OPSLIMIT: Final = 16
MAX_MEMLIMIT: Final = 1 << 30
MIN_OPSLIMIT: Final = int(nb.crypto_pwhash_argon2id_OPSLIMIT_MIN)
MIN_MEMLIMIT: Final = int(nb.crypto_pwhash_argon2id_MEMLIMIT_MIN)
MAX_STORE_BYTES: Final = 256 * 1024 * 1024
_TOP_KEYS: Final = frozenset(
    {"format", "version", "participant_id", "key", "cipher", "nonce", "ciphertext"}
)


class ParticipantStoreError(TrioSignError):
    """The participant's store could not be sealed or opened.

    Attributes:
        reason: ``wrong_key_or_tampered``, ``bad_format``, ``bad_shares``, ``unreadable``,
            ``exists``, ``kms``, ``closed``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeySource(Protocol):
    """Makes a data key for sealing and recovers it for opening."""

    def new_key(self, participant_id: str) -> tuple[dict[str, Any], bytearray]:
        """A fresh data key (the caller zeroes it) and the ``key`` object that recovers it."""
        ...

    def open_key(self, key: Mapping[str, Any], participant_id: str) -> bytearray:
        """The data key the ``key`` object names (the caller zeroes it)."""
        ...


class PassphraseKey:
    """A data key derived from a passphrase with Argon2id (libsodium ``crypto_pwhash``).

    Args:
        passphrase: copied into a ``bytearray`` that :meth:`close` zeroes (pass a
            ``bytearray`` and zero yours too).
        opslimit, memlimit: the Argon2id cost for new files (recorded in them); opening
            uses the file's, within :data:`MAX_OPSLIMIT` and :data:`MAX_MEMLIMIT`.

    Blocking: each derivation takes about a second at the defaults; run it in a thread.
    """

    def __init__(
        self,
        passphrase: bytes | bytearray | str,
        *,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> None:
        raw = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
        if not raw:
            raise ParticipantStoreError("the passphrase is empty", reason="bad_format")
        _check_cost(opslimit, memlimit)
        self._passphrase = bytearray(raw)
        self.opslimit = opslimit
        self.memlimit = memlimit

    def __repr__(self) -> str:
        return f"PassphraseKey(<passphrase>, opslimit={self.opslimit}, memlimit={self.memlimit})"

    def _derive(self, salt: bytes, opslimit: int, memlimit: int) -> bytearray:
        out = bytearray(KEY_BYTES)
        rc = lib.crypto_pwhash(
            ffi.from_buffer(out, require_writable=True),
            KEY_BYTES,
            ffi.from_buffer(self._passphrase),
            len(self._passphrase),
            ffi.from_buffer(salt),
            opslimit,
            memlimit,
            nb.crypto_pwhash_ALG_ARGON2ID13,
        )
        if rc != 0:  # pragma: no cover - out of memory
            _sodium.memzero(out)
            raise ParticipantStoreError("Argon2id failed (out of memory?)", reason="unreadable")
        return out

    def new_key(self, participant_id: str) -> tuple[dict[str, Any], bytearray]:
        salt = os.urandom(SALT_BYTES)
        key = {
            "type": "passphrase",
            "kdf": "argon2id13",
            "opslimit": self.opslimit,
            "memlimit": self.memlimit,
            "salt": salt.hex(),
        }
        return key, self._derive(salt, self.opslimit, self.memlimit)

    def open_key(self, key: Mapping[str, Any], participant_id: str) -> bytearray:
        if key.get("type") != "passphrase":
            raise ParticipantStoreError(
                f"the store is sealed with a {key.get('type')!r} key, not a passphrase",
                reason="bad_format",
            )
        ops, mem, salt = key.get("opslimit"), key.get("memlimit"), key.get("salt")
        if (
            set(key) != {"type", "kdf", "opslimit", "memlimit", "salt"}
            or key.get("kdf") != "argon2id13"
            or type(ops) is not int
            or type(mem) is not int
            or not isinstance(salt, str)
            or len(salt) != 2 * SALT_BYTES
        ):
            raise ParticipantStoreError(
                'the store\'s "key" is not {"type": "passphrase", "kdf": "argon2id13", '
                '"opslimit", "memlimit", "salt"}',
                reason="bad_format",
            )
        _check_cost(ops, mem)
        try:
            salt_bytes = bytes.fromhex(salt)
        except ValueError:
            raise ParticipantStoreError(
                "the store's salt is not hex", reason="bad_format"
            ) from None
        return self._derive(salt_bytes, ops, mem)

    def close(self) -> None:
        _sodium.memzero(self._passphrase)


def _check_cost(opslimit: int, memlimit: int) -> None:
    if not (MIN_OPSLIMIT <= opslimit <= MAX_OPSLIMIT and MIN_MEMLIMIT <= memlimit <= MAX_MEMLIMIT):
        raise ParticipantStoreError(
            f"Argon2id cost out of bounds: opslimit {MIN_OPSLIMIT}..{MAX_OPSLIMIT}, "
            f"memlimit {MIN_MEMLIMIT}..{MAX_MEMLIMIT} bytes",
            reason="bad_format",
        )


class KmsKey:
    """A data key from AWS KMS (``GenerateDataKey`` / ``Decrypt``).

    Args:
        client: a boto3 ``kms`` client (or anything with the same two methods).
        key_id: the KMS key (id, ARN or alias) new files are sealed under.

    Blocking (HTTP calls): run it in a thread.
    """

    def __init__(self, client: Any, key_id: str) -> None:
        self._client = client
        self.key_id = key_id

    def __repr__(self) -> str:
        return f"KmsKey(key_id={self.key_id!r})"

    @staticmethod
    def _context(participant_id: str) -> dict[str, str]:
        return {"trio-sign:participant": participant_id}

    def new_key(self, participant_id: str) -> tuple[dict[str, Any], bytearray]:
        try:
            reply = self._client.generate_data_key(
                KeyId=self.key_id,
                KeySpec="AES_256",
                EncryptionContext=self._context(participant_id),
            )
        except Exception as exc:
            raise ParticipantStoreError(
                f"KMS GenerateDataKey under {self.key_id} failed: {type(exc).__name__}",
                reason="kms",
            ) from exc
        key = bytearray(reply["Plaintext"])
        if len(key) != KEY_BYTES:
            _sodium.memzero(key)
            raise ParticipantStoreError(
                "KMS returned a data key that is not 32 bytes", reason="kms"
            )
        blob = base64.b64encode(reply["CiphertextBlob"]).decode("ascii")
        return {"type": "kms", "key_id": self.key_id, "encrypted_data_key": blob}, key

    def open_key(self, key: Mapping[str, Any], participant_id: str) -> bytearray:
        blob = key.get("encrypted_data_key")
        if (
            key.get("type") != "kms"
            or not isinstance(blob, str)
            or set(key)
            != {
                "type",
                "key_id",
                "encrypted_data_key",
            }
        ):
            raise ParticipantStoreError(
                'the store\'s "key" is not {"type": "kms", "key_id", "encrypted_data_key"}',
                reason="bad_format",
            )
        try:
            wrapped = base64.b64decode(blob, validate=True)
        except binascii.Error:
            raise ParticipantStoreError(
                "the store's encrypted_data_key is not base64", reason="bad_format"
            ) from None
        try:
            reply = self._client.decrypt(
                CiphertextBlob=wrapped, EncryptionContext=self._context(participant_id)
            )
        except Exception as exc:
            raise ParticipantStoreError(
                f"KMS Decrypt of the store's data key failed: {type(exc).__name__}",
                reason="kms",
            ) from exc
        out = bytearray(reply["Plaintext"])
        if len(out) != KEY_BYTES:
            _sodium.memzero(out)
            raise ParticipantStoreError(
                "KMS returned a data key that is not 32 bytes", reason="kms"
            )
        return out


def _aad(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


class SealedShareStore:
    """A participant's shares (account id -> :class:`~trio_sign.shares.ShareRecord`), in
    memory, from and to a sealed file. Use :meth:`create` or :meth:`open`; :meth:`close`
    zeroes every signing share (and the passphrase of the key source it holds).

    Blocking (file I/O and the KDF or KMS): call it from a thread in async code.
    """

    def __init__(
        self,
        path: Path,
        participant_id: str,
        records: Iterable[ShareRecord],
        key_source: KeySource,
    ) -> None:
        self.path = Path(path)
        self.participant_id = participant_id
        self._key_source = key_source
        self._records: dict[str, ShareRecord] = {}
        self._closed = False
        for rec in records:
            if rec.account_id in self._records:
                raise ParticipantStoreError(
                    f"account {rec.account_id!r} appears twice", reason="bad_shares"
                )
            self._records[rec.account_id] = rec

    def __repr__(self) -> str:
        return (
            f"SealedShareStore({os.fspath(self.path)!r}, participant_id="
            f"{self.participant_id!r}, accounts={len(self._records)})"
        )

    def __len__(self) -> int:
        return len(self._records)

    def share(self, account_id: str) -> ShareRecord | None:
        """The share of ``account_id``, or ``None`` (also once closed)."""
        return None if self._closed else self._records.get(account_id)

    def accounts(self) -> list[str]:
        return list(self._records)

    def put(self, record: ShareRecord) -> None:
        """Add or replace one account's share in memory (:meth:`save` makes it durable)."""
        self._check_open()
        old = self._records.get(record.account_id)
        if old is not None and old is not record:
            old.zero()
        self._records[record.account_id] = record

    def discard(self, record: ShareRecord) -> None:
        """Take back a :meth:`put` whose :meth:`save` failed: ``record`` leaves the store (if
        it is still the account's share) and is zeroed. Files already saved are unchanged."""
        if self._records.get(record.account_id) is record:
            del self._records[record.account_id]
        record.zero()

    # -- sealing ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        participant_id: str,
        records: Iterable[ShareRecord],
        key_source: KeySource,
        *,
        overwrite: bool = False,
    ) -> SealedShareStore:
        """Seal ``records`` into a new file at ``path`` and return the open store (which
        owns the records from here)."""
        store = cls(Path(path), participant_id, records, key_source)
        try:
            store.save(overwrite=overwrite)
        except BaseException:
            store.close()
            raise
        return store

    def save(self, *, overwrite: bool = True) -> None:
        """Seal every share under a fresh data key (fresh salt or fresh KMS data key) and
        replace the file atomically: after a crash the file is the old one or the new one,
        whole and fsynced, never a mix."""
        self._check_open()
        # A snapshot first: save() runs in a worker thread while the event loop may put()
        # another DKG's share (that one is covered by the next save).
        records = list(self._records.values())
        header_key, data_key = self._key_source.new_key(self.participant_id)
        plain = io.BytesIO()
        try:
            write_plaintext(plain, records)
            header = {
                "format": STORE_FORMAT,
                "version": STORE_VERSION,
                "participant_id": self.participant_id,
                "key": header_key,
                "cipher": CIPHER,
            }
            nonce = os.urandom(AEAD_NONCE_BYTES)
            with plain.getbuffer() as view:
                sealed = aead_encrypt(view, ad=_aad(header), nonce=nonce, key=data_key)
                _sodium.memzero(view)
        finally:
            _sodium.memzero(data_key)
        text = json.dumps(
            {**header, "nonce": nonce.hex(), "ciphertext": base64.b64encode(sealed).decode()},
            sort_keys=True,
        )
        try:
            with atomic_file(self.path, overwrite=overwrite) as f:
                f.write(text.encode("ascii") + b"\n")
        except FileExistsError:
            raise ParticipantStoreError(
                f"{self.path} exists; refusing to overwrite a participant store",
                reason="exists",
            ) from None

    @classmethod
    def open(cls, path: str | os.PathLike[str], key_source: KeySource) -> SealedShareStore:
        """Read, authenticate, decrypt and validate the store at ``path``.

        Raises:
            ParticipantStoreError: ``unreadable`` (the file, or its mode lets others read
                it), ``bad_format``, ``wrong_key_or_tampered``, ``bad_shares`` (naming the
                line), ``kms``. Messages name the file, never a secret.
        """
        where = os.fspath(path)
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                raw = f.read(MAX_STORE_BYTES + 1)
        except OSError as exc:
            raise ParticipantStoreError(
                f"cannot read participant store {where}: {exc.strerror}", reason="unreadable"
            ) from None
        if stat.S_IMODE(mode) & 0o077:
            raise ParticipantStoreError(
                f"participant store {where} is mode {stat.S_IMODE(mode):04o}: it must be "
                "readable by its owner only (chmod 600)",
                reason="unreadable",
            )
        obj = _parse_file(raw, where)
        header = {k: v for k, v in obj.items() if k not in ("nonce", "ciphertext")}
        participant_id = obj["participant_id"]
        data_key = key_source.open_key(obj["key"], participant_id)
        sealed = obj["ciphertext"]
        plain = bytearray(max(0, len(sealed) - 16))
        try:
            ok = aead_decrypt_into(plain, sealed, ad=_aad(header), nonce=obj["nonce"], key=data_key)
        finally:
            _sodium.memzero(data_key)
        if not ok:
            raise ParticipantStoreError(
                f"participant store {where}: wrong passphrase or key, or the file was changed",
                reason="wrong_key_or_tampered",
            )
        stream = io.BytesIO(plain)
        _sodium.memzero(plain)
        try:
            records = list(read_plaintext(stream, name=where))
        except ShareFileError as exc:
            raise ParticipantStoreError(str(exc), reason="bad_shares") from None
        finally:
            with stream.getbuffer() as view:
                _sodium.memzero(view)
        try:
            return cls(Path(path), participant_id, records, key_source)
        except BaseException:
            for rec in records:
                rec.zero()
            raise

    # -- lifetime --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ParticipantStoreError("the participant store is closed", reason="closed")

    def close(self) -> None:
        """Zero every signing share (and the key source's passphrase). Idempotent."""
        self._closed = True
        for rec in self._records.values():
            rec.zero()
        close = getattr(self._key_source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> SealedShareStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_file(raw: bytes, where: str) -> dict[str, Any]:
    def bad(what: str) -> ParticipantStoreError:
        return ParticipantStoreError(f"participant store {where}: {what}", reason="bad_format")

    if len(raw) > MAX_STORE_BYTES:
        raise bad(f"larger than {MAX_STORE_BYTES} bytes")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not JSON") from None
    if (
        not isinstance(obj, dict)
        or obj.get("format") != STORE_FORMAT
        or type(obj.get("version")) is not int
    ):
        raise bad(f"not a {STORE_FORMAT} file")
    if obj["version"] != STORE_VERSION:
        raise bad(f"version {obj['version']} (this build reads {STORE_VERSION})")
    if set(obj) != _TOP_KEYS:
        raise bad("fields must be exactly " + ", ".join(sorted(_TOP_KEYS)))
    if obj.get("cipher") != CIPHER:
        raise bad(f"cipher must be {CIPHER}")
    if not isinstance(obj["participant_id"], str) or not isinstance(obj["key"], dict):
        raise bad("participant_id must be a string and key an object")
    try:
        nonce = bytes.fromhex(obj["nonce"])
        sealed = base64.b64decode(obj["ciphertext"], validate=True)
    except (TypeError, ValueError, binascii.Error):
        raise bad("nonce must be hex and ciphertext base64") from None
    if len(nonce) != AEAD_NONCE_BYTES or len(sealed) < 16:
        raise bad(f"nonce must be {AEAD_NONCE_BYTES} bytes and ciphertext at least 16")
    obj["nonce"], obj["ciphertext"] = nonce, sealed
    return obj


__all__ = [
    "KeySource",
    "KmsKey",
    "ParticipantStoreError",
    "PassphraseKey",
    "SealedShareStore",
]
