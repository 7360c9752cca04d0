"""Bundle signatures (DESIGN §12): who may have made a sealed bundle, checked while streaming.

A sealed bundle's **body** is every byte from the magic through the FINAL chunk frame (header
and ciphertext). Its **fingerprint** is ``SHA-256(body)``, and the signature is Ed25519 (RFC
8032, pure) over those 32 bytes. The signature travels in one fixed-size record after the
FINAL chunk, which nothing covers but which names its key::

    b"TSSIGv1\\x00" (8) ‖ public_key (32) ‖ signature (64)          = 104 bytes

So the decoder hashes the body as it streams (it already did), and at the end has the digest
the signature must verify against; re-signing a bundle (another ceremony key, or KMS instead
of a key file) changes only the record, never the fingerprint the gateway pins and the
attestation binds.

Domain separation: the signed message is the 32-byte digest of a body that starts with
``TSSEALv1``. Every other message a signing key may sign (a delta identity key signs DKG
round-1 packages, DESIGN §13) starts with a ``trio-sign/...`` context string and is longer than
32 bytes, so no signature over one can pass for the other.

A loader is given a :class:`BundleTrust`: the public keys it accepts for the bundle's
``kind``, or None in development (an unsigned bundle is accepted with a warning). The check
runs at the end of the bundle, before the loader returns anything it decrypted; when it
fails, everything decrypted is zeroed and nothing is loaded.

Refusal reasons (``ShareFileError.reason``; the enclave's preload and exit reasons):

=========================  ==============================================================
``bundle_unsigned``        no signature record, where signing keys are pinned
``bundle_signer_unknown``  signed by a key that is not pinned for the bundle's kind
``bundle_signature_invalid``  the record names a pinned key, but the signature does not
                           verify over the bundle's fingerprint (a tampered signature, or
                           a body changed after signing that still decrypts)
``bundle_kind``            a ``delta`` bundle where a ``base`` is loaded, or the reverse
``bad_signature_record``   bytes after the FINAL chunk that are not one whole record
=========================  ==============================================================
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from nacl._sodium import ffi, lib

from .._atomic import atomic_file
from .._errors import ShareFileError, TrioSignError
from ..crypto import _sodium

log = logging.getLogger("trio_sign.shares")

SIGNATURE_MAGIC: Final = b"TSSIGv1\x00"
PUBLIC_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
SIGNATURE_RECORD_BYTES: Final = len(SIGNATURE_MAGIC) + PUBLIC_KEY_BYTES + SIGNATURE_BYTES
DIGEST_BYTES: Final = 32
#: The bundle kinds of DESIGN §6: made at a ceremony, or inside an enclave (§13).
KIND_BASE: Final = "base"
KIND_DELTA: Final = "delta"
KINDS: Final = (KIND_BASE, KIND_DELTA)

CEREMONY_KEY_FORMAT: Final = "trio-sign/ceremony-key"
CEREMONY_KEY_VERSION: Final = 1
_MAX_KEY_FILE_BYTES: Final = 4096
_SEED_BYTES: Final = 32
_SECRET_KEY_BYTES: Final = 64


class SigningError(TrioSignError):
    """A signing key could not be made, read or used (one line; never the key)."""


@dataclass(frozen=True, slots=True)
class BundleSignature:
    """The signature record that follows a bundle's FINAL chunk (public data)."""

    public_key: bytes
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.public_key) != PUBLIC_KEY_BYTES or len(self.signature) != SIGNATURE_BYTES:
            raise ValueError("a bundle signature is a 32-byte key and a 64-byte signature")

    def encode(self) -> bytes:
        """The record's 104 bytes."""
        return SIGNATURE_MAGIC + self.public_key + self.signature

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> BundleSignature:
        """Parse a whole record (``bad_signature_record`` if it is not one)."""
        raw = bytes(raw)
        if len(raw) != SIGNATURE_RECORD_BYTES or not raw.startswith(SIGNATURE_MAGIC):
            raise ShareFileError(
                f"the {len(raw)} bytes after the FINAL chunk are not a signature record",
                reason="bad_signature_record",
            )
        n = len(SIGNATURE_MAGIC)
        return cls(raw[n : n + PUBLIC_KEY_BYTES], raw[n + PUBLIC_KEY_BYTES :])

    def verifies(self, digest: bytes) -> bool:
        """Whether the signature verifies over ``digest`` under the record's own key."""
        return verify_digest(self.public_key, digest, self.signature)


def verify_digest(public_key: bytes, digest: bytes, signature: bytes) -> bool:
    """Ed25519 (RFC 8032, libsodium's strict verification) of ``signature`` over ``digest``.

    A key that is not a valid point, or a small-order one, never verifies.
    """
    if (
        len(public_key) != PUBLIC_KEY_BYTES
        or len(signature) != SIGNATURE_BYTES
        or len(digest) != DIGEST_BYTES
        or not _sodium.is_valid_point(public_key)
    ):
        return False
    signed = bytes(signature) + bytes(digest)  # libsodium's combined form: sig ‖ message
    out = bytearray(len(signed))
    out_len = ffi.new("unsigned long long *")
    rc = lib.crypto_sign_open(
        ffi.from_buffer(out, require_writable=True),
        out_len,
        ffi.from_buffer(signed),
        len(signed),
        ffi.from_buffer(public_key),
    )
    return bool(rc == 0)


#: DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410) before its 32 key bytes: what KMS
#: ``GetPublicKey`` returns for an ``ECC_NIST_EDWARDS25519`` key.
ED25519_SPKI_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")


def ed25519_spki(public_key: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return ED25519_SPKI_PREFIX + bytes(public_key)


def ed25519_from_spki(der: bytes) -> bytes:
    """The 32-byte key of an Ed25519 SubjectPublicKeyInfo (``SigningError`` if it is not one)."""
    if len(der) != len(ED25519_SPKI_PREFIX) + PUBLIC_KEY_BYTES or not der.startswith(
        ED25519_SPKI_PREFIX
    ):
        raise SigningError("the public key is not an Ed25519 SubjectPublicKeyInfo")
    return bytes(der[len(ED25519_SPKI_PREFIX) :])


class BundleSigner(Protocol):
    """Something that signs a bundle's 32-byte fingerprint with Ed25519.

    A ceremony key file (:class:`CeremonyKey`), a KMS key
    (:class:`~trio_sign.kms.KmsBundleSigner`), or an enclave's delta identity key.
    """

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key the signature verifies under."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """The 64-byte Ed25519 signature of the 32 bytes ``digest``."""
        ...


def sign_bundle_digest(signer: BundleSigner, digest: bytes) -> BundleSignature:
    """Sign ``digest`` and check the result before it is written.

    A signer that answers with a signature that does not verify under its own public key (a
    KMS key of the wrong type, a bug) is caught here, at the ceremony, not at the enclave.

    Error handling:
        :class:`SigningError`; whatever the signer raises.
    """
    if len(digest) != DIGEST_BYTES:
        raise ValueError("a bundle digest is 32 bytes")
    public_key = bytes(signer.public_key)
    signature = bytes(signer.sign_digest(digest))
    if not verify_digest(public_key, digest, signature):
        raise SigningError(
            "the signing key's signature does not verify under its public key "
            f"{public_key.hex()}: is it an Ed25519 key?"
        )
    return BundleSignature(public_key, signature)


# ---------------------------------------------------------------------------------------------
# The policy a loader applies


@dataclass(frozen=True, slots=True)
class BundleTrust:
    """Which bundles a loader accepts.

    Args:
        signing_keys: the Ed25519 public keys a bundle of ``kind`` may be signed by (for a
            base: enclave.toml ``[bundles] signing_keys``; for a delta: the pinned
            ``delta_identity_key``). None is development: an unsigned bundle is accepted (with a
            warning), a signed one must still verify under its own key. An empty tuple
            accepts nothing.
        kind: the kind being loaded (``base`` or ``delta``).
        compaction_keys: keys that may also sign a **compacted** base (a ``base`` whose header
            has ``compacts``, docs/compaction.md): the pinned delta identity key, so an
            enclave's compaction loads, while a base without ``compacts`` (a ceremony's) still
            needs a ceremony key. Ignored in development and for deltas.
    """

    signing_keys: tuple[bytes, ...] | None
    kind: str = KIND_BASE
    compaction_keys: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")

    @classmethod
    def pinned(
        cls,
        keys: Sequence[bytes] | None,
        *,
        kind: str = KIND_BASE,
        compaction_keys: Sequence[bytes] = (),
    ) -> BundleTrust:
        """A policy from a sequence of keys (None: development)."""
        return cls(
            None if keys is None else tuple(bytes(k) for k in keys),
            kind,
            tuple(bytes(k) for k in compaction_keys),
        )

    def _accepts_signer(self, header: dict[str, Any], public_key: bytes) -> bool:
        assert self.signing_keys is not None
        if any(_sodium.ct_equal(public_key, k) for k in self.signing_keys):
            return True
        compacted = self.kind == KIND_BASE and "compacts" in header
        return compacted and any(_sodium.ct_equal(public_key, k) for k in self.compaction_keys)

    @property
    def development(self) -> bool:
        return self.signing_keys is None

    def check_kind(self, header: dict[str, Any]) -> None:
        """``bundle_kind`` unless the header's kind is the one being loaded (checked when the
        header arrives, before any key is unwrapped, and again at the end)."""
        kind = bundle_kind(header)
        if kind != self.kind:
            raise ShareFileError(
                f"the bundle is a {kind} bundle, but a {self.kind} bundle is being loaded",
                reason="bundle_kind",
            )

    def check(
        self, header: dict[str, Any], digest: bytes, signature: BundleSignature | None
    ) -> None:
        """Refuse the bundle unless its kind and signature are acceptable.

        Error handling:
            ``ShareFileError`` with reason ``bundle_kind``, ``bundle_unsigned``,
            ``bundle_signer_unknown`` or ``bundle_signature_invalid`` (the module docstring).
        """
        self.check_kind(header)
        kind = self.kind
        if signature is None:
            if self.signing_keys is None:
                log.warning(
                    "DEVELOPMENT: unsigned %s bundle accepted (no signing keys are pinned)", kind
                )
                return
            raise ShareFileError(
                f"the {kind} bundle is not signed, and this enclave accepts only bundles "
                f"signed by its {len(self.signing_keys)} pinned key(s) ([bundles] in enclave.toml)",
                reason="bundle_unsigned",
            )
        if self.signing_keys is not None and not self._accepts_signer(header, signature.public_key):
            raise ShareFileError(
                f"the {kind} bundle is signed by {signature.public_key.hex()}, which is not one "
                f"of the {len(self.signing_keys)} pinned key(s) ([bundles] in enclave.toml)",
                reason="bundle_signer_unknown",
            )
        if not signature.verifies(digest):
            raise ShareFileError(
                f"the {kind} bundle's signature by {signature.public_key.hex()} does not verify "
                "over its fingerprint (a tampered signature or bundle)",
                reason="bundle_signature_invalid",
            )


def bundle_kind(header: dict[str, Any]) -> str:
    """The header's ``kind`` (a bundle sealed before kinds existed is a ``base``)."""
    kind = header.get("kind", KIND_BASE)
    return str(kind)


# ---------------------------------------------------------------------------------------------
# The ceremony key file


_HEX64 = re.compile(r"[0-9a-f]{64}")


class CeremonyKey:
    """An Ed25519 ceremony signing key held in a local file (the offline alternative to KMS).

    File: ``{"format": "trio-sign/ceremony-key", "version": 1, "public_key": <64 hex>,
    "seed": <64 hex>}``, mode 0600, written atomically (``trio-sign shares ceremony-key
    generate --out FILE``). The secret key lives in a ``bytearray`` that :meth:`close` zeroes;
    the hex text read from the file passes through immutable ``str``/``bytes`` CPython cannot
    zero, so keep the file (and the machine) offline.
    """

    def __init__(self, secret_key: bytearray) -> None:
        if len(secret_key) != _SECRET_KEY_BYTES:
            raise SigningError("an Ed25519 secret key is 64 bytes")
        self._sk = secret_key
        self._pk = bytes(secret_key[_SEED_BYTES:])
        self._closed = False

    def __repr__(self) -> str:
        return f"CeremonyKey(public_key={self._pk.hex()}, secret=<secret>)"

    @property
    def public_key(self) -> bytes:
        return self._pk

    @classmethod
    def from_seed(cls, seed: bytes | bytearray | memoryview) -> CeremonyKey:
        """The key for a 32-byte seed (the caller zeroes its seed)."""
        if len(seed) != _SEED_BYTES:
            raise SigningError("an Ed25519 seed is 32 bytes")
        sk = bytearray(_SECRET_KEY_BYTES)
        pk = bytearray(PUBLIC_KEY_BYTES)
        lib.crypto_sign_seed_keypair(
            ffi.from_buffer(pk), ffi.from_buffer(sk, require_writable=True), ffi.from_buffer(seed)
        )
        return cls(sk)

    @classmethod
    def generate(cls) -> CeremonyKey:
        """A fresh random key."""
        seed = bytearray(_SEED_BYTES)
        try:
            _sodium.random_bytes(seed)
            return cls.from_seed(seed)
        finally:
            _sodium.memzero(seed)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file (mode 0600, atomically); refuses to overwrite."""
        self._check_open()
        seed = self._sk[:_SEED_BYTES]
        try:
            text = json.dumps(
                {
                    "format": CEREMONY_KEY_FORMAT,
                    "version": CEREMONY_KEY_VERSION,
                    "public_key": self._pk.hex(),
                    "seed": seed.hex(),
                },
                sort_keys=True,
            ).encode("ascii")
        finally:
            _sodium.memzero(seed)
        try:
            with atomic_file(Path(path)) as f:
                f.write(text + b"\n")
        except FileExistsError:
            raise SigningError(
                f"refusing to overwrite existing key file {os.fspath(path)}"
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CeremonyKey:
        """Read a key file made by :meth:`save`; its public key must match its seed."""
        where = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise SigningError(f"cannot read ceremony key file {where}: {exc.strerror}") from None
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SigningError(f"ceremony key file {where} is not valid JSON") from None
        if (
            len(raw) > _MAX_KEY_FILE_BYTES
            or not isinstance(obj, dict)
            or obj.get("format") != CEREMONY_KEY_FORMAT
            or type(obj.get("version")) is not int
            or obj.get("version") != CEREMONY_KEY_VERSION
            or set(obj) != {"format", "version", "public_key", "seed"}
        ):
            raise SigningError(
                f"{where} is not a {CEREMONY_KEY_FORMAT} version {CEREMONY_KEY_VERSION} file"
            )
        pk_hex, seed_hex = obj["public_key"], obj["seed"]
        if not isinstance(pk_hex, str) or _HEX64.fullmatch(pk_hex) is None:
            raise SigningError(f"ceremony key file {where}: public_key must be 64 lowercase hex")
        if not isinstance(seed_hex, str) or _HEX64.fullmatch(seed_hex) is None:
            raise SigningError(f"ceremony key file {where}: seed must be 64 lowercase hex")
        seed = bytearray.fromhex(seed_hex)
        try:
            key = cls.from_seed(seed)
        finally:
            _sodium.memzero(seed)
        if key.public_key.hex() != pk_hex:
            key.close()
            raise SigningError(f"ceremony key file {where}: public_key does not match its seed")
        return key

    def sign_digest(self, digest: bytes) -> bytes:
        self._check_open()
        signed = bytearray(SIGNATURE_BYTES + len(digest))  # sig ‖ message (libsodium)
        lib.crypto_sign(
            ffi.from_buffer(signed, require_writable=True),
            ffi.NULL,
            ffi.from_buffer(digest),
            len(digest),
            ffi.from_buffer(self._sk),
        )
        return bytes(signed[:SIGNATURE_BYTES])

    def close(self) -> None:
        """Zero the secret key. Idempotent; later signing raises ``SigningError``."""
        _sodium.memzero(self._sk)
        self._closed = True

    def __enter__(self) -> CeremonyKey:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SigningError("the ceremony key is closed")
