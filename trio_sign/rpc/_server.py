"""Trio gRPC server driver: unary-unary handlers from a method table, over any Trio stream."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio
from h2.errors import ErrorCodes

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
from ._protocol import (
    DEFAULT_INITIAL_WINDOW_SIZE,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_RECEIVE_MESSAGE_SIZE,
    GrpcServerConnection,
)
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
    __slots__ = ("error", "gone", "ready", "request", "scope")

    def __init__(self, deadline: float) -> None:
        self.scope = trio.CancelScope(deadline=deadline)
        self.ready = trio.Event()  # the request is complete (or refused: see `error`)
        self.request: bytes | None = None
        self.error: RpcError | None = None
        self.gone = False  # the stream was reset or failed: answer nothing


class _ServerConnection:
    def __init__(self, server: GrpcServer, stream: trio.abc.Stream) -> None:
        self._server = server
        self._stream = stream
        self._core = GrpcServerConnection(
            methods=server._handlers.keys(),
            max_receive_message_size=server._max_receive_message_size,
            max_concurrent_streams=server._max_concurrent_streams,
            initial_window_size=server._initial_window_size,
        )
        self._writer = Writer(self._core, stream)
        self._calls: dict[int, _Call] = {}
        self._scope = trio.CancelScope()
        self._closing = False

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    async def run(self) -> None:
        self._core.initiate()
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_then_stop)
                    if self._server._draining:
                        self.start_drain()
                    await self._read_loop(nursery)
                    if not self._closing:
                        # The peer went away: nothing more can be answered.
                        self._scope.cancel()
                    # Otherwise the writer flushes the final GOAWAY, then cancels the scope.
        finally:
            await trio.aclose_forcefully(self._stream)

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

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        core = self._core
        calls = self._calls
        while not self._closing:
            data = await receive_bytes(self._stream)
            if not data:
                return
            for ev in core.receive_data(data):
                if isinstance(ev, MessageReceived):
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        if call.request is None and call.error is None:
                            call.request = ev.data
                        elif call.error is None:
                            call.error = RpcError(
                                StatusCode.INTERNAL, "unary method got more than one request"
                            )
                            call.ready.set()
                elif isinstance(ev, RequestReceived):
                    deadline = (
                        math.inf if ev.deadline_s is None else trio.current_time() + ev.deadline_s
                    )
                    call = _Call(deadline)
                    calls[ev.stream_id] = call
                    nursery.start_soon(self._run_call, ev, call)
                elif isinstance(ev, StreamEnded):
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        call.ready.set()
                elif isinstance(ev, StreamReset | StreamError):
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        call.gone = True
                        call.scope.cancel()
                elif isinstance(ev, ConnectionTerminated):
                    logger.debug("gRPC connection terminated by peer: code %d", ev.error_code)
            self._writer.kick()
            if core.terminated:
                self._maybe_finish()

    async def _run_call(self, ev: RequestReceived, call: _Call) -> None:
        core = self._core
        stream_id = ev.stream_id
        handler = self._server._handlers[ev.method]
        context = CallContext(ev.method, ev.metadata, ev.authority, call.scope.deadline)
        answered = False
        response: bytes | None = None
        error: RpcError | None = None
        try:
            try:
                with call.scope:
                    await call.ready.wait()
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
            del self._calls[stream_id]
            if not answered and not call.gone and not core.terminated:
                core.reset(stream_id, ErrorCodes.CANCEL)
            self._writer.kick()
            self._maybe_finish()


class GrpcServer:
    """A gRPC server for unary-unary methods, one task per call, one writer per connection.

    Args:
        handlers: method path (``/package.Service/Method``) to `UnaryHandler`. Other paths are
            answered UNIMPLEMENTED.
        max_receive_message_size: larger requests are answered RESOURCE_EXHAUSTED.
        max_concurrent_streams: advertised per connection; the peer must not exceed it.
        initial_window_size: per-stream receive window advertised to clients.

    Use `serve` (or `serve_grpc`) for listeners, or `serve_stream` for one stream you accepted
    yourself (tests use memory streams). Stop with `drain` (graceful) or `aclose` (now).
    """

    def __init__(
        self,
        handlers: Mapping[str, UnaryHandler],
        *,
        max_receive_message_size: int = DEFAULT_MAX_RECEIVE_MESSAGE_SIZE,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
    ) -> None:
        for name in handlers:
            if not name.startswith("/") or name.count("/") != 2:
                raise ValueError(f"method {name!r} is not of the form /package.Service/Method")
        self._handlers = dict(handlers)
        self._max_receive_message_size = max_receive_message_size
        self._max_concurrent_streams = max_concurrent_streams
        self._initial_window_size = initial_window_size
        self._connections: set[_ServerConnection] = set()
        self._changed = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._draining = False

    @property
    def draining(self) -> bool:
        """True once `drain` or `aclose` was called."""
        return self._draining

    @property
    def connection_count(self) -> int:
        """Open connections."""
        return len(self._connections)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve gRPC on one connected stream until the peer leaves or the server stops.

        The stream is closed on return.

        Cancellation: cancelling this task cancels the connection's call handlers and closes
        the stream.

        Error handling: an unexpected exception while serving this connection (a bug) is logged
        and closes this connection only; one client must not be able to stop the whole server.
        Handler exceptions never get here: they become gRPC statuses.
        """
        conn = _ServerConnection(self, stream)
        self._connections.add(conn)
        self._notify()
        try:
            await conn.run()
        except Exception:
            logger.exception("gRPC connection failed unexpectedly; closed it")
        finally:
            self._connections.discard(conn)
            self._notify()

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listeners`` until `drain` or `aclose`; return when every
        connection is finished. Reports this server through ``task_status`` once listening.
        """
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

    async def drain(self, grace_s: float) -> None:
        """Graceful stop: stop accepting, send GOAWAY on every connection, let open calls
        finish for up to ``grace_s`` seconds, then cancel what is left. Returns when every
        connection is closed.

        Cancellation: if the caller is cancelled, the grace period ends early the same way.
        """
        self._draining = True
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
    max_receive_message_size: int = DEFAULT_MAX_RECEIVE_MESSAGE_SIZE,
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
    initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
    task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handlers`` on ``listeners``; ``nursery.start`` returns the `GrpcServer` (call
    its ``drain``/``aclose`` to stop) once listening. Returns after the server stopped."""
    server = GrpcServer(
        handlers,
        max_receive_message_size=max_receive_message_size,
        max_concurrent_streams=max_concurrent_streams,
        initial_window_size=initial_window_size,
    )
    await server.serve(listeners, task_status=task_status)
