"""A listener that takes a whole burst of connections per scheduler pass."""

from __future__ import annotations

import collections
import os
import socket

import trio


class BurstListener(trio.abc.Listener[trio.SocketStream]):
    """A `trio.SocketListener` that, once a connection arrives, also takes every other one
    already waiting in the kernel's accept queue, without yielding in between; and sizes that
    queue for a burst.

    Trio's own ``accept`` yields to the scheduler after each connection. Under a burst (1500
    connections at once in ``scripts/bench --hostile``) the parent's ingress then took one
    connection per pass of a long run queue, the kernel's queue filled, new SYNs were dropped
    and a legitimate client's connect waited for its 1 s retransmission. Use it where an
    accepted connection is cheap until it is served (the ingress: a descriptor and a sleeping
    task before the first byte); where each one starts expensive work at once, taking a
    whole burst in one pass stalls everything else for that pass.

    Args:
        inner: the listener to accept from (its socket is shared, not taken over).
        backlog: the accept queue's length (the kernel caps it at ``net.core.somaxconn``);
            None keeps the listener's own.
    """

    def __init__(self, inner: trio.SocketListener, *, backlog: int | None = None) -> None:
        self._inner = inner
        if backlog is not None:
            inner.socket.listen(backlog)
        # A second descriptor for the same listening socket (the same non-blocking open
        # file), for plain synchronous accept calls.
        self._raw = socket.socket(fileno=os.dup(inner.socket.fileno()))
        self._ready: collections.deque[trio.SocketStream] = collections.deque()

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening socket."""
        return self._inner.socket

    async def accept(self) -> trio.SocketStream:
        """The next connection. Connections taken in the same pass are returned without a
        checkpoint, so that the caller's accept loop takes the whole burst in one pass.

        Error handling: as `trio.SocketListener.accept` (``trio.serve_listeners`` sleeps on
        the errors that mean "out of descriptors" and retries).
        """
        if self._ready:
            return self._ready.popleft()
        stream = await self._inner.accept()
        while True:
            try:
                sock, _ = self._raw.accept()
            except OSError:  # BlockingIOError: the queue is empty; others: the next accept
                break
            self._ready.append(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
        return stream

    async def aclose(self) -> None:
        """Close the listener and every connection taken but not handed out yet."""
        self._raw.close()
        while self._ready:
            await trio.aclose_forcefully(self._ready.popleft())
        await self._inner.aclose()
