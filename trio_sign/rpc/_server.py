"""Trio gRPC server driver: unary-unary handlers from a method table, over any Trio stream."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio
from h2.errors import ErrorCodes

from ..transport._pacer import BatchPacer
from ._events import (
    ConnectionTerminated,
    MessageReceived,
    Metadata,
    RequestReceived,
    StreamEnded,
    StreamError,
    StreamReset,
)
from ._io import Writer, receive_bytes
from ._limits import FloodGuard, RateLimitedLog, ReceiveBudget, ServerLimits, connection_limit
from ._protocol import DEFAULT_INITIAL_WINDOW_SIZE, GrpcServerConnection
from ._status import RpcError, StatusCode

logger = logging.getLogger("trio_sign.rpc")


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call.

    Attributes:
        method: the full method path, e.g. ``/trio_sign.v1.SignService/Ping``.
        metadata: the request's custom metadata.
        authority: the request's ``:authority``.
        deadline: the call's deadline on the Trio clock (``math.inf`` if none). The handler
            already runs inside a cancel scope with this deadline.
    """

    method: str
    metadata: Metadata
    authority: str
    deadline: float


#: A unary-unary handler: request bytes in, response bytes out. Raise `RpcError` to answer
#: with a non-OK status.
UnaryHandler = Callable[[bytes, CallContext], Awaitable[bytes]]


class SupportsSerializeToString(Protocol):
    """What `protobuf_handler` needs of a response message (any protobuf message has it)."""

    def SerializeToString(self) -> bytes: ...


Req = TypeVar("Req")


def protobuf_handler(
    parse: Callable[[bytes], Req],
    handler: Callable[[Req, CallContext], Awaitable[SupportsSerializeToString]],
) -> UnaryHandler:
    """Adapt a message-typed handler to a `UnaryHandler`.

    Args:
        parse: builds the request message from bytes, e.g. ``PingRequest.FromString``.
        handler: ``async def (request, context) -> response message``.

    Error handling: a request that does not parse is answered INVALID_ARGUMENT naming the
    method, without the handler running.
    """

    @functools.wraps(handler)
    async def wrapped(data: bytes, context: CallContext) -> bytes:
        try:
            request = parse(data)
        except Exception as exc:  # protobuf's DecodeError and friends: foreign, map them
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, f"{context.method}: request does not parse"
            ) from exc
        response = await handler(request, context)
        return response.SerializeToString()

    return wrapped


def _as_rpc_error(exc: Exception) -> RpcError | None:
    """The status a handler meant to return: an `RpcError`, also when a nursery inside the
    handler wrapped it (alone) in an exception group."""
    while True:
        if isinstance(exc, RpcError):
            return exc
        if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
            continue
        return None


class _Call:
    __slots__ = ("arrived", "error", "gone", "request", "request_event", "scope", "started")

    def __init__(self, request_event: RequestReceived, deadline: float, now: float) -> None:
        self.request_event = request_event
        self.scope = trio.CancelScope(deadline=deadline)
        self.arrived = now
        self.request: bytes | None = None
        self.error: RpcError | None = None
        self.gone = False  # the stream was reset or failed: answer nothing
        self.started = False  # the handler task runs (the request is complete or refused)


@dataclass
class ServerStats:
    """What the server refused or cut, since it started (for metrics and the logs)."""

    connections_refused: int = 0
    connections_evicted: int = 0
    preface_timeouts: int = 0
    idle_closed: int = 0
    request_timeouts: int = 0
    send_stalls: int = 0
    floods: int = 0
    streams_refused: int = 0
    #: Connections that waited for their turn to start after a flood (`FloodGuard`).
    connections_paced: int = 0


class _ServerConnection:
    def __init__(self, server: GrpcServer, stream: trio.abc.Stream) -> None:
        self._server = server
        self._stream = stream
        limits = server.limits
        self._limits = limits
        self._core = GrpcServerConnection(
            methods=server._handlers.keys(),
            max_receive_message_size=limits.max_receive_message_size,
            max_concurrent_streams=limits.max_concurrent_streams,
            initial_window_size=server._initial_window_size,
            method_limits=server._method_limits,
            max_buffered=limits.max_connection_receive_bytes,
            budget=server._budget,
            max_send_bytes=limits.max_connection_send_bytes,
            flood=server._flood_guard.counter(),
        )
        self._writer = Writer(self._core, stream)
        self._calls: dict[int, _Call] = {}
        self._scope = trio.CancelScope()
        self._closing = False
        self._nursery: trio.Nursery | None = None
        self.started_at = trio.current_time()
        #: Since when the connection has had no call open (eviction picks the oldest).
        self.idle_since: float | None = self.started_at

    def _mark_idle(self) -> None:
        """No call open from now: last in the server's line of idle connections (unless it
        has left the server's set already: evicted, it must not be picked again)."""
        self.idle_since = trio.current_time()
        idle = self._server._idle
        idle.pop(self, None)
        if self in self._server._connections:
            idle[self] = None

    def _mark_busy(self) -> None:
        self.idle_since = None
        self._server._idle.pop(self, None)

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    @property
    def cut_for_flood(self) -> bool:
        """True if the connection was closed with GOAWAY ENHANCE_YOUR_CALM (a flood)."""
        return self._core.abuse is not None

    async def run(self) -> None:
        """Serve until the peer leaves, the connection is cut or closed, or cancellation.
        The stream is the caller's to close."""
        self._core.initiate()
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_then_stop)
                nursery.start_soon(self._watchdog)
                if self._server._draining:
                    self.start_drain()
                await self._read_loop()
                if not self._closing:
                    # The peer went away: nothing more can be answered. A thousand
                    # peers leaving at once end a few per pass (`BatchPacer`).
                    await self._server._pacer.turn()
                    self._scope.cancel()
                # Otherwise the writer flushes the final GOAWAY, then cancels the scope.

    def start_drain(self) -> None:
        self._core.start_drain()
        self._writer.kick()
        self._maybe_finish()

    def cancel(self) -> None:
        self._scope.cancel()

    async def _write_then_stop(self) -> None:
        await self._writer.run()
        # Flushed after close (or the stream broke): the connection is over.
        self._scope.cancel()

    def _maybe_finish(self) -> None:
        if self._closing:
            return
        if self._core.terminated or (self._core.draining and not self._calls):
            self._closing = True
            self._core.close()
            self._writer.close_after_flush()

    async def _watchdog(self) -> None:
        """Enforce the connection's timers: preface, idle, request completion, send stall.

        One task per connection waking at a quarter of the shortest timeout: cheaper than a
        timer per call, and precise enough for limits measured in seconds.
        """
        limits = self._limits
        tick = (
            min(
                limits.preface_timeout_s,
                limits.request_timeout_s,
                limits.send_timeout_s,
                limits.idle_timeout_s,
            )
            / 4
        )
        core = self._core
        writer = self._writer
        stats = self._server.stats
        sent_mark = (core.sent_message_bytes, trio.current_time())
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if not core.preface_received:
                if now - self.started_at >= limits.preface_timeout_s:
                    stats.preface_timeouts += 1
                    self._server._log_preface_timeout(timeout_s=limits.preface_timeout_s)
                    self._scope.cancel()
                    return
                continue
            if self.idle_since is not None and now - self.idle_since >= limits.idle_timeout_s:
                stats.idle_closed += 1
                logger.debug("gRPC connection idle for %.0f s; closing", limits.idle_timeout_s)
                self.start_drain()
            self._expire_incomplete(now)
            # No sending progress while output waits: the peer does not read (socket full) or
            # gives no flow-control window.
            if core.sent_message_bytes != sent_mark[0] or not core.queued_send_bytes:
                sent_mark = (core.sent_message_bytes, now)
            socket_stalled = writer.pending and now - writer.waiting_since >= limits.send_timeout_s
            window_stalled = now - sent_mark[1] >= limits.send_timeout_s
            if socket_stalled or window_stalled:
                stats.send_stalls += 1
                self._server._log_send_stall(timeout_s=limits.send_timeout_s)
                self._scope.cancel()
                return

    def _expire_incomplete(self, now: float) -> None:
        limit = self._limits.request_timeout_s
        expired = [
            (stream_id, call)
            for stream_id, call in self._calls.items()
            if not call.started and (now - call.arrived >= limit or now >= call.scope.deadline)
        ]
        for stream_id, call in expired:
            del self._calls[stream_id]
            if now >= call.scope.deadline:
                status, message = StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            else:
                self._server.stats.request_timeouts += 1
                self._server._log_request_timeout(timeout_s=limit)
                status = StatusCode.DEADLINE_EXCEEDED
                message = f"request not complete within {limit:g} s (request_timeout_s)"
            if not self._core.terminated:
                self._core.send_trailers(stream_id, status, message)
        if expired:
            self._call_done()

    def _call_done(self) -> None:
        if not self._calls:
            self._mark_idle()
        self._writer.kick()
        self._maybe_finish()

    def _start(self, stream_id: int, call: _Call) -> None:
        call.started = True
        assert self._nursery is not None
        self._nursery.start_soon(self._run_call, stream_id, call)

    async def _read_loop(self) -> None:
        core = self._core
        calls = self._calls
        writer = self._writer
        send_limit = self._limits.max_connection_send_bytes
        refused = 0
        while not self._closing:
            data = await receive_bytes(self._stream)
            if not data:
                return
            for ev in core.receive_data(data):
                if isinstance(ev, MessageReceived):
                    call = calls.get(ev.stream_id)
                    if call is not None and not call.started:
                        if call.request is None:
                            call.request = ev.data
                        else:
                            call.error = RpcError(
                                StatusCode.INTERNAL, "unary method got more than one request"
                            )
                            self._start(ev.stream_id, call)
                elif isinstance(ev, RequestReceived):
                    now = trio.current_time()
                    deadline = math.inf if ev.deadline_s is None else now + ev.deadline_s
                    calls[ev.stream_id] = _Call(ev, deadline, now)
                    if self.idle_since is not None:
                        self._mark_busy()
                elif isinstance(ev, StreamEnded):
                    call = calls.get(ev.stream_id)
                    if call is not None and not call.started:
                        self._start(ev.stream_id, call)
                elif isinstance(ev, StreamReset | StreamError):
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        call.gone = True
                        if call.started:
                            call.scope.cancel()
                        else:
                            # No task was ever started for it: a reset costs no more than this.
                            del calls[ev.stream_id]
                            self._call_done()
                elif isinstance(ev, ConnectionTerminated):
                    if core.abuse is not None:
                        self._server.stats.floods += 1
                        self._server._flood_guard.cut()
                        self._server._log_flood(reason=core.abuse)
                    else:
                        logger.debug("gRPC connection terminated by peer: code %d", ev.error_code)
            if core.refused_streams != refused:  # counted as they happen, for the metrics
                self._server._refused_streams(core.refused_streams - refused)
                refused = core.refused_streams
            writer.kick()
            if core.terminated:
                self._maybe_finish()
            # A peer that does not read: stop reading it too, so that what it makes us
            # answer (PING and SETTINGS acknowledgements, refusals) cannot pile up. The
            # watchdog closes the connection if this lasts.
            await writer.wait_pending_at_most(send_limit)

    async def _run_call(self, stream_id: int, call: _Call) -> None:
        core = self._core
        ev = call.request_event
        handler = self._server._handlers[ev.method]
        context = CallContext(ev.method, ev.metadata, ev.authority, call.scope.deadline)
        answered = False
        response: bytes | None = None
        error: RpcError | None = None
        try:
            try:
                with call.scope:
                    if call.error is not None:
                        raise call.error
                    if call.request is None:
                        raise RpcError(StatusCode.INTERNAL, "unary method got no request message")
                    request, call.request = call.request, None
                    response = await handler(request, context)
            except Exception as exc:
                error = _as_rpc_error(exc)
                if error is None:
                    # The handler's bug; its message might hold anything, so it stays in the log.
                    logger.exception("gRPC handler for %s failed", ev.method)
                    error = RpcError(StatusCode.UNKNOWN, "unexpected error in the method handler")
            if call.gone or core.terminated:
                return
            if call.scope.cancelled_caught and response is None and error is None:
                error = RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            if error is None and response is not None:
                core.send_response(stream_id, response)
            else:
                assert error is not None
                core.send_trailers(stream_id, error.status, error.details)
            answered = True
        finally:
            self._calls.pop(stream_id, None)
            if not answered and not call.gone and not core.terminated:
                core.reset(stream_id, ErrorCodes.CANCEL)
            self._call_done()


class GrpcServer:
    """A gRPC server for unary-unary methods, one task per call, one writer per connection.

    Args:
        handlers: method path (``/package.Service/Method``) to `UnaryHandler`. Other paths are
            answered UNIMPLEMENTED.
        limits: every bound under hostile load (`ServerLimits`; DESIGN §16).
        method_limits: the largest request message per method path, enforced on the length
            prefix before anything is buffered; other methods get
            ``limits.max_receive_message_size``.
        max_receive_message_size, max_concurrent_streams: override those fields of ``limits``.
        initial_window_size: per-stream receive window advertised to clients.

    Use `serve` (or `serve_grpc`) for listeners, or `serve_stream` for one stream you accepted
    yourself (tests use memory streams). Stop with `drain` (graceful) or `aclose` (now).
    """

    def __init__(
        self,
        handlers: Mapping[str, UnaryHandler],
        *,
        limits: ServerLimits | None = None,
        method_limits: Mapping[str, int] | None = None,
        max_receive_message_size: int | None = None,
        max_concurrent_streams: int | None = None,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
    ) -> None:
        for name in handlers:
            if not name.startswith("/") or name.count("/") != 2:
                raise ValueError(f"method {name!r} is not of the form /package.Service/Method")
        limits = limits if limits is not None else ServerLimits()
        if max_receive_message_size is not None:
            limits = dataclasses.replace(limits, max_receive_message_size=max_receive_message_size)
        if max_concurrent_streams is not None:
            limits = dataclasses.replace(limits, max_concurrent_streams=max_concurrent_streams)
        wanted = limits.max_connections
        limits = dataclasses.replace(limits, max_connections=connection_limit(wanted))
        if limits.max_connections < wanted:
            logger.warning(
                "gRPC max_connections lowered from %d to %d to fit the open-file limit",
                wanted,
                limits.max_connections,
            )
        self.limits = limits
        self._handlers = dict(handlers)
        self._method_limits = dict(method_limits or {})
        self._initial_window_size = initial_window_size
        self._budget = ReceiveBudget(limits.max_server_receive_bytes)
        self._flood_guard = FloodGuard(limits, trio.current_time)
        self._connections: set[_ServerConnection] = set()
        # Connections with no call open, longest idle first (`_ServerConnection._mark_idle`).
        self._idle: dict[_ServerConnection, None] = {}
        self._pacer = BatchPacer(limits.setups_per_batch)
        self._waiting = 0  # admitted connections waiting for their turn to start
        # Connections cut for a flood, held open unread for a while, oldest first (`_linger`).
        self._lingering: dict[trio.CancelScope, None] = {}
        self._changed = trio.Event()
        self._stopping = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._draining = False
        self.stats = ServerStats()

        rated = functools.partial(
            RateLimitedLog, logger, interval_s=limits.log_interval_s, clock=trio.current_time
        )

        self._log_refused = rated("gRPC connection refused: max_connections, every one busy")
        self._log_evicted = rated(
            "gRPC connection limit reached: closed the longest-idle connection", level=logging.INFO
        )
        self._log_preface_timeout = rated("gRPC connection closed: no HTTP/2 preface in time")
        self._log_request_timeout = rated("gRPC request not completed in time; answered")
        self._log_send_stall = rated("gRPC connection closed: the peer does not read")
        self._log_flood = rated("gRPC connection closed with ENHANCE_YOUR_CALM (flood)")
        self._log_streams_refused = rated(
            "gRPC streams refused: a connection exceeded its stream or send limit"
        )

    def _refused_streams(self, count: int) -> None:
        if count:
            self.stats.streams_refused += count
            self._log_streams_refused(count=count)

    @property
    def draining(self) -> bool:
        """True once `drain` or `aclose` was called."""
        return self._draining

    @property
    def connection_count(self) -> int:
        """Open connections."""
        return len(self._connections)

    @property
    def buffered_receive_bytes(self) -> int:
        """Incomplete request bytes all connections hold now."""
        return self._budget.used

    def _admit(self) -> bool:
        """Room for one more connection: at the limit close the longest lingering one (cut
        for a flood), else evict the longest-idle one."""
        held = len(self._connections) + self._waiting + len(self._lingering)
        if held < self.limits.max_connections:
            return True
        if self._lingering:
            self._release_lingering()
            return True
        if not self._idle:
            self.stats.connections_refused += 1
            self._log_refused(max_connections=self.limits.max_connections)
            return False
        victim = next(iter(self._idle))
        del self._idle[victim]
        self._connections.discard(victim)
        victim.cancel()
        self.stats.connections_evicted += 1
        self._log_evicted(max_connections=self.limits.max_connections)
        return True

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve gRPC on one connected stream until the peer leaves or the server stops.

        The stream is closed on return. At ``max_connections`` the connection that has been
        idle longest is closed to make room; if every connection has calls open, this one is
        closed at once instead. Shortly after a flood was cut, the connection may first wait
        for its turn to start (`FloodGuard`). A connection cut for a flood (GOAWAY
        ENHANCE_YOUR_CALM) is held open, unread, for ``flood_linger_s`` before it is closed.

        Cancellation: cancelling this task cancels the connection's call handlers and closes
        the stream.

        Error handling: an unexpected exception while serving this connection (a bug) is logged
        and closes this connection only; one client must not be able to stop the whole server.
        Handler exceptions never get here: they become gRPC statuses.
        """
        if not self._admit():
            await trio.aclose_forcefully(stream)
            return
        start = self._flood_guard.start_time()
        if start > trio.current_time():
            self.stats.connections_paced += 1
            self._waiting += 1
            try:
                with trio.move_on_at(start):
                    await self._stopping.wait()
            finally:
                self._waiting -= 1
            if self._stopping.is_set():
                await trio.aclose_forcefully(stream)
                return
        conn = _ServerConnection(self, stream)
        self._connections.add(conn)
        self._idle[conn] = None  # no call open yet
        self._notify()
        try:
            try:
                await conn.run()
            except Exception:
                logger.exception("gRPC connection failed unexpectedly; closed it")
            finally:
                self._connections.discard(conn)
                self._idle.pop(conn, None)
                self._notify()
            if conn.cut_for_flood:
                await self._linger()
        finally:
            await trio.aclose_forcefully(stream)

    async def _linger(self) -> None:
        """Hold a connection cut for a flood open, unread, for ``flood_linger_s`` (its GOAWAY
        is flushed already), or until the server stops or needs the room.

        An attacker that reconnects when its connection closes otherwise reconnects at once,
        and each reconnect costs a TLS handshake and a connection's setup here (and a
        forwarded connection in the parent): 45 a second in the rapid-reset bench. A client
        that reconnects as soon as it reads the GOAWAY is not slowed; the TLS handshake rate
        bounds it (DESIGN §16).
        """
        limits = self.limits
        if limits.flood_linger_s <= 0 or self._stopping.is_set():
            return
        scope = trio.CancelScope(deadline=trio.current_time() + limits.flood_linger_s)
        self._lingering[scope] = None
        while len(self._lingering) > limits.max_lingering:
            self._release_lingering()
        try:
            with scope:
                await self._stopping.wait()
        finally:
            self._lingering.pop(scope, None)

    def _release_lingering(self) -> None:
        """Close the connection that has lingered longest now."""
        oldest = next(iter(self._lingering))
        del self._lingering[oldest]
        oldest.cancel()

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listeners`` until `drain` or `aclose`; return when every
        connection is finished. Reports this server through ``task_status`` once listening.
        """
        async with trio.open_nursery() as pacing:
            await pacing.start(self._pacer.run)
            async with trio.open_nursery() as connections:
                with self._accept_scope:
                    async with trio.open_nursery() as accept:
                        await accept.start(
                            functools.partial(
                                trio.serve_listeners,
                                self.serve_stream,
                                list(listeners),
                                handler_nursery=connections,
                            )
                        )
                        task_status.started(self)
            pacing.cancel_scope.cancel()

    async def drain(self, grace_s: float) -> None:
        """Graceful stop: stop accepting, send GOAWAY on every connection, let open calls
        finish for up to ``grace_s`` seconds, then cancel what is left. Returns when every
        connection is closed.

        Cancellation: if the caller is cancelled, the grace period ends early the same way.
        """
        self._draining = True
        self._stopping.set()
        self._accept_scope.cancel()
        for conn in list(self._connections):
            conn.start_drain()
        try:
            with trio.move_on_after(grace_s):
                await self._wait_no_connections()
        finally:
            for conn in list(self._connections):
                conn.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await self._wait_no_connections()

    async def aclose(self) -> None:
        """Stop now: stop accepting and cancel every connection. Idempotent."""
        self._draining = True
        self._stopping.set()
        self._accept_scope.cancel()
        for conn in list(self._connections):
            conn.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await self._wait_no_connections()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_no_connections(self) -> None:
        while self._connections:
            await self._changed.wait()


async def serve_grpc(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    handlers: Mapping[str, UnaryHandler],
    *,
    limits: ServerLimits | None = None,
    method_limits: Mapping[str, int] | None = None,
    max_receive_message_size: int | None = None,
    max_concurrent_streams: int | None = None,
    initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
    task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handlers`` on ``listeners``; ``nursery.start`` returns the `GrpcServer` (call
    its ``drain``/``aclose`` to stop) once listening. Returns after the server stopped.
    Arguments as for `GrpcServer`."""
    server = GrpcServer(
        handlers,
        limits=limits,
        method_limits=method_limits,
        max_receive_message_size=max_receive_message_size,
        max_concurrent_streams=max_concurrent_streams,
        initial_window_size=initial_window_size,
    )
    await server.serve(listeners, task_status=task_status)
