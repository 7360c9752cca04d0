"""The Sign Gateway's side of the service: the coordinator, the prober and the enclaves' event
streams (DESIGN §5)."""

from ._events import DEFAULT_EVENTS_GRACEFUL_TIMEOUT_S as DEFAULT_EVENTS_GRACEFUL_TIMEOUT_S
from ._events import DEFAULT_EVENTS_KEEPALIVE_S as DEFAULT_EVENTS_KEEPALIVE_S
from ._events import DEFAULT_EVENTS_RETRY_MS as DEFAULT_EVENTS_RETRY_MS
from ._events import DEFAULT_MAX_SUBSCRIBERS as DEFAULT_MAX_SUBSCRIBERS
from ._events import DEFAULT_MAX_SUBSCRIBERS_PER_NODE as DEFAULT_MAX_SUBSCRIBERS_PER_NODE
from ._events import DEFAULT_REPLAY_EVENTS as DEFAULT_REPLAY_EVENTS
from ._events import DEFAULT_SUBSCRIBER_QUEUE as DEFAULT_SUBSCRIBER_QUEUE
from ._events import EventHub as EventHub
from ._events import GatewayEventsApp as GatewayEventsApp
from ._events import HubEvent as HubEvent
from ._events import HubStats as HubStats
from ._events import SubscriberLimitError as SubscriberLimitError
from ._events import Subscription as Subscription
from ._events import accepts_event_stream as accepts_event_stream
from ._events import serve_gateway_events as serve_gateway_events
from ._events import valid_node_id as valid_node_id
from ._sse_format import KEEPALIVE_COMMENT as KEEPALIVE_COMMENT
from ._sse_format import format_comment as format_comment
from ._sse_format import format_event as format_event
from ._sse_format import format_retry as format_retry

__all__ = [
    "DEFAULT_EVENTS_GRACEFUL_TIMEOUT_S",
    "DEFAULT_EVENTS_KEEPALIVE_S",
    "DEFAULT_EVENTS_RETRY_MS",
    "DEFAULT_MAX_SUBSCRIBERS",
    "DEFAULT_MAX_SUBSCRIBERS_PER_NODE",
    "DEFAULT_REPLAY_EVENTS",
    "DEFAULT_SUBSCRIBER_QUEUE",
    "KEEPALIVE_COMMENT",
    "EventHub",
    "GatewayEventsApp",
    "HubEvent",
    "HubStats",
    "SubscriberLimitError",
    "Subscription",
    "accepts_event_stream",
    "format_comment",
    "format_event",
    "format_retry",
    "serve_gateway_events",
    "valid_node_id",
]
