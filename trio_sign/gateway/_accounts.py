"""The gateway's public account registry: who holds each account's other shares.

The gateway holds no share (DESIGN §15). To coordinate a signature it needs, per account, only
public data: the suite, the group key, the threshold, and for each remote participant holding
a share its participant id, FROST identifier and verifying share (to check its signature
share and name it when it is wrong). :class:`AccountRegistry` keeps that, durably, in one
JSON Lines file (``[accounts] registry``, default ``accounts.jsonl`` next to gateway.toml)::

    {"v": 1, "account_id": "...", "ciphersuite": "FROST-ED25519-SHA512-v1",
     "group_public_key": "<hex>", "min_signers": 2, "max_signers": 3, "policy": "default",
     "source": "dkg" | "import",
     "participants": [{"participant_id": "ops-1", "identifier": "<hex 32>",
                       "verifying_share": "<hex>"}, ...]}

A line is appended (and fsynced) when an account is created by DKG with remote participants
(:class:`~trio_sign.gateway.DkgDriver`), or written by an operator for an imported account
(``source = "import"``: the same fields, one line per account; the gateway reads the file at
start). A later line for the same account replaces the earlier one (a refresh keeps the
group key but changes the verifying shares). A last line cut short by a crash is dropped at
open: the account it named was not yet reported created. Nothing here is secret.

Error handling: :class:`AccountRegistryError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .._atomic import fsync_directory
from .._errors import TrioSignError
from ..crypto import scheme_by_name

log = logging.getLogger("trio_sign.gateway.accounts")

REGISTRY_VERSION: Final = 1
DEFAULT_REGISTRY: Final = "accounts.jsonl"
_KEYS: Final = frozenset(
    {
        "v",
        "account_id",
        "ciphersuite",
        "group_public_key",
        "min_signers",
        "max_signers",
        "policy",
        "source",
        "participants",
    }
)
_PARTICIPANT_KEYS: Final = frozenset({"participant_id", "identifier", "verifying_share"})


class AccountRegistryError(TrioSignError):
    """The registry file is unreadable or holds an invalid entry (named by line)."""


@dataclass(frozen=True, slots=True)
class RemoteHolder:
    """One remote participant's part of an account (public)."""

    participant_id: str
    identifier: bytes
    verifying_share: bytes


@dataclass(frozen=True, slots=True)
class RegisteredAccount:
    """An account whose other shares remote participants hold (public data only)."""

    account_id: str
    ciphersuite: str
    group_public_key: bytes
    min_signers: int
    max_signers: int
    holders: tuple[RemoteHolder, ...]
    policy: str = "default"
    source: str = "dkg"

    def to_json(self) -> dict[str, Any]:
        return {
            "v": REGISTRY_VERSION,
            "account_id": self.account_id,
            "ciphersuite": self.ciphersuite,
            "group_public_key": self.group_public_key.hex(),
            "min_signers": self.min_signers,
            "max_signers": self.max_signers,
            "policy": self.policy,
            "source": self.source,
            "participants": [
                {
                    "participant_id": h.participant_id,
                    "identifier": h.identifier.hex(),
                    "verifying_share": h.verifying_share.hex(),
                }
                for h in self.holders
            ],
        }

    @classmethod
    def from_json(cls, obj: object, *, where: str = "entry") -> RegisteredAccount:
        """One entry, every field checked (the suite known, the sizes its own)."""

        def bad(what: str) -> AccountRegistryError:
            return AccountRegistryError(f"{where}: {what}")

        if not isinstance(obj, Mapping) or set(obj) != _KEYS:
            raise bad("fields must be exactly " + ", ".join(sorted(_KEYS)))
        if obj["v"] != REGISTRY_VERSION:
            raise bad(f"version {obj['v']!r} (this build reads {REGISTRY_VERSION})")
        account_id, suite = obj["account_id"], obj["ciphersuite"]
        if not isinstance(account_id, str) or not account_id or len(account_id.encode()) > 255:
            raise bad("account_id must be 1..255 UTF-8 bytes")
        try:
            scheme = scheme_by_name(suite)
        except Exception:
            raise bad(f"unknown ciphersuite {str(suite)[:64]!r}") from None
        t, n = obj["min_signers"], obj["max_signers"]
        if type(t) is not int or type(n) is not int or not 2 <= t <= n <= 255:
            raise bad("need 2 <= min_signers <= max_signers <= 255")
        if obj["source"] not in ("dkg", "import") or not isinstance(obj["policy"], str):
            raise bad('source must be "dkg" or "import" and policy a string')
        try:
            group_key = bytes.fromhex(obj["group_public_key"])
            raw = obj["participants"]
            if not isinstance(raw, list) or not raw:
                raise ValueError
            holders = []
            for p in raw:
                if not isinstance(p, Mapping) or set(p) != _PARTICIPANT_KEYS:
                    raise ValueError
                if not isinstance(p["participant_id"], str) or not p["participant_id"]:
                    raise ValueError
                holders.append(
                    RemoteHolder(
                        p["participant_id"],
                        bytes.fromhex(p["identifier"]),
                        bytes.fromhex(p["verifying_share"]),
                    )
                )
        except (TypeError, ValueError):
            raise bad(
                "group_public_key must be hex and participants a non-empty list of "
                '{"participant_id", "identifier", "verifying_share"} (hex)'
            ) from None
        if len(group_key) != scheme.element_size:
            raise bad(f"group_public_key is not a {scheme.name} element")
        for h in holders:
            if len(h.identifier) != 32 or len(h.verifying_share) != scheme.element_size:
                raise bad(f"participant {h.participant_id!r}: identifier or verifying_share size")
        if len({h.identifier for h in holders}) != len(holders) or len(
            {h.participant_id for h in holders}
        ) != len(holders):
            raise bad("two participants share an identifier or an id")
        if len(holders) > n - 1:
            raise bad(f"{len(holders)} remote participants for a {t}-of-{n} account")
        return cls(account_id, suite, group_key, t, n, tuple(holders), obj["policy"], obj["source"])


class AccountRegistry:
    """The registry (see the module docstring). :meth:`open` reads it; :meth:`add` appends
    one entry durably (blocking: call it from a worker thread) and :meth:`note` makes it
    visible (on the event loop, where the coordinator reads)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._accounts: dict[str, RegisteredAccount] = {}
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"AccountRegistry({str(self.path)!r}, accounts={len(self._accounts)})"

    def __len__(self) -> int:
        return len(self._accounts)

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._accounts

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._accounts))

    def get(self, account_id: str) -> RegisteredAccount | None:
        return self._accounts.get(account_id)

    def open(self) -> AccountRegistry:
        """Read the file (created 0600 if absent; a last line cut by a crash dropped). Blocking."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            data = b""
            while chunk := os.read(fd, 1 << 20):
                data += chunk
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                log.warning(
                    "account registry: dropping a line cut short by a crash",
                    extra={"registry": str(self.path)},
                )
                os.ftruncate(fd, keep)
                os.fsync(fd)
                data = data[:keep]
            for lineno, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{self.path} line {lineno}"
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise AccountRegistryError(f"{where}: not JSON") from None
                entry = RegisteredAccount.from_json(obj, where=where)
                self._accounts[entry.account_id] = entry
            if created:
                fsync_directory(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def write(self, account: RegisteredAccount) -> None:
        """Append ``account`` and fsync. Blocking (a worker thread may run it)."""
        if self._fd is None:
            raise AccountRegistryError(f"{self.path}: the registry is not open")
        line = (json.dumps(account.to_json(), separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def note(self, account: RegisteredAccount) -> None:
        """Make ``account`` visible to the coordinator (after :meth:`write`)."""
        self._accounts[account.account_id] = account

    def add(self, account: RegisteredAccount) -> None:
        """:meth:`write` then :meth:`note` (blocking; tests and tools)."""
        self.write(account)
        self.note(account)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


__all__ = [
    "DEFAULT_REGISTRY",
    "AccountRegistry",
    "AccountRegistryError",
    "RegisteredAccount",
    "RemoteHolder",
]
