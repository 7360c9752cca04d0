"""The enclave's status channel: its lifecycle state, pushed to the parent over vsock.

The parent supervises the enclave through this channel (DESIGN.md section 3): it learns when
the enclave boots, preloads, serves, drains, fails (and why) and exits (and with which code).
Protocol (frames from :mod:`trio_sign.nitro._channel`), enclave to parent::

    hello(channel="status")  state  metrics  state ...  [state(failed|exiting)  exit(code)]

Frames from the parent are read (so that a close is noticed at once). On the status channel a
``drain`` frame sets :attr:`StatusReporter.drain_requested` (the parent's orderly stop: the
enclave drains and exits 0); anything else is ignored.

Design:

- :class:`StatusReporter` holds the latest state. :meth:`StatusReporter.set_state` is
  synchronous and never blocks: the sender sends the newest state, and intermediate states
  nobody has sent yet are coalesced away, except ``failed`` and ``exiting``, which are kept
  until sent (they are why the parent restarts us). :meth:`StatusReporter.request_exit`
  queues the ``exit`` frame, sent after every state; :meth:`StatusReporter.wait_exit_delivered`
  waits for it.
- With a ``metrics_source``, each connection also sends a ``metrics`` snapshot every
  ``metrics_interval_s`` (the parent serves the numbers on its ``/metrics``).
- :func:`run_status_channel` is the sender. It connects, says hello, sends the current state
  and then every change; when the connection fails it reconnects with full-jitter exponential
  back-off and sends the current state again. A broken status connection never takes the
  enclave down.

:class:`~trio_sign.enclave.ParentLink` runs this channel and the log channel for the whole
life of the process and gives the last words (final state, exit code, last log lines).
The reconnecting loop (:func:`run_reconnecting_channel`) is shared with the log channel.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, NoReturn

import trio

from .._backoff import full_jitter_delay
from ..nitro import (
    ChannelClosed,
    ChannelProtocolError,
    DrainMessage,
    ExitMessage,
    Frame,
    HelloMessage,
    MessageStream,
    MetricsMessage,
    StateMessage,
)
from ..nitro._channel import STATES
from ..transport import TransportError

log = logging.getLogger("trio_sign.enclave.status")

Connect = Callable[[], Awaitable[trio.abc.Stream]]
#: Where the ``metrics`` snapshots come from (``Registry.snapshot``): JSON-like values.
MetricsSource = Callable[[], dict[str, Any]]

#: First reconnect delay ceiling (the delay is uniform in ``[0, ceiling]``).
DEFAULT_BACKOFF_INITIAL_S: Final = 0.5
#: Largest reconnect delay ceiling.
DEFAULT_BACKOFF_MAX_S: Final = 10.0
#: How long ``connect()`` may take before the attempt counts as failed.
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
#: How often a connected status channel sends a ``metrics`` snapshot.
DEFAULT_METRICS_INTERVAL_S: Final = 10.0
#: Longest ``reason`` text sent; longer ones are cut (frames are bounded).
MAX_REASON_CHARS: Final = 2048
#: States that are never coalesced away before being sent.
CRITICAL_STATES: Final = frozenset({"failed", "exiting"})
# Unsent critical states kept at most (a loop setting "failed" forever must not grow memory).
_MAX_PENDING: Final = 16

_IO_ERRORS: Final = (OSError, trio.BrokenResourceError, TransportError, ChannelProtocolError)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------------------------------
# The reconnecting loop shared by the status and log channels


#: Called with each frame the parent sends; returns False to have it logged as ignored.
OnParentFrame = Callable[[Frame], bool]


async def _read_until_closed(messages: MessageStream, on_frame: OnParentFrame | None) -> str:
    """Read what the parent sends (handed to ``on_frame``); return why the channel ended."""
    while True:
        try:
            frame = await messages.receive_frame()
        except ChannelClosed:
            return "the parent closed the channel"
        if on_frame is None or not on_frame(frame):
            log.debug("ignoring a %r frame from the parent", frame.type[:64])


async def one_connection(
    channel: str,
    connect: Connect,
    converse: Callable[[MessageStream], Awaitable[object]],
    *,
    connect_timeout_s: float,
    on_up: Callable[[bool], None] = lambda up: None,
    on_frame: OnParentFrame | None = None,
    read: bool = True,
) -> tuple[str, bool]:
    """Connect, say hello, run ``converse`` until it returns or the connection fails.

    ``read`` False: ``converse`` reads the parent's frames itself (the deltas channel), so no
    reader runs beside it (``on_frame`` is then unused).

    Returns ``(why it ended, whether hello was sent)``. Only I/O and protocol errors are
    caught; anything else (a bug) propagates.
    """
    with trio.move_on_after(connect_timeout_s) as scope:
        try:
            stream = await connect()
        except _IO_ERRORS as exc:
            return f"connect failed: {_describe(exc)}", False
    if scope.cancelled_caught:
        return f"connect took longer than {connect_timeout_s} s", False
    messages = MessageStream(stream)
    ended: list[str] = []
    up = False
    try:
        try:
            await messages.send(HelloMessage(channel=channel))
        except _IO_ERRORS as exc:
            return _describe(exc), False
        up = True
        on_up(True)

        async def guarded(fn: Callable[[MessageStream], Awaitable[object]]) -> None:
            try:
                result = await fn(messages)
            except _IO_ERRORS as exc:
                ended.append(_describe(exc))
            else:
                ended.append(result if isinstance(result, str) else "done")
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            if read:
                nursery.start_soon(
                    guarded, functools.partial(_read_until_closed, on_frame=on_frame)
                )
            nursery.start_soon(guarded, converse)
    finally:
        if up:
            on_up(False)
        await trio.aclose_forcefully(stream)
    return (ended[0] if ended else "done"), True


async def _back_off(delay: float, hurry: trio.Event | None, hurried_s: float) -> None:
    """Sleep ``delay``; once ``hurry`` is set, at most ``hurried_s`` from then on."""
    if hurry is None:
        await trio.sleep(delay)
        return
    deadline = trio.current_time() + delay
    with trio.move_on_at(deadline):
        await hurry.wait()
    await trio.sleep_until(min(deadline, trio.current_time() + hurried_s))


async def run_reconnecting_channel(
    channel: str,
    connect: Connect,
    converse: Callable[[MessageStream], Awaitable[object]],
    *,
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    rng: random.Random | None = None,
    on_up: Callable[[bool], None] = lambda up: None,
    on_frame: OnParentFrame | None = None,
    hurry: trio.Event | None = None,
    read: bool = True,
) -> NoReturn:
    """Keep one enclave-to-parent channel up forever.

    Each round: ``connect()`` (bounded by ``connect_timeout_s``), send
    ``HelloMessage(channel)``, call ``on_up(True)``, then run ``converse(messages)`` while
    reading the parent's frames (each given to ``on_frame``, if any); the round ends when the
    parent closes, an I/O or framing error happens, or ``converse`` returns. Then
    ``on_up(False)``, the stream is closed and, after
    ``uniform(0, min(backoff_max_s, backoff_initial_s * 2**n))`` seconds (``n``: failed rounds
    in a row, reset by a round that got its hello out), the next round starts. Once ``hurry``
    is set (the process is giving its last words), no wait is longer than
    ``backoff_initial_s``. ``read`` False leaves the reading to ``converse``
    (:func:`one_connection`).

    Cancellation: safe at any point; the stream is closed before this returns.

    Error handling: I/O and framing errors are logged (WARNING) and retried, never raised.
    Anything else ``converse`` raises propagates (a bug; fail fast).
    """
    rng = rng if rng is not None else random.Random()
    failures = 0
    while True:
        reason, was_up = await one_connection(
            channel,
            connect,
            converse,
            connect_timeout_s=connect_timeout_s,
            on_up=on_up,
            on_frame=on_frame,
            read=read,
        )
        if was_up:
            failures = 0
        delay = full_jitter_delay(
            rng, base=backoff_initial_s, maximum=backoff_max_s, failures=failures
        )
        failures += 1
        log.warning(
            "%s channel down (%s); reconnecting in %.3f s",
            channel,
            reason,
            delay,
            extra={"channel": channel, "failures": failures},
        )
        await _back_off(delay, hurry, backoff_initial_s)


def check_backoff(backoff_initial_s: float, backoff_max_s: float, connect_timeout_s: float) -> None:
    """``ValueError`` unless ``0 < backoff_initial_s <= backoff_max_s`` and a positive timeout."""
    if not 0 < backoff_initial_s <= backoff_max_s or connect_timeout_s <= 0:
        raise ValueError("need 0 < backoff_initial_s <= backoff_max_s and connect_timeout_s > 0")


# ------------------------------------------------------------------------------------------
# The status reporter


class Keep(enum.Enum):
    """The type of :data:`KEEP`: "leave this field as it was" (None would clear it)."""

    KEEP = enum.auto()


KEEP: Final = Keep.KEEP


class StatusReporter:
    """The enclave's current state, and what the status channel still has to send.

    Use it from the Trio thread. :meth:`set_state` never blocks and never awaits; it may be
    called before :func:`run_status_channel` runs (the state is sent once it connects).

    Args:
        metrics_source: called every ``metrics_interval_s`` while a connection is up; what it
            returns is sent as a ``metrics`` message. None: no metrics (settable later).
        metrics_interval_s: seconds between snapshots on one connection (the first comes one
            interval after the connection is up, or at once when a source is set late).

    Attributes:
        state: the current :class:`~trio_sign.nitro.StateMessage` (as it is sent).
        memory_level: the last level given to :meth:`set_memory_level`.
        drain_requested: set when the parent sends ``drain`` (the enclave's tree waits on it).
        metrics_sent: ``metrics`` messages written so far.
    """

    def __init__(
        self,
        *,
        metrics_source: MetricsSource | None = None,
        metrics_interval_s: float = DEFAULT_METRICS_INTERVAL_S,
    ) -> None:
        if not metrics_interval_s > 0:
            raise ValueError("metrics_interval_s must be positive")
        self.state = StateMessage(state="booting")
        self._reason: str | None = None  # as the caller gave it (state.reason may add memory)
        self.memory_level = "ok"
        self._queue: deque[StateMessage] = deque([self.state])
        self._changed = trio.Event()
        self._up = trio.Event()
        self._progress = trio.Event()
        self._exit_code: int | None = None
        self._exit_requests = 0
        self._exit_delivered = False
        self._runners = 0
        self._metrics_source = metrics_source
        self._metrics_failing = False
        self.metrics_interval_s = metrics_interval_s
        self.metrics_sent = 0
        self.drain_requested = trio.Event()

    # --- what the enclave calls

    def set_state(
        self,
        state: str,
        *,
        reason: str | None = None,
        accounts: int | Keep | None = KEEP,
        sha256: str | Keep | None = KEEP,
        preload_ms: int | Keep | None = KEEP,
    ) -> None:
        """Make ``state`` current and schedule it for sending; never blocks.

        ``accounts``, ``sha256`` and ``preload_ms`` keep their previous values unless given;
        ``reason`` is per state (default none). Unsent earlier states are dropped, except
        ``failed`` and ``exiting``.

        Error handling: ``ValueError`` for an unknown state or a badly typed field (a bug in
        the caller); nothing changes then.
        """
        if state not in STATES:
            raise ValueError(f"unknown enclave state {state!r}; expected one of {sorted(STATES)}")
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        current = self.state
        message = StateMessage(
            state=state,
            reason=self._effective_reason(state, reason),
            accounts=current.accounts if isinstance(accounts, Keep) else accounts,
            sha256=current.sha256 if isinstance(sha256, Keep) else sha256,
            preload_ms=current.preload_ms if isinstance(preload_ms, Keep) else preload_ms,
        )
        try:
            message.to_frame()  # validates every field
        except ChannelProtocolError as exc:
            raise ValueError(str(exc)) from None
        self._reason = reason
        self.state = message
        queue = self._queue
        while queue and queue[-1].state not in CRITICAL_STATES:
            queue.pop()  # coalesce: nobody has sent it yet, and it is no longer current
        if len(queue) >= _MAX_PENDING:
            queue.popleft()
        queue.append(message)
        self._wake()

    def set_memory_level(self, level: str) -> None:
        """Report the memory watermark's level (use as ``run_memory_monitor``'s ``on_change``).

        While ``serving`` or ``draining`` with no reason of its own, the state's ``reason``
        says ``"memory_alarm"`` or ``"memory_hard"``; back to none at ``"ok"``.
        """
        if level == self.memory_level:
            return
        self.memory_level = level
        if self._effective_reason(self.state.state, self._reason) != self.state.reason:
            self.set_state(self.state.state, reason=self._reason)

    def request_exit(self, code: int) -> None:
        """Queue the ``exit(code)`` frame, sent after every state set before it; never blocks.

        A later call replaces the code (and sends it again). Every new connection repeats it.
        """
        self._exit_code = code
        self._exit_requests += 1
        self._exit_delivered = False
        self._wake()

    @property
    def exit_delivered(self) -> bool:
        """True once the last requested ``exit`` frame was written (to the socket: the parent
        may still miss it if it dies too)."""
        return self._exit_delivered

    async def wait_exit_delivered(self) -> bool:
        """Wait until the requested ``exit`` frame is written or no sender is running; return
        :attr:`exit_delivered`. Bound it with a cancel scope: a parent that is away keeps the
        sender reconnecting."""
        while not self._exit_delivered and self._runners > 0:
            await self._progress.wait()
        return self._exit_delivered

    @property
    def metrics_source(self) -> MetricsSource | None:
        """Where ``metrics`` snapshots come from; setting it takes effect on a live connection."""
        return self._metrics_source

    @metrics_source.setter
    def metrics_source(self, source: MetricsSource | None) -> None:
        self._metrics_source = source
        self._wake()

    @property
    def connected(self) -> bool:
        """True while a status connection is up (its hello was written)."""
        return self._up.is_set()

    async def wait_connected(self) -> None:
        """Return once a status connection is up; bound it with a cancel scope."""
        await self._up.wait()

    # --- internals shared with the sender

    def _on_parent_frame(self, frame: Frame) -> bool:
        if frame.type != DrainMessage.TYPE:
            return False
        if not self.drain_requested.is_set():
            log.info("the parent asked for a drain")
            self.drain_requested.set()
        return True

    def _effective_reason(self, state: str, reason: str | None) -> str | None:
        if reason is None and state in ("serving", "draining") and self.memory_level != "ok":
            return f"memory_{self.memory_level}"
        return reason

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _set_up(self, up: bool) -> None:
        if up:
            self._up.set()
        elif self._up.is_set():
            self._up = trio.Event()

    def _metrics_message(self, source: MetricsSource) -> MetricsMessage | None:
        """The next snapshot as a checked message, or None (logged once per failing streak).

        Metrics are for operators, never a reason to stop signing: a snapshot that cannot be
        taken or is refused (too big, not JSON-like) is skipped, not raised.
        """
        try:
            message = MetricsMessage(snapshot=source())
            message.to_frame()  # the size bound and the value types, before anything is sent
        except ChannelProtocolError as exc:
            problem: str = str(exc)
            exc_info = False
        except Exception as exc:  # a bug in the source: report it, keep the channel up
            problem = f"the metrics source failed: {type(exc).__name__}"
            exc_info = True
        else:
            self._metrics_failing = False
            return message
        if not self._metrics_failing:
            self._metrics_failing = True
            log.error("metrics snapshot not sent: %s", problem, exc_info=exc_info)
        return None

    async def _converse(self, messages: MessageStream) -> str:
        """Send the current state, then every change, the exit frame once requested, and a
        metrics snapshot every interval."""
        queue = self._queue
        if not queue:
            queue.append(self.state)  # a new connection always starts with the current state
        exit_sent = 0  # exit requests sent on this connection: a new one repeats the frame
        next_metrics = trio.current_time() + self.metrics_interval_s
        while True:
            changed = self._changed
            if queue:
                message = queue[0]
                await messages.send(message)
                # set_state may have coalesced ``message`` away while we were sending it.
                if queue and queue[0] is message:
                    queue.popleft()
                continue
            code, requests = self._exit_code, self._exit_requests
            if code is not None and exit_sent < requests:
                await messages.send(ExitMessage(code=code))
                exit_sent = requests
                if self._exit_requests == requests and not self._exit_delivered:
                    self._exit_delivered = True
                    self._signal_progress()
                continue
            source = self._metrics_source
            wake_at = math.inf
            if source is not None and code is None:  # no snapshots in the last words
                if trio.current_time() >= next_metrics:
                    next_metrics = trio.current_time() + self.metrics_interval_s
                    snapshot = self._metrics_message(source)
                    if snapshot is not None:
                        await messages.send(snapshot)
                        self.metrics_sent += 1
                    continue
                wake_at = next_metrics
            with trio.move_on_at(wake_at):
                await changed.wait()


async def run_status_channel(
    connect: Connect,
    reporter: StatusReporter | None = None,
    *,
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    rng: random.Random | None = None,
    hurry: trio.Event | None = None,
    task_status: trio.TaskStatus[StatusReporter] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Push ``reporter``'s state to the parent over ``connect()`` connections, forever.

    Readiness: ``task_status.started(reporter)`` at once (a new reporter if none is given), so
    boot never waits for the parent. To give the channel a head start, the caller may wait on
    ``reporter.wait_connected()`` under its own timeout.

    Each connection sends ``hello(channel="status")``, the current state, then every change
    (coalesced, see :class:`StatusReporter`), the ``exit`` frame once requested, and metrics
    snapshots; after a failure it reconnects with back-off (see
    :func:`run_reconnecting_channel`, which also says what ``hurry`` does) and sends the
    current state again.

    Cancellation: safe at any point; the stream is closed. States set meanwhile are kept for
    the next run.

    Error handling: connection failures are logged and retried, never raised; ``ValueError``
    for bad back-off settings, before ``started``.
    """
    check_backoff(backoff_initial_s, backoff_max_s, connect_timeout_s)
    reporter = reporter if reporter is not None else StatusReporter()
    reporter._runners += 1
    try:
        task_status.started(reporter)
        await run_reconnecting_channel(
            "status",
            connect,
            reporter._converse,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            connect_timeout_s=connect_timeout_s,
            rng=rng,
            on_up=reporter._set_up,
            on_frame=reporter._on_parent_frame,
            hurry=hurry,
        )
    finally:
        reporter._runners -= 1
        reporter._signal_progress()
