"""Serving a small ASGI app with hypercorn's Trio worker on an address URL, and the few ASGI
steps every one of our apps takes (lifespan, plain responses, streamed chunks, disconnects)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Final

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


# -- ASGI helpers shared by the health server, the local KMS and the gateway's apps ------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: A response header that keeps caches (and proxies) from storing an answer.
NO_STORE: Final = (b"cache-control", b"no-store")


async def asgi_lifespan(receive: Receive, send: Send) -> None:
    """Answer the ``lifespan`` protocol (nothing to set up or tear down) until shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client goes away (for streamed responses)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def send_chunk(send: Send, data: bytes) -> None:
    """One piece of a streamed response body (more follows)."""
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def respond(
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    extra: Sequence[tuple[bytes, bytes]] | None = None,
    *,
    head_only: bool = False,
    no_store: bool = False,
) -> None:
    """A whole response: ``content-type``, ``content-length``, optionally ``cache-control:
    no-store``, then ``extra`` headers; the body is left out for HEAD (``head_only``)."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if no_store:
        headers.append(NO_STORE)
    headers.extend(extra or ())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else body})
