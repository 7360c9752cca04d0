"""The SSE Trio driver (reconnects, back-off, keepalive, status, cancellation) and the DESIGN §5
event handler. Memory streams and virtual time everywhere, one loopback TCP test."""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from trio_sign.enclave import PoolError, PoolErrorKind, SessionPool, SignService
from trio_sign.sse import (
    MIN_RETRY_S,
    MessageEvent,
    SseClientStatus,
    SseControlled,
    SseEventHandler,
    run_sse_client,
)
from trio_sign.sse import _handler as sse_handler
from trio_sign.transport import TransportError, connect, open_listeners

from .enclave_helpers import make_accounts

URL = "http://gateway.internal/v1/enclaves/node-1/events"
OK_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
OK_HEAD_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class MaxJitter(random.Random):
    """Always the top of the jitter window, so reconnect times are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Gateway:
    """The far end of the injected ``connect``: each call makes a memory stream pair and hands
    the server half to the test."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](100)
        self.attempts: list[float] = []
        self.fail: list[BaseException | None] = []  # per attempt: raise this (None: accept)
        self.hang = False
        self.lockstep = False  # sends block until the other side reads

    async def connect(self) -> trio.abc.Stream:
        self.attempts.append(trio.current_time())
        if self.fail:
            error = self.fail.pop(0)
            if error is not None:
                raise error
        if self.hang:
            await trio.sleep_forever()
        pair = (
            trio.testing.lockstep_stream_pair if self.lockstep else trio.testing.memory_stream_pair
        )
        client: trio.abc.Stream
        server: trio.abc.Stream
        client, server = pair()
        await self._send.send(server)
        return client

    async def accept(self) -> tuple[trio.abc.Stream, bytes]:
        """The next connection and its request head."""
        server = await self._receive.receive()
        request = b""
        while b"\r\n\r\n" not in request:
            data = await server.receive_some()
            assert data
            request += data
        return server, request


def request_for(last_event_id: str | None = None) -> bytes:
    extra = f"Last-Event-ID: {last_event_id}\r\n".encode() if last_event_id else b""
    return (
        b"GET /v1/enclaves/node-1/events HTTP/1.1\r\nHost: gateway.internal\r\n"
        b"Accept: text/event-stream\r\nCache-Control: no-cache\r\n" + extra + b"\r\n"
    )


async def start_client(
    nursery: trio.Nursery,
    gateway: Gateway,
    on_event: Callable[[MessageEvent], Awaitable[None] | None],
    **kwargs: object,
) -> SseClientStatus:
    kwargs.setdefault("rng", MaxJitter())
    status: SseClientStatus = await nursery.start(
        functools.partial(
            run_sse_client,
            URL,
            connect=gateway.connect,
            on_event=on_event,
            **kwargs,  # type: ignore[arg-type]
        )
    )
    return status


async def test_started_at_once_then_events_in_order(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    events: list[MessageEvent] = []
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, events.append)
        assert trio.current_time() == 0
        assert (status.connected, status.connects, status.last_event_at) == (False, 0, None)
        await trio.sleep(5)  # the gateway is slow to answer: readiness never waited for it
        server, request = await gateway.accept()
        assert request == request_for()
        stream = b"data: one\n\nevent: freeze\nid: 7\ndata: {}\n\n: keepalive\n\ndata: three\n\n"
        await server.send_all(OK_HEAD + chunk(stream[:9]) + chunk(stream[9:30]))
        await trio.testing.wait_all_tasks_blocked()
        assert status.connected
        assert status.connects == 1
        assert [e.data for e in events] == ["one"]
        await trio.sleep(1)
        await server.send_all(chunk(stream[30:]))
        await trio.testing.wait_all_tasks_blocked()
        assert events == [
            MessageEvent("message", "one", ""),
            MessageEvent("freeze", "{}", "7"),
            MessageEvent("message", "three", "7"),
        ]
        assert status.last_event_at == 6.0
        assert status.last_event_id == "7"
        assert (status.reconnects, status.last_error) == (0, "")
        nursery.cancel_scope.cancel()


async def test_async_on_event_is_awaited(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    seen: list[tuple[str, float]] = []

    async def on_event(event: MessageEvent) -> None:
        await trio.sleep(2)
        seen.append((event.data, trio.current_time()))

    async with trio.open_nursery() as nursery:
        await start_client(nursery, gateway, on_event)
        server, _ = await gateway.accept()
        await server.send_all(OK_HEAD_CLOSE + b"data: a\n\ndata: b\n\n")
        await trio.sleep(10)
        assert seen == [("a", 2.0), ("b", 4.0)]
        nursery.cancel_scope.cancel()


async def test_reconnect_sends_last_event_id_after_backoff(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    events: list[MessageEvent] = []
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, events.append, backoff_initial_s=1.5)
        server, _ = await gateway.accept()
        await server.send_all(OK_HEAD + chunk(b"id: 5\ndata: x\n\nid: 6\n\n"))
        await trio.sleep(3)
        await server.send_all(b"0\r\n\r\n")  # the gateway ends the stream cleanly at t=3
        server, request = await gateway.accept()
        assert request == request_for("6")  # the id-only block counts too
        assert gateway.attempts == [0.0, 4.5]  # a healthy connection: back-off starts over
        assert status.reconnects == 1
        assert status.last_error == "the gateway ended the stream"
        assert status.connected is False  # no response on the new connection yet
        await server.send_all(OK_HEAD_CLOSE)
        await trio.testing.wait_all_tasks_blocked()
        assert (status.connected, status.connects) == (True, 2)
        await server.aclose()  # EOF of a close-delimited body: same thing
        await gateway.accept()
        assert gateway.attempts == [0.0, 4.5, 6.0]
        nursery.cancel_scope.cancel()
    assert [e.data for e in events] == ["x"]


async def test_backoff_doubles_up_to_the_ceiling(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    gateway.fail = [OSError("refused")] * 7 + [TransportError("no relay")]
    async with trio.open_nursery() as nursery:
        status = await start_client(
            nursery, gateway, lambda e: None, backoff_initial_s=1.0, backoff_max_s=10.0
        )
        await gateway.accept()
        # delays 1, 2, 4, 8, 10, 10, 10, 10
        assert gateway.attempts == [0, 1, 3, 7, 15, 25, 35, 45, 55]
        assert status.reconnects == 8
        assert status.last_error == "no relay"
        nursery.cancel_scope.cancel()


async def test_full_jitter_stays_in_its_window(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    gateway.fail = [OSError("refused")] * 40
    async with trio.open_nursery() as nursery:
        await start_client(
            nursery,
            gateway,
            lambda e: None,
            rng=random.Random(1234),
            backoff_initial_s=0.5,
            backoff_max_s=8.0,
        )
        await gateway.accept()
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(gateway.attempts, gateway.attempts[1:], strict=False)]
    assert len(gaps) == 40
    for n, gap in enumerate(gaps):
        assert 0 <= gap <= min(8.0, 0.5 * 2**n)
    assert len(set(gaps)) == 40  # jittered, not a fixed schedule
    assert max(gaps[10:]) > 4.0  # and the ceiling is reached, not stuck at the start


async def test_backoff_resets_after_a_healthy_connection(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    gateway.fail = [OSError("refused")] * 3
    async with trio.open_nursery() as nursery:
        await start_client(nursery, gateway, lambda e: None)
        server, _ = await gateway.accept()
        assert gateway.attempts == [0, 1, 3, 7]
        await server.send_all(OK_HEAD_CLOSE)
        await server.aclose()
        await gateway.accept()
        assert gateway.attempts == [0, 1, 3, 7, 8]
        nursery.cancel_scope.cancel()


async def test_retry_field_is_the_base_delay(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    async with trio.open_nursery() as nursery:
        await start_client(nursery, gateway, lambda e: None, backoff_max_s=60.0)
        server, _ = await gateway.accept()
        await server.send_all(OK_HEAD_CLOSE + b"retry: 5000\n")
        await server.aclose()
        server, _ = await gateway.accept()
        assert gateway.attempts == [0, 5]
        await server.send_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        server, _ = await gateway.accept()
        assert gateway.attempts == [0, 5, 15]  # a failure doubles the server's base
        await server.send_all(OK_HEAD_CLOSE + b"retry: 0\n")  # clamped to MIN_RETRY_S
        await server.aclose()
        server, _ = await gateway.accept()
        assert gateway.attempts == [0, 5, 15, 15 + MIN_RETRY_S]
        await server.send_all(OK_HEAD_CLOSE + b"retry: 999999999\n")  # clamped to backoff_max_s
        await server.aclose()
        await gateway.accept()
        assert gateway.attempts[-1] == pytest.approx(15 + MIN_RETRY_S + 60)
        nursery.cancel_scope.cancel()


async def test_silent_stream_is_reconnected(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, lambda e: None, keepalive_timeout_s=15.0)
        server, _ = await gateway.accept()
        await server.send_all(OK_HEAD_CLOSE)
        for _ in range(10):  # comments are traffic: 100 s of them keep the stream alive
            await trio.sleep(10)
            await server.send_all(b": ping\n")
        assert gateway.attempts == [0]
        assert await server.receive_some() == b""  # silent from t=100: closed at t=115
        assert trio.current_time() == 115
        await trio.testing.wait_all_tasks_blocked()
        assert status.connected is False
        assert status.last_error == "no bytes for 15.0 s (keepalive_timeout_s)"
        await gateway.accept()
        assert gateway.attempts == [0, 116]
        nursery.cancel_scope.cancel()


async def test_silent_before_the_response_head(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    async with trio.open_nursery() as nursery:
        await start_client(nursery, gateway, lambda e: None, keepalive_timeout_s=15.0)
        server, _ = await gateway.accept()
        await server.send_all(b"HTTP/1.1 200 OK\r\n")  # and then nothing
        assert await server.receive_some() == b""
        await gateway.accept()
        assert gateway.attempts == [0, 16]  # not healthy, first failure: 1 s
        nursery.cancel_scope.cancel()


async def test_hanging_connect_times_out(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    gateway.hang = True
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, lambda e: None, keepalive_timeout_s=15.0)
        await trio.sleep(40)
        assert gateway.attempts == [0, 16, 33]
        assert "connect took longer than 15.0 s" in status.last_error
        nursery.cancel_scope.cancel()


async def test_request_that_cannot_be_sent_times_out(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    gateway.lockstep = True
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, lambda e: None, keepalive_timeout_s=15.0)
        await gateway._receive.receive()  # accepted, but the request is never read
        await gateway._receive.receive()
        assert gateway.attempts == [0, 16]
        assert "sending the request took longer than 15.0 s" in status.last_error
        nursery.cancel_scope.cancel()


async def test_broken_stream_is_a_disconnect(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    gateway.lockstep = True
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, lambda e: None)
        server = await gateway._receive.receive()
        await server.aclose()  # the client's request write fails: BrokenResourceError
        await gateway._receive.receive()
        assert gateway.attempts == [0, 1]
        assert status.last_error == "BrokenResourceError"
        nursery.cancel_scope.cancel()


class ResettingStream(trio.abc.Stream):
    """Accepts the request, then the connection is reset."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        raise ConnectionResetError("connection reset by peer")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_connection_reset_is_a_disconnect(autojump_clock: trio.abc.Clock) -> None:
    attempts: list[float] = []

    async def connect_resetting() -> trio.abc.Stream:
        attempts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        return ResettingStream()

    async with trio.open_nursery() as nursery:
        status: SseClientStatus = await nursery.start(
            functools.partial(
                run_sse_client,
                URL,
                connect=connect_resetting,
                on_event=lambda e: None,
                rng=MaxJitter(),
            )
        )
        await trio.sleep(4)
        assert attempts == [0, 1, 3]
        assert status.last_error == "connection reset by peer"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "HTTP 503"),
        (b"HTTP/1.1 302 Found\r\nLocation: http://x/\r\n\r\n", "HTTP 302"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>", "'text/html'"),
        (b"HTTP/1.1 200 OK\r\n\r\ndata: a\n\n", "Content-Type ''"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
        (OK_HEAD + b"zz\r\n", "chunk-size"),
    ],
)
async def test_refused_responses_are_retried(
    autojump_clock: trio.abc.Clock, response: bytes, error: str
) -> None:
    gateway = Gateway()
    events: list[MessageEvent] = []
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, events.append)
        for _ in range(3):
            server, _ = await gateway.accept()
            await server.send_all(response)
            assert await server.receive_some() == b""  # the client hung up
        assert error in status.last_error
        assert gateway.attempts == [0, 1, 3]
        assert (status.connects, events) == (0, [])
        nursery.cancel_scope.cancel()


async def test_204_stops_reconnecting(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, lambda e: None)
        server, _ = await gateway.accept()
        await server.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
    # the nursery closed on its own: run_sse_client returned
    assert status.stopped
    assert "HTTP 204" in status.last_error
    assert gateway.attempts == [0]
    assert await server.receive_some() == b""


async def test_oversized_line_reconnects_without_losing_events(
    autojump_clock: trio.abc.Clock,
) -> None:
    gateway = Gateway()
    events: list[MessageEvent] = []
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, events.append, max_line_length=16)
        server, _ = await gateway.accept()
        await server.send_all(OK_HEAD_CLOSE + b"id: 1\ndata: a\n\n")
        await trio.testing.wait_all_tasks_blocked()
        await server.send_all(b"id: 2\ndata: b\n\n" + b"x" * 17)
        server, request = await gateway.accept()
        assert request == request_for("1")  # event 2 was not delivered: ask for it again
        assert "max_line_length" in status.last_error
        assert [e.data for e in events] == ["a"]
        nursery.cancel_scope.cancel()


async def test_unsendable_last_event_id_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    async with trio.open_nursery() as nursery:
        await start_client(nursery, gateway, lambda e: None)
        server, _ = await gateway.accept()
        await server.send_all(OK_HEAD_CLOSE + b"id: a\x01b\n\n")
        await server.aclose()
        _, request = await gateway.accept()
        assert request == request_for()
        nursery.cancel_scope.cancel()


async def test_bad_arguments_raise_before_started() -> None:
    gateway = Gateway()
    with pytest.raises(TransportError, match="scheme"):
        await run_sse_client("ftp://gw/x", connect=gateway.connect, on_event=lambda e: None)
    with pytest.raises(ValueError, match="control"):
        await run_sse_client(
            URL, connect=gateway.connect, on_event=lambda e: None, last_event_id="a\nb"
        )
    for bad in (
        {"backoff_initial_s": 0.0},
        {"backoff_initial_s": 5.0, "backoff_max_s": 1.0},
        {"keepalive_timeout_s": 0.0},
    ):
        with pytest.raises(ValueError, match="backoff_initial_s"):
            await run_sse_client(
                URL,
                connect=gateway.connect,
                on_event=lambda e: None,
                **bad,  # type: ignore[arg-type]
            )
    assert gateway.attempts == []


async def test_initial_last_event_id_is_sent(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    async with trio.open_nursery() as nursery:
        status = await start_client(nursery, gateway, lambda e: None, last_event_id="99")
        assert status.last_event_id == "99"
        _, request = await gateway.accept()
        assert request == request_for("99")
        nursery.cancel_scope.cancel()


async def test_on_event_exception_propagates(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()

    def on_event(event: MessageEvent) -> None:
        raise RuntimeError("handler bug")

    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="handler bug")):
        async with trio.open_nursery() as nursery:
            await start_client(nursery, gateway, on_event)
            server, _ = await gateway.accept()
            await server.send_all(OK_HEAD_CLOSE + b"data: a\n\n")
    assert await server.receive_some() == b""  # the stream was closed on the way out


async def test_on_event_errors_are_never_taken_for_disconnects(
    autojump_clock: trio.abc.Clock,
) -> None:
    gateway = Gateway()

    def on_event(event: MessageEvent) -> None:
        raise OSError("a bug that looks like I/O")

    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="looks like I/O")):
        async with trio.open_nursery() as nursery:
            await start_client(nursery, gateway, on_event)
            server, _ = await gateway.accept()
            await server.send_all(OK_HEAD_CLOSE + b"data: a\n\n")
    assert gateway.attempts == [0]


@pytest.mark.parametrize("phase", ["connect", "request", "head", "body", "on_event", "backoff"])
async def test_cancellation_closes_the_stream_and_leaves_nothing(
    autojump_clock: trio.abc.Clock, phase: str
) -> None:
    gateway = Gateway()
    gateway.hang = phase == "connect"

    async def on_event(event: MessageEvent) -> None:
        await trio.sleep_forever()

    server: trio.abc.Stream | None = None
    with trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            status = await start_client(nursery, gateway, on_event, keepalive_timeout_s=100.0)
            if phase != "connect":
                if phase == "request":
                    server = await gateway._receive.receive()  # never read the request
                else:
                    server, _ = await gateway.accept()
                if phase in ("body", "on_event"):
                    await server.send_all(OK_HEAD + chunk(b"data: half"))
                if phase == "on_event":
                    await server.send_all(chunk(b"\n\n"))
                if phase == "backoff":
                    await server.aclose()
                    server = None
            await trio.sleep(10)
            assert len(nursery.child_tasks) == 1
            outer.cancel()
    assert len(nursery.child_tasks) == 0
    assert trio.current_time() == 10  # cancellation was immediate
    assert status.connected is False
    if server is not None:
        while True:  # whatever the client sent, then EOF: it closed its side
            if await server.receive_some() == b"":
                break


async def test_loopback_tcp() -> None:
    """The real transport: the client speaks to a TCP server through ``transport.connect``."""
    listeners = await open_listeners("tcp://127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    requests: list[bytes] = []
    events: list[MessageEvent] = []

    async def serve(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some()
        requests.append(request)
        if len(requests) == 1:
            body = chunk(b': hi\n\nid: 1\nevent: probe\ndata: {"nonce":') + chunk(b'"n1"}\n\n')
            await stream.send_all(OK_HEAD + body + b"0\r\n\r\n")
        else:
            await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, listeners)
            # returns by itself: the second connection gets 204
            await run_sse_client(
                f"http://127.0.0.1:{port}/v1/enclaves/n/events",
                connect=functools.partial(connect, f"tcp://127.0.0.1:{port}"),
                on_event=events.append,
                backoff_initial_s=0.01,
            )
            nursery.cancel_scope.cancel()
    assert events == [MessageEvent("probe", '{"nonce":"n1"}', "1")]
    assert b"Last-Event-ID: 1\r\n" in requests[1]
    assert requests[0].startswith(b"GET /v1/enclaves/n/events HTTP/1.1\r\nHost: 127.0.0.1:")


def test_public_api() -> None:
    import trio_sign.sse as sse

    assert len(sse.__all__) == len(set(sse.__all__))
    public = {name for name in vars(sse) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(sse, name)).__name__ == "module"}
    assert public - modules == set(sse.__all__)


# -- the DESIGN §5 handler ---------------------------------------------------------------------


class FakePool:
    def __init__(self) -> None:
        self.sessions = {"s1", "s2"}
        self.aborted: list[str] = []
        self.refuse = False

    def abort(self, session_id: str) -> None:
        if self.refuse:
            raise PoolError(PoolErrorKind.UNAVAILABLE, "pool closed")
        if session_id not in self.sessions:
            raise PoolError(PoolErrorKind.NOT_FOUND, "unknown or expired session_id")
        self.sessions.discard(session_id)
        self.aborted.append(session_id)


class FakeEnclave:
    def __init__(self) -> None:
        self.frozen: set[str] = set()
        self.last_sse_probe = ""
        self.draining = 0
        self._pool = FakePool()

    @property
    def pool(self) -> FakePool:
        return self._pool

    def start_draining(self, *, reversible: bool = False) -> None:
        assert reversible  # the gateway's drain can be undone
        self.draining += 1

    def stop_draining(self) -> bool:
        self.draining -= 1
        return True


def _sign_service_is_controlled(service: SignService) -> SseControlled:
    return service  # mypy checks that the real service satisfies the protocol


def ev(type: str, payload: object) -> MessageEvent:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return MessageEvent(type, data, "id-1")


def test_handler_applies_each_event(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "trio_sign.sse")
    enclave = FakeEnclave()
    handle = SseEventHandler(enclave)
    handle(ev("probe", {"nonce": "secret-ish-nonce-42"}))
    assert enclave.last_sse_probe == "secret-ish-nonce-42"
    handle(ev("freeze", {"account_id": "acct-1"}))
    handle(ev("freeze", {"account_id": "acct-2", "reason": "extra keys are ignored"}))
    handle(ev("unfreeze", {"account_id": "acct-1"}))
    handle(ev("unfreeze", {"account_id": "never-frozen"}))
    assert enclave.frozen == {"acct-2"}
    handle(ev("abort", {"session_id": "s1"}))
    handle(ev("abort", {"session_id": "unknown"}))  # NOT_FOUND is normal
    assert enclave.pool.aborted == ["s1"]
    handle(ev("drain", {}))
    assert enclave.draining == 1
    handle(ev("undrain", {}))
    assert enclave.draining == 0
    assert "secret-ish-nonce-42" not in caplog.text


@pytest.mark.parametrize(
    "event",
    [
        ev("probe", "not json"),
        ev("probe", "[1, 2]"),
        ev("probe", {}),
        ev("probe", {"nonce": 42}),
        ev("probe", {"nonce": ""}),
        ev("probe", {"nonce": "x" * 1025}),
        ev("freeze", {"account_id": None}),
        ev("unfreeze", {"account": "acct-2"}),
        ev("abort", {"session_id": ["s1"]}),
        ev("drain", "null"),
        ev("drain", '"drain"'),
        ev("drain", "{"),
        ev("probe", "\ud800"),
    ],
)
def test_handler_ignores_bad_payloads(
    event: MessageEvent, caplog: pytest.LogCaptureFixture
) -> None:
    enclave = FakeEnclave()
    enclave.frozen.add("acct-2")
    SseEventHandler(enclave)(event)
    assert (enclave.last_sse_probe, enclave.frozen, enclave.draining) == ("", {"acct-2"}, 0)
    assert enclave.pool.aborted == []
    assert any(r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("type", ["message", "Probe", "rotate", ""])
def test_handler_ignores_unknown_events(type: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trio_sign.sse")
    enclave = FakeEnclave()
    SseEventHandler(enclave)(MessageEvent(type, '{"nonce": "n"}', "3"))
    assert enclave.last_sse_probe == ""
    assert "unknown event type" in caplog.text


def test_handler_logs_other_abort_errors(caplog: pytest.LogCaptureFixture) -> None:
    enclave = FakeEnclave()
    enclave.pool.refuse = True
    SseEventHandler(enclave)(ev("abort", {"session_id": "s1"}))
    assert "refused: pool closed" in caplog.text


def test_abort_of_an_overlong_session_id_is_not_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real pool refuses ids over 128 bytes as INVALID_ARGUMENT: no such session can
    exist, so the abort is as ignorable as one of an unknown session (debug, not warning)."""
    caplog.set_level(logging.DEBUG, "trio_sign.sse")
    store, _ = make_accounts(1)
    service = SignService(store, SessionPool(store.get))
    handle = SseEventHandler(service)
    for i in range(100):
        handle(ev("abort", {"session_id": f"{i}" + "s" * 500}))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "invalid_argument" in caplog.text
    store.close()


class FakeEnclaveWithAccounts(FakeEnclave):
    """A target that can say which accounts exist, as the real SignService can."""

    def __init__(self, accounts: set[str]) -> None:
        super().__init__()
        self.accounts = accounts

    def has_account(self, account_id: str) -> bool:
        return account_id in self.accounts


def test_freeze_ignores_accounts_the_enclave_does_not_hold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "trio_sign.sse")
    enclave = FakeEnclaveWithAccounts({"acct-1"})
    handle = SseEventHandler(enclave, max_frozen_accounts=1)
    for i in range(10_000):
        handle(ev("freeze", {"account_id": f"hostile-{i}"}))
    assert enclave.frozen == set()
    assert "freeze of unknown account 'hostile-9999' ignored" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    handle(ev("freeze", {"account_id": "acct-1"}))
    handle(ev("freeze", {"account_id": "acct-1"}))
    assert enclave.frozen == {"acct-1"}
    assert handle.freezes_ignored_at_cap == 0  # the cap is for targets without a directory


def test_freeze_through_the_real_service() -> None:
    store, _ = make_accounts(2)
    frozen: set[str] = set()
    pool = SessionPool(store.get, is_frozen=frozen.__contains__)
    service = SignService(store, pool, frozen=frozen)
    handle = SseEventHandler(service)
    handle(ev("freeze", {"account_id": "nobody"}))
    handle(ev("freeze", {"account_id": "acct-0"}))
    assert service.frozen == {"acct-0"}
    with pytest.raises(PoolError) as info:
        pool.commit("acct-0", "s")
    assert info.value.kind is PoolErrorKind.FAILED_PRECONDITION
    store.close()
    handle(ev("freeze", {"account_id": "acct-1"}))  # a closed store holds nothing; no raise
    assert service.frozen == {"acct-0"}


def test_freeze_is_capped_without_a_directory(caplog: pytest.LogCaptureFixture) -> None:
    assert sse_handler.MAX_FROZEN_ACCOUNTS == 100_000
    now = [0.0]
    enclave = FakeEnclave()
    handle = SseEventHandler(enclave, max_frozen_accounts=3, clock=lambda: now[0])

    def warnings() -> int:
        return sum(r.levelno == logging.WARNING for r in caplog.records)

    for i in range(1000):
        handle(ev("freeze", {"account_id": f"a{i}"}))
    assert enclave.frozen == {"a0", "a1", "a2"}
    assert handle.freezes_ignored_at_cap == 997
    assert warnings() == 1  # once per interval, not once per event
    assert "max_frozen_accounts" in caplog.text
    handle(ev("freeze", {"account_id": "a1"}))  # already frozen: not a refusal
    assert handle.freezes_ignored_at_cap == 997
    now[0] = 59.0
    handle(ev("freeze", {"account_id": "b"}))
    assert warnings() == 1
    now[0] = 60.0
    handle(ev("freeze", {"account_id": "b"}))
    assert warnings() == 2
    handle(ev("unfreeze", {"account_id": "a0"}))
    handle(ev("freeze", {"account_id": "b"}))
    assert enclave.frozen == {"a1", "a2", "b"}
    with pytest.raises(ValueError, match="max_frozen_accounts"):
        SseEventHandler(enclave, max_frozen_accounts=0)


async def test_handler_through_the_client(autojump_clock: trio.abc.Clock) -> None:
    gateway = Gateway()
    enclave = FakeEnclave()
    async with trio.open_nursery() as nursery:
        await start_client(nursery, gateway, SseEventHandler(enclave))
        server, _ = await gateway.accept()
        await server.send_all(
            OK_HEAD_CLOSE
            + b'event: freeze\ndata: {"account_id": "a"}\n\n'
            + b"event: probe\ndata: not json\n\n"
            + b'event: abort\ndata: {"session_id": "s2"}\n\n'
            + b'event: probe\ndata: {"nonce": "n-2"}\n\n'
            + b"event: drain\ndata: {}\n\n"
        )
        await trio.testing.wait_all_tasks_blocked()
        assert (enclave.frozen, enclave.last_sse_probe, enclave.draining) == ({"a"}, "n-2", 1)
        assert enclave.pool.aborted == ["s2"]
        nursery.cancel_scope.cancel()


async def test_undrain_ends_the_gateways_drain_of_the_real_service_but_not_a_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``drain`` then ``undrain`` from the gateway: new sessions are refused, then taken again
    (state, pool and the callbacks follow). A drain for good (SIGTERM, the parent's stop) is
    never undone by the gateway, also when the gateway had drained first."""
    store, _ = make_accounts(1)
    pool = SessionPool(store.get)
    calls: list[str] = []
    service = SignService(
        store,
        pool,
        on_drain=lambda: calls.append("drain"),
        on_undrain=lambda: calls.append("undrain"),
    )
    handle = SseEventHandler(service)
    handle(ev("drain", {}))
    assert (service.state, pool.accepting) == ("draining", False)
    with pytest.raises(PoolError) as refused:
        pool.commit("acct-0", "s-1")
    assert refused.value.kind is PoolErrorKind.UNAVAILABLE
    handle(ev("undrain", {}))
    assert (service.state, pool.accepting) == ("serving", True)
    pool.commit("acct-0", "s-1")
    handle(ev("undrain", {}))  # not draining: nothing to do
    assert calls == ["drain", "undrain"]

    handle(ev("drain", {}))
    service.start_draining()  # the process is stopping
    handle(ev("undrain", {}))
    assert (service.state, pool.accepting) == ("draining", False)
    assert "undrain ignored: this enclave is stopping" in caplog.text
    assert calls == ["drain", "undrain", "drain"]
    store.close()


def test_handler_logs_ids_bounded_and_the_probe_nonce_only_as_a_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Event ids come from the relayed stream: a log line shows at most 80 characters of one,
    and a probe's nonce only as its length."""
    caplog.set_level(logging.DEBUG, "trio_sign.sse")
    enclave = FakeEnclave()
    handle = SseEventHandler(enclave)
    long_id = "x" * 900
    handle(MessageEvent("probe", json.dumps({"nonce": "n" * 40}), long_id))
    handle(MessageEvent("mystery", "{}", long_id))
    assert enclave.last_sse_probe == "n" * 40
    assert "n" * 40 not in caplog.text
    assert "nonce of 40 characters" in caplog.text
    assert "x" * 81 not in caplog.text
    assert "x" * 70 in caplog.text
