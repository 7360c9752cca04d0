"""``trio-sign dev up --shares FILE``: keep the local stack running for people testing their
own Sign Gateway against it.

It seals FILE (a plaintext service share file) through the local KMS, starts the parent,
which launches the enclave and verifies its attestation, and prints where to connect: the
mTLS gRPC ingress (with the client certificate to use), the health endpoints and the event
server the enclave subscribes to (through the parent's relay, which adds node-1's bearer token
from the 0600 file printed as ``events_token``). Ctrl-C (or SIGTERM) stops everything.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

import trio


def add_parser(sub: Any) -> None:
    dev = sub.add_parser("dev", help="development helpers")
    cmds = dev.add_subparsers(dest="dev_command", required=True, metavar="SUBCOMMAND")
    up = cmds.add_parser(
        "up",
        help="run the local stack (KMS, parent, enclave, mTLS ingress) until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument(
        "--shares",
        type=Path,
        required=True,
        metavar="FILE",
        help="plaintext service share file (from `shares generate` or a ceremony)",
    )
    up.add_argument("--workdir", type=Path, default=Path("dev-stack"))
    up.add_argument(
        "--ingress",
        default=None,
        metavar="URL",
        help="where the mTLS gRPC ingress listens (default a UNIX socket in workdir;"
        " e.g. tcp://127.0.0.1:50051)",
    )
    up.add_argument("--health", default="tcp://127.0.0.1:8080", metavar="URL")
    up.add_argument("--ready-timeout", type=float, default=300.0, metavar="SECONDS")
    up.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    from ._demo_full import local_stack

    if not args.shares.is_file():
        raise SystemExit(f"trio-sign dev up: {args.shares} is not a file")
    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with local_stack(
                work,
                args.shares.resolve(),
                ready_timeout=args.ready_timeout,
                ingress_listen=args.ingress,
                health_listen=args.health,
            ) as stack:
                report = stack.state.report()
                pki = stack.pki
                print("local stack ready", flush=True)
                for key, value in (
                    (
                        "grpc",
                        f"{stack.ingress_url}  (mTLS, TLS 1.3, ALPN h2; server name localhost)",
                    ),
                    ("client_ca", pki.ca),
                    ("client_cert", pki.client_cert),
                    ("client_key", pki.client_key),
                    ("health", f"{stack.health_url}/readyz"),
                    ("events", f"{stack.events_url}/v1/enclaves/node-1/events"),
                    ("events_token", f"{stack.events_token_file}  (Authorization: Bearer)"),
                    ("accounts", report["accounts"]),
                    ("shares_sha256", report["shares_sha256"]),
                ):
                    print(f"  {key:<14} {value}", flush=True)
                print("Ctrl-C stops everything.", flush=True)
                async for _ in signals:
                    break

    trio.run(run)
    return 0
