"""The measured configuration (DESIGN §9): one TOML file baked into the EIF, parsed strictly.

``/etc/trio-sign/enclave.toml`` is part of the image, so it is measured (PCR2 on Nitro; the
local NSM derives its PCRs from the image and this file, :func:`trio_sign.nitro.local_pcrs`).
It holds what decides trust and bounds; nothing the parent sends can change it. Its SHA-256
(of the exact bytes) is :attr:`MeasuredConfig.sha256`: ``GetStatus.config_sha256`` and the
``config`` digest of every attestation document's binding (:mod:`trio_sign.nitro._binding`).

Sections (anything else is refused, naming it)::

    [gateway]
    client_ca_pem = '''
    -----BEGIN CERTIFICATE-----
    ...
    -----END CERTIFICATE-----
    '''                              # the CA of the gateways' client certificates (inline, so
                                     # the file's one hash covers it); required for TLS

    [bundles]
    signing_keys = ["<64 hex>", ...] # Ed25519 public keys whose signatures a base bundle may carry
    delta_identity_key = "<64 hex>"  # optional: the enclave's delta identity key (public half)
    compaction_kms_keys = ["arn:aws:kms:...:key/..."]  # optional: KMS keys a compaction may
                                     # seal a new base under (docs/compaction.md)

    [limits]                         # every key optional; defaults in docs/attested-channel.md
    max_sessions = 10000
    session_ttl_s = 60.0
    approval_clock_tolerance_s = 30.0
    approval_max_lifetime_s = 600.0
    ...

    [approvers.<key_id>]             # issue 14 (DESIGN §11), docs/approvals.md
    type = "ed25519"                 # or "p256"
    public_key = "<hex>"

    [policies.<name>]                # accounts pick one by name in their share record
    approvers = ["<key_id>", ...]
    threshold = 2                    # k of n
    max_message_bytes = 65536        # optional
    rate_per_minute = 60             # optional

    [dkg]                            # issue 16 (DESIGN §13, docs/key-lifecycle.md §5)
    participants = { ops-signer = "<64 hex>", backup = "<64 hex>" }
                                     # key_id -> the Ed25519 key that signs that participant's
                                     # round-1 packages ("enclave" is reserved: the enclave's
                                     # own packages are signed by its delta identity key)
    ttl_s = 300.0                    # an open DKG expires (and its secrets are zeroed) after this
    max_open = 64                    # open DKGs at once (each also takes a session-pool slot)
    store_retries = 5                # re-seals after a delta_conflict before giving up

Without a ``[policies.default]`` no account may leave its record's ``policy`` out (the
preload refuses it): only the built-in development configuration has an open ``default``
(no approvals), and it says so loudly. Without ``[dkg]`` the enclave takes part in no DKG
(the ``DkgRound`` RPCs answer FAILED_PRECONDITION); DKGs are authorized by the policy named
``create`` (``[policies.create]``).

Where a command-line flag exists for a ``[limits]`` key (``--max-sessions``...), a flag that
is given wins over the file: in the EIF the command line is the image's ``CMD``, measured into
PCR0 just as this file is into PCR2, and it sets none of these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from .._errors import TrioSignError
from ..authz import DEVELOPMENT_POLICIES, PolicyConfigError, PolicySet, parse_policies
from ..authz._keys import KEY_ID_PATTERN
from ..crypto._sodium import is_valid_point

#: Where the EIF installs the file (``enclave_image/Dockerfile``); ``--config`` changes it.
DEFAULT_CONFIG_PATH: Final = Path("/etc/trio-sign/enclave.toml")
#: Largest configuration file read (a CA bundle and a few hundred keys fit many times over).
MAX_CONFIG_BYTES: Final = 1024 * 1024
#: Most bundle signing keys accepted.
MAX_SIGNING_KEYS: Final = 64
#: Most KMS keys ``[bundles] compaction_kms_keys`` may list.
MAX_COMPACTION_KMS_KEYS: Final = 16
#: A KMS key ARN (``arn:PARTITION:kms:REGION:ACCOUNT:key/ID``): aliases are refused, since
#: whoever administers an alias can point it at another key.
_KMS_KEY_ARN: Final = re.compile(
    r"arn:[a-z0-9-]{1,32}:kms:[a-z0-9-]{1,32}:[0-9]{12}:key/[A-Za-z0-9-]{1,128}"
)
#: What ``--dev`` without ``--config`` runs with, and the local enclave without ``[enclave]
#: config``: the gateway client CA is a placeholder whose private key was discarded when it was
#: made, so the TLS port accepts no client (the public port and the parent's checks work); no
#: bundle keys. Its local PCRs are ``DEFAULT_LOCAL_PCRS``.
DEVELOPMENT_CONFIG: Final = b"""\
# trio-sign: the built-in DEVELOPMENT configuration (no --config / no [enclave] config).
# Never for production: the EIF installs its own /etc/trio-sign/enclave.toml.
# The gateway client CA below is a placeholder whose private key was discarded when it was
# made: no client certificate chains to it, so the TLS port (50051) accepts no gateway.
# Give the enclave your own file (--config, parent.toml [enclave] config) to serve one.

[gateway]
client_ca_pem = '''
-----BEGIN CERTIFICATE-----
MIIBpTCCAUugAwIBAgIBATAKBggqhkjOPQQDAjBHMUUwQwYDVQQDDDx0cmlvLXNp
Z24gZGV2ZWxvcG1lbnQgcGxhY2Vob2xkZXIgQ0EgKHByaXZhdGUga2V5IGRpc2Nh
cmRlZCkwIBcNMjYwMTAxMDAwMDAwWhgPMjA1NTEyMjUwMDAwMDBaMEcxRTBDBgNV
BAMMPHRyaW8tc2lnbiBkZXZlbG9wbWVudCBwbGFjZWhvbGRlciBDQSAocHJpdmF0
ZSBrZXkgZGlzY2FyZGVkKTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABEZCcyj1
RBNXrsPzhg7wtZGChTBokOHa0lSBCXVa8cquqHxIDyJ5irH8+8+W7FgrUW176AqP
d18cTBsIAr6YP6WjJjAkMBIGA1UdEwEB/wQIMAYBAf8CAQAwDgYDVR0PAQH/BAQD
AgEGMAoGCCqGSM49BAMCA0gAMEUCIQDRMJaYwTXwPhyOd91wKJCeZWY4kGsOxpU2
1stjXZNIZwIgYiGWJMbyyUNoHyky0/J+j+Mqewa0jRk4Pj7AqCdGU5w=
-----END CERTIFICATE-----
'''

[limits]
max_sessions = 10000
session_ttl_s = 60.0

# NO AUTHORIZATION: every account's policy "default" needs no approvals (DESIGN section 11),
# so this enclave signs any message it is asked to. A real file names approvers and a
# threshold of at least 1 (docs/approvals.md).
[policies.default]
approvers = []
threshold = 0
"""

_DEVELOPMENT_SHA256: Final = hashlib.sha256(DEVELOPMENT_CONFIG).digest()

_SECTIONS: Final = ("gateway", "bundles", "limits", "approvers", "policies", "dkg")
#: The key id of the enclave itself in a DKG's participant list (docs/key-lifecycle.md §5).
ENCLAVE_KEY_ID: Final = "enclave"
#: Most DKG participant keys accepted in ``[dkg] participants``.
MAX_DKG_PARTICIPANT_KEYS: Final = 256
DEFAULT_DKG_TTL_S: Final = 300.0
DEFAULT_DKG_MAX_OPEN: Final = 64
DEFAULT_DKG_STORE_RETRIES: Final = 5


@dataclass(frozen=True, slots=True)
class DkgSettings:
    """``[dkg]`` (DESIGN §13): who may take part in a DKG with this enclave, and its bounds.

    Attributes:
        participants: key id -> the Ed25519 public key (32 bytes) that signs that participant's
            round-1 packages.
        ttl_s: how long an open DKG lives from its round 1; then its secrets are zeroed.
        max_open: DKGs open at once (each also holds a session-pool slot while open).
        store_retries: how often a delta that lost a ``delta_conflict`` is sealed again on the
            new head before the DKG fails (the delta writer's setting).
    """

    participants: Mapping[str, bytes] = field(default_factory=dict)
    ttl_s: float = DEFAULT_DKG_TTL_S
    max_open: int = DEFAULT_DKG_MAX_OPEN
    store_retries: int = DEFAULT_DKG_STORE_RETRIES

    def __repr__(self) -> str:
        return (
            f"DkgSettings(participants={sorted(self.participants)!r}, ttl_s={self.ttl_s:g}, "
            f"max_open={self.max_open}, store_retries={self.store_retries})"
        )


class MeasuredConfigError(TrioSignError):
    """The measured configuration file was refused (one line naming the key; exit 2).

    ``reason`` is ``config``, or for ``[approvers]``/``[policies]`` the policy refusal's own
    (``unknown_approver``, ``impossible_threshold``, ``unknown_key_type``, ``bad_approver``,
    ``bad_policy``: :mod:`trio_sign.authz._policy`).
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str, reason: str = "config") -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Int:
    minimum: int
    maximum: int = 2**63 - 1


@dataclass(frozen=True, slots=True)
class _Float:
    minimum: float
    exclusive: bool = True  # the minimum itself is refused
    maximum: float = math.inf


@dataclass(frozen=True, slots=True)
class _Choice:
    values: tuple[str, ...]


#: ``[limits]``: key -> what it must be. Each is an :class:`~trio_sign.enclave.EnclaveConfig`
#: field (``max_connections`` and ``idle_timeout_s`` are the gRPC server's, in ``grpc_limits``).
LIMITS: Final[Mapping[str, _Int | _Float | _Choice]] = {
    "max_sessions": _Int(1, 10_000_000),
    "session_ttl_s": _Float(0.0),
    "drain_grace_s": _Float(0.0, exclusive=False),
    "max_sign_request_bytes": _Int(1, 64 * 1024 * 1024),
    "max_connections": _Int(1, 1_000_000),
    "idle_timeout_s": _Float(0.0),
    "tls_handshake_timeout_s": _Float(0.0),
    "max_tls_handshakes": _Int(1, 100_000),
    "max_tls_handshake_rate": _Float(0.0),
    "preload_timeout_s": _Float(0.0),
    "verify_shares": _Choice(("lazy", "full")),
    "memory_alarm_fraction": _Float(0.0, maximum=1.0),
    "memory_hard_fraction": _Float(0.0, maximum=1.0),
    "approval_clock_tolerance_s": _Float(0.0, exclusive=False, maximum=3600.0),
    "approval_max_lifetime_s": _Float(0.0, maximum=7 * 24 * 3600.0),
}


@dataclass(frozen=True, slots=True)
class MeasuredConfig:
    """A parsed ``enclave.toml``.

    Attributes:
        source: where it came from (a path, or ``"built-in development configuration"``).
        sha256: SHA-256 of the file's exact bytes (32 bytes; ``.hex()`` for display).
        client_ca_pem: the gateway client CA(s), PEM; None: no TLS possible (development).
        signing_keys: the Ed25519 public keys (32 bytes each) a base bundle may be signed by.
        delta_identity_key: the delta identity key's Ed25519 public key, or None.
        compaction_kms_keys: the KMS key ARNs a compaction may seal a new base under
            (``[bundles] compaction_kms_keys``, docs/compaction.md); empty: no compaction.
        limits: the ``[limits]`` keys the file sets (others keep their defaults).
        policies: the ``[approvers]`` and ``[policies]`` (DESIGN §11); the development
            configuration's is an open ``default`` (no approvals).
        dkg: the ``[dkg]`` section, or None (this enclave takes part in no DKG).
        development: the built-in development configuration (``--dev`` without ``--config``).
    """

    source: str
    sha256: bytes
    client_ca_pem: str | None = None
    signing_keys: tuple[bytes, ...] = ()
    delta_identity_key: bytes | None = None
    compaction_kms_keys: tuple[str, ...] = ()
    limits: Mapping[str, int | float | str] = field(default_factory=dict)
    policies: PolicySet = field(default_factory=PolicySet)
    dkg: DkgSettings | None = None
    development: bool = False

    def __repr__(self) -> str:
        return (
            f"MeasuredConfig(source={self.source!r}, sha256={self.sha256.hex()}, "
            f"client_ca={'yes' if self.client_ca_pem else 'no'}, "
            f"signing_keys={len(self.signing_keys)}, limits={dict(self.limits)!r}, "
            f"policies={sorted(self.policies.policies)!r}, dkg={self.dkg!r})"
        )


def load_measured_config(path: str | Path) -> MeasuredConfig:
    """Read and parse the file at ``path`` (see :func:`parse_measured_config`).

    Raises:
        MeasuredConfigError: the file cannot be read, is too large, or is refused.
    """
    name = str(path)
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise MeasuredConfigError(
            f"cannot read the measured configuration: {exc.strerror or exc} (--config FILE)",
            path=name,
        ) from exc
    return parse_measured_config(data, source=name)


def development_config() -> MeasuredConfig:
    """The built-in development configuration (:data:`DEVELOPMENT_CONFIG`)."""
    parsed = parse_measured_config(DEVELOPMENT_CONFIG, source="built-in development configuration")
    return dataclasses.replace(parsed, development=True, policies=DEVELOPMENT_POLICIES)


def parse_measured_config(data: bytes, *, source: str = "enclave.toml") -> MeasuredConfig:
    """Parse ``enclave.toml`` bytes strictly.

    Unknown sections and keys, wrong types (a boolean is not a number), values out of range,
    a CA that does not load or is not a CA, and keys that are not 64 hex digits of a valid
    Ed25519 point are refused, each naming the key.

    Raises:
        MeasuredConfigError: what was wrong, in one line.
    """
    if len(data) > MAX_CONFIG_BYTES:
        raise MeasuredConfigError(f"larger than {MAX_CONFIG_BYTES} bytes", path=source)
    digest = hashlib.sha256(data).digest()
    try:
        text = data.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError:
        raise MeasuredConfigError("not UTF-8 text", path=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise MeasuredConfigError(f"not valid TOML: {exc}", path=source) from None

    def fail(message: str) -> MeasuredConfigError:
        return MeasuredConfigError(message, path=source)

    for name, value in document.items():
        if name not in _SECTIONS:
            known = ", ".join(f"[{n}]" for n in _SECTIONS)
            raise fail(f"unknown section [{name}] (known: {known})")
        if not isinstance(value, dict):
            raise fail(f"{name} must be a table ([{name}])")
    gateway = document.get("gateway", {})
    bundles = document.get("bundles", {})
    limits = document.get("limits", {})
    _known_keys(gateway, "gateway", ("client_ca_pem",), fail)
    _known_keys(
        bundles, "bundles", ("signing_keys", "delta_identity_key", "compaction_kms_keys"), fail
    )
    _known_keys(limits, "limits", tuple(LIMITS), fail)

    client_ca = gateway.get("client_ca_pem")
    if client_ca is not None:
        client_ca = _check_ca(client_ca, fail)
    keys: list[bytes] = []
    raw_keys = bundles.get("signing_keys", [])
    if not isinstance(raw_keys, list):
        raise fail("[bundles] signing_keys must be a list of hex Ed25519 public keys")
    if len(raw_keys) > MAX_SIGNING_KEYS:
        raise fail(f"[bundles] signing_keys has more than {MAX_SIGNING_KEYS} keys")
    for i, value in enumerate(raw_keys):
        key = _ed25519_key(value, f"[bundles] signing_keys[{i}]", fail)
        if key in keys:
            raise fail(f"[bundles] signing_keys[{i}] repeats an earlier key")
        keys.append(key)
    identity = bundles.get("delta_identity_key")
    delta_key = (
        None if identity is None else _ed25519_key(identity, "[bundles] delta_identity_key", fail)
    )
    compaction_keys = _compaction_kms_keys(bundles.get("compaction_kms_keys", []), fail)
    checked: dict[str, int | float | str] = {}
    for name, value in limits.items():
        checked[name] = _check_limit(name, value, fail)
    alarm = checked.get("memory_alarm_fraction")
    hard = checked.get("memory_hard_fraction")
    if isinstance(alarm, float) and isinstance(hard, float) and alarm >= hard:
        raise fail("[limits] memory_alarm_fraction must be below memory_hard_fraction")
    try:
        policies = parse_policies(document.get("approvers", {}), document.get("policies", {}))
    except PolicyConfigError as exc:
        raise MeasuredConfigError(str(exc), path=source, reason=exc.reason) from None
    dkg = None if "dkg" not in document else _dkg_settings(document["dkg"], fail)
    if digest == _DEVELOPMENT_SHA256:  # the development file, also when read from a path
        policies = DEVELOPMENT_POLICIES
    return MeasuredConfig(
        source=source,
        sha256=digest,
        client_ca_pem=client_ca,
        signing_keys=tuple(keys),
        delta_identity_key=delta_key,
        compaction_kms_keys=compaction_keys,
        limits=checked,
        policies=policies,
        dkg=dkg,
    )


def _compaction_kms_keys(raw: Any, fail: Any) -> tuple[str, ...]:
    """``[bundles] compaction_kms_keys``: distinct KMS key ARNs (no aliases)."""
    name = "[bundles] compaction_kms_keys"
    if not isinstance(raw, list):
        raise fail(f"{name} must be a list of KMS key ARNs")
    if len(raw) > MAX_COMPACTION_KMS_KEYS:
        raise fail(f"{name} has more than {MAX_COMPACTION_KMS_KEYS} keys")
    keys: list[str] = []
    for i, value in enumerate(raw):
        if not isinstance(value, str) or _KMS_KEY_ARN.fullmatch(value) is None:
            raise fail(
                f"{name}[{i}] must be a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID; "
                "no alias, which its administrator could point at another key)"
            )
        if value in keys:
            raise fail(f"{name}[{i}] repeats an earlier key")
        keys.append(value)
    return tuple(keys)


def _dkg_settings(table: Mapping[str, Any], fail: Any) -> DkgSettings:
    """``[dkg]``, every key checked and named when refused."""
    _known_keys(table, "dkg", ("participants", "ttl_s", "max_open", "store_retries"), fail)
    raw = table.get("participants")
    if not isinstance(raw, dict) or not raw:
        raise fail(
            '[dkg] participants must be a table of key_id = "<64 hex Ed25519 public key>" '
            "naming at least one participant"
        )
    if len(raw) > MAX_DKG_PARTICIPANT_KEYS:
        raise fail(f"[dkg] participants has more than {MAX_DKG_PARTICIPANT_KEYS} keys")
    participants: dict[str, bytes] = {}
    for key_id, value in raw.items():
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise fail(
                f"[dkg] participants: {key_id[:64]!r} is not a key id (1..64 of A-Z a-z 0-9 "
                "._:@-, starting with a letter or digit)"
            )
        if key_id == ENCLAVE_KEY_ID:
            raise fail(
                f"[dkg] participants: {ENCLAVE_KEY_ID!r} is reserved for this enclave (its "
                "round-1 packages are signed by [bundles] delta_identity_key)"
            )
        key = _ed25519_key(value, f"[dkg] participants.{key_id}", fail)
        if key in participants.values():
            raise fail(f"[dkg] participants.{key_id} repeats another participant's key")
        participants[key_id] = key
    ttl = table.get("ttl_s", DEFAULT_DKG_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise fail("[dkg] ttl_s must be a number")
    if not math.isfinite(ttl) or not 0 < ttl <= 24 * 3600:
        raise fail("[dkg] ttl_s must be > 0 and <= 86400")
    settings = {"max_open": DEFAULT_DKG_MAX_OPEN, "store_retries": DEFAULT_DKG_STORE_RETRIES}
    for name, low, high in (("max_open", 1, 100_000), ("store_retries", 0, 100)):
        value = table.get(name, settings[name])
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"[dkg] {name} must be an integer")
        if not low <= value <= high:
            raise fail(f"[dkg] {name} must be in {low}..{high}")
        settings[name] = value
    return DkgSettings(
        participants=participants,
        ttl_s=float(ttl),
        max_open=settings["max_open"],
        store_retries=settings["store_retries"],
    )


def _known_keys(table: Mapping[str, Any], section: str, known: tuple[str, ...], fail: Any) -> None:
    for key in table:
        if key not in known:
            raise fail(f"unknown key {key!r} in [{section}] (known: {', '.join(known)})")


def _check_ca(value: object, fail: Any) -> str:
    where = "[gateway] client_ca_pem"
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        raise fail(f"{where} must be PEM text (-----BEGIN CERTIFICATE----- ...)")
    try:
        certificates = x509.load_pem_x509_certificates(value.encode())
    except ValueError as exc:
        raise fail(f"{where} is not a PEM certificate: {exc}") from None
    for cert in certificates:
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise fail(
                f"{where}: {cert.subject.rfc4514_string() or 'a certificate'} is not a CA "
                "(basicConstraints CA:TRUE)"
            )
    try:  # what the TLS server will do with it
        ssl.create_default_context(cadata=value)
    except ssl.SSLError as exc:
        raise fail(f"{where} does not load as a CA: {exc.reason or exc}") from None
    return value


def _ed25519_key(value: object, where: str, fail: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise fail(f"{where} must be 64 hex digits (an Ed25519 public key)")
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise fail(f"{where} must be 64 hex digits (an Ed25519 public key)") from None
    if not is_valid_point(key):
        raise fail(f"{where} is not a valid Ed25519 public key")
    return key


def _check_limit(name: str, value: object, fail: Any) -> int | float | str:
    rule = LIMITS[name]
    where = f"[limits] {name}"
    if isinstance(rule, _Choice):
        if not isinstance(value, str) or value not in rule.values:
            raise fail(f"{where} must be one of {', '.join(repr(v) for v in rule.values)}")
        return value
    if isinstance(rule, _Int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{where} must be an integer")
        if not rule.minimum <= value <= rule.maximum:
            raise fail(f"{where} must be in {rule.minimum}..{rule.maximum}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"{where} must be a number")
    number = float(value)
    low_ok = number > rule.minimum if rule.exclusive else number >= rule.minimum
    if not math.isfinite(number) or not low_ok or number > rule.maximum:
        bound = ">" if rule.exclusive else ">="
        top = "" if math.isinf(rule.maximum) else f" and <= {rule.maximum:g}"
        raise fail(f"{where} must be {bound} {rule.minimum:g}{top}")
    return number


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEVELOPMENT_CONFIG",
    "ENCLAVE_KEY_ID",
    "LIMITS",
    "DkgSettings",
    "MeasuredConfig",
    "MeasuredConfigError",
    "development_config",
    "load_measured_config",
    "parse_measured_config",
]
