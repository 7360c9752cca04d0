"""The enclave's log channel: redacted JSON log lines, forwarded to the parent over vsock.

The enclave has no disk and no network; its logs reach CloudWatch only through the parent
(DESIGN.md section 1). Protocol (frames from :mod:`trio_sign.nitro._channel`), enclave to
parent::

    hello(channel="logs")  log(line)  log(line) ...  dropped(count)  log(line) ...

Design, in order of importance:

1. **Logging never slows signing.** :class:`ChannelLogHandler` formats a record with the
   project's :class:`~trio_sign._logging.JsonFormatter` (which redacts secret-named fields)
   and appends the line to a bounded buffer under a short lock. It never awaits, never blocks
   on the parent and never raises. When the buffer is full (``capacity`` lines or
   ``capacity_chars`` characters), new lines are dropped and counted.
2. **Drops are reported, exactly.** The sender sends ``dropped(count)`` with the number of
   lines dropped since its last report, after the lines it took from the buffer in the same
   batch.
3. **Reconnects lose nothing that was buffered.** Lines leave the buffer only once written to
   the socket; after a failure the sender reconnects with back-off and starts with whatever is
   still buffered. A batch that was being written when the connection broke is sent again
   (the parent may see a few lines twice, never a gap).
4. **Any thread may log.** ``emit`` takes a ``threading.Lock``; when the sender is parked
   waiting for lines, ``emit`` wakes it through ``TrioToken.run_sync_soon``, which is safe from
   any thread (at most one wake-up per batch, not one per line).

The last lines (why the enclave failed, the drain) are what an operator needs most:
:class:`~trio_sign.enclave.ParentLink` keeps :func:`run_log_channel` running until the process
has said them, and waits for them with :meth:`ChannelLogHandler.wait_flushed`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
from collections import deque
from typing import Final, NoReturn

import trio

from .._logging import JsonFormatter
from ..nitro import ChannelProtocolError, DroppedMessage, FrameChannel, LogMessage, MessageStream
from ._status import (
    DEFAULT_BACKOFF_INITIAL_S,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    Connect,
    check_backoff,
    run_reconnecting_channel,
)

log = logging.getLogger("trio_sign.enclave.logs")

#: Lines the handler buffers while the parent is slow or away; more are dropped and counted.
DEFAULT_LOG_CAPACITY: Final = 10_000
#: Characters the handler buffers at most, whatever the line count (bounds memory).
DEFAULT_LOG_CAPACITY_CHARS: Final = 4 * 1024 * 1024
#: Longest line forwarded; a longer record is forwarded with its message cut short.
DEFAULT_MAX_LINE_CHARS: Final = 16 * 1024
# Upper bound of max_line_chars: 4 bytes per character must stay far below MAX_FRAME_BYTES.
_MAX_LINE_CHARS_LIMIT: Final = 128 * 1024
# Bytes of lines taken per write: big enough to amortise syscalls, small enough to be fair.
_BATCH_CHARS: Final = 64 * 1024


class ChannelLogHandler(logging.Handler):
    """A logging handler that buffers JSON lines for :func:`run_log_channel`.

    Args:
        capacity: lines buffered at most (the named setting; default 10,000).
        capacity_chars: characters buffered at most (default 4 MiB of text).
        max_line_chars: longest line; a longer record's message is cut to fit (its
            ``truncated_chars`` field gives the original line length).
        level: the handler's level (the logger's level applies first).

    Attributes:
        dropped_total: lines dropped since the handler was created (full buffer, or a record
            that could not be formatted).

    Error handling: :meth:`emit` never raises and never blocks on I/O.
    """

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_LOG_CAPACITY,
        capacity_chars: int = DEFAULT_LOG_CAPACITY_CHARS,
        max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
        level: int = logging.NOTSET,
    ) -> None:
        if capacity < 1 or capacity_chars < 1:
            raise ValueError("capacity and capacity_chars must be at least 1")
        if not 256 <= max_line_chars <= _MAX_LINE_CHARS_LIMIT:
            raise ValueError(f"max_line_chars must be between 256 and {_MAX_LINE_CHARS_LIMIT}")
        super().__init__(level)
        self.setFormatter(JsonFormatter())
        self.capacity = capacity
        self.capacity_chars = capacity_chars
        self.max_line_chars = max_line_chars
        self.dropped_total = 0
        self._mutex = threading.Lock()
        self._lines: deque[str] = deque()
        self._chars = 0
        self._dropped = 0  # since the last dropped() frame
        self._waiter: tuple[trio.lowlevel.TrioToken, trio.Event] | None = None
        self._sent = trio.Event()  # replaced after every batch written (flush waits on it)
        self._runners = 0

    @property
    def buffered(self) -> int:
        """Lines waiting to be sent."""
        return len(self._lines)

    @property
    def empty(self) -> bool:
        """True when no line and no drop count waits to be sent."""
        with self._mutex:
            return not self._lines and not self._dropped

    async def wait_flushed(self) -> bool:
        """Wait until everything buffered (lines logged meanwhile too) is written, or until no
        :func:`run_log_channel` is running; return :attr:`empty`.

        Bound it with a cancel scope: a parent that is away keeps the sender reconnecting.
        """
        while not self.empty and self._runners > 0:
            await self._sent.wait()
        return self.empty

    # --- producer side (any thread)

    def emit(self, record: logging.LogRecord) -> None:
        line: str | None
        try:
            line = self._format_line(record)
        except Exception:  # a bad record (e.g. wrong %-args) must not hurt the caller
            line = None
        with self._mutex:
            if (
                line is None
                or len(self._lines) >= self.capacity
                or self._chars + len(line) > self.capacity_chars
            ):
                self._dropped += 1
                self.dropped_total += 1
            else:
                self._lines.append(line)
                self._chars += len(line)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            token, event = waiter
            # The run may be over (logging at interpreter exit): nobody to wake then.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(event.set)

    def _format_line(self, record: logging.LogRecord) -> str | None:
        line = self.format(record)
        if len(line) > self.max_line_chars:
            short = logging.makeLogRecord(
                {
                    "name": record.name,
                    "levelno": record.levelno,
                    "levelname": record.levelname,
                    "created": record.created,
                    "msecs": record.msecs,
                    "msg": record.getMessage()[: self.max_line_chars // 8],
                    "truncated_chars": len(line),
                }
            )
            line = self.format(short)
            if len(line) > self.max_line_chars:
                return None
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (e.g. undecodable file names)
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        return line

    # --- consumer side (the sender task, in Trio)

    async def _wait_for_work(self) -> None:
        event = trio.Event()
        with self._mutex:
            if self._lines or self._dropped:
                return
            self._waiter = (trio.lowlevel.current_trio_token(), event)
        try:
            await event.wait()
        finally:
            with self._mutex:
                if self._waiter is not None and self._waiter[1] is event:
                    self._waiter = None

    def _peek_batch(self) -> tuple[list[str], int]:
        """Lines from the front (left in place) and the drop count, without removing them."""
        with self._mutex:
            batch: list[str] = []
            chars = 0
            for line in itertools.islice(self._lines, 0, None):
                if batch and chars + len(line) > _BATCH_CHARS:
                    break
                batch.append(line)
                chars += len(line)
            return batch, self._dropped

    def _commit(self, lines: int, chars: int, dropped: int) -> None:
        with self._mutex:
            for _ in range(lines):
                self._lines.popleft()
            self._chars -= chars
            self._dropped -= dropped

    async def _converse(self, messages: MessageStream) -> NoReturn:
        encoder = FrameChannel()
        while True:
            await self._wait_for_work()
            lines, dropped = self._peek_batch()
            frames: list[bytes] = []
            for line in lines:
                try:
                    frames.append(encoder.send(LogMessage(line=line)))
                except (ChannelProtocolError, TypeError, ValueError):  # pragma: no cover
                    self._count_unsendable()  # emit makes every line encodable; defensive
            if dropped:
                frames.append(encoder.send(DroppedMessage(count=dropped)))
            # One writer: only this task writes to the stream after the hello.
            await messages.stream.send_all(b"".join(frames))
            self._commit(len(lines), sum(map(len, lines)), dropped)
            self._sent.set()
            self._sent = trio.Event()

    def _count_unsendable(self) -> None:  # pragma: no cover - defensive
        """A buffered line could not be encoded: report it as dropped."""
        with self._mutex:
            self._dropped += 1
            self.dropped_total += 1


async def run_log_channel(
    connect: Connect,
    handler: ChannelLogHandler,
    *,
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    rng: random.Random | None = None,
    hurry: trio.Event | None = None,
    task_status: trio.TaskStatus[ChannelLogHandler] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Forward ``handler``'s buffered lines to the parent over ``connect()`` connections.

    Readiness: ``task_status.started(handler)`` at once; lines logged before the first
    connection are buffered (up to the handler's capacity) and sent once it is up.

    Each connection sends ``hello(channel="logs")``, then ``log`` frames in batches, each batch
    followed by ``dropped(count)`` if lines were dropped since the last report. After a failure
    it reconnects with back-off (see :func:`~trio_sign.enclave._status.run_reconnecting_channel`,
    which also says what ``hurry`` does).

    Cancellation: safe at any point; the stream is closed and unsent lines stay buffered.

    Error handling: connection failures are logged (into this very channel, bounded like any
    line) and retried, never raised; ``ValueError`` for bad back-off settings, before
    ``started``.
    """
    check_backoff(backoff_initial_s, backoff_max_s, connect_timeout_s)
    handler._runners += 1
    try:
        task_status.started(handler)
        await run_reconnecting_channel(
            "logs",
            connect,
            handler._converse,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            connect_timeout_s=connect_timeout_s,
            rng=rng,
            hurry=hurry,
        )
    finally:
        handler._runners -= 1
        handler._sent.set()
        handler._sent = trio.Event()


def _logger(logger: logging.Logger | str) -> logging.Logger:
    return logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)


def attach_log_handler(
    handler: logging.Handler, logger: logging.Logger | str = "trio_sign"
) -> None:
    """Add ``handler`` to the ``trio_sign`` logger (or another). Idempotent.

    Call it after :func:`~trio_sign._logging.configure_logging`, which replaces that logger's
    handlers.
    """
    target = _logger(logger)
    if handler not in target.handlers:
        target.addHandler(handler)


def detach_log_handler(
    handler: logging.Handler, logger: logging.Logger | str = "trio_sign"
) -> None:
    """Remove ``handler`` from the ``trio_sign`` logger (or another). Idempotent."""
    _logger(logger).removeHandler(handler)
