"""Events the sans-io gRPC core returns from ``receive_data``. All are frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

from ._status import StatusCode

#: Custom metadata: (lower-case key, value) pairs in wire order. Values of ``-bin`` keys are the
#: base64-decoded bytes; other values are ASCII strings.
Metadata = tuple[tuple[str, str | bytes], ...]


class Event:
    """Base class of every gRPC core event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    """(server) A valid gRPC request started on ``stream_id``.

    Attributes:
        method: the ``:path``, e.g. ``/trio_sign.v1.SignService/Ping``.
        deadline_s: the ``grpc-timeout`` as seconds relative to when the headers arrived, or None.
    """

    stream_id: int
    method: str
    authority: str
    metadata: Metadata
    deadline_s: float | None


@dataclass(frozen=True, slots=True)
class ResponseReceived(Event):
    """(client) The response headers (``:status 200``, ``application/grpc``) arrived."""

    stream_id: int
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """One complete length-prefixed message (payload only, prefix stripped)."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """(server) The client half-closed the stream: the request is complete."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TrailersReceived(Event):
    """(client) The call ended with this status (from trailers, a trailers-only response, or
    derived from a malformed response as the gRPC spec says). The stream is finished."""

    stream_id: int
    status: StatusCode
    message: str
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The peer reset the stream (RST_STREAM). ``status`` is the gRPC mapping of the code."""

    stream_id: int
    error_code: int
    status: StatusCode


@dataclass(frozen=True, slots=True)
class StreamError(Event):
    """The core itself ended the stream because the peer broke the gRPC protocol on it
    (oversized or compressed message, truncated message, ...). As a server the core has already
    answered with ``status``; as a client it has reset the stream. Stop handling the stream."""

    stream_id: int
    status: StatusCode
    message: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    """The peer sent GOAWAY, or broke HTTP/2 so badly that the connection is over.

    Streams up to ``last_stream_id`` may still complete (graceful GOAWAY with ``error_code`` 0);
    streams above it were never processed and can be retried elsewhere.
    """

    error_code: int
    last_stream_id: int
    message: str
