"""Trio driver for the parent <-> enclave channels: typed messages over any ``trio.abc.Stream``.

The framing and message vocabulary live in the sans-io :mod:`trio_sign.nitro._channel`; this
only moves bytes. One writer at a time (a lock), one reader at a time (the caller's task).
"""

from __future__ import annotations

from collections import deque
from typing import TypeVar

import trio

from ._channel import (
    MAX_FRAME_BYTES,
    ChannelMessage,
    ChannelProtocolError,
    Frame,
    FrameChannel,
    decode_message,
)

_RECEIVE_SIZE = 256 * 1024

M = TypeVar("M", bound=ChannelMessage)


class ChannelClosed(ChannelProtocolError):
    """The peer closed the channel (cleanly, between frames)."""

    def __init__(self, message: str = "the peer closed the channel") -> None:
        super().__init__(message, reason="closed")


class MessageStream:
    """Send and receive :class:`ChannelMessage` objects over a byte stream.

    Error handling: framing violations raise :class:`ChannelProtocolError` (the stream is then
    unusable); an orderly close raises :class:`ChannelClosed` from :meth:`receive`; transport
    failures surface as ``trio.BrokenResourceError``/``trio.ClosedResourceError``.
    """

    def __init__(self, stream: trio.abc.Stream, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.stream = stream
        self._channel = FrameChannel(max_frame_bytes=max_frame_bytes)
        self._pending: deque[Frame] = deque()
        self._error: ChannelProtocolError | None = None
        self._send_lock = trio.Lock()

    async def send(self, message: ChannelMessage) -> None:
        data = self._channel.send(message)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive_frame(self) -> Frame:
        """The next frame. Frames that arrived before a framing error are delivered first;
        the error is raised after them."""
        while not self._pending:
            if self._error is not None:
                raise self._error
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                self._channel.receive_eof()  # raises "truncated" inside a frame
                raise ChannelClosed()
            try:
                self._pending.extend(self._channel.receive_data(data))
            except ChannelProtocolError as exc:
                self._pending.extend(exc.frames)
                self._error = exc
        return self._pending.popleft()

    async def receive(self) -> ChannelMessage:
        """The next message, decoded and type-checked."""
        return decode_message(await self.receive_frame())

    async def receive_expected(self, kind: type[M]) -> M:
        """The next message, which must be a ``kind``."""
        message = await self.receive()
        if not isinstance(message, kind):
            raise ChannelProtocolError(
                f"expected a {kind.__name__} message, got {type(message).__name__}",
                reason="unexpected_message",
            )
        return message

    async def aclose(self) -> None:
        await self.stream.aclose()
