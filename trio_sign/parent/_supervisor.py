"""The parent supervisor: the seed's startup order as one supervision tree.

::

    serve_parent
    ├── serve_health                        /healthz, /readyz, /metrics, /v1/logs/tail
    └── one enclave run (again, with back-off, only if [failure] restart = true)
        ├── fetch the bundle                local path or s3:// into work_dir (tmpfs)
        ├── status and log channel servers  (the enclave's words, relayed to operators)
        ├── SSE relay                       (allowlisted gateway URLs only)
        ├── launch the enclave              nitro-cli run-enclave | local process in namespaces
        ├── serve preload                   KMS Decrypt with Recipient; the copy is then deleted
        ├── run_attestation_gate            fresh document, pinned root and PCRs, periodically
        ├── serve_ingress                   mTLS gRPC, forwarded only while the gate is open
        └── wait for the enclave to exit

A preload failure or the enclave's death ends the run: the enclave is terminated, an alert is
raised (an ERROR record with a stable ``alert`` field, ``/readyz`` and the optional command
hook), the proxy goes with the run so gateways get UNAVAILABLE, and the parent either retries
with back-off (``[failure] restart``) or exits non-zero. The parent never holds a plaintext
share or data key: it moves ciphertext and forwards attestation documents to KMS.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import trio

from proto_min import sign_service_pb2 as pb

from .._backoff import full_jitter_delay
from .._errors import TrioSignError
from ..nitro import AWS_NITRO_ROOT_PEM, EventsConfigMessage, MessageStream
from ..rpc import open_grpc_channel
from ..shares import DevKeyFile
from ..transport import connect, open_listeners
from ._attestation_gate import AttestationGate, AttestationPolicy, run_attestation_gate
from ._channels import StatusLink, serve_log_connection, serve_status_connection
from ._config import ParentConfig
from ._dev_kms import DevRecipientKms
from ._health import ParentState, serve_health
from ._ingress import make_server_ssl_context, serve_ingress
from ._launch import LaunchError, LocalLauncher, NitroCliLauncher, RunningEnclave
from ._logs import CloudWatchSink, JsonLinesSink, LogForwarder, LogTail, cloudwatch_logs_client
from ._preload import RecipientKms, serve_preload
from ._relay import serve_sse_relay

log = logging.getLogger("trio_sign.parent")

#: vsock ports the parent listens on for the enclave (CID 3 is the parent, from inside).
PRELOAD_PORT, STATUS_PORT, LOG_PORT, SSE_PORT = 5000, 5001, 5002, 5003


class ParentExit(TrioSignError):
    """The supervisor gave up (no restart configured, or a configuration problem)."""

    def __init__(self, message: str, *, alert: str) -> None:
        super().__init__(message)
        self.alert = alert


class _Stopped(Exception):
    """The run ended because the operator asked the parent to stop (internal)."""


class _RunPhase:
    """Whether the current run is past startup and waiting on the enclave (where a stop
    drains it instead of cutting everything)."""

    def __init__(self) -> None:
        self.waiting = False


class _Addresses:
    """Where each channel lives: vsock ports for Nitro, UNIX sockets under work_dir locally."""

    def __init__(self, config: ParentConfig) -> None:
        e = config.enclave
        if e.backend == "local":
            run = config.bundle.work_dir
            self.listen = {
                n: f"unix://{run}/{n}.sock" for n in ("preload", "status", "logs", "sse")
            }
            self.enclave_side = dict(self.listen)
            self.enclave_grpc = f"unix://{run}/enclave-grpc.sock"
        else:
            ports = {
                "preload": PRELOAD_PORT,
                "status": STATUS_PORT,
                "logs": LOG_PORT,
                "sse": SSE_PORT,
            }
            self.listen = {n: f"vsock://ANY:{p}" for n, p in ports.items()}
            self.enclave_side = {n: f"vsock://3:{p}" for n, p in ports.items()}
            self.enclave_grpc = f"vsock://{e.cid}:{e.grpc_port}"


async def _alert(state: ParentState, config: ParentConfig, code: str, message: str) -> None:
    """An alert: an ERROR record with a stable ``alert`` field, ``/readyz``, and the command
    hook, which is awaited (shielded, at most 30 s) so it runs even when the parent is about
    to exit."""
    log.error(message, extra={"alert": code})
    state.last_alert = f"{code}: {message}"
    state.last_alert_at = state.wall_clock()
    if config.failure.alert_command:
        with trio.CancelScope(shield=True):
            await _run_alert_command(config.failure.alert_command, code, message)


def _attestation_alert(
    state: ParentState, config: ParentConfig, nursery: trio.Nursery, reason: str, message: str
) -> None:
    """The gate's ``on_alert`` (synchronous): record it and run the command hook in the
    background (the gate must not block; forwarding has already stopped)."""
    state.on_attestation_alert(reason, message)
    if config.failure.alert_command:
        nursery.start_soon(
            _run_alert_command,
            config.failure.alert_command,
            "attestation_failed",
            f"{reason}: {message}",
        )


async def _run_alert_command(command: tuple[str, ...], code: str, message: str) -> None:
    env = {**os.environ, "TRIO_SIGN_ALERT": code, "TRIO_SIGN_ALERT_MESSAGE": message}
    with trio.move_on_after(30):
        try:
            result = await trio.run_process(
                list(command), env=env, check=False, capture_stdout=True, capture_stderr=True
            )
        except OSError as exc:
            log.error("alert command could not run", extra={"error": str(exc)})
            return
        if result.returncode != 0:
            log.error("alert command failed", extra={"exit_code": result.returncode})


async def fetch_bundle(source: str, work_dir: Path) -> Path:
    """Copy the sealed bundle (ciphertext) into ``work_dir``: a local path, or ``s3://``."""
    await trio.to_thread.run_sync(functools.partial(work_dir.mkdir, parents=True, exist_ok=True))
    target = work_dir / "service_key_shares.json.enc"
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ParentExit(f"bad bundle URL {source!r}: expected s3://bucket/key", alert="config")
        import boto3  # type: ignore[import-untyped]

        def download() -> None:
            boto3.client("s3").download_file(bucket, key, str(target))

        await trio.to_thread.run_sync(download)
    else:
        src = Path(source)

        def copy() -> None:
            with src.open("rb") as f_in, target.open("wb") as f_out:
                while chunk := f_in.read(1 << 20):
                    f_out.write(chunk)

        try:
            await trio.to_thread.run_sync(copy)
        except OSError as exc:
            raise ParentExit(
                f"cannot read the bundle {source}: {exc.strerror}", alert="bundle_unavailable"
            ) from exc
    log.info("bundle fetched", extra={"source": source, "bytes": target.stat().st_size})
    return target


def _recipient_kms(config: ParentConfig) -> RecipientKms:
    k = config.kms
    if k.mode == "dev-key":
        assert k.dev_key is not None
        if config.enclave.nsm_dir is None:
            raise ParentExit(
                "[kms] mode dev-key needs the local NSM ([enclave] nsm_dir)", alert="config"
            )
        root = (config.enclave.nsm_dir / "local-nsm-root.pem").read_bytes()
        return DevRecipientKms(DevKeyFile.load(k.dev_key), root_pem=root)
    from ..kms import KmsRecipientKms, make_kms_client

    return KmsRecipientKms(make_kms_client(k.endpoint_url, region=k.region))


def _launcher(config: ParentConfig, addresses: _Addresses) -> Any:
    e = config.enclave
    if e.backend == "nitro-cli":
        assert e.eif_path is not None
        return NitroCliLauncher(e.eif_path, e.cpu_count, e.memory_mib, e.cid)
    assert e.nsm_dir is not None
    side = addresses.enclave_side
    args = [
        "--nsm",
        f"local:{e.nsm_dir}",
        "--grpc-listen",
        addresses.enclave_grpc,
        "--preload-address",
        side["preload"],
        "--status-address",
        side["status"],
        "--log-address",
        side["logs"],
        "--preload-timeout",
        str(e.preload_timeout_s),
    ]
    if e.gateway_url is not None:
        # Where to subscribe comes over the boot channel, as on Nitro (whose EIF passes only
        # --sse-via), so local runs take the production path.
        args += ["--sse-via", side["sse"]]
    return LocalLauncher(
        args, use_namespaces=e.namespaces, log_path=config.bundle.work_dir / "enclave.stderr"
    )


def _events_config(config: ParentConfig) -> EventsConfigMessage | None:
    e = config.enclave
    if e.gateway_url is None:
        return None
    return EventsConfigMessage(gateway_url=e.gateway_url, node_id=e.node_id)


async def _serve_channel(
    url: str,
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await open_listeners(url)
    await trio.serve_listeners(handler, listeners, task_status=task_status)


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


async def _exit_or_stop(enclave: RunningEnclave, stop: trio.Event) -> tuple[bool, int | None]:
    """Wait for the enclave to exit (True, its code) or for a stop request (False, None)."""
    outcome: list[tuple[bool, int | None]] = []
    async with trio.open_nursery() as nursery:

        async def exited() -> None:
            outcome.append((True, await enclave.wait()))
            nursery.cancel_scope.cancel()

        async def stopped() -> None:
            await stop.wait()
            outcome.append((False, None))
            nursery.cancel_scope.cancel()

        nursery.start_soon(exited)
        nursery.start_soon(stopped)
    return outcome[0]


async def _drain_enclave(config: ParentConfig, link: StatusLink, enclave: RunningEnclave) -> None:
    """The orderly stop: ``drain`` on the status channel, then wait (bounded) for the enclave
    to finish its open sessions and exit; the caller terminates it either way."""
    timeout = config.enclave.drain_timeout_s
    log.info("stopping: asking the enclave to drain", extra={"timeout_s": timeout})
    with trio.move_on_after(timeout):
        if await link.request_drain():
            try:
                code = await enclave.wait()
            except LaunchError as exc:  # cannot watch it any more: terminate it
                log.warning("cannot watch the draining enclave (%s); terminating it", exc)
                return
            log.info("the enclave drained and exited", extra={"code": code})
            return
        log.warning("no status connection to ask for a drain; terminating the enclave")
        return
    log.warning("the enclave did not drain in time; terminating it", extra={"timeout_s": timeout})


async def _run_enclave_once(
    config: ParentConfig,
    state: ParentState,
    forwarder: LogForwarder,
    stop: trio.Event,
    phase: _RunPhase,
) -> None:
    """One enclave boot from bundle fetch to death. Raises :class:`ParentExit` on failure and
    :class:`_Stopped` after an orderly stop (``stop`` set while serving)."""
    link = StatusLink()
    gate_scope = trio.CancelScope()
    # The status and log channels outlive a cancellation of this run until the enclave is
    # terminated, so that its last words (final state, exit code, last log lines) still
    # arrive; they are closed in the ``finally`` below whatever happens.
    channel_scopes = [trio.CancelScope(shield=True), trio.CancelScope(shield=True)]
    async with trio.open_nursery() as nursery:
        try:
            await _run_enclave_in(
                nursery, config, state, forwarder, stop, phase, link, gate_scope, channel_scopes
            )
        finally:
            for scope in channel_scopes:
                scope.cancel()
            nursery.cancel_scope.cancel()


async def _run_enclave_in(
    nursery: trio.Nursery,
    config: ParentConfig,
    state: ParentState,
    forwarder: LogForwarder,
    stop: trio.Event,
    phase: _RunPhase,
    link: StatusLink,
    gate_scope: trio.CancelScope,
    channel_scopes: list[trio.CancelScope],
) -> None:
    addresses = _Addresses(config)
    kms = _recipient_kms(config)
    bundle = await fetch_bundle(config.bundle.source, config.bundle.work_dir)
    await nursery.start(
        _run_in,
        channel_scopes[0],
        _serve_channel,
        addresses.listen["status"],
        functools.partial(serve_status_connection, on=state.on_status_message, link=link),
    )
    await nursery.start(
        _run_in,
        channel_scopes[1],
        _serve_channel,
        addresses.listen["logs"],
        functools.partial(serve_log_connection, on=forwarder.on_message),
    )
    if config.relay_allowlist:
        relay_listeners = await open_listeners(addresses.listen["sse"])
        await nursery.start(
            functools.partial(
                serve_sse_relay,
                relay_listeners,
                config.relay_allowlist,
                ssl_context_for_upstream=ssl.create_default_context(
                    cafile=None if config.relay_ca is None else str(config.relay_ca)
                ),
                stats=state.relay,
                upstream_token=config.relay_token,
            )
        )
    preload_listeners = await open_listeners(addresses.listen["preload"])
    enclave: RunningEnclave = await _launcher(config, addresses).start()
    try:
        state.set_enclave_state("preloading")
        with trio.fail_after(config.enclave.preload_timeout_s + 30):
            stream = await preload_listeners[0].accept()
            try:
                result = await serve_preload(
                    MessageStream(stream), bundle, kms, events=_events_config(config)
                )
            finally:
                await trio.aclose_forcefully(stream)
        bundle.unlink()  # the parent's copy goes as soon as the enclave holds the shares
        log.info(
            "preload served; the parent's bundle copy is deleted",
            extra={"accounts": result.accounts, "sha256": result.sha256},
        )
        # The enclave opens its gRPC port only after preload (PCR 16, audit): attest it
        # once it says it is serving, not before (that would be a false alarm).
        with trio.fail_after(60):
            while state.enclave_state != "serving":
                if state.enclave_state in ("failed", "exiting", "exited"):
                    raise ParentExit(
                        f"the enclave stopped after preload ({state.enclave_reason})",
                        alert="enclave_exited",
                    )
                await trio.sleep(0.05)
        gate = None
        if config.attestation is not None:
            a = config.attestation
            root = a.root.read_bytes() if a.root is not None else AWS_NITRO_ROOT_PEM
            gate = AttestationGate(
                AttestationPolicy(
                    root_pem=root,
                    pcrs=a.pcrs,
                    allow_debug=a.allow_debug,
                    max_age_s=a.max_age_s,
                    shares_sha256=result.sha256,
                ),
                functools.partial(connect, addresses.enclave_grpc),
                on_alert=functools.partial(_attestation_alert, state, config, nursery),
            )
            state.attestation_gate = gate
            # /readyz: a verification older than two check intervals no longer counts
            state.attestation_max_age_s = 2 * a.interval_s + 10
            await nursery.start(
                functools.partial(
                    _run_in, gate_scope, run_attestation_gate, gate, interval_s=a.interval_s
                )
            )
        if config.ingress is not None and gate is not None:
            i = config.ingress
            ctx = make_server_ssl_context(
                i.cert.read_bytes(), i.key.read_bytes(), i.client_ca.read_bytes()
            )
            await nursery.start(
                functools.partial(
                    serve_ingress,
                    i.listen,
                    addresses.enclave_grpc,
                    ctx,
                    gate,
                    settings=i.settings,
                    observer=state,
                )
            )
            state.ingress_listening = True  # /readyz: only now can traffic get in
        nursery.start_soon(
            _poll_enclave_status, state, functools.partial(connect, addresses.enclave_grpc)
        )
        phase.waiting = True
        exited, code = await _exit_or_stop(enclave, stop)
        if not exited:
            # Stop re-attesting (the gate keeps its verdict, so forwarded connections stay
            # open): a draining enclave closes its port, which must not read as an attack
            # and cut the sessions the drain is letting finish.
            gate_scope.cancel()
            await _drain_enclave(config, link, enclave)
            raise _Stopped
        raise ParentExit(f"the enclave exited (code {code})", alert="enclave_exited")
    except BaseException:
        with trio.CancelScope(shield=True):
            await enclave.terminate(grace_s=10.0)
        bundle.unlink(missing_ok=True)
        raise
    finally:
        phase.waiting = False
        state.ingress_listening = False
        for listener in preload_listeners:
            await trio.aclose_forcefully(listener)


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
    state = ParentState()
    with contextlib.ExitStack() as files:
        stream: Any = (
            sys.stdout
            if config.log_file is None
            else files.enter_context(config.log_file.open("a"))
        )
        cloudwatch = None
        if config.cloudwatch_group is not None and config.cloudwatch_stream is not None:
            kwargs = {"region_name": config.cloudwatch_region} if config.cloudwatch_region else {}
            cloudwatch = CloudWatchSink(
                cloudwatch_logs_client(**kwargs),
                log_group=config.cloudwatch_group,
                log_stream=config.cloudwatch_stream,
            )
            state.cloudwatch = cloudwatch.stats
        forwarder = LogForwarder(
            sinks=[JsonLinesSink(stream)], cloudwatch=cloudwatch, tail=LogTail(), stats=state.logs
        )
        state.tail = forwarder.tail
        await _supervise(
            config, state, forwarder, stop if stop is not None else trio.Event(), task_status
        )


async def _supervise(
    config: ParentConfig,
    state: ParentState,
    forwarder: LogForwarder,
    stop: trio.Event,
    task_status: trio.TaskStatus[tuple[ParentState, list[str]]],
) -> None:
    failures = 0
    rng = random.Random()
    phase = _RunPhase()
    state.ingress_required = config.ingress is not None
    async with trio.open_nursery() as nursery:
        if forwarder.cloudwatch is not None:
            await nursery.start(forwarder.cloudwatch.run)
        health = await nursery.start(functools.partial(serve_health, config.health_listen, state))
        task_status.started((state, list(health)))

        async def stop_while_booting() -> None:
            await stop.wait()
            if not phase.waiting:  # nothing is served yet: nothing to drain
                log.info("stopping: the enclave is not serving yet; terminating it")
                nursery.cancel_scope.cancel()

        nursery.start_soon(stop_while_booting)
        while True:
            try:
                await _run_enclave_once(config, state, forwarder, stop, phase)
            except BaseException as exc:
                if any(isinstance(leaf, _Stopped) for leaf in _leaves(exc)):
                    nursery.cancel_scope.cancel()
                    return
                failure = _failure_of(exc)
                if failure is None:
                    raise
                await _alert(state, config, failure.alert, str(failure))
                state.attestation_gate = None
                state.attestation_verified = False
                if not config.failure.restart:
                    nursery.cancel_scope.cancel()
                    raise failure from exc
                if stop.is_set():
                    nursery.cancel_scope.cancel()
                    return
            wait = full_jitter_delay(
                rng,
                base=config.failure.backoff_initial_s,
                maximum=config.failure.backoff_max_s,
                failures=failures,
                at_least=config.failure.backoff_initial_s,
            )
            failures += 1
            log.warning("restarting the enclave after back-off", extra={"delay_s": round(wait, 1)})
            await trio.sleep(wait)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _failure_of(exc: BaseException) -> ParentExit | None:
    """What ended an enclave run, as an alert (None: an outside cancellation to re-raise)."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, ParentExit):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, trio.TooSlowError):
            return ParentExit("the enclave did not finish preload in time", alert="preload_timeout")
        if isinstance(leaf, TrioSignError):
            reason = getattr(leaf, "reason", None)
            alert = "preload_failed" if reason is not None else "parent_failed"
            return ParentExit(f"{type(leaf).__name__}: {leaf}", alert=alert)
    if all(isinstance(leaf, (trio.Cancelled, KeyboardInterrupt)) for leaf in leaves):
        return None
    first = next(leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled))
    log.error("unexpected exception in the parent", exc_info=first)
    return ParentExit(f"internal error: {type(first).__name__}: {first}", alert="internal")
