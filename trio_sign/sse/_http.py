"""Sans-io HTTP/1.1, client side, just enough for one event-stream GET.

:func:`build_request` makes the request bytes; :class:`ResponseParser` turns the response bytes
into a :class:`ResponseHead`, :class:`BodyData` pieces and :class:`EndOfMessage`; it handles
``Transfer-Encoding: chunked``, ``Content-Length`` and close-delimited bodies. Everything is
bounded. The parser is strict: CRLF line endings only, no obs-fold, no whitespace before a colon,
no ``Transfer-Encoding`` together with ``Content-Length``, no transfer coding but ``chunked``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlsplit

from ..transport import TransportError
from ._events import SseProtocolError, SseResponseError

#: Largest response head (status line and header lines), and largest trailer section, in bytes.
DEFAULT_MAX_HEAD_SIZE: Final = 16 * 1024
#: Most header lines in a response head.
DEFAULT_MAX_HEADERS: Final = 100
#: Longest chunk-size line (size and extensions), in bytes.
MAX_CHUNK_LINE: Final = 1024

_STATUS_LINE: Final = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_HEX: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TARGET: Final = re.compile(r"[!-~]+")


@dataclass(frozen=True, slots=True)
class EventsUrl:
    """A parsed gateway events URL: what goes into the request line and ``Host``."""

    host: str
    target: str

    def __str__(self) -> str:
        return f"http://{self.host}{self.target}"


def parse_events_url(url: str) -> EventsUrl:
    """Parse ``http(s)://host[:port]/path[?query]`` (the relay terminates TLS, so both schemes
    mean a plain HTTP/1.1 request on the injected stream).

    Raises:
        TransportError: not an http(s) URL, credentials in it, no host, or a non-ASCII target.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (validates the port)
    except ValueError as exc:
        raise TransportError(f"events URL {url!r} is not a URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise TransportError(f"events URL {url!r}: scheme must be http:// or https://")
    if "@" in parts.netloc:
        raise TransportError("events URL: credentials in the URL are refused")
    if not parts.hostname:
        raise TransportError(f"events URL {url!r}: a host is required")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not _TARGET.fullmatch(target) or not _TARGET.fullmatch(parts.netloc):
        raise TransportError(
            f"events URL {url!r}: percent-encode anything that is not printable ASCII"
        )
    return EventsUrl(host=parts.netloc, target=target)


_NODE_ID: Final = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def valid_node_id(node_id: str) -> bool:
    """Whether ``node_id`` is 1 to 128 URL-unreserved characters (letters, digits, ``.``,
    ``_``, ``~``, ``-``): it names the node in the events path, in logs and in metrics, so
    parent config, gateway config and the enclave all hold it to this."""
    return _NODE_ID.fullmatch(node_id) is not None and node_id not in (".", "..")


def events_url(gateway: str, node_id: str) -> str:
    """``{gateway}/v1/enclaves/{node_id}/events`` (DESIGN §5), the node id percent-encoded."""
    return f"{gateway.rstrip('/')}/v1/enclaves/{quote(node_id, safe='')}/events"


def checked_events_url(gateway: str, node_id: str) -> str:
    """:func:`events_url` for a node id :func:`valid_node_id` accepts and a URL
    :func:`parse_events_url` accepts (what the parent's config and the enclave both require).

    Raises:
        TransportError: saying which of the two is wrong.
    """
    if not valid_node_id(node_id):
        raise TransportError(
            f"node id {node_id[:128]!r}: use 1 to 128 letters, digits, '.', '_', '~' or '-'"
        )
    url = events_url(gateway, node_id)
    parse_events_url(url)
    return url


def valid_last_event_id(last_event_id: str) -> bool:
    """Whether the ID can go into a ``Last-Event-ID`` header (no control characters)."""
    return not any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in last_event_id)


def build_request(url: EventsUrl, *, last_event_id: str = "") -> bytes:
    """The GET request for the event stream. No credentials, no body.

    ``Last-Event-ID`` is sent (UTF-8) when ``last_event_id`` is not empty; the caller checks
    :func:`valid_last_event_id` first (an ID with control characters raises ``ValueError``).
    """
    lines = [
        f"GET {url.target} HTTP/1.1",
        f"Host: {url.host}",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
    ]
    if last_event_id:
        if not valid_last_event_id(last_event_id):
            raise ValueError("last_event_id contains control characters")
        lines.append(f"Last-Event-ID: {last_event_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


# -- response ----------------------------------------------------------------------------------


class ResponseEvent:
    """Base class of :class:`ResponseParser` events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ResponseHead(ResponseEvent):
    """The final (non-1xx) response head.

    Attributes:
        headers: (lower-case name, value) pairs in wire order; values decoded as Latin-1.
    """

    status: int
    reason: str
    http_version: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        """All values of header ``name`` (lower case), joined with ``", "``; None if absent."""
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None


@dataclass(frozen=True, slots=True)
class BodyData(ResponseEvent):
    """Body bytes (transfer coding removed)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage(ResponseEvent):
    """The body ended (last chunk, ``Content-Length`` reached, or EOF of a close-delimited body)."""


def check_event_stream(head: ResponseHead) -> None:
    """Accept only ``200`` with ``Content-Type: text/event-stream`` (parameters allowed).

    Raises:
        SseResponseError: anything else; ``status == 204`` means the server wants no reconnect.
    """
    content_type = head.get("content-type") or ""
    if head.status != 200:
        raise SseResponseError(
            f"gateway answered HTTP {head.status} {head.reason!r}, expected 200"
            " with text/event-stream",
            status=head.status,
            content_type=content_type,
        )
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "text/event-stream":
        raise SseResponseError(
            f"gateway answered HTTP 200 with Content-Type {content_type!r},"
            " expected text/event-stream",
            status=head.status,
            content_type=content_type,
        )


class ResponseParser:
    """Parse one HTTP/1.1 response to a GET.

    Args:
        max_head_size: largest head (and trailer section) in bytes.
        max_headers: most header lines.

    Error handling: every malformed or oversized input raises :class:`SseProtocolError`, after
    which the parser is dead.
    """

    def __init__(
        self,
        *,
        max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        self._max_head_size = max_head_size
        self._max_headers = max_headers
        self._buffer = bytearray()
        # head -> (chunk_size -> chunk_data -> chunk_crlf)* -> trailers -> done,
        # or head -> length -> done, or head -> close -> done (at EOF).
        self._state = "head"
        self._remaining = 0
        self._trailer_bytes = 0
        self._failed = False

    def receive_data(self, data: bytes | bytearray) -> list[ResponseHead | BodyData | EndOfMessage]:
        """Feed bytes; return the events they complete.

        Raises:
            SseProtocolError: a malformed or oversized head, chunk or trailer.
        """
        if self._failed:
            raise SseProtocolError("the HTTP response already failed; reconnect")
        self._buffer += data
        events: list[ResponseHead | BodyData | EndOfMessage] = []
        try:
            while self._step(events):
                pass
        except SseProtocolError:
            self._failed = True
            raise
        return events

    def receive_eof(self) -> list[ResponseHead | BodyData | EndOfMessage]:
        """The peer closed the connection.

        Raises:
            SseProtocolError: the response was incomplete (only a close-delimited body may end so).
        """
        if self._state == "close":
            self._state = "done"
            return [EndOfMessage()]
        if self._state == "done":
            return []
        self._failed = True
        where = "response head" if self._state == "head" else "body"
        raise SseProtocolError(f"connection closed in the middle of the {where}")

    # -- internals -------------------------------------------------------------------------

    def _step(self, events: list[ResponseHead | BodyData | EndOfMessage]) -> bool:
        """Make progress on the buffer; False when more bytes are needed."""
        state = self._state
        if state == "head":
            return self._parse_head(events)
        if state == "close" or state == "length":
            if not self._buffer:
                return False
            if state == "close":
                piece = bytes(self._buffer)
            else:
                piece = bytes(self._buffer[: self._remaining])
                self._remaining -= len(piece)
            del self._buffer[: len(piece)]
            events.append(BodyData(piece))
            if state == "length" and self._remaining == 0:
                self._finish(events)
            return False if state == "close" else bool(self._buffer)
        if state == "chunk_size":
            line = self._take_line(MAX_CHUNK_LINE, "chunk-size line")
            if line is None:
                return False
            size_text = line.split(b";", 1)[0].rstrip(b" \t")
            if not _HEX.fullmatch(size_text):
                raise SseProtocolError(f"malformed chunk-size line {bytes(line[:40])!r}")
            self._remaining = int(size_text, 16)
            self._state = "chunk_data" if self._remaining else "trailers"
            self._trailer_bytes = 0
            return True
        if state == "chunk_data":
            if not self._buffer:
                return False
            piece = bytes(self._buffer[: self._remaining])
            del self._buffer[: len(piece)]
            self._remaining -= len(piece)
            events.append(BodyData(piece))
            if self._remaining == 0:
                self._state = "chunk_crlf"
            return True
        if state == "chunk_crlf":
            if len(self._buffer) < 2:
                if self._buffer and self._buffer[:1] != b"\r":
                    raise SseProtocolError("chunk data not followed by CRLF")
                return False
            if self._buffer[:2] != b"\r\n":
                raise SseProtocolError("chunk data not followed by CRLF")
            del self._buffer[:2]
            self._state = "chunk_size"
            return True
        if state == "trailers":
            line = self._take_line(self._max_head_size - self._trailer_bytes, "trailer section")
            if line is None:
                return False
            self._trailer_bytes += len(line) + 2
            if not line:
                self._finish(events)
            return True
        # done: anything after the message is ignored; the connection is dropped anyway.
        self._buffer.clear()
        return False

    def _take_line(self, limit: int, what: str) -> bytearray | None:
        end = self._buffer.find(b"\r\n")
        if end == -1:
            if len(self._buffer) > limit:
                raise SseProtocolError(f"{what} longer than {limit} bytes")
            return None
        if end > limit:
            raise SseProtocolError(f"{what} longer than {limit} bytes")
        line = self._buffer[:end]
        del self._buffer[: end + 2]
        return line

    def _finish(self, events: list[ResponseHead | BodyData | EndOfMessage]) -> None:
        self._state = "done"
        events.append(EndOfMessage())

    def _parse_head(self, events: list[ResponseHead | BodyData | EndOfMessage]) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            if len(self._buffer) > self._max_head_size:
                raise SseProtocolError(
                    f"response head larger than {self._max_head_size} bytes (max_head_size)"
                )
            return False
        if end + 4 > self._max_head_size:
            raise SseProtocolError(
                f"response head larger than {self._max_head_size} bytes (max_head_size)"
            )
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        lines = raw.split(b"\r\n")
        status_match = _STATUS_LINE.fullmatch(lines[0])
        if status_match is None:
            raise SseProtocolError(f"malformed HTTP status line {lines[0][:60]!r}")
        if len(lines) - 1 > self._max_headers:
            raise SseProtocolError(f"more than {self._max_headers} response headers")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                raise SseProtocolError(f"malformed header line {line[:60]!r}")
            value = value.strip(b" \t")
            if not _FIELD_VALUE.fullmatch(value):
                raise SseProtocolError(f"control character in header {name.decode('ascii')!r}")
            headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
        status = int(status_match.group(2))
        head = ResponseHead(
            status=status,
            reason=(status_match.group(3) or b"").decode("latin-1"),
            http_version=status_match.group(1).decode("ascii"),
            headers=tuple(headers),
        )
        if 100 <= status < 200:
            if status == 101:
                raise SseProtocolError("unexpected 101 Switching Protocols")
            return True  # interim response: the final one follows
        events.append(head)
        self._choose_framing(head, events)
        return self._state != "done"

    def _choose_framing(
        self, head: ResponseHead, events: list[ResponseHead | BodyData | EndOfMessage]
    ) -> None:
        transfer_encoding = head.get("transfer-encoding")
        content_length = head.get("content-length")
        if head.status in (204, 304):
            self._finish(events)
        elif transfer_encoding is not None:
            if content_length is not None:
                raise SseProtocolError("response has both Transfer-Encoding and Content-Length")
            codings = [c.strip().lower() for c in transfer_encoding.split(",")]
            if codings != ["chunked"]:
                raise SseProtocolError(
                    f"unsupported Transfer-Encoding {transfer_encoding!r} (only chunked)"
                )
            self._state = "chunk_size"
        elif content_length is not None:
            values = {v.strip() for v in content_length.split(",")}
            value = values.pop()
            if values or not value.isascii() or not value.isdigit() or len(value) > 18:
                raise SseProtocolError(f"invalid Content-Length {content_length!r}")
            self._remaining = int(value)
            if self._remaining == 0:
                self._finish(events)
            else:
                self._state = "length"
        else:
            self._state = "close"
