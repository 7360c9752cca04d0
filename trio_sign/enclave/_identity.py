"""The delta identity key (DESIGN §12, §13): an Ed25519 key that exists only inside enclaves.

It signs what an enclave makes by itself: delta bundles (new accounts from a DKG, refreshed
shares, a compacted base) and its round-1 DKG packages. Its public key is pinned in the
measured configuration (``[bundles] delta_identity_key``), so a delta signed by anything else
is refused exactly as a base bundle signed by an unpinned key is.

Lifecycle (docs/runbook.md, "Genesis of the delta identity key"):

* **Genesis**, once per fleet, inside an enclave built for the purpose (:func:`genesis`): the
  enclave draws a fresh 32-byte seed, derives the key pair, and asks KMS (through the parent)
  for a data key with ``GenerateDataKey`` and ``Recipient`` = its attestation document. KMS
  answers with ``CiphertextForRecipient`` (the data key, encrypted to the document's RSA key:
  only this enclave opens it) and ``CiphertextBlob`` (the data key wrapped under the KMS key).
  The enclave encrypts the seed under the data key and hands out a :class:`SealedIdentity`
  (the public key, the ``CiphertextBlob``, the nonce and the ciphertext), never the seed.
* **Every boot** (:func:`unseal`): the parent forwards the sealed file's wrapped data key and
  the enclave's attestation to KMS ``Decrypt`` with ``Recipient``, exactly as for the bundle's
  data key (the key policy pins the PCRs, so only an enclave of the pinned image and
  configuration gets it); the enclave opens the seed and checks that the key pair it derives
  is the **pinned** public key. A key that does not match is refused
  (``identity_key_mismatch``): a parent can always encrypt a seed of its own to the RSA key in
  the attestation document, as it can a bundle, and only the pin tells the two apart.

The seed's encryption is XChaCha20-Poly1305 with associated data binding the public key, the
KMS key and the encryption context, and the KMS encryption context names the public key too
(``{"format": "trio-sign/sealed-identity-key", "public_key": HEX}``), so neither half of the
file can be moved onto another.

Domain separation: a bundle signature is over a 32-byte digest (:meth:`IdentityKey.sign_digest`);
every other message the key signs (:meth:`IdentityKey.sign`) must start with ``trio-sign/``
and be longer than 32 bytes, so one can never pass for the other.

The functions take the KMS calls as parameters (:data:`RecipientDataKey`, the parent's
``RecipientKms``); the boot channel carries them (:mod:`trio_sign.enclave._preload`: the
``identity`` message every boot, ``identity_genesis`` for a genesis boot), and the parent keeps
the sealed file at ``[identity] sealed_file``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from .._errors import KeyWrapError
from ..crypto import _kdf, _sodium, _stream
from ..nitro import AsyncNsm, CmsError, EphemeralRecipientKey
from ..shares._keywrap import canonical_json
from ..shares._signature import DIGEST_BYTES, CeremonyKey
from ._preload_error import PreloadError

log = logging.getLogger("trio_sign.identity")

SEALED_IDENTITY_FORMAT: Final = "trio-sign/sealed-identity-key"
SEALED_IDENTITY_VERSION: Final = 1
#: The key provider of a sealed identity (the identity key is only ever sealed under KMS).
KMS_PROVIDER: Final = "aws-kms"
MAX_SEALED_IDENTITY_BYTES: Final = 16 * 1024
_SEED_BYTES: Final = 32
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS: Final = frozenset(
    {
        "format",
        "version",
        "public_key",
        "key_provider",
        "kms_key_id",
        "encrypted_data_key",
        "encryption_context",
        "nonce",
        "ciphertext",
    }
)

#: Genesis's KMS call: ``(attestation_document, encryption_context) -> (key_arn,
#: ciphertext_blob, ciphertext_for_recipient)`` (``GenerateDataKey`` with ``Recipient``;
#: :class:`trio_sign.kms.KmsRecipientDataKey`).
RecipientDataKey = Callable[[bytes, Mapping[str, str]], Awaitable[tuple[str, bytes, bytes]]]
#: Every boot's KMS call: ``(attestation_document, header) -> ciphertext_for_recipient``
#: (``Decrypt`` with ``Recipient``; the parent's :class:`trio_sign.kms.KmsRecipientKms`, given
#: :meth:`SealedIdentity.kms_header`).
RecipientDecrypt = Callable[[bytes, dict[str, Any]], Awaitable[bytes]]


class IdentityKeyError(PreloadError):
    """The delta identity key was refused; the enclave does not serve.

    ``reason``: ``identity_key_mismatch`` (the key KMS released is not the pinned one),
    ``identity_key_unpinned`` (production without ``[bundles] delta_identity_key``),
    ``identity_sealed_bad`` (the sealed file is malformed or fails authentication) or
    ``key_unwrap`` (the KMS envelope was refused).
    """


def identity_context(public_key: bytes) -> dict[str, str]:
    """The KMS encryption context of a sealed identity key."""
    return {"format": SEALED_IDENTITY_FORMAT, "public_key": public_key.hex()}


@dataclass(frozen=True, slots=True)
class SealedIdentity:
    """The sealed form of an identity key: public data only (the seed is encrypted)."""

    public_key: bytes
    kms_key_id: str
    encrypted_data_key: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)

    @property
    def encryption_context(self) -> dict[str, str]:
        return identity_context(self.public_key)

    def _ad(self) -> bytes:
        return canonical_json(
            {
                "format": SEALED_IDENTITY_FORMAT,
                "version": SEALED_IDENTITY_VERSION,
                "public_key": self.public_key.hex(),
                "kms_key_id": self.kms_key_id,
                "encryption_context": self.encryption_context,
            }
        )

    def kms_header(self) -> dict[str, Any]:
        """What the parent's ``RecipientKms`` reads (as of a sealed bundle's header)."""
        return {
            "key_provider": KMS_PROVIDER,
            "kms_key_id": self.kms_key_id,
            "encrypted_data_key": base64.b64encode(self.encrypted_data_key).decode("ascii"),
            "encryption_context": self.encryption_context,
        }

    def to_json(self) -> bytes:
        """The file's bytes (canonical JSON and a newline)."""
        return (
            canonical_json(
                {
                    "format": SEALED_IDENTITY_FORMAT,
                    "version": SEALED_IDENTITY_VERSION,
                    "public_key": self.public_key.hex(),
                    "key_provider": KMS_PROVIDER,
                    "kms_key_id": self.kms_key_id,
                    "encrypted_data_key": base64.b64encode(self.encrypted_data_key).decode(),
                    "encryption_context": self.encryption_context,
                    "nonce": self.nonce.hex(),
                    "ciphertext": base64.b64encode(self.ciphertext).decode("ascii"),
                }
            )
            + b"\n"
        )

    @classmethod
    def from_json(cls, data: bytes) -> SealedIdentity:
        """Parse a sealed identity file strictly (``identity_sealed_bad`` otherwise)."""

        def bad(what: str) -> IdentityKeyError:
            return IdentityKeyError(f"sealed identity key: {what}", reason="identity_sealed_bad")

        if len(data) > MAX_SEALED_IDENTITY_BYTES:
            raise bad(f"larger than {MAX_SEALED_IDENTITY_BYTES} bytes")
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("not valid JSON") from None
        if not isinstance(obj, dict) or set(obj) != _FIELDS:
            raise bad(f"must be an object with exactly the fields {sorted(_FIELDS)}")
        if obj["format"] != SEALED_IDENTITY_FORMAT or obj["version"] != SEALED_IDENTITY_VERSION:
            raise bad(f"not a {SEALED_IDENTITY_FORMAT} version {SEALED_IDENTITY_VERSION} file")
        if obj["key_provider"] != KMS_PROVIDER:
            raise bad(f"key_provider must be {KMS_PROVIDER!r}")
        public_hex, kms_key_id = obj["public_key"], obj["kms_key_id"]
        if not isinstance(public_hex, str) or _HEX64.fullmatch(public_hex) is None:
            raise bad("public_key must be 64 lowercase hex digits")
        if not isinstance(kms_key_id, str) or not kms_key_id:
            raise bad("kms_key_id must be a non-empty string")
        if obj["encryption_context"] != identity_context(bytes.fromhex(public_hex)):
            raise bad("encryption_context must name the format and this public key")
        try:
            nonce = bytes.fromhex(obj["nonce"])
            blob = base64.b64decode(obj["encrypted_data_key"], validate=True)
            ciphertext = base64.b64decode(obj["ciphertext"], validate=True)
        except (TypeError, ValueError, binascii.Error):
            raise bad("nonce, encrypted_data_key or ciphertext is not valid hex/base64") from None
        if len(nonce) != _stream.AEAD_NONCE_BYTES or not blob:
            raise bad("nonce must be 24 bytes and encrypted_data_key non-empty")
        if len(ciphertext) != _SEED_BYTES + _stream.AEAD_ABYTES:
            raise bad("ciphertext must hold a 32-byte seed")
        return cls(bytes.fromhex(public_hex), kms_key_id, blob, nonce, ciphertext)


#: The key provider name a delta bundle's header records (docs/key-lifecycle.md §2).
DELTA_PROVIDER: Final = "enclave-identity"
DELTA_KEK_INFO: Final = b"trio-sign/delta-kek/v1"
_DELTA_BLOB_MAGIC: Final = b"TSDKW1"


class DeltaKeyWrap:
    """Wraps delta bundles' data keys under the identity key's derived key-encryption key.

    A :class:`~trio_sign.shares.DataKeyProvider`: ``provider`` is ``"enclave-identity"``,
    ``key_id`` the identity public key in hex. Blob: ``b"TSDKW1"`` ‖ nonce (24) ‖
    XChaCha20-Poly1305(KEK, data key) with the canonical JSON of the key id and the
    encryption context as associated data, so a blob opens only under the same identity key
    and context. Every boot derives the KEK from the identity key KMS released, so the deltas
    need no KMS call of their own. :meth:`close` zeroes the KEK.
    """

    provider: str = DELTA_PROVIDER

    def __init__(self, public_key: bytes, kek: bytearray) -> None:
        if len(kek) != _stream.KEY_BYTES:
            raise ValueError("a key-encryption key is 32 bytes")
        self.key_id = bytes(public_key).hex()
        self._kek = kek
        self._closed = False

    def __repr__(self) -> str:
        return f"DeltaKeyWrap(key_id={self.key_id!r}, kek=<secret>)"

    def names_key(self, key_id: str) -> bool:
        return key_id == self.key_id

    def _ad(self, context: Mapping[str, str]) -> bytes:
        return canonical_json({"encryption_context": dict(context), "key_id": self.key_id})

    def _check_open(self) -> None:
        if self._closed:
            raise KeyWrapError("the delta key-encryption key is closed")

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytearray, bytes]:
        """A fresh random data key and its blob bound to ``context``; the caller zeroes it."""
        self._check_open()
        data_key = bytearray(_stream.KEY_BYTES)
        _sodium.random_bytes(data_key)
        nonce = bytearray(_stream.AEAD_NONCE_BYTES)
        _sodium.random_bytes(nonce)
        ct = _stream.aead_encrypt(data_key, ad=self._ad(context), nonce=nonce, key=self._kek)
        return data_key, _DELTA_BLOB_MAGIC + bytes(nonce) + ct

    def decrypt_data_key(self, blob: bytes, context: Mapping[str, str]) -> bytearray:
        """Unwrap a blob made by :meth:`generate_data_key` under the same identity key."""
        self._check_open()
        n = len(_DELTA_BLOB_MAGIC)
        if (
            not blob.startswith(_DELTA_BLOB_MAGIC)
            or len(blob) != n + _stream.AEAD_NONCE_BYTES + _stream.KEY_BYTES + _stream.AEAD_ABYTES
        ):
            raise KeyWrapError("encrypted data key is not an enclave-identity blob")
        nonce = blob[n : n + _stream.AEAD_NONCE_BYTES]
        out = bytearray(_stream.KEY_BYTES)
        if not _stream.aead_decrypt_into(
            out,
            blob[n + _stream.AEAD_NONCE_BYTES :],
            ad=self._ad(context),
            nonce=nonce,
            key=self._kek,
        ):
            raise KeyWrapError(
                "cannot unwrap the delta's data key: it was made under another identity key, "
                "for another encryption context, or the blob was changed"
            )
        return out

    def close(self) -> None:
        _sodium.memzero(self._kek)
        self._closed = True

    def __enter__(self) -> DeltaKeyWrap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class IdentityKey:
    """The unsealed identity key, inside the enclave. :meth:`close` zeroes it."""

    def __init__(self, pair: CeremonyKey) -> None:
        self._pair = pair

    def __repr__(self) -> str:
        return f"IdentityKey(public_key={self.public_key.hex()}, secret=<secret>)"

    @property
    def public_key(self) -> bytes:
        return self._pair.public_key

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a delta bundle's 32-byte fingerprint (a :class:`~trio_sign.shares.BundleSigner`)."""
        if len(digest) != DIGEST_BYTES:
            raise ValueError("a bundle digest is 32 bytes")
        return self._pair.sign_digest(digest)

    def sign(self, message: bytes) -> bytes:
        """Sign a protocol message (a DKG round-1 package, ...): it must start with
        ``trio-sign/`` and be longer than 32 bytes, so it can never be a bundle digest."""
        if not message.startswith(b"trio-sign/") or len(message) <= DIGEST_BYTES:
            raise ValueError(
                "identity-signed messages start with b'trio-sign/' (domain separation)"
            )
        return self._pair.sign_digest(message)

    def delta_key_wrap(self) -> DeltaKeyWrap:
        """The data-key provider for delta bundles (docs/key-lifecycle.md §2): data keys
        wrapped under ``HKDF-SHA256(seed, info="trio-sign/delta-kek/v1")``. Close it (or this
        key) when done; it holds its own copy of the derived key."""
        kek = bytearray(_stream.KEY_BYTES)
        # The seed is the first half of libsodium's 64-byte Ed25519 secret key.
        seed = memoryview(self._pair._sk)[:_SEED_BYTES]
        try:
            _kdf.hkdf_sha256_into(kek, seed, info=DELTA_KEK_INFO)
        finally:
            seed.release()
        return DeltaKeyWrap(self.public_key, kek)

    def close(self) -> None:
        self._pair.close()

    def __enter__(self) -> IdentityKey:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The sans-io halves


def seal_identity(
    seed: _sodium.Buffer, data_key: _sodium.Buffer, *, kms_key_id: str, encrypted_data_key: bytes
) -> tuple[IdentityKey, SealedIdentity]:
    """Encrypt ``seed`` under ``data_key`` (both only read; the caller zeroes them)."""
    if len(seed) != _SEED_BYTES or len(data_key) != _stream.KEY_BYTES:
        raise ValueError("a seed and a data key are 32 bytes each")
    key = IdentityKey(CeremonyKey.from_seed(seed))
    try:
        nonce = bytearray(_stream.AEAD_NONCE_BYTES)
        _sodium.random_bytes(nonce)
        draft = SealedIdentity(
            key.public_key, kms_key_id, bytes(encrypted_data_key), bytes(nonce), b""
        )
        ciphertext = _stream.aead_encrypt(seed, ad=draft._ad(), nonce=nonce, key=data_key)
        sealed = SealedIdentity(
            key.public_key, kms_key_id, bytes(encrypted_data_key), bytes(nonce), bytes(ciphertext)
        )
    except BaseException:
        key.close()
        raise
    return key, sealed


def open_identity(
    sealed: SealedIdentity, data_key: _sodium.Buffer, *, pinned: bytes | None
) -> IdentityKey:
    """Decrypt the seed, derive the key pair and check it against the sealed and the pinned
    public key. ``pinned`` None is development (any key, with a warning).

    Error handling:
        :class:`IdentityKeyError`: ``identity_sealed_bad`` (wrong data key, or a changed
        file), ``identity_key_mismatch`` (the derived key is not the file's, or not the pin).
    """
    seed = bytearray(_SEED_BYTES)
    try:
        if not _stream.aead_decrypt_into(
            seed, sealed.ciphertext, ad=sealed._ad(), nonce=sealed.nonce, key=data_key
        ):
            raise IdentityKeyError(
                "the sealed identity key fails authentication (a wrong data key or a changed file)",
                reason="identity_sealed_bad",
            )
        key = IdentityKey(CeremonyKey.from_seed(seed))
    finally:
        _sodium.memzero(seed)
    if not _sodium.ct_equal(key.public_key, sealed.public_key):
        key.close()
        raise IdentityKeyError(
            "the identity key's seed does not give the public key its file names",
            reason="identity_key_mismatch",
        )
    if pinned is None:
        log.warning(
            "DEVELOPMENT: delta identity key %s accepted without a pin", key.public_key.hex()
        )
    elif not _sodium.ct_equal(key.public_key, pinned):
        key.close()
        raise IdentityKeyError(
            f"the identity key KMS released is {sealed.public_key.hex()}, but enclave.toml pins "
            f"{bytes(pinned).hex()} ([bundles] delta_identity_key)",
            reason="identity_key_mismatch",
        )
    return key


# ---------------------------------------------------------------------------------------------
# The attested exchanges


async def _attested_data_key(nsm: AsyncNsm, ask: Callable[[bytes], Awaitable[bytes]]) -> bytearray:
    """A fresh RSA key in an attestation document; ``ask(document)`` returns KMS's
    ``CiphertextForRecipient``, opened here. The caller zeroes the data key."""
    rsa_key = await trio.to_thread.run_sync(EphemeralRecipientKey.generate)
    try:
        document = await nsm.attestation(public_key=rsa_key.public_key_der)
        envelope = await ask(document)
        try:
            data_key = rsa_key.decrypt_recipient_ciphertext(envelope)
        except CmsError as exc:
            raise IdentityKeyError(f"KMS envelope refused: {exc}", reason="key_unwrap") from exc
    finally:
        rsa_key.close()
    if len(data_key) != _stream.KEY_BYTES:
        _sodium.memzero(data_key)
        raise IdentityKeyError("the KMS envelope holds no 32-byte data key", reason="key_unwrap")
    return data_key


async def genesis(nsm: AsyncNsm, kms: RecipientDataKey) -> tuple[IdentityKey, SealedIdentity]:
    """Create the identity key inside this enclave and seal it under KMS.

    Returns the key (for this enclave to use now) and the sealed form for the parent to store
    (public data). The seed and the data key are zeroed before this returns.

    Cancellation: safe at every await; nothing is kept.
    """
    seed = bytearray(_SEED_BYTES)
    data_key: bytearray | None = None
    try:
        _sodium.random_bytes(seed)
        with CeremonyKey.from_seed(seed) as pair:
            public_key = pair.public_key
        arn_blob: dict[str, Any] = {}

        async def ask(document: bytes) -> bytes:
            arn, blob, envelope = await kms(document, identity_context(public_key))
            arn_blob.update(arn=arn, blob=blob)
            return envelope

        data_key = await _attested_data_key(nsm, ask)
        key, sealed = seal_identity(
            seed, data_key, kms_key_id=arn_blob["arn"], encrypted_data_key=arn_blob["blob"]
        )
    finally:
        _sodium.memzero(seed)
        if data_key is not None:
            _sodium.memzero(data_key)
    log.info("delta identity key created", extra={"public_key": key.public_key.hex()})
    return key, sealed


async def unseal(
    nsm: AsyncNsm, kms: RecipientDecrypt, sealed: SealedIdentity, *, pinned: bytes | None
) -> IdentityKey:
    """Open the sealed identity key at boot (KMS ``Decrypt`` with ``Recipient``, as for the
    bundle's data key) and check it against ``pinned`` (``[bundles] delta_identity_key``;
    None is development).

    Error handling:
        :class:`IdentityKeyError` (see :func:`open_identity`; ``key_unwrap`` for the
        envelope); whatever ``kms`` raises (a key policy that refuses this enclave's PCRs).
    """
    header = sealed.kms_header()
    data_key = await _attested_data_key(nsm, lambda document: kms(document, header))
    try:
        key = open_identity(sealed, data_key, pinned=pinned)
    finally:
        _sodium.memzero(data_key)
    log.info("delta identity key unsealed", extra={"public_key": key.public_key.hex()})
    return key
