"""Trio gRPC server and client drivers over memory streams and loopback sockets."""

from __future__ import annotations

import importlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_sign.rpc import (
    CallContext,
    GrpcChannel,
    GrpcClientConnection,
    GrpcServer,
    RpcError,
    StatusCode,
    TrailersReceived,
    UnaryHandler,
    open_grpc_channel,
    protobuf_handler,
    serve_grpc,
)
from trio_sign.transport import connect, open_listeners

# See tests/test_proto.py for why the generated module is imported dynamically.
pb: Any = importlib.import_module("proto_min.sign_service_pb2")

SVC = "/trio_sign.v1.SignService/"
PING = SVC + "Ping"


class Recorder:
    """Handlers whose behaviour the request bytes choose, recording what happened."""

    def __init__(self) -> None:
        self.started: list[bytes] = []
        self.cancelled: list[tuple[bytes, float]] = []
        self.finished: list[bytes] = []
        self.running = 0
        self.max_running = 0
        self.contexts: list[CallContext] = []

    async def echo(self, data: bytes, context: CallContext) -> bytes:
        self.started.append(data)
        self.contexts.append(context)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if data.startswith(b"sleep:"):
                await trio.sleep(float(data[6:]))
            elif data == b"error":
                raise RpcError(StatusCode.NOT_FOUND, "no such account: «ü»")
            elif data == b"crash":
                raise ValueError("secret-looking detail that must not leak")
            elif data == b"yield":
                await trio.lowlevel.checkpoint()
            elif data == b"nested-error":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._raise_not_found)
        except trio.Cancelled:
            self.cancelled.append((data, trio.current_time()))
            raise
        finally:
            self.running -= 1
        self.finished.append(data)
        return b"echo:" + data

    async def _raise_not_found(self) -> None:
        raise RpcError(StatusCode.NOT_FOUND, "from a child task")

    def cancelled_since(self, start: float) -> list[tuple[bytes, float]]:
        """Cancelled requests with their virtual cancellation time relative to ``start``."""
        return [(data, round(at - start, 9)) for data, at in self.cancelled]

    def handlers(self) -> dict[str, UnaryHandler]:
        return {PING: self.echo}


@asynccontextmanager
async def running(
    handlers: dict[str, UnaryHandler], **server_kwargs: Any
) -> AsyncIterator[tuple[GrpcServer, GrpcChannel, trio.Nursery]]:
    server = GrpcServer(handlers, **server_kwargs)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        async with open_grpc_channel(client_stream) as channel:
            yield server, channel, nursery
        await server.aclose()


async def test_unary_ok_error_unknown_and_crash() -> None:
    rec = Recorder()
    async with running(rec.handlers()) as (_, channel, _n):
        assert await channel.unary_unary(PING, b"hi", metadata=[("x-id", "7")]) == b"echo:hi"
        assert channel.accepting_calls
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, b"error")
        assert info.value.status == StatusCode.NOT_FOUND
        assert info.value.details == "no such account: «ü»"
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, b"nested-error")
        assert (info.value.status, info.value.details) == (
            StatusCode.NOT_FOUND,
            "from a child task",
        )
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(SVC + "Nope", b"x")
        assert info.value.status == StatusCode.UNIMPLEMENTED
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, b"crash")
        assert info.value.status == StatusCode.UNKNOWN
        assert "secret" not in info.value.details
        # The connection survived all of that.
        assert await channel.unary_unary(PING, b"") == b"echo:"
    assert rec.contexts[0].method == PING
    assert ("x-id", "7") in rec.contexts[0].metadata
    assert rec.contexts[0].deadline == math.inf


async def test_protobuf_handler() -> None:
    async def ping(request: Any, context: CallContext) -> Any:
        return pb.PingResponse(payload=request.payload[::-1])

    handlers = {PING: protobuf_handler(pb.PingRequest.FromString, ping)}
    async with running(handlers) as (_, channel, _n):
        raw = await channel.unary_unary(PING, pb.PingRequest(payload=b"abc").SerializeToString())
        assert pb.PingResponse.FromString(raw).payload == b"cba"
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, b"\xff\xff\xff")
        assert info.value.status == StatusCode.INVALID_ARGUMENT
        assert info.value.details == f"{PING}: request does not parse"


async def test_client_timeout_is_deadline_exceeded(autojump_clock: trio.abc.Clock) -> None:
    rec = Recorder()
    async with running(rec.handlers()) as (_, channel, _n):
        start = trio.current_time()
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, b"sleep:10", timeout=1.5)
        assert info.value.status == StatusCode.DEADLINE_EXCEEDED
        assert trio.current_time() - start == pytest.approx(1.5)
        await trio.testing.wait_all_tasks_blocked()
        assert rec.cancelled_since(start) == [(b"sleep:10", 1.5)]
        assert rec.contexts[0].deadline == pytest.approx(start + 1.5)
        assert await channel.unary_unary(PING, b"ok", timeout=1) == b"echo:ok"


async def test_caller_deadline_becomes_grpc_timeout(autojump_clock: trio.abc.Clock) -> None:
    rec = Recorder()
    async with running(rec.handlers()) as (_, channel, _n):
        start = trio.current_time()
        with trio.move_on_after(2.0):
            await channel.unary_unary(PING, b"sleep:10")
        assert trio.current_time() - start == pytest.approx(2.0)
        assert rec.contexts[0].deadline == pytest.approx(start + 2.0)


async def raw_call(
    stream: trio.abc.Stream,
    messages: list[bytes],
    *,
    timeout_s: float | None = None,
    method: str = PING,
) -> TrailersReceived:
    """One call through the bare client core: no local deadline, any number of messages."""
    core = GrpcClientConnection()
    core.initiate()
    sid = core.start_request(method, timeout_s=timeout_s)
    for m in messages:
        core.send_message(sid, m)
    core.end_stream(sid)
    await stream.send_all(core.data_to_send())
    while True:
        data = await stream.receive_some()
        assert data, "server closed the connection"
        for ev in core.receive_data(bytes(data)):
            if isinstance(ev, TrailersReceived):
                return ev
        out = core.data_to_send()
        if out:
            await stream.send_all(out)


async def test_server_enforces_grpc_timeout(autojump_clock: trio.abc.Clock) -> None:
    rec = Recorder()
    server = GrpcServer(rec.handlers())
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        start = trio.current_time()
        result = await raw_call(client_stream, [b"sleep:10"], timeout_s=2.0)
        assert result.status == StatusCode.DEADLINE_EXCEEDED
        assert trio.current_time() - start == pytest.approx(2.0)
        assert rec.cancelled_since(start) == [(b"sleep:10", 2.0)]
        await server.aclose()


@pytest.mark.parametrize(
    ("messages", "text"),
    [([], "no request message"), ([b"a", b"b"], "more than one request")],
)
async def test_unary_needs_exactly_one_message(messages: list[bytes], text: str) -> None:
    rec = Recorder()
    server = GrpcServer(rec.handlers())
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        result = await raw_call(client_stream, messages)
        assert result.status == StatusCode.INTERNAL
        assert text in result.message
        assert rec.started == []
        await server.aclose()


async def test_client_cancel_resets_stream_and_cancels_handler(
    autojump_clock: trio.abc.Clock,
) -> None:
    rec = Recorder()
    async with running(rec.handlers()) as (server, channel, _n):
        start = trio.current_time()
        with trio.move_on_after(1.0):
            await channel.unary_unary(PING, b"sleep:100")
        await trio.testing.wait_all_tasks_blocked()
        # The RST_STREAM reached the server and cancelled the handler at once.
        assert rec.cancelled_since(start) == [(b"sleep:100", 1.0)]
        assert rec.running == 0
        assert channel.open_calls == 0
        assert server.connection_count == 1
        assert await channel.unary_unary(PING, b"again") == b"echo:again"


async def test_cancel_many_mid_call_leaves_nothing_behind(autojump_clock: trio.abc.Clock) -> None:
    rec = Recorder()
    async with running(rec.handlers()) as (_, channel, _n):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(channel.unary_unary, PING, b"sleep:%d" % (50 + i))
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert len(rec.cancelled) == 20
        assert rec.running == 0
        assert channel.open_calls == 0


async def test_many_concurrent_calls_respect_max_concurrent_streams() -> None:
    rec = Recorder()
    results: dict[int, bytes] = {}

    async def one(i: int, channel: GrpcChannel) -> None:
        results[i] = await channel.unary_unary(PING, b"yield" if i % 2 else b"%d" % i)

    async with (
        running(rec.handlers(), max_concurrent_streams=8) as (_, channel, _n),
        trio.open_nursery() as nursery,
    ):
        for i in range(300):
            nursery.start_soon(one, i, channel)
    assert len(results) == 300
    assert results[4] == b"echo:4"
    assert results[5] == b"echo:yield"
    assert 1 <= rec.max_running <= 8


async def test_large_messages_and_size_limit() -> None:
    rec = Recorder()
    big = b"m" * (3 * 1024 * 1024)
    async with running(rec.handlers(), max_receive_message_size=4 * 1024 * 1024) as (
        _,
        channel,
        _n,
    ):
        assert await channel.unary_unary(PING, big) == b"echo:" + big
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, big + big)
        assert info.value.status == StatusCode.RESOURCE_EXHAUSTED
        assert await channel.unary_unary(PING, b"still ok") == b"echo:still ok"


async def test_small_client_receive_limit() -> None:
    rec = Recorder()
    server = GrpcServer(rec.handlers())
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        async with open_grpc_channel(client_stream, max_receive_message_size=8) as channel:
            with pytest.raises(RpcError) as info:
                await channel.unary_unary(PING, b"long enough")
            assert info.value.status == StatusCode.RESOURCE_EXHAUSTED
            assert await channel.unary_unary(PING, b"s") == b"echo:s"
        await server.aclose()


async def test_drain_lets_open_calls_finish(autojump_clock: trio.abc.Clock) -> None:
    rec = Recorder()
    async with running(rec.handlers()) as (server, channel, nursery):
        start = trio.current_time()
        outcome: dict[str, object] = {}

        async def long_call() -> None:
            outcome["long"] = await channel.unary_unary(PING, b"sleep:3")
            outcome["long_at"] = trio.current_time() - start

        async def drainer() -> None:
            await trio.sleep(1)
            await server.drain(grace_s=10)
            outcome["drained_at"] = trio.current_time() - start

        nursery.start_soon(long_call)
        nursery.start_soon(drainer)
        await trio.sleep(2)
        # After the GOAWAY, new calls are refused at once; the open one carries on.
        assert not channel.accepting_calls
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, b"new")
        assert info.value.status == StatusCode.UNAVAILABLE
        await trio.sleep(5)
        assert outcome == {"long": b"echo:sleep:3", "long_at": 3.0, "drained_at": 3.0}
        assert server.connection_count == 0


async def test_drain_grace_expiry_cancels_calls(autojump_clock: trio.abc.Clock) -> None:
    rec = Recorder()
    async with running(rec.handlers()) as (server, channel, nursery):
        start = trio.current_time()

        async def drainer() -> None:
            await trio.sleep(1)
            await server.drain(grace_s=5)

        nursery.start_soon(drainer)
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, b"sleep:100")
        assert info.value.status == StatusCode.UNAVAILABLE
        assert trio.current_time() - start == pytest.approx(6.0)
        await trio.testing.wait_all_tasks_blocked()
        assert rec.cancelled_since(start) == [(b"sleep:100", 6.0)]
        assert server.connection_count == 0


async def test_aclose_is_idempotent_and_fails_calls(autojump_clock: trio.abc.Clock) -> None:
    rec = Recorder()
    async with running(rec.handlers()) as (server, channel, nursery):

        async def closer() -> None:
            await trio.sleep(1)
            await server.aclose()
            await server.aclose()

        nursery.start_soon(closer)
        with pytest.raises(RpcError) as info:
            await channel.unary_unary(PING, b"sleep:100")
        assert info.value.status == StatusCode.UNAVAILABLE
        assert server.draining
        with pytest.raises(RpcError):
            await channel.unary_unary(PING, b"x")
    await channel.aclose()


async def test_channel_closed_by_peer_fails_calls() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with open_grpc_channel(client_stream) as channel, trio.open_nursery() as nursery:

        async def call() -> None:
            with pytest.raises(RpcError) as info:
                await channel.unary_unary(PING, b"x")
            assert info.value.status == StatusCode.UNAVAILABLE

        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        await server_stream.aclose()


def test_bad_method_table() -> None:
    with pytest.raises(ValueError, match="not of the form"):
        GrpcServer({"Ping": Recorder().echo})


# --- real sockets ------------------------------------------------------------------------------


async def test_serve_grpc_over_loopback_tcp() -> None:
    rec = Recorder()
    listeners = await open_listeners("tcp://127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        server: GrpcServer = await nursery.start(serve_grpc, listeners, rec.handlers())
        stream = await connect(f"tcp://127.0.0.1:{port}")
        async with open_grpc_channel(stream, authority=f"127.0.0.1:{port}") as channel:
            async with trio.open_nursery() as calls:
                for i in range(64):
                    calls.start_soon(channel.unary_unary, PING, b"%d" % i)
            assert await channel.unary_unary(PING, b"last") == b"echo:last"
        with trio.fail_after(5):
            await server.drain(grace_s=1)
    assert len(rec.finished) == 65


async def test_serve_grpc_over_unix_socket(tmp_path: Path) -> None:
    rec = Recorder()
    path = tmp_path / "grpc.sock"
    listeners = await open_listeners(f"unix://{path}")
    async with trio.open_nursery() as nursery:
        server: GrpcServer = await nursery.start(serve_grpc, listeners, rec.handlers())
        stream = await connect(f"unix://{path}")
        async with open_grpc_channel(stream) as channel:
            assert await channel.unary_unary(PING, b"u") == b"echo:u"
        await server.aclose()


async def test_a_broken_connection_does_not_stop_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def bad(data: bytes, context: CallContext) -> bytes:
        return "not bytes"  # type: ignore[return-value]  # the bug under test

    rec = Recorder()
    server = GrpcServer({PING: rec.echo, SVC + "Bad": bad})
    async with trio.open_nursery() as nursery:
        a_client, a_server = trio.testing.memory_stream_pair()
        b_client, b_server = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, a_server)
        nursery.start_soon(server.serve_stream, b_server)
        async with open_grpc_channel(a_client) as a, open_grpc_channel(b_client) as b:
            with pytest.raises(RpcError) as info:
                await a.unary_unary(SVC + "Bad", b"x")
            assert info.value.status == StatusCode.UNAVAILABLE
            assert await b.unary_unary(PING, b"fine") == b"echo:fine"
        await server.aclose()
    assert "gRPC connection failed unexpectedly" in caplog.text
