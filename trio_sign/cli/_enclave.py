"""``trio-sign enclave``: the enclave process.

Exit codes: 0 drained cleanly after SIGTERM/SIGINT; 1 failed to start or crashed (the reason
is the last log line and the one-line error on stderr); 2 bad usage.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

import trio

from .._errors import TrioSignError


def add_parser(sub: Any) -> None:
    enclave = sub.add_parser("enclave", help="run the enclave signing service")
    enclave.add_argument("--grpc-listen", default="vsock://ANY:50051", metavar="URL")
    enclave.add_argument("--max-sessions", type=int, default=10_000)
    enclave.add_argument("--session-ttl", type=float, default=60.0, metavar="SECONDS")
    enclave.add_argument("--drain-grace", type=float, default=10.0, metavar="SECONDS")
    enclave.add_argument(
        "--gateway-url", metavar="URL", help="Sign Gateway base URL for the SSE event stream"
    )
    enclave.add_argument("--node-id", default="enclave-0", help="this node's id at the gateway")
    enclave.add_argument(
        "--sse-via", metavar="URL", help="address the SSE stream travels over (the parent relay)"
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
    from ..enclave import EnclaveConfig, serve_dev_enclave

    if args.dev_plaintext_shares is not None and not args.dev:
        raise TrioSignError("--dev-plaintext-shares is for development only; it needs --dev")
    if not args.dev:
        raise TrioSignError(
            "the production enclave (NSM attestation and KMS preload) is not built yet; "
            "use --dev --dev-plaintext-shares FILE for development"
        )
    if args.dev_plaintext_shares is None:
        raise TrioSignError("--dev needs --dev-plaintext-shares FILE")
    config = EnclaveConfig(
        grpc_listen=args.grpc_listen,
        max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl,
        drain_grace_s=args.drain_grace,
        gateway_url=args.gateway_url,
        node_id=args.node_id,
        sse_via=args.sse_via,
        dev=True,
        dev_plaintext_shares=args.dev_plaintext_shares,
    )

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                handle = await nursery.start(serve_dev_enclave, config)
                async for _ in signals:
                    await handle.drain()
                    break

    trio.run(run)
    return 0
