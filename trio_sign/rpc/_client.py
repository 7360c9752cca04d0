"""Trio gRPC client driver: many concurrent unary calls multiplexed over one connection."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio
from h2.errors import ErrorCodes

from ._events import (
    ConnectionTerminated,
    MessageReceived,
    Metadata,
    ResponseReceived,
    StreamError,
    StreamReset,
    TrailersReceived,
)
from ._io import Writer, receive_bytes
from ._protocol import (
    DEFAULT_INITIAL_WINDOW_SIZE,
    DEFAULT_MAX_RECEIVE_MESSAGE_SIZE,
    GrpcClientConnection,
)
from ._status import RpcError, StatusCode

logger = logging.getLogger("trio_sign.rpc")


class _Call:
    __slots__ = ("done", "extra", "message", "metadata", "response", "status")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: bytes | None = None
        self.extra = 0  # response messages beyond the first
        self.status = StatusCode.UNKNOWN
        self.message = ""
        self.metadata: Metadata = ()

    def finish(self, status: StatusCode, message: str, metadata: Metadata = ()) -> None:
        if not self.done.is_set():
            self.status, self.message, self.metadata = status, message, metadata
            self.done.set()


class GrpcChannel:
    """A gRPC client connection. Open it with `open_grpc_channel`.

    Calls are multiplexed over the one HTTP/2 connection; at most the server's
    MAX_CONCURRENT_STREAMS run at once, the rest wait for a free stream.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        authority: str = "localhost",
        max_receive_message_size: int = DEFAULT_MAX_RECEIVE_MESSAGE_SIZE,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
    ) -> None:
        self._stream = stream
        self._core = GrpcClientConnection(
            authority=authority,
            max_receive_message_size=max_receive_message_size,
            initial_window_size=initial_window_size,
        )
        self._writer = Writer(self._core, stream)
        self._calls: dict[int, _Call] = {}
        self._capacity = trio.Event()
        self._closed_reason: str | None = None
        self._scope = trio.CancelScope()

    @property
    def accepting_calls(self) -> bool:
        """False once the connection is closed or the server sent GOAWAY: new calls fail
        UNAVAILABLE, so open a new channel (calls already in flight may still complete)."""
        return self._closed_reason is None and not self._core.going_away

    @property
    def open_calls(self) -> int:
        """Calls in flight on this connection."""
        return len(self._calls)

    async def unary_unary(
        self,
        method: str,
        request: bytes,
        *,
        # grpc's API shape: the deadline has to travel as grpc-timeout, so the call takes it
        # (the caller's own Trio deadline is honoured too).
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Iterable[tuple[str, str | bytes]] | None = None,
    ) -> bytes:
        """Call a unary-unary method and return the response bytes.

        The call's deadline is the sooner of ``timeout`` (seconds) and the caller's own Trio
        deadline; it is sent as ``grpc-timeout``.

        Raises:
            RpcError: the call ended with a non-OK status (DEADLINE_EXCEEDED if ``timeout``
                expired locally; UNAVAILABLE if the connection is closed or going away).
            GrpcProtocolError: ``metadata`` breaks gRPC's key/value rules.

        Cancellation: the stream is reset (RST_STREAM CANCEL), so the server cancels its
        handler; the connection stays usable.
        """
        core = self._core
        deadline = trio.current_effective_deadline()
        if timeout is not None:
            deadline = min(deadline, trio.current_time() + timeout)
        with trio.CancelScope(deadline=deadline) as scope:
            while True:
                if self._closed_reason is not None or core.going_away:
                    raise RpcError(
                        StatusCode.UNAVAILABLE, self._closed_reason or "server is going away"
                    )
                if core.can_open_stream:
                    break
                await self._capacity.wait()
            timeout_s = None if math.isinf(deadline) else deadline - trio.current_time()
            stream_id = core.start_request(method, timeout_s=timeout_s, metadata=metadata or ())
            call = _Call()
            self._calls[stream_id] = call
            try:
                core.send_message(stream_id, request, end_stream=True)
                self._writer.kick()
                await call.done.wait()
            finally:
                del self._calls[stream_id]
                if not call.done.is_set():
                    core.reset(stream_id, ErrorCodes.CANCEL)
                    self._writer.kick()
                self._capacity_changed()
        if scope.cancelled_caught:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded (client side)")
        if call.status != StatusCode.OK:
            raise RpcError(call.status, call.message)
        if call.response is None or call.extra:
            raise RpcError(
                StatusCode.INTERNAL,
                f"unary call got {call.extra + (call.response is not None)} response messages",
            )
        return call.response

    async def aclose(self) -> None:
        """Close the connection; calls in flight fail UNAVAILABLE. Idempotent."""
        self._fail_all("channel closed")
        self._scope.cancel()

    def _capacity_changed(self) -> None:
        self._capacity.set()
        self._capacity = trio.Event()

    def _fail_all(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for call in self._calls.values():
            call.finish(StatusCode.UNAVAILABLE, reason)
        self._capacity_changed()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._core.initiate()
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer.run)
                    self._writer.kick()
                    task_status.started()
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
        finally:
            self._fail_all("connection closed")
            await trio.aclose_forcefully(self._stream)

    async def _read_loop(self) -> None:
        core = self._core
        calls = self._calls
        while True:
            data = await receive_bytes(self._stream)
            if not data:
                return
            for ev in core.receive_data(data):
                if isinstance(ev, MessageReceived):
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        if call.response is None:
                            call.response = ev.data
                        else:
                            call.extra += 1
                elif isinstance(ev, TrailersReceived):
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        call.finish(ev.status, ev.message, ev.metadata)
                elif isinstance(ev, StreamReset):
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        call.finish(ev.status, f"stream reset by server (code {ev.error_code})")
                elif isinstance(ev, StreamError):
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        call.finish(ev.status, ev.message)
                elif isinstance(ev, ConnectionTerminated):
                    logger.debug(
                        "gRPC server sent GOAWAY: code %d, last stream %d",
                        ev.error_code,
                        ev.last_stream_id,
                    )
                elif isinstance(ev, ResponseReceived):
                    pass
            self._writer.kick()
            self._capacity_changed()
            if core.terminated:
                return


@asynccontextmanager
async def open_grpc_channel(
    stream: trio.abc.Stream,
    *,
    authority: str = "localhost",
    max_receive_message_size: int = DEFAULT_MAX_RECEIVE_MESSAGE_SIZE,
    initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
) -> AsyncIterator[GrpcChannel]:
    """Run a `GrpcChannel` over a connected stream for the duration of the block.

    On exit the connection is closed (the stream too) and calls still in flight fail
    UNAVAILABLE.
    """
    channel = GrpcChannel(
        stream,
        authority=authority,
        max_receive_message_size=max_receive_message_size,
        initial_window_size=initial_window_size,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(channel._run)
        try:
            yield channel
        finally:
            await channel.aclose()
