"""The Trio driver: keep one event-stream subscription alive, forever.

It only moves bytes between an injected stream and the sans-io cores (:mod:`._http`,
:mod:`._parser`); reconnect policy, keepalive and status live here.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from .._backoff import full_jitter_delay
from ..transport import TransportError
from ._events import MessageEvent, RetryChanged, SseProtocolError, SseResponseError
from ._http import (
    DEFAULT_MAX_HEAD_SIZE,
    BodyData,
    EventsUrl,
    ResponseHead,
    ResponseParser,
    build_request,
    check_event_stream,
    parse_events_url,
    valid_last_event_id,
)
from ._parser import DEFAULT_MAX_EVENT_SIZE, DEFAULT_MAX_LINE_LENGTH, EventStreamParser

log = logging.getLogger("trio_sign.sse")

#: A stream (or a connect, or a request write) with no progress for this long is dead.
DEFAULT_KEEPALIVE_TIMEOUT_S: Final = 45.0
#: Base of the exponential back-off when the server sent no ``retry:``.
DEFAULT_BACKOFF_INITIAL_S: Final = 1.0
#: Ceiling of the back-off (and of a server's ``retry:``).
DEFAULT_BACKOFF_MAX_S: Final = 60.0
#: Floor of a server's ``retry:``, so that ``retry: 0`` cannot make us spin.
MIN_RETRY_S: Final = 0.1
_RECEIVE_SIZE: Final = 16 * 1024

Connect = Callable[[], Awaitable[trio.abc.Stream]]
OnEvent = Callable[[MessageEvent], Awaitable[None] | None]


@dataclass(slots=True)
class SseClientStatus:
    """What the client is doing, for health reporting. Updated in place by the client.

    Attributes:
        url: the events URL (never contains credentials: they are refused).
        connected: a 200 ``text/event-stream`` response is being read right now.
        connects: connections that got such a response.
        reconnects: connection attempts after the first one.
        last_event_at: ``trio.current_time()`` of the last dispatched event, or None.
        last_event_id: what the next connection sends as ``Last-Event-ID``.
        last_error: why the last connection ended (one line), or ``""``.
        stopped: the server answered 204: the client returned and will not reconnect.
    """

    url: str
    connected: bool = False
    connects: int = 0
    reconnects: int = 0
    last_event_at: float | None = None
    last_event_id: str = ""
    last_error: str = ""
    stopped: bool = False


class _Lost(Exception):
    """The connection failed or ended (internal); ``status`` is the HTTP status of a refused
    response, if that is why."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


_IO_ERRORS: Final = (OSError, trio.BrokenResourceError, TransportError)


async def run_sse_client(
    url: str,
    *,
    connect: Connect,
    on_event: OnEvent,
    last_event_id: str = "",
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
    max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[SseClientStatus] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Subscribe to the event stream at ``url`` and call ``on_event`` for every event, in order,
    reconnecting forever.

    ``url`` (``http(s)://host[:port]/path``) gives the request line and ``Host``; the bytes go
    over ``connect()`` (in the enclave: the parent's relay over vsock), never straight to the
    host. Each connection sends ``Last-Event-ID`` when one is known.

    Readiness: ``task_status.started(status)`` is called at once, before the first connection,
    so that nobody's readiness depends on the gateway being up; watch the returned
    :class:`SseClientStatus` instead.

    Reconnects: after any failure (connect error, non-200 or wrong ``Content-Type``, malformed
    stream, end of stream, or no bytes at all for ``keepalive_timeout_s``: comments count) the
    client sleeps ``uniform(0, min(backoff_max_s, base * 2**n))`` ("full jitter"), where ``base``
    is the server's last ``retry:`` (clamped to ``[MIN_RETRY_S, backoff_max_s]``) or
    ``backoff_initial_s``, and ``n`` counts failures since the last connection that got a valid
    event-stream response. ``connect()``, the request write and every read are each bounded by
    ``keepalive_timeout_s``.

    Returns only if the server answers ``204 No Content`` (the spec's "stop reconnecting").

    Cancellation: safe at any point; the stream is closed (forcefully) before this returns, and
    no task is left behind (the client runs in the caller's task).

    Error handling: transport and protocol failures are logged and retried, never raised. A bad
    ``url`` raises :class:`~trio_sign.transport.TransportError` and bad settings ``ValueError``,
    both before ``started``. An exception
    from ``on_event`` propagates (it is a bug in the caller; fail fast).
    """
    target = parse_events_url(url)
    if not valid_last_event_id(last_event_id):
        raise ValueError("last_event_id contains control characters")
    if not 0 < backoff_initial_s <= backoff_max_s or keepalive_timeout_s <= 0:
        raise ValueError("need 0 < backoff_initial_s <= backoff_max_s and keepalive_timeout_s > 0")
    status = SseClientStatus(url=str(target), last_event_id=last_event_id)
    client = _Client(
        target,
        status,
        connect=connect,
        on_event=on_event,
        keepalive_timeout_s=keepalive_timeout_s,
        max_line_length=max_line_length,
        max_event_size=max_event_size,
        max_head_size=max_head_size,
    )
    rng = rng if rng is not None else random.Random()
    task_status.started(status)
    failures = 0
    while True:
        try:
            await client.run_once()
            reason = "the gateway ended the stream"
        except _Lost as exc:
            reason = str(exc)
            if exc.status == 204:
                log.warning("sse: the gateway answered 204 No Content; not reconnecting")
                status.stopped = True
                status.last_error = reason
                return
        status.connected = False
        status.last_error = reason
        if client.healthy:
            failures = 0
        base = backoff_initial_s
        if client.retry_ms is not None:
            base = min(max(client.retry_ms / 1000, MIN_RETRY_S), backoff_max_s)
        delay = full_jitter_delay(rng, base=base, maximum=backoff_max_s, failures=failures)
        failures += 1
        log.warning(
            "sse: connection ended (%s); reconnecting in %.3f s (failure %d)",
            reason,
            delay,
            failures,
        )
        await trio.sleep(delay)
        status.reconnects += 1


class _Client:
    """One connection at a time; remembers what must survive reconnects."""

    def __init__(
        self,
        target: EventsUrl,
        status: SseClientStatus,
        *,
        connect: Connect,
        on_event: OnEvent,
        keepalive_timeout_s: float,
        max_line_length: int,
        max_event_size: int,
        max_head_size: int,
    ) -> None:
        self.target = target
        self.status = status
        self.connect = connect
        self.on_event = on_event
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_line_length = max_line_length
        self.max_event_size = max_event_size
        self.max_head_size = max_head_size
        self.retry_ms: int | None = None
        self.healthy = False

    async def run_once(self) -> None:
        """One connection, until it ends; raises :class:`_Lost` (returns on a clean end).

        Only I/O and protocol failures become :class:`_Lost`; whatever ``on_event`` raises
        propagates unchanged.
        """
        self.healthy = False
        timeout = self.keepalive_timeout_s
        log.debug("sse: connecting to %s", self.target)
        with trio.move_on_after(timeout) as scope:
            try:
                stream = await self.connect()
            except _IO_ERRORS as exc:
                raise _Lost(_describe(exc)) from exc
        if scope.cancelled_caught:
            raise _Lost(f"connect took longer than {timeout} s (keepalive_timeout_s)")
        try:
            await self._converse(stream)
        finally:
            self.status.connected = False
            await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.abc.Stream) -> None:
        timeout = self.keepalive_timeout_s
        status = self.status
        last_event_id = status.last_event_id
        if not valid_last_event_id(last_event_id):
            log.warning("sse: last event id has control characters; not sending Last-Event-ID")
            last_event_id = ""
        request = build_request(self.target, last_event_id=last_event_id)
        with trio.move_on_after(timeout) as scope:
            try:
                await stream.send_all(request)
            except _IO_ERRORS as exc:
                raise _Lost(_describe(exc)) from exc
        if scope.cancelled_caught:
            raise _Lost(f"sending the request took longer than {timeout} s (keepalive_timeout_s)")
        http = ResponseParser(max_head_size=self.max_head_size)
        parser = EventStreamParser(
            last_event_id=status.last_event_id,
            max_line_length=self.max_line_length,
            max_event_size=self.max_event_size,
        )
        while True:
            with trio.move_on_after(timeout) as scope:
                try:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                except _IO_ERRORS as exc:
                    raise _Lost(_describe(exc)) from exc
            if scope.cancelled_caught:
                raise _Lost(f"no bytes for {timeout} s (keepalive_timeout_s)")
            try:
                items = http.receive_data(data) if data else http.receive_eof()
            except SseProtocolError as exc:
                raise _Lost(str(exc)) from exc
            for item in items:
                if isinstance(item, ResponseHead):
                    try:
                        check_event_stream(item)
                    except SseResponseError as exc:
                        raise _Lost(str(exc), status=exc.status) from exc
                    self.healthy = True
                    status.connected = True
                    status.connects += 1
                    log.info(
                        "sse: subscribed to %s (Last-Event-ID %r)",
                        self.target,
                        status.last_event_id,
                    )
                elif isinstance(item, BodyData):
                    await self._deliver(parser, item.data)
                else:
                    return  # EndOfMessage

    async def _deliver(self, parser: EventStreamParser, data: bytes) -> None:
        status = self.status
        try:
            events = parser.receive_data(data)
        except SseProtocolError as exc:
            raise _Lost(str(exc)) from exc
        for event in events:
            if isinstance(event, RetryChanged):
                self.retry_ms = event.ms
                log.info("sse: server set retry to %d ms", event.ms)
                continue
            status.last_event_at = trio.current_time()
            log.debug(
                "sse: event %r id %r (%d characters)",
                event.type,
                event.last_event_id,
                len(event.data),
            )
            result = self.on_event(event)
            if result is not None:
                await result
            status.last_event_id = event.last_event_id
        status.last_event_id = parser.last_event_id


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
