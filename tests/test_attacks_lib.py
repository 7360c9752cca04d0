"""The attack clients of ``trio_sign.testing._attacks`` against fake servers that record bytes.

What each attack claims to send is parsed back with ``hyperframe`` (an independent parser),
counts and time bounds are checked, and so is what the stats report about the server's
reaction. Memory streams and the autojump clock keep this fast; one test uses real loopback.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

import hpack
import pytest
import trio
import trio.testing
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proto_min import sign_service_pb2 as pb
from trio_sign.gateway import make_client_ssl_context
from trio_sign.parent import make_server_ssl_context
from trio_sign.testing import _attacks as attacks
from trio_sign.testing import make_dev_pki

PATH_PING = "/trio_sign.v1.SignService/Ping"

ServerBehaviour = Callable[[trio.abc.Stream, bytearray], Awaitable[None]]


def server_settings(**values: int) -> bytes:
    frame = SettingsFrame(0)
    frame.settings = {getattr(SettingsFrame, k.upper()): v for k, v in values.items()}
    return frame.serialize()


def parse(data: bytes | bytearray, *, preface: bool = True) -> list[Frame]:
    """Every frame in ``data`` (after the client preface), parsed by hyperframe."""
    if preface:
        assert bytes(data[:24]) == attacks.CONNECTION_PREFACE
        data = data[24:]
    return attacks.parse_frames(data)


class FakeServer:
    """Hands out memory-stream connections; each is served by ``behaviour``, which gets the
    server end and a buffer where the reader records what the client sent."""

    def __init__(self, nursery: trio.Nursery, behaviour: ServerBehaviour) -> None:
        self._nursery = nursery
        self._behaviour = behaviour
        self.received: list[bytearray] = []

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        buf = bytearray()
        self.received.append(buf)
        self._nursery.start_soon(self._behaviour, server, buf)
        return client


async def record(stream: trio.abc.Stream, buf: bytearray) -> None:
    try:
        while data := await stream.receive_some(65536):
            buf += data
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def speaking(preface: bytes = b"", then: bytes = b"") -> ServerBehaviour:
    """Send ``preface`` at once, record everything, send ``then`` after the first bytes."""

    async def behaviour(stream: trio.abc.Stream, buf: bytearray) -> None:
        if preface:
            await stream.send_all(preface)
        if then:
            data = await stream.receive_some(65536)
            buf += data
            await stream.send_all(then)
        await record(stream, buf)

    return behaviour


def decode_headers(frames: list[Frame]) -> list[list[tuple[str, str]]]:
    decoder = hpack.Decoder()
    return [
        [(str(n), str(v)) for n, v in decoder.decode(f.data)]
        for f in frames
        if isinstance(f, HeadersFrame)
    ]


# -- 2. stream flood --------------------------------------------------------------------------


async def test_stream_flood_opens_streams_and_never_acks(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, speaking(server_settings(max_concurrent_streams=128)))
        stats = await attacks.stream_flood_no_settings_ack(server.connect, 300, duration_s=2.0)
        assert trio.current_time() == pytest.approx(2.0)
        nursery.cancel_scope.cancel()
    frames = parse(server.received[0])
    assert isinstance(frames[0], SettingsFrame)
    assert not [f for f in frames if isinstance(f, SettingsFrame) and "ACK" in f.flags]
    headers = [f for f in frames if isinstance(f, HeadersFrame)]
    assert [f.stream_id for f in headers] == list(range(1, 600, 2))
    assert all(set(f.flags) == {"END_HEADERS"} for f in headers)
    blocks = decode_headers(frames)
    assert all(dict(b)[":path"] == PATH_PING for b in blocks)  # valid every time it is sent
    assert dict(blocks[0])["content-type"] == "application/grpc"
    assert stats.streams_opened == 300
    assert stats.frames_sent == 301 == len(frames)
    assert stats.bytes_sent == len(server.received[0])
    assert stats.connections == 1
    assert stats.closed_by_server == 0


# -- 3. rapid reset ---------------------------------------------------------------------------


async def test_rapid_reset_pairs_headers_and_cancel(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, speaking(server_settings(initial_window_size=1)))
        stats = await attacks.rapid_reset(server.connect, 3, 1000, duration_s=5.0)
        nursery.cancel_scope.cancel()
    assert stats.connections == 3
    assert stats.streams_opened == 3000
    for data in server.received:
        frames = parse(data)
        streams = [f for f in frames if isinstance(f, HeadersFrame | RstStreamFrame)]
        assert len(streams) == 2000
        for h, r in zip(streams[::2], streams[1::2], strict=True):
            assert isinstance(h, HeadersFrame)
            assert isinstance(r, RstStreamFrame)
            assert h.stream_id == r.stream_id
            assert r.error_code == 0x8  # CANCEL
        # The server's SETTINGS was acknowledged (this attack is a polite client otherwise).
        assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in frames)
    assert stats.frames_sent == sum(len(parse(d)) for d in server.received)


async def test_rapid_reset_stops_at_its_duration(autojump_clock: object) -> None:
    # A server that never reads: the writes block; the attack still ends on time.
    async def connect() -> trio.abc.Stream:
        client, _server = trio.testing.lockstep_stream_pair()
        return client

    stats = await attacks.rapid_reset(connect, 2, 10**6, duration_s=3.0)
    assert trio.current_time() == pytest.approx(4.0)  # duration + the 1 s hard-stop grace
    assert stats.connections == 2
    assert stats.streams_opened < 10**6


def lockstep_server(
    nursery: trio.Nursery, behaviour: Callable[[trio.abc.Stream], Awaitable[None]]
) -> attacks.Connect:
    """Connections whose server end runs ``behaviour``; lockstep, so that a server that does
    not read blocks the attacker's writes (as a full socket would)."""

    async def connect() -> trio.abc.Stream:
        client, server = trio.testing.lockstep_stream_pair()
        nursery.start_soon(behaviour, server)
        return client

    return connect


@pytest.mark.parametrize("leave_on_goaway", [False, True])
async def test_rapid_reset_ends_quietly_when_the_server_closes(
    autojump_clock: object, leave_on_goaway: bool
) -> None:
    async def close_after_preface(stream: trio.abc.Stream) -> None:
        await stream.send_all(server_settings())
        assert await stream.receive_some(65536)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        connect = lockstep_server(nursery, close_after_preface)
        stats = await attacks.rapid_reset(connect, 2, 10**6, 1.0, leave_on_goaway=leave_on_goaway)
    assert stats.connections == 2
    assert stats.closed_by_server == 2


@pytest.mark.parametrize("leave_on_goaway", [False, True])
async def test_rapid_reset_can_leave_on_goaway(
    autojump_clock: object, leave_on_goaway: bool
) -> None:
    """A server that sends GOAWAY 0.5 s in and then holds the connection open, unread: the
    attacker that leaves on GOAWAY reconnects every 0.5 s; the other waits to be closed."""
    goaway = GoAwayFrame(0, error_code=0xB).serialize()

    async def cut_and_hold(stream: trio.abc.Stream) -> None:
        await stream.send_all(server_settings())
        assert await stream.receive_some(65536)  # the preface
        await trio.sleep(0.5)
        await stream.send_all(goaway)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        stats = await attacks.rapid_reset(
            lockstep_server(nursery, cut_and_hold),
            2,
            10**6,
            2.9,
            reconnect=True,
            leave_on_goaway=leave_on_goaway,
        )
        nursery.cancel_scope.cancel()
    assert stats.connections == (12 if leave_on_goaway else 2)
    assert stats.goaway_codes == {0xB}


# -- 4a/4b/4c ---------------------------------------------------------------------------------


async def test_partial_messages_respect_windows_and_never_finish(autojump_clock: object) -> None:
    async def behaviour(stream: trio.abc.Stream, buf: bytearray) -> None:
        await stream.send_all(server_settings(max_frame_size=16384))
        granted = 0
        while data := await stream.receive_some(65536):
            buf += data
            # Grant the connection and every stream what it has used so far, as gRPC does.
            while granted < len(buf):
                more = len(buf) - granted
                granted += more
                updates = WindowUpdateFrame(0, window_increment=more).serialize()
                updates += b"".join(
                    WindowUpdateFrame(sid, window_increment=more).serialize()
                    for sid in range(1, 16, 2)
                )
                await stream.send_all(updates)

    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, behaviour)
        stats = await attacks.partial_messages(
            server.connect, 2, 300_000, duration_s=1.0, claimed_message_size=200_000
        )
        nursery.cancel_scope.cancel()
    assert stats.connections == 2
    for data in server.received:
        frames = parse(data)
        body: dict[int, bytes] = {}
        for f in frames:
            if isinstance(f, DataFrame):
                assert len(f.data) <= 16384
                assert "END_STREAM" not in f.flags
                body[f.stream_id] = body.get(f.stream_id, b"") + f.data
            if isinstance(f, HeadersFrame):
                assert "END_STREAM" not in f.flags
        assert sum(map(len, body.values())) == 300_000
        assert list(body) == [1, 3]
        assert len(body[1]) == 5 + 200_000 - 1  # all but the last byte
        assert body[1][:5] == b"\x00" + (200_000).to_bytes(4, "big")


async def test_partial_messages_stop_at_the_initial_window(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, speaking())  # no SETTINGS, no WINDOW_UPDATE, ever
        await attacks.partial_messages(server.connect, 1, 10**6, duration_s=2.0)
        assert trio.current_time() == pytest.approx(2.0)
        nursery.cancel_scope.cancel()
    sent = sum(len(f.data) for f in parse(server.received[0]) if isinstance(f, DataFrame))
    assert sent == 65_535  # RFC 9113 default window; never more without a WINDOW_UPDATE


async def test_zero_window_sends_complete_requests(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        server = FakeServer(
            nursery,
            speaking(
                server_settings(initial_window_size=1 << 20)
                + WindowUpdateFrame(0, window_increment=1 << 20).serialize()
            ),
        )
        stats = await attacks.zero_window(server.connect, 5, payload_bytes=100_000, duration_s=1.0)
        nursery.cancel_scope.cancel()
    frames = parse(server.received[0])
    first = frames[0]
    assert isinstance(first, SettingsFrame)
    assert first.settings == {SettingsFrame.INITIAL_WINDOW_SIZE: 0}
    assert not [f for f in frames if isinstance(f, WindowUpdateFrame)]
    bodies: dict[int, bytes] = {}
    ended = set()
    for f in frames:
        if isinstance(f, DataFrame):
            bodies[f.stream_id] = bodies.get(f.stream_id, b"") + f.data
            if "END_STREAM" in f.flags:
                ended.add(f.stream_id)
    assert ended == {1, 3, 5, 7, 9} == set(bodies)
    for body in bodies.values():
        assert int.from_bytes(body[1:5], "big") == len(body) - 5
        assert len(pb.PingRequest.FromString(body[5:]).payload) == 100_000
    assert stats.streams_opened == 5


async def test_idle_connections_hold_until_duration(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, speaking(server_settings()))
        stats = await attacks.idle_connections(server.connect, 20, 7.0)
        assert trio.current_time() == pytest.approx(7.0)
        nursery.cancel_scope.cancel()
    assert stats.connections == 20
    for data in server.received:
        frames = parse(data)
        # Preface, our SETTINGS, and the ACK of the server's; nothing else.
        assert [type(f) for f in frames] == [SettingsFrame, SettingsFrame]
        assert "ACK" in frames[1].flags


# -- 5. floods --------------------------------------------------------------------------------


async def test_ping_flood_sends_exactly_the_count(autojump_clock: object) -> None:
    async def behaviour(stream: trio.abc.Stream, buf: bytearray) -> None:
        await stream.send_all(server_settings())
        await record(stream, buf)

    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, behaviour)
        stats = await attacks.ping_flood(server.connect, 10_007)
        nursery.cancel_scope.cancel()
    frames = parse(server.received[0])
    pings = [f for f in frames if isinstance(f, PingFrame)]
    assert len(pings) == 10_007
    assert all(not set(f.flags) for f in pings)
    assert stats.frames_sent == len(frames) == 10_007 + 2  # SETTINGS and a blind ACK
    assert stats.bytes_sent == len(server.received[0])


async def test_ping_flood_reports_goaway_and_close() -> None:
    goaway = GoAwayFrame(0, last_stream_id=0, error_code=0xB).serialize()

    async def behaviour(stream: trio.abc.Stream, buf: bytearray) -> None:
        buf += await stream.receive_some(65536)
        await stream.send_all(goaway)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, behaviour)
        stats = await attacks.ping_flood(server.connect, 1_000_000, duration_s=5.0)
        nursery.cancel_scope.cancel()
    assert stats.goaways == ((0xB, 1),)
    assert stats.goaway_codes == {0xB}
    assert stats.closed_by_server == 1
    assert stats.frames_sent < 1_000_000
    assert "ENHANCE_YOUR_CALM" in stats.summary()


async def test_settings_flood_over_loopback_tcp() -> None:
    received = bytearray()
    done = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await record(stream, received)  # until the attack closes its connection
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        stats = await attacks.settings_flood(
            attacks.tcp_connector("127.0.0.1", port), 3000, duration_s=2.0
        )
        with trio.fail_after(2):
            await done.wait()
        nursery.cancel_scope.cancel()
    frames = parse(received)
    flood = [f for f in frames if isinstance(f, SettingsFrame) and "ACK" not in f.flags]
    assert len(flood) == 3000 + 1  # and our own initial SETTINGS
    assert flood[-1].settings == {SettingsFrame.ENABLE_PUSH: 0}
    assert stats.connections == 1


# -- 6. huge Sign -----------------------------------------------------------------------------


async def test_huge_sign_request_is_valid_and_framed(autojump_clock: object) -> None:
    encoder = hpack.Encoder()
    response = HeadersFrame(
        1,
        encoder.encode([(":status", "200"), ("grpc-status", "5")]),
        flags=["END_HEADERS", "END_STREAM"],
    ).serialize()

    async def behaviour(stream: trio.abc.Stream, buf: bytearray) -> None:
        await stream.send_all(
            server_settings(max_frame_size=16384, initial_window_size=1 << 24)
            + WindowUpdateFrame(0, window_increment=1 << 24).serialize()
        )
        while data := await stream.receive_some(65536):
            buf += data
            frames = parse(buf)
            if any(isinstance(f, DataFrame) and "END_STREAM" in f.flags for f in frames):
                await stream.send_all(response)

    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, behaviour)
        stats = await attacks.huge_sign_request(server.connect, 20_000, duration_s=5.0)
        assert trio.current_time() < 1.0  # returned on the response, not at the deadline
        nursery.cancel_scope.cancel()
    frames = parse(server.received[0])
    (headers,) = decode_headers(frames)
    assert dict(headers)[":path"] == "/trio_sign.v1.SignService/Sign"
    data = [f for f in frames if isinstance(f, DataFrame)]
    assert all(len(f.data) <= 16384 for f in data)
    assert ["END_STREAM" in f.flags for f in data] == [False] * (len(data) - 1) + [True]
    body = b"".join(f.data for f in data)
    assert int.from_bytes(body[1:5], "big") == len(body) - 5
    request = pb.SignRequest.FromString(body[5:])
    assert len(request.commitments) == 20_000
    assert request.session_id == "no-such-session"
    assert stats.grpc_statuses == ((5, 1),)


def test_huge_sign_request_body_size() -> None:
    # 2,000,000 empty commitments: 2 bytes each, the 3.8 MiB.
    body = attacks.huge_sign_request_body(2_000_000)
    assert 4_000_000 < len(body) < 4_000_100


# -- 1. bare connections, and connect failures -------------------------------------------------


async def test_bare_connections_send_nothing_and_reopen(autojump_clock: object) -> None:
    async def drop_after_a_second(stream: trio.abc.Stream, buf: bytearray) -> None:
        # Even a server that speaks first gets no answer from a bare connection.
        await stream.send_all(server_settings())
        with trio.move_on_after(1.0):
            await record(stream, buf)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, drop_after_a_second)
        stats = await attacks.hold_bare_connections(server.connect, 10, 3.5)
        assert trio.current_time() == pytest.approx(3.5)
        nursery.cancel_scope.cancel()
    assert all(not data for data in server.received)
    assert stats.bytes_sent == 0
    assert stats.connections == 40  # 10 at a time, dropped at 1, 2, 3 s and reopened
    assert stats.closed_by_server == 30


async def test_bare_connections_without_reopen(autojump_clock: object) -> None:
    async def drop(stream: trio.abc.Stream, buf: bytearray) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, drop)
        stats = await attacks.hold_bare_connections(server.connect, 5, 3.0, reopen=False)
        nursery.cancel_scope.cancel()
    assert stats.connections == 5
    assert stats.closed_by_server == 5


async def test_connect_failures_are_counted(autojump_clock: object) -> None:
    async def refuse() -> trio.abc.Stream:
        raise ConnectionRefusedError

    stats = await attacks.hold_bare_connections(refuse, 2, 1.0)
    assert stats.connections == 0
    assert stats.connect_failures > 2
    assert trio.current_time() == pytest.approx(1.0)
    stats = await attacks.idle_connections(refuse, 3, 1.0)
    assert stats.connect_failures == 3


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="streams"):
        trio.run(attacks.stream_flood_no_settings_ack, attacks.tcp_connector("127.0.0.1", 1), -1)


# -- TLS ---------------------------------------------------------------------------------------


async def test_tls_connector_carries_an_attack_over_mtls(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path)
    server_context = make_server_ssl_context(
        pki.server_cert.read_bytes(), pki.server_key.read_bytes(), pki.ca.read_bytes()
    )
    client_context = make_client_ssl_context(
        pki.ca.read_bytes(), pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    )
    alpn: list[str | None] = []

    async def tls_server(stream: trio.abc.Stream, buf: bytearray) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await tls.do_handshake()
        alpn.append(tls.selected_alpn_protocol())
        await record(tls, buf)

    async with trio.open_nursery() as nursery:
        server = FakeServer(nursery, tls_server)
        connect = attacks.tls_connector(server.connect, client_context, "localhost")
        stats = await attacks.idle_connections(connect, 2, 0.2)
        nursery.cancel_scope.cancel()
    assert stats.connections == 2
    assert alpn == ["h2", "h2"]
    assert [type(f) for f in parse(server.received[0])] == [SettingsFrame]
