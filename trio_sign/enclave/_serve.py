"""The enclave process's supervision tree, drawn in one function per mode.

Production (:func:`serve_enclave`), each service started with ``nursery.start`` so readiness
reads top to bottom::

    serve_enclave
    ├── ParentLink.run                  (outer nursery: outlives every service below)
    │   ├── run_status_channel          (parent: lifecycle states, metrics, exit code)
    │   └── run_log_channel             (parent: redacted JSON lines, bounded, never blocks)
    └── services
        ├── run_child_reaper            (only as PID 1)
        ├── open the NSM; seed entropy   (device only)
        ├── run_memory_monitor          (alarm at 70%, refuse new sessions at 90%)
        ├── preload (bounded by preload_timeout_s): attestation -> KMS envelope -> the delta
    │                                   identity key (a second attested KMS answer, checked
    │                                   against the pin) -> sealed bundle -> the stored
    │                                   deltas, each verified and applied
        ├── extend PCR 16 with the bundle's SHA-256 and lock it; the audit record
        ├── SessionPool.run_reaper      (expires sessions, zeroes nonces)
        ├── TlsListener.run             (bounded TLS 1.3 handshakes, client CA from enclave.toml)
        ├── serve_grpc                  (SignService behind TLS; only after preload succeeded)
        ├── serve_grpc (public)         (h2c: Ping, GetStatus, GetAttestation only)
        ├── run_sse_client              (gateway events through the parent relay)
        ├── the deltas channel          (with a delta identity key: Compactor.converse over
        │                                DeltaWriter.converse, this enclave's deltas stored,
        │                                the parent's pushed, a Compact's base stored)
        └── DkgRegistry.run             (with [dkg] and the identity key: DkgRound1..3, DKG
                                         expiry zeroing their secrets, their deltas' stores)

The measured configuration (``enclave.toml``, :mod:`trio_sign.enclave._measured`) is read by
the command before the tree starts; its SHA-256 is in GetStatus and in every attestation
document's binding, with the TLS key's SPKI as the document's ``public_key`` (DESIGN §9-10).

Development (:func:`serve_dev_enclave`): a plaintext share file instead of the NSM, the
preload and the PCR; a :class:`ParentLink` without channels unless asked to report.

The lifecycle (:mod:`trio_sign.enclave._lifecycle`) moves ``booting -> preloading -> serving
-> draining`` as the tree comes up and drains. Any failure cancels the services' nursery:
nothing is served, the link says why (``failed``, reason, exit code, last log lines) and
the exit code says what (:mod:`trio_sign.enclave._exit`). An unexpected exception in a
long-lived task does the same (fail fast; the parent restarts us). The SSE and the parent
channels reconnect by themselves instead.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio

from .._errors import InternalError, ShareFileError, TrioSignError
from .._gc import configure_gc_for_serving, freeze_long_lived
from ..authz import DEVELOPMENT_POLICIES, Authorizer
from ..nitro import (
    AsyncNsm,
    EventsConfigMessage,
    LocalNsm,
    MessageStream,
    NsmDevice,
    NsmError,
    NsmLike,
    seed_entropy,
)
from ..nitro._binding import NO_DELTAS, Binding, encode_binding
from ..nitro._local_nsm import local_pcrs
from ..rpc import GrpcServer, serve_grpc
from ..shares import DataKeyProvider, ShareStore
from ..shares._deltas import DeltaChain, DeltaCheck
from ..sse import (
    SseClientStatus,
    SseEventHandler,
    checked_events_url,
    events_url,
    parse_events_url,
    run_sse_client,
)
from ..transport import (
    ServerIdentity,
    TlsListener,
    TransportError,
    connect,
    open_listeners,
    self_signed_server_context,
)
from ._compact import Compactor
from ._config import EnclaveConfig
from ._deltas import DeltaStatus, DeltaWriter, EnclaveDeltas
from ._dkg import DkgRegistry, PoolSlots, deltas_finder
from ._exit import EnclaveExit, ExitCode
from ._identity import DeltaKeyWrap, IdentityKey
from ._lifecycle import EnclaveEvent
from ._link import ParentLink
from ._memory import (
    MemoryLimitError,
    MemoryWatermark,
    check_preload_fits,
    read_memory_limit_bytes,
    run_memory_monitor,
)
from ._pid1 import bring_up_loopback, run_child_reaper
from ._pool import SessionPool
from ._preload import (
    PreloadError,
    PreloadReport,
    bundle_signing_keys,
    delta_signing_keys,
    preload_shares,
)
from ._service import Attestor, SignService
from ._status import run_reconnecting_channel

log = logging.getLogger("trio_sign.enclave")
audit_log = logging.getLogger("trio_sign.audit")
# Every boot must leave its audit record (DESIGN §7), whatever level the operator chose.
audit_log.setLevel(logging.INFO)


class EnclaveHandle:
    """What ``nursery.start(serve_..._enclave, ...)`` returns: the running service.

    Attributes:
        service: the SignService (its pool, its metrics).
        server: the gRPC server of the full API (behind TLS when ``tls`` is not None).
        addresses: where the gRPC server listens, as address URLs.
        sse: the SSE subscription's status, or None without one.
        link: the :class:`ParentLink` (read ``link.state`` for the lifecycle).
        tls: the TLS listener in front of ``server`` (its handshake counters), or None (h2c).
        identity: the per-boot TLS identity (its SPKI is what attestations bind), or None.
        public_server: the public h2c server (Ping, GetStatus, GetAttestation), or None.
        public_addresses: where it listens, as address URLs.
        deltas: the node's deltas (store, chain, identity key), or None (development).
        delta_writer: stores this enclave's deltas through the parent (what ``DkgRound3``
            calls: :meth:`DeltaWriter.store`), or None without a delta identity key.
    """

    def __init__(
        self,
        service: SignService,
        server: GrpcServer,
        addresses: list[str],
        config: EnclaveConfig,
        sse: SseClientStatus | None,
        link: ParentLink,
        *,
        tls: TlsListener | None = None,
        identity: ServerIdentity | None = None,
        public_server: GrpcServer | None = None,
        public_addresses: list[str] | None = None,
        deltas: EnclaveDeltas | None = None,
        delta_writer: DeltaWriter | None = None,
    ) -> None:
        self.service = service
        self.deltas = deltas
        self.delta_writer = delta_writer
        self.server = server
        self.addresses = addresses
        self.sse = sse
        self.link = link
        self.tls = tls
        self.identity = identity
        self.public_server = public_server
        self.public_addresses = public_addresses or []
        self._config = config
        self._stop = trio.Event()

    async def drain(self) -> None:
        """Stop taking sessions (``Commit`` answers ``UNAVAILABLE``); let the open ones finish
        (sign, abort or expire) and the calls in flight complete, all within
        ``drain_grace_s``; then stop.

        The server keeps its connections while sessions are open, so a gateway's ``Sign`` for
        a session it committed before the drain still arrives; only then is GOAWAY sent.
        Idempotent; returns once the gRPC server has closed every connection.
        """
        if self._stop.is_set():
            return
        grace = self._config.drain_grace_s
        log.info(
            "draining",
            extra={"grace_s": grace, "open_sessions": self.service.pool.open_sessions},
        )
        self.service.start_draining()
        deadline = trio.current_time() + grace
        try:
            with trio.move_on_at(deadline) as waited:
                await self.service.pool.wait_idle()
            if waited.cancelled_caught:
                log.warning(
                    "drain grace over with sessions still open; their nonces are zeroed",
                    extra={"open_sessions": self.service.pool.open_sessions},
                )
            remaining = max(0.0, deadline - trio.current_time())
            async with trio.open_nursery() as servers:
                servers.start_soon(self.server.drain, remaining)
                if self.public_server is not None:
                    servers.start_soon(self.public_server.drain, remaining)
        finally:
            self._stop.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`drain` has finished."""
        await self._stop.wait()


def _log_ready(
    handle: EnclaveHandle,
    config: EnclaveConfig,
    identity: object,
    started: float,
    **facts: object,
) -> None:
    """The one "enclave ready" line (both modes): where it listens, TLS, the measured
    configuration, the policies in force, and ``facts`` (accounts, mode, fingerprint)."""
    log.info(
        "enclave ready",
        extra={
            "grpc": ",".join(handle.addresses),
            "public": ",".join(handle.public_addresses),
            "tls": identity is not None,
            "config_sha256": config.measured.sha256.hex(),
            "policies": ",".join(sorted(config.measured.policies.policies)),
            "boot_ms": round((time.monotonic() - started) * 1000),
            **facts,
        },
    )


def _listener_url(listener: trio.SocketListener, scheme: str) -> str:
    name = listener.socket.getsockname()
    if scheme == "tcp":
        host, port = name[0], name[1]
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    if scheme == "unix":
        return f"unix://{name}"
    return f"vsock://{name[0]}:{name[1]}"


async def _serve_loaded(
    nursery: trio.Nursery,
    config: EnclaveConfig,
    store: ShareStore,
    link: ParentLink,
    *,
    preload_ms: int,
    attestor: Attestor | None = None,
    memory: MemoryWatermark | None = None,
    identity: ServerIdentity | None = None,
) -> EnclaveHandle:
    """Start the pool reaper, the gRPC servers and the SSE client for a loaded store.

    With ``identity`` the full API is served behind a :class:`TlsListener` (bounded
    handshakes, client certificates from the pinned CA); without it, plain h2c
    (development). The public listener, if configured, serves ``Ping``, ``GetStatus`` and
    ``GetAttestation`` only, in h2c.

    The lifecycle becomes ``serving`` once the gRPC servers listen and before the SSE client
    starts: the gateway's ``drain`` event (``serving -> draining``) can only come after. The
    service's metrics go to the parent from then on.
    """
    freeze_long_lived()  # the share index above all: one dict entry per account

    def on_drain() -> None:
        link.advance(EnclaveEvent.DRAIN)

    def on_undrain() -> None:
        link.advance(EnclaveEvent.UNDRAIN)

    overloaded = (lambda: None) if memory is None else functools.partial(_overload_reason, memory)
    frozen: set[str] = set()
    pool = SessionPool(
        store.get,
        max_sessions=config.max_sessions,
        session_ttl_s=config.session_ttl_s,
        is_frozen=frozen.__contains__,
        overloaded=overloaded,
    )
    measured = config.measured
    authorizer = Authorizer(
        measured.policies,
        clock_tolerance_s=config.approval_clock_tolerance_s,
        max_lifetime_s=config.approval_max_lifetime_s,
    )
    service = SignService(
        store,
        pool,
        authorizer=authorizer,
        frozen=frozen,
        attestor=attestor,
        on_drain=on_drain,
        on_undrain=on_undrain,
        memory=memory,
        max_sign_request_bytes=config.max_sign_request_bytes,
        config_sha256=config.measured.sha256,
    )
    await nursery.start(pool.run_reaper)
    listeners, addresses = await _listen(config.grpc_listen)
    public: tuple[list[trio.SocketListener], list[str]] | None = None
    if config.public_listen is not None:
        public = await _listen(config.public_listen)
    tls: TlsListener | None = None
    served: list[trio.abc.Listener[trio.abc.Stream]] = list(listeners)
    if identity is not None:
        tls = TlsListener(listeners, identity.context, settings=config.tls_settings)
        service.observe_tls(tls.stats)
        await nursery.start(tls.run)
        served = [tls]
    server: GrpcServer = await nursery.start(
        functools.partial(
            serve_grpc,
            served,
            service.handlers(),
            limits=config.grpc_limits,
            method_limits=service.receive_limits(),
            max_receive_message_size=config.max_receive_message_size,
        )
    )
    service.observe_server(server.stats)
    public_server: GrpcServer | None = None
    if public is not None:
        public_server = await nursery.start(
            functools.partial(
                serve_grpc,
                public[0],
                service.public_handlers(),
                limits=config.grpc_limits,
                method_limits=service.receive_limits(),
                max_receive_message_size=config.max_receive_message_size,
            )
        )
        service.observe_server(public_server.stats)
    link.advance(
        EnclaveEvent.READY,
        accounts=store.accounts,
        sha256=store.fingerprint,
        preload_ms=preload_ms,
    )
    if link.metrics_source is None:
        link.metrics_source = service.metrics.snapshot
    sse = await _start_sse(nursery, config, service)
    return EnclaveHandle(
        service,
        server,
        addresses,
        config,
        sse,
        link,
        tls=tls,
        identity=identity,
        public_server=public_server,
        public_addresses=None if public is None else public[1],
    )


def check_account_policies(config: EnclaveConfig, store: ShareStore) -> None:
    """Refuse a store in which some account names a policy the measured configuration does
    not have (DESIGN §6, §11): :class:`EnclaveExit` ``PRELOAD_FAILED``, reason
    ``unknown_policy``. ``create`` is never an account's signing policy. Outside the built-in
    development configuration there is no implicit ``default``: accounts without a
    ``policy`` need a ``[policies.default]``."""
    policies = config.measured.policies
    unknown = policies.unknown(set(store.policies()))
    if unknown:
        configured = ", ".join(sorted(policies.policies)) or "none"
        raise EnclaveExit(
            f"accounts name policies that {config.measured.source} does not configure for "
            f"signing: {', '.join(unknown)} (configured: {configured}; add "
            f"[policies.{unknown[0]}])",
            code=ExitCode.PRELOAD_FAILED,
            reason="unknown_policy",
        )
    used = store.policies()
    open_ = [name for name in policies.open_policies() if name in used]
    if open_:
        # Loud and once: the policies in force are also in the "enclave ready" line.
        log.warning(
            "NO AUTHORIZATION: accounts under policies %s sign without any approval (threshold"
            " 0%s); DESIGN §11, docs/approvals.md",
            ", ".join(open_),
            ", the development configuration" if policies.development else " in the file",
            extra={"policies": ",".join(open_)},
        )


def _development_policies(config: EnclaveConfig) -> EnclaveConfig:
    """``--dev`` with a configuration that has no ``[policies]``: the open development
    ``default`` (announced loudly by :func:`check_account_policies`). Never outside ``--dev``."""
    if not config.dev or config.measured.policies.policies:
        return config
    return dataclasses.replace(
        config,
        measured=dataclasses.replace(config.measured, policies=DEVELOPMENT_POLICIES),
    )


async def _listen(url: str) -> tuple[list[trio.SocketListener], list[str]]:
    """Bind ``url``; :class:`EnclaveExit` (``SERVICE_FAILED``, reason ``listen``) if it cannot."""
    try:
        listeners = await open_listeners(url)
    except TransportError as exc:
        # The one-line reason an operator needs (the address, "Address already in use").
        raise EnclaveExit(str(exc), code=ExitCode.SERVICE_FAILED, reason="listen") from exc
    scheme = url.split(":", 1)[0]
    return listeners, [_listener_url(listener, scheme) for listener in listeners]


def make_identity(config: EnclaveConfig) -> ServerIdentity | None:
    """The per-boot TLS identity when ``config.tls`` (None otherwise).

    Raises:
        EnclaveExit: ``USAGE`` (reason ``config``) if the measured configuration pins no
            gateway client CA (``[gateway] client_ca_pem``).
    """
    if not config.tls:
        return None
    ca = config.measured.client_ca_pem
    if ca is None:
        raise EnclaveExit(
            f"TLS needs a gateway client CA: {config.measured.source} has no "
            "[gateway] client_ca_pem",
            code=ExitCode.USAGE,
            reason="config",
        )
    identity = self_signed_server_context(ca)
    log.info(
        "TLS identity made for this boot",
        extra={"spki_sha256": hashlib.sha256(identity.spki_der).hexdigest()},
    )
    return identity


def binding_of(config: EnclaveConfig, fingerprint: bytes, deltas: bytes = NO_DELTAS) -> bytes:
    """The attestation ``user_data`` (DESIGN §4): shares, delta head, measured config."""
    return encode_binding(Binding(shares=fingerprint, deltas=deltas, config=config.measured.sha256))


def delta_policy_check(config: EnclaveConfig) -> DeltaCheck:
    """A delta's accounts must name policies this configuration has (as the base's must,
    :func:`check_account_policies`); otherwise the delta is refused (``unknown_policy``)."""
    policies = config.measured.policies

    def check(delta: ShareStore) -> None:
        unknown = policies.unknown(set(delta.policies()))
        if unknown:
            raise ShareFileError(
                f"the delta's accounts name policies that {config.measured.source} does not "
                f"configure for signing: {', '.join(unknown)}",
                reason="unknown_policy",
            )

    return check


def _show_deltas(service: SignService, status: DeltaStatus) -> None:
    """GetStatus's ``deltas``/``deltas_head`` (the service reads them for every call)."""
    service.deltas = status.count
    service.deltas_head = status.head


async def _run_deltas_channel(config: EnclaveConfig, compactor: Compactor) -> None:
    """Keep the deltas channel to the parent up (reconnecting like the status channel);
    :meth:`Compactor.converse` (the writer's loop, with the compaction answers taken out) is
    its only reader."""
    await run_reconnecting_channel(
        "deltas",
        functools.partial(connect, config.deltas_address),
        compactor.converse,
        read=False,
    )


@asynccontextmanager
async def _linked(link: ParentLink) -> AsyncIterator[list[ShareStore]]:
    """Run ``link`` around the body (the services) and give the last words when it ends.

    Yields a list: append the share store once loaded, and it is zeroed before the last
    words. A failure of the body is classified (:func:`_classify`), reported through
    ``link.close`` and raised as :class:`EnclaveExit`; a cancellation from outside is
    reported as ``exiting`` with code 0 and re-raised.
    """
    stores: list[ShareStore] = []
    outcome: EnclaveExit | None = None
    async with trio.open_nursery() as outer:
        await outer.start(link.run)
        try:
            yield stores
        except BaseException as exc:
            outcome = _classify(exc)
            if outcome is None:
                raise  # Cancelled or KeyboardInterrupt from outside: not ours to report
        finally:
            for store in stores:
                store.close()
            code = ExitCode.OK if outcome is None else outcome.code
            reason = None if outcome is None else outcome.reason
            if outcome is not None:
                log.error(
                    "enclave failed",
                    extra={"reason": reason, "exit_code": int(code), "detail": str(outcome)},
                )
            log.info("enclave stopped; shares zeroed", extra={"exit_code": int(code)})
            await link.close(int(code), reason=reason)
    if outcome is not None:
        raise outcome


# -- development ---------------------------------------------------------------------------


def _load_dev_shares(config: EnclaveConfig) -> ShareStore:
    """The plaintext share file, or :class:`EnclaveExit` (``PRELOAD_FAILED``) in one line."""
    if not config.dev or config.dev_plaintext_shares is None:
        raise EnclaveExit(
            "--dev-plaintext-shares needs --dev (development only)",
            code=ExitCode.USAGE,
            reason="usage",
        )
    path = config.dev_plaintext_shares
    try:
        with path.open("rb") as f:
            return ShareStore.load_plaintext(f)
    except OSError as exc:
        raise EnclaveExit(
            f"cannot read the shares file {path}: {exc.strerror or exc}",
            code=ExitCode.PRELOAD_FAILED,
            reason="shares_unreadable",
        ) from exc
    except ShareFileError as exc:
        raise EnclaveExit(
            f"shares file refused: {exc}", code=ExitCode.PRELOAD_FAILED, reason=exc.reason
        ) from exc


async def serve_dev_enclave(
    config: EnclaveConfig,
    *,
    report_to_parent: bool = False,
    task_status: trio.TaskStatus[EnclaveHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the SignService from a plaintext share file (development only: no NSM, no KMS).

    Returns after :meth:`EnclaveHandle.drain`; the share store is zeroed on the way out.

    Args:
        config: the settings (``dev`` and ``dev_plaintext_shares`` required).
        report_to_parent: run a :class:`ParentLink` to ``config.status_address`` and
            ``config.log_address``, as the production enclave does; by default the link has
            no channels (there is no parent in development) and only keeps the lifecycle.

    Error handling:
        :class:`EnclaveExit`, with a one-line message: ``USAGE`` if the configuration is not
        a development one, ``PRELOAD_FAILED`` if the share file cannot be read or is refused
        (the reason is the file's: ``bad_json``, ``duplicate_account``... or
        ``shares_unreadable``), ``SERVICE_FAILED`` (reason ``listen``) if the gRPC address
        cannot be bound, and as :func:`serve_enclave` for the rest.
    """
    link = (
        ParentLink.from_config(config)
        if report_to_parent
        else ParentLink(None, None, final_report_timeout_s=config.final_report_timeout_s)
    )
    started = time.monotonic()
    async with _linked(link) as stores:
        link.advance(EnclaveEvent.PRELOAD)
        store = await trio.to_thread.run_sync(functools.partial(_load_dev_shares, config))
        stores.append(store)
        config = _development_policies(config)
        check_account_policies(config, store)
        log.info(
            "shares loaded",
            extra={"accounts": store.accounts, "load_ms": round(store.load_seconds * 1000)},
        )
        identity = make_identity(config)
        async with trio.open_nursery() as nursery:
            handle = await _serve_loaded(
                nursery,
                config,
                store,
                link,
                preload_ms=round(store.load_seconds * 1000),
                identity=identity,
            )
            _log_ready(handle, config, identity, started, accounts=store.accounts, mode="dev")
            if report_to_parent:
                nursery.start_soon(_drain_when_the_parent_asks, link, handle)
            task_status.started(handle)
            await handle.wait_stopped()
            nursery.cancel_scope.cancel()


# -- production ------------------------------------------------------------------------------


def open_nsm(spec: str, *, config_sha256: bytes | None = None) -> NsmLike:
    """``"device"`` -> ``/dev/nsm``; ``"local:DIR"`` -> the local NSM with its root in DIR,
    reporting the local PCRs of this code and of the measured configuration whose SHA-256 is
    ``config_sha256`` (:func:`trio_sign.nitro._local_nsm.local_pcrs`; default: the built-in
    development configuration's)."""
    try:
        if spec == "device":
            return NsmDevice.open()
        if spec.startswith("local:"):
            pcrs = None if config_sha256 is None else local_pcrs(config_sha256)
            return LocalNsm.from_dir(spec.removeprefix("local:"), create=True, pcrs=pcrs)
    except (OSError, NsmError) as exc:
        raise EnclaveExit(
            f"cannot open the NSM ({spec}): {exc}", code=ExitCode.NSM, reason="nsm_unavailable"
        ) from exc
    raise EnclaveExit(
        f"unknown NSM {spec!r}: use 'device' or 'local:DIR'", code=ExitCode.USAGE, reason="usage"
    )


async def serve_enclave(
    config: EnclaveConfig,
    *,
    nsm: NsmLike | None = None,
    identity_key: IdentityKey | None = None,
    task_status: trio.TaskStatus[EnclaveHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The production enclave: attested preload, then serve until drained.

    Returns normally after a drain. Any failure raises :class:`EnclaveExit` with the exit code
    and reason, after the :class:`ParentLink` was given ``failed``, ``exit`` and the last log
    lines (bounded by ``final_report_timeout_s``). The share store, nonces and keys are zeroed
    on every path. While serving, the service's metrics go to the parent every 10 s.

    Args:
        config: the settings.
        nsm: an already-open NSM (tests); otherwise ``config.nsm`` is opened.
        identity_key: an already unsealed delta identity key (tests). Normally the parent
            sends the sealed file on the boot channel and the preload unseals it
            (:mod:`trio_sign.enclave._preload`), which replaces this one. With a key the
            boot's deltas are opened and verified, the deltas channel runs (pushes load
            without a restart), ``handle.delta_writer`` stores new deltas and, with ``[dkg]``,
            the DKG registry runs. Without one announced deltas are refused and nothing is
            stored. Every key is closed (zeroed) on the way out.
    """
    started = time.monotonic()
    link = ParentLink.from_config(config)
    keys: list[IdentityKey | DeltaKeyWrap] = []  # closed (zeroed) on the way out, in order
    wrap = None if identity_key is None else identity_key.delta_key_wrap()
    if identity_key is not None and wrap is not None:
        keys += [wrap, identity_key]
    try:
        async with _linked(link) as stores, trio.open_nursery() as nursery:
            await _serve_enclave_tree(
                config, nursery, link, stores, nsm, identity_key, wrap, started, task_status, keys
            )
    finally:
        for key in keys:
            key.close()
        if keys:
            log.info("delta identity key zeroed")


async def _serve_enclave_tree(
    config: EnclaveConfig,
    nursery: trio.Nursery,
    link: ParentLink,
    stores: list[ShareStore],
    nsm: NsmLike | None,
    identity_key: IdentityKey | None,
    wrap: DataKeyProvider | None,
    started: float,
    task_status: trio.TaskStatus[EnclaveHandle],
    keys: list[IdentityKey | DeltaKeyWrap],
) -> None:
    """The body of :func:`serve_enclave` (its services, top to bottom)."""
    if os.getpid() == 1:
        await nursery.start(run_child_reaper)
    if bring_up_loopback():
        log.info("brought the loopback interface up")
    identity = make_identity(config)
    device = nsm if nsm is not None else open_nsm(config.nsm, config_sha256=config.measured.sha256)
    anv = AsyncNsm(device)
    if isinstance(device, NsmDevice):
        seeded = await trio.to_thread.run_sync(seed_entropy, device)
        log.info(
            "entropy seeded from NSM",
            extra={"bytes": seeded.nbytes, "credited": seeded.credited},
        )
    limit = config.memory_limit_bytes or read_memory_limit_bytes()
    watermark = MemoryWatermark(
        limit,
        alarm_fraction=config.memory_alarm_fraction,
        hard_fraction=config.memory_hard_fraction,
    )
    await nursery.start(
        functools.partial(run_memory_monitor, watermark, on_change=link.set_memory_level)
    )

    link.advance(EnclaveEvent.PRELOAD)
    store, report = await _preload(config, anv, watermark, wrap)
    stores.append(store)
    if report.identity_key is not None and report.delta_wrap is not None:
        # The key the parent's sealed file unsealed (checked against the pin) is this boot's.
        keys += [report.delta_wrap, report.identity_key]
        identity_key, wrap = report.identity_key, report.delta_wrap
    check_account_policies(config, store)
    fingerprint = bytes.fromhex(report.sha256)
    pcr = await _lock_shares_pcr(anv, config.shares_pcr, fingerprint)
    deltas = EnclaveDeltas(
        store,
        report.chain if report.chain is not None else DeltaChain(report.sha256),
        provider=wrap,
        signer=identity_key,
        signing_keys=delta_signing_keys(config),
        check=delta_policy_check(config),
    )
    binding = binding_of(config, fingerprint, deltas.chain.head_bytes)
    spki = None if identity is None else identity.spki_der
    audit_doc = await anv.attestation(user_data=binding, public_key=spki)
    audit_log.info(
        "boot audit",
        extra={
            "audit": "boot",
            "accounts": report.accounts,
            "shares_sha256": report.sha256,
            "deltas": report.deltas,
            "deltas_head": report.deltas_head,
            "preload_ms": report.preload_ms,
            "bundle_bytes": report.bundle_bytes,
            "boot_ms": round((time.monotonic() - started) * 1000),
            "shares_pcr": config.shares_pcr,
            "shares_pcr_value": pcr.hex(),
            "config_sha256": config.measured.sha256.hex(),
            "config": config.measured.source,
            "attestation_document_b64": base64.b64encode(audit_doc).decode(),
        },
    )

    async def attest(nonce: bytes) -> bytes:
        # public_key: the TLS key of this boot, so a verifier can check that the
        # connection it asked on ends here (DESIGN §10). The delta head is read now: a
        # delta loaded while serving shows in the next document.
        live = binding_of(config, fingerprint, deltas.chain.head_bytes)
        return await anv.attestation(user_data=live, nonce=nonce or None, public_key=spki)

    handle = await _serve_loaded(
        nursery,
        _with_parent_events(config, report.events),
        store,
        link,
        preload_ms=report.preload_ms,
        attestor=attest,
        memory=watermark,
        identity=identity,
    )
    service = handle.service
    _show_deltas(service, deltas.status)
    deltas.on_change = functools.partial(_show_deltas, service)
    handle.deltas = deltas
    if wrap is not None and identity_key is not None:
        writer = DeltaWriter(
            deltas,
            store_timeout_s=config.delta_store_timeout_s,
            store_retries=(
                config.measured.dkg.store_retries if config.measured.dkg is not None else 5
            ),
        )
        handle.delta_writer = writer
        # Compact (docs/compaction.md) shares the deltas connection and the writer's locks.
        compactor = Compactor(writer, nsm=anv, allowed_kms_keys=config.measured.compaction_kms_keys)
        service.compactor = compactor
        nursery.start_soon(_run_deltas_channel, config, compactor)
        if config.measured.dkg is not None:
            registry = DkgRegistry(
                settings=config.measured.dkg,
                identity=identity_key,
                writer=writer,
                authorizer=service.authorizer,
                lookup=store.get,
                slots=PoolSlots(service.pool),
                find_created=deltas_finder(deltas),
            )
            await nursery.start(registry.run)
            service.dkg = registry
    _log_ready(
        handle,
        config,
        identity,
        started,
        accounts=report.accounts,
        shares_sha256=report.sha256,
        deltas=report.deltas,
        mode="nitro" if config.nsm == "device" else "local",
    )
    nursery.start_soon(_drain_when_the_parent_asks, link, handle)
    task_status.started(handle)
    await handle.wait_stopped()
    nursery.cancel_scope.cancel()


def _overload_reason(watermark: MemoryWatermark) -> str | None:
    if not watermark.refuse_new_sessions:
        return None
    pct = 100 * watermark.used_bytes / watermark.limit_bytes
    return f"memory above the hard watermark ({pct:.0f}% of the limit)"


async def _preload(
    config: EnclaveConfig,
    nsm: AsyncNsm,
    watermark: MemoryWatermark,
    delta_provider: DataKeyProvider | None = None,
) -> tuple[ShareStore, PreloadReport]:
    def memory_check(accounts: int) -> None:
        check_preload_fits(
            accounts,
            limit_bytes=watermark.limit_bytes,
            used_bytes=watermark.used_bytes,
            hard_fraction=watermark.hard_fraction,
        )

    try:
        with trio.fail_after(config.preload_timeout_s):
            stream = await connect(config.preload_address)
            try:
                return await preload_shares(
                    MessageStream(stream),
                    nsm,
                    verify=config.verify_shares,
                    memory_check=memory_check,
                    signing_keys=bundle_signing_keys(config),
                    delta_provider=delta_provider,
                    delta_keys=delta_signing_keys(config),
                    delta_check=delta_policy_check(config),
                    identity_keys=delta_signing_keys(config),
                )
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
    except trio.TooSlowError:
        raise EnclaveExit(
            f"preload did not finish within {config.preload_timeout_s} s (--preload-timeout)",
            code=ExitCode.PRELOAD_TIMEOUT,
            reason="timeout",
        ) from None


async def _lock_shares_pcr(nsm: AsyncNsm, index: int, fingerprint: bytes) -> bytes:
    """Extend PCR ``index`` with the bundle's SHA-256 and lock it, so verifiers and KMS
    policies can pin what was loaded. Returns the PCR's final value."""
    value = await nsm.extend_pcr(index, fingerprint)
    await nsm.lock_pcr(index)
    expected = hashlib.sha384(bytes(48) + fingerprint).digest()
    if value != expected:
        log.warning(
            "shares PCR was not fresh at boot",
            extra={"pcr": index, "value": value.hex()},
        )
    return value


def _classify(exc: BaseException) -> EnclaveExit | None:
    """The exit code and reason for what ended the tree (None: an outside cancellation)."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, EnclaveExit):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, MemoryLimitError):
            return EnclaveExit(str(leaf), code=ExitCode.MEMORY, reason="memory")
        if isinstance(leaf, PreloadError):
            code = ExitCode.MEMORY if leaf.reason == "memory" else ExitCode.PRELOAD_FAILED
            return EnclaveExit(str(leaf), code=code, reason=leaf.reason)
        if isinstance(leaf, NsmError):
            return EnclaveExit(f"NSM: {leaf}", code=ExitCode.NSM, reason="nsm")
        if isinstance(leaf, InternalError):  # a bug (an illegal lifecycle move, ...)
            log.error("internal error", exc_info=leaf)
            return EnclaveExit(f"internal error: {leaf}", code=ExitCode.INTERNAL, reason="internal")
        if isinstance(leaf, TrioSignError):
            reason = str(getattr(leaf, "reason", "service_failed"))
            return EnclaveExit(str(leaf), code=ExitCode.SERVICE_FAILED, reason=reason)
    if all(isinstance(leaf, (trio.Cancelled, KeyboardInterrupt)) for leaf in leaves):
        return None
    first = next(leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled))
    log.error("unexpected exception", exc_info=first)
    return EnclaveExit(
        f"internal error: {type(first).__name__}: {first}",
        code=ExitCode.INTERNAL,
        reason="internal",
    )


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]


async def _drain_when_the_parent_asks(link: ParentLink, handle: EnclaveHandle) -> None:
    """The parent's orderly stop (a ``drain`` frame on the status channel) drains like SIGTERM:
    on Nitro there are no signals, and ``nitro-cli terminate-enclave`` would cut open sessions."""
    await link.drain_requested.wait()
    await handle.drain()


def _with_parent_events(config: EnclaveConfig, events: EventsConfigMessage | None) -> EnclaveConfig:
    """Where to subscribe: ``--gateway-url`` on the (measured) command line wins; otherwise
    what the parent sent on the boot channel, if both values pass the checks. A bad value is
    logged and leaves the enclave without a subscription (the gateway's prober will notice);
    it never stops signing."""
    if events is None:
        return config
    if config.gateway_url is not None:
        if (events.gateway_url, events.node_id) != (config.gateway_url, config.node_id):
            log.warning(
                "ignoring the parent's events settings: --gateway-url was given",
                extra={"parent_gateway_url": events.gateway_url, "parent_node": events.node_id},
            )
        return config
    try:
        checked_events_url(events.gateway_url, events.node_id)
    except TransportError as exc:
        log.error("refusing the parent's events settings: %s", exc)
        return config
    return dataclasses.replace(config, gateway_url=events.gateway_url, node_id=events.node_id)


def _sse_via(config: EnclaveConfig, url: str) -> str:
    if config.sse_via is not None:
        return config.sse_via
    parse_events_url(url)  # validates
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"tcp://{parts.hostname}:{port}"


async def _start_sse(
    nursery: trio.Nursery, config: EnclaveConfig, service: SignService
) -> SseClientStatus | None:
    """Subscribe to the gateway's events; never blocks readiness on the gateway being up."""
    if config.gateway_url is None:
        return None
    url = events_url(config.gateway_url, config.node_id)
    via = _sse_via(config, url)
    status: SseClientStatus = await nursery.start(
        functools.partial(
            run_sse_client,
            url,
            connect=functools.partial(connect, via),
            on_event=SseEventHandler(service),
            keepalive_timeout_s=config.sse_keepalive_timeout_s,
        )
    )
    log.info("sse subscription started", extra={"url": url, "via": via})
    return status


__all__ = [
    "EnclaveHandle",
    "binding_of",
    "make_identity",
    "configure_gc_for_serving",
    "open_nsm",
    "serve_dev_enclave",
    "serve_enclave",
]
