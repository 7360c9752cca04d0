"""``trio-sign gateway``: the reference Sign Gateway as a process.

``gateway.toml`` (every key in docs/gateway.md; an unknown key or section is refused, naming
it)::

    [api]                       # the sign API this reference gateway offers its clients
    listen = "tcp://127.0.0.1:8443"
    # token = "..."             # clients send Authorization: Bearer <token>; without one, the
    # token_file = "gateway-api.token"    file's token is used, or one is generated into it (0600)
    # allowed_hosts = ["gateway.internal:8443"]   # Host values accepted (default: loopback forms)
    [events]                    # the SSE endpoint the enclaves subscribe to (via their relay)
    listen = "tcp://127.0.0.1:8444"
    # certfile = "...", keyfile = "..."   (HTTPS: the parent's relay speaks HTTPS upstream)
    [tls]                       # node connections: TLS that ends in the enclave, checked by
    cert = "pki/gateway.pem"    # its attestation (docs/gateway.md); the client certificate
    key = "pki/gateway.key"     # the enclaves' [gateway] client_ca_pem issued
    [attestation]               # pins every node shares (a [[node]] may set its own)
    root = "nsm/local-nsm-root.pem"   # default: the AWS Nitro Enclaves root
    pcrs = "enclave.pcrs.json"  # or { PCR0 = "...", PCR1 = "...", PCR2 = "..." }
    [participant_endpoint]      # remote participants connect here (WebSocket, DESIGN §15)
    listen = "tcp://127.0.0.1:8445"    # ws://HOST:PORT/v1/participants
    # gateway_id = "gateway"    # the id in every challenge (participant.toml gateway_id)
    # timeout_s = 10            # each participant's round one and round two
    # log_interval_s = 10       # a line a peer can repeat: at most once per this; the other
    #                           limits: max_connections, max_handshakes, handshake_timeout_s,
    #                           max_in_flight, ping_interval_s, idle_timeout_s (docs/gateway.md)
    [accounts]                  # who holds each account's other shares (public data only)
    registry = "accounts.jsonl" # appended by DKG, or written for imported accounts
    # [shares]                  # DEVELOPMENT ONLY (with [dev] share_files = true): the
    # participant_files = [...] # gateway then holds counterpart shares itself
    [participants.p2]           # a DKG participant whose key this gateway holds (issue 16):
    key_id = "p2"               # the id enclave.toml [dkg] participants pins its key under
    key_file = "participants/p2.key"   # Ed25519, the approver key format, 0600
    # [participants.ops-phone]  # a remote participant (WebSocket, gateway/_participants.py)
    # key_id = "ops-phone"
    # public_key = "<64 hex>"
    [dkg]                       # account creation: POST /v1/accounts (docs/gateway.md)
    journal = "dkg-journal.jsonl"      # the local participants' new shares (0600, fsynced)
    # enclave_identity_key = "<64 hex>"  # [bundles] delta_identity_key: checks round-1 packages
    [approvers]                 # approver keys this gateway holds (DESIGN §11), files 0600
    keys = { ops-1 = "approvers/ops-1.key", ops-2 = "approvers/ops-2.key" }
    lifetime_s = 60             # each approval expires this long after it is made
    accounts = ["*"]            # fnmatch patterns of the accounts this gateway approves
    [prober]
    interval_s = 5
    evict_after_s = 15
    [[node]]
    id = "node-1"
    address = "tcp://10.0.1.5:50051"
    events_token = "..."        # the same as that node's parent.toml [relay] token
    shares_sha256 = "..."       # the shard's base-bundle fingerprint the enclave must bind
    # [dev] skip_attestation = true   # development only: node connections are not attested

Tree::

    serve_gateway
    ├── serve_gateway_events   (probe / abort / freeze / unfreeze / drain / undrain, per node)
    ├── EnclaveNode.run        (one per node: a kept-open gRPC channel, attested by default)
    ├── run_prober             (Ping + the SSE probe echo; eviction and re-admission)
    ├── ParticipantHub.serve   (with [participant_endpoint]: remote participants' WebSocket,
    │                           one handler per connection: reader, writer, heartbeat)
    ├── DkgDriver.run          (with [participants] key files: settles the journal's pending
    │                           DKGs at start and every recover_interval_s)
    └── the sign API           POST /v1/sign (optional session_id, approvals and
                               taproot_merkle_root), POST /v1/accounts (create by DKG),
                               GET /v1/nodes,
                               POST /v1/nodes/{id}/{freeze,unfreeze,drain,undrain},
                               GET /healthz, GET /metrics

The API is deliberately small: it is a reference for integrators and a driver for demos and
tests, to be bound to loopback. Still, a web page must not be able to drive it (DESIGN §16):
every request needs ``Authorization: Bearer <[api] token>`` (``GET /healthz`` and
``GET /metrics`` excepted: they carry counts, never ids or keys), a
``Host`` from ``[api] allowed_hosts`` (else ``421``; this stops DNS rebinding), and no
``Origin`` other than its own ``Host`` (else ``403``; this stops CSRF); a ``POST`` must be
``Content-Type: application/json`` (else ``415``: a form or ``text/plain`` post cannot pass).
A production gateway brings its own authentication, policy and audit in front of
:class:`Coordinator`.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
import os
import secrets
import tomllib
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from cryptography import x509

from .. import __version__
from .._errors import ShareFileError, TrioSignError
from .._metrics import Registry
from ..attested import ChannelPolicy, make_attested_client_context
from ..authz._keys import KEY_ID_PATTERN
from ..crypto import SECP256K1_TR
from ..nitro import load_pcr_json
from ..participant._messages import MAX_IN_FLIGHT as MAX_WELCOME_IN_FLIGHT
from ..transport import TransportError, parse_address, serve_asgi
from ..transport._asgi import asgi_lifespan, respond
from ._accounts import DEFAULT_REGISTRY, AccountRegistry, AccountRegistryError
from ._approvals import (
    DEFAULT_APPROVAL_LIFETIME_S,
    Approval,
    ApproverKeyFileError,
    GatewayApprover,
)
from ._coordinator import (
    MERKLE_ROOT_BYTES,
    Coordinator,
    CoordinatorSettings,
    GatewayError,
    load_participant_files,
)
from ._dkg import (
    DEFAULT_JOURNAL,
    DkgDriver,
    DkgFailed,
    DkgParticipant,
    DkgSettings,
    DkgShares,
    LocalParticipant,
    load_local_participants,
)
from ._events import (
    BEARER_TOKEN_RULE,
    EventHub,
    bearer_token,
    serve_gateway_events,
    valid_bearer_token,
    valid_node_id,
)
from ._node import EnclaveNode, NodeSettings
from ._participants import (
    HubSettings,
    ParticipantConfigError,
    ParticipantHub,
    ParticipantKey,
    parse_participants_table,
)
from ._prober import run_prober
from ._remote_dkg import RemoteDkgParticipant

log = logging.getLogger("trio_sign.gateway")

MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 32 * 1024
#: Where a token is kept (or generated, 0600) when ``[api] token`` is not set; next to the config.
DEFAULT_API_TOKEN_FILE: Final = "gateway-api.token"
#: The loopback names a request's ``Host`` may use when ``[api] allowed_hosts`` is not set.
_LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "[::1]")

#: Every key ``gateway.toml`` takes, per section (docs/gateway.md); anything else is refused.
_KEYS: Final[dict[str, frozenset[str]]] = {
    "api": frozenset({"listen", "token", "token_file", "allowed_hosts"}),
    "events": frozenset({"listen", "certfile", "keyfile"}),
    "tls": frozenset({"mode", "ca", "cert", "key", "server_name"}),
    "attestation": frozenset({"root", "pcrs", "max_age_s", "check_timeout_s"}),
    "shares": frozenset({"participant_files"}),
    "participant_endpoint": frozenset(
        {
            "listen",
            "gateway_id",
            "timeout_s",
            "max_connections",
            "max_handshakes",
            "handshake_timeout_s",
            "max_in_flight",
            "ping_interval_s",
            "idle_timeout_s",
            "log_interval_s",
        }
    ),
    "accounts": frozenset({"registry"}),
    "approvers": frozenset({"keys", "lifetime_s", "accounts"}),
    "prober": frozenset({"interval_s", "evict_after_s"}),
    "node": frozenset(
        {"id", "address", "events_token", "shares_sha256", "config_sha256", "root", "pcrs"}
    ),
    "dev": frozenset({"skip_attestation", "share_files"}),
    "dkg": frozenset(
        {
            "journal",
            "enclave_identity_key",
            "max_concurrent",
            "round_timeout_s",
            "recover_interval_s",
        }
    ),
    # per participant, in its own [participants.<id>] table (see _participants)
    "participants": frozenset({"key_id", "key_file", "public_key"}),
}
#: Keys of a ``[participants.<id>]`` whose key this gateway holds (the others are the
#: participant endpoint's: ``key_id`` and ``public_key``, :func:`parse_participants_table`).
_LOCAL_PARTICIPANT_KEYS: Final = _KEYS["participants"]
#: ``[tls] mode`` values: TLS that ends in the enclave and is checked by its attestation, the
#: only one. (``"ingress"``, TLS ending at the parent, was removed when the parent's ingress
#: became a byte pipe to the enclave: no parent terminates TLS any more.)
TLS_MODES: Final = ("attested",)
_PROMETHEUS_TEXT: Final = b"text/plain; version=0.0.4; charset=utf-8"

#: GatewayError.reason -> HTTP status of the sign API.
_HTTP_STATUS = {
    "unknown_account": 404,
    "no_healthy_node": 503,
    "enclave_refused": 502,
    "bad_share": 502,
    "verify_failed": 502,
    "key_mismatch": 500,
    "too_few_signers": 500,
    "not_authorized": 403,
    "ciphersuite_mismatch": 500,
    "bad_merkle_root": 400,
    "participant_failed": 503,
}
#: DkgFailed.reason -> HTTP status of ``POST /v1/accounts``.
_DKG_HTTP_STATUS = {
    "bad_request": 400,
    "not_authorized": 403,
    "account_exists": 409,
    "no_healthy_node": 503,
    "enclave_refused": 502,
    "bad_package": 502,
    "key_mismatch": 502,
    "not_created": 502,
    "participant_failed": 503,
}
#: The longest session id a caller may name (the enclave's own limit).
MAX_SESSION_ID_BYTES: Final = 128
#: Most approvals one ``POST /v1/sign`` may carry.
MAX_APPROVALS: Final = 16


class GatewayConfigError(TrioSignError):
    """``gateway.toml`` is invalid; the message names the key."""


#: ``pcrs`` as written: an inline table (index -> value) or a JSON file (relative path resolved).
PcrSource = dict[int, bytes] | Path


@dataclass(frozen=True)
class NodeConfig:
    id: str
    address: str
    events_token: str = field(default="", repr=False)  # a secret: never in reprs
    shares_sha256: bytes | None = None
    config_sha256: bytes | None = None
    root: Path | None = None  # overrides [attestation] root
    pcrs: PcrSource | None = None  # overrides [attestation] pcrs


@dataclass(frozen=True)
class GatewayConfig:
    api_listen: str
    events_listen: str
    events_certfile: str | None
    events_keyfile: str | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_server_name: str | None
    participant_files: tuple[Path, ...]
    nodes: tuple[NodeConfig, ...]
    probe_interval_s: float = 5.0
    evict_after_s: float = 15.0
    api_token: str | None = field(default=None, repr=False)  # a secret: never in reprs
    api_token_file: Path = Path(DEFAULT_API_TOKEN_FILE)
    api_allowed_hosts: tuple[str, ...] = ()  # empty: the listen address and loopback forms
    tls_mode: str | None = None  # TLS_MODES, or None without [tls] (h2c, development only)
    attestation_root: Path | None = None  # None: the AWS Nitro Enclaves root
    attestation_pcrs: PcrSource | None = None
    attestation_max_age_s: float = 60.0
    attestation_check_timeout_s: float = 10.0
    dev_skip_attestation: bool = False
    approver_keys: Mapping[str, Path] = field(default_factory=dict)  # key id -> key file
    approval_lifetime_s: float = DEFAULT_APPROVAL_LIFETIME_S
    approval_accounts: tuple[str, ...] = ("*",)
    #: ``[participants.<id>]`` with ``key_file``: participant id -> (key id, key file).
    local_participants: Mapping[str, tuple[str, Path]] = field(default_factory=dict)
    #: their ``public_key``, where given (checked against the file at start).
    local_participant_public_keys: Mapping[str, bytes] = field(default_factory=dict)
    #: the other ``[participants.<id>]``: remote participants (WebSocket, DESIGN §15).
    remote_participants: Mapping[str, ParticipantKey] = field(default_factory=dict)
    dkg_journal: Path = Path(DEFAULT_JOURNAL)
    dkg_enclave_identity_key: bytes | None = None
    dkg_max_concurrent: int = 8
    dkg_round_timeout_s: float = 30.0
    dkg_recover_interval_s: float = 30.0
    #: ``[participant_endpoint]``: where remote participants connect (None: no endpoint).
    participant_listen: str | None = None
    participant_timeout_s: float = 10.0
    #: the endpoint's ``gateway_id`` and limits (``[participant_endpoint]``; HubSettings'
    #: defaults for the keys not set).
    participant_hub: HubSettings = field(default_factory=HubSettings)
    #: ``[accounts] registry``: the public account registry (remote participants' accounts).
    account_registry: Path = Path(DEFAULT_REGISTRY)

    @property
    def participant_gateway_id(self) -> str:
        """``[participant_endpoint] gateway_id``: the id in every challenge."""
        return self.participant_hub.gateway_id

    @property
    def attested(self) -> bool:
        """Node connections are attested channels checked by the gateway (DESIGN §10)."""
        return self.tls_mode == "attested" and not self.dev_skip_attestation


def _str(table: Mapping[str, Any], section: str, key: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise GatewayConfigError(f"[{section}] {key} is required")
        return default
    value = table[key]
    if not isinstance(value, str) or not value:
        raise GatewayConfigError(f"[{section}] {key} must be a non-empty string")
    return value


def _is_number(value: object) -> bool:
    """A TOML int or float that is finite: TOML has nan (which passes ``<= 0``) and inf, and
    neither is a time or a count; a bool is an int to Python, never a number here."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _num(table: Mapping[str, Any], section: str, key: str, default: float) -> float:
    value = table.get(key, default)
    if not _is_number(value) or value <= 0:
        raise GatewayConfigError(f"[{section}] {key} must be a positive number")
    return float(value)


def _whole(
    table: Mapping[str, Any], where: str, key: str, default: int, *, most: int | None = None
) -> int:
    """A count: a whole number from 1 (to ``most``); a float such as 1.5 is refused, not
    rounded."""
    value = table.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (most is not None and value > most)
    ):
        bound = f"1..{most}" if most is not None else "at least 1"
        raise GatewayConfigError(f"{where} {key} must be a whole number, {bound}")
    return value


#: ``[participant_endpoint]`` keys that set the HubSettings limit of the same name, with
#: the largest value each may take (``max_in_flight`` goes to the participant in ``welcome``,
#: whose wire range is 1..65535).
_HUB_COUNTS: Final = {
    "max_connections": None,
    "max_handshakes": None,
    "max_in_flight": MAX_WELCOME_IN_FLIGHT,
}
_HUB_SECONDS: Final = ("handshake_timeout_s", "ping_interval_s", "idle_timeout_s")


def _hub_settings(endpoint: Mapping[str, Any], gateway_id: str) -> HubSettings:
    """The participant endpoint's limits from ``[participant_endpoint]`` (HubSettings'
    defaults for the keys not set).

    Error handling: :class:`GatewayConfigError` naming the key: a count that is not a whole
    number in range, a time that is not a finite positive number of seconds (``log_interval_s``
    may be 0: every line logged), or ``idle_timeout_s`` not longer than ``ping_interval_s``.
    """
    where = "[participant_endpoint]"
    default = HubSettings()
    values: dict[str, Any] = {"gateway_id": gateway_id}
    for key, most in _HUB_COUNTS.items():
        values[key] = _whole(endpoint, where, key, getattr(default, key), most=most)
    for key in (*_HUB_SECONDS, "log_interval_s"):
        value = endpoint.get(key, getattr(default, key))
        zero_ok = key == "log_interval_s"
        if not _is_number(value) or value < 0 or (value == 0 and not zero_ok):
            what = "0 or more (0: every line)" if zero_ok else "positive"
            raise GatewayConfigError(f"{where} {key} must be a number of seconds, {what}")
        values[key] = float(value)
    try:
        return HubSettings(**values)
    except ValueError as exc:  # a rule across keys, HubSettings' own (idle vs ping)
        raise GatewayConfigError(f"{where} {exc}") from None


def _hex32(table: Mapping[str, Any], key: str, error: str) -> bytes | None:
    """``table[key]``, 64 hex digits, as 32 bytes; None when absent; ``error`` otherwise."""
    value = table.get(key)
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise GatewayConfigError(error)
    return raw


def _digest(table: Mapping[str, Any], where: str, key: str) -> bytes | None:
    return _hex32(table, key, f"{where} {key} must be 64 hex digits (a SHA-256)")


def _pcrs(table: Mapping[str, Any], where: str, base: Path) -> PcrSource | None:
    value = table.get("pcrs")
    if value is None:
        return None
    if isinstance(value, str) and value:
        return base / value
    if isinstance(value, dict):
        try:
            return load_pcr_json(value)
        except ValueError as exc:
            raise GatewayConfigError(f"{where} pcrs: {exc}") from None
    raise GatewayConfigError(
        f'{where} pcrs must be a table {{ PCR0 = "hex", ... }} or the path of a PCR JSON file'
    )


def _allowed_hosts(api: Mapping[str, Any]) -> tuple[str, ...]:
    hosts = api.get("allowed_hosts", [])
    if (
        not isinstance(hosts, list)
        or not all(isinstance(h, str) and h and h.isprintable() for h in hosts)
        or any(c in h for h in hosts for c in " /@,")
    ):
        raise GatewayConfigError(
            '[api] allowed_hosts must be a list of "host[:port]" strings (as clients send Host)'
        )
    return tuple(h.lower() for h in hosts)


def load_api_token(path: Path) -> tuple[str, bool]:
    """The API token kept in ``path``, or a fresh one written there (mode 0600, never over an
    existing file); returns ``(token, generated)``. Blocking file I/O: run it in a thread.

    Error handling: :class:`GatewayConfigError` (naming ``[api] token_file``, never the token)
    when the file cannot be read or written or holds no valid token.
    """
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise GatewayConfigError(f"[api] token_file: cannot read {path}: {reason}") from None
    else:
        if not valid_bearer_token(token):
            raise GatewayConfigError(f"[api] token_file: {path} must hold {BEARER_TOKEN_RULE}")
        return token, False
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
    except OSError as exc:
        raise GatewayConfigError(f"[api] token_file: cannot write {path}: {exc.strerror}") from None
    return token, True


def _table(data: Mapping[str, Any], section: str) -> dict[str, Any] | None:
    """The section's table with its keys checked (None if absent)."""
    table = data.get(section)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise GatewayConfigError(f"[{section}] must be a table")
    _unknown_keys(table, f"[{section}]", _KEYS[section])
    return table


def _unknown_keys(table: Mapping[str, Any], where: str, known: Set[str]) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise GatewayConfigError(
            f"{where} has unknown key {extra[0]!r} (known: {', '.join(sorted(known))})"
        )


def parse_gateway_config(text: str, *, base: Path = Path(".")) -> GatewayConfig:
    """Parse ``gateway.toml`` (every key in docs/gateway.md).

    Error handling: :class:`GatewayConfigError` naming the section and key for invalid TOML,
    an unknown section or key (a typo such as ``[api] lisen`` must not silently fall back to
    a default), a missing required key or a bad value.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GatewayConfigError(f"not valid TOML: {exc}") from None
    extra = sorted(set(data) - set(_KEYS))
    if extra:
        raise GatewayConfigError(f"unknown section [{extra[0]}]")
    api = _table(data, "api") or {}
    events = _table(data, "events") or {}
    tls = _table(data, "tls")
    attestation = _table(data, "attestation") or {}
    dev = _table(data, "dev") or {}
    shares = _table(data, "shares") or {}
    prober = _table(data, "prober") or {}
    local, local_keys, remote = _participants(data.get("participants"), base)
    dkg = _table(data, "dkg") or {}
    endpoint = _table(data, "participant_endpoint")
    accounts = _table(data, "accounts") or {}
    files = shares.get("participant_files", [] if (local or endpoint is not None) else None)
    if (
        not isinstance(files, list)
        or not (files or local or endpoint is not None)
        or not all(isinstance(f, str) for f in files)
    ):
        raise GatewayConfigError(
            "[participant_endpoint] is required: the gateway holds no share, remote "
            "participants sign (docs/participants.md); for development, [shares] "
            "participant_files (a non-empty list of paths) with [dev] share_files = true"
        )
    if endpoint is not None and not remote:
        raise GatewayConfigError(
            "[participant_endpoint] needs at least one remote [participants.<id>] "
            "(key_id, public_key)"
        )
    participant_listen: str | None = None
    participant_hub = HubSettings()
    if endpoint is not None:
        participant_listen = _str(endpoint, "participant_endpoint", "listen")
        try:
            if parse_address(participant_listen).scheme != "tcp":
                raise TransportError("tcp only")
        except TransportError:
            raise GatewayConfigError(
                "[participant_endpoint] listen must be tcp://HOST:PORT"
            ) from None
        participant_gateway_id = _str(endpoint, "participant_endpoint", "gateway_id", "gateway")
        if not KEY_ID_PATTERN.fullmatch(participant_gateway_id):
            raise GatewayConfigError(
                "[participant_endpoint] gateway_id must be an id (A-Z a-z 0-9 . _ : @ -)"
            )
        participant_hub = _hub_settings(endpoint, participant_gateway_id)
    raw_nodes = data.get("node")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise GatewayConfigError("at least one [[node]] (id, address) is required")
    nodes = []
    for index, raw in enumerate(raw_nodes, 1):
        if not isinstance(raw, dict):
            raise GatewayConfigError("[[node]] must be an array of tables")
        _unknown_keys(raw, f"[[node]] #{index}", _KEYS["node"])
        node_id = _str(raw, "node", "id")
        if not valid_node_id(node_id):
            raise GatewayConfigError(f"[[node]] id {node_id!r}: use [A-Za-z0-9._-], 1..128")
        address = _str(raw, "node", "address")
        if "events_token" not in raw:
            raise GatewayConfigError(
                f"[[node]] {node_id}: events_token is required (the bearer token its parent's"
                " relay sends: [relay] token in that parent.toml)"
            )
        token = raw["events_token"]
        if not isinstance(token, str) or not valid_bearer_token(token):
            raise GatewayConfigError(
                f"[[node]] {node_id}: events_token must be {BEARER_TOKEN_RULE}"
            )
        where = f"[[node]] {node_id}:"
        root = raw.get("root")
        if root is not None and (not isinstance(root, str) or not root):
            raise GatewayConfigError(f"{where} root must be the path of a PEM certificate")
        nodes.append(
            NodeConfig(
                node_id,
                address,
                token,
                shares_sha256=_digest(raw, where, "shares_sha256"),
                config_sha256=_digest(raw, where, "config_sha256"),
                root=None if root is None else base / root,
                pcrs=_pcrs(raw, where, base),
            )
        )
    if len({n.id for n in nodes}) != len(nodes):
        raise GatewayConfigError("[[node]] ids must be unique")
    tls_mode, skip = _channel_mode(tls, dev)
    share_files_flag = dev.get("share_files", False)
    if not isinstance(share_files_flag, bool):
        raise GatewayConfigError("[dev] share_files must be true or false")
    if files and not (share_files_flag or skip):
        raise GatewayConfigError(
            "[shares] participant_files makes the gateway hold counterpart shares: development "
            "only; set [dev] share_files = true to allow it, or use remote participants "
            "([participant_endpoint], docs/participants.md)"
        )
    default_root = _str(attestation, "attestation", "root", None)
    default_pcrs = _pcrs(attestation, "[attestation]", base)
    if tls_mode == "attested" and not skip:
        for node in nodes:
            if node.shares_sha256 is None:
                raise GatewayConfigError(
                    f"[[node]] {node.id}: shares_sha256 is required: the fingerprint of the "
                    "base bundle that shard must serve (its GetStatus shares_sha256)"
                )
            if node.pcrs is None and default_pcrs is None:
                raise GatewayConfigError(
                    f"[[node]] {node.id}: no PCRs pinned: set [attestation] pcrs (or the "
                    "node's own pcrs) to the enclave image's measurements"
                )
    approver_keys, lifetime_s, approve_accounts = _approvers(_table(data, "approvers"), base)
    api_token = api.get("token")
    if api_token is not None and (
        not isinstance(api_token, str) or not valid_bearer_token(api_token)
    ):
        raise GatewayConfigError(f"[api] token must be {BEARER_TOKEN_RULE}")
    return GatewayConfig(
        api_listen=_str(api, "api", "listen", "tcp://127.0.0.1:8443"),
        api_token=api_token,
        api_token_file=base / _str(api, "api", "token_file", DEFAULT_API_TOKEN_FILE),
        api_allowed_hosts=_allowed_hosts(api),
        events_listen=_str(events, "events", "listen", "tcp://127.0.0.1:8444"),
        events_certfile=_str(events, "events", "certfile", None),
        events_keyfile=_str(events, "events", "keyfile", None),
        tls_cert=base / _str(tls, "tls", "cert") if tls is not None else None,
        tls_key=base / _str(tls, "tls", "key") if tls is not None else None,
        tls_server_name=_str(tls, "tls", "server_name", None) if tls is not None else None,
        tls_mode=tls_mode,
        attestation_root=None if default_root is None else base / default_root,
        attestation_pcrs=default_pcrs,
        attestation_max_age_s=_num(attestation, "attestation", "max_age_s", 60.0),
        attestation_check_timeout_s=_num(attestation, "attestation", "check_timeout_s", 10.0),
        dev_skip_attestation=skip,
        participant_files=tuple(base / f for f in files),
        nodes=tuple(nodes),
        probe_interval_s=_num(prober, "prober", "interval_s", 5.0),
        evict_after_s=_num(prober, "prober", "evict_after_s", 15.0),
        approver_keys=approver_keys,
        approval_lifetime_s=lifetime_s,
        approval_accounts=approve_accounts,
        local_participants=local,
        local_participant_public_keys=local_keys,
        remote_participants=remote,
        dkg_journal=base / _str(dkg, "dkg", "journal", DEFAULT_JOURNAL),
        dkg_enclave_identity_key=_hex_key(dkg, "[dkg] enclave_identity_key"),
        dkg_max_concurrent=_whole(dkg, "[dkg]", "max_concurrent", 8),
        dkg_round_timeout_s=_num(dkg, "dkg", "round_timeout_s", 30.0),
        dkg_recover_interval_s=_num(dkg, "dkg", "recover_interval_s", 30.0),
        participant_listen=participant_listen,
        participant_hub=participant_hub,
        participant_timeout_s=_num(endpoint or {}, "participant_endpoint", "timeout_s", 10.0),
        account_registry=base / _str(accounts, "accounts", "registry", DEFAULT_REGISTRY),
    )


def _hex_key(
    table: Mapping[str, Any], where: str, key: str = "enclave_identity_key"
) -> bytes | None:
    return _hex32(table, key, f"{where} must be 64 hex digits (an Ed25519 public key)")


def _is_text_id(value: object) -> bool:
    """A client's session or DKG id: 1..MAX_SESSION_ID_BYTES bytes of printable text."""
    return (
        isinstance(value, str)
        and bool(value)
        and value.isprintable()
        and len(value.encode()) <= MAX_SESSION_ID_BYTES
    )


def _approvals_of(
    body: Mapping[str, Any], account_id: str, session_id: str | None
) -> list[Approval] | str:
    """A request's ``approvals`` (at most MAX_APPROVALS), or what is wrong with them."""
    raw = body.get("approvals", [])
    if not isinstance(raw, list) or len(raw) > MAX_APPROVALS:
        return f"approvals must be a list of at most {MAX_APPROVALS}"
    try:
        return [Approval.from_json(a, account_id=account_id, session_id=session_id) for a in raw]
    except ValueError as exc:
        return str(exc)


def _participants(
    table: object, base: Path
) -> tuple[dict[str, tuple[str, Path]], dict[str, bytes], dict[str, ParticipantKey]]:
    """``[participants]``: one table shared with the participant endpoint. An entry with
    ``key_file`` is a DKG participant whose key this gateway holds (``key_id``, ``key_file``,
    optionally ``public_key`` to check the file against); any other entry is a remote
    participant, parsed by :func:`parse_participants_table` (``key_id``, ``public_key``).
    Returns ``(local: id -> (key_id, file), local public keys, remote)``."""
    if table is None:
        return {}, {}, {}
    if not isinstance(table, dict):
        raise GatewayConfigError("[participants] must be a table of participant tables")
    local: dict[str, tuple[str, Path]] = {}
    local_keys: dict[str, bytes] = {}
    others: dict[str, Any] = {}
    for pid, entry in table.items():
        if not (isinstance(entry, dict) and "key_file" in entry):
            others[pid] = entry
            continue
        where = f"[participants.{pid}]"
        if not KEY_ID_PATTERN.fullmatch(pid):
            raise GatewayConfigError(f"{where}: a participant id is 1-64 of A-Z a-z 0-9 . _ : @ -")
        _unknown_keys(entry, where, _LOCAL_PARTICIPANT_KEYS)
        key_id = entry.get("key_id")
        if (
            not isinstance(key_id, str)
            or not KEY_ID_PATTERN.fullmatch(key_id)
            or key_id == "enclave"
        ):
            raise GatewayConfigError(
                f"{where} key_id must be the key id enclave.toml [dkg] participants pins "
                "(not 'enclave')"
            )
        key_file = _str(entry, f"participants.{pid}", "key_file")
        local[pid] = (key_id, base / key_file)
        pk = _hex_key(entry, f"{where} public_key", "public_key")
        if pk is not None:
            local_keys[pid] = pk
    if len({k for k, _ in local.values()}) != len(local):
        raise GatewayConfigError("[participants] two entries name the same key_id")
    try:
        remote = parse_participants_table(others) if others else {}
    except ParticipantConfigError as exc:
        raise GatewayConfigError(str(exc)) from None
    return local, local_keys, remote


def _approvers(
    table: Mapping[str, Any] | None, base: Path
) -> tuple[dict[str, Path], float, tuple[str, ...]]:
    """``[approvers]``: ``(key id -> key file, lifetime_s, accounts)``."""
    if table is None:
        return {}, DEFAULT_APPROVAL_LIFETIME_S, ("*",)
    keys = table.get("keys")
    if (
        not isinstance(keys, dict)
        or not keys
        or not all(isinstance(v, str) and v for v in keys.values())
    ):
        raise GatewayConfigError(
            '[approvers] keys must be a table of key id = "key file", e.g. '
            '{ ops-1 = "approvers/ops-1.key" } (the ids the enclaves\' [approvers] pin)'
        )
    for key_id in keys:
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise GatewayConfigError(
                f"[approvers] keys: {key_id!r} is not a key id (1..64 of A-Z a-z 0-9 . _ : @ -)"
            )
    lifetime = _num(table, "approvers", "lifetime_s", DEFAULT_APPROVAL_LIFETIME_S)
    accounts = table.get("accounts", ["*"])
    if (
        not isinstance(accounts, list)
        or not accounts
        or not all(isinstance(a, str) and a for a in accounts)
    ):
        raise GatewayConfigError(
            '[approvers] accounts must be a non-empty list of account patterns (["*"]: all)'
        )
    return {k: base / v for k, v in keys.items()}, lifetime, tuple(accounts)


def _channel_mode(tls: Mapping[str, Any] | None, dev: Mapping[str, Any]) -> tuple[str | None, bool]:
    """``([tls] mode or None, [dev] skip_attestation)``, checked against each other."""
    skip = dev.get("skip_attestation", False)
    if not isinstance(skip, bool):
        raise GatewayConfigError("[dev] skip_attestation must be true or false")
    if tls is None:
        if not skip:
            raise GatewayConfigError(
                "[tls] is required: node connections are attested TLS by default (cert, key "
                "and each [[node]] shares_sha256); for a development enclave over plain h2c "
                "set [dev] skip_attestation = true"
            )
        return None, skip
    mode = tls.get("mode", "attested")
    if mode == "ingress" or "ca" in tls:
        raise GatewayConfigError(
            '[tls] mode = "ingress" and [tls] ca were removed: TLS ends in the enclave now (the '
            "parent's ingress is a byte pipe) and its self-signed certificate is checked by its "
            'attestation; remove them (mode = "attested" is the default; docs/gateway.md)'
        )
    if mode not in TLS_MODES:
        raise GatewayConfigError(f"[tls] mode must be one of {', '.join(map(repr, TLS_MODES))}")
    return mode, skip


@dataclass
class GatewayHandle:
    api_urls: list[str]
    events_urls: list[str]
    nodes: list[EnclaveNode]
    hub: EventHub
    coordinator: Coordinator
    api_token: str = field(default="", repr=False)  # a secret: never in reprs
    api_token_file: Path | None = None  # where it was read from or generated into
    dkg: DkgDriver | None = None  # with [participants] key files: POST /v1/accounts
    participants: ParticipantHub | None = None  # with [participant_endpoint]
    participant_url: str | None = None  # ws://HOST:PORT/v1/participants


def _one_header(scope: Mapping[str, Any], name: bytes) -> str | None:
    values = [v for k, v in scope.get("headers", []) if k.lower() == name]
    return bytes(values[0]).decode("latin-1").strip() if len(values) == 1 else None


class GatewayApi:
    """The reference sign API (ASGI).

    Args:
        coordinator, nodes, hub: what the routes drive.
        api_token: the bearer token every request but ``GET /healthz`` must carry.
        allowed_hosts: ``host[:port]`` values a request's ``Host`` may have (lower case). Empty:
            the address the connection came in on and ``localhost``/``127.0.0.1``/``[::1]``,
            each with its port; on a UNIX socket (no browser reaches one) any ``Host``.

    Refusals, in this order: ``421`` a ``Host`` not allowed (or none, or several); ``403`` an
    ``Origin`` whose ``host[:port]`` is not the request's ``Host`` (``null`` included);
    ``401`` no or a wrong token (``GET /healthz`` and ``GET /metrics`` need none); then
    routing, and ``415`` for a ``POST`` that is not ``Content-Type: application/json``.

    Attributes:
        metrics: the gateway's metrics (sign requests by outcome, their latency, nodes known,
            healthy, evicted and not attested, attested channels verified and refused by
            reason, event subscribers and refusals, the participant endpoint's events by kind,
            build info), served as Prometheus text on ``GET /metrics``.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        nodes: list[EnclaveNode],
        hub: EventHub,
        *,
        api_token: str,
        allowed_hosts: tuple[str, ...] = (),
        dkg: DkgDriver | None = None,
    ) -> None:
        if not valid_bearer_token(api_token):
            raise ValueError(f"api_token must be {BEARER_TOKEN_RULE}")
        self._coordinator = coordinator
        self._dkg = dkg
        self._nodes = {n.node_id: n for n in nodes}
        self._hub = hub
        self._token = api_token.encode("ascii")
        self._allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.metrics = Registry()
        self._init_metrics()

    def _init_metrics(self) -> None:
        m = self.metrics
        m.build_info("gateway", __version__)
        self._sign_requests = m.counter(
            "trio_sign_gateway_sign_requests_total",
            "POST /v1/sign requests answered, by outcome: signed, bad_request, or the "
            "GatewayError reason (no_healthy_node, enclave_refused, ...).",
            ("outcome",),
        )
        self._sign_latency = m.histogram(
            "trio_sign_gateway_sign_duration_seconds",
            "Time to coordinate one signature (both rounds, aggregation, verification), "
            "in seconds.",
        )
        self._account_requests = m.counter(
            "trio_sign_gateway_account_requests_total",
            "POST /v1/accounts requests answered, by outcome: created, bad_request, or the "
            "DKG failure reason (not_authorized, account_exists, ...).",
            ("outcome",),
        )
        self._dkg_latency = m.histogram(
            "trio_sign_gateway_dkg_duration_seconds",
            "Time to create one account by DKG (three rounds, the enclave's durable store, the "
            "journal's fsyncs), in seconds.",
        )
        known = m.gauge("trio_sign_gateway_nodes_known", "Enclave nodes configured.")
        healthy = m.gauge(
            "trio_sign_gateway_nodes_healthy", "Nodes the prober finds healthy (not evicted)."
        )
        evicted = m.gauge("trio_sign_gateway_nodes_evicted", "Nodes evicted by the prober.")
        unattested = m.gauge(
            "trio_sign_gateway_nodes_unattested",
            "Nodes whose connections this gateway does not attest ([dev] skip_attestation).",
        )
        verified = m.counter(
            "trio_sign_gateway_attestations_verified_total",
            "Node connections whose attested channel passed the check.",
        )
        refused_attestations = m.counter(
            "trio_sign_gateway_attestation_failures_total",
            "Node connections refused by the attested-channel check, by reason (an alert each: "
            "the node is evicted until a new connection passes).",
            ("reason",),
        )
        subscribers = m.gauge(
            "trio_sign_gateway_sse_subscribers", "Event-stream subscriptions open now."
        )
        published = m.counter(
            "trio_sign_gateway_sse_events_published_total",
            "Events published to the nodes' streams (probe, abort, freeze, drain, ...).",
        )
        refused = m.counter(
            "trio_sign_gateway_sse_refusals_total",
            "Event subscriptions refused or cut, by reason.",
            ("reason",),
        )
        participant_events = m.counter(
            "trio_sign_gateway_participant_events_total",
            "What the participant endpoint saw or refused, by kind: auth_ok, auth_failed, "
            "replaced, malformed, late_answers, busy, timeouts, errors (no series without "
            "[participant_endpoint]).",
            ("kind",),
        )

        def collect() -> None:
            nodes = list(self._nodes.values())
            known.set(len(nodes))
            healthy.set(sum(1 for n in nodes if n.healthy and not n.evicted))
            evicted.set(sum(1 for n in nodes if n.evicted))
            unattested.set(sum(1 for n in nodes if not n.attested))
            verified.labels().set_total(sum(n.attestations_verified for n in nodes))
            reasons: dict[str, int] = {}
            for node in nodes:
                for reason, count in node.attestation_failures.items():
                    reasons[reason] = reasons.get(reason, 0) + count
            for reason, total in sorted(reasons.items()):
                refused_attestations.labels(reason=reason).set_total(total)
            subscribers.set(sum(self._hub.subscribers(n) for n in self._nodes))
            stats = self._hub.stats
            published.labels().set_total(stats.published)
            for reason, n in (
                ("unauthorized", stats.unauthorized),
                ("node_limit", stats.refused_node),
                ("hub_limit", stats.refused),
                ("fell_behind", stats.dropped_slow),
            ):
                refused.labels(reason=reason).set_total(n)
            remote = self._coordinator.participants
            if remote is not None:
                # A fixed set of kinds (ParticipantHub.counts), never a participant id.
                for kind, n in remote.counts.items():
                    participant_events.labels(kind=kind).set_total(n)

        m.on_collect(collect)

    def __repr__(self) -> str:
        return f"GatewayApi(nodes={sorted(self._nodes)!r})"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await asgi_lifespan(receive, send)
        if scope["type"] != "http":
            return
        refusal = self._refusal(scope)
        if refusal is None and (scope.get("method"), scope.get("path")) == ("GET", "/metrics"):
            await respond(
                send, 200, _PROMETHEUS_TEXT, self.metrics.render().encode(), None, no_store=True
            )
            return
        if refusal is not None:
            status, body = refusal
        else:
            status, body = await self._route(scope, receive)
        extra = [(b"www-authenticate", b"Bearer")] if status == 401 else None
        await respond(
            send,
            status,
            b"application/json",
            json.dumps(body, separators=(",", ":")).encode(),
            extra,
            no_store=True,
        )

    def _host_allowed(self, scope: Mapping[str, Any], host: str) -> bool:
        if self._allowed_hosts:
            return host in self._allowed_hosts
        server = scope.get("server")
        if not server or server[1] is None:
            return True  # a UNIX socket: no browser (and no rebound DNS name) reaches it
        server_host, port = server
        names = {*_LOOPBACK_HOSTS, f"[{server_host}]" if ":" in server_host else server_host}
        allowed = {f"{name}:{port}" for name in names}
        if port == 80:
            allowed |= names
        return host in allowed

    def _refusal(self, scope: Mapping[str, Any]) -> tuple[int, Any] | None:
        """Why the request is refused before routing, or None (DESIGN §16)."""
        host = _one_header(scope, b"host")
        if host is None or not self._host_allowed(scope, host.lower()):
            return 421, {"error": "this Host is not served here ([api] allowed_hosts)"}
        origin = _one_header(scope, b"origin")
        if origin is not None:
            try:
                parts = urlsplit(origin)
                same = parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()
            except ValueError:
                same = False
            if not same:
                return 403, {"error": "cross-origin requests are refused"}
        if scope.get("method") == "GET" and scope.get("path") in ("/healthz", "/metrics"):
            return None
        if not hmac.compare_digest(bearer_token(scope), self._token):
            return 401, {"error": "unauthorized"}
        return None

    async def _body(self, receive: Any) -> Any:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ValueError(f"body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return json.loads(b"".join(chunks) or b"{}")

    async def _route(self, scope: dict[str, Any], receive: Any) -> tuple[int, Any]:
        method, path = scope["method"], scope["path"]
        if path == "/healthz" and method == "GET":
            return 200, {"ok": True}
        if path == "/v1/nodes" and method == "GET":
            return 200, [
                {
                    "id": n.node_id,
                    "healthy": n.healthy,
                    "evicted": n.evicted,
                    "attestation": n.attestation,
                    "subscribers": self._hub.subscribers(n.node_id),
                }
                for n in self._nodes.values()
            ]
        if method != "POST":
            return (405 if path.startswith("/v1/") else 404), {"error": "not found"}
        content_type = _one_header(scope, b"content-type") or ""
        if content_type.partition(";")[0].strip().lower() != "application/json":
            return 415, {"error": "Content-Type must be application/json"}
        try:
            body = await self._body(receive)
        except ValueError as exc:
            return 400, {"error": f"bad request body: {exc}"}
        if not isinstance(body, dict):
            return 400, {"error": "the body must be a JSON object"}
        if path == "/v1/sign":
            return await self._sign(body)
        if path == "/v1/accounts":
            return await self._create_account(body)
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[:2] == ["v1", "nodes"] and parts[2] in self._nodes:
            node_id, action = parts[2], parts[3]
            if action == "drain":
                return 200, {"event_id": self._hub.drain(node_id)}
            if action == "undrain":
                return 200, {"event_id": self._hub.undrain(node_id)}
            account_id = body.get("account_id")
            if action in ("freeze", "unfreeze") and isinstance(account_id, str) and account_id:
                publish = self._hub.freeze if action == "freeze" else self._hub.unfreeze
                return 200, {"event_id": publish(node_id, account_id)}
            return 400, {"error": 'freeze/unfreeze need {"account_id": ...}'}
        return 404, {"error": "not found"}

    async def _sign(self, body: dict[str, Any]) -> tuple[int, Any]:
        status, answer = await self._sign_checked(body)
        outcome = "signed" if status == 200 else answer.get("reason", "bad_request")
        self._sign_requests.labels(outcome=outcome).inc()
        return status, answer

    async def _sign_checked(self, body: dict[str, Any]) -> tuple[int, Any]:
        account_id, message_hex = body.get("account_id"), body.get("message_hex")
        if not isinstance(account_id, str) or not account_id or not isinstance(message_hex, str):
            return 400, {"error": 'need {"account_id": str, "message_hex": hex}'}
        try:
            message = bytes.fromhex(message_hex)
        except ValueError:
            return 400, {"error": "message_hex is not hex"}
        if len(message) > MAX_MESSAGE_BYTES:
            return 400, {"error": f"message over {MAX_MESSAGE_BYTES} bytes"}
        session_id = body.get("session_id")
        if session_id is not None and not _is_text_id(session_id):
            return 400, {
                "error": f"session_id must be 1..{MAX_SESSION_ID_BYTES} bytes of printable text"
            }
        approvals = _approvals_of(body, account_id, session_id)
        if isinstance(approvals, str):
            return 400, {"error": approvals}
        if approvals and session_id is None:
            return 400, {"error": "approvals name their session: give the session_id they approve"}
        if len({a.key_id for a in approvals}) != len(approvals):
            return 400, {"error": "two approvals by the same key_id (one key counts once)"}
        root_hex = body.get("taproot_merkle_root")
        merkle_root: bytes | None = None
        if root_hex is not None:
            if not isinstance(root_hex, str) or len(root_hex) not in (0, 2 * MERKLE_ROOT_BYTES):
                return 400, {
                    "error": f"taproot_merkle_root must be hex of 0 or {MERKLE_ROOT_BYTES} bytes",
                    "reason": "bad_merkle_root",
                }
            try:
                merkle_root = bytes.fromhex(root_hex)
            except ValueError:
                return 400, {"error": "taproot_merkle_root is not hex", "reason": "bad_merkle_root"}
        started = trio.current_time()
        try:
            signed = await self._coordinator.sign(
                account_id,
                message,
                approvals=approvals,
                session_id=session_id,
                taproot_merkle_root=merkle_root,
            )
        except GatewayError as exc:
            status = _HTTP_STATUS.get(exc.reason, 500)
            return status, {"error": str(exc), "reason": exc.reason}
        finally:
            self._sign_latency.observe(max(0.0, trio.current_time() - started))
        answer = {
            "account_id": account_id,
            "ciphersuite": signed.ciphersuite,
            "signature_hex": signed.signature.hex(),
        }
        if signed.ciphersuite == SECP256K1_TR.name:
            # The x-only output key the BIP-340 signature verifies under (tweaked if a root
            # was given), so a client need not compute the tweak to check it.
            answer["output_key_hex"] = signed.verifying_key.hex()
        if merkle_root is not None:
            answer["taproot_merkle_root"] = merkle_root.hex()
        return 200, answer

    async def _create_account(self, body: dict[str, Any]) -> tuple[int, Any]:
        status, answer = await self._create_checked(body)
        outcome = "created" if status == 201 else answer.get("reason", "bad_request")
        self._account_requests.labels(outcome=outcome).inc()
        return status, answer

    async def _create_checked(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self._dkg is None:
            return 501, {
                "error": "this gateway creates no accounts: give it remote participants "
                "([participant_endpoint]) or DKG participant keys ([participants.<id>] key_file)",
                "reason": "not_configured",
            }
        account_id, suite = body.get("account_id"), body.get("ciphersuite")
        if not isinstance(account_id, str) or not account_id or not isinstance(suite, str):
            return 400, {
                "error": 'need {"account_id": str, "ciphersuite": str} (and optionally '
                "min_signers, max_signers, policy, dkg_id, approvals)",
                "reason": "bad_request",
            }
        counts: dict[str, int | None] = {}
        for name in ("min_signers", "max_signers"):
            value = body.get(name)
            if value is not None and (type(value) is not int or not 0 < value < 2**16):
                return 400, {
                    "error": f"{name} must be a small positive integer",
                    "reason": "bad_request",
                }
            counts[name] = value
        policy = body.get("policy", "default")
        if not isinstance(policy, str) or not policy:
            return 400, {"error": "policy must be a policy name", "reason": "bad_request"}
        dkg_id = body.get("dkg_id")
        if dkg_id is not None and not _is_text_id(dkg_id):
            return 400, {
                "error": f"dkg_id must be 1..{MAX_SESSION_ID_BYTES} bytes of printable text",
                "reason": "bad_request",
            }
        approvals = _approvals_of(body, account_id, dkg_id)
        if isinstance(approvals, str):
            return 400, {"error": approvals, "reason": "bad_request"}
        if approvals and dkg_id is None:
            return 400, {
                "error": "approvals name their DKG: give the dkg_id they approve",
                "reason": "bad_request",
            }
        started = trio.current_time()
        try:
            created = await self._dkg.create_account(
                account_id,
                suite,
                min_signers=counts["min_signers"],
                max_signers=counts["max_signers"],
                policy=policy,
                approvals=approvals,
                dkg_id=dkg_id,
            )
        except DkgFailed as exc:
            answer: dict[str, Any] = {"error": str(exc), "reason": exc.reason}
            if exc.dkg_id is not None:
                answer["dkg_id"] = exc.dkg_id
            return _DKG_HTTP_STATUS.get(exc.reason, 500), answer
        finally:
            self._dkg_latency.observe(max(0.0, trio.current_time() - started))
        return 201, created.to_json()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise GatewayConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None


def node_policy(config: GatewayConfig, node: NodeConfig) -> ChannelPolicy:
    """The pins of one node's attested channel: its own ``root``/``pcrs`` or ``[attestation]``'s,
    its ``shares_sha256`` and ``config_sha256``. Blocking file I/O.

    Error handling: :class:`GatewayConfigError` naming the node for an unreadable file or pins
    that do not make a policy (PCR0/1/2 missing, all zero).
    """
    where = f"[[node]] {node.id}"
    root_path = node.root or config.attestation_root
    root = None if root_path is None else _read(root_path, f"{where} root")
    if root is not None:
        try:
            x509.load_pem_x509_certificate(root)
        except ValueError:
            raise GatewayConfigError(
                f"{where} root: {root_path} is not a PEM certificate"
            ) from None
    pcrs = node.pcrs if node.pcrs is not None else config.attestation_pcrs
    if isinstance(pcrs, Path):
        try:
            pcrs = load_pcr_json(pcrs)
        except (OSError, ValueError) as exc:
            raise GatewayConfigError(f"{where} pcrs: {pcrs}: {exc}") from None
    if pcrs is None or node.shares_sha256 is None:  # parse_gateway_config requires both
        raise GatewayConfigError(f"{where}: shares_sha256 and pcrs are required")
    try:
        return ChannelPolicy(
            shares_sha256=node.shares_sha256,
            pcrs=pcrs,
            root_pem=root,
            config_sha256=node.config_sha256,
            max_age_s=config.attestation_max_age_s,
        )
    except ValueError as exc:
        raise GatewayConfigError(f"{where}: {exc}") from None


def make_nodes(config: GatewayConfig) -> list[EnclaveNode]:
    """The configured nodes, each connecting the way ``[tls]`` and ``[dev]`` say. Logs, loudly,
    every way in which node connections are not attested by this gateway. Blocking file I/O.

    Error handling: :class:`GatewayConfigError` for an unreadable file or bad pins.
    """
    settings = NodeSettings(attest_timeout_s=config.attestation_check_timeout_s)
    ssl_context = None
    if config.tls_cert is not None and config.tls_key is not None:
        cert = _read(config.tls_cert, "[tls] cert")
        key = _read(config.tls_key, "[tls] key")
        ssl_context = make_attested_client_context(cert, key)
    if config.dev_skip_attestation:
        how = {
            None: "plain h2c",
            "attested": "TLS whose server certificate is NOT verified",
        }[config.tls_mode]
        log.warning(
            "DEVELOPMENT MODE ([dev] skip_attestation = true): node connections are %s and the "
            "enclaves' attestation is NOT checked; anyone on the path can read and forge the "
            "signing traffic. Never run this in production.",
            how,
            extra={"alert": "attestation_skipped", "nodes": len(config.nodes)},
        )
    nodes = []
    for n in config.nodes:
        policy = node_policy(config, n) if config.attested else None
        nodes.append(
            EnclaveNode(
                n.id,
                n.address,
                ssl_context=ssl_context,
                server_hostname=config.tls_server_name,
                attestation=policy,
                settings=settings,
            )
        )
    return nodes


async def serve_gateway(
    config: GatewayConfig,
    *,
    task_status: trio.TaskStatus[GatewayHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the reference gateway until cancelled.

    Without ``[api] token`` the token is read from ``[api] token_file``, or generated into it
    (0600) if the file does not exist; the path is logged, the token never is.

    With ``[approvers] keys`` the key files are loaded (each must be mode 0600) and every
    ``Sign`` carries this gateway's approvals (:class:`GatewayApprover`); the keys are zeroed
    when the gateway stops.

    Error handling: :class:`GatewayConfigError` for an unreadable or unwritable token file, an
    approver key file refused (naming it, never the key), a bad listen URL or bind failure as
    :func:`serve_gateway_events` says; all before ``started``.
    """
    hub = EventHub()
    token_file: Path | None = None
    if config.api_token is not None:
        api_token = config.api_token
    else:
        token_file = config.api_token_file
        api_token, generated = await trio.to_thread.run_sync(load_api_token, token_file)
        log.info(
            "gateway: API token %s %s",
            "generated into" if generated else "read from",
            token_file,
            extra={"token_file": str(token_file)},
        )
    nodes = await trio.to_thread.run_sync(make_nodes, config)
    approver = None
    if config.approver_keys:
        approver = await trio.to_thread.run_sync(
            functools.partial(
                _load_approver,
                config.approver_keys,
                lifetime_s=config.approval_lifetime_s,
                accounts=config.approval_accounts,
            )
        )
        log.info(
            "gateway: approving as %s (accounts %s, lifetime %g s)",
            ", ".join(approver.key_ids),
            ", ".join(approver.accounts),
            config.approval_lifetime_s,
            extra={"approvers": ",".join(approver.key_ids)},
        )
    participants: list[LocalParticipant] = []
    shares: DkgShares | None = None
    registry: AccountRegistry | None = None
    remote_hub: ParticipantHub | None = None
    try:
        counterparts = []
        if config.participant_files:
            # Development only ([dev] share_files): the gateway then holds shares itself.
            log.warning(
                "gateway: DEVELOPMENT: loading counterpart share files ([shares] "
                "participant_files); a production gateway holds no share (DESIGN §15)"
            )
            counterparts = await trio.to_thread.run_sync(
                load_participant_files, list(config.participant_files)
            )
        if config.participant_listen is not None:
            remote_hub = ParticipantHub(
                config.remote_participants,
                config.participant_hub,
            )
            registry = await trio.to_thread.run_sync(_open_registry, config.account_registry)
        coordinator = Coordinator(
            nodes,
            counterparts,
            settings=CoordinatorSettings(participant_timeout_s=config.participant_timeout_s),
            approver=approver,
            participants=remote_hub,
            registry=registry,
        )
        driver = None
        if config.local_participants or remote_hub is not None:
            if config.local_participants:
                participants = await trio.to_thread.run_sync(_load_participants, config)
            shares = DkgShares(config.dkg_journal, [p.participant_id for p in participants])
            await trio.to_thread.run_sync(_open_journal, shares)
            coordinator.add_counterparts(shares.stores.values())
            everyone: list[DkgParticipant] = list(participants)
            if remote_hub is not None:
                everyone += [
                    RemoteDkgParticipant(
                        remote_hub, pid, key.key_id, timeout_s=config.participant_timeout_s
                    )
                    for pid, key in config.remote_participants.items()
                ]
            driver = DkgDriver(
                nodes,
                everyone,
                shares,
                approver=approver,
                enclave_identity_key=config.dkg_enclave_identity_key,
                settings=DkgSettings(
                    round_timeout_s=config.dkg_round_timeout_s,
                    max_concurrent=config.dkg_max_concurrent,
                    recover_interval_s=config.dkg_recover_interval_s,
                ),
                on_created=coordinator.learned,
                registry=registry,
            )
            log.info(
                "gateway: creating accounts by DKG with %s (journal %s: %d accounts, %d pending)",
                ", ".join(p.participant_id for p in everyone),
                config.dkg_journal,
                shares.created,
                len(shares.pending),
                extra={"journal": str(config.dkg_journal)},
            )
        await _serve(config, hub, nodes, coordinator, api_token, token_file, task_status, driver)
    finally:
        if registry is not None:
            registry.close()
        for p in participants:
            p.close()
        if shares is not None:
            shares.close()
        if approver is not None:
            approver.close()


def _load_participants(config: GatewayConfig) -> list[LocalParticipant]:
    try:
        participants = load_local_participants(config.local_participants)
    except (ApproverKeyFileError, ValueError) as exc:
        raise GatewayConfigError(f"[participants] key_file: {exc}") from None
    for p in participants:
        expected = config.local_participant_public_keys.get(p.participant_id)
        if expected is not None and expected != p.public_key:
            for q in participants:
                q.close()
            raise GatewayConfigError(
                f"[participants.{p.participant_id}] public_key is not the key in its key_file"
            )
    return participants


def _open_registry(path: Path) -> AccountRegistry:
    try:
        return AccountRegistry(path).open()
    except OSError as exc:
        raise GatewayConfigError(
            f"[accounts] registry: cannot open {path}: {exc.strerror}"
        ) from None
    except AccountRegistryError as exc:
        raise GatewayConfigError(f"[accounts] registry: {exc}") from None


def _open_journal(shares: DkgShares) -> None:
    try:
        shares.open()
    except OSError as exc:
        raise GatewayConfigError(
            f"[dkg] journal: cannot open {shares.journal}: {exc.strerror}"
        ) from None
    except ShareFileError as exc:
        raise GatewayConfigError(f"[dkg] journal: {exc}") from None


def _load_approver(
    files: Mapping[str, Path], *, lifetime_s: float, accounts: tuple[str, ...]
) -> GatewayApprover:
    try:
        return GatewayApprover.load(files, lifetime_s=lifetime_s, accounts=accounts)
    except ApproverKeyFileError as exc:
        raise GatewayConfigError(f"[approvers] keys: {exc}") from None


async def _serve(
    config: GatewayConfig,
    hub: EventHub,
    nodes: list[EnclaveNode],
    coordinator: Coordinator,
    api_token: str,
    token_file: Path | None,
    task_status: trio.TaskStatus[GatewayHandle],
    driver: DkgDriver | None = None,
) -> None:
    async with trio.open_nursery() as nursery:
        events = await nursery.start(
            functools.partial(
                serve_gateway_events,
                config.events_listen,
                hub,
                credentials={n.id: n.events_token for n in config.nodes},
                certfile=config.events_certfile,
                keyfile=config.events_keyfile,
            )
        )
        for node in nodes:
            await nursery.start(node.run)
        await nursery.start(
            functools.partial(
                run_prober,
                nodes,
                interval_s=config.probe_interval_s,
                evict_after_s=config.evict_after_s,
                send_probe=hub.send_probe,
            )
        )
        app = GatewayApi(
            coordinator,
            nodes,
            hub,
            api_token=api_token,
            allowed_hosts=config.api_allowed_hosts,
            dkg=driver,
        )
        api = await nursery.start(functools.partial(serve_asgi, app, config.api_listen, logger=log))
        log.info(
            "gateway ready",
            extra={"api": ",".join(api), "events": ",".join(events), "nodes": len(nodes)},
        )
        participant_url = None
        remote = coordinator.participants
        if remote is not None:
            assert config.participant_listen is not None
            where = parse_address(config.participant_listen)
            port = await nursery.start(
                functools.partial(remote.serve, where.host or "", where.port or 0)
            )
            host = where.host or "127.0.0.1"
            participant_url = f"ws://{host}:{port}{remote.settings.path}"
            log.info(
                "gateway: remote participants at %s (%s)",
                participant_url,
                ", ".join(sorted(remote.keys)),
                extra={"participants": participant_url},
            )
        if driver is not None:
            # The crash rule (key-lifecycle §6) for DKGs left unanswered: by a previous run,
            # or by a request cancelled after its DkgRound3 was sent.
            await nursery.start(driver.run)
        task_status.started(
            GatewayHandle(
                list(api),
                list(events),
                nodes,
                hub,
                coordinator,
                api_token,
                token_file,
                driver,
                participants=remote,
                participant_url=participant_url,
            )
        )
