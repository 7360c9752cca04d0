"""The parent's real SSE relay in front of a test gateway."""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from trio_sign.parent import serve_sse_relay


@asynccontextmanager
async def running_relay(port: int, token: str | None) -> AsyncIterator[int]:
    """The parent's real relay in front of the gateway on ``port``, adding ``token`` upstream
    (what ``[relay] token`` in parent.toml gives it); yields the relay's own port."""
    async with trio.open_nursery() as nursery:
        relay_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(
            functools.partial(
                serve_sse_relay,
                relay_listeners,
                [f"http://127.0.0.1:{port}/v1/enclaves/"],
                ssl_context_for_upstream=ssl.create_default_context(),
                upstream_token=token,
            )
        )
        yield relay_listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()
