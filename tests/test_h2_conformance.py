"""h2spec-style conformance checks of the server core (RFC 9113), kept with the frame gate and
the hostile-load limits in front of h2: SETTINGS handling, stream states, flow control, PING,
header blocks split over CONTINUATION. Bytes in, frames out; no sockets."""

from __future__ import annotations

import struct

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from trio_sign.rpc import GrpcServerConnection, MessageReceived, RequestReceived, StreamEnded
from trio_sign.testing import _attacks as atk

PING = "/test.Svc/Ping"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST, SETTINGS, PINGF, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def _server(settings: tuple[tuple[int, int], ...] = ()) -> GrpcServerConnection:
    core = GrpcServerConnection(methods=[PING])
    core.initiate()
    core.receive_data(PREFACE + atk.settings_frame(settings) + atk.SETTINGS_ACK)
    core.data_to_send()
    return core


def _headers(stream_id: int, flags: int = END_HEADERS) -> bytes:
    return atk.frame(HEADERS, flags, stream_id, atk.request_header_block(PING))


def _goaway_code(core: GrpcServerConnection, data: bytes) -> int | None:
    core.receive_data(data)
    codes = [
        f.error_code for f in atk.parse_frames(core.data_to_send()) if isinstance(f, GoAwayFrame)
    ]
    return codes[-1] if codes else None


# -- SETTINGS (RFC 9113 §6.5) ------------------------------------------------------------------


def test_settings_are_acknowledged() -> None:
    core = GrpcServerConnection(methods=[PING])
    core.initiate()
    core.data_to_send()
    core.receive_data(PREFACE + atk.settings_frame(((0x3, 100),)))
    acks = [
        f
        for f in atk.parse_frames(core.data_to_send())
        if isinstance(f, SettingsFrame) and "ACK" in f.flags
    ]
    assert len(acks) == 1


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        # ENABLE_PUSH other than 0 or 1
        (atk.settings_frame(((0x2, 2),)), ErrorCodes.PROTOCOL_ERROR),
        # INITIAL_WINDOW_SIZE above 2^31 - 1
        (atk.settings_frame(((0x4, 2**31),)), ErrorCodes.FLOW_CONTROL_ERROR),
        # MAX_FRAME_SIZE below the minimum
        (atk.settings_frame(((0x5, 100),)), ErrorCodes.PROTOCOL_ERROR),
        # a length that is not a multiple of 6
        (atk.frame(SETTINGS, 0, 0, b"\x00\x01\x00"), ErrorCodes.FRAME_SIZE_ERROR),
        # an ACK with a payload (RFC 9113 says FRAME_SIZE_ERROR; h2 answers PROTOCOL_ERROR,
        # a connection error all the same)
        (atk.frame(SETTINGS, ACK, 0, b"\x00\x01\x00\x00\x00\x01"), ErrorCodes.PROTOCOL_ERROR),
        # on a stream
        (atk.frame(SETTINGS, 0, 1), ErrorCodes.PROTOCOL_ERROR),
    ],
)
def test_invalid_settings_are_connection_errors(frame: bytes, code: int) -> None:
    core = _server()
    assert _goaway_code(core, frame) == code
    assert core.terminated


# -- PING (§6.7) --------------------------------------------------------------------------------


def test_ping_is_answered_with_the_same_payload() -> None:
    core = _server()
    core.receive_data(atk.frame(PINGF, 0, 0, b"abcdefgh"))
    pongs = [f for f in atk.parse_frames(core.data_to_send()) if isinstance(f, PingFrame)]
    assert [(p.opaque_data, "ACK" in p.flags) for p in pongs] == [(b"abcdefgh", True)]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (atk.frame(PINGF, 0, 1, b"abcdefgh"), ErrorCodes.PROTOCOL_ERROR),
        (atk.frame(PINGF, 0, 0, b"abc"), ErrorCodes.FRAME_SIZE_ERROR),
    ],
)
def test_invalid_pings_are_connection_errors(frame: bytes, code: int) -> None:
    assert _goaway_code(_server(), frame) == code


# -- stream states (§5.1) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        # DATA on an idle stream
        (atk.frame(DATA, 0, 1, b"x"), ErrorCodes.PROTOCOL_ERROR),
        # HEADERS on an even (server-initiated) stream id
        (_headers(2), ErrorCodes.PROTOCOL_ERROR),
        # a stream id lower than one already used
        (_headers(5) + _headers(3), ErrorCodes.PROTOCOL_ERROR),
        # RST_STREAM on an idle stream
        (atk.frame(RST, 0, 7, struct.pack(">I", 8)), ErrorCodes.PROTOCOL_ERROR),
        # a frame other than CONTINUATION inside a header block
        (_headers(1, flags=0) + atk.frame(PINGF, 0, 0, b"abcdefgh"), ErrorCodes.PROTOCOL_ERROR),
        # CONTINUATION without a header block before it
        (atk.frame(CONTINUATION, END_HEADERS, 1, b""), ErrorCodes.PROTOCOL_ERROR),
    ],
)
def test_stream_state_violations_are_connection_errors(frames: bytes, code: int) -> None:
    core = _server()
    assert _goaway_code(core, frames) == code
    assert core.terminated


def test_data_after_end_stream_is_stream_closed() -> None:
    core = _server()
    message = atk.grpc_message(b"hi")
    core.receive_data(_headers(1) + atk.frame(DATA, END_STREAM, 1, message))
    core.data_to_send()
    core.receive_data(atk.frame(DATA, 0, 1, b"x"))
    out = atk.parse_frames(core.data_to_send())
    rst = [f.error_code for f in out if isinstance(f, RstStreamFrame)]
    goaway = [f.error_code for f in out if isinstance(f, GoAwayFrame)]
    assert ErrorCodes.STREAM_CLOSED in rst + goaway


def test_a_header_block_split_over_continuation_frames_is_one_request() -> None:
    core = _server()
    block = atk.request_header_block(PING)
    frames = (
        atk.frame(HEADERS, 0, 1, block[:5])
        + atk.frame(CONTINUATION, 0, 1, block[5:10])
        + atk.frame(CONTINUATION, END_HEADERS, 1, block[10:])
        + atk.frame(DATA, END_STREAM, 1, atk.grpc_message(b"hi"))
    )
    for split in (1, 9, 14, len(frames) // 2, len(frames) - 1):
        core = _server()
        events = core.receive_data(frames[:split]) + core.receive_data(frames[split:])
        kinds = [type(e) for e in events]
        assert kinds == [RequestReceived, MessageReceived, StreamEnded], split


# -- flow control (§6.9) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        # a zero increment on the connection
        (atk.frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), ErrorCodes.PROTOCOL_ERROR),
        # the connection window past 2^31 - 1
        (
            atk.frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)),
            ErrorCodes.FLOW_CONTROL_ERROR,
        ),
    ],
)
def test_window_update_errors(frames: bytes, code: int) -> None:
    assert _goaway_code(_server(), frames) == code


def test_responses_respect_the_clients_window() -> None:
    core = _server(((0x4, 10),))  # INITIAL_WINDOW_SIZE 10
    core.receive_data(_headers(1) + atk.frame(DATA, END_STREAM, 1, atk.grpc_message(b"hi")))
    core.data_to_send()
    core.send_response(1, b"y" * 100)
    sent = [f for f in atk.parse_frames(core.data_to_send()) if isinstance(f, DataFrame)]
    assert sum(len(f.data) for f in sent) == 10
    assert core.queued_send_bytes == 95
    core.receive_data(atk.frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000)))
    out = atk.parse_frames(core.data_to_send())
    assert sum(len(f.data) for f in out if isinstance(f, DataFrame)) == 95
    assert any(isinstance(f, HeadersFrame) and "END_STREAM" in f.flags for f in out)
    assert core.queued_send_bytes == 0


def test_received_data_is_acknowledged() -> None:
    core = _server()
    body = atk.grpc_message(b"z" * 700_000)
    frames = b"".join(
        atk.frame(DATA, 0, 1, body[i : i + 16_000]) for i in range(0, len(body), 16_000)
    )
    core.receive_data(_headers(1) + frames)
    updates = [f for f in atk.parse_frames(core.data_to_send()) if f.type == WINDOW_UPDATE]
    # More than half of the 1 MiB windows consumed: both are opened again.
    assert {f.stream_id for f in updates} == {0, 1}


def test_goaway_from_the_client_ends_the_connection_cleanly() -> None:
    core = _server()
    core.receive_data(atk.frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
    assert core.terminated
