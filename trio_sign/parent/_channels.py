"""The parent's ends of the enclave's status and log channels.

Each accepted connection starts with ``hello``; after that the enclave sends ``state``/``exit``
(status) or ``log``/``dropped`` (logs). The parent never trusts what it reads for anything but
reporting: these are the enclave's words, relayed to operators. The one thing the parent says
is ``drain`` on the status channel (through a :class:`StatusLink`), for an orderly stop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..nitro import (
    ChannelClosed,
    ChannelMessage,
    ChannelProtocolError,
    DrainMessage,
    DroppedMessage,
    ExitMessage,
    HelloMessage,
    LogMessage,
    MessageStream,
    MetricsMessage,
    StateMessage,
)

log = logging.getLogger("trio_sign.parent.channels")

OnMessage = Callable[[ChannelMessage], None]


class StatusLink:
    """The enclave's current status connection, for the supervisor to ask for a drain.

    :func:`serve_status_connection` attaches each connection once its ``hello`` is read and
    detaches it when it ends; an enclave that reconnects is reached on its newest connection.
    """

    def __init__(self) -> None:
        self._messages: MessageStream | None = None
        self._lock = trio.Lock()

    async def request_drain(self) -> bool:
        """Send ``drain``; True if it was written (the enclave then drains and exits 0),
        False if no status connection is up or it broke."""
        messages = self._messages
        if messages is None:
            return False
        async with self._lock:
            try:
                await messages.send(DrainMessage())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return True


async def _serve_channel(
    stream: trio.abc.Stream,
    channel: str,
    kinds: tuple[type[ChannelMessage], ...],
    on: OnMessage,
    link: StatusLink | None = None,
) -> None:
    messages = MessageStream(stream)
    try:
        hello = await messages.receive_expected(HelloMessage)
        if hello.channel != channel:
            log.warning(
                "wrong channel on connection", extra={"expected": channel, "got": hello.channel}
            )
            return
        if link is not None:
            link._messages = messages
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
        if link is not None and link._messages is messages:
            link._messages = None
        await messages.aclose()


async def serve_status_connection(
    stream: trio.abc.Stream, on: OnMessage, link: StatusLink | None = None
) -> None:
    """One status connection: ``state``, ``exit`` and ``metrics`` messages go to ``on``;
    ``link`` (if given) can send ``drain`` on it while it is up."""
    await _serve_channel(stream, "status", (StateMessage, ExitMessage, MetricsMessage), on, link)


async def serve_log_connection(stream: trio.abc.Stream, on: OnMessage) -> None:
    """One log connection: ``log`` and ``dropped`` messages go to ``on``."""
    await _serve_channel(stream, "logs", (LogMessage, DroppedMessage), on)
