"""The enclave's status channel: its lifecycle state, pushed to the parent over vsock.

The parent supervises the enclave through this channel (DESIGN.md section 3): it learns when
the enclave boots, preloads, serves, drains, fails (and why) and exits (and with which code).
Protocol (frames from :mod:`trio_sign.nitro._channel`), enclave to parent::

    hello(channel="status")  state  state ...  [state(failed|exiting)  exit(code)]

Frames from the parent are read (so that a close is noticed at once). On the status channel a
``drain`` frame sets :attr:`StatusReporter.drain_requested` (the parent's orderly stop: the
enclave drains and exits 0); anything else is ignored.

Design:

- :class:`StatusReporter` holds the latest state. :meth:`StatusReporter.set_state` is
  synchronous and never blocks: the sender sends the newest state, and intermediate states
  nobody has sent yet are coalesced away, except ``failed`` and ``exiting``, which are kept
  until sent (they are why the parent restarts us).
- :func:`run_status_channel` is the sender. It connects, says hello, sends the current state
  and then every change; when the connection fails it reconnects with full-jitter exponential
  back-off and sends the current state again. A broken status connection never takes the
  enclave down.
- :func:`report_final` is the process's last words: the final state and an ``exit`` frame,
  bounded in time and shielded from the cancellation that is tearing the process down.

The reconnecting loop (:func:`run_reconnecting_channel`) is shared with the log channel.
"""

from __future__ import annotations

import enum
import functools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

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
    StateMessage,
)
from ..nitro._channel import STATES
from ..transport import TransportError

log = logging.getLogger("trio_sign.enclave.status")

Connect = Callable[[], Awaitable[trio.abc.Stream]]

#: First reconnect delay ceiling (the delay is uniform in ``[0, ceiling]``).
DEFAULT_BACKOFF_INITIAL_S: Final = 0.5
#: Largest reconnect delay ceiling.
DEFAULT_BACKOFF_MAX_S: Final = 10.0
#: How long ``connect()`` may take before the attempt counts as failed.
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
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
) -> tuple[str, bool]:
    """Connect, say hello, run ``converse`` until it returns or the connection fails.

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
            nursery.start_soon(guarded, functools.partial(_read_until_closed, on_frame=on_frame))
            nursery.start_soon(guarded, converse)
    finally:
        if up:
            on_up(False)
        await trio.aclose_forcefully(stream)
    return (ended[0] if ended else "done"), True


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
) -> NoReturn:
    """Keep one enclave-to-parent channel up forever.

    Each round: ``connect()`` (bounded by ``connect_timeout_s``), send
    ``HelloMessage(channel)``, call ``on_up(True)``, then run ``converse(messages)`` while
    reading the parent's frames (each given to ``on_frame``, if any); the round ends when the
    parent closes, an I/O or framing error happens, or ``converse`` returns. Then
    ``on_up(False)``, the stream is closed and, after
    ``uniform(0, min(backoff_max_s, backoff_initial_s * 2**n))`` seconds (``n``: failed rounds
    in a row, reset by a round that got its hello out), the next round starts.

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
        await trio.sleep(delay)


def check_backoff(backoff_initial_s: float, backoff_max_s: float, connect_timeout_s: float) -> None:
    """``ValueError`` unless ``0 < backoff_initial_s <= backoff_max_s`` and a positive timeout."""
    if not 0 < backoff_initial_s <= backoff_max_s or connect_timeout_s <= 0:
        raise ValueError("need 0 < backoff_initial_s <= backoff_max_s and connect_timeout_s > 0")


# ------------------------------------------------------------------------------------------
# The status reporter


class _Keep(enum.Enum):
    KEEP = enum.auto()


KEEP: Final = _Keep.KEEP


class StatusReporter:
    """The enclave's current state, and what the status channel still has to send.

    Use it from the Trio thread. :meth:`set_state` never blocks and never awaits; it may be
    called before :func:`run_status_channel` runs (the state is sent once it connects).

    Attributes:
        state: the current :class:`~trio_sign.nitro.StateMessage` (as it is sent).
        memory_level: the last level given to :meth:`set_memory_level`.
        exit_delivered: True once the last :func:`report_final`'s ``exit`` frame was written.
        drain_requested: set when the parent sends ``drain`` (the enclave's tree waits on it).
    """

    def __init__(self) -> None:
        self.state = StateMessage(state="booting")
        self._reason: str | None = None  # as the caller gave it (state.reason may add memory)
        self.memory_level = "ok"
        self._queue: deque[StateMessage] = deque([self.state])
        self._changed = trio.Event()
        self._up = trio.Event()
        self._progress = trio.Event()
        self._exit_code: int | None = None
        self._exit_seq = 0  # report_final calls so far
        self._exit_delivered_seq = 0
        self._connect: Connect | None = None
        self._runners = 0
        self.drain_requested = trio.Event()

    # --- what the enclave calls

    def set_state(
        self,
        state: str,
        *,
        reason: str | None = None,
        accounts: int | _Keep | None = KEEP,
        sha256: str | _Keep | None = KEEP,
        preload_ms: int | _Keep | None = KEEP,
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
            accounts=current.accounts if isinstance(accounts, _Keep) else accounts,
            sha256=current.sha256 if isinstance(sha256, _Keep) else sha256,
            preload_ms=current.preload_ms if isinstance(preload_ms, _Keep) else preload_ms,
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

    @property
    def exit_delivered(self) -> bool:
        return self._exit_seq > 0 and self._exit_delivered_seq == self._exit_seq

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

    async def _converse(self, messages: MessageStream, *, until_exit: bool = False) -> str:
        """Send the current state, then every change (and the exit frame once requested)."""
        queue = self._queue
        if not queue:
            queue.append(self.state)  # a new connection always starts with the current state
        exit_sent_seq = 0  # per connection: a new one repeats the exit frame
        while True:
            changed = self._changed
            if queue:
                message = queue[0]
                await messages.send(message)
                # set_state may have coalesced ``message`` away while we were sending it.
                if queue and queue[0] is message:
                    queue.popleft()
                continue
            if self._exit_code is not None and exit_sent_seq < self._exit_seq:
                seq = self._exit_seq
                await messages.send(ExitMessage(code=self._exit_code))
                exit_sent_seq = seq
                if self._exit_delivered_seq < seq:
                    self._exit_delivered_seq = seq
                    self._signal_progress()
                if until_exit:
                    return "exit delivered"
                continue
            await changed.wait()


async def run_status_channel(
    connect: Connect,
    reporter: StatusReporter | None = None,
    *,
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[StatusReporter] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Push ``reporter``'s state to the parent over ``connect()`` connections, forever.

    Readiness: ``task_status.started(reporter)`` at once (a new reporter if none is given), so
    boot never waits for the parent. To give the channel a head start, the caller may wait on
    ``reporter.wait_connected()`` under its own timeout.

    Each connection sends ``hello(channel="status")``, the current state, then every change
    (coalesced, see :class:`StatusReporter`); after a failure it reconnects with back-off (see
    :func:`run_reconnecting_channel`) and sends the current state again.

    Cancellation: safe at any point; the stream is closed. States set meanwhile are kept, and
    :func:`report_final` delivers them on its own connection if this task is gone.

    Error handling: connection failures are logged and retried, never raised; ``ValueError``
    for bad back-off settings, before ``started``.
    """
    check_backoff(backoff_initial_s, backoff_max_s, connect_timeout_s)
    reporter = reporter if reporter is not None else StatusReporter()
    reporter._connect = connect
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
        )
    finally:
        reporter._runners -= 1
        reporter._signal_progress()


async def report_final(
    reporter: StatusReporter,
    state: str,
    *,
    code: int,
    reason: str | None = None,
    timeout_s: float,
    retry_s: float = DEFAULT_BACKOFF_INITIAL_S,
) -> bool:
    """The process's last words: set ``state``, then wait until it and ``exit(code)`` are sent.

    Call it while tearing down (``failed`` with the reason, or ``exiting``), just before the
    process exits. If :func:`run_status_channel` is running, it does the sending; if it is not
    (already cancelled with the rest of the tree), this opens connections of its own with the
    same ``connect`` (every ``retry_s`` until the time is up). Without any ``connect`` ever
    given, it only records the state.

    Returns True if the ``exit`` frame was written (to the socket: the parent may still miss it
    if it dies too), False if ``timeout_s`` ran out first.

    Cancellation: shielded; returns within ``timeout_s`` whatever happens around it.

    Error handling: ``ValueError`` for a bad state (as :meth:`StatusReporter.set_state`);
    connection failures just use up the time.
    """
    reporter.set_state(state, reason=reason)
    reporter._exit_code = code
    reporter._exit_seq += 1
    reporter._wake()
    with trio.move_on_after(timeout_s, shield=True):
        while not reporter.exit_delivered:
            if reporter._runners > 0:
                await reporter._progress.wait()
            elif reporter._connect is not None:
                reason_, _ = await one_connection(
                    "status",
                    reporter._connect,
                    lambda messages: reporter._converse(messages, until_exit=True),
                    connect_timeout_s=timeout_s,
                    on_up=reporter._set_up,
                )
                if not reporter.exit_delivered:
                    log.warning("cannot deliver the final state (%s); retrying", reason_)
                    await trio.sleep(retry_s)
            else:
                break
    if not reporter.exit_delivered:
        log.warning(
            "final state %r and exit code %d not delivered within %s s", state, code, timeout_s
        )
    return reporter.exit_delivered
