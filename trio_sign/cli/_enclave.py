"""``trio-sign enclave``: the enclave process (the EIF's command).

Settings come from the measured configuration (``--config``, default
``/etc/trio-sign/enclave.toml``, DESIGN §9); a limit flag that is given (``--max-sessions``...)
wins over the file's ``[limits]``. ``--dev`` without ``--config`` runs the built-in
development configuration and says so.

Exit codes (see :mod:`trio_sign.enclave._exit`): 0 drained cleanly after SIGTERM/SIGINT;
1 internal error; 2 bad usage; 3 preload refused; 4 preload timed out; 5 memory; 6 NSM;
7 a service failed at run time.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._profile import install_profile_toggle
from ..rpc import ServerLimits, raise_open_file_limit
from ._listen import UsageError

if TYPE_CHECKING:
    from ..enclave import EnclaveExit

log = logging.getLogger("trio_sign.enclave")


def add_parser(sub: Any) -> None:
    enclave = sub.add_parser(
        "enclave",
        help="run the enclave signing service",
        description="Production: attested preload of the sealed bundle from the parent, then "
        "serve the SignService. Development: --dev --dev-plaintext-shares FILE.",
    )
    limits = ServerLimits()
    enclave.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the measured configuration (default /etc/trio-sign/enclave.toml; with --dev: the"
        " built-in development configuration)",
    )
    enclave.add_argument(
        "--grpc-listen",
        default="vsock://ANY:50051",
        metavar="URL",
        help="the full API: TLS 1.3 with a client certificate from the configured CA (plain"
        " h2c with --dev unless --tls)",
    )
    enclave.add_argument(
        "--public-listen",
        metavar="URL",
        help="the public h2c listener (Ping, GetStatus, GetAttestation only); default"
        " vsock://ANY:50052, none with --dev",
    )
    enclave.add_argument(
        "--tls",
        action="store_true",
        help="with --dev: serve --grpc-listen behind TLS too (needs a --config with"
        " [gateway] client_ca_pem); always on without --dev",
    )
    # Limits: None = not given, so the measured file's [limits] (or the default) applies.
    enclave.add_argument(
        "--max-sessions", type=int, help="default: [limits] max_sessions, else 10000"
    )
    enclave.add_argument(
        "--session-ttl",
        type=float,
        metavar="SECONDS",
        help="default: [limits] session_ttl_s, else 60",
    )
    enclave.add_argument(
        "--drain-grace",
        type=float,
        metavar="SECONDS",
        help="default: [limits] drain_grace_s, else 10",
    )
    enclave.add_argument(
        "--max-sign-request-bytes",
        type=int,
        metavar="BYTES",
        help="largest Sign request, refused on its length prefix before parsing (default:"
        " [limits] max_sign_request_bytes, else 262144)",
    )
    enclave.add_argument(
        "--max-connections",
        type=int,
        help="gRPC connections at once; at the limit the longest-idle one is closed"
        f" (default: [limits] max_connections, else {limits.max_connections}; lowered to fit"
        " the open-file limit)",
    )
    enclave.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="close a gRPC connection with no open call after this (default: [limits]"
        f" idle_timeout_s, else {limits.idle_timeout_s:g})",
    )
    enclave.add_argument(
        "--gateway-url",
        metavar="URL",
        help="Sign Gateway base URL for the SSE event stream. Usually left out: the parent "
        "sends it (and the node id) at boot; given here, it wins over the parent's",
    )
    enclave.add_argument("--node-id", default="enclave-0", help="this node's id at the gateway")
    enclave.add_argument(
        "--sse-via",
        metavar="URL",
        help="address the SSE stream travels over (the parent relay, vsock://3:5003 on Nitro)",
    )
    enclave.add_argument(
        "--nsm", default="device", help="'device' (/dev/nsm) or 'local:DIR' (local stand-in)"
    )
    enclave.add_argument("--preload-address", default="vsock://3:5000", metavar="URL")
    enclave.add_argument("--status-address", default="vsock://3:5001", metavar="URL")
    enclave.add_argument("--log-address", default="vsock://3:5002", metavar="URL")
    enclave.add_argument(
        "--deltas-address",
        default="vsock://3:7003",
        metavar="URL",
        help="the parent's deltas channel (its [deltas] deltas_port); used with a delta "
        "identity key",
    )
    enclave.add_argument(
        "--preload-timeout",
        type=float,
        metavar="SECONDS",
        help="default: [limits] preload_timeout_s, else 300",
    )
    enclave.add_argument(
        "--verify-shares",
        choices=["lazy", "full"],
        help="default: [limits] verify_shares, else lazy",
    )
    enclave.add_argument(
        "--memory-limit",
        type=int,
        default=None,
        metavar="BYTES",
        help="the enclave's memory (default: cgroup limit or MemTotal)",
    )
    enclave.add_argument("--dev", action="store_true", help="development mode (never in the EIF)")
    enclave.add_argument(
        "--dev-plaintext-shares",
        type=Path,
        metavar="FILE",
        help="serve a plaintext share file directly (requires --dev)",
    )
    enclave.set_defaults(func=cmd_enclave)


def cmd_enclave(args: argparse.Namespace) -> int:
    from ..enclave import configure_gc_for_serving, serve_dev_enclave, serve_enclave
    from ..enclave._config import enclave_config
    from ..enclave._measured import (
        DEFAULT_CONFIG_PATH,
        MeasuredConfigError,
        development_config,
        load_measured_config,
    )

    if args.dev_plaintext_shares is not None and not args.dev:
        raise UsageError("--dev-plaintext-shares is for development only; it needs --dev")
    if args.dev and args.dev_plaintext_shares is None:
        raise UsageError("--dev needs --dev-plaintext-shares FILE")
    if args.tls and not args.dev:
        raise UsageError("--tls is for --dev (TLS is always on without --dev)")
    if args.tls and args.config is None:
        raise UsageError("--tls needs --config FILE with [gateway] client_ca_pem (your gateway CA)")
    if args.dev and args.config is None:
        measured = development_config()
        log.warning(
            "DEVELOPMENT CONFIGURATION: no --config, so this enclave runs the built-in"
            " development configuration (no bundle keys, a placeholder gateway CA, and a"
            " default policy that needs no approvals). Never in production.",
            extra={"config_sha256": measured.sha256.hex()},
        )
    else:
        try:
            measured = load_measured_config(args.config or DEFAULT_CONFIG_PATH)
        except MeasuredConfigError as exc:
            if exc.reason == "config":
                raise
            # A policy refused: its own reason, as the enclave's other boot refusals.
            print(f"trio-sign: enclave failed ({exc.reason}): {exc}", file=sys.stderr)
            return int(exc.exit_code)
        log.info(
            "measured configuration loaded",
            extra={"config": measured.source, "config_sha256": measured.sha256.hex()},
        )
    public_listen = args.public_listen
    if public_listen is None and not args.dev:
        public_listen = "vsock://ANY:50052"
    config = enclave_config(
        measured,
        limits={
            "max_sessions": args.max_sessions,
            "session_ttl_s": args.session_ttl,
            "drain_grace_s": args.drain_grace,
            "max_sign_request_bytes": args.max_sign_request_bytes,
            "max_connections": args.max_connections,
            "idle_timeout_s": args.idle_timeout,
            "preload_timeout_s": args.preload_timeout,
            "verify_shares": args.verify_shares,
        },
        grpc_listen=args.grpc_listen,
        public_listen=public_listen,
        tls=args.tls or not args.dev,
        gateway_url=args.gateway_url,
        node_id=args.node_id,
        sse_via=args.sse_via,
        nsm=args.nsm,
        preload_address=args.preload_address,
        status_address=args.status_address,
        log_address=args.log_address,
        deltas_address=args.deltas_address,
        memory_limit_bytes=args.memory_limit,
        dev=args.dev,
        dev_plaintext_shares=args.dev_plaintext_shares,
    )
    serve = serve_dev_enclave if args.dev else serve_enclave
    configure_gc_for_serving()
    raise_open_file_limit()  # one descriptor per gRPC connection (max_connections)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def serve_then_exit(*, task_status: trio.TaskStatus[Any]) -> None:
                    # A drain asked for by the parent or the gateway (no signal) ends the
                    # service too: then stop waiting for signals and exit.
                    await serve(config, task_status=task_status)
                    nursery.cancel_scope.cancel()

                handle = await nursery.start(serve_then_exit)
                async for _ in signals:
                    await handle.drain()
                    break

    instruments = install_profile_toggle("enclave")  # development: TRIO_SIGN_PROFILE_DIR
    try:
        trio.run(run, instruments=instruments)
    except BaseException as exc:
        failure = _enclave_exit(exc)
        if failure is None:
            raise
        # One line: the log (stderr, and the parent's log channel) has the details.
        print(f"trio-sign: enclave failed ({failure.reason}): {failure}", file=sys.stderr)
        return int(failure.code)
    return 0


def _enclave_exit(exc: BaseException) -> EnclaveExit | None:
    """The ``EnclaveExit`` inside ``exc`` (the nurseries wrap it in groups), or None."""
    from ..enclave import EnclaveExit

    if isinstance(exc, EnclaveExit):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _enclave_exit(sub)
            if found is not None:
                return found
    return None
