"""``parent.toml``: the parent supervisor's settings, parsed into one frozen object.

Every error names the key and says what is expected. Example (local development)::

    [bundle]
    source = "demo-out/service_key_shares.json.enc"    # or "s3://bucket/key"
    work_dir = "/run/trio-sign"                          # tmpfs; the copy is deleted after preload
    fetch_timeout_s = 600                                # the copy (local or S3) must end by then

    [kms]
    mode = "local"                                       # "aws" | "local" | "dev-key"
    endpoint_url = "http://127.0.0.1:4599"               # local KMS (trio-sign kms-local)
    region = "us-east-1"

    [enclave]
    backend = "local"                                    # "local" | "nitro-cli"
    nsm_dir = "demo-out/nsm"                             # local: the local NSM's root
    namespaces = "auto"                                  # local: "auto" | "always" | "never"
    config = "enclave.toml"                              # local: the measured configuration the
                                                         # local enclave runs (its gateway CA; its
                                                         # PCRs follow it); default: the built-in
                                                         # development one (no gateway accepted)
    # nitro-cli: eif_path, cpu_count, memory_mib, cid
    launch_timeout_s = 120                               # nitro-cli run-enclave / process start
    preload_timeout_s = 300                              # the enclave's whole preload
    start_timeout_s = 60                                 # after preload, until it says "serving"
    grpc_port = 50051
    gateway_url = "https://gateway.internal:8443"        # sent to the enclave for its SSE stream
    node_id = "node-a"                                   # ... /v1/enclaves/node-a/events
    drain_timeout_s = 20                                 # on stop: drain, then terminate

    [ingress]                                            # a byte pipe: TLS ends in the enclave
    listen = "tcp://0.0.0.0:50051"

    [attestation]
    root = "demo-out/nsm/local-nsm-root.pem"             # default: the AWS Nitro root
    pcr0 = "..."                                         # hex; pcr1, pcr2 required, pcr8 optional
    allow_debug = false
    interval_s = 60

    [failure]
    restart = false
    alert_command = ["/usr/local/bin/page-oncall"]

    [logs]
    file = "/var/log/trio-sign/enclave.jsonl"            # default: stdout
    cloudwatch_group = "/trio-sign/enclave"              # optional
    cloudwatch_stream = "i-0123456789abcdef0"

    [relay]
    allowlist = ["https://gateway.internal:8443/v1/enclaves/"]
    ca = "certs/gateway-ca.pem"                          # optional: a private CA for the gateway
    token_file = "/etc/trio-sign/events.token"           # this node's bearer token at the gateway

    [health]
    listen = "tcp://127.0.0.1:8080"

    [deltas]                                             # optional: accounts made by DKG
    location = "file:///var/lib/trio-sign/deltas"        # or "s3://bucket/prefix/"
    poll_interval_s = 1                                  # how often the store is listed
    max_delta_bytes = 16777216                           # largest delta stored or served
    deltas_port = 7003                                   # the enclave's deltas channel (vsock)

    [identity]                                           # optional: the delta identity key
    sealed_file = "/var/lib/trio-sign/delta-identity.sealed.json"  # sent to the enclave every
                                                         # boot; written by --genesis
    kms_key_id = "arn:aws:kms:...:key/..."               # --genesis only: the KMS key that
                                                         # seals it (GenerateDataKey, Recipient)

``trio-sign parent --genesis`` (docs/runbook.md §7) boots the enclave once to create the key,
writes ``sealed_file`` (never over an existing one) and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .._errors import TrioSignError
from ._ingress import IngressSettings

log = logging.getLogger("trio_sign.parent")

#: Bytes of a PCR value (SHA-384).
PCR_BYTES = 48


class ConfigError(TrioSignError):
    """``parent.toml`` is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class BundleConfig:
    source: str
    work_dir: Path
    fetch_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class KmsConfig:
    mode: str  # "aws" | "local" | "dev-key"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    dev_key: Path | None = None


@dataclass(frozen=True, slots=True)
class EnclaveLaunchConfig:
    backend: str  # "local" | "nitro-cli"
    preload_timeout_s: float = 300.0
    grpc_port: int = 50051
    gateway_url: str | None = None
    node_id: str = "enclave-0"
    drain_timeout_s: float = 20.0
    launch_timeout_s: float = 120.0
    start_timeout_s: float = 60.0
    # local
    nsm_dir: Path | None = None
    namespaces: str = "auto"
    config: Path | None = None
    # nitro-cli
    eif_path: Path | None = None
    cpu_count: int = 2
    memory_mib: int = 4096
    cid: int = 16


@dataclass(frozen=True, slots=True)
class IngressConfig:
    """The byte pipe to the enclave's gRPC port (TLS ends inside the enclave)."""

    listen: str
    settings: IngressSettings = field(default_factory=IngressSettings)


#: ``[ingress]`` keys of the TLS-terminating ingress, accepted and ignored with a warning.
INGRESS_RETIRED: Final = frozenset(
    {"cert", "key", "client_ca", "max_handshakes", "handshake_timeout_s"}
)


@dataclass(frozen=True, slots=True)
class AttestationConfig:
    root: Path | None  # None: the AWS Nitro root
    pcrs: Mapping[int, bytes]
    allow_debug: bool = False
    interval_s: float = 60.0
    max_age_s: float = 60.0


@dataclass(frozen=True, slots=True)
class FailureConfig:
    restart: bool = False
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0
    alert_command: tuple[str, ...] = ()


#: ``[deltas] max_delta_bytes`` by default, and its ceiling.
DEFAULT_MAX_DELTA_BYTES: Final = 16 * 1024 * 1024
MAX_MAX_DELTA_BYTES: Final = 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DeltasConfig:
    """Where the delta bundles live (docs/key-lifecycle.md §3) and how they move.

    ``location`` is ``file://`` followed by a path (relative paths are relative to
    parent.toml, made absolute here) or ``s3://bucket/prefix/``."""

    location: str
    poll_interval_s: float = 1.0
    max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES
    deltas_port: int = 7003

    @property
    def directory(self) -> Path | None:
        """The directory of a ``file://`` location (None for S3)."""
        if self.location.startswith("file://"):
            return Path(self.location.removeprefix("file://"))
        return None


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """The delta identity key's sealed file (public data, docs/runbook.md §7) and, for a
    genesis, the KMS key that seals it."""

    sealed_file: Path
    kms_key_id: str | None = None


@dataclass(frozen=True, slots=True)
class ParentConfig:
    bundle: BundleConfig
    kms: KmsConfig
    enclave: EnclaveLaunchConfig
    ingress: IngressConfig | None
    attestation: AttestationConfig | None
    failure: FailureConfig = field(default_factory=FailureConfig)
    health_listen: str = "tcp://127.0.0.1:8080"
    relay_allowlist: tuple[str, ...] = ()
    relay_ca: Path | None = None
    relay_token: str | None = field(default=None, repr=False)  # a secret: never in reprs
    log_file: Path | None = None
    cloudwatch_group: str | None = None
    cloudwatch_stream: str | None = None
    cloudwatch_region: str | None = None
    deltas: DeltasConfig | None = None
    identity: IdentityConfig | None = None


def _table(data: Mapping[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError(f"missing section [{name}]")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _get(table: Mapping[str, Any], section: str, key: str, kind: type, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"[{section}] {key} is required")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"[{section}] {key} must be a {kind.__name__}, got {value!r}")
    return value


def _number(
    table: Mapping[str, Any],
    section: str,
    key: str,
    kind: type,
    default: Any,
    *,
    low: float,
    high: float | None = None,
    low_inclusive: bool = False,
) -> Any:
    """A number in range: above ``low`` (or at it, if ``low_inclusive``), at most ``high``."""
    value = _get(table, section, key, kind, default)
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value > high) or value != value:
        bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
        if high is not None:
            bound += f" and <= {high:g}"
        raise ConfigError(f"[{section}] {key} must be {bound}, got {value!r}")
    return value


def _address(table: Mapping[str, Any], section: str, key: str, default: str) -> str:
    """An address URL (tcp://, unix://, vsock://) that parses, with a port in range."""
    from ..transport import TransportError, parse_address

    value: str = _get(table, section, key, str, default)
    try:
        parse_address(value)
    except TransportError as exc:
        raise ConfigError(f"[{section}] {key}: {exc}") from None
    return value


def _choice(
    table: Mapping[str, Any], section: str, key: str, choices: tuple[str, ...], default: Any = ...
) -> str:
    value: str = _get(table, section, key, str, default)
    if value not in choices:
        raise ConfigError(f"[{section}] {key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _unknown(table: Mapping[str, Any], section: str, known: set[str]) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError(f"[{section}] has unknown key {extra[0]!r}")


def parse_parent_config(text: str, *, base: Path = Path(".")) -> ParentConfig:
    """Parse ``parent.toml`` text; relative paths are relative to ``base``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    _unknown(
        data,
        "top level",
        {
            "bundle",
            "kms",
            "enclave",
            "ingress",
            "attestation",
            "failure",
            "health",
            "relay",
            "logs",
            "deltas",
            "identity",
        },
    )

    b = _table(data, "bundle")
    _unknown(b, "bundle", {"source", "work_dir", "fetch_timeout_s"})
    source = _get(b, "bundle", "source", str)
    if not source.startswith("s3://"):
        source = str(base / source)  # relative to parent.toml, like every other path
    bundle = BundleConfig(
        source=source,
        # absolute: the local backend makes unix:// socket URLs from it
        work_dir=(base / _get(b, "bundle", "work_dir", str, "/run/trio-sign")).absolute(),
        fetch_timeout_s=_number(b, "bundle", "fetch_timeout_s", float, 600.0, low=0),
    )
    if bundle.source.startswith("s3://"):
        bucket, _, key = bundle.source.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ConfigError(f"[bundle] source {bundle.source!r}: expected s3://bucket/key")

    k = _table(data, "kms")
    _unknown(k, "kms", {"mode", "endpoint_url", "region", "dev_key"})
    mode = _choice(k, "kms", "mode", ("aws", "local", "dev-key"))
    kms = KmsConfig(
        mode=mode,
        endpoint_url=_get(k, "kms", "endpoint_url", str, None),
        region=_get(k, "kms", "region", str, "us-east-1"),
        dev_key=(base / k["dev_key"]) if "dev_key" in k else None,
    )
    if kms.endpoint_url is not None and not kms.endpoint_url.startswith(("http://", "https://")):
        raise ConfigError(f"[kms] endpoint_url {kms.endpoint_url!r}: expected http(s)://HOST:PORT")
    if mode == "local" and kms.endpoint_url is None:
        raise ConfigError('[kms] endpoint_url is required with mode = "local"')
    if mode == "dev-key" and kms.dev_key is None:
        raise ConfigError('[kms] dev_key is required with mode = "dev-key"')

    e = _table(data, "enclave")
    _unknown(
        e,
        "enclave",
        {
            "backend",
            "preload_timeout_s",
            "grpc_port",
            "nsm_dir",
            "namespaces",
            "config",
            "eif_path",
            "cpu_count",
            "memory_mib",
            "cid",
            "gateway_url",
            "node_id",
            "drain_timeout_s",
            "launch_timeout_s",
            "start_timeout_s",
        },
    )
    backend = _choice(e, "enclave", "backend", ("local", "nitro-cli"))
    enclave = EnclaveLaunchConfig(
        backend=backend,
        preload_timeout_s=_number(e, "enclave", "preload_timeout_s", float, 300.0, low=0),
        grpc_port=_number(
            e, "enclave", "grpc_port", int, 50051, low=1, high=65535, low_inclusive=True
        ),
        gateway_url=_get(e, "enclave", "gateway_url", str, None),
        node_id=_get(e, "enclave", "node_id", str, "enclave-0"),
        drain_timeout_s=_number(
            e, "enclave", "drain_timeout_s", float, 20.0, low=0, low_inclusive=True
        ),
        launch_timeout_s=_number(e, "enclave", "launch_timeout_s", float, 120.0, low=0),
        start_timeout_s=_number(e, "enclave", "start_timeout_s", float, 60.0, low=0),
        nsm_dir=(base / e["nsm_dir"]) if "nsm_dir" in e else None,
        namespaces=_choice(e, "enclave", "namespaces", ("auto", "always", "never"), "auto"),
        config=(base / _get(e, "enclave", "config", str, "")) if "config" in e else None,
        eif_path=(base / e["eif_path"]) if "eif_path" in e else None,
        cpu_count=_number(e, "enclave", "cpu_count", int, 2, low=1, low_inclusive=True),
        memory_mib=_number(e, "enclave", "memory_mib", int, 4096, low=64, low_inclusive=True),
        # CIDs 0-2 are the hypervisor, the local loopback and the parent
        cid=_number(e, "enclave", "cid", int, 16, low=3, high=2**32 - 2, low_inclusive=True),
    )
    if backend == "local" and enclave.nsm_dir is None:
        raise ConfigError('[enclave] nsm_dir is required with backend = "local"')
    if backend == "nitro-cli" and enclave.eif_path is None:
        raise ConfigError('[enclave] eif_path is required with backend = "nitro-cli"')
    if backend == "nitro-cli" and enclave.config is not None:
        raise ConfigError(
            '[enclave] config is for backend = "local": an EIF carries its own enclave.toml'
        )

    ingress = None
    i = _table(data, "ingress", required=False)
    if i:
        limits = {
            "max_connections": int,
            "max_pending": int,
            "first_byte_timeout_s": float,
            "idle_timeout_s": float,
            "evict_quiet_s": float,
            "setups_per_batch": int,
            "socket_buffer_bytes": int,
            "per_source_rate": float,
            "per_source_burst": int,
            "per_source_max_wait_s": float,
        }
        retired = sorted(key for key in i if key in INGRESS_RETIRED)
        # Retired keys are tolerated (an older parent.toml still starts), not settings.
        _unknown(
            {k: v for k, v in i.items() if k not in INGRESS_RETIRED}, "ingress", {"listen", *limits}
        )
        if retired:
            # TLS ends inside the enclave (issue 13): the enclave checks the gateway's
            # certificate against the CA in its measured enclave.toml, and bounds handshakes.
            log.warning(
                "[ingress] %s ignored: the ingress is a byte pipe and TLS ends inside the "
                "enclave (the gateway client CA and the handshake limits are in enclave.toml)",
                ", ".join(retired),
            )
        defaults = IngressSettings()
        values = {}
        for key, kind in limits.items():
            value = _get(i, "ingress", key, kind, getattr(defaults, key))
            if not value > 0:
                raise ConfigError(f"[ingress] {key} must be positive, got {value!r}")
            values[key] = value
        ingress = IngressConfig(
            listen=_address(i, "ingress", "listen", "tcp://0.0.0.0:50051"),
            settings=dataclasses.replace(defaults, **values),
        )

    attestation = None
    a = _table(data, "attestation", required=False)
    if a:
        _unknown(
            a,
            "attestation",
            {"root", "pcr0", "pcr1", "pcr2", "pcr8", "allow_debug", "interval_s", "max_age_s"},
        )
        pcrs: dict[int, bytes] = {}
        for index in (0, 1, 2, 8):
            key = f"pcr{index}"
            if key not in a:
                if index == 8:
                    continue
                raise ConfigError(f"[attestation] {key} is required (hex, from the EIF build)")
            try:
                pcrs[index] = bytes.fromhex(_get(a, "attestation", key, str))
            except ValueError:
                raise ConfigError(f"[attestation] {key} must be hex") from None
            if len(pcrs[index]) != PCR_BYTES:
                raise ConfigError(
                    f"[attestation] {key} must be {PCR_BYTES} bytes ({2 * PCR_BYTES} hex "
                    f"digits, SHA-384), got {len(pcrs[index])}"
                )
        attestation = AttestationConfig(
            root=(base / a["root"]) if "root" in a else None,
            pcrs=pcrs,
            allow_debug=_get(a, "attestation", "allow_debug", bool, False),
            interval_s=_number(a, "attestation", "interval_s", float, 60.0, low=0),
            max_age_s=_number(a, "attestation", "max_age_s", float, 60.0, low=0),
        )
    if ingress is not None and attestation is None:
        raise ConfigError(
            "[ingress] needs [attestation]: the proxy forwards only to a verified enclave"
        )

    f = _table(data, "failure", required=False)
    _unknown(f, "failure", {"restart", "backoff_initial_s", "backoff_max_s", "alert_command"})
    alert_command = _get(f, "failure", "alert_command", list, [])
    if not all(isinstance(part, str) for part in alert_command):
        raise ConfigError("[failure] alert_command must be a list of strings")
    failure = FailureConfig(
        restart=_get(f, "failure", "restart", bool, False),
        backoff_initial_s=_number(f, "failure", "backoff_initial_s", float, 5.0, low=0),
        backoff_max_s=_number(f, "failure", "backoff_max_s", float, 300.0, low=0),
        alert_command=tuple(alert_command),
    )
    if failure.backoff_max_s < failure.backoff_initial_s:
        raise ConfigError("[failure] backoff_max_s must be >= backoff_initial_s")

    h = _table(data, "health", required=False)
    _unknown(h, "health", {"listen"})
    r = _table(data, "relay", required=False)
    _unknown(r, "relay", {"allowlist", "ca", "token", "token_file"})
    allowlist = _get(r, "relay", "allowlist", list, [])
    if not all(isinstance(entry, str) for entry in allowlist):
        raise ConfigError("[relay] allowlist must be a list of URL strings")
    relay_token = _relay_token(r, base)
    _check_events_settings(enclave, allowlist)
    logs = _table(data, "logs", required=False)
    _unknown(logs, "logs", {"file", "cloudwatch_group", "cloudwatch_stream", "cloudwatch_region"})
    group = _get(logs, "logs", "cloudwatch_group", str, None)
    if group is not None and "cloudwatch_stream" not in logs:
        raise ConfigError("[logs] cloudwatch_stream is required with cloudwatch_group")
    deltas = _deltas_config(_table(data, "deltas", required=False), base)
    identity = _identity_config(_table(data, "identity", required=False), base)
    return ParentConfig(
        bundle=bundle,
        kms=kms,
        enclave=enclave,
        ingress=ingress,
        attestation=attestation,
        failure=failure,
        health_listen=_address(h, "health", "listen", "tcp://127.0.0.1:8080"),
        relay_allowlist=tuple(allowlist),
        relay_ca=(base / r["ca"]) if "ca" in r else None,
        relay_token=relay_token,
        log_file=(base / logs["file"]) if "file" in logs else None,
        cloudwatch_group=group,
        cloudwatch_stream=_get(logs, "logs", "cloudwatch_stream", str, None),
        cloudwatch_region=_get(logs, "logs", "cloudwatch_region", str, None),
        deltas=deltas,
        identity=identity,
    )


def _identity_config(d: Mapping[str, Any], base: Path) -> IdentityConfig | None:
    """``[identity]``: absent (or empty), the enclave gets no delta identity key."""
    if not d:
        return None
    _unknown(d, "identity", {"sealed_file", "kms_key_id"})
    sealed: str = _get(d, "identity", "sealed_file", str)
    if sealed.startswith("s3://") or "://" in sealed:
        raise ConfigError(
            f"[identity] sealed_file {sealed!r}: expected a file path (copy an S3 object "
            "beside the bundle first)"
        )
    if not sealed:
        raise ConfigError("[identity] sealed_file must name a file")
    kms_key_id = _get(d, "identity", "kms_key_id", str, None)
    if kms_key_id is not None and not kms_key_id:
        raise ConfigError("[identity] kms_key_id must not be empty")
    return IdentityConfig(sealed_file=base / sealed, kms_key_id=kms_key_id)


def _deltas_config(d: Mapping[str, Any], base: Path) -> DeltasConfig | None:
    """``[deltas]``: absent (or empty), no delta store."""
    if not d:
        return None
    _unknown(d, "deltas", {"location", "poll_interval_s", "max_delta_bytes", "deltas_port"})
    location: str = _get(d, "deltas", "location", str)
    if location.startswith("file://"):
        path = location.removeprefix("file://")
        if not path:
            raise ConfigError('[deltas] location "file://" names no directory')
        location = "file://" + str((base / path).absolute())
    elif location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError(f"[deltas] location {location!r}: expected s3://bucket/prefix/")
        if prefix and not prefix.endswith("/"):
            raise ConfigError(
                f"[deltas] location {location!r}: the prefix must end in '/' (a folder)"
            )
    else:
        raise ConfigError(
            f"[deltas] location {location!r}: expected file:///path/to/dir or s3://bucket/prefix/"
        )
    return DeltasConfig(
        location=location,
        poll_interval_s=_number(d, "deltas", "poll_interval_s", float, 1.0, low=0),
        max_delta_bytes=_number(
            d,
            "deltas",
            "max_delta_bytes",
            int,
            DEFAULT_MAX_DELTA_BYTES,
            low=1,
            high=MAX_MAX_DELTA_BYTES,
            low_inclusive=True,
        ),
        deltas_port=_number(
            d, "deltas", "deltas_port", int, 7003, low=1, high=65535, low_inclusive=True
        ),
    )


def preflight(config: ParentConfig, *, genesis: bool = False) -> tuple[list[str], list[str]]:
    """Everything a start would try before it launches an enclave, tried now: (problems,
    warnings), each naming its key. ``trio-sign parent --check`` prints them and a start
    refuses to run with a problem (exit 2: systemd does not restart on it). ``genesis``:
    check for ``--genesis`` instead (``[identity]`` with ``kms_key_id``, no sealed file yet)."""
    import ipaddress

    from ..transport import parse_address

    problems: list[str] = []
    warnings: list[str] = []

    def read(path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            problems.append(f"{what} {path}: {exc.strerror or exc}")
            return None

    if not genesis and not config.bundle.source.startswith("s3://"):  # genesis loads none
        source = Path(config.bundle.source)
        try:
            with source.open("rb"):
                pass
        except OSError as exc:
            problems.append(f"[bundle] source {source}: {exc.strerror or exc}")
    _writable_dir(config.bundle.work_dir, "[bundle] work_dir", problems)
    e = config.enclave
    pinned: bytes | None = None
    if e.backend == "nitro-cli":
        read(e.eif_path, "[enclave] eif_path")
    elif e.nsm_dir is not None:
        read(e.nsm_dir / "local-nsm-root.pem", "[enclave] nsm_dir")
    if e.config is not None:
        from ..enclave._measured import MeasuredConfigError, load_measured_config

        try:
            measured = load_measured_config(e.config)
        except MeasuredConfigError as exc:
            problems.append(f"[enclave] config {exc}")
        else:
            pinned = measured.delta_identity_key
    _check_identity(config, problems, genesis=genesis, pinned=pinned)
    if config.kms.mode == "dev-key":
        read(config.kms.dev_key, "[kms] dev_key")
    if config.attestation is not None and config.attestation.root is not None:
        root = read(config.attestation.root, "[attestation] root")
        if root is not None:
            from cryptography import x509

            try:
                x509.load_pem_x509_certificate(root)
            except ValueError:
                problems.append(
                    f"[attestation] root {config.attestation.root}: not a PEM certificate"
                )
    read(config.relay_ca, "[relay] ca")
    if config.log_file is not None:
        try:
            with config.log_file.open("a"):
                pass
        except OSError as exc:
            problems.append(f"[logs] file {config.log_file}: {exc.strerror or exc}")
    _check_deltas(config, problems)
    health = parse_address(config.health_listen)
    if health.scheme == "tcp":
        try:
            loopback = (
                health.host == "localhost"
                or ipaddress.ip_address(health.host or "0.0.0.0").is_loopback
            )
        except ValueError:
            loopback = False
        if not loopback:
            warnings.append(
                f"[health] listen {config.health_listen} is not loopback: /metrics and the "
                "live log tail are then reachable from the network"
            )
    return problems, warnings


def _check_identity(
    config: ParentConfig, problems: list[str], *, genesis: bool, pinned: bytes | None
) -> None:
    """``[identity]``: the sealed file is readable, well formed and, when the local enclave's
    configuration pins a key, that key; for ``--genesis``, there is none yet and KMS can make
    one."""
    i = config.identity
    if genesis:
        if i is None:
            problems.append("--genesis needs [identity] sealed_file and kms_key_id")
            return
        if i.kms_key_id is None:
            problems.append("[identity] kms_key_id is required for --genesis (the KMS key)")
        if config.kms.mode == "dev-key":
            problems.append("--genesis needs [kms] mode aws or local (GenerateDataKey)")
        if i.sealed_file.exists():
            problems.append(
                f"[identity] sealed_file {i.sealed_file} exists: genesis never replaces a key "
                "(move it away to replace the key, docs/runbook.md §7)"
            )
        _writable_dir(i.sealed_file.parent, "[identity] sealed_file", problems)
        return
    if i is None:
        return
    from ..enclave._identity import IdentityKeyError, SealedIdentity

    try:
        sealed = SealedIdentity.from_json(i.sealed_file.read_bytes())
    except OSError as exc:
        problems.append(
            f"[identity] sealed_file {i.sealed_file}: {exc.strerror or exc} "
            "(run trio-sign parent --genesis once, docs/runbook.md §7)"
        )
        return
    except IdentityKeyError as exc:
        problems.append(f"[identity] sealed_file {i.sealed_file}: {exc}")
        return
    if pinned is not None and sealed.public_key != pinned:
        problems.append(
            f"[identity] sealed_file {i.sealed_file} holds key {sealed.public_key.hex()}, but "
            f"[enclave] config pins {pinned.hex()} ([bundles] delta_identity_key): the "
            "enclave would refuse it (identity_key_mismatch)"
        )


def _check_deltas(config: ParentConfig, problems: list[str]) -> None:
    """``[deltas]``: a file location must be (or become) a writable directory on a file system
    with hard links; its port must not be one the other channels use."""
    d = config.deltas
    if d is None:
        return
    directory = d.directory
    if directory is not None:
        _writable_dir(directory, "[deltas] location", problems)
        if directory.is_dir() and os.access(directory, os.W_OK | os.X_OK):
            problem = _hard_link_problem(directory)
            if problem is not None:
                problems.append(f"[deltas] location {d.location}: {problem}")
    if config.enclave.backend == "nitro-cli" and d.deltas_port in (5000, 5001, 5002, 5003):
        problems.append(
            f"[deltas] deltas_port {d.deltas_port} is taken by another enclave channel "
            "(5000-5003); use another (default 7003)"
        )


def _hard_link_problem(directory: Path) -> str | None:
    """Put-if-absent needs link(2): try one, with names the store never uses."""
    import secrets

    probe = directory / f".link-probe.{secrets.token_hex(8)}"
    target = probe.with_name(probe.name + ".linked")
    try:
        probe.write_bytes(b"")
        os.link(probe, target)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return f"cannot create and hard-link a file there ({reason}); the store needs link(2)"
    finally:
        for path in (probe, target):
            with contextlib.suppress(OSError):
                path.unlink()
    return None


def _writable_dir(path: Path, what: str, problems: list[str]) -> None:
    """``path`` exists as a writable directory, or can be created (it is not created here)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        problems.append(f"{what} {path}: {probe} is not a directory")
    elif not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"{what} {path}: {probe} is not writable")


def load_parent_config(path: Path) -> ParentConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_parent_config(text, base=path.parent)


def _relay_token(r: Mapping[str, Any], base: Path) -> str | None:
    """``[relay] token`` or ``token_file`` (one line; read now): the bearer token the relay adds
    to the enclave's subscription. Errors never quote the token."""
    from ._relay import UPSTREAM_TOKEN_RULE, valid_upstream_token

    if "token" in r and "token_file" in r:
        raise ConfigError("[relay] give token or token_file, not both")
    if "token_file" in r:
        path = base / _get(r, "relay", "token_file", str)
        try:
            token = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
            raise ConfigError(f"[relay] token_file: cannot read {path}: {reason}") from None
        knob = "token_file"
    elif "token" in r:
        token = r["token"]
        knob = "token"
    else:
        return None
    if not isinstance(token, str) or not valid_upstream_token(token):
        raise ConfigError(f"[relay] {knob}: the token must be {UPSTREAM_TOKEN_RULE}")
    return token


def _check_events_settings(enclave: EnclaveLaunchConfig, allowlist: list[str]) -> None:
    """``[enclave] node_id`` and ``gateway_url`` are sent to the enclave on the boot channel;
    refuse here, not at 3 a.m. in the enclave's log, what it would refuse or the relay would
    not forward."""
    from ..sse import checked_events_url, valid_node_id
    from ..transport import TransportError
    from ._relay import Allowlist, RelayConfigError, RelayRefused

    if not valid_node_id(enclave.node_id):
        raise ConfigError(
            f"[enclave] node_id {enclave.node_id!r}: use 1 to 128 letters, digits, '.', '_', "
            "'~' or '-'"
        )
    try:
        entries = Allowlist(allowlist)
    except RelayConfigError as exc:
        raise ConfigError(f"[relay] allowlist: {exc}") from None
    if enclave.gateway_url is None:
        return
    try:
        url = checked_events_url(enclave.gateway_url, enclave.node_id)
        allowed = entries.allows(url)
    except (TransportError, RelayRefused, ValueError) as exc:
        raise ConfigError(f"[enclave] gateway_url: {exc}") from None
    if not allowed:
        raise ConfigError(
            f"[enclave] gateway_url: the events URL {url} is not covered by [relay] allowlist, "
            "so the relay would refuse the enclave's subscription"
        )
