"""Trio driver for the parent <-> enclave channels: typed messages over any ``trio.abc.Stream``.

The framing and message vocabulary live in the sans-io :mod:`trio_sign.nitro._channel`; this
only moves bytes. One writer at a time (a lock), one reader at a time (the caller's task).

A receive may carry its own, smaller frame limit (``max_frame_bytes=``): the parent reads each
connection's ``hello`` with one, so that an unauthenticated peer cannot make it buffer a
1 MiB frame before saying who it is (DESIGN §16). Such a receive reads no byte past the end of
its frame (the 4-byte length prefix tells where that is), so the next frame is judged by the
stream's own limit alone.
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

    async def receive_frame(self, *, max_frame_bytes: int | None = None) -> Frame:
        """The next frame. Frames that arrived before a framing error are delivered first;
        the error is raised after them.

        Args:
            max_frame_bytes: a smaller limit for this frame alone (at most the stream's): a
                longer length prefix raises ``reason="oversized"`` as soon as its 4 bytes
                arrive, before any of the payload is read. The stream then reads nothing past
                this frame's end. Only for a frame nothing was read ahead of: the stream's
                first, or one after receives that had such a limit too.

        Error handling: as the class says; ``RuntimeError`` if ``max_frame_bytes`` is given
        while received bytes or frames are already buffered (read under the stream's limit).
        """
        if max_frame_bytes is not None:
            return await self._receive_bounded(max_frame_bytes)
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

    async def _receive_bounded(self, max_frame_bytes: int) -> Frame:
        limit = self._channel.max_frame_bytes
        if not 1 <= max_frame_bytes <= limit:
            raise ValueError(f"max_frame_bytes must be between 1 and {limit}")
        if self._error is not None:
            raise self._error
        if self._pending or self._channel.buffered:
            raise RuntimeError("a frame limit of its own needs nothing read ahead of the frame")
        self._channel.max_frame_bytes = max_frame_bytes
        try:
            while True:
                # The prefix's missing bytes, then (the channel checked the prefix against
                # the limit when it completed) the payload's: nothing past this frame.
                data = await self.stream.receive_some(min(self._channel.needed, _RECEIVE_SIZE))
                if not data:
                    self._channel.receive_eof()  # raises "truncated" inside a frame
                    raise ChannelClosed()
                try:
                    frames = self._channel.receive_data(data)
                except ChannelProtocolError as exc:
                    self._error = exc  # no frame before it: nothing was read past this one
                    raise
                if frames:
                    [frame] = frames
                    return frame
        finally:
            self._channel.max_frame_bytes = limit

    async def receive(self) -> ChannelMessage:
        """The next message, decoded and type-checked."""
        return decode_message(await self.receive_frame())

    async def receive_expected(self, kind: type[M], *, max_frame_bytes: int | None = None) -> M:
        """The next message, which must be a ``kind``; ``max_frame_bytes`` as for
        :meth:`receive_frame`."""
        if max_frame_bytes is None:
            message = await self.receive()
        else:
            message = decode_message(await self.receive_frame(max_frame_bytes=max_frame_bytes))
        if not isinstance(message, kind):
            raise ChannelProtocolError(
                f"expected a {kind.__name__} message, got {type(message).__name__}",
                reason="unexpected_message",
            )
        return message

    async def aclose(self) -> None:
        await self.stream.aclose()
