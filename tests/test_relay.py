"""The parent's SSE relay: a local TLS "gateway" (test CA, loopback TCP) behind the relay, the
enclave's side over a UNIX socket (standing in for vsock); the back-pressure test runs in memory
on virtual time."""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_sign.parent._relay import (
    AllowedUrl,
    Allowlist,
    RelayConfigError,
    RelayRefused,
    RelayStats,
    normalise_path,
    parse_relay_request,
    serve_sse_relay,
)
from trio_sign.sse import MessageEvent, run_sse_client
from trio_sign.testing import make_ca, make_leaf
from trio_sign.transport import open_listeners

GATEWAY_HOST = "gateway.internal"
EVENTS = b'id: 1\nevent: probe\ndata: {"nonce": "n-1"}\n\nid: 2\nevent: drain\ndata: {}\n\n'


# -- test PKI ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        return context

    def server_context(self, sni: list[str | None] | None = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        if sni is not None:

            def record(_: object, name: str | None, __: object) -> None:
                sni.append(name)

            context.sni_callback = record
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = make_ca("trio-sign test CA", days=1)
    cert, key = make_leaf(ca, GATEWAY_HOST, server=True, hosts=[GATEWAY_HOST], days=1)
    directory = tmp_path_factory.mktemp("pki")
    cert_file = directory / "gateway.pem"
    key_file = directory / "gateway.key"
    cert_file.write_bytes(cert)
    key_file.write_bytes(key)
    return Pki(ca.pem, cert_file, key_file)


# -- the gateway -------------------------------------------------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_head(stream: trio.abc.Stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        more = await stream.receive_some()
        if not more:
            break
        data += more
    return data


@dataclass
class Gateway:
    """A TLS event-stream server; remembers every request head it got."""

    requests: list[bytes] = field(default_factory=list)
    port: int = 0
    sent_events: int = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        try:
            head = await read_head(stream)
            self.requests.append(head)
            target = head.split(b" ", 2)[1]
            if target.startswith(b"/v1/enclaves/redirect/"):
                await stream.send_all(
                    b"HTTP/1.1 302 Found\r\nLocation: https://elsewhere.internal/steal\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )
                return
            if target.startswith(b"/v1/enclaves/flood/"):
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                while True:
                    await stream.send_all(chunk(b"data: " + b"x" * 1000 + b"\n\n"))
                    self.sent_events += 1
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-store\r\nSet-Cookie: a=b\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            await stream.send_all(chunk(EVENTS))
            await trio.sleep_forever()
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)


@dataclass
class Stack:
    gateway: Gateway
    relay_path: str
    stats: RelayStats
    upstream_connects: list[tuple[str, int]]
    sni: list[str | None]

    async def connect(self) -> trio.abc.Stream:
        return await trio.open_unix_socket(self.relay_path)

    async def ask(self, request: bytes) -> bytes:
        """Send raw request bytes; the whole response (until the relay closes)."""
        stream = await self.connect()
        async with stream:
            await stream.send_all(request)
            response = b""
            while True:
                data = await stream.receive_some()
                if not data:
                    return response
                response += data


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path, nursery: trio.Nursery) -> Stack:
    gateway = Gateway()
    tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
    gateway.port = tcp[0].socket.getsockname()[1]
    sni: list[str | None] = []
    context = pki.server_context(sni)
    tls = [trio.SSLListener(t, context, https_compatible=True) for t in tcp]
    await nursery.start(trio.serve_listeners, gateway.handle, tls)
    connects: list[tuple[str, int]] = []

    async def connect_upstream(host: str, port: int) -> trio.abc.Stream:
        connects.append((host, port))
        if host != GATEWAY_HOST:
            raise OSError("no such host in the test")
        return await trio.open_tcp_stream("127.0.0.1", port)

    path = str(tmp_path / "relay.sock")
    listeners = await open_listeners(f"unix://{path}")
    stats = await nursery.start(
        functools.partial(
            serve_sse_relay,
            listeners,
            [
                f"https://{GATEWAY_HOST}:{gateway.port}/v1/enclaves/",
                f"https://{GATEWAY_HOST}:{gateway.port}/v2/exact",
            ],
            ssl_context_for_upstream=pki.client_context(),
            connect_upstream=connect_upstream,
        )
    )
    return Stack(gateway, path, stats, connects, sni)


def get(target: str, host: str, *extra: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# -- end to end --------------------------------------------------------------------------------


async def test_allowed_url_streams_events_end_to_end(stack: Stack) -> None:
    url = f"https://{GATEWAY_HOST}:{stack.gateway.port}/v1/enclaves/node-1/events"
    received: list[MessageEvent] = []
    done = trio.Event()

    def on_event(event: MessageEvent) -> None:
        received.append(event)
        if len(received) == 2:
            done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    run_sse_client, url, connect=stack.connect, on_event=on_event, last_event_id="7"
                )
            )
            await done.wait()
            assert stack.stats.active == 1
            nursery.cancel_scope.cancel()
    assert [(e.type, e.data, e.last_event_id) for e in received] == [
        ("probe", '{"nonce": "n-1"}', "1"),
        ("drain", "{}", "2"),
    ]
    (request,) = stack.gateway.requests
    assert request.startswith(b"GET /v1/enclaves/node-1/events HTTP/1.1\r\n")
    assert f"Host: {GATEWAY_HOST}:{stack.gateway.port}\r\n".encode() in request
    assert b"Last-Event-ID: 7\r\n" in request
    assert b"Accept: text/event-stream\r\n" in request
    assert stack.upstream_connects == [(GATEWAY_HOST, stack.gateway.port)]
    assert stack.sni == [GATEWAY_HOST]
    assert stack.stats.forwarded == 1
    assert stack.stats.bytes_relayed == len(EVENTS)


async def test_response_headers_are_filtered(stack: Stack) -> None:
    host = f"{GATEWAY_HOST}:{stack.gateway.port}"
    stream = await stack.connect()
    async with stream:
        await stream.send_all(get("/v1/enclaves/n/events", host))
        with trio.fail_after(5):
            head = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/event-stream\r\n" in head
    assert b"Cache-Control: no-store\r\n" in head
    assert b"Set-Cookie" not in head


async def test_exact_prefix_entry(stack: Stack) -> None:
    host = f"{GATEWAY_HOST}:{stack.gateway.port}"
    with trio.fail_after(5):
        refused = await stack.ask(get("/v2/exactly", host))
    assert status_of(refused) == 403
    stream = await stack.connect()
    async with stream:
        await stream.send_all(get("/v2/exact/events", host))
        with trio.fail_after(5):
            head = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200 ")


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host_kind"),
    [
        ("/v1/enclaves/n/events", "other-host"),
        ("/v1/enclaves/n/events", "other-port"),
        ("/v1/enclaves/n/events", "default-port"),
        ("/v1/enclavesX/n/events", "ok"),
        ("/v1/enclaves", "ok"),
        ("/v1/other/n/events", "ok"),
        ("/v1/enclaves/../admin", "ok"),
        ("/v1/enclaves/./n/events", "ok"),
        ("/v1/enclaves/%2e%2e/admin", "ok"),
        ("/v1/enclaves/%2E./admin", "ok"),
        ("/v1/enclaves/a%2fb/events", "ok"),
        ("/v1/enclaves/a%5Cb/events", "ok"),
        ("/v1/enclaves/a\\b/events", "ok"),
        ("/v1/enclaves//n/events", "ok"),
        ("http://HOST/v1/enclaves/n/events", "ok"),
        ("ftp://HOST/v1/enclaves/n/events", "ok"),
    ],
)
async def test_refused_with_403(stack: Stack, target: str, host_kind: str) -> None:
    port = stack.gateway.port
    host = {
        "other-host": f"other.internal:{port}",
        "other-port": f"{GATEWAY_HOST}:{port + 1}",
        "default-port": GATEWAY_HOST,
        "ok": f"{GATEWAY_HOST}:{port}",
    }[host_kind]
    target = target.replace("HOST", f"{GATEWAY_HOST}:{port}")
    with trio.fail_after(5):
        response = await stack.ask(get(target, host))
    assert status_of(response) == 403, response
    assert stack.gateway.requests == []
    assert stack.upstream_connects == []
    assert stack.stats.refused == 1


async def test_refusal_is_logged(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(5):
        response = await stack.ask(get("/v1/enclaves/n", f"evil.internal:{stack.gateway.port}"))
    assert status_of(response) == 403
    (record,) = [r for r in caplog.records if r.name == "trio_sign.parent.relay"]
    assert record.levelname == "WARNING"
    assert "evil.internal" in record.getMessage()


async def test_malformed_and_oversized_requests(stack: Stack) -> None:
    host = f"{GATEWAY_HOST}:{stack.gateway.port}"
    with trio.fail_after(5):
        assert status_of(await stack.ask(b"POST /v1/enclaves/n HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
        assert status_of(await stack.ask(b"GET /v1/enclaves/n HTTP/1.1\r\n\r\n")) == 400
        assert status_of(await stack.ask(b"nonsense\r\n\r\n")) == 400
        http10 = get("/v1/enclaves/n", host).replace(b"HTTP/1.1", b"HTTP/1.0")
        assert status_of(await stack.ask(http10)) == 400
        huge = get("/v1/enclaves/n", host, "User-Agent: " + "a" * 9000)
        assert status_of(await stack.ask(huge)) == 431
        body = get("/v1/enclaves/n", host, "Content-Length: 5") + b"hello"
        assert status_of(await stack.ask(body)) == 400
    assert stack.gateway.requests == []


async def test_credentials_are_never_forwarded(stack: Stack) -> None:
    host = f"{GATEWAY_HOST}:{stack.gateway.port}"
    request = get(
        "/v1/enclaves/n/events",
        host,
        "Authorization: Bearer secret-token",
        "Cookie: session=abc",
        "Proxy-Authorization: Basic Zm9vOmJhcg==",
        "X-Api-Key: k",
        "User-Agent: enclave/1",
        "Last-Event-ID: 5",
    )
    stream = await stack.connect()
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(5):
            head = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200 ")
    (seen,) = stack.gateway.requests
    lowered = seen.lower()
    for banned in (b"authorization", b"cookie", b"proxy-", b"x-api-key", b"secret-token"):
        assert banned not in lowered
    assert b"User-Agent: enclave/1\r\n" in seen
    assert b"Last-Event-ID: 5\r\n" in seen


async def test_redirect_is_not_followed(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    host = f"{GATEWAY_HOST}:{stack.gateway.port}"
    with trio.fail_after(5):
        response = await stack.ask(get("/v1/enclaves/redirect/events", host))
    assert status_of(response) == 502
    assert b"302" in response
    assert len(stack.gateway.requests) == 1
    assert stack.upstream_connects == [(GATEWAY_HOST, stack.gateway.port)]
    assert stack.stats.redirects == 1
    assert any("redirects are not followed" in r.getMessage() for r in caplog.records)


async def test_untrusted_upstream_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    """The relay's context trusts only the system roots: the test CA's gateway fails TLS."""
    gateway = Gateway()
    tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = tcp[0].socket.getsockname()[1]
    tls = [trio.SSLListener(t, pki.server_context(), https_compatible=True) for t in tcp]

    async def connect_upstream(host: str, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    path = str(tmp_path / "relay.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, gateway.handle, tls)
        stats = await nursery.start(
            functools.partial(
                serve_sse_relay,
                await open_listeners(f"unix://{path}"),
                [f"https://{GATEWAY_HOST}:{port}/v1/"],
                ssl_context_for_upstream=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
                connect_upstream=connect_upstream,
            )
        )
        with trio.fail_after(5):
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(get("/v1/x", f"{GATEWAY_HOST}:{port}"))
                response = b""
                while data := await stream.receive_some():
                    response += data
        assert status_of(response) == 502
        assert stats.upstream_failures == 1
        nursery.cancel_scope.cancel()


async def test_unverifying_context_is_refused() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verify"):
        await serve_sse_relay([], [], ssl_context_for_upstream=context)


# -- back-pressure (in memory, virtual time) ---------------------------------------------------


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[trio.abc.Stream](0)

    async def accept(self) -> trio.abc.Stream:
        return await self.receive.receive()

    async def aclose(self) -> None:
        await self.receive.aclose()


async def test_slow_enclave_reader_applies_back_pressure(
    pki: Pki, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    gateway = Gateway()

    async def connect_upstream(host: str, port: int) -> trio.abc.Stream:
        relay_end, gateway_end = trio.testing.lockstep_stream_pair()
        server = trio.SSLStream(gateway_end, pki.server_context(), server_side=True)
        nursery.start_soon(gateway.handle, server)
        return relay_end

    listener = MemoryListener()
    await nursery.start(
        functools.partial(
            serve_sse_relay,
            [listener],
            [f"https://{GATEWAY_HOST}/v1/"],
            ssl_context_for_upstream=pki.client_context(),
            connect_upstream=connect_upstream,
            receive_bytes=1024,
        )
    )
    enclave, relay_side = trio.testing.lockstep_stream_pair()
    await listener.send.send(relay_side)
    await enclave.send_all(get("/v1/enclaves/flood/events", GATEWAY_HOST))
    head = await read_head(enclave)
    assert head.startswith(b"HTTP/1.1 200 ")
    await trio.sleep(30)  # the enclave reads nothing for a while
    await trio.testing.wait_all_tasks_blocked()
    stalled_at = gateway.sent_events
    assert stalled_at < 40  # ~TLS record + one receive buffer, not an unbounded backlog
    await trio.sleep(30)
    assert gateway.sent_events == stalled_at  # still blocked, nothing buffered behind our back
    received = 0
    while gateway.sent_events < stalled_at + 100:
        received += len(await enclave.receive_some(4096))
    assert received > 100 * 1000
    await enclave.aclose()


async def test_idle_upstream_closes_both_sides(
    pki: Pki, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    upstream_closed = trio.Event()

    async def silent_gateway(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        upstream_closed.set()

    async def connect_upstream(host: str, port: int) -> trio.abc.Stream:
        relay_end, gateway_end = trio.testing.memory_stream_pair()
        server = trio.SSLStream(gateway_end, pki.server_context(), server_side=True)
        nursery.start_soon(silent_gateway, server)
        return relay_end

    listener = MemoryListener()
    stats = await nursery.start(
        functools.partial(
            serve_sse_relay,
            [listener],
            [f"https://{GATEWAY_HOST}/v1/"],
            ssl_context_for_upstream=pki.client_context(),
            connect_upstream=connect_upstream,
            idle_timeout_s=20,
        )
    )
    enclave, relay_side = trio.testing.memory_stream_pair()
    await listener.send.send(relay_side)
    start = trio.current_time()
    await enclave.send_all(get("/v1/x", GATEWAY_HOST))
    assert (await read_head(enclave)).startswith(b"HTTP/1.1 200 ")
    assert await enclave.receive_some() == b""  # closed without the last chunk
    assert trio.current_time() - start == pytest.approx(20)
    await upstream_closed.wait()
    assert stats.active == 0
    assert stats.upstream_failures == 1


async def test_enclave_hangup_closes_upstream(
    pki: Pki, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    upstream_closed = trio.Event()

    async def gateway(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        upstream_closed.set()

    async def connect_upstream(host: str, port: int) -> trio.abc.Stream:
        relay_end, gateway_end = trio.testing.memory_stream_pair()
        nursery.start_soon(
            gateway, trio.SSLStream(gateway_end, pki.server_context(), server_side=True)
        )
        return relay_end

    listener = MemoryListener()
    stats = await nursery.start(
        functools.partial(
            serve_sse_relay,
            [listener],
            [f"https://{GATEWAY_HOST}/v1/"],
            ssl_context_for_upstream=pki.client_context(),
            connect_upstream=connect_upstream,
        )
    )
    enclave, relay_side = trio.testing.memory_stream_pair()
    await listener.send.send(relay_side)
    await enclave.send_all(get("/v1/x", GATEWAY_HOST))
    assert (await read_head(enclave)).startswith(b"HTTP/1.1 200 ")
    start = trio.current_time()
    await enclave.aclose()
    await upstream_closed.wait()
    assert trio.current_time() == start
    await trio.testing.wait_all_tasks_blocked()
    assert stats.active == 0


async def test_cancelling_the_relay_closes_both_sides(
    pki: Pki, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    upstream_closed = trio.Event()

    async def gateway(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n")
        )
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        upstream_closed.set()

    async def connect_upstream(host: str, port: int) -> trio.abc.Stream:
        relay_end, gateway_end = trio.testing.memory_stream_pair()
        nursery.start_soon(
            gateway, trio.SSLStream(gateway_end, pki.server_context(), server_side=True)
        )
        return relay_end

    listener = MemoryListener()
    async with trio.open_nursery() as relay_nursery:
        stats = await relay_nursery.start(
            functools.partial(
                serve_sse_relay,
                [listener],
                [f"https://{GATEWAY_HOST}/v1/"],
                ssl_context_for_upstream=pki.client_context(),
                connect_upstream=connect_upstream,
            )
        )
        enclave, relay_side = trio.testing.memory_stream_pair()
        await listener.send.send(relay_side)
        await enclave.send_all(get("/v1/x", GATEWAY_HOST))
        assert (await read_head(enclave)).startswith(b"HTTP/1.1 200 ")
        await trio.testing.wait_all_tasks_blocked()
        assert stats.active == 1
        relay_nursery.cancel_scope.cancel()
    assert stats.active == 0
    rest = b""
    while data := await enclave.receive_some():
        rest += data
    assert rest == chunk(b"data: 1\n\n")  # then EOF without the last chunk
    await upstream_closed.wait()


async def test_request_timeout_and_connection_limit(
    pki: Pki, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    listener = MemoryListener()
    stats = await nursery.start(
        functools.partial(
            serve_sse_relay,
            [listener],
            [f"https://{GATEWAY_HOST}/v1/"],
            ssl_context_for_upstream=pki.client_context(),
            request_timeout_s=5,
            max_connections=1,
        )
    )
    first, relay_side = trio.testing.memory_stream_pair()
    await listener.send.send(relay_side)
    await first.send_all(b"GET /v1/x HTTP/1.1\r\n")  # and then nothing
    await trio.testing.wait_all_tasks_blocked()
    second, relay_side = trio.testing.memory_stream_pair()
    await listener.send.send(relay_side)
    assert (await read_head(second)).startswith(b"HTTP/1.1 503 ")
    start = trio.current_time()
    assert (await read_head(first)).startswith(b"HTTP/1.1 408 ")
    assert trio.current_time() - start == pytest.approx(5)
    assert stats.refused == 2


async def test_connect_timeout(
    pki: Pki, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async def connect_upstream(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError

    listener = MemoryListener()
    await nursery.start(
        functools.partial(
            serve_sse_relay,
            [listener],
            [f"https://{GATEWAY_HOST}/v1/"],
            ssl_context_for_upstream=pki.client_context(),
            connect_upstream=connect_upstream,
            connect_timeout_s=3,
        )
    )
    enclave, relay_side = trio.testing.memory_stream_pair()
    await listener.send.send(relay_side)
    start = trio.current_time()
    await enclave.send_all(get("/v1/x", GATEWAY_HOST))
    head = await read_head(enclave)
    assert head.startswith(b"HTTP/1.1 504 ")
    assert trio.current_time() - start == pytest.approx(3)


# -- sans-io -----------------------------------------------------------------------------------


def test_allowlist_entries() -> None:
    entry = AllowedUrl.parse("https://Gateway.Internal:8443/v1/enclaves/")
    assert (entry.scheme, entry.host, entry.port, entry.path_prefix) == (
        "https",
        "gateway.internal",
        8443,
        "/v1/enclaves/",
    )
    assert AllowedUrl.parse("https://gw/").port == 443
    assert AllowedUrl.parse("http://localhost/x").port == 80
    for bad in (
        "ftp://gw/x",
        "https://user:pw@gw/x",
        "https://gw/x?q=1",
        "https:///x",
        "https://gw/a/../b",
        "https://gw:99999/x",
    ):
        with pytest.raises(RelayConfigError):
            AllowedUrl.parse(bad)
    allow = Allowlist(["https://gw:8443/v1/enclaves/", "https://gw:8443/exact"])
    assert allow.match("https", "gw", 8443, "/v1/enclaves/n/events") is not None
    assert allow.match("https", "gw", 8443, "/v1/enclavesX") is None
    assert allow.match("https", "gw", 8443, "/exact") is not None
    assert allow.match("https", "gw", 8443, "/exact/more") is not None
    assert allow.match("https", "gw", 8443, "/exactly") is None
    assert allow.match("http", "gw", 8443, "/exact") is None
    assert allow.match("https", "gw", 443, "/exact") is None


def test_normalise_path() -> None:
    assert normalise_path("/v1/%7Enode%2d1/%40x") == "/v1/~node-1/%40x"
    assert normalise_path("/v1/a%3ab") == "/v1/a%3Ab"
    for bad, status in (
        ("/a/%2E%2e/b", 403),
        ("/a/.", 403),
        ("/a/%2F", 403),
        ("/a%5c", 403),
        ("/a/%zz", 400),
        ("/a/%0a", 400),
        ("/a b", 400),
        ("relative", 400),
    ):
        with pytest.raises(RelayRefused) as info:
            normalise_path(bad)
        assert info.value.status == status, bad


def test_resolve_prefers_https_and_falls_back_to_explicit_http() -> None:
    both = Allowlist(["https://gw:8443/v1/", "http://gw:8443/v1/", "http://dev/v1/"])
    request = parse_relay_request(b"GET /v1/x HTTP/1.1\r\nHost: gw:8443")
    assert both.resolve(request) == request
    resolved = both.resolve(parse_relay_request(b"GET /v1/x HTTP/1.1\r\nHost: dev"))
    assert resolved is not None
    assert (resolved.scheme, resolved.port, resolved.url()) == ("http", 80, "http://dev/v1/x")
    assert both.resolve(parse_relay_request(b"GET https://dev/v1/x HTTP/1.1\r\nHost: dev")) is None
    assert both.resolve(parse_relay_request(b"GET /v1/x HTTP/1.1\r\nHost: dev:443")) is None


def test_parse_request_absolute_form_must_agree_with_host() -> None:
    request = parse_relay_request(
        b"GET http://gw:8080/v1/x?a=1 HTTP/1.1\r\nHost: GW:8080\r\nCookie: c"
    )
    assert (request.scheme, request.host, request.port, request.target) == (
        "http",
        "gw",
        8080,
        "/v1/x?a=1",
    )
    assert request.dropped == ("cookie",)
    assert request.upstream_request() == (
        b"GET /v1/x?a=1 HTTP/1.1\r\nHost: gw:8080\r\nConnection: close\r\n\r\n"
    )
    with pytest.raises(RelayRefused) as info:
        parse_relay_request(b"GET http://gw:8080/v1/x HTTP/1.1\r\nHost: other:8080")
    assert info.value.status == 400
    with pytest.raises(RelayRefused):
        parse_relay_request(b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b")


async def _relay_to_a_recording_gateway(
    nursery: trio.Nursery, **relay: Any
) -> tuple[Callable[[bytes], Awaitable[bytes]], list[bytes]]:
    """A relay for ``http://localhost:8080/v1/`` whose upstream is a gateway that records
    each request head and answers 204. Returns ``ask`` (one request from the enclave's side,
    the whole response back) and the recorded heads."""
    requests: list[bytes] = []

    async def gateway(stream: trio.abc.Stream) -> None:
        requests.append(await read_head(stream))
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")

    async def connect_upstream(host: str, port: int) -> trio.abc.Stream:
        relay_end, gateway_end = trio.testing.memory_stream_pair()
        nursery.start_soon(gateway, gateway_end)
        return relay_end

    listener = MemoryListener()
    await nursery.start(
        functools.partial(
            serve_sse_relay,
            [listener],
            ["http://localhost:8080/v1/"],
            ssl_context_for_upstream=ssl.create_default_context(),
            connect_upstream=connect_upstream,
            **relay,
        )
    )

    async def ask(request: bytes) -> bytes:
        enclave, relay_side = trio.testing.memory_stream_pair()
        await listener.send.send(relay_side)
        await enclave.send_all(request)
        response = b""
        while data := await enclave.receive_some():
            response += data
        return response

    return ask, requests


async def test_plain_http_entry(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    ask, requests = await _relay_to_a_recording_gateway(nursery)

    # Origin-form (what run_sse_client sends) uses the explicit http entry; so does an
    # absolute-form http request. Absolute-form https, another port or path: refused.
    assert (await ask(get("/v1/x", "localhost:8080"))).startswith(b"HTTP/1.1 204 ")
    response = await ask(get("http://localhost:8080/v1/x", "localhost:8080"))
    assert response.startswith(b"HTTP/1.1 204 ")
    assert status_of(await ask(get("https://localhost:8080/v1/x", "localhost:8080"))) == 403
    assert status_of(await ask(get("/v1/x", "localhost"))) == 403  # port 80 (or 443)
    assert status_of(await ask(get("/v2/x", "localhost:8080"))) == 403
    expected = (
        b"GET /v1/x HTTP/1.1\r\nHost: localhost:8080\r\nAccept: text/event-stream\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert requests == [expected, expected]


# -- the node's credential ---------------------------------------------------------------------

PARENT_TOKEN = "node-1-token-from-parent-toml-0123456789"


async def test_the_parent_adds_its_token_and_the_enclave_cannot_supply_one(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway authenticates subscriptions; the parent (not the enclave) holds the node's
    token and adds it upstream. An ``Authorization`` from the enclave is still dropped, so
    exactly one, the parent's, goes out. The token never reaches a log line."""
    caplog.set_level(logging.DEBUG, "trio_sign.parent.relay")
    ask, requests = await _relay_to_a_recording_gateway(nursery, upstream_token=PARENT_TOKEN)
    response = await ask(
        get("/v1/enclaves/node-1/events", "localhost:8080", "Authorization: Bearer forged")
    )
    assert response.startswith(b"HTTP/1.1 204 ")
    (seen,) = requests
    assert seen.lower().count(b"authorization:") == 1
    assert f"Authorization: Bearer {PARENT_TOKEN}\r\n".encode() in seen
    assert b"forged" not in seen
    assert PARENT_TOKEN not in caplog.text
    assert "dropped credential headers" in caplog.text


def test_upstream_request_without_a_token_has_no_authorization() -> None:
    request = parse_relay_request(b"GET /v1/x HTTP/1.1\r\nHost: gw:8443")
    assert b"uthorization" not in request.upstream_request()
    assert b"Authorization: Bearer " + PARENT_TOKEN.encode() in request.upstream_request(
        token=PARENT_TOKEN
    )


@pytest.mark.parametrize("token", ["short", "has space in it 0123456789", "x" * 1025, ""])
async def test_a_bad_upstream_token_is_refused_without_quoting_it(token: str) -> None:
    with pytest.raises(RelayConfigError, match="upstream token must be") as info:
        await serve_sse_relay(
            [], [], ssl_context_for_upstream=ssl.create_default_context(), upstream_token=token
        )
    if token:
        assert token not in str(info.value)


# -- parent.toml: [relay] token / token_file ---------------------------------------------------

_PARENT_TOML = """
[bundle]
source = "s3://bucket/service_key_shares.json.enc"
[kms]
mode = "aws"
[enclave]
backend = "local"
nsm_dir = "nsm"
gateway_url = "https://gateway.internal:8443"
node_id = "node-1"
[relay]
allowlist = ["https://gateway.internal:8443/v1/enclaves/"]
"""


def test_parent_config_token_inline_and_from_a_file(tmp_path: Path) -> None:
    from trio_sign.parent._config import parse_parent_config

    assert parse_parent_config(_PARENT_TOML).relay_token is None
    cfg = parse_parent_config(_PARENT_TOML + f'token = "{PARENT_TOKEN}"\n')
    assert cfg.relay_token == PARENT_TOKEN
    assert PARENT_TOKEN not in repr(cfg)
    (tmp_path / "events.token").write_text(PARENT_TOKEN + "\n")
    cfg = parse_parent_config(_PARENT_TOML + 'token_file = "events.token"\n', base=tmp_path)
    assert cfg.relay_token == PARENT_TOKEN


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('token = "short"\n', r"^\[relay\] token: the token must be 16 to 1024 characters"),
        ("token = 5\n", r"^\[relay\] token: the token must be"),
        ('token_file = "missing.token"\n', r"^\[relay\] token_file: cannot read .*missing"),
        ('token_file = "bad.token"\n', r"^\[relay\] token_file: the token must be"),
        (f'token = "{PARENT_TOKEN}"\ntoken_file = "x"\n', r"^\[relay\] give token or token_file"),
    ],
)
def test_parent_config_token_errors_are_one_line_and_never_quote_it(
    tmp_path: Path, extra: str, message: str
) -> None:
    from trio_sign.parent._config import ConfigError, parse_parent_config

    (tmp_path / "bad.token").write_text("not a token at all\n")
    with pytest.raises(ConfigError, match=message) as info:
        parse_parent_config(_PARENT_TOML + extra, base=tmp_path)
    assert "\n" not in str(info.value)
    assert "not a token" not in str(info.value)
    assert "short" not in str(info.value)
