"""Key persistence for the local KMS: a JSON file of keys (development only).

File (mode 0600, rewritten atomically on every change)::

    {"format": "trio-sign/kms-local-keys", "version": 1,
     "account": "111122223333", "region": "us-east-1",
     "keys": [{"key_id": "<uuid4>", "material": "<64 hex>", "created": <epoch seconds>,
               "description": "...", "enabled": true,
               "key_spec": "SYMMETRIC_DEFAULT" | "ECC_NIST_EDWARDS25519"}, ...],
     "aliases": {"alias/<name>": "<uuid4>", ...}}      (optional)

``key_spec`` is optional (files written before asymmetric keys existed hold symmetric keys).
A ``SYMMETRIC_DEFAULT`` key's material is its 32-byte AES-256-equivalent key (XChaCha20-Poly1305
here); an ``ECC_NIST_EDWARDS25519`` key's material is its 32-byte Ed25519 seed (RFC 8032), used
for ``Sign`` and ``GetPublicKey``.

Key material lives in ``bytearray`` objects that :meth:`KeyStore.close` zeroes. The hex text read
from and written to the file passes through immutable ``str`` objects CPython cannot zero, and
the file itself holds the keys in clear: it stands in for an HSM, so protect it accordingly.

Thread safety: one lock guards the key table and the file, so the server's worker threads can
share a store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .._errors import TrioSignError
from ..crypto import _sodium

KEYS_FORMAT: Final = "trio-sign/kms-local-keys"
KEYS_VERSION: Final = 1
#: The account and region the local KMS puts in its ARNs.
DEFAULT_ACCOUNT: Final = "111122223333"
DEFAULT_REGION: Final = "us-east-1"
#: Refuse key files larger than this (about 40,000 keys).
MAX_KEYS_FILE_BYTES: Final = 8 * 1024 * 1024
KEY_BYTES: Final = 32
SYMMETRIC_DEFAULT: Final = "SYMMETRIC_DEFAULT"
ED25519_SPEC: Final = "ECC_NIST_EDWARDS25519"
KEY_SPECS: Final = (SYMMETRIC_DEFAULT, ED25519_SPEC)

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: KMS alias names: ``alias/`` then 1 to 250 of ``[A-Za-z0-9/_-]``; ``alias/aws/`` is reserved.
_ALIAS = re.compile(r"alias/[A-Za-z0-9/_-]{1,250}")
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


class KeyStoreError(TrioSignError):
    """The local KMS key file could not be read, parsed or written."""


@dataclass(eq=False)
class LocalKey:
    """One KMS key (symmetric, or an Ed25519 signing key). ``material`` is secret;
    :meth:`zero` wipes it."""

    key_id: str
    arn: str
    material: bytearray = field(repr=False)
    created: float
    description: str = ""
    enabled: bool = True
    key_spec: str = SYMMETRIC_DEFAULT

    @property
    def signing(self) -> bool:
        """An asymmetric signing key (``SIGN_VERIFY``), not an encryption key."""
        return self.key_spec != SYMMETRIC_DEFAULT

    def zero(self) -> None:
        _sodium.memzero(self.material)

    def __repr__(self) -> str:
        return f"LocalKey(key_id={self.key_id!r}, material=<secret>)"


def is_key_id(text: str) -> bool:
    """True if ``text`` looks like a KMS key id (a lowercase UUID)."""
    return _UUID.fullmatch(text) is not None


def is_alias_name(text: str) -> bool:
    """True if ``text`` is a valid alias name a customer may create (``alias/...``, not
    ``alias/aws/...``)."""
    return _ALIAS.fullmatch(text) is not None and not text.startswith("alias/aws/")


class KeyStore:
    """The local KMS's keys, persisted in a JSON file (created if missing).

    Args:
        path: the key file; created (mode 0600, with no keys) if it does not exist.
        account: the account id used in ARNs of a new file.
        region: the region used in ARNs of a new file.

    Error handling:
        :class:`KeyStoreError` for an unreadable, malformed or group/other-readable file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        account: str = DEFAULT_ACCOUNT,
        region: str = DEFAULT_REGION,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys: dict[str, LocalKey] = {}
        self._aliases: dict[str, str] = {}  # alias name -> key id
        self.account = account
        self.region = region
        if self.path.exists():
            self._load()
        else:
            self._save()

    def arn_for(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def resolve(self, key_ref: str) -> LocalKey | None:
        """The key named by a key id, key ARN, alias name or alias ARN (of this account and
        region), else None."""
        key_id = key_ref
        arn_prefix = f"arn:aws:kms:{self.region}:{self.account}:"
        if key_ref.startswith("arn:"):
            if not key_ref.startswith(arn_prefix):
                return None
            key_id = key_ref[len(arn_prefix) :]
            if key_id.startswith("key/"):
                key_id = key_id[len("key/") :]
            elif not key_id.startswith("alias/"):
                return None
        with self._lock:
            if key_id.startswith("alias/"):
                target = self._aliases.get(key_id)
                return None if target is None else self._keys.get(target)
            return self._keys.get(key_id)

    def create_alias(self, alias_name: str, key_id: str) -> None:
        """Point ``alias_name`` at the key ``key_id`` (persisted).

        Raises:
            ValueError: an invalid or reserved alias name, or an unknown key.
            KeyError: the alias exists already (KMS's ``AlreadyExistsException``).
        """
        if not is_alias_name(alias_name):
            raise ValueError(f"{alias_name!r} is not a valid alias name (alias/...)")
        with self._lock:
            if key_id not in self._keys:
                raise ValueError(f"key {key_id} does not exist")
            if alias_name in self._aliases:
                raise KeyError(alias_name)
            self._aliases[alias_name] = key_id
            try:
                self._save_locked()
            except BaseException:
                del self._aliases[alias_name]
                raise

    def create(self, *, description: str = "", key_spec: str = SYMMETRIC_DEFAULT) -> LocalKey:
        """A new random key (32 random bytes: a symmetric key or an Ed25519 seed), persisted
        before it is returned."""
        if key_spec not in KEY_SPECS:
            raise ValueError(f"key_spec must be one of {KEY_SPECS}")
        material = bytearray(KEY_BYTES)
        _sodium.random_bytes(material)
        key_id = str(uuid.uuid4())
        key = LocalKey(
            key_id, self.arn_for(key_id), material, time.time(), description, key_spec=key_spec
        )
        with self._lock:
            self._keys[key_id] = key
            try:
                self._save_locked()
            except BaseException:
                del self._keys[key_id]
                key.zero()
                raise
        return key

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def close(self) -> None:
        """Zero every key's material (idempotent)."""
        with self._lock:
            for key in self._keys.values():
                key.zero()
            self._keys.clear()

    # -- file I/O --------------------------------------------------------------------------------

    def _bad(self, message: str) -> KeyStoreError:
        return KeyStoreError(f"local KMS key file {self.path}: {message}")

    def _load(self) -> None:
        try:
            st = self.path.stat()
            if st.st_mode & 0o077:
                raise self._bad("is readable by group or others; chmod 600 it")
            with self.path.open("rb") as f:
                raw = f.read(MAX_KEYS_FILE_BYTES + 1)
        except OSError as exc:
            raise self._bad(f"cannot read it: {exc.strerror}") from None
        if len(raw) > MAX_KEYS_FILE_BYTES:
            raise self._bad(f"larger than {MAX_KEYS_FILE_BYTES} bytes")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._bad("not valid JSON") from None
        if (
            not isinstance(obj, dict)
            or obj.get("format") != KEYS_FORMAT
            or type(obj.get("version")) is not int
            or obj["version"] != KEYS_VERSION
        ):
            raise self._bad(f"not a {KEYS_FORMAT} version {KEYS_VERSION} file")
        account, region, keys = obj.get("account"), obj.get("region"), obj.get("keys")
        if not isinstance(account, str) or not re.fullmatch(r"[0-9]{12}", account):
            raise self._bad("account must be 12 digits")
        if not isinstance(region, str) or not re.fullmatch(r"[a-z0-9-]{1,32}", region):
            raise self._bad("region must be a region name")
        if not isinstance(keys, list):
            raise self._bad("keys must be a list")
        self.account, self.region = account, region
        loaded: dict[str, LocalKey] = {}
        try:
            for i, entry in enumerate(keys):
                loaded_key = self._parse_key(i, entry)
                if loaded_key.key_id in loaded:
                    raise self._bad(f"keys[{i}]: duplicate key_id {loaded_key.key_id}")
                loaded[loaded_key.key_id] = loaded_key
        except BaseException:
            for k in loaded.values():
                k.zero()
            raise
        aliases = obj.get("aliases", {})
        if not isinstance(aliases, dict) or not all(
            isinstance(name, str)
            and is_alias_name(name)
            and isinstance(target, str)
            and target in loaded
            for name, target in aliases.items()
        ):
            for k in loaded.values():
                k.zero()
            raise self._bad("aliases must map alias/... names to key ids in this file")
        self._keys = loaded
        self._aliases = dict(aliases)

    def _parse_key(self, i: int, entry: Any) -> LocalKey:
        if not isinstance(entry, dict):
            raise self._bad(f"keys[{i}] is not an object")
        key_id, material = entry.get("key_id"), entry.get("material")
        created, description = entry.get("created"), entry.get("description", "")
        enabled = entry.get("enabled", True)
        key_spec = entry.get("key_spec", SYMMETRIC_DEFAULT)
        if key_spec not in KEY_SPECS:
            raise self._bad(f"keys[{i}].key_spec must be one of {', '.join(KEY_SPECS)}")
        if not isinstance(key_id, str) or not is_key_id(key_id):
            raise self._bad(f"keys[{i}].key_id must be a lowercase UUID")
        if not isinstance(material, str) or _HEX_KEY.fullmatch(material) is None:
            raise self._bad(f"keys[{i}].material must be 64 lowercase hex digits")
        if not isinstance(created, int | float) or isinstance(created, bool):
            raise self._bad(f"keys[{i}].created must be a number (epoch seconds)")
        if not isinstance(description, str) or not isinstance(enabled, bool):
            raise self._bad(f"keys[{i}]: description must be a string, enabled a boolean")
        return LocalKey(
            key_id,
            self.arn_for(key_id),
            bytearray.fromhex(material),
            float(created),
            description,
            enabled,
            key_spec,
        )

    def _save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        doc: dict[str, Any] = {
            "format": KEYS_FORMAT,
            "version": KEYS_VERSION,
            "account": self.account,
            "region": self.region,
            "keys": [
                {
                    "key_id": k.key_id,
                    "material": k.material.hex(),
                    "created": k.created,
                    "description": k.description,
                    "enabled": k.enabled,
                    **({"key_spec": k.key_spec} if k.signing else {}),
                }
                for k in self._keys.values()
            ],
        }
        if self._aliases:
            doc["aliases"] = dict(self._aliases)
        data = json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n"
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._bad(f"cannot write it: {exc.strerror}") from None
