"""``trio-sign parent --config parent.toml``: the host-side supervisor.

Exit codes: 0 stopped by SIGTERM/SIGINT (the enclave is terminated on the way out); 1 it gave
up (the alert code and reason are on stderr and in the log); 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import trio


def add_parser(sub: Any) -> None:
    parent = sub.add_parser(
        "parent",
        help="run the host-side supervisor (bundle, KMS, enclave, proxies, health)",
        description="Fetch the sealed bundle, launch the enclave, serve its attested preload "
        "through KMS, then run the mTLS ingress proxy, SSE relay, log forwarding and health. "
        "See trio_sign/parent/_config.py for parent.toml.",
    )
    parent.add_argument("--config", type=Path, required=True, metavar="parent.toml")
    parent.set_defaults(func=cmd_parent)


def cmd_parent(args: argparse.Namespace) -> int:
    from ..parent._config import ConfigError, load_parent_config
    from ..parent._supervisor import ParentExit, serve_parent

    try:
        config = load_parent_config(args.config)
    except ConfigError as exc:
        print(f"trio-sign: error: {args.config}: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def supervise() -> None:
                    await serve_parent(config, stop=stop)
                    nursery.cancel_scope.cancel()  # done: stop listening for signals

                nursery.start_soon(supervise)
                async for _ in signals:
                    if not stop.is_set():
                        print(
                            "trio-sign: stopping: draining the enclave "
                            f"(up to {config.enclave.drain_timeout_s:g} s; "
                            "signal again to stop at once)",
                            file=sys.stderr,
                            flush=True,
                        )
                        stop.set()
                        continue
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except (ParentExit, BaseExceptionGroup) as exc:
        failure = exc
        while isinstance(failure, BaseExceptionGroup):
            failure = failure.exceptions[0]
        if not isinstance(failure, ParentExit):
            raise
        print(f"trio-sign: parent gave up ({failure.alert}): {failure}", file=sys.stderr)
        return 1
    return 0
