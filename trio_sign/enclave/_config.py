"""The enclave's settings: one frozen object, named and unit-bearing (STYLE.md 7 and 8)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..authz import DEFAULT_CLOCK_TOLERANCE_S, DEFAULT_MAX_LIFETIME_S
from ..rpc import DEFAULT_MAX_RECEIVE_MESSAGE_SIZE, ServerLimits
from ..transport import TlsSettings
from ._measured import LIMITS, MeasuredConfig, development_config
from ._pool import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_TTL_S


@dataclass(frozen=True, slots=True)
class EnclaveConfig:
    """Settings for ``trio-sign enclave``.

    Attributes:
        grpc_listen: where the SignService listens (``vsock://ANY:50051`` in the EIF): the
            full API, behind TLS when ``tls`` is set.
        public_listen: where the public h2c listener serves ``Ping``, ``GetStatus`` and
            ``GetAttestation`` only (``vsock://ANY:50052`` in the EIF); None: none.
        measured: the measured configuration (``enclave.toml``, DESIGN §9): the gateway
            client CA, the bundle keys, and the limits it set (already applied to the fields
            here); its SHA-256 is in GetStatus and in every attestation's binding.
        tls: serve ``grpc_listen`` behind TLS 1.3 with a per-boot P-256 key and client
            certificates checked against ``measured.client_ca_pem`` (DESIGN §10). The command
            turns it on everywhere but ``--dev`` (where ``--tls`` asks for it).
        tls_settings: the TLS handshake bounds (deadline, handshakes in progress).
        max_sessions: concurrent FROST sessions holding nonces; more are RESOURCE_EXHAUSTED.
        session_ttl_s: lifetime of a session from Commit; nonces are zeroed when it ends.
        drain_grace_s: on SIGTERM/SIGINT, how long open calls may finish before cancellation.
        max_receive_message_size: largest gRPC request of a method without its own cap
            (every SignService method has one; RESOURCE_EXHAUSTED above).
        max_sign_request_bytes: largest ``Sign`` request, checked on the frames as they arrive
            (before any parsing); the largest signed message (64 KiB) must fit below it.
        grpc_limits: the gRPC server's bounds under hostile load (connections, buffers,
            timeouts, floods; DESIGN §16, docs/operations.md).
        gateway_url: the Sign Gateway's base URL; its SSE stream is
            ``{gateway_url}/v1/enclaves/{node_id}/events``. None: no SSE subscription.
        node_id: this enclave node's id at the gateway.
        sse_via: the address the SSE bytes travel over: the parent's relay
            (``vsock://3:PORT``) in production; in development it defaults to the gateway's
            own host and port.
        sse_keepalive_timeout_s: a stream silent this long is reconnected.
        nsm: ``"device"`` (``/dev/nsm``) or ``"local:DIR"`` (the local NSM stand-in whose root
            lives in DIR, for running off AWS).
        preload_address, status_address, log_address: the parent's boot, status and log
            channels (vsock to the parent, CID 3, in production; UNIX sockets locally).
        deltas_address: the parent's deltas channel (docs/key-lifecycle.md §4; its
            ``deltas_port``, 7003): the enclave stores its deltas and takes the pushed ones
            there. Connected only when the enclave holds a delta identity key.
        delta_store_timeout_s: how long storing one delta waits for the parent's answer (a
            DKG's ``DkgRound3`` answers ``UNAVAILABLE`` after it).
        preload_timeout_s: the whole preload (attestation, KMS, bundle) must finish in this.
        verify_shares: ``"lazy"`` or ``"full"`` point checks on the sealed bundle.
        memory_limit_bytes: the enclave's memory (None: cgroup limit or MemTotal).
        memory_alarm_fraction, memory_hard_fraction: watermarks (alarm logs and reports;
            hard refuses new sessions).
        shares_pcr: the PCR extended with the bundle's SHA-256 and locked after preload.
        final_report_timeout_s: how long the last status (failed/exiting) may take to send.
        approval_clock_tolerance_s: how far the approvers' clocks may be from the enclave's:
            an approval is accepted this long after its ``expires_at_unix_ms`` (DESIGN §11).
        approval_max_lifetime_s: an approval expiring further ahead than this (plus the
            tolerance) is refused as ``future_dated``.
        dev: development mode. Required for ``dev_plaintext_shares``; never set in the EIF.
        dev_plaintext_shares: a plaintext share file to serve, bypassing NSM and KMS.
    """

    grpc_listen: str = "vsock://ANY:50051"
    public_listen: str | None = None
    measured: MeasuredConfig = field(default_factory=development_config)
    tls: bool = False
    tls_settings: TlsSettings = field(default_factory=TlsSettings)
    max_sessions: int = DEFAULT_MAX_SESSIONS
    session_ttl_s: float = DEFAULT_SESSION_TTL_S
    drain_grace_s: float = 10.0
    max_receive_message_size: int = DEFAULT_MAX_RECEIVE_MESSAGE_SIZE
    max_sign_request_bytes: int = 256 * 1024
    grpc_limits: ServerLimits = field(default_factory=ServerLimits)
    gateway_url: str | None = None
    node_id: str = "enclave-0"
    sse_via: str | None = None
    sse_keepalive_timeout_s: float = 45.0
    nsm: str = "device"
    preload_address: str = "vsock://3:5000"
    status_address: str = "vsock://3:5001"
    log_address: str = "vsock://3:5002"
    deltas_address: str = "vsock://3:7003"
    delta_store_timeout_s: float = 30.0
    preload_timeout_s: float = 300.0
    verify_shares: str = "lazy"
    memory_limit_bytes: int | None = None
    memory_alarm_fraction: float = 0.70
    memory_hard_fraction: float = 0.90
    shares_pcr: int = 16
    final_report_timeout_s: float = 3.0
    approval_clock_tolerance_s: float = DEFAULT_CLOCK_TOLERANCE_S
    approval_max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S
    dev: bool = False
    dev_plaintext_shares: Path | None = None


def enclave_config(
    measured: MeasuredConfig,
    *,
    limits: Mapping[str, int | float | str | None] | None = None,
    **fields: Any,
) -> EnclaveConfig:
    """An :class:`EnclaveConfig` for ``measured``: its ``[limits]``, then ``limits`` (the
    command line's flags; None = not given) winning key by key, then the other ``fields``.

    ``limits`` keys are the ``[limits]`` names (:data:`~trio_sign.enclave._measured.LIMITS`);
    ``max_connections`` and ``idle_timeout_s`` land in ``grpc_limits``,
    ``tls_handshake_timeout_s``, ``max_tls_handshakes`` and ``max_tls_handshake_rate`` in
    ``tls_settings``.

    Raises:
        ValueError: an unknown limit name.
    """
    chosen: dict[str, int | float | str] = dict(measured.limits)
    for name, value in (limits or {}).items():
        if name not in LIMITS:
            raise ValueError(f"unknown limit {name!r}")
        if value is not None:
            chosen[name] = value
    grpc = fields.pop("grpc_limits", None) or ServerLimits()
    tls = fields.pop("tls_settings", None) or TlsSettings()
    direct: dict[str, Any] = {}
    for name, value in chosen.items():
        if name == "max_connections":
            grpc = dataclasses.replace(grpc, max_connections=int(value))
        elif name == "idle_timeout_s":
            grpc = dataclasses.replace(grpc, idle_timeout_s=float(value))
        elif name == "tls_handshake_timeout_s":
            tls = dataclasses.replace(tls, handshake_timeout_s=float(value))
        elif name == "max_tls_handshakes":
            tls = dataclasses.replace(tls, max_handshakes=int(value))
        elif name == "max_tls_handshake_rate":
            tls = dataclasses.replace(tls, max_handshake_rate=float(value))
        else:
            direct[name] = value
    return EnclaveConfig(measured=measured, grpc_limits=grpc, tls_settings=tls, **direct, **fields)
