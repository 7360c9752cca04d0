"""The sans-io gRPC core: bytes in, events out. Plain synchronous tests, no Trio."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hypothesis import event, given, settings
from hypothesis import strategies as st

import trio_sign.rpc
from trio_sign.rpc import (
    ConnectionTerminated,
    Event,
    GrpcClientConnection,
    GrpcProtocolError,
    GrpcServerConnection,
    MessageReceived,
    RequestReceived,
    ResponseReceived,
    StatusCode,
    StreamEnded,
    StreamError,
    StreamReset,
    TrailersReceived,
)
from trio_sign.rpc._status import (
    decode_grpc_message,
    encode_grpc_message,
    format_grpc_timeout,
    parse_grpc_timeout,
)

PING = "/trio_sign.v1.SignService/Ping"
METHODS = {PING, "/trio_sign.v1.SignService/Sign"}

Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterable[bytes]:
    return [data] if data else []


def pump(
    client: GrpcClientConnection,
    server: GrpcServerConnection,
    chunker: Chunker = whole,
) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until both sides are quiet; return (server events, client events)."""
    server_events: list[Event] = []
    client_events: list[Event] = []
    for _ in range(10_000):
        to_server = client.data_to_send()
        for chunk in chunker(to_server):
            server_events += server.receive_data(chunk)
        to_client = server.data_to_send()
        for chunk in chunker(to_client):
            client_events += client.receive_data(chunk)
        if not to_server and not to_client:
            return server_events, client_events
    raise AssertionError("no quiescence")


def pair(**server_kwargs: object) -> tuple[GrpcClientConnection, GrpcServerConnection]:
    client = GrpcClientConnection()
    server = GrpcServerConnection(methods=METHODS, **server_kwargs)  # type: ignore[arg-type]
    client.initiate()
    server.initiate()
    assert pump(client, server) == ([], [])
    return client, server


class ServerCoreRaised(Exception):
    """A gRPC core raised while processing input (always a bug)."""


class RawClient:
    """A bare h2 client to send what a well-behaved gRPC client never would."""

    def __init__(self, server: GrpcServerConnection) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.initiate_connection()
        server.initiate()
        self.server_events: list[Event] = []
        self.h2_events: list[h2.events.Event] = []
        self.flush()

    def flush(self) -> None:
        for _ in range(1000):
            out = self.h2.data_to_send()
            if out:
                try:
                    self.server_events += self.server.receive_data(out)
                except Exception as exc:
                    # Keep server failures apart from the raw client's own h2 errors.
                    raise ServerCoreRaised(repr(exc)) from exc
            back = self.server.data_to_send()
            if back:
                self.h2_events += self.h2.receive_data(back)
            if not out and not back:
                return

    def request(
        self,
        body: bytes | None = None,
        *,
        path: bytes = PING.encode(),
        method: bytes = b"POST",
        content_type: bytes | None = b"application/grpc",
        te: bytes | None = b"trailers",
        extra: Iterable[tuple[bytes, bytes]] = (),
        end: bool = True,
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":path", path)]
        headers.append((b":authority", b"example"))
        if te is not None:
            headers.append((b"te", te))
        if content_type is not None:
            headers.append((b"content-type", content_type))
        headers += list(extra)
        self.h2.send_headers(sid, headers, end_stream=body is None and end)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def headers_for(self, sid: int) -> list[dict[bytes, bytes]]:
        out = []
        for ev in self.h2_events:
            if (
                isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived)
                and ev.stream_id == sid
            ):
                out.append({bytes(k): bytes(v) for k, v in ev.headers or ()})
        return out

    def reset_codes(self, sid: int) -> list[int]:
        return [
            int(ev.error_code or 0)
            for ev in self.h2_events
            if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid
        ]


def _frames(wire: bytes) -> list[tuple[int, int, bytes]]:
    """Split raw HTTP/2 bytes into (type, stream id, payload)."""
    out = []
    i = 0
    while i < len(wire):
        length = int.from_bytes(wire[i : i + 3], "big")
        ftype = wire[i + 3]
        sid = int.from_bytes(wire[i + 5 : i + 9], "big") & 0x7FFFFFFF
        out.append((ftype, sid, wire[i + 9 : i + 9 + length]))
        i += 9 + length
    return out


def framed(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


# --- happy paths -----------------------------------------------------------------------------


def test_unary_round_trip_with_metadata_and_deadline() -> None:
    client, server = pair()
    sid = client.start_request(
        PING, timeout_s=1.5, metadata=[("x-request-id", "abc"), ("x-token-bin", b"\x00\xff")]
    )
    client.send_message(sid, b"hello", end_stream=True)
    server_events, client_events = pump(client, server)
    assert client_events == []
    assert server_events == [
        RequestReceived(
            sid,
            PING,
            "localhost",
            (
                ("user-agent", "trio-sign-grpc"),
                ("x-request-id", "abc"),
                ("x-token-bin", b"\x00\xff"),
            ),
            1.5,
        ),
        MessageReceived(sid, b"hello"),
        StreamEnded(sid),
    ]
    server.send_response(sid, b"world", metadata=[("x-served-by", "test")])
    server_events, client_events = pump(client, server)
    assert server_events == []
    assert client_events == [
        ResponseReceived(sid, ()),
        MessageReceived(sid, b"world"),
        TrailersReceived(sid, StatusCode.OK, "", (("x-served-by", "test"),)),
    ]
    assert server.open_streams == 0
    assert client.open_streams == 0


def test_empty_message_and_grpc_proto_content_type() -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    sid = raw.request(framed(b""), content_type=b"application/grpc+proto")
    assert [type(e) for e in raw.server_events] == [RequestReceived, MessageReceived, StreamEnded]
    assert raw.server_events[1] == MessageReceived(sid, b"")


def test_error_status_non_ascii_message_is_percent_encoded() -> None:
    client, server = pair()
    sid = client.start_request(PING)
    client.send_message(sid, b"x", end_stream=True)
    pump(client, server)
    server.send_trailers(sid, StatusCode.NOT_FOUND, "konto «ü» 100% unbekannt\n")
    wire = server.data_to_send()
    assert "«".encode() not in wire
    events = client.receive_data(wire)
    assert events == [TrailersReceived(sid, StatusCode.NOT_FOUND, "konto «ü» 100% unbekannt\n", ())]


def test_trailers_only_error_on_raw_wire() -> None:
    server = GrpcServerConnection(methods=METHODS)
    raw = RawClient(server)
    sid = raw.request(framed(b"x"))
    server.send_trailers(sid, StatusCode.UNAVAILABLE, "draining 100%")
    raw.flush()
    (headers,) = raw.headers_for(sid)
    assert headers[b":status"] == b"200"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == b"14"
    assert headers[b"grpc-message"] == b"draining 100%25"


def test_many_streams_interleaved() -> None:
    client, server = pair()
    sids = []
    for i in range(50):
        sid = client.start_request(PING)
        client.send_message(sid, b"%d" % i, end_stream=True)
        sids.append(sid)
    server_events, _ = pump(client, server)
    got = {e.stream_id: e.data for e in server_events if isinstance(e, MessageReceived)}
    assert got == {sid: b"%d" % i for i, sid in enumerate(sids)}
    for sid in reversed(sids):
        server.send_response(sid, got[sid] * 2)
    _, client_events = pump(client, server)
    done = [e for e in client_events if isinstance(e, TrailersReceived)]
    assert len(done) == 50
    assert all(e.status == StatusCode.OK for e in done)


# --- malformed requests ------------------------------------------------------------------------


def _early_status(raw: RawClient, sid: int) -> tuple[bytes, int, str]:
    (headers,) = raw.headers_for(sid)
    return (
        headers[b":status"],
        int(headers[b"grpc-status"]),
        decode_grpc_message(headers.get(b"grpc-message", b"")),
    )


def test_unknown_method_is_unimplemented() -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    sid = raw.request(framed(b"x"), path=b"/trio_sign.v1.SignService/Nope")
    assert raw.server_events == []
    assert _early_status(raw, sid) == (
        b"200",
        StatusCode.UNIMPLEMENTED,
        "unknown method /trio_sign.v1.SignService/Nope",
    )


@pytest.mark.parametrize(
    ("content_type", "http", "status"),
    [
        (b"application/json", b"415", StatusCode.INTERNAL),
        (None, b"415", StatusCode.INTERNAL),
        (b"text/grpc", b"415", StatusCode.INTERNAL),
        (b"application/grpc+json", b"200", StatusCode.UNIMPLEMENTED),
    ],
)
def test_bad_content_type(content_type: bytes | None, http: bytes, status: StatusCode) -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    sid = raw.request(framed(b"x"), content_type=content_type)
    assert raw.server_events == []
    assert _early_status(raw, sid)[:2] == (http, status)


def test_bad_content_type_seen_by_client_core() -> None:
    """Our client reads grpc-status when present, else maps the HTTP status."""
    client = GrpcClientConnection()
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    client.initiate()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid1 = client.start_request(PING)
    sid2 = client.start_request(PING)
    client.send_message(sid1, b"x", end_stream=True)
    client.send_message(sid2, b"x", end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(sid1, [(b":status", b"415"), (b"grpc-status", b"13")], end_stream=True)
    server.send_headers(sid2, [(b":status", b"503")], end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert [(e.stream_id, e.status) for e in events if isinstance(e, TrailersReceived)] == [
        (sid1, StatusCode.INTERNAL),
        (sid2, StatusCode.UNAVAILABLE),
    ]


def test_get_is_refused_with_405() -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    sid = raw.request(None, method=b"GET")
    assert _early_status(raw, sid)[:2] == (b"405", StatusCode.INTERNAL)


def test_missing_te_trailers() -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    sid = raw.request(framed(b"x"), te=None)
    assert _early_status(raw, sid) == (
        b"200",
        StatusCode.INTERNAL,
        "te: trailers header is missing",
    )


def _malformed_request_is_reset(headers: list[tuple[bytes, bytes]]) -> None:
    """RFC 9113 §8.1.1: a malformed request is a stream error PROTOCOL_ERROR; the connection
    and other streams carry on."""
    server = GrpcServerConnection(methods=METHODS)
    raw = RawClient(server)
    sid = raw.h2.get_next_available_stream_id()
    raw.h2.send_headers(sid, headers, end_stream=True)
    raw.flush()
    assert not raw.server_events  # the handler layer never hears of it
    assert not server.terminated
    resets = [e for e in raw.h2_events if isinstance(e, h2.events.StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [(sid, ErrorCodes.PROTOCOL_ERROR)]
    ok = raw.request(framed(b"x"))
    assert ok != sid  # a good request on the same connection still works
    assert any(isinstance(e, RequestReceived) for e in raw.server_events)


_GOOD_HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/pkg.Svc/M"),
    (b":authority", b"x"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([h for h in _GOOD_HEADERS if h[0] != b":path"], id="missing-path"),
        pytest.param([h for h in _GOOD_HEADERS if h[0] != b":scheme"], id="missing-scheme"),
        pytest.param([*_GOOD_HEADERS[:2], (b":path", b""), *_GOOD_HEADERS[3:]], id="empty-path"),
        pytest.param([*_GOOD_HEADERS, (b":path", b"/a/b")], id="pseudo-after-regular"),
        pytest.param([(b":method", b"POST"), *_GOOD_HEADERS], id="duplicate-pseudo"),
        pytest.param([(b":status", b"200"), *_GOOD_HEADERS], id="response-pseudo"),
        pytest.param([*_GOOD_HEADERS, (b"X-Upper", b"v")], id="upper-case-name"),
        pytest.param([*_GOOD_HEADERS, (b"connection", b"close")], id="connection-header"),
        pytest.param([*_GOOD_HEADERS[:5], (b"te", b"gzip")], id="te-not-trailers"),
        pytest.param([*_GOOD_HEADERS, (b"x-a", b"v\r\nx-b: w")], id="crlf-in-value"),
        pytest.param([*_GOOD_HEADERS, (b"x-a", b"v\x00")], id="nul-in-value"),
    ],
)
def test_malformed_request_headers_reset_the_stream(headers: list[tuple[bytes, bytes]]) -> None:
    _malformed_request_is_reset(headers)


def test_relative_path_is_unimplemented() -> None:
    raw = RawClient(GrpcServerConnection())
    sid = raw.request(framed(b"x"), path=b"*")
    assert _early_status(raw, sid)[1] == StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "value", [b"", b"S", b"1", b"123456789S", b"1x", b"-1S", b"1.5S", b"1 S", b"1s"]
)
def test_bad_grpc_timeout(value: bytes) -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    sid = raw.request(framed(b"x"), extra=[(b"grpc-timeout", value)])
    http, status, message = _early_status(raw, sid)
    assert (http, status) == (b"200", StatusCode.INTERNAL)
    assert message.startswith("malformed grpc-timeout")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"250m", 0.25),
        (b"99999999u", 99.999999),
        (b"5n", 5e-9),
        (b"0S", 0.0),
        (b"00000001S", 1.0),
    ],
)
def test_grpc_timeout_units(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    raw.request(framed(b"x"), extra=[(b"grpc-timeout", value)])
    request = raw.server_events[0]
    assert isinstance(request, RequestReceived)
    assert request.deadline_s == pytest.approx(seconds)


@given(st.floats(min_value=1e-9, max_value=1e9, allow_nan=False))
def test_grpc_timeout_format_round_trip(seconds: float) -> None:
    wire = format_grpc_timeout(seconds)
    assert len(wire) <= 9
    parsed = parse_grpc_timeout(wire)
    assert parsed >= seconds * (1 - 1e-12)  # rounded up, never shorter
    assert parsed <= seconds * 1.0001 + 1e-9 or parsed - seconds < 3600


def test_grpc_timeout_format_edges() -> None:
    assert format_grpc_timeout(0) == b"1n"
    assert format_grpc_timeout(-5) == b"1n"
    assert format_grpc_timeout(0.0015) == b"1500000n"
    assert format_grpc_timeout(1e12) == b"99999999H"


def test_unsupported_grpc_encoding() -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    sid = raw.request(framed(b"x", flag=1), extra=[(b"grpc-encoding", b"gzip")])
    (headers,) = raw.headers_for(sid)
    assert int(headers[b"grpc-status"]) == StatusCode.UNIMPLEMENTED
    assert headers[b"grpc-accept-encoding"] == b"identity"


def test_identity_encoding_is_accepted() -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    raw.request(framed(b"x"), extra=[(b"grpc-encoding", b"identity")])
    assert [type(e) for e in raw.server_events] == [RequestReceived, MessageReceived, StreamEnded]


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (framed(b"abc", flag=1), StatusCode.INTERNAL, "compressed message"),
        (framed(b"abc", flag=2), StatusCode.INTERNAL, "invalid message flags"),
        (framed(b"abc")[:6], StatusCode.INTERNAL, "request ended inside a message"),
        (b"\x00\x00", StatusCode.INTERNAL, "request ended inside a message"),
        (framed(b"ok") + framed(b"abc")[:-1], StatusCode.INTERNAL, "ended inside a message"),
        (b"\x00" + (100).to_bytes(4, "big"), StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ],
)
def test_bad_message_framing(body: bytes, status: StatusCode, text: str) -> None:
    server = GrpcServerConnection(methods=METHODS, max_receive_message_size=64)
    raw = RawClient(server)
    sid = raw.request(body)
    errors = [e for e in raw.server_events if isinstance(e, StreamError)]
    assert len(errors) == 1
    assert errors[0].stream_id == sid
    assert errors[0].status == status
    assert text in errors[0].message
    assert not any(isinstance(e, StreamEnded) for e in raw.server_events)
    (headers,) = raw.headers_for(sid)
    assert int(headers[b"grpc-status"]) == status
    assert server.open_streams == 0


def test_oversized_message_answered_before_body_and_client_told_to_stop() -> None:
    server = GrpcServerConnection(methods=METHODS, max_receive_message_size=1024)
    raw = RawClient(server)
    # Only the prefix has been looked at when the server answers; the rest of the body and
    # the end of the stream are still on their way and get discarded without trouble.
    sid = raw.h2.get_next_available_stream_id()
    raw.h2.send_headers(
        sid,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", PING.encode()),
            (b":authority", b"x"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
        ],
    )
    raw.h2.send_data(sid, b"\x00" + (10**6).to_bytes(4, "big"))
    assert [type(e) for e in server.receive_data(raw.h2.data_to_send())] == [
        RequestReceived,
        StreamError,
    ]
    answer = server.data_to_send()
    frames = [f for f in _frames(answer) if f[1] == sid]
    # Trailers-only HEADERS, then RST_STREAM(NO_ERROR): "stop sending, no error" (RFC 9113 8.1).
    assert [(f[0], f[2]) for f in frames[1:]] == [(0x3, b"\x00\x00\x00\x00")]
    assert frames[0][0] == 0x1
    raw.h2_events += raw.h2.receive_data(answer)
    (headers,) = raw.headers_for(sid)
    assert int(headers[b"grpc-status"]) == StatusCode.RESOURCE_EXHAUSTED
    assert decode_grpc_message(headers[b"grpc-message"]) == (
        "received message larger than max (1000000 vs. 1024)"
    )
    # Body bytes the client had already sent are discarded without trouble.
    assert server.receive_data(b"\x00\x00\x05\x00\x01" + sid.to_bytes(4, "big") + b"12345") == []
    assert not server.terminated
    assert server.open_streams == 0


def test_message_exactly_at_the_limit_is_accepted() -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS, max_receive_message_size=64))
    sid = raw.request(framed(b"a" * 64))
    assert MessageReceived(sid, b"a" * 64) in raw.server_events


def test_oversized_response_fails_the_client_call() -> None:
    client = GrpcClientConnection(max_receive_message_size=10)
    server = GrpcServerConnection(methods=METHODS)
    client.initiate()
    server.initiate()
    pump(client, server)
    sid = client.start_request(PING)
    client.send_message(sid, b"x", end_stream=True)
    pump(client, server)
    server.send_response(sid, b"y" * 11)
    _server_events, client_events = pump(client, server)
    assert client_events[-1] == StreamError(
        sid, StatusCode.RESOURCE_EXHAUSTED, "received message larger than max (11 vs. 10)"
    )


# --- client-side response validation ------------------------------------------------------------


class RawServer:
    def __init__(self, client: GrpcClientConnection) -> None:
        self.client = client
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False, header_encoding=None, validate_outbound_headers=False
            )
        )
        self.h2.initiate_connection()
        client.initiate()
        self.client_events: list[Event] = []
        self.flush()

    def flush(self) -> None:
        for _ in range(1000):
            out = self.client.data_to_send()
            if out:
                self.h2.receive_data(out)
            back = self.h2.data_to_send()
            if back:
                try:
                    self.client_events += self.client.receive_data(back)
                except Exception as exc:
                    raise ServerCoreRaised(f"client core raised {exc!r}") from exc
            if not out and not back:
                return

    def call(self) -> int:
        sid = self.client.start_request(PING)
        self.client.send_message(sid, b"x", end_stream=True)
        self.flush()
        return sid


def test_client_trailers_without_grpc_status_is_unknown() -> None:
    raw = RawServer(GrpcClientConnection())
    sid = raw.call()
    raw.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    raw.h2.send_data(sid, framed(b"r"))
    raw.h2.send_headers(sid, [(b"x-other", b"1")], end_stream=True)
    raw.flush()
    assert raw.client_events[-1] == TrailersReceived(
        sid, StatusCode.UNKNOWN, "response trailers carry no grpc-status", (("x-other", "1"),)
    )


def test_client_stream_end_without_trailers_is_internal() -> None:
    raw = RawServer(GrpcClientConnection())
    sid = raw.call()
    raw.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    raw.h2.send_data(sid, framed(b"r"), end_stream=True)
    raw.flush()
    last = raw.client_events[-1]
    assert isinstance(last, TrailersReceived)
    assert last.status == StatusCode.INTERNAL


def test_client_trailers_only_and_bad_status_values() -> None:
    raw = RawServer(GrpcClientConnection())
    sids = [raw.call() for _ in range(3)]
    base = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    raw.h2.send_headers(sids[0], [*base, (b"grpc-status", b"5")], end_stream=True)
    raw.h2.send_headers(sids[1], [*base, (b"grpc-status", b"abc")], end_stream=True)
    raw.h2.send_headers(sids[2], [*base, (b"grpc-status", b"99")], end_stream=True)
    raw.flush()
    statuses = [e.status for e in raw.client_events if isinstance(e, TrailersReceived)]
    assert statuses == [StatusCode.NOT_FOUND, StatusCode.UNKNOWN, StatusCode.UNKNOWN]


def test_client_non_grpc_content_type_is_unknown() -> None:
    raw = RawServer(GrpcClientConnection())
    sid = raw.call()
    raw.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/html")])
    raw.flush()
    last = raw.client_events[-1]
    assert isinstance(last, TrailersReceived)
    assert last.status == StatusCode.UNKNOWN


def test_client_truncated_response_with_ok_is_internal() -> None:
    raw = RawServer(GrpcClientConnection())
    sid = raw.call()
    raw.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    raw.h2.send_data(sid, framed(b"abc")[:-1])
    raw.h2.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    raw.flush()
    last = raw.client_events[-1]
    assert isinstance(last, TrailersReceived)
    assert last.status == StatusCode.INTERNAL


# --- resets, ping, drain -------------------------------------------------------------------------


def test_client_reset_reaches_server() -> None:
    client, server = pair()
    sid = client.start_request(PING)
    client.send_message(sid, b"x", end_stream=True)
    pump(client, server)
    client.reset(sid)
    server_events, _ = pump(client, server)
    assert server_events == [StreamReset(sid, ErrorCodes.CANCEL, StatusCode.CANCELLED)]
    assert server.open_streams == 0
    with pytest.raises(GrpcProtocolError):
        server.send_response(sid, b"late")


def test_server_reset_reaches_client() -> None:
    client, server = pair()
    sid = client.start_request(PING)
    client.send_message(sid, b"x", end_stream=True)
    pump(client, server)
    server.reset(sid, ErrorCodes.REFUSED_STREAM)
    _, client_events = pump(client, server)
    assert client_events == [StreamReset(sid, ErrorCodes.REFUSED_STREAM, StatusCode.UNAVAILABLE)]


def test_ping_is_answered() -> None:
    raw = RawClient(GrpcServerConnection(methods=METHODS))
    raw.h2.ping(b"12345678")
    raw.flush()
    acks = [e for e in raw.h2_events if isinstance(e, h2.events.PingAckReceived)]
    assert [a.ping_data for a in acks] == [b"12345678"]


def test_graceful_drain() -> None:
    client, server = pair()
    open_sid = client.start_request(PING)
    client.send_message(open_sid, b"x", end_stream=True)
    pump(client, server)
    # A request the server has not seen yet when it drains:
    late_sid = client.start_request(PING)
    client.send_message(late_sid, b"y", end_stream=True)
    server.start_drain()
    assert server.draining
    # Bytes cross in flight: the server sees the late request after its GOAWAY.
    server_events = server.receive_data(client.data_to_send())
    assert server_events == []  # refused, never surfaced
    client_events = client.receive_data(server.data_to_send())
    assert client_events[0] == ConnectionTerminated(0, open_sid, "")
    assert (
        TrailersReceived(
            late_sid, StatusCode.UNAVAILABLE, "server is going away; the call was not processed", ()
        )
        in client_events
    )
    assert not client.can_open_stream
    with pytest.raises(GrpcProtocolError):
        client.start_request(PING)
    # The open call still completes after the GOAWAY.
    server.send_response(open_sid, b"done")
    _, client_events = pump(client, server)
    assert client_events[-1] == TrailersReceived(open_sid, StatusCode.OK, "", ())
    server.close()
    _, client_events = pump(client, server)
    assert client_events == [ConnectionTerminated(0, open_sid, "")]


def test_refused_stream_on_raw_wire_after_drain() -> None:
    server = GrpcServerConnection(methods=METHODS)
    raw = RawClient(server)
    first = raw.request(framed(b"x"))
    server.start_drain()
    goaway = server.data_to_send()
    assert _frames(goaway) == [(0x7, 0, first.to_bytes(4, "big") + b"\x00" * 4)]
    # The client had not seen the GOAWAY yet and opens another stream: refused.
    second = raw.h2.get_next_available_stream_id()
    raw.h2.send_headers(
        second,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", PING.encode()),
            (b":authority", b"x"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
        ],
        end_stream=True,
    )
    assert server.receive_data(raw.h2.data_to_send()) == []
    rst = [f for f in _frames(server.data_to_send()) if f[0] == 0x3]
    assert rst == [(0x3, second, ErrorCodes.REFUSED_STREAM.to_bytes(4, "big"))]
    # The stream accepted before the GOAWAY is still answered.
    server.send_response(first, b"ok")
    headers_frames = [f for f in _frames(server.data_to_send()) if f[1] == first]
    assert [f[0] for f in headers_frames] == [0x1, 0x0, 0x1]  # HEADERS, DATA, HEADERS


# --- flow control --------------------------------------------------------------------------------


def test_large_messages_respect_default_64k_windows() -> None:
    size = 1024 * 1024 + 7
    client = GrpcClientConnection(initial_window_size=65535)
    server = GrpcServerConnection(methods=METHODS, initial_window_size=65535)
    client.initiate()
    server.initiate()
    pump(client, server)
    sid = client.start_request(PING)
    client.send_message(sid, b"q" * size, end_stream=True)
    # One batch can carry at most the initial windows' worth of DATA.
    first = client.data_to_send()
    assert 65535 <= len(first) < 65535 + 1024
    server_events = server.receive_data(first)
    more_server, _ = pump(client, server)
    server_events += more_server
    messages = [e for e in server_events if isinstance(e, MessageReceived)]
    assert messages == [MessageReceived(sid, b"q" * size)]
    assert server_events[-1] == StreamEnded(sid)
    server.send_response(sid, b"r" * size)
    _, client_events = pump(client, server)
    assert MessageReceived(sid, b"r" * size) in client_events
    assert client_events[-1] == TrailersReceived(sid, StatusCode.OK, "", ())


def test_trailers_wait_behind_blocked_data() -> None:
    client = GrpcClientConnection(initial_window_size=65535)
    server = GrpcServerConnection(methods=METHODS)
    client.initiate()
    server.initiate()
    pump(client, server)
    sid = client.start_request(PING)
    client.send_message(sid, b"x", end_stream=True)
    pump(client, server)
    server.send_response(sid, b"z" * 200_000)
    # Deliver only the server's bytes, no WINDOW_UPDATE back yet: no trailers may arrive.
    events = client.receive_data(server.data_to_send())
    assert not any(isinstance(e, TrailersReceived) for e in events)
    _, rest = pump(client, server)
    assert rest[-1] == TrailersReceived(sid, StatusCode.OK, "", ())


# --- chunking invariance (Hypothesis) ---------------------------------------------------


def _scripted_exchange(chunker: Chunker) -> tuple[list[Event], list[Event]]:
    client = GrpcClientConnection(initial_window_size=65535)
    server = GrpcServerConnection(methods=METHODS, initial_window_size=65535)
    client.initiate()
    server.initiate()
    all_server, all_client = pump(client, server, chunker)
    sids = []
    for i, size in enumerate((0, 1, 5, 70_000, 300)):
        sid = client.start_request(PING, metadata=[("x-i", str(i))])
        client.send_message(sid, bytes([i]) * size, end_stream=True)
        sids.append(sid)
    bad = client.start_request("/trio_sign.v1.SignService/Nope")
    client.send_message(bad, b"?", end_stream=True)
    s, c = pump(client, server, chunker)
    all_server += s
    all_client += c
    for i, sid in enumerate(sids):
        if i == 2:
            server.send_trailers(sid, StatusCode.INVALID_ARGUMENT, "bad «input»")
        else:
            server.send_response(sid, b"r" * (i * 20_000))
    server.start_drain()
    s, c = pump(client, server, chunker)
    all_server += s
    all_client += c
    return all_server, all_client


_REFERENCE = _scripted_exchange(whole)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=16))
def test_random_chunking_gives_the_same_events(sizes: list[int]) -> None:
    def chunker(blob: bytes) -> list[bytes]:
        out = []
        i = k = 0
        while i < len(blob):
            n = sizes[k % len(sizes)]
            out.append(blob[i : i + n])
            i += n
            k += 1
        return out

    server_events, client_events = _scripted_exchange(chunker)
    # Per stream, the events are identical. Across streams, the order in which streams that
    # were blocked on flow control finish depends on when WINDOW_UPDATEs land, so it may vary.
    assert _by_stream(server_events) == _by_stream(_REFERENCE[0])
    assert _by_stream(client_events) == _by_stream(_REFERENCE[1])


def _by_stream(events: list[Event]) -> dict[int | None, list[Event]]:
    out: dict[int | None, list[Event]] = {}
    for ev in events:
        out.setdefault(getattr(ev, "stream_id", None), []).append(ev)
    return out


def test_reference_exchange_is_what_we_think() -> None:
    server_events, client_events = _REFERENCE
    assert sum(isinstance(e, RequestReceived) for e in server_events) == 5
    statuses = [e.status for e in client_events if isinstance(e, TrailersReceived)]
    assert statuses == [
        StatusCode.UNIMPLEMENTED,
        StatusCode.OK,
        StatusCode.OK,
        StatusCode.INVALID_ARGUMENT,
        StatusCode.OK,
        StatusCode.OK,
    ]
    assert ConnectionTerminated(0, 11, "") in client_events


# --- text encodings ------------------------------------------------------------------------------


@given(st.text())
def test_grpc_message_round_trip(message: str) -> None:
    wire = encode_grpc_message(message)
    assert all(0x20 <= b <= 0x7E for b in wire)
    expected = message.encode("utf-8", "replace").decode("utf-8", "replace")
    assert decode_grpc_message(wire) == expected


def test_grpc_message_malformed_escapes_are_kept() -> None:
    assert decode_grpc_message(b"50%") == "50%"
    assert decode_grpc_message(b"%zz%4") == "%zz%4"
    assert decode_grpc_message(b"%41%e2%82%ac") == "A€"


def test_events_are_frozen() -> None:
    ev = MessageReceived(1, b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.data = b"y"  # type: ignore[misc]


def test_public_api() -> None:
    assert sorted(trio_sign.rpc.__all__) == sorted(
        [
            "DEFAULT_MAX_RECEIVE_MESSAGE_SIZE",
            "BurstListener",
            "CallContext",
            "ConnectionTerminated",
            "Event",
            "GrpcChannel",
            "GrpcClientConnection",
            "GrpcProtocolError",
            "GrpcServer",
            "GrpcServerConnection",
            "LogThrottle",
            "MessageReceived",
            "Metadata",
            "RequestReceived",
            "ResponseReceived",
            "RpcError",
            "RateLimitedLog",
            "ServerLimits",
            "ServerStats",
            "StatusCode",
            "StreamEnded",
            "StreamError",
            "StreamReset",
            "SupportsSerializeToString",
            "TrailersReceived",
            "UnaryHandler",
            "connection_limit",
            "open_grpc_channel",
            "protobuf_handler",
            "raise_open_file_limit",
            "serve_grpc",
        ]
    )
    for name in trio_sign.rpc.__all__:
        assert getattr(trio_sign.rpc, name) is not None
    assert issubclass(trio_sign.rpc.RpcError, trio_sign.TrioSignError)
    assert issubclass(trio_sign.rpc.GrpcProtocolError, trio_sign.TrioSignError)
    assert [int(c) for c in StatusCode] == list(range(17))
    assert h2.settings  # imported for RawClient users


# --- arbitrary client behaviour (Hypothesis) ------------------------------------------------------

_PATHS = [PING.encode(), b"/trio_sign.v1.SignService/Nope", b"*"]
_CONTENT_TYPES = [b"application/grpc", b"application/grpc+proto", b"text/plain", None]
_op = st.one_of(
    st.tuples(
        st.just("headers"),
        st.sampled_from(_PATHS),
        st.sampled_from(_CONTENT_TYPES),
        st.sampled_from([None, b"1S", b"bad"]),
        st.booleans(),
    ),
    st.tuples(
        st.just("data"), st.integers(0, 5), st.binary(min_size=1, max_size=80), st.booleans()
    ),
    st.tuples(st.just("reset"), st.integers(0, 5)),
    st.tuples(st.just("ping")),
    st.tuples(st.just("flush")),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_op, max_size=25), st.integers(0, 3))
def test_server_core_survives_any_client_behaviour(
    ops: list[tuple[object, ...]], seed: int
) -> None:
    """Whatever a (valid HTTP/2) client does on its streams, the server core never raises and
    never terminates the connection."""
    server = GrpcServerConnection(methods=METHODS, max_receive_message_size=40)
    raw = RawClient(server)
    sids: list[int] = []
    for op in ops:
        try:
            if op[0] == "headers":
                _, path, ctype, timeout, end = op
                assert isinstance(path, bytes)
                extra = [(b"grpc-timeout", timeout)] if isinstance(timeout, bytes) else []
                sid = raw.h2.get_next_available_stream_id()
                headers = [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", path),
                    (b":authority", b"x"),
                    (b"te", b"trailers"),
                ]
                if isinstance(ctype, bytes):
                    headers.append((b"content-type", ctype))
                sids.append(sid)
                raw.h2.send_headers(sid, headers + extra, end_stream=bool(end))
            elif op[0] == "data" and sids:
                _, idx, body, end = op
                assert isinstance(idx, int)
                assert isinstance(body, bytes)
                sid = sids[idx % len(sids)]
                if not raw.h2.streams.get(sid) or not raw.h2.streams[sid].open:
                    continue
                raw.h2.send_data(sid, body, end_stream=bool(end))
            elif op[0] == "reset" and sids:
                idx = op[1]
                assert isinstance(idx, int)
                sid = sids[idx % len(sids)]
                if not raw.h2.streams.get(sid) or raw.h2.streams[sid].closed:
                    continue
                raw.h2.reset_stream(sid)
            elif op[0] == "ping":
                raw.h2.ping(b"01234567")
            elif op[0] == "flush":
                raw.flush()
        except h2.exceptions.H2Error:
            # Our raw h2 client got itself into a state it cannot continue from; the server
            # got this far without raising, which is what this test is about.
            event("raw client gave up")
            return
        # The application answers whatever it has seen so far, like a real handler would.
        for ev in raw.server_events:
            if isinstance(ev, StreamEnded):
                with contextlib.suppress(GrpcProtocolError):
                    server.send_response(ev.stream_id, b"ok" * seed)
        raw.server_events.clear()
    with contextlib.suppress(h2.exceptions.H2Error):
        raw.flush()
        assert not server.terminated
        event("ran to the end")
    # The receive budget's bookkeeping matches what the streams really hold.
    assert server._buffered == sum(len(st.inbuf) for st in server._streams.values())


def test_early_answer_while_request_body_is_blocked_frees_the_stream() -> None:
    """A server that answers before reading the whole request, without resetting the stream
    (RFC 9113 allows it), must not leave a half-open stream counting against its limit."""
    raw = RawServer(GrpcClientConnection())
    sid = raw.client.start_request(PING)
    raw.client.send_message(sid, b"b" * 500_000, end_stream=True)  # blocked at 64 KiB
    raw.flush()
    raw.h2.send_headers(
        sid,
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"8")],
        end_stream=True,
    )
    raw.flush()
    last = raw.client_events[-1]
    assert isinstance(last, TrailersReceived)
    assert last.status == StatusCode.RESOURCE_EXHAUSTED
    assert raw.client.open_streams == 0
    # h2 no longer counts it either: the client reset its still-open half.
    assert raw.client._h2.open_outbound_streams == 0


def test_incomplete_messages_across_streams_are_bounded() -> None:
    server = GrpcServerConnection(methods=METHODS, max_receive_message_size=1000)
    raw = RawClient(server)
    budget = 2 * 1000 + 65536
    failed = []
    for _ in range(100):
        # Each stream parks 900 bytes of a 1000-byte message and never finishes it.
        raw.request(b"\x00" + (1000).to_bytes(4, "big") + b"p" * 895, end=False)
        failed += [e for e in raw.server_events if isinstance(e, StreamError)]
        raw.server_events.clear()
        assert server._buffered <= budget
    assert failed
    assert all(e.status == StatusCode.RESOURCE_EXHAUSTED for e in failed)
    assert "too much incomplete message data" in failed[0].message
    assert not server.terminated
    # A stream that completes its message frees its share again.
    survivor = min(server._streams)
    before = server._buffered
    raw.h2.send_data(survivor, b"q" * 105, end_stream=True)
    raw.flush()
    assert MessageReceived(survivor, b"p" * 895 + b"q" * 105) in raw.server_events
    assert server._buffered == before - 900


_FINAL = (TrailersReceived, StreamError, StreamReset)
_server_op = st.one_of(
    st.tuples(st.just("call"), st.integers(0, 300)),
    st.tuples(
        st.just("headers"),
        st.integers(0, 5),
        st.sampled_from([b"200", b"404", b"503"]),
        st.sampled_from([b"application/grpc", b"text/html", None]),
        st.sampled_from([None, b"0", b"5", b"x"]),
        st.booleans(),
    ),
    st.tuples(
        st.just("data"), st.integers(0, 5), st.binary(min_size=1, max_size=60), st.booleans()
    ),
    st.tuples(st.just("trailers"), st.integers(0, 5), st.sampled_from([None, b"0", b"13"])),
    st.tuples(st.just("reset"), st.integers(0, 5)),
    st.tuples(st.just("flush")),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_server_op, max_size=25))
def test_client_core_survives_any_server_behaviour(ops: list[tuple[object, ...]]) -> None:
    """Whatever a (valid HTTP/2) server does on the client's streams, the client core never
    raises and ends every call at most once."""
    raw = RawServer(GrpcClientConnection(max_receive_message_size=30))
    client = raw.client
    sids: list[int] = []
    for op in ops:
        try:
            if op[0] == "call":
                size = op[1]
                assert isinstance(size, int)
                sid = client.start_request(PING)
                client.send_message(sid, b"r" * size, end_stream=True)
                sids.append(sid)
                continue
            if op[0] == "flush":
                raw.flush()
                continue
            if not sids:
                continue
            idx = op[1]
            assert isinstance(idx, int)
            sid = sids[idx % len(sids)]
            stream = raw.h2.streams.get(sid)
            if stream is None or stream.closed:
                continue
            if op[0] == "headers":
                _, _, status, ctype, grpc_status, end = op
                assert isinstance(status, bytes)
                headers = [(b":status", status)]
                if isinstance(ctype, bytes):
                    headers.append((b"content-type", ctype))
                if isinstance(grpc_status, bytes):
                    headers.append((b"grpc-status", grpc_status))
                raw.h2.send_headers(sid, headers, end_stream=bool(end))
            elif op[0] == "data":
                _, _, body, end = op
                assert isinstance(body, bytes)
                raw.h2.send_data(sid, body, end_stream=bool(end))
            elif op[0] == "trailers":
                grpc_status = op[2]
                trailers = [(b"grpc-status", grpc_status)] if isinstance(grpc_status, bytes) else []
                raw.h2.send_headers(sid, trailers or [(b"x-none", b"1")], end_stream=True)
            elif op[0] == "reset":
                raw.h2.reset_stream(sid)
        except h2.exceptions.H2Error:
            event("raw server gave up")
            return
        except GrpcProtocolError:
            continue  # e.g. the server's stream limit: the core refused to start a call
    with contextlib.suppress(h2.exceptions.H2Error):
        raw.flush()
        event("ran to the end")
    finals = [e.stream_id for e in raw.client_events if isinstance(e, _FINAL)]
    assert len(finals) == len(set(finals))
    assert set(finals).isdisjoint(client._streams)
    assert client._buffered == sum(len(st.inbuf) for st in client._streams.values())


@pytest.mark.parametrize(
    ("metadata", "text"),
    [
        ([("x-ok", "a\r\nb")], "printable ASCII"),
        ([("X Bad", "v")], "reserved or not of"),
        ([("grpc-status", "0")], "reserved or not of"),
        ([("content-type", "text/plain")], "reserved or not of"),
        ([(":path", "/x")], "reserved or not of"),
        ([("x-bytes", b"\x00")], "'-bin' key"),
        ([("x-text", "ü")], "must be ASCII"),
    ],
)
def test_bad_outgoing_metadata_is_refused(
    metadata: list[tuple[str, str | bytes]], text: str
) -> None:
    client, _ = pair()
    with pytest.raises(GrpcProtocolError, match=text):
        client.start_request(PING, metadata=metadata)
    assert client.open_streams == 0
