"""The parent's ends of the enclave's status and log channels.

Each accepted connection starts with ``hello``; after that the enclave sends ``state``/``exit``
(status) or ``log``/``dropped`` (logs). The parent never trusts what it reads for anything but
reporting: these are the enclave's words, relayed to operators. The one thing the parent says
is ``drain`` on the status channel (through a :class:`StatusLink`), for an orderly stop.

Bounds (DESIGN §16)
-------------------
The listeners take whoever can reach them (the enclave alone, by the socket's mode or the
vsock), yet a stuck or hostile peer must not hold the parent's tasks and descriptors:

- a connection's ``hello`` must have arrived whole within ``hello_timeout_s``
  (:data:`HELLO_TIMEOUT_S`) of its accept, or it is closed (a peer that connects and says
  nothing, or sends half a frame);
- until its ``hello`` is read, a connection's frames are at most ``hello_max_frame_bytes``
  (:data:`HELLO_MAX_FRAME_BYTES`): a longer one is refused on its length prefix and the
  connection closed, before any of it is buffered (else each of a channel's connections could
  make the parent buffer a 1 MiB frame trickled in before its hello); after the hello the
  channel's normal limit (``MAX_FRAME_BYTES``) applies;
- a channel holds at most ``max_connections`` (:data:`MAX_CHANNEL_CONNECTIONS`) at once, hello
  or not. A real enclave holds one per channel (it reconnects after a break), so at the cap
  the parent makes room rather than refusing the newcomer (a squatter would otherwise lock the
  enclave out): it closes the oldest connection still waiting for its hello, else the oldest
  connection (an enclave that reconnects wins).

All are kept by a :class:`ChannelGuard` shared by a channel's connections; :func:`serve_status`
and :func:`serve_logs` (and ``serve_deltas``) make one per listener set. Closures are logged
at most once per ``log_interval_s``, with a count of those held back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final

import trio

from ..nitro import (
    MAX_FRAME_BYTES,
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
from ..rpc import RateLimitedLog

log = logging.getLogger("trio_sign.parent.channels")

OnMessage = Callable[[ChannelMessage], None]

#: A connection's ``hello`` must have arrived whole this long after its accept.
HELLO_TIMEOUT_S: Final = 10.0
#: The largest frame a connection may send before its ``hello`` has been read (a hello is
#: some 40 bytes).
HELLO_MAX_FRAME_BYTES: Final = 4 * 1024
#: Connections one channel holds at once (a real enclave holds one).
MAX_CHANNEL_CONNECTIONS: Final = 8
#: Closures of one kind on one channel are logged at most once per this.
CHANNEL_LOG_INTERVAL_S: Final = 10.0


class ChannelGuard:
    """The bounds on one channel's connections: the hello deadline and the connection cap.

    Share one between all the connections of a channel (the serve functions make a fresh one
    per connection when given none: the deadline then holds, the cap does not).

    Args:
        channel: the channel's name (``status``, ``logs``, ``deltas``), for the logs.
        max_connections: connections held at once; at the cap a new connection closes the
            oldest one still waiting for its hello, else the oldest one.
        hello_timeout_s: a connection's ``hello`` must have arrived whole this long after
            its accept, else it is closed.
        hello_max_frame_bytes: a connection that claims a longer frame before its ``hello``
            is closed on the frame's length prefix (none of the frame is read).
        log_interval_s: closures of one kind are logged at most once per this.

    Attributes:
        evicted: connections closed to make room (counters only grow).
        timed_out: connections closed for want of a hello in time.
        oversized: connections closed for a frame over ``hello_max_frame_bytes`` before
            their hello.
    """

    def __init__(
        self,
        channel: str,
        *,
        max_connections: int = MAX_CHANNEL_CONNECTIONS,
        hello_timeout_s: float = HELLO_TIMEOUT_S,
        hello_max_frame_bytes: int = HELLO_MAX_FRAME_BYTES,
        log_interval_s: float = CHANNEL_LOG_INTERVAL_S,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not hello_timeout_s > 0:
            raise ValueError("hello_timeout_s must be > 0")
        if not 1 <= hello_max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"hello_max_frame_bytes must be between 1 and {MAX_FRAME_BYTES}")
        self.channel = channel
        self.max_connections = max_connections
        self.hello_timeout_s = hello_timeout_s
        self.hello_max_frame_bytes = hello_max_frame_bytes
        self.evicted = 0
        self.timed_out = 0
        self.oversized = 0
        # Each held connection's cancel scope, in insertion order: oldest first.
        self._waiting: dict[trio.CancelScope, None] = {}
        self._greeted: dict[trio.CancelScope, None] = {}
        self._log_interval_s = log_interval_s
        # what -> its rate-limited line (`warn`; a handful of fixed texts)
        self._warnings: dict[str, RateLimitedLog] = {}

    def warn(self, what: str, **fields: object) -> None:
        """Log ``what`` happened to one of this channel's connections (a closure by the
        bounds, a break, a wrong channel, an unexpected message) at most once per
        ``log_interval_s`` for each ``what``: whoever can connect must not be able to write
        the log at its own pace."""
        rated = self._warnings.get(what)
        if rated is None:
            rated = self._warnings[what] = RateLimitedLog(
                log,
                f"{self.channel} channel: {what}",
                interval_s=self._log_interval_s,
                clock=trio.current_time,
            )
        rated(channel=self.channel, **fields)

    @property
    def held(self) -> int:
        """Connections held now, hello or not."""
        return len(self._waiting) + len(self._greeted)

    @contextlib.contextmanager
    def hold(self) -> Iterator[trio.CancelScope]:
        """Admit a connection for the body, making room first; the body ends early (no
        exception) if a newer connection needs the room."""
        if self.held >= self.max_connections:
            greeted = not self._waiting
            oldest = next(iter(self._greeted if greeted else self._waiting))
            self._waiting.pop(oldest, None)
            self._greeted.pop(oldest, None)
            oldest.cancel()
            self.evicted += 1
            self.warn(
                f"{self.max_connections} connections (max_connections); closed the oldest",
                greeted=greeted,
            )
        held = trio.CancelScope()
        self._waiting[held] = None
        try:
            with held:
                yield held
        finally:
            self._waiting.pop(held, None)
            self._greeted.pop(held, None)

    async def receive_hello(
        self, messages: MessageStream, held: trio.CancelScope
    ) -> HelloMessage | None:
        """The connection's hello; None (logged) if it has not arrived whole in time, or if
        a frame over ``hello_max_frame_bytes`` came first (refused on its length prefix).
        Nothing past the hello is read, so the frames after it get the stream's own limit.

        Error handling: what :meth:`MessageStream.receive_expected` raises, but for the
        oversized frame.
        """
        with trio.move_on_after(self.hello_timeout_s):
            try:
                hello = await messages.receive_expected(
                    HelloMessage, max_frame_bytes=self.hello_max_frame_bytes
                )
            except ChannelProtocolError as exc:
                if exc.reason != "oversized":
                    raise
                self.oversized += 1
                self.warn(
                    f"a frame over {self.hello_max_frame_bytes} bytes before the hello "
                    "(hello_max_frame_bytes); connection closed"
                )
                return None
            if self._waiting.pop(held, 0) is None:
                self._greeted[held] = None
            return hello
        self.timed_out += 1
        self.warn(f"no hello within {self.hello_timeout_s:g} s; connection closed")
        return None


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
    link: StatusLink | None,
    guard: ChannelGuard | None,
) -> None:
    messages = MessageStream(stream)
    guard = guard if guard is not None else ChannelGuard(channel)
    try:
        with guard.hold() as held:
            await _converse(messages, channel, kinds, on, link, guard, held)
    finally:
        await messages.aclose()


async def _converse(
    messages: MessageStream,
    channel: str,
    kinds: tuple[type[ChannelMessage], ...],
    on: OnMessage,
    link: StatusLink | None,
    guard: ChannelGuard,
    held: trio.CancelScope,
) -> None:
    try:
        hello = await guard.receive_hello(messages, held)
        if hello is None:
            return
        if hello.channel != channel:
            guard.warn("wrong channel on connection", got=hello.channel[:64])
            return
        if link is not None:
            link._messages = messages
        while True:
            message = await messages.receive()
            if isinstance(message, kinds):
                on(message)
            else:
                guard.warn("unexpected message", type=type(message).__name__)
    except ChannelClosed:
        pass
    except (ChannelProtocolError, trio.BrokenResourceError) as exc:
        guard.warn("channel broken", error=str(exc))
    finally:
        if link is not None and link._messages is messages:
            link._messages = None


async def serve_status_connection(
    stream: trio.abc.Stream,
    on: OnMessage,
    link: StatusLink | None = None,
    *,
    guard: ChannelGuard | None = None,
) -> None:
    """One status connection: ``state``, ``exit`` and ``metrics`` messages go to ``on``;
    ``link`` (if given) can send ``drain`` on it while it is up. ``guard`` bounds it with
    the channel's other connections (none: a fresh :class:`ChannelGuard`)."""
    await _serve_channel(
        stream, "status", (StateMessage, ExitMessage, MetricsMessage), on, link, guard
    )


async def serve_log_connection(
    stream: trio.abc.Stream, on: OnMessage, *, guard: ChannelGuard | None = None
) -> None:
    """One log connection: ``log`` and ``dropped`` messages go to ``on``. ``guard`` as for
    :func:`serve_status_connection`."""
    await _serve_channel(stream, "logs", (LogMessage, DroppedMessage), on, None, guard)


async def serve_status(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    on: OnMessage,
    link: StatusLink | None = None,
    *,
    max_connections: int = MAX_CHANNEL_CONNECTIONS,
    hello_timeout_s: float = HELLO_TIMEOUT_S,
    task_status: trio.TaskStatus[list[trio.abc.Listener[trio.abc.Stream]]] = (
        trio.TASK_STATUS_IGNORED
    ),
) -> None:
    """Accept status connections on ``listeners`` until cancelled, each served by
    :func:`serve_status_connection`, all bounded by one :class:`ChannelGuard`."""

    async def serve_one(stream: trio.abc.Stream, guard: ChannelGuard) -> None:
        await serve_status_connection(stream, on, link, guard=guard)

    await serve_guarded(
        listeners, "status", serve_one, max_connections, hello_timeout_s, task_status
    )


async def serve_logs(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    on: OnMessage,
    *,
    max_connections: int = MAX_CHANNEL_CONNECTIONS,
    hello_timeout_s: float = HELLO_TIMEOUT_S,
    task_status: trio.TaskStatus[list[trio.abc.Listener[trio.abc.Stream]]] = (
        trio.TASK_STATUS_IGNORED
    ),
) -> None:
    """Accept log connections on ``listeners`` until cancelled, each served by
    :func:`serve_log_connection`, all bounded by one :class:`ChannelGuard`."""

    async def serve_one(stream: trio.abc.Stream, guard: ChannelGuard) -> None:
        await serve_log_connection(stream, on, guard=guard)

    await serve_guarded(listeners, "logs", serve_one, max_connections, hello_timeout_s, task_status)


async def serve_guarded(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    channel: str,
    serve_one: Callable[[trio.abc.Stream, ChannelGuard], Awaitable[None]],
    max_connections: int,
    hello_timeout_s: float,
    task_status: trio.TaskStatus[list[trio.abc.Listener[trio.abc.Stream]]],
) -> None:
    """Accept ``channel`` connections on ``listeners`` until cancelled, each served by
    ``serve_one`` with the channel's one :class:`ChannelGuard`."""
    guard = ChannelGuard(channel, max_connections=max_connections, hello_timeout_s=hello_timeout_s)

    async def handle(stream: trio.abc.Stream) -> None:
        await serve_one(stream, guard)

    await trio.serve_listeners(handle, list(listeners), task_status=task_status)
