"""``participant.toml``: what ``trio-sign participant`` (and an application embedding the
library) needs to run a participant. Every key, with its default, in docs/participants.md.

Paths are relative to the file's directory. Parsing is pure (:func:`parse_config`); opening
keys and the store is :func:`open_participant` (blocking: the KDF, KMS, file reads).
"""

from __future__ import annotations

import os
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import TrioSignError
from ..authz._keys import KEY_ID_PATTERN
from ..gateway._approvals import ApproverSigningKey
from . import _messages as m
from ._client import ClientSettings, ParticipantClient
from ._policy import AutoPolicy
from ._store import KeySource, KmsKey, PassphraseKey, SealedShareStore

_TOP = frozenset(
    {
        "participant_id",
        "gateway_url",
        "gateway_id",
        "auth",
        "approver",
        "store",
        "policy",
        "connection",
    }
)
_SECTIONS: Mapping[str, frozenset[str]] = {
    "auth": frozenset({"key_file", "key_id"}),
    "approver": frozenset({"key_file", "key_id"}),
    "store": frozenset(
        {
            "path",
            "passphrase_env",
            "passphrase_file",
            "kms_key_id",
            "kms_region",
            "kms_endpoint_url",
        }
    ),
    "policy": frozenset({"accounts", "max_message_bytes", "rate_per_minute"}),
    "connection": frozenset(
        {
            "ca_file",
            "connect_timeout_s",
            "reconnect_initial_s",
            "reconnect_max_s",
            "max_in_flight",
            "sweep_interval_s",
            "approval_lifetime_s",
            "idle_timeout_s",
        }
    ),
}


class ParticipantConfigError(TrioSignError):
    """``participant.toml`` is wrong (one line naming the key)."""


@dataclass(frozen=True, slots=True)
class ParticipantConfig:
    participant_id: str
    gateway_url: str
    gateway_id: str | None
    auth_key_file: Path
    auth_key_id: str
    approver_key_file: Path
    approver_key_id: str
    store_path: Path
    passphrase_env: str | None
    passphrase_file: Path | None
    kms_key_id: str | None
    kms_region: str | None
    kms_endpoint_url: str | None
    accounts: tuple[str, ...]
    max_message_bytes: int
    rate_per_minute: float | None
    ca_file: Path | None
    connection: Mapping[str, float]


def _section(doc: Mapping[str, Any], name: str, *, required: bool) -> Mapping[str, Any]:
    value = doc.get(name)
    if value is None:
        if required:
            raise ParticipantConfigError(f"[{name}] is missing")
        return {}
    if not isinstance(value, dict):
        raise ParticipantConfigError(f"[{name}] must be a table")
    if unknown := set(value) - _SECTIONS[name]:
        raise ParticipantConfigError(f"[{name}] has unknown key(s) {', '.join(sorted(unknown))}")
    return value


def _str(table: Mapping[str, Any], where: str, key: str, *, required: bool = True) -> str | None:
    value = table.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ParticipantConfigError(f"{where} {key} must be a non-empty string")
    return value


def _key_id(table: Mapping[str, Any], where: str) -> str:
    value = _str(table, where, "key_id")
    assert value is not None
    if not KEY_ID_PATTERN.fullmatch(value):
        raise ParticipantConfigError(f"{where} key_id must be a key id (A-Z a-z 0-9 . _ : @ -)")
    return value


def _num(table: Mapping[str, Any], where: str, key: str, default: float, *, low: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
        raise ParticipantConfigError(f"{where} {key} must be a number >= {low}")
    return float(value)


def parse_config(text: str, *, base: Path) -> ParticipantConfig:
    """Parse ``participant.toml`` (``base``: the directory relative paths start from)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ParticipantConfigError(f"not valid TOML: {exc}") from None
    if unknown := set(doc) - _TOP:
        raise ParticipantConfigError(f"unknown key(s) {', '.join(sorted(unknown))}")
    pid = _str(doc, "", "participant_id")
    assert pid is not None
    if not m._ID.fullmatch(pid):
        raise ParticipantConfigError("participant_id must be an id (A-Z a-z 0-9 . _ : @ -)")
    url = _str(doc, "", "gateway_url")
    assert url is not None
    try:
        ClientSettings(url).endpoint()
    except ValueError as exc:
        raise ParticipantConfigError(str(exc)) from None
    gateway_id = _str(doc, "", "gateway_id", required=False)
    auth = _section(doc, "auth", required=True)
    approver = _section(doc, "approver", required=True)
    store = _section(doc, "store", required=True)
    policy = _section(doc, "policy", required=False)
    conn = _section(doc, "connection", required=False)

    def path(table: Mapping[str, Any], where: str, key: str) -> Path:
        value = _str(table, where, key)
        assert value is not None
        return base / value

    sources = [k for k in ("passphrase_env", "passphrase_file", "kms_key_id") if k in store]
    if len(sources) != 1:
        raise ParticipantConfigError(
            "[store] needs exactly one of passphrase_env, passphrase_file, kms_key_id"
        )
    accounts = policy.get("accounts", ["*"])
    if not isinstance(accounts, list) or not all(isinstance(a, str) and a for a in accounts):
        raise ParticipantConfigError("[policy] accounts must be a list of account patterns")
    max_message = policy.get("max_message_bytes", m.MAX_MESSAGE_BYTES)
    if type(max_message) is not int or not 0 <= max_message <= m.MAX_MESSAGE_BYTES:
        raise ParticipantConfigError(
            f"[policy] max_message_bytes must be an integer in 0..{m.MAX_MESSAGE_BYTES}"
        )
    rate = policy.get("rate_per_minute")
    if rate is not None:
        rate = _num(policy, "[policy]", "rate_per_minute", 0, low=0.001)
    connection = {
        "connect_timeout_s": _num(conn, "[connection]", "connect_timeout_s", 10.0, low=0.1),
        "reconnect_initial_s": _num(conn, "[connection]", "reconnect_initial_s", 0.5, low=0.01),
        "reconnect_max_s": _num(conn, "[connection]", "reconnect_max_s", 30.0, low=0.01),
        "max_in_flight": _num(conn, "[connection]", "max_in_flight", 1024, low=1),
        "sweep_interval_s": _num(conn, "[connection]", "sweep_interval_s", 1.0, low=0.01),
        "approval_lifetime_s": _num(conn, "[connection]", "approval_lifetime_s", 60.0, low=1),
        "idle_timeout_s": _num(conn, "[connection]", "idle_timeout_s", 60.0, low=1),
    }
    return ParticipantConfig(
        participant_id=pid,
        gateway_url=url,
        gateway_id=gateway_id,
        auth_key_file=path(auth, "[auth]", "key_file"),
        auth_key_id=_key_id(auth, "[auth]"),
        approver_key_file=path(approver, "[approver]", "key_file"),
        approver_key_id=_key_id(approver, "[approver]"),
        store_path=path(store, "[store]", "path"),
        passphrase_env=_str(store, "[store]", "passphrase_env", required=False),
        passphrase_file=(
            path(store, "[store]", "passphrase_file") if "passphrase_file" in store else None
        ),
        kms_key_id=_str(store, "[store]", "kms_key_id", required=False),
        kms_region=_str(store, "[store]", "kms_region", required=False),
        kms_endpoint_url=_str(store, "[store]", "kms_endpoint_url", required=False),
        accounts=tuple(accounts),
        max_message_bytes=max_message,
        rate_per_minute=rate,
        ca_file=path(conn, "[connection]", "ca_file") if "ca_file" in conn else None,
        connection=connection,
    )


def key_source(
    config: ParticipantConfig,
    *,
    environ: Mapping[str, str] = os.environ,
    kms_client_factory: Callable[[ParticipantConfig], Any] | None = None,
) -> KeySource:
    """The store's key source named by ``[store]`` (reads the passphrase; makes the KMS
    client with boto3 unless a factory is given)."""
    if config.kms_key_id is not None:
        if kms_client_factory is None:
            import boto3  # type: ignore[import-untyped]  # boto3 ships no types

            client = boto3.client(
                "kms", region_name=config.kms_region, endpoint_url=config.kms_endpoint_url
            )
        else:
            client = kms_client_factory(config)
        return KmsKey(client, config.kms_key_id)
    if config.passphrase_env is not None:
        value = environ.get(config.passphrase_env)
        if not value:
            raise ParticipantConfigError(
                f"[store] passphrase_env: ${config.passphrase_env} is not set"
            )
        return PassphraseKey(value)
    assert config.passphrase_file is not None
    try:
        raw = bytearray(config.passphrase_file.read_bytes().rstrip(b"\r\n"))
    except OSError as exc:
        raise ParticipantConfigError(
            f"[store] passphrase_file {config.passphrase_file}: {exc.strerror}"
        ) from None
    try:
        return PassphraseKey(raw)
    finally:
        raw[:] = bytes(len(raw))


@dataclass(slots=True)
class OpenParticipant:
    """What :func:`open_participant` opened; :meth:`close` zeroes the keys and shares."""

    client: ParticipantClient
    store: SealedShareStore
    auth_key: ApproverSigningKey
    approver: ApproverSigningKey

    def close(self) -> None:
        self.store.close()
        self.auth_key.close()
        self.approver.close()


def open_participant(config: ParticipantConfig, source: KeySource) -> OpenParticipant:
    """Load the keys, open the store and build the client. Blocking (run it in a thread)."""
    auth = ApproverSigningKey.load(config.auth_key_file, key_id=config.auth_key_id)
    try:
        if auth.type != "ed25519":
            raise ParticipantConfigError("[auth] key_file must hold an Ed25519 key")
        approver = (
            auth
            if config.approver_key_file == config.auth_key_file
            and config.approver_key_id == config.auth_key_id
            else ApproverSigningKey.load(config.approver_key_file, key_id=config.approver_key_id)
        )
        try:
            store = SealedShareStore.open(config.store_path, source)
        except BaseException:
            approver.close()
            raise
    except BaseException:
        auth.close()
        raise
    ssl_context = None
    if config.ca_file is not None:
        ssl_context = ssl.create_default_context(cafile=str(config.ca_file))
    c = config.connection
    settings = ClientSettings(
        config.gateway_url,
        ssl_context=ssl_context,
        connect_timeout_s=c["connect_timeout_s"],
        reconnect_initial_s=c["reconnect_initial_s"],
        reconnect_max_s=c["reconnect_max_s"],
        max_in_flight=int(c["max_in_flight"]),
        sweep_interval_s=c["sweep_interval_s"],
        approval_lifetime_s=c["approval_lifetime_s"],
        idle_timeout_s=c["idle_timeout_s"],
    )
    client = ParticipantClient(
        settings,
        participant_id=config.participant_id,
        key_id=config.auth_key_id,
        auth_key=auth,
        approver=approver,
        approver_key_id=config.approver_key_id,
        shares=store,
        policy=AutoPolicy(
            accounts=config.accounts,
            max_message_bytes=config.max_message_bytes,
            rate_per_minute=config.rate_per_minute,
        ),
        gateway_id=config.gateway_id,
    )
    return OpenParticipant(client, store, auth, approver)
