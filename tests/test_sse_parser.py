"""The sans-io SSE cores: the event-stream parser (WHATWG rules) and the HTTP/1.1 client side."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign import TrioSignError
from trio_sign.sse import (
    BodyData,
    EndOfMessage,
    EventStreamParser,
    MessageEvent,
    ResponseEvent,
    ResponseHead,
    ResponseParser,
    RetryChanged,
    SseProtocolError,
    SseResponseError,
    build_request,
    check_event_stream,
    events_url,
    parse_events_url,
    valid_node_id,
)
from trio_sign.transport import TransportError


def M(data: str, type: str = "message", id: str = "") -> MessageEvent:
    return MessageEvent(type=type, data=data, last_event_id=id)


def parse(stream: bytes, **kwargs: int) -> tuple[list[MessageEvent | RetryChanged], str]:
    parser = EventStreamParser(**kwargs)  # type: ignore[arg-type]
    return parser.receive_data(stream), parser.last_event_id


def parse_bytewise(stream: bytes) -> tuple[list[MessageEvent | RetryChanged], str]:
    parser = EventStreamParser()
    events: list[MessageEvent | RetryChanged] = []
    for i in range(len(stream)):
        events += parser.receive_data(stream[i : i + 1])
    return events, parser.last_event_id


# (name, stream, expected events, expected last event id afterwards)
CASES: list[tuple[str, bytes, list[MessageEvent | RetryChanged], str]] = [
    # -- the spec's own examples (HTML, "Server-sent events", "Parsing an event stream") ------
    ("spec: stocks", b"data: YHOO\ndata: +2\ndata: 10\n\n", [M("YHOO\n+2\n10")], ""),
    (
        "spec: four blocks",
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n\n",
        [M("first event", id="1"), M("second event"), M(" third event")],
        "",
    ),
    (
        "spec: empty data and newline data",
        b"data\n\ndata\ndata\n\ndata:",
        [M(""), M("\n")],
        "",
    ),
    ("spec: space after colon is optional", b"data:test\n\ndata: test\n\n", [M("test")] * 2, ""),
    (
        "spec: event types",
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
        [M("73857293", "add"), M("2153", "remove"), M("113411", "add")],
        "",
    ),
    # -- line endings ------------------------------------------------------------------------
    ("LF", b"data: a\n\n", [M("a")], ""),
    ("CRLF", b"data: a\r\n\r\n", [M("a")], ""),
    ("CR", b"data: a\r\r", [M("a")], ""),
    ("mixed", b"data: a\rdata: b\r\ndata: c\n\r\n", [M("a\nb\nc")], ""),
    ("LF CR is two line endings", b"data: a\n\rdata: b\n\n", [M("a"), M("b")], ""),
    ("CR CR LF is two", b"data: a\r\r\ndata: b\n\n", [M("a"), M("b")], ""),
    # -- BOM ---------------------------------------------------------------------------------
    ("BOM stripped", b"\xef\xbb\xbfdata: a\n\n", [M("a")], ""),
    (
        "only one BOM stripped",
        b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n",
        [M("b")],  # the second BOM is part of the first field name: "\ufeffdata" is unknown
        "",
    ),
    ("BOM later is data", b"data: \xef\xbb\xbfa\n\n", [M("\ufeffa")], ""),
    # -- comments, fields, values ------------------------------------------------------------
    ("comment only", b": hello\n\n", [], ""),
    ("comment between data", b"data: a\n: x\ndata: b\n\n", [M("a\nb")], ""),
    ("only one space stripped", b"data:  a \n\n", [M(" a ")], ""),
    ("tab not stripped", b"data:\ta\n\n", [M("\ta")], ""),
    ("colon in value", b"data: a:b: c\n\n", [M("a:b: c")], ""),
    ("unknown field ignored", b"foo: bar\ndata: a\n\n", [M("a")], ""),
    ("field names are case sensitive", b"Data: a\nDATA: b\n\n", [], ""),
    ("field with space before colon is unknown", b"data : a\n\n", [], ""),
    ("event without data is not dispatched", b"event: x\n\ndata: a\n\n", [M("a")], ""),
    (
        "event name reset after dispatch",
        b"event: x\ndata: a\n\ndata: b\n\n",
        [M("a", "x"), M("b")],
        "",
    ),
    ("empty event name means message", b"event:\ndata: a\n\n", [M("a")], ""),
    ("last event field wins", b"event: x\nevent: y\ndata: a\n\n", [M("a", "y")], ""),
    # -- id ----------------------------------------------------------------------------------
    ("id", b"id: 7\ndata: a\n\n", [M("a", id="7")], "7"),
    ("id persists", b"id: 7\ndata: a\n\ndata: b\n\n", [M("a", id="7"), M("b", id="7")], "7"),
    ("id without data updates last id", b"id: 7\n\n", [], "7"),
    ("id not applied before dispatch", b"id: 7\ndata: a", [], ""),
    ("id with NUL ignored", b"id: 1\n\nid: 2\x003\ndata: a\n\n", [M("a", id="1")], "1"),
    ("id with NUL alone", b"id: \x00\ndata: a\n\n", [M("a")], ""),
    ("empty id resets", b"id: 1\n\nid\ndata: a\n\n", [M("a")], ""),
    ("id may contain spaces and unicode", b"id:  \xc3\xa9 x\n\n", [], " \u00e9 x"),
    # -- retry -------------------------------------------------------------------------------
    ("retry", b"retry: 5000\n", [RetryChanged(5000)], ""),
    ("retry zero", b"retry: 0\n", [RetryChanged(0)], ""),
    ("retry leading zeros", b"retry: 0042\n", [RetryChanged(42)], ""),
    ("retry not digits", b"retry: 5s\nretry: -1\nretry: 1.5\nretry:  5\nretry\n", [], ""),
    ("retry non-ASCII digits", "retry: \u0661\u0662\n".encode(), [], ""),
    ("retry huge is clamped", b"retry: " + b"9" * 5000 + b"\n", [RetryChanged(10**12)], ""),
    (
        "retry is emitted in place",
        b"data: a\nretry: 10\n\n",
        [RetryChanged(10), M("a")],
        "",
    ),
    # -- end of stream and UTF-8 ---------------------------------------------------------------
    ("incomplete event discarded", b"data: a\n", [], ""),
    ("no blank line", b"data: a", [], ""),
    ("invalid UTF-8 replaced", b"data: a\xffb\xc3\n\n", [M("a\ufffdb\ufffd")], ""),
    ("overlong encoding replaced", b"data: \xc0\xaf\n\n", [M("\ufffd\ufffd")], ""),
    ("multi-byte UTF-8", "data: 署名 🔑\n\n".encode(), [M("署名 🔑")], ""),
]


@pytest.mark.parametrize(
    ("stream", "expected", "last_id"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_spec_cases(
    stream: bytes, expected: list[MessageEvent | RetryChanged], last_id: str
) -> None:
    assert parse(stream) == (expected, last_id)
    assert parse_bytewise(stream) == (expected, last_id)


def test_cr_at_end_of_chunk_and_lf_at_start_of_next_is_one_line_ending() -> None:
    parser = EventStreamParser()
    assert parser.receive_data(b"data: a\r") == []
    assert parser.receive_data(b"\n") == []  # the same line ending: no blank line yet
    assert parser.receive_data(b"\r") == [M("a")]  # the blank line
    assert parser.receive_data(b"\n") == []  # the blank line's own LF, not another blank line
    assert parser.receive_data(b"data: b\n\n") == [M("b")]


def test_cr_then_empty_chunk_then_lf() -> None:
    parser = EventStreamParser()
    assert parser.receive_data(b"data: a\r") == []
    assert parser.receive_data(b"") == []
    assert parser.receive_data(b"\xc3") == []  # half a character decodes to nothing
    assert parser.receive_data(b"\xa9\n") == []  # "é" starts the next line: LF ends it
    # "é" was an unknown field; this blank line dispatches "a"
    assert parser.receive_data(b"\n") == [M("a")]


def test_bom_split_across_chunks() -> None:
    parser = EventStreamParser()
    assert parser.receive_data(b"\xef") == []
    assert parser.receive_data(b"\xbb") == []
    assert parser.receive_data(b"\xbfdata: a\n\n") == [M("a")]


def test_initial_last_event_id() -> None:
    parser = EventStreamParser(last_event_id="41")
    assert parser.last_event_id == "41"
    assert parser.receive_data(b"data: a\n\n") == [M("a", id="41")]
    with pytest.raises(ValueError, match="NUL"):
        EventStreamParser(last_event_id="a\0")


def test_line_length_limit() -> None:
    assert parse(b"data: " + b"x" * 4 + b"\n\n", max_line_length=10)[0] == [M("xxxx")]
    assert parse(b"x" * 10 + b"\n", max_line_length=10)[0] == []
    with pytest.raises(SseProtocolError, match="max_line_length"):
        parse(b"x" * 11 + b"\n", max_line_length=10)
    # also without a line ending: the partial line is bounded
    parser = EventStreamParser(max_line_length=10)
    parser.receive_data(b"x" * 10)
    with pytest.raises(SseProtocolError):
        parser.receive_data(b"x")
    with pytest.raises(SseProtocolError, match="already failed"):
        parser.receive_data(b"\n")


def test_event_size_limit() -> None:
    # 3 data lines of 2 characters: 3 * (2 + 1) = 9 characters with the separators
    assert parse(b"data:ab\ndata:ab\ndata:ab\n\n", max_event_size=9)[0] == [M("ab\nab\nab")]
    with pytest.raises(SseProtocolError, match="max_event_size"):
        parse(b"data:ab\ndata:ab\ndata:abc\n\n", max_event_size=9)
    with pytest.raises(SseProtocolError):
        parse(b"data\n" * 10, max_event_size=9)  # empty data lines count too
    # the budget is per event
    assert len(parse(b"data:abcdefgh\n\n" * 5, max_event_size=9)[0]) == 5


def test_error_rolls_back_last_event_id() -> None:
    parser = EventStreamParser(max_line_length=20)
    assert parser.receive_data(b"id: 1\ndata: a\n\n") == [M("a", id="1")]
    with pytest.raises(SseProtocolError):
        parser.receive_data(b"id: 2\ndata: b\n\n" + b"x" * 21)
    assert parser.last_event_id == "1"  # event 2 was never delivered: ask for it again


def test_protocol_error_is_a_trio_sign_error() -> None:
    assert issubclass(SseProtocolError, TrioSignError)
    assert issubclass(SseResponseError, SseProtocolError)


# -- Hypothesis --------------------------------------------------------------------------------

_PIECES = [
    "data", "event", "id", "retry", "foo", ":", ": ", " ", "x", "é", "🔑", "\0", "12", "\ufeff",
    "\r", "\n", "\r\n", "\n\n", "\r\r",
]  # fmt: skip
_streams = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=60).map(lambda p: "".join(p).encode()),
    st.lists(
        st.one_of(
            st.sampled_from([p.encode() for p in _PIECES]),
            st.binary(max_size=4),
            st.sampled_from([b"\xef\xbb\xbf", b"\xc3", b"\xa9", b"\xf0\x9f", b"\xff"]),
        ),
        max_size=60,
    ).map(b"".join),
)


def _feed(
    stream: bytes, cuts: list[int], **kwargs: int
) -> tuple[list[MessageEvent | RetryChanged], str] | str:
    parser = EventStreamParser(**kwargs)  # type: ignore[arg-type]
    points = sorted({min(c, len(stream)) for c in cuts})
    events: list[MessageEvent | RetryChanged] = []
    start = 0
    try:
        for end in [*points, len(stream)]:
            events += parser.receive_data(stream[start:end])
            start = end
    except SseProtocolError:
        return "error"
    return events, parser.last_event_id


@settings(max_examples=400, deadline=None)
@given(_streams, st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_chunking_gives_the_same_events(stream: bytes, cuts: list[int]) -> None:
    assert _feed(stream, cuts) == _feed(stream, [])


@settings(max_examples=300, deadline=None)
@given(_streams, st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_chunking_hits_the_same_limits(stream: bytes, cuts: list[int]) -> None:
    limits = {"max_line_length": 8, "max_event_size": 12}
    assert _feed(stream, cuts, **limits) == _feed(stream, [], **limits)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_random_bytes_raise_only_protocol_errors(chunks: list[bytes]) -> None:
    parser = EventStreamParser(max_line_length=32, max_event_size=64)
    try:
        for chunk in chunks:
            for event in parser.receive_data(chunk):
                assert isinstance(event, MessageEvent | RetryChanged)
    except SseProtocolError:
        pass


# -- HTTP/1.1 client side ----------------------------------------------------------------------

URL = "http://gateway.internal:8080/v1/enclaves/node-1/events"


def test_build_request() -> None:
    target = parse_events_url(URL)
    assert build_request(target) == (
        b"GET /v1/enclaves/node-1/events HTTP/1.1\r\n"
        b"Host: gateway.internal:8080\r\n"
        b"Accept: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"\r\n"
    )
    assert build_request(target, last_event_id="\u00e9 42") == (
        b"GET /v1/enclaves/node-1/events HTTP/1.1\r\n"
        b"Host: gateway.internal:8080\r\n"
        b"Accept: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Last-Event-ID: \xc3\xa9 42\r\n"
        b"\r\n"
    )
    with pytest.raises(ValueError, match="control"):
        build_request(target, last_event_id="a\rb")


def test_events_url() -> None:
    assert events_url("https://gw/", "node 1/x") == "https://gw/v1/enclaves/node%201%2Fx/events"
    assert parse_events_url("https://gw?a=b").target == "/?a=b"
    assert str(parse_events_url("HTTP://gw:80/p#frag")) == "http://gw:80/p"


@given(st.text(max_size=140))
def test_a_valid_node_id_is_its_own_path_segment(node_id: str) -> None:
    """What parent.toml and the boot channel's ``events`` accept: URL-unreserved characters
    only, so the id appears verbatim as one path segment, never as ``.``/``..``."""
    if not valid_node_id(node_id):
        assert (
            not 1 <= len(node_id) <= 128
            or node_id in (".", "..")
            or any(not (c.isascii() and (c.isalnum() or c in "._~-")) for c in node_id)
        )
        return
    url = events_url("https://gw.internal:8443", node_id)
    assert url == f"https://gw.internal:8443/v1/enclaves/{node_id}/events"
    assert parse_events_url(url).target == f"/v1/enclaves/{node_id}/events"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://gw/x", "scheme"),
        ("http://user:secret@gw/x", "credentials"),
        ("http:///x", "host"),
        ("http://gw/é", "percent-encode"),
        ("http://gw:99999/x", "not a URL"),
    ],
)
def test_events_url_refused(url: str, match: str) -> None:
    with pytest.raises(TransportError, match=match) as info:
        parse_events_url(url)
    assert "secret" not in str(info.value)


def _http(data: bytes, *, split: int | None = None, eof: bool = False) -> list[ResponseEvent]:
    parser = ResponseParser(max_head_size=256, max_headers=4)
    events: list[ResponseEvent] = []
    if split is None:
        for i in range(len(data)):
            events += parser.receive_data(data[i : i + 1])
    else:
        events += parser.receive_data(data[:split])
        events += parser.receive_data(data[split:])
    if eof:
        events += parser.receive_eof()
    return _merge(events)


def _merge(events: list[ResponseEvent]) -> list[ResponseEvent]:
    out: list[ResponseEvent] = []
    for event in events:
        if isinstance(event, BodyData) and out and isinstance(out[-1], BodyData):
            out[-1] = BodyData(out[-1].data + event.data)
        elif not (isinstance(event, BodyData) and not event.data):
            out.append(event)
    return out


HEAD_200 = ResponseHead(
    status=200,
    reason="OK",
    http_version="1.1",
    headers=(("content-type", "text/event-stream"), ("transfer-encoding", "chunked")),
)


@pytest.mark.parametrize("split", [None, 0, 10, 60, 75])
def test_chunked_response(split: int | None) -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
        b"A;ext=1 \r\n0123456789\r\n"
        b"6 ; name\r\n world\r\n"
        b"0\r\nX-Trailer: 1\r\n\r\n"
        b"ignored after the message"
    )
    assert _http(data, split=split) == [
        HEAD_200,
        BodyData(b"hello0123456789 world"),
        EndOfMessage(),
    ]


def test_close_delimited_and_content_length() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    events = _http(head + b"\r\ndata: a\n\n", eof=True)
    assert events[1:] == [BodyData(b"data: a\n\n"), EndOfMessage()]
    events = _http(head + b"Content-Length: 4\r\n\r\nabcdEXTRA")
    assert events[1:] == [BodyData(b"abcd"), EndOfMessage()]
    events = _http(head + b"Content-Length: 4, 4\r\n\r\nabcd")
    assert events[1:] == [BodyData(b"abcd"), EndOfMessage()]
    assert _http(b"HTTP/1.1 204 No Content\r\n\r\n")[1:] == [EndOfMessage()]
    assert _http(head + b"Content-Length: 0\r\n\r\n")[1:] == [EndOfMessage()]


def test_interim_responses_are_skipped() -> None:
    events = _http(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nab", eof=True)
    assert events == [
        ResponseHead(200, "OK", "1.0", ()),
        BodyData(b"ab"),
        EndOfMessage(),
    ]


def test_status_line_without_reason() -> None:
    head = _http(b"HTTP/1.1 503\r\n\r\n")[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason) == (503, "")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
        (b"ICY 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nA: x\r\n folded\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nA: x\ny: z\r\n\r\n", "control character"),
        (b"HTTP/1.1 200 OK\r\nA: \x00\r\n\r\n", "control character"),
        (b"HTTP/1.1 200 OK\r\n" + b"A: b\r\n" * 5 + b"\r\n", "more than 4"),
        (b"HTTP/1.1 200 OK\r\nA: " + b"x" * 300 + b"\r\n\r\n", "max_head_size"),
        (b"HTTP/1.1 200 OK\r\nA: " + b"x" * 300, "max_head_size"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "both",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n", "chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", "chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", "chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000, "chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc", "CRLF"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXY", "CRLF"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T: x\r\n" * 50,
            "trailer",
        ),
    ],
)
def test_malformed_responses(data: bytes, match: str) -> None:
    for split in (None, len(data)):
        with pytest.raises(SseProtocolError, match=match):
            _http(data, split=split)


def test_eof_in_the_middle() -> None:
    for data in (
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ):
        with pytest.raises(SseProtocolError, match="connection closed"):
            _http(data, eof=True)
    parser = ResponseParser()
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert parser.receive_eof() == []
    dead = ResponseParser()
    with pytest.raises(SseProtocolError, match="status line"):
        dead.receive_data(b"nonsense\r\n\r\n")
    with pytest.raises(SseProtocolError, match="already failed"):
        dead.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_http_random_bytes_raise_only_protocol_errors(data: bytes, split: int) -> None:
    parser = ResponseParser(max_head_size=128)
    try:
        parser.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + data[:split])
        parser.receive_data(data[split:])
        parser.receive_eof()
    except SseProtocolError:
        pass
    parser = ResponseParser(max_head_size=128)
    with contextlib.suppress(SseProtocolError):
        parser.receive_data(data)


@pytest.mark.parametrize(
    ("status", "content_type", "match"),
    [
        (204, "", "HTTP 204"),
        (500, "text/event-stream", "HTTP 500"),
        (302, "", "HTTP 302"),
        (200, "text/html", "'text/html'"),
        (200, "", "Content-Type ''"),
    ],
)
def test_check_event_stream_refuses(status: int, content_type: str, match: str) -> None:
    headers = (("content-type", content_type),) if content_type else ()
    with pytest.raises(SseResponseError, match=match) as info:
        check_event_stream(ResponseHead(status, "R", "1.1", headers))
    assert info.value.status == status
    assert info.value.content_type == content_type


def test_check_event_stream_accepts_parameters_and_case() -> None:
    for value in ("text/event-stream", "Text/Event-Stream; charset=utf-8", " text/event-stream ;"):
        check_event_stream(ResponseHead(200, "OK", "1.1", (("content-type", value),)))
