"""The enclave's subscription to the Sign Gateway's Server-Sent Events (DESIGN §5).

Layers: :class:`EventStreamParser` (sans-io, the WHATWG event-stream rules, bounded), a sans-io
HTTP/1.1 client side (:func:`build_request`, :class:`ResponseParser`), the Trio driver
:func:`run_sse_client` (reconnects forever with full-jitter back-off, keepalive, status), and
:class:`SseEventHandler`, which applies ``probe``/``abort``/``freeze``/``unfreeze``/``drain``/
``undrain`` to anything that satisfies :class:`SseControlled` (the enclave's ``SignService`` does).

Deliberate differences from a browser's ``EventSource`` (the spec's processing model):

- A non-200 status or a wrong ``Content-Type`` is retried with back-off instead of failing the
  connection for good (a service must outlive a gateway deploy); only 204 stops reconnecting.
  Redirects are not followed (the parent relay allowlists URLs).
- Each connection's parser starts its last event ID *buffer* at the previous connection's last
  event ID (as browsers do), not at the empty string, so an event without ``id:`` after a
  reconnect does not erase the ``Last-Event-ID`` to resume from.
- On a protocol error (line or event over its limit) the events completed in the same read are
  not delivered and the last event ID is rolled back, so a reconnect gets them again
  (at-least-once; every DESIGN §5 event is idempotent).
"""

from ._client import DEFAULT_BACKOFF_INITIAL_S as DEFAULT_BACKOFF_INITIAL_S
from ._client import DEFAULT_BACKOFF_MAX_S as DEFAULT_BACKOFF_MAX_S
from ._client import DEFAULT_KEEPALIVE_TIMEOUT_S as DEFAULT_KEEPALIVE_TIMEOUT_S
from ._client import MIN_RETRY_S as MIN_RETRY_S
from ._client import SseClientStatus as SseClientStatus
from ._client import run_sse_client as run_sse_client
from ._events import Event as Event
from ._events import MessageEvent as MessageEvent
from ._events import RetryChanged as RetryChanged
from ._events import SseProtocolError as SseProtocolError
from ._events import SseResponseError as SseResponseError
from ._handler import MAX_EVENT_ID_LENGTH as MAX_EVENT_ID_LENGTH
from ._handler import SessionAborter as SessionAborter
from ._handler import SseControlled as SseControlled
from ._handler import SseEventHandler as SseEventHandler
from ._http import DEFAULT_MAX_HEAD_SIZE as DEFAULT_MAX_HEAD_SIZE
from ._http import DEFAULT_MAX_HEADERS as DEFAULT_MAX_HEADERS
from ._http import BodyData as BodyData
from ._http import EndOfMessage as EndOfMessage
from ._http import EventsUrl as EventsUrl
from ._http import ResponseEvent as ResponseEvent
from ._http import ResponseHead as ResponseHead
from ._http import ResponseParser as ResponseParser
from ._http import build_request as build_request
from ._http import check_event_stream as check_event_stream
from ._http import checked_events_url as checked_events_url
from ._http import events_url as events_url
from ._http import parse_events_url as parse_events_url
from ._http import valid_last_event_id as valid_last_event_id
from ._http import valid_node_id as valid_node_id
from ._parser import DEFAULT_MAX_EVENT_SIZE as DEFAULT_MAX_EVENT_SIZE
from ._parser import DEFAULT_MAX_LINE_LENGTH as DEFAULT_MAX_LINE_LENGTH
from ._parser import MAX_RETRY_MS as MAX_RETRY_MS
from ._parser import EventStreamParser as EventStreamParser

__all__ = [
    "DEFAULT_BACKOFF_INITIAL_S",
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_KEEPALIVE_TIMEOUT_S",
    "DEFAULT_MAX_EVENT_SIZE",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEAD_SIZE",
    "DEFAULT_MAX_LINE_LENGTH",
    "MAX_EVENT_ID_LENGTH",
    "MAX_RETRY_MS",
    "MIN_RETRY_S",
    "BodyData",
    "EndOfMessage",
    "Event",
    "EventStreamParser",
    "EventsUrl",
    "MessageEvent",
    "ResponseEvent",
    "ResponseHead",
    "ResponseParser",
    "RetryChanged",
    "SessionAborter",
    "SseClientStatus",
    "SseControlled",
    "SseEventHandler",
    "SseProtocolError",
    "SseResponseError",
    "build_request",
    "check_event_stream",
    "checked_events_url",
    "events_url",
    "parse_events_url",
    "run_sse_client",
    "valid_last_event_id",
    "valid_node_id",
]
