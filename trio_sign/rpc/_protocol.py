"""Sans-io gRPC over HTTP/2 on top of ``h2``: no ``await``, no sockets.

Feed received bytes to ``receive_data`` and act on the returned events; call commands; send
whatever ``data_to_send`` returns. The core frames and deframes length-prefixed messages,
validates the gRPC HTTP/2 headers, answers malformed requests itself, enforces the maximum
message size, acknowledges received data (so the peer is never stalled), and buffers outgoing
data until the peer's flow-control windows allow it. It knows nothing about protobuf.

Deviations from plain ``h2`` (both sides) that graceful shutdown needs: the server sends its
drain GOAWAY as a raw frame (h2 would refuse to send anything after its own GOAWAY), and the
client lifts GOAWAY frames out of the byte stream before h2 sees them (h2 would refuse the
responses that a graceful GOAWAY still allows).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import re
import struct
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from ._events import (
    ConnectionTerminated,
    Event,
    MessageReceived,
    Metadata,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamError,
    StreamReset,
    TrailersReceived,
)
from ._limits import (
    DEFAULT_MAX_SEND_BYTES,
    FloodCounter,
    FrameGate,
    ReceiveBudget,
    ServerLimits,
)
from ._status import (
    GrpcProtocolError,
    StatusCode,
    decode_grpc_message,
    encode_grpc_message,
    format_grpc_timeout,
    parse_grpc_timeout,
    status_from_h2_error,
    status_from_http,
    status_from_int,
)

DEFAULT_MAX_RECEIVE_MESSAGE_SIZE: Final = 4 * 1024 * 1024
#: Per connection. With the maximum message size it bounds what one connection can make us hold
#: (requests waiting for their handler): 128 x 4 MiB at the defaults.
DEFAULT_MAX_CONCURRENT_STREAMS: Final = 128
#: Our advertised per-stream receive window. Larger than HTTP/2's 65535 default so that a
#: multi-MiB message needs few WINDOW_UPDATE round trips; memory stays bounded by the maximum
#: message size, since we acknowledge data as soon as it is deframed.
DEFAULT_INITIAL_WINDOW_SIZE: Final = 1024 * 1024
DEFAULT_MAX_HEADER_LIST_SIZE: Final = 16 * 1024

_PREFIX: Final = struct.Struct(">BI")
_H2_DEFAULT_WINDOW: Final = 65535
_FRAME_HEADER_LEN: Final = 9
_GOAWAY_TYPE: Final = 0x7

Header = tuple[bytes, bytes]

# What h2 raises for a stream it has closed, or closed and already forgotten. Within one
# ``receive_data`` batch h2 has processed every frame before we see its events, so a stream the
# peer reset (or ended) later in the batch can be gone while we react to an earlier event.
_STREAM_GONE: Final = (
    h2.exceptions.StreamClosedError,
    h2.exceptions.StreamIDTooLowError,
    h2.exceptions.NoSuchStreamError,
)

_CT_GRPC: Final = b"application/grpc"
_RESERVED_REQUEST: Final = frozenset(
    {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"}
)
_REQUEST_PSEUDO: Final = frozenset({b":method", b":path", b":authority", b":scheme"})
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: A lower-case RFC 9110 token (HTTP/2 field names must be lower case).
_FIELD_NAME: Final = re.compile(rb"[a-z0-9!#$%&'*+.^_`|~-]+")
_ILLEGAL_IN_VALUE: Final = re.compile(rb"[\r\n\x00]")


def _bad_request_header(name: bytes, value: bytes, seen_regular: bool, seen: set[bytes]) -> bool:
    """RFC 9113 §8.2-8.3 checks h2 would make on an inbound request header (the server turns
    h2's own inbound validation off and calls this instead)."""
    if _ILLEGAL_IN_VALUE.search(value) is not None:
        return True
    if name[:1] == b":":
        if seen_regular or name not in _REQUEST_PSEUDO or name in seen or not value:
            return True
        seen.add(name)
        return False
    if _FIELD_NAME.fullmatch(name) is None or name in _CONNECTION_SPECIFIC:
        return True
    return name == b"te" and value != b"trailers"


_RESERVED_RESPONSE: Final = frozenset(
    {b"content-type", b"grpc-status", b"grpc-message", b"grpc-encoding", b"grpc-accept-encoding"}
)


# gRPC's metadata grammar: keys 0-9 a-z _ - . ; ASCII values printable (0x20-0x7E).
_KEY: Final = re.compile(rb"[0-9a-z_.\-]+")
_VALUE: Final = re.compile(rb"[\x20-\x7e]*")


class _Stream:
    """Per-stream state: inbound deframing buffer and the outbound queue."""

    __slots__ = ("headers_sent", "inbuf", "limit", "out", "out_end", "remote_ended", "trailers")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # largest message accepted on this stream
        self.inbuf = bytearray()
        self.out: collections.deque[memoryview] = collections.deque()
        self.out_end = False  # end the stream after the queued data (client request)
        self.trailers: list[Header] | None = None  # sent after the queued data (server)
        self.headers_sent = False
        self.remote_ended = False


def _decode_metadata(name: bytes, value: bytes) -> tuple[str, str | bytes]:
    key = name.decode("ascii", "replace")
    if key.endswith("-bin"):
        try:
            return key, base64.b64decode(value + b"=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return key, value
    return key, value.decode("latin-1")


def _encode_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> list[Header]:
    out: list[Header] = []
    for key, value in metadata:
        try:
            name = key.lower().encode("ascii")
            if isinstance(value, bytes):
                if not key.endswith("-bin"):
                    raise GrpcProtocolError(f"metadata {key!r}: binary values need a '-bin' key")
                out.append((name, base64.b64encode(value).rstrip(b"=")))
            else:
                out.append((name, value.encode("ascii")))
        except UnicodeEncodeError as exc:
            raise GrpcProtocolError(
                f"metadata {key!r}: keys and text values must be ASCII (use a '-bin' key)"
            ) from exc
        if not _KEY.fullmatch(name) or name.startswith(b"grpc-") or name in _RESERVED_REQUEST:
            raise GrpcProtocolError(
                f"metadata key {key!r} is reserved or not of [0-9a-z_.-] (h2 does not check"
                " our outbound headers)"
            )
        if not _VALUE.fullmatch(out[-1][1]):
            raise GrpcProtocolError(f"metadata {key!r}: text values must be printable ASCII")
    return out


class _GrpcConnection:
    """What the server and client roles share: deframing, flow-controlled sending, resets."""

    def __init__(
        self,
        *,
        client_side: bool,
        max_receive_message_size: int,
        max_concurrent_streams: int,
        initial_window_size: int,
        max_buffered: int | None = None,
        budget: ReceiveBudget | None = None,
    ) -> None:
        if max_receive_message_size < 0:
            raise ValueError("max_receive_message_size must be >= 0")
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=client_side,
                header_encoding=None,
                # Our own headers are built correctly (lower-case, no connection headers);
                # skipping h2's checks of them saves a good share of per-call CPU. Inbound
                # headers are still fully validated.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                # Server role: inbound request headers are checked by _check_request_header
                # in the loop that reads them anyway (h2's generic checks cost ~6% of a call's
                # CPU, scripts/bench --grpc). The client role keeps h2's checks.
                validate_inbound_headers=client_side,
                normalize_inbound_headers=client_side,
            )
        )
        self._h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: DEFAULT_MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._initial_window_size = initial_window_size
        self._max_concurrent_streams = max_concurrent_streams
        self._max_receive = max_receive_message_size
        # Incomplete inbound messages across all streams of the connection: by default room for
        # two maximum-size messages arriving interleaved, plus slack.
        if max_buffered is None:
            max_buffered = 2 * max_receive_message_size + 65536
        self._max_buffered = max_buffered
        self._buffered = 0
        # Shared by every connection of a server (a private one otherwise).
        self._budget = budget if budget is not None else ReceiveBudget(max_buffered)
        self._queued_out = 0  # response bytes waiting in the streams' queues
        #: Message bytes handed to h2 so far (grows whenever flow control lets data out).
        self.sent_message_bytes = 0
        self._streams: dict[int, _Stream] = {}
        self._blocked: set[int] = set()
        self._raw_out = b""  # frames written around h2 (the drain GOAWAY)
        self._terminated = False
        self._initiated = False
        self._peer_settings_received = False

    # -- public -----------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface (SETTINGS and, if configured, a connection window
        increment). Call once, before anything else."""
        if self._initiated:
            return
        self._initiated = True
        self._h2.initiate_connection()
        # Announced in a second SETTINGS frame on purpose: h2 applies it only once the peer
        # acknowledges it. A value in the preface would apply at once, and h2 answers a peer
        # that opened more streams before it saw the limit with a connection error.
        self._h2.update_settings(
            {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._max_concurrent_streams}
        )
        if self._initial_window_size > _H2_DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(self._initial_window_size - _H2_DEFAULT_WINDOW)

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport, in order (possibly empty)."""
        data = self._h2.data_to_send()
        if self._raw_out:
            data, self._raw_out = self._raw_out + data, b""
        return data

    @property
    def terminated(self) -> bool:
        """True once the connection is over (GOAWAY sent by `close` or a fatal protocol error)."""
        return self._terminated

    @property
    def open_streams(self) -> int:
        """Streams the core still tracks (not yet finished or reset)."""
        return len(self._streams)

    @property
    def buffered_receive_bytes(self) -> int:
        """Bytes of incomplete inbound messages this connection holds."""
        return self._buffered

    @property
    def queued_send_bytes(self) -> int:
        """Message bytes queued on streams, waiting for the peer's flow-control window."""
        return self._queued_out

    def send_message(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue one length-prefixed message; sent as the flow-control windows allow."""
        st = self._get(stream_id)
        self._before_message(stream_id, st)
        if st.out_end or st.trailers is not None:
            raise GrpcProtocolError(f"stream {stream_id}: message after the end of the stream")
        st.out.append(memoryview(_PREFIX.pack(0, len(data)) + data))
        self._queued_out += 5 + len(data)
        st.out_end = end_stream
        self._flush(stream_id, st)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Reset the stream (RST_STREAM) and forget it. Unknown or finished streams are a
        no-op, so callers can reset unconditionally while cleaning up."""
        if self._pop(stream_id) is None:
            return
        if not self._terminated:
            with contextlib.suppress(*_STREAM_GONE):
                self._h2.reset_stream(stream_id, error_code)

    def close(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Send the final GOAWAY. After this the core sends nothing more; close the transport
        once ``data_to_send()`` is written."""
        if self._terminated:
            return
        self._terminated = True
        self._forget_all()
        self._h2.close_connection(error_code)

    # -- role hooks -------------------------------------------------------------------------

    def _before_message(self, stream_id: int, st: _Stream) -> None:
        pass

    def _locally_finished(self, stream_id: int, st: _Stream) -> None:
        pass

    # -- internals --------------------------------------------------------------------------

    def _pop(self, stream_id: int) -> _Stream | None:
        """Forget a stream, releasing its share of the receive budget."""
        st = self._streams.pop(stream_id, None)
        if st is not None:
            self._unbuffer(len(st.inbuf))
            self._drop_output(st)
            self._blocked.discard(stream_id)
        return st

    def _forget_all(self) -> None:
        self._streams.clear()
        self._blocked.clear()
        self._unbuffer(self._buffered)
        self._queued_out = 0

    def _unbuffer(self, n: int) -> None:
        self._buffered -= n
        self._budget.used -= n

    def _drop_output(self, st: _Stream) -> None:
        if st.out:
            self._queued_out -= sum(len(chunk) for chunk in st.out)
            st.out.clear()

    def _get(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None or self._terminated:
            raise GrpcProtocolError(f"stream {stream_id} is not open")
        return st

    def _flush(self, stream_id: int, st: _Stream) -> None:
        try:
            self._flush_unchecked(stream_id, st)
        except _STREAM_GONE:
            # h2 processes a whole batch of frames before we see its events, so the peer may
            # have closed or reset this stream already; the event about that follows.
            self._drop_output(st)
            st.trailers = None
            self._blocked.discard(stream_id)

    def _flush_unchecked(self, stream_id: int, st: _Stream) -> None:
        h2c = self._h2
        out = st.out
        while out:
            window = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
            if window <= 0:
                self._blocked.add(stream_id)
                return
            chunk = out[0]
            if len(chunk) <= window:
                out.popleft()
            else:
                out[0] = chunk[window:]
                chunk = chunk[:window]
            self._queued_out -= len(chunk)
            self.sent_message_bytes += len(chunk)
            h2c.send_data(stream_id, chunk, end_stream=st.out_end and not out)
        self._blocked.discard(stream_id)
        if st.trailers is not None:
            h2c.send_headers(stream_id, st.trailers, end_stream=True)
            st.trailers = None
            self._locally_finished(stream_id, st)

    def _flush_blocked(self) -> None:
        for stream_id in list(self._blocked):
            st = self._streams.get(stream_id)
            if st is None:
                self._blocked.discard(stream_id)
            else:
                self._flush(stream_id, st)

    def _deframe(self, stream_id: int, st: _Stream, data: bytes, events: list[Event]) -> bool:
        """Append data; emit complete messages. False (and nothing emitted for the bad part)
        if the peer broke the framing or the receive budget; `_fail_stream` has then been
        called."""
        buf = st.inbuf
        limit = st.limit
        if not buf and len(data) >= 5:
            # Fast path: a whole single message in one DATA frame, no intermediate buffer.
            flag, length = _PREFIX.unpack_from(data)
            if len(data) == 5 + length and flag == 0 and length <= limit:
                events.append(MessageReceived(stream_id, data[5:]))
                return True
        buf += data
        self._buffered += len(data)
        self._budget.used += len(data)
        while len(buf) >= 5:
            flag, length = _PREFIX.unpack_from(buf)
            if flag != 0:
                if flag == 1:
                    message = "compressed message but no grpc-encoding was negotiated"
                else:
                    message = f"invalid message flags {flag:#x}"
                self._fail_stream(stream_id, StatusCode.INTERNAL, message, events)
                return False
            if length > limit:
                # Refused on the length prefix, before the message is buffered.
                self._fail_stream(
                    stream_id,
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"received message larger than max ({length} vs. {limit})",
                    events,
                )
                return False
            end = 5 + length
            if len(buf) < end:
                break
            events.append(MessageReceived(stream_id, bytes(buf[5:end])))
            del buf[:end]
            self._unbuffer(end)
        if self._buffered > self._max_buffered or self._budget.exhausted:
            # Received data is acknowledged at once (so a big message never stalls), which
            # means flow control does not bound what incomplete messages hold across streams.
            # These budgets do: one per connection, one for the whole server.
            where = (
                f"this connection (over {self._max_buffered} bytes)"
                if self._buffered > self._max_buffered
                else f"this server (over {self._budget.limit} bytes)"
            )
            self._fail_stream(
                stream_id,
                StatusCode.RESOURCE_EXHAUSTED,
                f"too much incomplete message data on {where}",
                events,
            )
            return False
        return True

    def _fail_stream(
        self, stream_id: int, status: StatusCode, message: str, events: list[Event]
    ) -> None:
        raise NotImplementedError

    def _reset_h2(self, stream_id: int, error_code: int) -> None:
        # The stream may already be closed in h2's view: the peer's END_STREAM can be in the
        # same batch of frames as the event we are reacting to.
        with contextlib.suppress(*_STREAM_GONE):
            self._h2.reset_stream(stream_id, error_code)

    def _handle_common(self, ev: h2.events.Event, events: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            stream_id = ev.stream_id
            if ev.flow_controlled_length:
                # Hand the window back at once: buffering is bounded by the message size limit.
                self._h2.acknowledge_received_data(ev.flow_controlled_length, stream_id)
            st = self._streams.get(stream_id)
            if st is not None and ev.data:
                self._deframe(stream_id, st, ev.data, events)
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id == 0:
                self._flush_blocked()
            else:
                st = self._streams.get(ev.stream_id)
                if st is not None and ev.stream_id in self._blocked:
                    self._flush(ev.stream_id, st)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._peer_settings_received = True
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                self._flush_blocked()
        elif isinstance(ev, h2.events.StreamReset) and self._pop(ev.stream_id) is not None:
            code = int(ev.error_code) if ev.error_code is not None else 0
            events.append(StreamReset(ev.stream_id, code, status_from_h2_error(code)))
        # PING is answered by h2 itself; SETTINGS are acknowledged by h2; the rest is ignored.

    def _protocol_failure(self, exc: h2.exceptions.ProtocolError) -> list[Event]:
        # h2 has already queued a GOAWAY with the error code.
        self._terminated = True
        self._forget_all()
        code = int(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR))
        return [ConnectionTerminated(code, 0, f"HTTP/2 protocol error: {exc}")]


class GrpcServerConnection(_GrpcConnection):
    """The server role of the sans-io gRPC core.

    Args:
        methods: the ``:path`` values that exist (e.g. ``/trio_sign.v1.SignService/Ping``);
            others are answered UNIMPLEMENTED by the core. ``None`` lets every path through.
        max_receive_message_size: larger request messages are answered RESOURCE_EXHAUSTED.
        max_concurrent_streams: advertised SETTINGS_MAX_CONCURRENT_STREAMS, and enforced from
            the first frame: streams beyond it are refused with REFUSED_STREAM.
        initial_window_size: advertised per-stream (and initial connection) receive window.
        method_limits: a largest request message per method (``:path``), checked against each
            message's length prefix before anything is buffered; other methods get
            ``max_receive_message_size``.
        max_buffered: incomplete request bytes this connection may hold (default: twice the
            largest message cap plus 64 KiB).
        budget: incomplete request bytes all connections of a server may hold together.
        max_send_bytes: while more response bytes than this wait for the peer's window, new
            streams are refused.
        flood: counts resets, PINGs and SETTINGS; when it trips the connection is closed with
            GOAWAY ENHANCE_YOUR_CALM (default: `ServerLimits` defaults on ``time.monotonic``).
    """

    def __init__(
        self,
        *,
        methods: Collection[str] | None = None,
        max_receive_message_size: int = DEFAULT_MAX_RECEIVE_MESSAGE_SIZE,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
        method_limits: Mapping[str, int] | None = None,
        max_buffered: int | None = None,
        budget: ReceiveBudget | None = None,
        max_send_bytes: int = DEFAULT_MAX_SEND_BYTES,
        flood: FloodCounter | None = None,
    ) -> None:
        method_limits = dict(method_limits or {})
        largest = max([max_receive_message_size, *method_limits.values()])
        super().__init__(
            client_side=False,
            max_receive_message_size=max_receive_message_size,
            max_concurrent_streams=max_concurrent_streams,
            initial_window_size=initial_window_size,
            max_buffered=2 * largest + 65536 if max_buffered is None else max_buffered,
            budget=budget,
        )
        self._methods = None if methods is None else frozenset(methods)
        self._method_limits = method_limits
        self._max_send_bytes = max_send_bytes
        self._flood = flood if flood is not None else FloodCounter(ServerLimits(), time.monotonic)
        self._gate = FrameGate(self._flood)
        self._drain_last_stream_id: int | None = None
        #: Streams refused because the connection was at its stream or send limit.
        self.refused_streams = 0

    # -- commands ---------------------------------------------------------------------------

    def send_headers(
        self, stream_id: int, metadata: Iterable[tuple[str, str | bytes]] = ()
    ) -> None:
        """Send the response headers (``:status 200``, ``content-type``, custom metadata).
        Optional: `send_message` sends default headers first if needed."""
        st = self._get(stream_id)
        if st.headers_sent:
            raise GrpcProtocolError(f"stream {stream_id}: response headers already sent")
        st.headers_sent = True
        headers = [(b":status", b"200"), (b"content-type", _CT_GRPC)]
        headers += _encode_metadata(metadata)
        self._h2.send_headers(stream_id, headers)

    def send_trailers(
        self,
        stream_id: int,
        status: StatusCode,
        message: str = "",
        metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> None:
        """End the response with ``grpc-status``/``grpc-message`` (a trailers-only response if
        no headers were sent). Sent after all queued messages; the stream is then finished.
        If the request is not complete yet, the stream is then reset with NO_ERROR (RFC 9113
        8.1) so the client stops sending."""
        st = self._get(stream_id)
        if st.trailers is not None:
            raise GrpcProtocolError(f"stream {stream_id}: trailers already sent")
        trailers: list[Header] = []
        if not st.headers_sent:
            st.headers_sent = True
            trailers += [(b":status", b"200"), (b"content-type", _CT_GRPC)]
        trailers.append((b"grpc-status", b"%d" % status))
        if message:
            trailers.append((b"grpc-message", encode_grpc_message(message)))
        trailers += _encode_metadata(metadata)
        st.trailers = trailers
        self._flood.call_completed()
        self._flush(stream_id, st)

    def send_response(
        self, stream_id: int, data: bytes, metadata: Iterable[tuple[str, str | bytes]] = ()
    ) -> None:
        """A whole unary OK response: headers, one message, ``grpc-status: 0``."""
        self.send_message(stream_id, data)
        self.send_trailers(stream_id, StatusCode.OK, metadata=metadata)

    def start_drain(self) -> None:
        """Graceful drain: send GOAWAY(NO_ERROR) naming the last stream we accept; later new
        streams are refused with REFUSED_STREAM (clients retry those elsewhere). Open streams
        carry on. Finish with `close` once they are done."""
        if self._drain_last_stream_id is not None or self._terminated:
            return
        last = self._h2.highest_inbound_stream_id
        self._drain_last_stream_id = last
        goaway = GoAwayFrame(0, last_stream_id=last, error_code=0).serialize()
        # Keep byte order: whatever h2 already queued goes first.
        self._raw_out = self._raw_out + self._h2.data_to_send() + goaway

    @property
    def draining(self) -> bool:
        """True once `start_drain` was called."""
        return self._drain_last_stream_id is not None

    @property
    def abuse(self) -> str | None:
        """Why the connection was closed with ENHANCE_YOUR_CALM (a flood), or None."""
        return self._flood.tripped

    @property
    def preface_received(self) -> bool:
        """True once the client's preface and first SETTINGS frame arrived."""
        return self._peer_settings_received

    def close(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        if self._terminated:
            return
        self._terminated = True
        self._forget_all()
        last = self._drain_last_stream_id
        if last is None:
            last = self._h2.highest_inbound_stream_id
        self._h2.close_connection(error_code, last_stream_id=last)

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the client; return the events they complete.

        The bytes reach ``h2`` through the `FrameGate`, one new stream at a time, so that a
        stream over the limit is refused before the next one is parsed; a flood of resets,
        PINGs or SETTINGS ends the connection with GOAWAY ENHANCE_YOUR_CALM at the frame that
        crossed the limit (nothing after it is processed).
        """
        if self._terminated:
            return []
        events: list[Event] = []
        for chunk in self._gate.feed(data):
            try:
                h2_events = self._h2.receive_data(chunk)
            except h2.exceptions.ProtocolError as exc:
                return events + self._protocol_failure(exc)
            self._on_h2_events(h2_events, events)
            if self._terminated or self._flood.tripped is not None:
                break
        if self._flood.tripped is not None and not self._terminated:
            reason = self._flood.tripped
            self.close(ErrorCodes.ENHANCE_YOUR_CALM)
            events.append(ConnectionTerminated(int(ErrorCodes.ENHANCE_YOUR_CALM), 0, reason))
        return events

    def _on_h2_events(self, h2_events: list[h2.events.Event], events: list[Event]) -> None:
        for ev in h2_events:
            if isinstance(ev, h2.events.RequestReceived):
                self._on_request(ev, events)
            elif isinstance(ev, h2.events.StreamEnded):
                st = self._streams.get(ev.stream_id)
                if st is None:
                    continue
                st.remote_ended = True
                if st.inbuf:
                    self._fail_stream(
                        ev.stream_id,
                        StatusCode.INTERNAL,
                        f"request ended inside a message ({len(st.inbuf)} bytes left over)",
                        events,
                    )
                else:
                    events.append(StreamEnded(ev.stream_id))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._terminated = True
                self._forget_all()
                events.append(
                    ConnectionTerminated(
                        int(ev.error_code) if ev.error_code is not None else 0,
                        ev.last_stream_id or 0,
                        (ev.additional_data or b"").decode("utf-8", "replace"),
                    )
                )
            else:
                self._handle_common(ev, events)

    def _on_request(self, ev: h2.events.RequestReceived, events: list[Event]) -> None:
        stream_id = ev.stream_id
        ended = ev.stream_ended is not None
        if self._drain_last_stream_id is not None and stream_id > self._drain_last_stream_id:
            self._reset_h2(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if (
            len(self._streams) >= self._max_concurrent_streams
            or self._queued_out > self._max_send_bytes
        ):
            # Our own count, O(1): the limit holds from the first frame, before the peer has
            # acknowledged the SETTINGS that announce it. Refusals count as resets.
            self._reset_h2(stream_id, ErrorCodes.REFUSED_STREAM)
            self.refused_streams += 1
            self._flood.reset()
            return
        method = path = authority = content_type = te = timeout = encoding = None
        metadata: list[tuple[str, str | bytes]] = []
        seen_pseudo: set[bytes] = set()
        seen_regular = False
        for name, value in ev.headers or ():
            # header_encoding=None: h2 gives bytes.
            n = bytes(name)
            v = bytes(value)
            if _bad_request_header(n, v, seen_regular, seen_pseudo):
                self._reset_h2(stream_id, ErrorCodes.PROTOCOL_ERROR)
                return
            if n[:1] == b":":
                if n == b":method":
                    method = v
                elif n == b":path":
                    path = v
                elif n == b":authority":
                    authority = v
            elif n in _RESERVED_REQUEST:
                seen_regular = True
                if n == b"content-type":
                    content_type = v
                elif n == b"te":
                    te = v
                elif n == b"grpc-timeout":
                    timeout = v
                elif n == b"grpc-encoding":
                    encoding = v
            else:
                seen_regular = True
                metadata.append(_decode_metadata(n, v))
        if b":scheme" not in seen_pseudo or path is None or method is None:
            self._reset_h2(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        if method != b"POST":
            self._early(stream_id, ended, StatusCode.INTERNAL, "gRPC requires :method POST", 405)
            return
        if content_type is None or not content_type.startswith(_CT_GRPC):
            self._early(
                stream_id, ended, StatusCode.INTERNAL, "invalid gRPC request content-type", 415
            )
            return
        subtype = content_type[len(_CT_GRPC) :].split(b";", 1)[0].strip()
        if subtype not in (b"", b"+proto"):
            self._early(
                stream_id,
                ended,
                StatusCode.UNIMPLEMENTED,
                f"content-subtype {subtype[1:].decode('ascii', 'replace')!r} is not supported",
            )
            return
        if not path or path[:1] != b"/":
            self._early(stream_id, ended, StatusCode.UNIMPLEMENTED, "missing or invalid :path")
            return
        if te != b"trailers":
            self._early(stream_id, ended, StatusCode.INTERNAL, "te: trailers header is missing")
            return
        if encoding is not None and encoding != b"identity":
            self._early(
                stream_id,
                ended,
                StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {encoding.decode('ascii', 'replace')!r} is not supported",
                extra=[(b"grpc-accept-encoding", b"identity")],
            )
            return
        deadline_s: float | None = None
        if timeout is not None:
            try:
                deadline_s = parse_grpc_timeout(timeout)
            except ValueError:
                self._early(
                    stream_id,
                    ended,
                    StatusCode.INTERNAL,
                    f"malformed grpc-timeout {timeout.decode('ascii', 'replace')!r}",
                )
                return
        method_name = path.decode("utf-8", "replace")
        if self._methods is not None and method_name not in self._methods:
            self._early(stream_id, ended, StatusCode.UNIMPLEMENTED, f"unknown method {method_name}")
            return
        st = _Stream(self._method_limits.get(method_name, self._max_receive))
        st.remote_ended = ended
        self._streams[stream_id] = st
        events.append(
            RequestReceived(
                stream_id,
                method_name,
                (authority or b"").decode("ascii", "replace"),
                tuple(metadata),
                deadline_s,
            )
        )

    def _early(
        self,
        stream_id: int,
        ended: bool,
        status: StatusCode,
        message: str,
        http_status: int = 200,
        extra: list[Header] | None = None,
    ) -> None:
        """Answer a request the core refuses with a trailers-only response."""
        headers: list[Header] = [
            (b":status", b"%d" % http_status),
            (b"content-type", _CT_GRPC),
            (b"grpc-status", b"%d" % status),
            (b"grpc-message", encode_grpc_message(message)),
        ]
        if extra:
            headers += extra
        try:
            self._h2.send_headers(stream_id, headers, end_stream=True)
        except _STREAM_GONE:
            return  # the client reset it in the same batch of frames: nobody to answer
        if not ended:
            self._reset_h2(stream_id, ErrorCodes.NO_ERROR)

    def _before_message(self, stream_id: int, st: _Stream) -> None:
        if not st.headers_sent:
            self.send_headers(stream_id)

    def _locally_finished(self, stream_id: int, st: _Stream) -> None:
        self._pop(stream_id)
        if not st.remote_ended:
            self._reset_h2(stream_id, ErrorCodes.NO_ERROR)

    def _fail_stream(
        self, stream_id: int, status: StatusCode, message: str, events: list[Event]
    ) -> None:
        st = self._streams[stream_id]
        # Drop unsent output: the response is being cut short.
        self._drop_output(st)
        st.out_end = False
        st.trailers = None
        self._unbuffer(len(st.inbuf))
        st.inbuf.clear()
        self.send_trailers(stream_id, status, message)
        if stream_id in self._streams:  # blocked on flow control: give up on it
            self.reset(stream_id, ErrorCodes.NO_ERROR)
        events.append(StreamError(stream_id, status, message))


class _GoAwayScanner:
    """Splits the inbound HTTP/2 byte stream at frame boundaries and lifts out GOAWAY frames.

    Only frame headers are inspected; everything else passes through as (usually) the very same
    bytes object, so the common path costs a few slices per chunk.
    """

    __slots__ = ("_pending", "_skip")

    def __init__(self) -> None:
        self._skip = 0  # bytes of the current non-GOAWAY frame still to pass through
        self._pending = b""  # an incomplete frame header or GOAWAY frame

    def feed(self, data: bytes) -> list[bytes | tuple[int, int, bytes]]:
        """Return passthrough chunks and ``(last_stream_id, error_code, debug)`` in order."""
        if self._pending:
            data, self._pending = self._pending + data, b""
        out: list[bytes | tuple[int, int, bytes]] = []
        n = len(data)
        pos = start = 0
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                pos += step
                self._skip -= step
                continue
            if n - pos < _FRAME_HEADER_LEN:
                break
            length = int.from_bytes(data[pos : pos + 3], "big")
            if data[pos + 3] != _GOAWAY_TYPE or length < 8:
                self._skip = _FRAME_HEADER_LEN + length
                continue
            end = pos + _FRAME_HEADER_LEN + length
            if end > n:
                break
            if pos > start:
                out.append(data[start:pos])
            body = data[pos + _FRAME_HEADER_LEN : end]
            last = int.from_bytes(body[:4], "big") & 0x7FFFFFFF
            out.append((last, int.from_bytes(body[4:8], "big"), bytes(body[8:])))
            pos = start = end
        if pos > start:
            out.append(data if start == 0 and pos == n else data[start:pos])
        if pos < n:
            self._pending = data[pos:]
        return out


class GrpcClientConnection(_GrpcConnection):
    """The client role of the sans-io gRPC core.

    Args:
        authority: the ``:authority`` of requests.
        max_receive_message_size: larger response messages fail the call RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        *,
        authority: str = "localhost",
        scheme: str = "http",
        max_receive_message_size: int = DEFAULT_MAX_RECEIVE_MESSAGE_SIZE,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
        user_agent: str = "trio-sign-grpc",
    ) -> None:
        super().__init__(
            client_side=True,
            max_receive_message_size=max_receive_message_size,
            max_concurrent_streams=DEFAULT_MAX_CONCURRENT_STREAMS,
            initial_window_size=initial_window_size,
        )
        self._authority = authority.encode("ascii")
        self._scheme = scheme.encode("ascii")
        self._user_agent = user_agent.encode("ascii")
        self._scanner = _GoAwayScanner()
        self._goaway_last_stream_id: int | None = None

    # -- commands ---------------------------------------------------------------------------

    @property
    def can_open_stream(self) -> bool:
        """True if a new call may start now: the server's SETTINGS arrived (so its stream limit
        is known), no GOAWAY, and fewer open streams than that limit."""
        return (
            self._peer_settings_received
            and not self._terminated
            and self._goaway_last_stream_id is None
            # Our own count: h2's open_outbound_streams walks every stream on each call.
            and len(self._streams) < self._h2.remote_settings.max_concurrent_streams
        )

    @property
    def going_away(self) -> bool:
        """True once the server sent GOAWAY (or the connection ended): no new calls."""
        return self._terminated or self._goaway_last_stream_id is not None

    def start_request(
        self,
        method: str,
        *,
        timeout_s: float | None = None,
        metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> int:
        """Open a stream and send the request headers; return the stream id.

        Raises:
            GrpcProtocolError: the connection is going away, or the server's stream limit is
                reached.
        """
        # The server's SETTINGS need not have arrived (drivers wait for them via
        # `can_open_stream`; the sans-io user may choose not to).
        if self.going_away:
            raise GrpcProtocolError("the connection is closed or going away: no new streams")
        if len(self._streams) >= self._h2.remote_settings.max_concurrent_streams:
            raise GrpcProtocolError("the server's MAX_CONCURRENT_STREAMS is reached")
        stream_id = self._h2.get_next_available_stream_id()
        headers: list[Header] = [
            (b":method", b"POST"),
            (b":scheme", self._scheme),
            (b":path", method.encode("utf-8")),
            (b":authority", self._authority),
            (b"te", b"trailers"),
            (b"content-type", _CT_GRPC),
            (b"user-agent", self._user_agent),
        ]
        if timeout_s is not None:
            headers.append((b"grpc-timeout", format_grpc_timeout(timeout_s)))
        headers += _encode_metadata(metadata)
        try:
            self._h2.send_headers(stream_id, headers)
        except h2.exceptions.TooManyStreamsError as exc:
            raise GrpcProtocolError("the server's MAX_CONCURRENT_STREAMS is reached") from exc
        self._streams[stream_id] = _Stream(self._max_receive)
        return stream_id

    def end_stream(self, stream_id: int) -> None:
        """Half-close the request (after any queued messages)."""
        st = self._get(stream_id)
        if st.out_end:
            return
        st.out_end = True
        if not st.out:
            self._h2.end_stream(stream_id)

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the server; return the events they complete."""
        if self._terminated:
            return []
        events: list[Event] = []
        for part in self._scanner.feed(data):
            if isinstance(part, tuple):
                self._on_goaway(*part, events)
                continue
            try:
                h2_events = self._h2.receive_data(part)
            except h2.exceptions.ProtocolError as exc:
                return events + self._fail_all(self._protocol_failure_keep(exc))
            for ev in h2_events:
                if isinstance(ev, h2.events.ResponseReceived):
                    self._on_response(ev, events)
                elif isinstance(ev, h2.events.TrailersReceived):
                    self._on_trailers(ev.stream_id, ev.headers or (), events)
                elif isinstance(ev, h2.events.StreamEnded):
                    if ev.stream_id in self._streams:
                        self._finish(
                            ev.stream_id,
                            StatusCode.INTERNAL,
                            "server closed the stream without sending trailers",
                            (),
                            events,
                            remote_ended=True,
                        )
                else:
                    self._handle_common(ev, events)
        return events

    def _protocol_failure_keep(self, exc: h2.exceptions.ProtocolError) -> ConnectionTerminated:
        code = int(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR))
        return ConnectionTerminated(code, 0, f"HTTP/2 protocol error: {exc}")

    def _fail_all(self, term: ConnectionTerminated) -> list[Event]:
        events: list[Event] = [term]
        for stream_id in sorted(self._streams):
            events.append(TrailersReceived(stream_id, StatusCode.INTERNAL, term.message, ()))
        self._terminated = True
        self._forget_all()
        return events

    def _on_goaway(self, last: int, error_code: int, debug: bytes, events: list[Event]) -> None:
        if self._goaway_last_stream_id is None or last < self._goaway_last_stream_id:
            self._goaway_last_stream_id = last
        message = debug.decode("utf-8", "replace")
        events.append(ConnectionTerminated(error_code, last, message))
        for stream_id in sorted(self._streams):
            if stream_id > last:
                # Never processed by the server: safe to retry elsewhere.
                self._finish(
                    stream_id,
                    StatusCode.UNAVAILABLE,
                    "server is going away; the call was not processed",
                    (),
                    events,
                    remote_ended=False,
                )

    def _finish(
        self,
        stream_id: int,
        status: StatusCode,
        message: str,
        metadata: Metadata,
        events: list[Event],
        *,
        remote_ended: bool,
    ) -> None:
        st = self._streams.get(stream_id)
        request_done = st is not None and st.out_end and not st.out
        self._pop(stream_id)
        if not remote_ended or not request_done:
            # Either side still open: close it, so that the stream stops counting against the
            # server's MAX_CONCURRENT_STREAMS (h2 counts it until both sides are closed).
            with contextlib.suppress(*_STREAM_GONE):
                self._h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        events.append(TrailersReceived(stream_id, status, message, metadata))

    def _on_response(self, ev: h2.events.ResponseReceived, events: list[Event]) -> None:
        stream_id = ev.stream_id
        st = self._streams.get(stream_id)
        if st is None:
            return
        ended = ev.stream_ended is not None
        http_status = content_type = None
        for name, value in ev.headers or ():
            if name == b":status":
                http_status = bytes(value)
            elif name == b"content-type":
                content_type = bytes(value)
        if http_status != b"200":
            grpc_status, message, md = self._parse_status(ev.headers or ())
            try:
                code = int(http_status or b"0")
            except ValueError:
                code = 0
            if grpc_status is None:
                grpc_status = status_from_http(code)
                message = f"unexpected HTTP status {code}"
            self._finish(stream_id, grpc_status, message, md, events, remote_ended=ended)
            return
        if ended:  # trailers-only
            self._on_trailers(stream_id, ev.headers or (), events)
            return
        if content_type is None or not content_type.startswith(_CT_GRPC):
            self._finish(
                stream_id,
                StatusCode.UNKNOWN,
                "response content-type is not application/grpc",
                (),
                events,
                remote_ended=False,
            )
            return
        st.headers_sent = True  # here: response headers received
        md_list = [
            _decode_metadata(bytes(n), bytes(v))
            for n, v in ev.headers or ()
            if n[:1] != b":" and bytes(n) not in _RESERVED_RESPONSE
        ]
        events.append(ResponseReceived(stream_id, tuple(md_list)))

    def _parse_status(
        self, headers: Iterable[tuple[bytes, bytes] | tuple[str, str]]
    ) -> tuple[StatusCode | None, str, Metadata]:
        status: StatusCode | None = None
        message = ""
        md: list[tuple[str, str | bytes]] = []
        for name, value in headers:
            n = bytes(name, "ascii") if isinstance(name, str) else bytes(name)
            v = bytes(value, "ascii") if isinstance(value, str) else bytes(value)
            if n == b"grpc-status":
                status = status_from_int(int(v)) if v.isdigit() else StatusCode.UNKNOWN
            elif n == b"grpc-message":
                message = decode_grpc_message(v)
            elif n[:1] != b":" and n not in _RESERVED_RESPONSE:
                md.append(_decode_metadata(n, v))
        return status, message, tuple(md)

    def _on_trailers(
        self,
        stream_id: int,
        headers: Iterable[tuple[bytes, bytes] | tuple[str, str]],
        events: list[Event],
    ) -> None:
        st = self._streams.get(stream_id)
        if st is None:
            return
        status, message, md = self._parse_status(headers)
        if status is None:
            status, message = StatusCode.UNKNOWN, "response trailers carry no grpc-status"
        elif st.inbuf and status == StatusCode.OK:
            status = StatusCode.INTERNAL
            message = f"response ended inside a message ({len(st.inbuf)} bytes left over)"
        self._finish(stream_id, status, message, md, events, remote_ended=True)

    def _fail_stream(
        self, stream_id: int, status: StatusCode, message: str, events: list[Event]
    ) -> None:
        self.reset(stream_id, ErrorCodes.CANCEL)
        events.append(StreamError(stream_id, status, message))
