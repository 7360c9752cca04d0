"""What the SSE cores return and raise. Events are frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import TrioSignError


class SseProtocolError(TrioSignError):
    """The gateway (or the relay) sent something that is not a valid, bounded event stream over
    HTTP/1.1: a line or event over the size limit, a malformed response head or chunk.

    The connection is useless after this; the client drops it and reconnects with back-off.
    """


class SseResponseError(SseProtocolError):
    """A well-formed HTTP response that is not an event stream: a status other than 200, or a
    ``Content-Type`` other than ``text/event-stream``. Status 204 means "stop reconnecting".

    Attributes:
        status: the HTTP status code.
        content_type: the response's ``Content-Type`` (``""`` if absent).
    """

    def __init__(self, message: str, *, status: int, content_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.content_type = content_type


class Event:
    """Base class of the event-stream parser's events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class MessageEvent(Event):
    """One dispatched event.

    Attributes:
        type: the ``event:`` field, or ``"message"`` when there was none.
        data: the ``data:`` lines joined with ``"\\n"`` (no trailing newline).
        last_event_id: the stream's last event ID when this event was dispatched.
    """

    type: str
    data: str
    last_event_id: str


@dataclass(frozen=True, slots=True)
class RetryChanged(Event):
    """The server set the reconnection time (``retry:`` field), in milliseconds."""

    ms: int
