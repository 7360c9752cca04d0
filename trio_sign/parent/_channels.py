"""The parent's ends of the enclave's status and log channels.

Each accepted connection starts with ``hello``; after that the enclave sends ``state``/``exit``
(status) or ``log``/``dropped`` (logs). The parent never trusts what it reads for anything but
reporting: these are the enclave's words, relayed to operators.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..nitro import (
    ChannelClosed,
    ChannelMessage,
    ChannelProtocolError,
    DroppedMessage,
    ExitMessage,
    HelloMessage,
    LogMessage,
    MessageStream,
    StateMessage,
)

log = logging.getLogger("trio_sign.parent.channels")

OnMessage = Callable[[ChannelMessage], None]


async def _serve_channel(
    stream: trio.abc.Stream, channel: str, kinds: tuple[type[ChannelMessage], ...], on: OnMessage
) -> None:
    messages = MessageStream(stream)
    try:
        hello = await messages.receive_expected(HelloMessage)
        if hello.channel != channel:
            log.warning(
                "wrong channel on connection", extra={"expected": channel, "got": hello.channel}
            )
            return
        while True:
            message = await messages.receive()
            if isinstance(message, kinds):
                on(message)
            else:
                log.warning(
                    "unexpected message", extra={"channel": channel, "type": type(message).__name__}
                )
    except ChannelClosed:
        pass
    except (ChannelProtocolError, trio.BrokenResourceError) as exc:
        log.warning("channel broken", extra={"channel": channel, "error": str(exc)})
    finally:
        await messages.aclose()


async def serve_status_connection(stream: trio.abc.Stream, on: OnMessage) -> None:
    """One status connection: ``state`` and ``exit`` messages go to ``on``."""
    await _serve_channel(stream, "status", (StateMessage, ExitMessage), on)


async def serve_log_connection(stream: trio.abc.Stream, on: OnMessage) -> None:
    """One log connection: ``log`` and ``dropped`` messages go to ``on``."""
    await _serve_channel(stream, "logs", (LogMessage, DroppedMessage), on)
