"""``trio-sign gateway --config gateway.toml``: the reference Sign Gateway (see
:mod:`trio_sign.gateway._service` for the config and the API). Stops on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import trio


def add_parser(sub: Any) -> None:
    gateway = sub.add_parser(
        "gateway",
        help="run the reference Sign Gateway (sign API, SSE events, health prober)",
    )
    gateway.add_argument("--config", type=Path, required=True, metavar="gateway.toml")
    gateway.set_defaults(func=cmd_gateway)


def cmd_gateway(args: argparse.Namespace) -> int:
    from ..gateway._service import GatewayConfigError, parse_gateway_config, serve_gateway
    from ._listen import check_port_free

    try:
        config = parse_gateway_config(args.config.read_text(), base=args.config.parent)
    except (OSError, GatewayConfigError) as exc:
        print(f"trio-sign: error: {args.config}: {exc}", file=sys.stderr)
        return 2
    check_port_free(config.api_listen, f"[api] listen in {args.config}")
    check_port_free(config.events_listen, f"[events] listen in {args.config}")

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                handle = await nursery.start(serve_gateway, config)
                print(
                    f"gateway api {handle.api_urls[0]}  events {handle.events_urls[0]}", flush=True
                )
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    return 0
