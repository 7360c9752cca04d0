"""Interop with stock grpcio, both ways, over loopback TCP.

grpcio is a test-only dependency and blocking: its calls run in worker threads
(``trio.to_thread.run_sync``); every grpcio channel and server is closed before the test ends.
"""

from __future__ import annotations

import concurrent.futures
import importlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_sign.rpc import (
    CallContext,
    GrpcServer,
    RpcError,
    StatusCode,
    open_grpc_channel,
    protobuf_handler,
    serve_grpc,
)
from trio_sign.transport import connect, open_listeners

grpc: Any = pytest.importorskip("grpc", reason="grpcio is a test dependency")
# See tests/test_proto.py for why the generated module is imported dynamically.
pb: Any = importlib.import_module("proto_min.sign_service_pb2")

SERVICE = "trio_sign.v1.SignService"
PING = f"/{SERVICE}/Ping"
MAX_RECEIVE = 64 * 1024


async def ping(request: Any, context: CallContext) -> Any:
    payload = request.payload
    if payload.startswith(b"sleep:"):
        await trio.sleep(float(payload[6:]))
    elif payload == b"error":
        raise RpcError(StatusCode.FAILED_PRECONDITION, "Sitzung «42» schon benutzt: 100% sicher ✓")
    elif payload == b"metadata":
        trace = dict(context.metadata)["x-trace"]
        assert isinstance(trace, str)
        return pb.PingResponse(payload=trace.encode())
    return pb.PingResponse(payload=payload)


@asynccontextmanager
async def trio_server() -> AsyncIterator[str]:
    listeners = await open_listeners("tcp://127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        server: GrpcServer = await nursery.start(_serve, listeners)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            await server.aclose()


async def _serve(listeners: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await serve_grpc(
        listeners,
        {PING: protobuf_handler(pb.PingRequest.FromString, ping)},
        max_receive_message_size=MAX_RECEIVE,
        task_status=task_status,
    )


@asynccontextmanager
async def grpcio_channel(target: str) -> AsyncIterator[Any]:
    channel = grpc.insecure_channel(target)
    try:
        yield channel
    finally:
        await trio.to_thread.run_sync(channel.close)


def ping_stub(channel: Any, method: str = PING) -> Any:
    return channel.unary_unary(
        method,
        request_serializer=pb.PingRequest.SerializeToString,
        response_deserializer=pb.PingResponse.FromString,
    )


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


async def grpcio_error(fn: Callable[[], Any]) -> Any:
    def run() -> Any:
        try:
            fn()
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("the call succeeded")

    return await trio.to_thread.run_sync(run)


# --- grpcio client -> our Trio server -------------------------------------------------------


async def test_grpcio_ping_echo_and_metadata() -> None:
    async with trio_server() as target, grpcio_channel(target) as channel:
        stub = ping_stub(channel)
        response = await in_thread(lambda: stub(pb.PingRequest(payload=b"hello"), timeout=10))
        assert response.payload == b"hello"
        response = await in_thread(
            lambda: stub(
                pb.PingRequest(payload=b"metadata"), metadata=[("x-trace", "t-1")], timeout=10
            )
        )
        assert response.payload == b"t-1"
        empty = await in_thread(lambda: stub(pb.PingRequest(), timeout=10))
        assert empty.payload == b""


async def test_grpcio_deadline_expires() -> None:
    async with trio_server() as target, grpcio_channel(target) as channel:
        stub = ping_stub(channel)
        exc = await grpcio_error(lambda: stub(pb.PingRequest(payload=b"sleep:30"), timeout=0.3))
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The connection is still good.
        response = await in_thread(lambda: stub(pb.PingRequest(payload=b"ok"), timeout=10))
        assert response.payload == b"ok"


async def test_grpcio_oversized_message() -> None:
    async with trio_server() as target, grpcio_channel(target) as channel:
        stub = ping_stub(channel)
        big = pb.PingRequest(payload=b"x" * (MAX_RECEIVE + 1))
        exc = await grpcio_error(lambda: stub(big, timeout=10))
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in exc.details()
        response = await in_thread(lambda: stub(pb.PingRequest(payload=b"ok"), timeout=10))
        assert response.payload == b"ok"


async def test_grpcio_unknown_method() -> None:
    async with trio_server() as target, grpcio_channel(target) as channel:
        stub = ping_stub(channel, f"/{SERVICE}/NoSuchMethod")
        exc = await grpcio_error(lambda: stub(pb.PingRequest(payload=b"x"), timeout=10))
        assert exc.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_grpcio_non_ascii_error_message() -> None:
    async with trio_server() as target, grpcio_channel(target) as channel:
        stub = ping_stub(channel)
        exc = await grpcio_error(lambda: stub(pb.PingRequest(payload=b"error"), timeout=10))
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert exc.details() == "Sitzung «42» schon benutzt: 100% sicher ✓"


async def test_grpcio_100_concurrent_calls_on_one_channel() -> None:
    async with trio_server() as target, grpcio_channel(target) as channel:
        stub = ping_stub(channel)

        def many() -> list[bytes]:
            futures = [
                stub.future(pb.PingRequest(payload=b"sleep:0.05" if i % 3 else b"%d" % i))
                for i in range(100)
            ]
            return [f.result(timeout=30).payload for f in futures]

        payloads = await in_thread(many)
        assert len(payloads) == 100
        assert payloads[0] == b"0"
        assert payloads[1] == b"sleep:0.05"


# --- our client -> grpcio server ------------------------------------------------------------


@asynccontextmanager
async def grpcio_server() -> AsyncIterator[str]:
    def ping_impl(request: Any, context: Any) -> Any:
        if request.payload == b"error":
            context.abort(grpc.StatusCode.NOT_FOUND, "kein Konto «7»")
        return pb.PingResponse(payload=request.payload[::-1])

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Ping": grpc.unary_unary_rpc_method_handler(
                ping_impl,
                request_deserializer=pb.PingRequest.FromString,
                response_serializer=pb.PingResponse.SerializeToString,
            )
        },
    )
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(pool)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await trio.to_thread.run_sync(lambda: server.stop(None).wait(10))
        await trio.to_thread.run_sync(pool.shutdown)


async def test_our_client_against_grpcio_server() -> None:
    async with grpcio_server() as target:
        stream = await connect(f"tcp://{target}")
        async with open_grpc_channel(stream, authority=target) as channel:
            raw = await channel.unary_unary(
                PING, pb.PingRequest(payload=b"abc").SerializeToString(), timeout=10
            )
            assert pb.PingResponse.FromString(raw).payload == b"cba"
            with pytest.raises(RpcError) as info:
                await channel.unary_unary(
                    PING, pb.PingRequest(payload=b"error").SerializeToString(), timeout=10
                )
            assert info.value.status == StatusCode.NOT_FOUND
            assert info.value.details == "kein Konto «7»"
            with pytest.raises(RpcError) as info:
                await channel.unary_unary(f"/{SERVICE}/Nope", b"", timeout=10)
            assert info.value.status == StatusCode.UNIMPLEMENTED
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(
                        channel.unary_unary,
                        PING,
                        pb.PingRequest(payload=b"%d" % i).SerializeToString(),
                    )


async def test_grpcio_call_survives_graceful_drain() -> None:
    started = trio.Event()

    async def slow(data: bytes, context: CallContext) -> bytes:
        started.set()
        await trio.sleep(0.3)
        return data

    listeners = await open_listeners("tcp://127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        server: GrpcServer = await nursery.start(serve_grpc, listeners, {PING: slow})
        async with grpcio_channel(f"127.0.0.1:{port}") as channel:
            stub = ping_stub(channel)
            result: dict[str, Any] = {}

            async def slow_call() -> None:
                result["slow"] = await in_thread(
                    lambda: stub(pb.PingRequest(payload=b"in flight"), timeout=10)
                )

            async with trio.open_nursery() as calls:
                calls.start_soon(slow_call)
                with trio.fail_after(10):
                    await started.wait()  # the call is in the handler: now drain
                    await server.drain(grace_s=5)
            # The call in flight finished normally; the server is gone afterwards.
            assert result["slow"].payload == b"in flight"
            exc = await grpcio_error(lambda: stub(pb.PingRequest(payload=b"late"), timeout=2))
            assert exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
