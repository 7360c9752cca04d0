"""The enclave's settings: one frozen object, named and unit-bearing (STYLE.md 7 and 8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..rpc import DEFAULT_MAX_RECEIVE_MESSAGE_SIZE, ServerLimits
from ._pool import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_TTL_S


@dataclass(frozen=True, slots=True)
class EnclaveConfig:
    """Settings for ``trio-sign enclave``.

    Attributes:
        grpc_listen: where the SignService listens (``vsock://ANY:50051`` in the EIF).
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
        preload_timeout_s: the whole preload (attestation, KMS, bundle) must finish in this.
        verify_shares: ``"lazy"`` or ``"full"`` point checks on the sealed bundle.
        memory_limit_bytes: the enclave's memory (None: cgroup limit or MemTotal).
        memory_alarm_fraction, memory_hard_fraction: watermarks (alarm logs and reports;
            hard refuses new sessions).
        shares_pcr: the PCR extended with the bundle's SHA-256 and locked after preload.
        final_report_timeout_s: how long the last status (failed/exiting) may take to send.
        dev: development mode. Required for ``dev_plaintext_shares``; never set in the EIF.
        dev_plaintext_shares: a plaintext share file to serve, bypassing NSM and KMS.
    """

    grpc_listen: str = "vsock://ANY:50051"
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
    preload_timeout_s: float = 300.0
    verify_shares: str = "lazy"
    memory_limit_bytes: int | None = None
    memory_alarm_fraction: float = 0.70
    memory_hard_fraction: float = 0.90
    shares_pcr: int = 16
    final_report_timeout_s: float = 3.0
    dev: bool = False
    dev_plaintext_shares: Path | None = None
