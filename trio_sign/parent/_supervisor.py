"""The parent supervisor: the seed's startup order as one object and one supervision tree.

::

    ParentSupervisor.run
    ├── alerts' hook runner, CloudWatch shipper
    ├── serve_health                        /healthz, /readyz, /metrics, /v1/logs/tail
    └── one enclave run (again, with back-off, only if [failure] restart = true)
        ├── status and log channel servers  (outlive the run until the enclave is gone)
        ├── fetching    the bundle          local path or s3:// into work_dir (tmpfs)
        ├── SSE relay                       (allowlisted gateway URLs only)
        ├── launching   the enclave         Launcher.start(): nitro-cli | local process
        ├── watch its exit                  in every phase from here on
        ├── deltas channel server           ([deltas]) stores the enclave's deltas; its watcher
        │                                   pushes the store's new ones once the boot is done
        ├── preloading                      KMS Decrypt with Recipient; the copy is then deleted;
        │                                   then every stored delta ([deltas])
        ├── attesting                       fresh document, pinned root and PCRs, periodically
        └── serving                         mTLS ingress, forwarded only while the gate is open

Each phase is a method that owns its named timeout and raises a typed
:class:`~trio_sign.parent._lifecycle.ParentExit` carrying its alert code; the enclave's
exit, watched from launch on, ends whatever phase the run is in. The phases move
:class:`~trio_sign.parent._lifecycle.Lifecycle` along its transition table, and health
reads that machine. The launcher, the preload exchange and the bundle copy are injected
(:class:`Launcher`, :class:`Preloader`, :data:`Fetcher`), so the supervisor runs in virtual
time with fakes in the tests. The parent never holds a plaintext share or data key: it
moves ciphertext and forwards attestation documents to KMS.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from proto_min import sign_service_pb2 as pb

from .._atomic import atomic_file
from .._backoff import full_jitter_delay
from .._errors import TrioSignError
from .._gc import freeze_long_lived
from ..enclave._identity import RecipientDataKey, SealedIdentity
from ..nitro import AWS_NITRO_ROOT_PEM, EventsConfigMessage, MessageStream, PreloadResultMessage
from ..rpc import open_grpc_channel
from ..shares import DevKeyFile
from ..transport import connect, open_listeners
from ._attestation_gate import AttestationGate, AttestationPolicy, run_attestation_gate
from ._bundle_copy import BundleCopyError, copy_bundle
from ._channels import StatusLink, serve_logs, serve_status
from ._config import ParentConfig, preflight
from ._deltas import (
    CompactionKms,
    Deltas,
    DeltaStoreError,
    kms_compaction_relay,
    open_delta_store,
    serve_deltas,
)
from ._dev_kms import DevRecipientKms
from ._health import ParentState, serve_health
from ._ingress import serve_ingress
from ._launch import Launcher, LaunchError, LocalLauncher, NitroCliLauncher, RunningEnclave
from ._lifecycle import (
    BundleUnavailable,
    ConfigProblem,
    EnclaveExited,
    EnclaveFailed,
    LaunchFailed,
    ListenFailed,
    ParentExit,
    ParentPhase,
    PreloadFailed,
    PreloadTimeout,
    StartTimeout,
)
from ._logs import (
    CloudWatchSink,
    JsonLinesSink,
    LogFileSink,
    LogForwarder,
    LogTail,
    cloudwatch_logs_client,
)
from ._preload import RecipientKms, serve_genesis, serve_preload
from ._relay import serve_sse_relay

log = logging.getLogger("trio_sign.parent")

#: vsock ports the parent listens on for the enclave (CID 3 is the parent, from inside).
PRELOAD_PORT, STATUS_PORT, LOG_PORT, SSE_PORT = 5000, 5001, 5002, 5003
#: The deltas channel's default port (``[deltas] deltas_port``; docs/key-lifecycle.md §4).
DELTAS_PORT: Final = 7003
#: The enclave's public h2c port (Ping, GetStatus, GetAttestation; DESIGN §10).
ENCLAVE_PUBLIC_PORT: Final = 50052
#: Preload may take this much longer than the enclave's own preload_timeout_s (its start).
PRELOAD_MARGIN_S: Final = 30.0
#: How long the parent waits for the enclave's exit message once its process is gone.
LAST_WORD_GRACE_S: Final = 0.5
#: After the enclave exited, how long the run waits for its deltas connection to finish what
#: it was handed (normally at once: the dead enclave's socket is closed; this bounds a store
#: that hangs).
DELTAS_FLUSH_TIMEOUT_S: Final = 10.0
#: How long a terminated enclave gets to stop by itself before it is killed.
TERMINATE_GRACE_S: Final = 10.0

__all__ = ["ParentExit", "ParentSupervisor", "serve_parent"]


class _Stopped(Exception):
    """The run ended because the operator asked the parent to stop (internal)."""


class Preloader(Protocol):
    """Serve one preload exchange on ``stream`` (the enclave's boot connection) for
    ``bundle``; return what the enclave reported."""

    async def __call__(self, stream: trio.abc.Stream, bundle: Path) -> PreloadResultMessage: ...


#: Copy the sealed bundle from ``source`` into ``work_dir``; return the copy's path.
Fetcher = Callable[[str, Path], Awaitable[Path]]


class _Addresses:
    """Where each channel lives: vsock ports for Nitro, UNIX sockets under work_dir locally."""

    def __init__(self, config: ParentConfig) -> None:
        e = config.enclave
        if e.backend == "local":
            run = config.bundle.work_dir
            self.listen = {
                n: f"unix://{run}/{n}.sock" for n in ("preload", "status", "logs", "sse", "deltas")
            }
            self.enclave_side = dict(self.listen)
            self.enclave_grpc = f"unix://{run}/enclave-grpc.sock"
            self.enclave_public = f"unix://{run}/enclave-public.sock"
        else:
            ports = {
                "preload": PRELOAD_PORT,
                "status": STATUS_PORT,
                "logs": LOG_PORT,
                "sse": SSE_PORT,
                "deltas": DELTAS_PORT if config.deltas is None else config.deltas.deltas_port,
            }
            self.listen = {n: f"vsock://ANY:{p}" for n, p in ports.items()}
            self.enclave_side = {n: f"vsock://3:{p}" for n, p in ports.items()}
            self.enclave_grpc = f"vsock://{e.cid}:{e.grpc_port}"
            self.enclave_public = f"vsock://{e.cid}:{ENCLAVE_PUBLIC_PORT}"


def recipient_kms(config: ParentConfig) -> RecipientKms:
    """The KMS the preload uses: AWS (or the local stand-in, by endpoint) or the dev key."""
    k = config.kms
    if k.mode == "dev-key":
        assert k.dev_key is not None
        if config.enclave.nsm_dir is None:
            raise ConfigProblem("[kms] mode dev-key needs the local NSM ([enclave] nsm_dir)")
        root = (config.enclave.nsm_dir / "local-nsm-root.pem").read_bytes()
        return DevRecipientKms(DevKeyFile.load(k.dev_key), root_pem=root)
    from ..kms import KmsRecipientKms, make_kms_client

    return KmsRecipientKms(make_kms_client(k.endpoint_url, region=k.region))


def compaction_kms(config: ParentConfig) -> CompactionKms | None:
    """The relay a ``Compact`` asks for its data key (KMS ``GenerateDataKey`` with
    ``Recipient``, docs/compaction.md §3): the ``[kms]`` client (AWS, or the local stand-in by
    endpoint); None with ``mode = "dev-key"``, which has no KMS (the enclave's ``Compact`` is
    then ``UNAVAILABLE``, ``kms_refused``)."""
    k = config.kms
    if k.mode == "dev-key":
        return None
    from ..kms import make_kms_client

    return kms_compaction_relay(make_kms_client(k.endpoint_url, region=k.region))


def kms_preloader(
    config: ParentConfig, kms: RecipientKms, deltas: Deltas | None = None
) -> Preloader:
    """The production :class:`Preloader`: :func:`serve_preload` through ``kms``, telling the
    enclave where to subscribe for events, sending the sealed delta identity key (``[identity]
    sealed_file``, read again every boot) and streaming the stored deltas after the base."""
    e = config.enclave
    events = (
        None
        if e.gateway_url is None
        else EventsConfigMessage(gateway_url=e.gateway_url, node_id=e.node_id)
    )

    async def preload(stream: trio.abc.Stream, bundle: Path) -> PreloadResultMessage:
        identity = None
        if config.identity is not None:
            identity = await trio.Path(config.identity.sealed_file).read_bytes()
        return await serve_preload(
            MessageStream(stream), bundle, kms, events=events, deltas=deltas, identity=identity
        )

    return preload


def default_launcher(config: ParentConfig) -> Launcher:
    """``nitro-cli`` for ``backend = "nitro-cli"``; else the local enclave process, given the
    addresses of its channels on the command line (as the EIF's are fixed vsock ports) and its
    measured configuration (``[enclave] config``, as the EIF's is baked in): the local NSM
    derives the enclave's PCRs from it (``trio_sign.nitro._local_nsm.local_pcrs_for_config``).
    Without one, the built-in development configuration is written to
    ``work_dir/enclave.toml``: its PCRs are ``DEFAULT_LOCAL_PCRS`` and its gateway CA is a
    placeholder no client certificate chains to (the TLS port accepts no gateway)."""
    e = config.enclave
    if e.backend == "nitro-cli":
        assert e.eif_path is not None
        return NitroCliLauncher(e.eif_path, e.cpu_count, e.memory_mib, e.cid)
    assert e.nsm_dir is not None
    addresses = _Addresses(config)
    side = addresses.enclave_side
    args = [
        "--nsm",
        f"local:{e.nsm_dir}",
        "--config",
        str(_local_enclave_config(config)),
        "--grpc-listen",
        addresses.enclave_grpc,
        "--public-listen",
        addresses.enclave_public,
        "--preload-address",
        side["preload"],
        "--status-address",
        side["status"],
        "--log-address",
        side["logs"],
        "--preload-timeout",
        str(e.preload_timeout_s),
    ]
    if config.deltas is not None:
        # The enclave stores its deltas and takes the pushed ones there (docs/key-lifecycle.md).
        args += ["--deltas-address", side["deltas"]]
    if e.gateway_url is not None:
        # Where to subscribe comes over the boot channel, as on Nitro (whose EIF passes only
        # --sse-via), so local runs take the production path.
        args += ["--sse-via", side["sse"]]
    return LocalLauncher(
        args, use_namespaces=e.namespaces, log_path=config.bundle.work_dir / "enclave.stderr"
    )


def _local_enclave_config(config: ParentConfig) -> Path:
    """The measured configuration file the local enclave is started with."""
    if config.enclave.config is not None:
        return config.enclave.config
    from ..enclave._measured import DEVELOPMENT_CONFIG

    path = config.bundle.work_dir / "enclave.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(DEVELOPMENT_CONFIG)
    log.warning(
        "no [enclave] config: the local enclave runs the built-in development configuration"
        " (its TLS port accepts no gateway)",
        extra={"config": str(path)},
    )
    return path


#: How often the parent reads the enclave's GetStatus for /metrics (sessions, memory).
ENCLAVE_STATUS_INTERVAL_S: Final = 10.0
_GET_STATUS: Final = "/trio_sign.v1.SignService/GetStatus"


async def _poll_enclave_status(
    state: ParentState,
    connect_enclave: Callable[[], Awaitable[trio.abc.Stream]],
    *,
    interval_s: float = ENCLAVE_STATUS_INTERVAL_S,
) -> None:
    """Read the enclave's ``GetStatus`` now and every ``interval_s`` into ``state`` (open
    sessions, memory used and limit: what /metrics shows for capacity alerts). A failed read
    changes nothing (the timestamp shows staleness); reachability is the attestation gate's
    business, and it alerts."""
    while True:
        with trio.move_on_after(5.0):
            try:
                async with open_grpc_channel(await connect_enclave()) as channel:
                    raw = await channel.unary_unary(_GET_STATUS, b"")
                status = pb.GetStatusResponse.FromString(raw)
            except Exception as exc:  # an observer for /metrics: never a reason to fail the run
                log.debug("enclave GetStatus failed: %s: %s", type(exc).__name__, exc)
            else:
                state.enclave_sessions_open = status.sessions_open
                state.enclave_sessions_max = status.sessions_max
                state.enclave_memory_used_bytes = status.memory_used_bytes
                state.enclave_memory_limit_bytes = status.memory_limit_bytes
                state.enclave_status_at = state.wall_clock()
        await trio.sleep(interval_s)


async def _run_in(
    scope: trio.CancelScope,
    async_fn: Callable[..., Awaitable[object]],
    *args: object,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    **kwargs: object,
) -> None:
    """``async_fn(*args, task_status=..., **kwargs)`` under ``scope``, which the run's owner
    cancels on its own terms (for ``nursery.start``)."""
    with scope:
        await async_fn(*args, task_status=task_status, **kwargs)


async def _listen(url: str, what: str) -> list[trio.SocketListener]:
    try:
        return await open_listeners(url)
    except (OSError, TrioSignError) as exc:
        raise ListenFailed(f"cannot listen for the {what} on {url}: {exc}") from exc


@dataclass
class _Run:
    """One enclave boot: what its finally-clause must clean up."""

    link: StatusLink
    watch: trio.CancelScope
    enclave: RunningEnclave | None = None
    bundle: Path | None = None
    exited: trio.Event | None = None


class ParentSupervisor:
    """The parent's run: health, then enclave runs until stopped or given up.

    Args:
        config: the parsed ``parent.toml``.
        launcher, preloader, fetch: the collaborators a run uses (default: from ``config``).
        state: what health reads (default: a new one).
        forwarder: where the enclave's log lines go (default: from ``config [logs]``, opened
            by :meth:`run`).
        rng: for the restart back-off's jitter.
        deltas: the delta store as the runs use it (default: from ``config [deltas]``, opened
            by :meth:`run`; None without it).
        genesis: run one genesis boot instead (``trio-sign parent --genesis``,
            docs/runbook.md §7): the enclave creates the delta identity key, its sealed file
            is written to ``[identity] sealed_file`` (``genesis_sealed`` then holds it) and
            :meth:`run` returns once the enclave has exited.
        genesis_kms: KMS ``GenerateDataKey`` with ``Recipient`` for the genesis (default:
            ``[kms]`` with ``[identity] kms_key_id``).
    """

    def __init__(
        self,
        config: ParentConfig,
        *,
        launcher: Launcher | None = None,
        preloader: Preloader | None = None,
        fetch: Fetcher | None = None,
        state: ParentState | None = None,
        forwarder: LogForwarder | None = None,
        rng: random.Random | None = None,
        deltas: Deltas | None = None,
        genesis: bool = False,
        genesis_kms: RecipientDataKey | None = None,
    ) -> None:
        self.config = config
        self.genesis = genesis
        self._genesis_kms = genesis_kms
        self.genesis_sealed: SealedIdentity | None = None
        self.addresses = _Addresses(config)
        self._launcher = launcher
        self._preloader = preloader
        self._fetch_fn = fetch if fetch is not None else copy_bundle
        self.state = state if state is not None else ParentState()
        self.state.alerts.command = config.failure.alert_command
        self.state.ingress_required = config.ingress is not None
        self.forwarder = forwarder
        self._rng = rng if rng is not None else random.Random()
        self.deltas = deltas
        if deltas is not None:
            self.state.deltas = deltas.stats

    @property
    def lifecycle(self) -> Any:
        return self.state.lifecycle

    def reopen_logs(self) -> None:
        """Reopen the log file (SIGHUP, after logrotate moved it)."""
        if self.forwarder is not None:
            reopen = getattr(self.forwarder, "reopen", None)
            if reopen is not None:
                reopen()

    # -- the whole parent --------------------------------------------------------------------

    async def run(
        self,
        stop: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[tuple[ParentState, list[str]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled, until ``stop`` is set (orderly: a serving enclave drains), or
        until it gives up (raises :class:`ParentExit`: ``exit_code`` says how the process
        should end, ``alert`` why). Configuration problems raise before anything starts."""
        stop = stop if stop is not None else trio.Event()
        problems, _warnings = preflight(self.config, genesis=self.genesis)
        if problems:
            failure = ConfigProblem(problems[0])
            await self._give_up(failure)
            raise failure
        if self.config.identity is not None and not self.genesis:
            data = await trio.Path(self.config.identity.sealed_file).read_bytes()
            public_key = SealedIdentity.from_json(data).public_key.hex()
            self.state.identity_public_key = public_key  # public: shown on /readyz
            log.info("delta identity key", extra={"public_key": public_key})
        if self.deltas is None and self.config.deltas is not None:
            try:
                self.deltas = await self._open_deltas()
            except ConfigProblem as failure:
                await self._give_up(failure)
                raise
        with contextlib.ExitStack() as files:
            if self.forwarder is None:
                self.forwarder = self._open_forwarder(files)
            gave_up = await self._supervise(stop, task_status)
        if gave_up is not None:
            raise gave_up

    async def _open_deltas(self) -> Deltas:
        """The ``[deltas]`` store (a file store's crash leftovers removed first)."""
        d = self.config.deltas
        assert d is not None
        try:
            store = await trio.to_thread.run_sync(
                functools.partial(open_delta_store, d.location, max_delta_bytes=d.max_delta_bytes)
            )
        except (DeltaStoreError, ValueError) as exc:
            raise ConfigProblem(f"[deltas] location {d.location}: {exc}") from exc
        deltas = Deltas(
            store,
            on_alert=self.state.alerts.raise_alert,
            poll_interval_s=d.poll_interval_s,
            compaction_kms=compaction_kms(self.config),
        )
        self.state.deltas = deltas.stats
        log.info("delta store opened", extra={"location": store.location})
        return deltas

    def _open_forwarder(self, files: contextlib.ExitStack) -> LogForwarder:
        config = self.config
        sink: JsonLinesSink | LogFileSink = (
            JsonLinesSink(sys.stdout)
            if config.log_file is None
            else files.enter_context(LogFileSink(config.log_file))
        )
        cloudwatch = None
        if config.cloudwatch_group is not None and config.cloudwatch_stream is not None:
            kwargs = {"region_name": config.cloudwatch_region} if config.cloudwatch_region else {}
            cloudwatch = CloudWatchSink(
                cloudwatch_logs_client(**kwargs),
                log_group=config.cloudwatch_group,
                log_stream=config.cloudwatch_stream,
            )
            self.state.cloudwatch = cloudwatch.stats
        alerts = self.state.alerts
        where = "stdout" if config.log_file is None else str(config.log_file)

        def write_failed(exc: OSError) -> None:  # once per streak of failures; never blocks
            alerts.raise_alert(
                "log_write_failed",
                f"cannot write the enclave's log lines to {where}: {exc.strerror or exc}",
            )

        forwarder = LogForwarder(
            sinks=[sink],
            cloudwatch=cloudwatch,
            tail=LogTail(),
            stats=self.state.logs,
            on_write_error=write_failed,
        )
        self.state.tail = forwarder.tail
        return forwarder

    async def _supervise(
        self,
        stop: trio.Event,
        task_status: trio.TaskStatus[tuple[ParentState, list[str]]],
    ) -> ParentExit | None:
        lifecycle = self.state.lifecycle
        result: list[ParentExit] = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.state.alerts.run)
                assert self.forwarder is not None
                if self.forwarder.cloudwatch is not None:
                    await nursery.start(self.forwarder.cloudwatch.run)
                try:
                    health = await nursery.start(
                        functools.partial(serve_health, self.config.health_listen, self.state)
                    )
                except (OSError, TrioSignError) as exc:
                    failure = ListenFailed(
                        f"cannot listen for health on {self.config.health_listen}: {exc}"
                    )
                    await self._give_up(failure)
                    result.append(failure)
                    nursery.cancel_scope.cancel()
                    return failure
                task_status.started((self.state, list(health)))
                nursery.start_soon(self._stop_while_booting, stop, nursery.cancel_scope)
                gave_up = await self._runs(stop)
                nursery.cancel_scope.cancel()
                return gave_up
        finally:
            if not lifecycle.final:
                lifecycle.advance(ParentPhase.STOPPED)

    async def _runs(self, stop: trio.Event) -> ParentExit | None:
        """Enclave runs, with back-off between them, until stopped (None) or given up."""
        lifecycle = self.state.lifecycle
        failures = 0
        while True:
            lifecycle.advance(ParentPhase.FETCHING)
            try:
                await self._run_once(stop)
            except BaseException as exc:
                if any(isinstance(leaf, _Stopped) for leaf in _leaves(exc)):
                    lifecycle.advance(ParentPhase.STOPPED)
                    return None
                failure = _failure_of(exc)
                if failure is None:
                    raise
                self.state.attestation_gate = None
                if not self.config.failure.restart or isinstance(failure, ConfigProblem):
                    await self._give_up(failure)
                    return failure
                self.state.alerts.raise_alert(failure.alert, str(failure))
                if stop.is_set():
                    lifecycle.advance(ParentPhase.STOPPED)
                    return None
            lifecycle.advance(ParentPhase.RESTARTING)
            wait = full_jitter_delay(
                self._rng,
                base=self.config.failure.backoff_initial_s,
                maximum=self.config.failure.backoff_max_s,
                failures=failures,
                at_least=self.config.failure.backoff_initial_s,
            )
            failures += 1
            log.warning("restarting the enclave after back-off", extra={"delay_s": round(wait, 1)})
            await trio.sleep(wait)

    async def _give_up(self, failure: ParentExit) -> None:
        self.state.lifecycle.advance(ParentPhase.FAILED)
        await self.state.alerts.raise_and_wait(failure.alert, str(failure))

    async def _stop_while_booting(self, stop: trio.Event, scope: trio.CancelScope) -> None:
        await stop.wait()
        if self.state.lifecycle.phase not in (ParentPhase.SERVING, ParentPhase.DRAINING):
            log.info("stopping: the enclave is not serving yet; terminating it")
            scope.cancel()

    # -- one enclave run ---------------------------------------------------------------------

    async def _run_once(self, stop: trio.Event) -> None:
        """One enclave boot from bundle fetch to death. Raises a :class:`ParentExit` on failure
        and :class:`_Stopped` after an orderly stop (``stop`` set while serving)."""
        run = _Run(link=StatusLink(), watch=trio.CancelScope())
        # The status and log channels outlive a cancellation of this run until the enclave is
        # terminated, so that its last words (final state, exit code, last log lines) still
        # arrive; they are closed in the ``finally`` below whatever happens.
        channels = trio.CancelScope(shield=True)
        gate_scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            try:
                await self._boot_and_serve(nursery, run, channels, gate_scope, stop)
            finally:
                run.watch.cancel()  # the exit we cause below is not news
                with trio.CancelScope(shield=True):
                    if run.enclave is not None:
                        await run.enclave.terminate(grace_s=TERMINATE_GRACE_S)
                    if run.bundle is not None:
                        run.bundle.unlink(missing_ok=True)
                self.state.ingress_listening = False
                channels.cancel()
                nursery.cancel_scope.cancel()

    async def _boot_and_serve(
        self,
        nursery: trio.Nursery,
        run: _Run,
        channels: trio.CancelScope,
        gate_scope: trio.CancelScope,
        stop: trio.Event,
    ) -> None:
        lifecycle = self.state.lifecycle
        if self.genesis:
            await self._genesis_boot(nursery, run, channels)
            raise _Stopped
        if self.deltas is not None:
            self.deltas.new_run()
        run.bundle = await self._fetch()
        await nursery.start(_run_in, channels, self._serve_channels, run.link)
        await self._start_relay(nursery)
        preload_listeners = await _listen(self.addresses.listen["preload"], "enclave's preload")
        try:
            lifecycle.advance(ParentPhase.LAUNCHING)
            run.enclave = await self._launch()
            run.exited = trio.Event()
            nursery.start_soon(_run_in, run.watch, self._watch_exit, run.enclave, run.exited)
            lifecycle.advance(ParentPhase.PRELOADING)
            result = await self._preload(preload_listeners, run.bundle)
        finally:
            for listener in preload_listeners:
                await trio.aclose_forcefully(listener)
        if self.deltas is not None:
            self.deltas.mark_booted(result)  # the deltas channel's watcher starts from here
        run.bundle.unlink()  # the parent's copy goes as soon as the enclave holds the shares
        run.bundle = None
        log.info(
            "preload served; the parent's bundle copy is deleted",
            extra={"accounts": result.accounts, "sha256": result.sha256},
        )
        await self._wait_serving()
        lifecycle.advance(ParentPhase.ATTESTING)
        gate = await self._attest(nursery, gate_scope, result.sha256)
        lifecycle.advance(ParentPhase.SERVING)
        # What this run keeps (clients, configuration, the gate) leaves the full collections'
        # walk before the first forwarded byte (trio_sign._gc).
        freeze_long_lived()
        await self._start_ingress(nursery, gate)
        nursery.start_soon(
            _poll_enclave_status,
            self.state,
            functools.partial(connect, self.addresses.enclave_public),
        )
        await stop.wait()  # the enclave's exit ends this run through _watch_exit instead
        lifecycle.advance(ParentPhase.DRAINING)
        # Stop re-attesting (the gate keeps its verdict, so forwarded connections stay open):
        # a draining enclave closes its port, which must not read as an attack and cut the
        # sessions the drain is letting finish.
        gate_scope.cancel()
        await self._drain(run)
        raise _Stopped

    async def _genesis_boot(
        self, nursery: trio.Nursery, run: _Run, channels: trio.CancelScope
    ) -> None:
        """One genesis boot (``genesis``): launch, serve :func:`serve_genesis`, store the
        sealed file, then let the enclave exit by itself (bounded)."""
        lifecycle = self.state.lifecycle
        # No bundle is copied, so nothing else makes the work directory (its sockets live there).
        await trio.Path(self.config.bundle.work_dir).mkdir(parents=True, exist_ok=True)
        await nursery.start(_run_in, channels, self._serve_channels, run.link)
        listeners = await _listen(self.addresses.listen["preload"], "enclave's preload")
        try:
            lifecycle.advance(ParentPhase.LAUNCHING)
            run.enclave = await self._launch()
            run.exited = trio.Event()
            nursery.start_soon(_run_in, run.watch, self._watch_exit, run.enclave, run.exited)
            lifecycle.advance(ParentPhase.PRELOADING)
            sealed = await self._serve_genesis(listeners)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        self.state.identity_public_key = sealed.public_key.hex()
        with trio.move_on_after(TERMINATE_GRACE_S):
            await run.exited.wait()

    async def _serve_genesis(self, listeners: list[trio.SocketListener]) -> SealedIdentity:
        identity = self.config.identity
        assert identity is not None  # preflight
        kms = self._genesis_kms
        if kms is None:
            from ..kms import KmsRecipientDataKey, make_kms_client

            assert identity.kms_key_id is not None  # preflight
            k = self.config.kms
            client = make_kms_client(k.endpoint_url, region=k.region)
            kms = KmsRecipientDataKey(client, identity.kms_key_id)
        path = identity.sealed_file

        def write(data: bytes) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, mode=0o644) as f:  # public data; never over another key
                f.write(data)

        async def store(data: bytes) -> None:
            await trio.to_thread.run_sync(write, data)
            # Before identity_stored goes out: the enclave's exit that follows is expected.
            self.genesis_sealed = SealedIdentity.from_json(data)

        timeout = self.config.enclave.preload_timeout_s + PRELOAD_MARGIN_S
        with trio.move_on_after(timeout):
            stream = await listeners[0].accept()
            try:
                sealed = await serve_genesis(MessageStream(stream), kms, store)
            except (TrioSignError, OSError, trio.BrokenResourceError) as exc:
                if isinstance(exc, ParentExit):
                    raise
                raise PreloadFailed(f"genesis: {type(exc).__name__}: {exc}") from exc
            finally:
                await trio.aclose_forcefully(stream)
            log.info(
                "delta identity key created; pin it in enclave.toml ([bundles] delta_identity_key)",
                extra={"public_key": sealed.public_key.hex(), "sealed_file": str(path)},
            )
            return sealed
        raise PreloadTimeout(
            f"the genesis did not finish in {timeout:g} s ([enclave] preload_timeout_s, plus "
            "the parent's margin)"
        )

    async def _fetch(self) -> Path:
        b = self.config.bundle
        with trio.move_on_after(b.fetch_timeout_s) as scope:
            try:
                return await self._fetch_fn(b.source, b.work_dir)
            except ParentExit:
                raise
            except BundleCopyError as exc:
                if exc.alert == "config":
                    raise ConfigProblem(str(exc)) from exc
                raise BundleUnavailable(str(exc)) from exc
            except Exception as exc:  # OSError, botocore's errors: the copy failed
                detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise BundleUnavailable(f"cannot copy the bundle {b.source}: {detail}") from exc
        assert scope.cancelled_caught
        raise BundleUnavailable(
            f"copying the bundle {b.source} did not finish in {b.fetch_timeout_s:g} s "
            "([bundle] fetch_timeout_s)"
        )

    async def _launch(self) -> RunningEnclave:
        launcher = self._launcher if self._launcher is not None else default_launcher(self.config)
        timeout = self.config.enclave.launch_timeout_s
        with trio.move_on_after(timeout) as scope:
            try:
                return await launcher.start()
            except LaunchError as exc:
                raise LaunchFailed(str(exc)) from exc
        assert scope.cancelled_caught
        raise LaunchFailed(
            f"the enclave did not start in {timeout:g} s ([enclave] launch_timeout_s)"
        )

    async def _watch_exit(
        self,
        enclave: RunningEnclave,
        exited: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """From launch on, in every phase: the enclave's exit is an event that ends the run
        (except while draining, where it is the point)."""
        try:
            code = await enclave.wait()
        except LaunchError as exc:  # cannot watch it any more: the run cannot go on blind
            raise LaunchFailed(f"lost track of the enclave: {exc}") from exc
        lifecycle = self.state.lifecycle
        view = lifecycle.enclave
        # Its last word (the exit message) may still be in the channel: give it a moment.
        with trio.move_on_after(LAST_WORD_GRACE_S):
            await lifecycle.wait_for(lambda lc: lc.enclave.exit_code is not None)
        if self.deltas is not None:
            # A delta it sent just before it died may still be being read or written: the
            # end of the run stops the deltas channel, so let that connection finish first.
            with trio.move_on_after(DELTAS_FLUSH_TIMEOUT_S):
                await self.deltas.wait_disconnected()
        said = view.exit_code is not None
        reported = view.exit_code if said else code
        lifecycle.enclave_exited(reported)
        exited.set()
        if lifecycle.phase is ParentPhase.DRAINING or self.genesis_sealed is not None:
            return  # the point of a drain; the end of a genesis boot
        error = EnclaveExited(reported, reason=view.reason, said=said)
        if error.alert == "enclave_exited" and lifecycle.phase is ParentPhase.PRELOADING:
            if reported == 4:
                raise PreloadTimeout(str(error)) from None
            raise PreloadFailed(str(error)) from None
        if error.alert == "enclave_exited" and view.reason is not None:
            raise EnclaveFailed(str(error)) from None
        raise error

    async def _preload(
        self, listeners: list[trio.SocketListener], bundle: Path
    ) -> PreloadResultMessage:
        if self._preloader is None:
            self._preloader = kms_preloader(self.config, recipient_kms(self.config), self.deltas)
        timeout = self.config.enclave.preload_timeout_s + PRELOAD_MARGIN_S
        with trio.move_on_after(timeout) as scope:
            stream = await listeners[0].accept()
            try:
                return await self._preloader(stream, bundle)
            except (TrioSignError, OSError, trio.BrokenResourceError) as exc:
                if isinstance(exc, ParentExit):
                    raise
                raise PreloadFailed(f"{type(exc).__name__}: {exc}") from exc
            finally:
                await trio.aclose_forcefully(stream)
        assert scope.cancelled_caught
        raise PreloadTimeout(
            f"the enclave did not finish preload in {timeout:g} s "
            "([enclave] preload_timeout_s, plus the parent's margin)"
        )

    async def _wait_serving(self) -> None:
        """The enclave opens its gRPC port only after preload (PCR 16, audit): wait until it
        says it is serving before attesting it (attesting earlier would be a false alarm)."""
        lifecycle = self.state.lifecycle
        timeout = self.config.enclave.start_timeout_s
        ends = ("serving", "failed", "exiting", "exited")
        with trio.move_on_after(timeout):
            await lifecycle.wait_for(lambda lc: lc.enclave.state in ends)
        view = lifecycle.enclave
        if view.state == "serving":
            return
        if view.state == "failed":
            raise EnclaveFailed(f"the enclave failed after preload: {view.reason}")
        if view.state in ("exiting", "exited"):
            raise EnclaveExited(view.exit_code, reason=view.reason)
        raise StartTimeout(
            f"the enclave did not say serving {timeout:g} s after preload "
            f"([enclave] start_timeout_s; it last said {view.state})"
        )

    async def _attest(
        self, nursery: trio.Nursery, gate_scope: trio.CancelScope, shares_sha256: str | None
    ) -> AttestationGate | None:
        """Start the periodic attestation check; return once a check has passed (the gate
        alerts on every failure meanwhile). None without ``[attestation]``."""
        a = self.config.attestation
        if a is None:
            return None
        root = a.root.read_bytes() if a.root is not None else AWS_NITRO_ROOT_PEM
        alerts = self.state.alerts
        gate = AttestationGate(
            AttestationPolicy(
                root_pem=root,
                pcrs=a.pcrs,
                allow_debug=a.allow_debug,
                max_age_s=a.max_age_s,
                shares_sha256=shares_sha256,
            ),
            # The public port (h2c: Ping, GetStatus, GetAttestation): the gRPC port's TLS ends
            # inside the enclave and takes gateway certificates only.
            functools.partial(connect, self.addresses.enclave_public),
            on_alert=lambda reason, message: alerts.raise_alert(
                "attestation_failed", f"{reason}: {message}"
            ),
        )
        self.state.attestation_gate = gate
        # /readyz: a verification older than two check intervals no longer counts
        self.state.attestation_max_age_s = 2 * a.interval_s + 10
        await nursery.start(
            functools.partial(
                _run_in, gate_scope, run_attestation_gate, gate, interval_s=a.interval_s
            )
        )
        await gate.wait_verified()
        return gate

    async def _start_ingress(self, nursery: trio.Nursery, gate: AttestationGate | None) -> None:
        i = self.config.ingress
        if i is None or gate is None:
            return
        try:
            await nursery.start(
                functools.partial(
                    serve_ingress,
                    i.listen,
                    self.addresses.enclave_grpc,
                    gate,
                    settings=i.settings,
                    observer=self.state,
                )
            )
        except (OSError, TrioSignError) as exc:
            if isinstance(exc, ParentExit):
                raise
            raise ListenFailed(f"cannot listen for the ingress on {i.listen}: {exc}") from exc
        self.state.ingress_listening = True  # /readyz: only now can traffic get in

    async def _drain(self, run: _Run) -> None:
        """The orderly stop: ``drain`` on the status channel, then wait (bounded) for the
        enclave to finish its open sessions and exit; the run's end terminates it either way."""
        timeout = self.config.enclave.drain_timeout_s
        log.info("stopping: asking the enclave to drain", extra={"timeout_s": timeout})
        assert run.exited is not None
        with trio.move_on_after(timeout):
            if await run.link.request_drain():
                await run.exited.wait()
                log.info(
                    "the enclave drained and exited",
                    extra={"code": self.state.lifecycle.enclave.exit_code},
                )
                return
            log.warning("no status connection to ask for a drain; terminating the enclave")
            return
        log.warning(
            "the enclave did not drain in time; terminating it", extra={"timeout_s": timeout}
        )

    async def _serve_channels(
        self,
        link: StatusLink,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self.forwarder is not None
        status = await _listen(self.addresses.listen["status"], "enclave's status channel")
        logs = await _listen(self.addresses.listen["logs"], "enclave's log channel")
        deltas = (
            None
            if self.deltas is None
            else await _listen(self.addresses.listen["deltas"], "enclave's deltas channel")
        )
        on_status = self.state.lifecycle.on_status_message
        async with trio.open_nursery() as nursery:
            if deltas is not None:
                assert self.deltas is not None
                await nursery.start(serve_deltas, deltas, self.deltas)
            # Each channel: a hello within 10 s, at most 8 connections (the enclave holds one).
            nursery.start_soon(serve_status, status, on_status, link)
            nursery.start_soon(serve_logs, logs, self.forwarder.on_message)
            task_status.started()

    async def _start_relay(self, nursery: trio.Nursery) -> None:
        config = self.config
        if not config.relay_allowlist:
            return
        listeners = await _listen(self.addresses.listen["sse"], "enclave's SSE relay")
        await nursery.start(
            functools.partial(
                serve_sse_relay,
                listeners,
                config.relay_allowlist,
                ssl_context_for_upstream=ssl.create_default_context(
                    cafile=None if config.relay_ca is None else str(config.relay_ca)
                ),
                stats=self.state.relay,
                upstream_token=config.relay_token,
            )
        )


async def serve_parent(
    config: ParentConfig,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[ParentState, list[str]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the parent until cancelled, until ``stop`` is set, or until it gives up (raises
    :class:`ParentExit`).

    ``task_status.started((state, health_urls))`` once the health server is up; readiness
    (enclave serving, attestation verified) is ``/readyz``'s business.

    ``stop`` is the orderly stop (``trio-sign parent`` sets it on the first SIGTERM/SIGINT):
    a serving enclave is asked to drain over the status channel (open sessions finish, new
    ones get ``UNAVAILABLE``) and given ``[enclave] drain_timeout_s`` to exit before it is
    terminated; an enclave still booting is terminated at once. Then this returns. Cancelling
    instead terminates the enclave at once.
    """
    await ParentSupervisor(config).run(stop, task_status=task_status)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _failure_of(exc: BaseException) -> ParentExit | None:
    """What ended an enclave run (None: an outside cancellation to re-raise). The phase that
    failed raised a typed error with its alert code; the enclave's exit racing it counts only
    when nothing more specific did. Anything else is a bug: ``internal``, with its traceback."""
    leaves = _leaves(exc)
    typed = [leaf for leaf in leaves if isinstance(leaf, ParentExit)]
    specific = [leaf for leaf in typed if not isinstance(leaf, EnclaveExited)]
    if specific or typed:
        return (specific or typed)[0]
    if all(isinstance(leaf, (trio.Cancelled, KeyboardInterrupt)) for leaf in leaves):
        return None
    first = next(leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled))
    log.error("unexpected exception in the parent", exc_info=first)
    return ParentExit(f"internal error: {type(first).__name__}: {first}", alert="internal")
