"""The one writer of a gRPC connection: moves ``data_to_send()`` to the stream when kicked."""

from __future__ import annotations

from typing import Protocol

import trio


class _Core(Protocol):
    def data_to_send(self) -> bytes: ...


#: How much one read asks the transport for.
RECEIVE_SIZE = 65536


async def receive_bytes(stream: trio.abc.ReceiveStream) -> bytes:
    """The next bytes from ``stream``, or ``b""`` once it is closed or broken (the read loops
    of both drivers end there). Memory streams hand out ``bytearray``: h2 wants ``bytes``."""
    try:
        data = await stream.receive_some(RECEIVE_SIZE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""
    return data if isinstance(data, bytes) else bytes(data)


class Writer:
    """Single writer task for one connection (STYLE rule 9).

    Protocol code never awaits: it calls core commands, then `kick`. `kick` takes what the core
    has queued at once (so `pending` is what this connection really holds for the peer); the
    writer sends everything taken in one ``send_all`` (so concurrent responses are batched
    into one write) and waits for the next kick. Cancelling a writer mid-``send_all`` breaks
    the stream, which is fine: only the connection's own nursery cancels it, and then the
    stream is closed.
    """

    __slots__ = (
        "_chunks",
        "_closing",
        "_core",
        "_event",
        "_progress",
        "_stream",
        "pending",
        "waiting_since",
    )

    def __init__(self, core: _Core, stream: trio.abc.SendStream) -> None:
        self._core = core
        self._stream = stream
        self._event = trio.Event()
        self._progress = trio.Event()
        self._closing = False
        self._chunks: list[bytes] = []
        #: Bytes taken from the core and not yet written to the stream.
        self.pending = 0
        #: Trio time since which `pending` has been non-zero (meaningless while it is zero).
        self.waiting_since = trio.current_time()

    def _take(self) -> None:
        data = self._core.data_to_send()
        if data:
            if not self.pending:
                self.waiting_since = trio.current_time()
            self._chunks.append(data)
            self.pending += len(data)

    def kick(self) -> None:
        """Something was queued: take it and wake the writer."""
        self._take()
        self._event.set()

    def close_after_flush(self) -> None:
        """Make `run` return once everything queued so far is written."""
        self._closing = True
        self._event.set()

    async def wait_pending_at_most(self, limit: int) -> None:
        """Return once at most ``limit`` bytes wait to be written (back-pressure for a reader
        whose peer does not read)."""
        while self.pending > limit:
            await self._progress.wait()

    async def run(self) -> None:
        """Write until `close_after_flush` (then return) or until the stream breaks.

        Error handling: a broken or closed stream ends the loop quietly; the caller's reader
        sees the same condition and tears the connection down.
        """
        try:
            while True:
                self._take()
                if self._chunks:
                    chunks = self._chunks
                    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    self._chunks = []
                    await self._stream.send_all(data)
                    self.pending -= len(data)
                    if self.pending:
                        self.waiting_since = trio.current_time()
                    self._progress.set()
                    self._progress = trio.Event()
                    continue
                if self._closing:
                    return
                await self._event.wait()
                self._event = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
