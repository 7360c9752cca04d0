"""Approvals the gateway attaches to every ``Sign`` (DESIGN §11), as a policy service would.

The enclave signs only when a request's approvals satisfy the account's policy in its measured
configuration (``[approvers]``, ``[policies]``). An approval is a signature by an approver key
over the payload of :func:`trio_sign.authz.approval_payload` (account, session, SHA-256 of the
message, expiry). This module is the signing side:

* :class:`ApproverSigningKey`: one approver's private key (Ed25519 or P-256) in a key file;
* :class:`GatewayApprover`: the keys ``gateway.toml`` ``[approvers]`` gives this gateway, with
  its automatic policy (approve every request for an account matching ``accounts``, expiring
  ``lifetime_s`` from now);
* :class:`Approval`: one approval as the gateway sends it, and as the sign API takes it from a
  caller (JSON ``{"key_id", "signature_hex", "expires_at_unix_ms"}``, or the whole object
  ``trio-sign approver approve`` prints).

Key file (JSON, mode 0600; a file that its group or others may read is refused), the format
``trio-sign approver keygen`` writes::

    {"format": "trio-sign/approver-key", "version": 1, "key_id": "ops-1",
     "type": "ed25519" | "p256", "public_key": "<hex>", "private_key": "<hex>"}

``public_key`` is what ``enclave.toml`` ``[approvers.<key_id>] public_key`` pins (32 bytes for
Ed25519, 65 bytes uncompressed SEC1 for P-256); ``private_key`` is the Ed25519 seed or the
P-256 scalar (32 bytes, big-endian). ``gateway.toml`` names each key's id too; a file whose
``key_id`` says otherwise is refused (one of the two is a mistake).

Secrets: the Ed25519 secret key lives in a ``bytearray`` that :meth:`ApproverSigningKey.close`
zeroes; a P-256 key lives in ``cryptography``'s OpenSSL object, freed (not zeroed by us) when
closed. The hex text read from a file passes through immutable ``str``/``bytes`` CPython cannot
zero. Nothing here logs, and no repr shows a private key.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from nacl._sodium import ffi, lib

from proto_min import sign_service_pb2 as pb

from .._atomic import atomic_file
from .._errors import TrioSignError
from ..authz import KEY_TYPES, ApproverKey, ApproverKeyError, approval_payload
from ..authz._keys import KEY_ID_PATTERN
from ..crypto import _sodium

APPROVER_KEY_FORMAT: Final = "trio-sign/approver-key"
APPROVER_KEY_VERSION: Final = 1
#: Default lifetime of an approval the gateway makes (the enclave's ``[limits]
#: approval_max_lifetime_s`` is the longest it accepts, 600 s by default).
DEFAULT_APPROVAL_LIFETIME_S: Final = 60.0
_MAX_KEY_FILE_BYTES: Final = 4096
_SCALAR_BYTES: Final = 32
_SECRET_KEY_BYTES: Final = 64
_P256_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_FILE_KEYS: Final = frozenset({"format", "version", "type", "public_key", "private_key"})
#: What ``trio-sign approver approve`` prints besides an approval's three fields: informative,
#: accepted in ``POST /v1/sign`` (``account_id``/``session_id`` are checked against the request).
APPROVAL_INFO_FIELDS: Final = frozenset(
    {"type", "account_id", "session_id", "message_sha256", "signature_base64", "payload_hex"}
)
_APPROVAL_FIELDS: Final = frozenset({"key_id", "signature_hex", "expires_at_unix_ms"})


class ApproverKeyFileError(TrioSignError):
    """An approver key file could not be made, read or used (one line naming the file; never
    the key)."""


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval (the ``Approval`` message of DESIGN §4).

    Attributes:
        key_id: the approver's key id in the enclave's ``[approvers]``.
        signature: 64 bytes (Ed25519, or P-256 ``r || s``).
        expires_at_unix_ms: when it stops being valid (Unix time, milliseconds).
    """

    key_id: str
    signature: bytes
    expires_at_unix_ms: int

    def to_proto(self) -> pb.Approval:
        return pb.Approval(
            key_id=self.key_id,
            signature=self.signature,
            expires_at_unix_ms=self.expires_at_unix_ms,
        )

    def to_json(self) -> dict[str, Any]:
        """``{"key_id", "signature_hex", "expires_at_unix_ms"}``: what ``POST /v1/sign`` takes."""
        return {
            "key_id": self.key_id,
            "signature_hex": self.signature.hex(),
            "expires_at_unix_ms": self.expires_at_unix_ms,
        }

    @classmethod
    def from_json(
        cls, obj: object, *, account_id: str | None = None, session_id: str | None = None
    ) -> Approval:
        """Parse one approval of a ``POST /v1/sign`` body (shape only: the enclave verifies).
        The informative fields ``trio-sign approver approve`` prints may come along; when
        ``account_id`` or ``session_id`` is among them it must be the request's.

        Raises:
            ValueError: naming the field that is wrong.
        """
        if (
            not isinstance(obj, dict)
            or not set(obj) >= _APPROVAL_FIELDS
            or not set(obj) <= _APPROVAL_FIELDS | APPROVAL_INFO_FIELDS
        ):
            raise ValueError(
                'an approval is {"key_id": str, "signature_hex": hex, "expires_at_unix_ms": int}'
                " (and what trio-sign approver approve prints)"
            )
        for name, expected in (("account_id", account_id), ("session_id", session_id)):
            if name in obj and expected is not None and obj[name] != expected:
                raise ValueError(
                    f"an approval names {name} {obj[name]!r}, not this request's {expected!r}"
                )
        key_id, signature_hex, expires = (
            obj["key_id"],
            obj["signature_hex"],
            obj["expires_at_unix_ms"],
        )
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
            raise ValueError("an approval's key_id must be a key id (A-Z a-z 0-9 . _ : @ -)")
        if not isinstance(signature_hex, str) or len(signature_hex) != 128:
            raise ValueError("an approval's signature_hex must be 128 hex digits (64 bytes)")
        try:
            signature = bytes.fromhex(signature_hex)
        except ValueError:
            raise ValueError("an approval's signature_hex is not hex") from None
        if type(expires) is not int or not -(2**63) <= expires < 2**63:
            raise ValueError("an approval's expires_at_unix_ms must be an int64 (Unix ms)")
        return cls(key_id, signature, expires)


class ApproverSigningKey:
    """One approver's private key (Ed25519 or P-256). Use it as a context manager, or
    :meth:`close` it: the Ed25519 secret is zeroed then.

    Build with :meth:`generate` or :meth:`load`; :meth:`save` writes the key file (0600).
    """

    def __init__(
        self,
        type: str,
        public_key: bytes,
        *,
        ed25519_secret: bytearray | None = None,
        p256: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        if type not in KEY_TYPES:
            raise ApproverKeyFileError(f"unknown approver key type {type!r}")
        self.type = type
        self.public_key = bytes(public_key)
        self._ed25519 = ed25519_secret
        self._p256 = p256
        self._closed = False
        #: the key id its file names (set by :meth:`load` and :meth:`save`), else None
        self.key_id: str | None = None

    def __repr__(self) -> str:
        return f"ApproverSigningKey({self.type}, public_key={self.public_key.hex()}, <secret>)"

    # -- making and storing ----------------------------------------------------------------------

    @classmethod
    def generate(cls, type: str = "ed25519") -> ApproverSigningKey:
        """A fresh random key of ``type`` (``"ed25519"`` or ``"p256"``)."""
        if type == "ed25519":
            seed = bytearray(_SCALAR_BYTES)
            try:
                _sodium.random_bytes(seed)
                return cls._from_ed25519_seed(seed)
            finally:
                _sodium.memzero(seed)
        if type == "p256":
            return cls._from_p256(ec.generate_private_key(ec.SECP256R1()))
        raise ApproverKeyFileError(f"unknown approver key type {type!r} (known: ed25519, p256)")

    @classmethod
    def _from_ed25519_seed(cls, seed: bytearray) -> ApproverSigningKey:
        sk = bytearray(_SECRET_KEY_BYTES)
        pk = bytearray(32)
        lib.crypto_sign_seed_keypair(
            ffi.from_buffer(pk), ffi.from_buffer(sk, require_writable=True), ffi.from_buffer(seed)
        )
        return cls("ed25519", bytes(pk), ed25519_secret=sk)

    @classmethod
    def _from_p256(cls, key: ec.EllipticCurvePrivateKey) -> ApproverSigningKey:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        public = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return cls("p256", public, p256=key)

    def save(self, path: str | os.PathLike[str], *, key_id: str) -> None:
        """Write the key file for ``key_id`` (mode 0600, atomically); refuses to overwrite."""
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise ApproverKeyFileError(f"key id {key_id!r} is not a valid approver key id")
        self._check_open()
        if self._ed25519 is not None:
            secret = bytearray(self._ed25519[:_SCALAR_BYTES])
        else:
            assert self._p256 is not None
            value = self._p256.private_numbers().private_value
            secret = bytearray(value.to_bytes(_SCALAR_BYTES, "big"))
        try:
            text = json.dumps(
                {
                    "format": APPROVER_KEY_FORMAT,
                    "version": APPROVER_KEY_VERSION,
                    "key_id": key_id,
                    "type": self.type,
                    "public_key": self.public_key.hex(),
                    "private_key": secret.hex(),
                },
                sort_keys=True,
            ).encode("ascii")
        finally:
            _sodium.memzero(secret)
        try:
            with atomic_file(Path(path)) as f:
                f.write(text + b"\n")
        except FileExistsError:
            raise ApproverKeyFileError(
                f"refusing to overwrite existing approver key file {os.fspath(path)}"
            ) from None
        self.key_id = key_id

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, key_id: str | None = None) -> ApproverSigningKey:
        """Read a key file made by :meth:`save` or ``trio-sign approver keygen``. Blocking.

        Raises:
            ApproverKeyFileError: the file cannot be read, its group or others may read or
                write it (``chmod 600``), it is not an approver key file, its ``key_id`` is not
                ``key_id`` (when given), or its public key does not match its private key. The
                message names the file, never the key.
        """
        where = os.fspath(path)
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                raw = f.read(_MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise ApproverKeyFileError(
                f"cannot read approver key file {where}: {exc.strerror}"
            ) from None
        if stat.S_IMODE(mode) & 0o077:
            raise ApproverKeyFileError(
                f"approver key file {where} is mode {stat.S_IMODE(mode):04o}: a private key "
                "must be readable by its owner only (chmod 600)"
            )
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApproverKeyFileError(f"approver key file {where} is not valid JSON") from None
        if (
            len(raw) > _MAX_KEY_FILE_BYTES
            or not isinstance(obj, dict)
            or set(obj) - {"key_id"} != _FILE_KEYS
            or obj.get("format") != APPROVER_KEY_FORMAT
            or type(obj.get("version")) is not int
            or obj.get("version") != APPROVER_KEY_VERSION
        ):
            raise ApproverKeyFileError(
                f"{where} is not a {APPROVER_KEY_FORMAT} version {APPROVER_KEY_VERSION} file "
                "(not a trio-sign approver key: trio-sign approver keygen makes them)"
            )
        kind, pk_hex, sk_hex = obj["type"], obj["public_key"], obj["private_key"]
        named = obj.get("key_id")
        if named is not None and (not isinstance(named, str) or named != (key_id or named)):
            raise ApproverKeyFileError(
                f"approver key file {where} is the key of {named!r}, not {key_id!r}"
            )
        if kind not in KEY_TYPES:
            raise ApproverKeyFileError(
                f"approver key file {where}: type must be one of {', '.join(KEY_TYPES)}"
            )
        if not isinstance(sk_hex, str) or len(sk_hex) != 2 * _SCALAR_BYTES:
            raise ApproverKeyFileError(
                f"approver key file {where}: private_key must be 64 hex digits"
            )
        if not isinstance(pk_hex, str):
            raise ApproverKeyFileError(f"approver key file {where}: public_key must be hex")
        try:
            secret = bytearray.fromhex(sk_hex)
        except ValueError:
            raise ApproverKeyFileError(
                f"approver key file {where}: private_key is not hex"
            ) from None
        try:
            if kind == "ed25519":
                key = cls._from_ed25519_seed(secret)
            else:
                scalar = int.from_bytes(secret, "big")
                if not 0 < scalar < _P256_N:
                    raise ApproverKeyFileError(
                        f"approver key file {where}: private_key is not a P-256 scalar"
                    )
                key = cls._from_p256(ec.derive_private_key(scalar, ec.SECP256R1()))
        finally:
            _sodium.memzero(secret)
        if key.public_key.hex() != pk_hex.lower():
            key.close()
            raise ApproverKeyFileError(
                f"approver key file {where}: public_key does not match its private key"
            )
        key.key_id = named if named is not None else key_id
        return key

    # -- using -----------------------------------------------------------------------------------

    def verifier(self, key_id: str) -> ApproverKey:
        """The public side, as the enclave's ``[approvers.<key_id>]`` holds it."""
        try:
            return ApproverKey.create(key_id, self.type, self.public_key)
        except ApproverKeyError as exc:
            raise ApproverKeyFileError(str(exc)) from None

    def enclave_toml(self, key_id: str) -> str:
        """The ``[approvers.<key_id>]`` table that pins this key in ``enclave.toml``."""
        return (
            f'[approvers.{key_id}]\ntype = "{self.type}"\npublic_key = "{self.public_key.hex()}"\n'
        )

    def sign(self, payload: bytes) -> bytes:
        """The 64-byte signature of ``payload``: Ed25519 (RFC 8032) or P-256 ECDSA with
        SHA-256 as ``r || s`` (big-endian, 32 bytes each)."""
        self._check_open()
        if self._ed25519 is not None:
            signed = bytearray(64 + len(payload))  # signature || message (libsodium)
            lib.crypto_sign(
                ffi.from_buffer(signed, require_writable=True),
                ffi.NULL,
                ffi.from_buffer(payload),
                len(payload),
                ffi.from_buffer(self._ed25519),
            )
            return bytes(signed[:64])
        assert self._p256 is not None
        r, s = decode_dss_signature(self._p256.sign(payload, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def approve(
        self,
        key_id: str,
        *,
        account_id: str,
        session_id: str,
        message: bytes,
        expires_at_unix_ms: int,
    ) -> Approval:
        """Approve ``session_id`` of ``account_id`` signing ``message`` until the expiry."""
        payload = approval_payload(account_id, session_id, message, expires_at_unix_ms)
        return Approval(key_id, self.sign(payload), expires_at_unix_ms)

    def close(self) -> None:
        """Zero the Ed25519 secret (drop the P-256 key). Idempotent; later signing raises."""
        if self._ed25519 is not None:
            _sodium.memzero(self._ed25519)
        self._p256 = None
        self._closed = True

    def __enter__(self) -> ApproverSigningKey:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ApproverKeyFileError("this approver key was closed")


class GatewayApprover:
    """The approver keys a gateway holds and its automatic policy: every request for an account
    that matches one of ``accounts`` (``fnmatch`` patterns; ``"*"`` is every account) gets one
    approval per key, expiring ``lifetime_s`` from now.

    Args:
        keys: key id -> signing key (owned from here: :meth:`close` closes them).
        lifetime_s: how long an approval is valid; at most the enclave's
            ``approval_max_lifetime_s`` (600 s by default) or the enclave refuses it as
            ``future_dated``.
        accounts: the account patterns this gateway approves; other accounts get no approval
            from it (their caller must bring enough).
        wall_clock_ms: Unix time in milliseconds (tests pin it).

    Holding approver keys lets this gateway approve on its own: with a policy whose threshold
    its keys meet, a compromised gateway can sign. Give it fewer keys than the threshold (the
    rest from callers, ``POST /v1/sign`` ``approvals``) to keep an independent check.
    """

    def __init__(
        self,
        keys: Mapping[str, ApproverSigningKey],
        *,
        lifetime_s: float = DEFAULT_APPROVAL_LIFETIME_S,
        accounts: Sequence[str] = ("*",),
        wall_clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        if not lifetime_s > 0:
            raise ValueError("lifetime_s must be positive")
        for key_id in keys:
            if not KEY_ID_PATTERN.fullmatch(key_id):
                raise ValueError(f"key id {key_id!r} is not a valid approver key id")
        self._keys = dict(keys)
        self.lifetime_ms = round(lifetime_s * 1000)
        self.accounts = tuple(accounts)
        self._wall_clock_ms = wall_clock_ms
        self.approvals_made = 0

    def __repr__(self) -> str:
        return (
            f"GatewayApprover(keys={sorted(self._keys)!r}, lifetime_ms={self.lifetime_ms}, "
            f"accounts={list(self.accounts)!r})"
        )

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def covers(self, account_id: str) -> bool:
        """Whether this gateway approves requests for ``account_id``."""
        return any(fnmatch.fnmatchcase(account_id, p) for p in self.accounts)

    def approve(
        self, account_id: str, session_id: str, message: bytes, *, skip: Iterable[str] = ()
    ) -> list[Approval]:
        """This gateway's approvals for one session (none if ``account_id`` is not covered),
        leaving out the key ids in ``skip`` (approvals the caller already brought: one key
        counts once, and the enclave refuses a duplicate)."""
        if not self.covers(account_id):
            return []
        leave_out = set(skip)
        expires = self._wall_clock_ms() + self.lifetime_ms
        out = [
            key.approve(
                key_id,
                account_id=account_id,
                session_id=session_id,
                message=message,
                expires_at_unix_ms=expires,
            )
            for key_id, key in self._keys.items()
            if key_id not in leave_out
        ]
        self.approvals_made += len(out)
        return out

    @classmethod
    def load(
        cls,
        files: Mapping[str, Path],
        *,
        lifetime_s: float = DEFAULT_APPROVAL_LIFETIME_S,
        accounts: Sequence[str] = ("*",),
    ) -> GatewayApprover:
        """Load every key file (key id -> path). Blocking: run it in a thread.

        Raises:
            ApproverKeyFileError: a file was refused (keys already loaded are closed).
        """
        keys: dict[str, ApproverSigningKey] = {}
        try:
            for key_id, path in files.items():
                keys[key_id] = ApproverSigningKey.load(path, key_id=key_id)
        except BaseException:
            for key in keys.values():
                key.close()
            raise
        return cls(keys, lifetime_s=lifetime_s, accounts=accounts)

    def close(self) -> None:
        """Close (zero) every key. Idempotent."""
        for key in self._keys.values():
            key.close()
