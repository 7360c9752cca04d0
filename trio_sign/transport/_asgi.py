"""Serving a small ASGI app with hypercorn's Trio worker on an address URL."""

from __future__ import annotations

import logging
from typing import Any

import trio

from ._address import parse_address


def hypercorn_bind(listen_url: str) -> str:
    """``tcp://host:port`` / ``unix:///path`` as hypercorn's bind syntax."""
    address = parse_address(listen_url)
    if address.scheme == "tcp":
        host = address.host or "0.0.0.0"
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{address.port}"
    if address.scheme == "unix":
        return f"unix:{address.path}"
    raise ValueError(f"an HTTP server listens on tcp:// or unix://, not {listen_url!r}")


async def serve_asgi(
    app: Any,
    listen_url: str,
    *,
    logger: logging.Logger,
    certfile: str | None = None,
    keyfile: str | None = None,
    graceful_timeout_s: float = 1.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``task_status.started(binds)`` with the real addresses.

    Error handling: a bad URL raises ``TransportError``/``ValueError``, a bind failure
    ``OSError``, both before ``started``.
    """
    # Imported here: the enclave uses this package but never serves HTTP.
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    if (certfile is None) != (keyfile is None):
        raise ValueError("give both certfile and keyfile to serve HTTPS, or neither")
    config = HypercornConfig()
    config.bind = [hypercorn_bind(listen_url)]
    config.accesslog = None
    config.errorlog = logger
    config.graceful_timeout = graceful_timeout_s
    config.include_server_header = False
    if certfile is not None and keyfile is not None:
        config.certfile = certfile
        config.keyfile = keyfile
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(hypercorn_serve, app, config)
        task_status.started(binds)
