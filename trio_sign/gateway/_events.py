"""The gateway's Server-Sent Events endpoint, one stream per enclave node (DESIGN §5).

``GET /v1/enclaves/{node_id}/events`` streams ``probe``, ``abort``, ``freeze``, ``unfreeze``,
``drain`` and ``undrain`` events to the enclave (through the parent's relay). Layers:

- :mod:`._sse_format` (sans-io) turns an event into bytes.
- :class:`EventHub` (no I/O, no ``await``): the coordinator and the prober publish into it
  synchronously; per node it keeps a bounded replay buffer of the last events, so that a
  reconnecting enclave's ``Last-Event-ID`` resumes exactly after what it saw, and fans events out
  to the node's subscribers through bounded queues.
- :class:`GatewayEventsApp` (ASGI) and :func:`serve_gateway_events` (hypercorn's Trio worker)
  only move the hub's bytes to the HTTP response.

Event ids are ``{epoch}-{seq}``: ``seq`` counts up from 1 per node, ``epoch`` is random per hub,
so after a gateway restart an enclave's old ``Last-Event-ID`` is recognised as foreign (and
everything the new hub kept is replayed) instead of being compared with unrelated numbers.

Subscribers authenticate (DESIGN §16): the gateway holds one bearer token per node id, and a
request must carry ``Authorization: Bearer <that node's token>``. In production the enclave
never sees it: the parent's relay adds it upstream from ``[relay] token`` in ``parent.toml``.
An unknown node and a wrong token get the same ``401``, checked (in constant time) before the
hub is touched, so unauthenticated clients take no subscription slot. A node already at
``max_subscribers_per_node`` is refused (``429``): a new subscription never displaces one that
authenticated before it.

Every stream starts with an id-only block (``id: {epoch}-{cursor}``, no event), the position
just before what this connection will send. It sets the enclave's last event ID without
dispatching anything, so even an enclave that subscribed without ``Last-Event-ID`` and was
disconnected before its first event resumes at the right place (``{epoch}-0`` means "before
the first event").
"""

from __future__ import annotations

import collections
import functools
import hmac
import logging
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from .._errors import TrioSignError
from ..rpc import LogThrottle
from ..sse import MAX_EVENT_ID_LENGTH
from ..transport import hypercorn_bind, serve_asgi
from ..transport._asgi import (
    Receive,
    Scope,
    Send,
    asgi_lifespan,
    cancel_on_disconnect,
    respond,
    send_chunk,
)
from ._sse_format import KEEPALIVE_COMMENT, format_event, format_id, format_retry

log = logging.getLogger("trio_sign.gateway.events")

#: Events kept per node for replay to a reconnecting enclave.
DEFAULT_REPLAY_EVENTS: Final = 256
#: Events queued per subscriber; a subscriber that falls further behind is disconnected (it
#: reconnects with ``Last-Event-ID`` and is replayed from the buffer).
DEFAULT_SUBSCRIBER_QUEUE: Final = 64
#: Concurrent subscriptions per node; one is normal, a second one appears while a dead
#: connection has not been noticed yet. A new one beyond this is refused (``429``), never
#: allowed to displace a subscriber that is already there.
DEFAULT_MAX_SUBSCRIBERS_PER_NODE: Final = 4
#: Concurrent subscriptions over all nodes; more are answered ``503``. Only authenticated
#: subscribers count, so at most (nodes x ``max_subscribers_per_node``) can be reached.
DEFAULT_MAX_SUBSCRIBERS: Final = 1024
#: Refused subscriptions (``401``, ``429``) are logged at most once per this many seconds, with
#: the count since the last line: a flood of bad requests must not become a flood of log lines.
DEFAULT_REFUSAL_LOG_INTERVAL_S: Final = 10.0
#: Seconds of silence after which a comment is sent; well under the enclave's 45 s
#: ``sse_keepalive_timeout_s`` and the relay's 90 s idle timeout.
DEFAULT_EVENTS_KEEPALIVE_S: Final = 15.0
#: The ``retry:`` sent at the start of every stream: the base of the enclave's reconnect back-off.
DEFAULT_EVENTS_RETRY_MS: Final = 1000
#: Grace period for open streams when the server is cancelled.
DEFAULT_EVENTS_GRACEFUL_TIMEOUT_S: Final = 1.0

#: A node id as it appears in the URL (DESIGN §5).
NODE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
_PATH: Final = re.compile(r"/v1/enclaves/(?P<node_id>[^/]*)/events")
_EVENT_ID: Final = re.compile(r"(?P<epoch>[0-9a-f]{8})-(?P<seq>0|[1-9][0-9]{0,18})")
#: A bearer token as configured (RFC 6750 ``b64token``), long enough to be a secret.
BEARER_TOKEN_PATTERN: Final = re.compile(r"[A-Za-z0-9._~+/-]{16,1024}=*")
BEARER_TOKEN_RULE: Final = "16 to 1024 characters of A-Z a-z 0-9 - . _ ~ + / (then optional =)"


class SubscriberLimitError(TrioSignError):
    """The hub already has ``max_subscribers`` subscriptions (raise the setting, or find out why
    so many enclaves are connected)."""


class NodeSubscriberLimitError(SubscriberLimitError):
    """The node already has ``max_subscribers_per_node`` subscriptions; the new one is refused
    (the old ones end when their connections are found dead, and the enclave retries)."""


def valid_bearer_token(token: str) -> bool:
    """Whether ``token`` is a usable bearer token (:data:`BEARER_TOKEN_RULE`)."""
    return isinstance(token, str) and BEARER_TOKEN_PATTERN.fullmatch(token) is not None


def valid_node_id(node_id: str) -> bool:
    """Whether ``node_id`` is ``[A-Za-z0-9._-]{1,128}`` and not ``.`` or ``..``."""
    return NODE_ID_PATTERN.fullmatch(node_id) is not None and node_id not in (".", "..")


def _check_node_id(node_id: str) -> None:
    if not valid_node_id(node_id):
        raise ValueError(f"node id {node_id[:140]!r} is not [A-Za-z0-9._-]{{1,128}}")


@dataclass(frozen=True, slots=True)
class HubEvent:
    """One published event.

    Attributes:
        seq: its position in the node's stream (1, 2, ...).
        id: the SSE id, ``{epoch}-{seq}``.
        type: the event type (``probe``, ...).
        wire: the encoded event, ready to write.
    """

    seq: int
    id: str
    type: str
    wire: bytes


class Subscription:
    """One subscriber of one node's events: first :attr:`backlog`, then :meth:`receive`.

    Created by :meth:`EventHub.subscribe`. If the subscriber falls more than the hub's
    ``subscriber_queue`` events behind, or is cut by :meth:`EventHub.disconnect`, :attr:`dropped`
    is set, :attr:`cancel_scope` is cancelled (so a writer blocked on a stuck peer is not waited
    on) and :meth:`receive` raises ``trio.EndOfChannel`` once the queue is empty.

    Attributes:
        node_id: the node.
        cursor: the id just before :attr:`backlog` (or before the next live event): send it
            first, as an id-only block.
        backlog: events to send before any received ones (the replay after ``Last-Event-ID``).
        cancel_scope: run the writer in it.
        dropped: why the hub disconnected this subscriber (``""`` while subscribed).
    """

    def __init__(
        self, node_id: str, cursor: str, backlog: tuple[HubEvent, ...], queue_size: int
    ) -> None:
        self.node_id = node_id
        self.cursor = cursor
        self.backlog = backlog
        self.cancel_scope = trio.CancelScope()
        self.dropped = ""
        self._send, self._receive = trio.open_memory_channel[HubEvent](queue_size)

    async def receive(self) -> HubEvent:
        """The next live event.

        Error handling: ``trio.EndOfChannel`` after the hub dropped this subscriber (or it was
        closed) and the queue is empty.
        """
        return await self._receive.receive()

    def _offer(self, event: HubEvent) -> bool:
        # Registered subscribers only; one just cut may still be listed until its stream task
        # cleans up (see `disconnect` and the slow-subscriber drop).
        if self.dropped:
            return False  # cut but not yet cleaned up by its stream task: nothing to offer to
        try:
            self._send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    def _drop(self, reason: str) -> None:
        if not self.dropped:
            self.dropped = reason
        self._send.close()
        self.cancel_scope.cancel()

    def _close(self) -> None:
        self._send.close()
        self._receive.close()


@dataclass(slots=True)
class _Node:
    buffer: collections.deque[HubEvent]
    next_seq: int = 1
    subscribers: list[Subscription] = field(default_factory=list)


@dataclass(slots=True)
class HubStats:
    """Counters for metrics; updated in place by the hub.

    Attributes:
        published: events published.
        subscriptions: subscriptions opened.
        dropped_slow: subscribers disconnected for falling behind.
        refused: subscriptions refused (``max_subscribers``).
        refused_node: subscriptions refused because their node was at
            ``max_subscribers_per_node``.
        unauthorized: requests refused ``401`` (unknown node or wrong token; counted by
            :class:`GatewayEventsApp`).
        replayed: events replayed to reconnecting subscribers.
        gaps: reconnects whose ``Last-Event-ID`` was older than the replay buffer.
    """

    published: int = 0
    subscriptions: int = 0
    dropped_slow: int = 0
    refused: int = 0
    refused_node: int = 0
    unauthorized: int = 0
    replayed: int = 0
    gaps: int = 0


class EventHub:
    """Per-node event streams with replay; publish synchronously, subscribe per connection.

    Args:
        replay_events: events kept per node for ``Last-Event-ID`` replay.
        subscriber_queue: events queued per subscriber before it is disconnected.
        max_subscribers_per_node: subscriptions per node; beyond this :meth:`subscribe` raises.
        max_subscribers: subscriptions over all nodes; beyond this :meth:`subscribe` raises.

    The hub does not authenticate: it trusts its caller (:class:`GatewayEventsApp`) to have
    checked the node's credential before :meth:`subscribe`.

    Nothing here awaits; the publish methods may be called from any Trio task (or from
    synchronous code running in the Trio thread). Memory is bounded by the number of nodes
    published to times ``replay_events``; nodes that were only subscribed to are forgotten when
    their last subscriber leaves.
    """

    def __init__(
        self,
        *,
        replay_events: int = DEFAULT_REPLAY_EVENTS,
        subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE,
        max_subscribers_per_node: int = DEFAULT_MAX_SUBSCRIBERS_PER_NODE,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
    ) -> None:
        if min(replay_events, subscriber_queue, max_subscribers_per_node, max_subscribers) < 1:
            raise ValueError("every EventHub limit must be at least 1")
        self.replay_events = replay_events
        self.subscriber_queue = subscriber_queue
        self.max_subscribers_per_node = max_subscribers_per_node
        self.max_subscribers = max_subscribers
        self.epoch = secrets.token_hex(4)
        self.stats = HubStats()
        self._nodes: dict[str, _Node] = {}
        self._total_subscribers = 0

    # -- publishing ----------------------------------------------------------------------------

    def probe(self, node_id: str, nonce: str | None = None) -> str:
        """Publish a ``probe`` and return its nonce (the enclave echoes it in
        ``GetStatus.last_sse_probe``): ``nonce``, or a fresh random one if None.

        Error handling: ``ValueError`` for an empty nonce or one over
        :data:`~trio_sign.sse.MAX_EVENT_ID_LENGTH` characters (the enclave would ignore it).
        """
        if nonce is None:
            nonce = secrets.token_urlsafe(16)
        elif not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_EVENT_ID_LENGTH:
            raise ValueError(f"a probe nonce must be 1..{MAX_EVENT_ID_LENGTH} characters")
        self.publish(node_id, "probe", {"nonce": nonce})
        return nonce

    async def send_probe(self, node_id: str, nonce: str) -> None:
        """The prober's ``send_probe`` hook (:data:`~trio_sign.gateway.SendProbe`): publish a
        ``probe`` with the prober's nonce.

        A node with no subscriber right now is not an error: the probe is kept for replay, and
        the prober's echo check reports the node anyway.
        """
        self.probe(node_id, nonce)
        if not self.subscribers(node_id):
            log.debug("events: probe for node %r, which has no subscriber now", node_id)

    def abort(self, node_id: str, session_id: str) -> str:
        """Publish ``abort``: the node drops the session. Returns the event id."""
        return self.publish(node_id, "abort", {"session_id": _non_empty("session_id", session_id)})

    def freeze(self, node_id: str, account_id: str) -> str:
        """Publish ``freeze``: the node refuses ``Commit``/``Sign`` for the account."""
        return self.publish(node_id, "freeze", {"account_id": _non_empty("account_id", account_id)})

    def unfreeze(self, node_id: str, account_id: str) -> str:
        """Publish ``unfreeze``: the node serves the account again."""
        return self.publish(
            node_id, "unfreeze", {"account_id": _non_empty("account_id", account_id)}
        )

    def drain(self, node_id: str) -> str:
        """Publish ``drain``: the node takes no new sessions and finishes the open ones."""
        return self.publish(node_id, "drain", {})

    def undrain(self, node_id: str) -> str:
        """Publish ``undrain``: the node takes new sessions again after a ``drain`` (an
        enclave that is stopping stays drained)."""
        return self.publish(node_id, "undrain", {})

    def publish(self, node_id: str, event: str, data: Mapping[str, Any]) -> str:
        """Append an event to the node's stream and offer it to every subscriber; returns its id.

        A subscriber whose queue is full is disconnected (never waited on); it will reconnect
        with ``Last-Event-ID`` and get the event from the replay buffer.

        Error handling: ``ValueError`` for a bad node id or event (see
        :func:`~trio_sign.gateway.format_event`).
        """
        _check_node_id(node_id)
        node = self._node(node_id)
        seq = node.next_seq
        event_id = f"{self.epoch}-{seq}"
        hub_event = HubEvent(seq, event_id, event, format_event(event, data, id=event_id))
        node.next_seq += 1
        node.buffer.append(hub_event)
        self.stats.published += 1
        for sub in list(node.subscribers):
            if not sub._offer(hub_event):
                self.stats.dropped_slow += 1
                log.warning(
                    "events: subscriber of node %r is %d events behind; disconnecting it",
                    node_id,
                    self.subscriber_queue,
                )
                self._remove(node_id, node, sub, "fell behind")
        log.debug(
            "events: %s %s to node %r (%d subscribers)",
            event,
            event_id,
            node_id,
            len(node.subscribers),
        )
        return event_id

    # -- subscribing ---------------------------------------------------------------------------

    def subscribers(self, node_id: str) -> int:
        """How many subscriptions the node has now."""
        node = self._nodes.get(node_id)
        return len(node.subscribers) if node is not None else 0

    def disconnect(self, node_id: str) -> int:
        """Cut every subscription of the node (operators: force a resubscription). The enclave
        reconnects with its ``Last-Event-ID`` and gets what it missed replayed. Returns how
        many were cut."""
        node = self._nodes.get(node_id)
        if node is None:
            return 0
        subscriptions = list(node.subscribers)
        for sub in subscriptions:
            sub._drop("disconnected by the gateway")
        return len(subscriptions)

    def last_event_id(self, node_id: str) -> str | None:
        """The id of the node's latest event, or None if nothing was published to it."""
        node = self._nodes.get(node_id)
        return node.buffer[-1].id if node is not None and node.buffer else None

    @contextmanager
    def subscribe(self, node_id: str, last_event_id: str = "") -> Iterator[Subscription]:
        """Subscribe to a node's events, resuming after ``last_event_id``.

        The replay and the registration happen together (nothing awaits in between), so the
        subscriber sees every event after ``last_event_id`` exactly once, in order:

        - ``""``: live events only.
        - an id of this hub still in the buffer (or the latest one, or a
          :attr:`Subscription.cursor`, ``{epoch}-0`` included): the events after it.
        - an id of this hub older than the buffer: everything kept, with a WARNING (events
          between it and the oldest kept one are lost).
        - an id of another hub (a gateway restart): everything kept.
        - anything else (garbage, or an id from the future): live events only, with a WARNING.

        A node that already has ``max_subscribers_per_node`` subscriptions gets no new one: a
        newcomer never displaces a subscriber (whoever holds a slot keeps it until its
        connection ends, is found dead by a keepalive write, or falls behind).

        Error handling: ``ValueError`` for a bad node id; :class:`NodeSubscriberLimitError`
        when the node has ``max_subscribers_per_node``, :class:`SubscriberLimitError` when
        ``max_subscribers`` are open.
        """
        _check_node_id(node_id)
        if self._total_subscribers >= self.max_subscribers:
            self.stats.refused += 1
            raise SubscriberLimitError(
                f"{self._total_subscribers} event subscriptions are open (max_subscribers)"
            )
        if self.subscribers(node_id) >= self.max_subscribers_per_node:
            self.stats.refused_node += 1
            raise NodeSubscriberLimitError(
                f"node {node_id!r} already has {self.subscribers(node_id)} event subscriptions"
                " (max_subscribers_per_node)"
            )
        node = self._node(node_id)
        backlog = self._replay(node_id, node, last_event_id)
        cursor = backlog[0].seq - 1 if backlog else node.next_seq - 1
        sub = Subscription(node_id, f"{self.epoch}-{cursor}", backlog, self.subscriber_queue)
        node.subscribers.append(sub)
        self._total_subscribers += 1
        self.stats.subscriptions += 1
        self.stats.replayed += len(backlog)
        try:
            yield sub
        finally:
            if sub in node.subscribers:
                self._remove(node_id, node, sub, "")
            sub._close()

    def _replay(self, node_id: str, node: _Node, last_event_id: str) -> tuple[HubEvent, ...]:
        buffer = node.buffer
        if not last_event_id:
            return ()
        match = _EVENT_ID.fullmatch(last_event_id)
        if match is None or (match["epoch"] == self.epoch and int(match["seq"]) >= node.next_seq):
            log.warning(
                "events: node %r resumed from unknown Last-Event-ID %r; sending new events only",
                node_id,
                last_event_id[:80],
            )
            return ()
        if match["epoch"] != self.epoch:
            log.info(
                "events: node %r resumed from another gateway's event id %r; replaying all %d"
                " kept events",
                node_id,
                last_event_id,
                len(buffer),
            )
            return tuple(buffer)
        seq = int(match["seq"])
        if buffer and seq < buffer[0].seq - 1:
            self.stats.gaps += 1
            log.warning(
                "events: node %r resumed from event %s but the oldest kept is %s: events %d..%d"
                " may have been missed (replay_events=%d)",
                node_id,
                last_event_id,
                buffer[0].id,
                seq + 1,
                buffer[0].seq - 1,
                self.replay_events,
            )
            return tuple(buffer)
        return tuple(e for e in buffer if e.seq > seq)

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node(collections.deque(maxlen=self.replay_events))
        return node

    def _remove(self, node_id: str, node: _Node, sub: Subscription, reason: str) -> None:
        node.subscribers.remove(sub)
        self._total_subscribers -= 1
        if reason:
            sub._drop(reason)
        if not node.subscribers and not node.buffer:
            # Only subscribed to, never published to: nothing worth keeping (and a client
            # must not be able to grow the hub by inventing node ids).
            del self._nodes[node_id]


def _non_empty(name: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


# -- the ASGI application ----------------------------------------------------------------------


_TEXT: Final = b"text/plain; charset=utf-8"
_EVENT_STREAM: Final = "text/event-stream"


def accepts_event_stream(accept: str | None) -> bool:
    """Whether an ``Accept`` header allows ``text/event-stream`` (RFC 9110 §12.5.1: no header
    accepts anything; ``text/*`` and ``*/*`` count; ``q=0`` excludes)."""
    if accept is None:
        return True
    best: tuple[int, float] | None = None  # (specificity, q) of the most specific match
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        media = media.lower()
        if media == _EVENT_STREAM:
            specificity = 2
        elif media == "text/*":
            specificity = 1
        elif media == "*/*":
            specificity = 0
        else:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if best is None or specificity > best[0]:
            best = (specificity, q)
    return best is not None and best[1] > 0


def _header(scope: Scope, name: bytes) -> str | None:
    values = [value for key, value in scope.get("headers", []) if key.lower() == name]
    if not values:
        return None
    return b",".join(values).decode("latin-1")


def bearer_token(scope: Mapping[str, Any]) -> bytes:
    """The token of the request's single ``Authorization: Bearer`` header, or ``b""`` (no
    header, several, another scheme, or an empty token)."""
    values = [value for key, value in scope.get("headers", []) if key.lower() == b"authorization"]
    if len(values) != 1:
        return b""
    scheme, _, token = bytes(values[0]).strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


class GatewayEventsApp:
    """The ASGI app behind :func:`serve_gateway_events` (no framework).

    ``GET /v1/enclaves/{node_id}/events`` with ``Authorization: Bearer <the node's token>``:
    ``200 text/event-stream``, a ``retry:`` block, an id-only block
    (:attr:`Subscription.cursor`), the replay after ``Last-Event-ID``, then live events, with a
    comment after every ``keepalive_s`` of silence. ``400`` for a malformed node id, ``401``
    (the same for an unknown node as for a wrong or missing token) before anything else about
    the node is looked at, ``404`` for any other path, ``405`` for other methods, ``406`` when
    ``Accept`` rules out ``text/event-stream``, ``429`` when the node is at
    ``max_subscribers_per_node``, ``503`` when the hub is at ``max_subscribers``.

    Args:
        hub: where the events come from.
        credentials: node id -> bearer token; a node not listed cannot subscribe. Tokens are
            compared with :func:`hmac.compare_digest` and never logged.
        keepalive_s: a comment after this many seconds of silence.
        retry_ms: the ``retry:`` sent first on every stream.
        refusal_log_interval_s: ``401``/``429`` are logged at most once per this many seconds.

    Error handling: ``ValueError`` for a bad node id or a token that is not
    :data:`BEARER_TOKEN_RULE` in ``credentials`` (the message names the node, never the token).
    """

    def __init__(
        self,
        hub: EventHub,
        *,
        credentials: Mapping[str, str],
        keepalive_s: float = DEFAULT_EVENTS_KEEPALIVE_S,
        retry_ms: int = DEFAULT_EVENTS_RETRY_MS,
        refusal_log_interval_s: float = DEFAULT_REFUSAL_LOG_INTERVAL_S,
    ) -> None:
        if keepalive_s <= 0:
            raise ValueError("keepalive_s must be positive")
        if refusal_log_interval_s < 0:
            raise ValueError("refusal_log_interval_s must not be negative")
        self._credentials: dict[str, bytes] = {}
        for node_id, token in credentials.items():
            _check_node_id(node_id)
            if not valid_bearer_token(token):
                raise ValueError(f"the events token of node {node_id!r}: use {BEARER_TOKEN_RULE}")
            self._credentials[node_id] = token.encode("ascii")
        # Compared against when the node is unknown, so that both refusals cost the same.
        self._decoy = secrets.token_urlsafe(32).encode("ascii")
        self.hub = hub
        self.keepalive_s = keepalive_s
        self.retry_block = format_retry(retry_ms)
        self._unauthorized_log = LogThrottle(refusal_log_interval_s, trio.current_time)
        self._busy_log = LogThrottle(refusal_log_interval_s, trio.current_time)

    def __repr__(self) -> str:
        return f"GatewayEventsApp(nodes={sorted(self._credentials)!r})"

    def authorized(self, scope: Scope, node_id: str) -> bool:
        """Whether the request carries ``node_id``'s bearer token (constant time in the token;
        an unknown node is checked against a decoy so it looks the same from outside)."""
        presented = bearer_token(scope)
        expected = self._credentials.get(node_id)
        match = hmac.compare_digest(presented, self._decoy if expected is None else expected)
        return match and expected is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await asgi_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        match = _PATH.fullmatch(scope.get("path", ""))
        if match is None:
            await _respond(send, 404, b"not found\n")
            return
        if scope.get("method") != "GET":
            await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET")])
            return
        node_id = match["node_id"]
        if not valid_node_id(node_id):
            await _respond(send, 400, b"malformed node id: [A-Za-z0-9._-]{1,128} expected\n")
            return
        if not self.authorized(scope, node_id):
            self.hub.stats.unauthorized += 1
            held = self._unauthorized_log.allow()
            if held is not None:
                log.warning(
                    "events: refused an unauthenticated subscription for node %r (401; %d more"
                    " since the last such line)",
                    node_id,
                    held,
                )
            await _respond(send, 401, b"unauthorized\n", [(b"www-authenticate", b"Bearer")])
            return
        if not accepts_event_stream(_header(scope, b"accept")):
            await _respond(send, 406, b"only text/event-stream is served here\n")
            return
        raw_last = _header(scope, b"last-event-id") or ""
        try:
            last_event_id = raw_last.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            last_event_id = "\ufffd"  # garbage: live events only
        try:
            with self.hub.subscribe(node_id, last_event_id) as sub:
                await self._stream(sub, receive, send)
        except SubscriberLimitError as exc:
            status = 429 if isinstance(exc, NodeSubscriberLimitError) else 503
            held = self._busy_log.allow()
            if held is not None:
                log.warning(
                    "events: refusing node %r (%d): %s (%d more refusals since the last line)",
                    node_id,
                    status,
                    exc,
                    held,
                )
            await _respond(send, status, f"{exc}\n".encode(), [(b"retry-after", b"5")])

    async def _stream(self, sub: Subscription, receive: Receive, send: Send) -> None:
        log.info("events: node %r subscribed (replaying %d events)", sub.node_id, len(sub.backlog))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
            # The head, retry and cursor go out even if the hub drops this subscriber in the
            # meantime: without the cursor, an enclave that subscribed without Last-Event-ID
            # and was dropped at once could not resume. Bounded, since a peer that cannot take
            # a few hundred bytes within keepalive_s is dead.
            with trio.move_on_after(self.keepalive_s) as opening:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream"),
                            (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no"),
                        ],
                    }
                )
                replay = b"".join(e.wire for e in sub.backlog)
                await send_chunk(send, self.retry_block + format_id(sub.cursor) + replay)
            if opening.cancelled_caught:
                sub.dropped = sub.dropped or f"the stream's opening took over {self.keepalive_s} s"
            with sub.cancel_scope:
                while not sub.dropped:
                    with trio.move_on_after(self.keepalive_s) as idle:
                        try:
                            event = await sub.receive()
                        except trio.EndOfChannel:
                            break
                    if idle.cancelled_caught:
                        await send_chunk(send, KEEPALIVE_COMMENT)
                    else:
                        await send_chunk(send, event.wire)
            # Only a drop ends the loop (a disconnect or a shutdown cancels it instead). The
            # writer may have been stuck, so end abruptly: hypercorn closes the connection and
            # the enclave reconnects with Last-Event-ID to get the rest replayed.
            log.info("events: node %r disconnected: %s", sub.node_id, sub.dropped)
            nursery.cancel_scope.cancel()


async def _respond(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await respond(send, status, _TEXT, body, extra, no_store=True)


# -- the server --------------------------------------------------------------------------------


async def serve_gateway_events(
    listen_url: str,
    hub: EventHub,
    *,
    credentials: Mapping[str, str],
    keepalive_s: float = DEFAULT_EVENTS_KEEPALIVE_S,
    retry_ms: int = DEFAULT_EVENTS_RETRY_MS,
    certfile: str | None = None,
    keyfile: str | None = None,
    graceful_timeout_s: float = DEFAULT_EVENTS_GRACEFUL_TIMEOUT_S,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /v1/enclaves/{node_id}/events`` from ``hub`` until cancelled.

    Args:
        listen_url: ``tcp://host:port`` (port 0 picks one) or ``unix:///path``.
        credentials: node id -> bearer token (see :class:`GatewayEventsApp`); the parent's
            relay of each node sends that node's token (``[relay] token`` in ``parent.toml``).
        keepalive_s: a comment after this many seconds of silence (keep it well under the
            enclave's ``sse_keepalive_timeout_s``, 45 s by default).
        retry_ms: the ``retry:`` sent first on every stream (the enclave's back-off base).
        certfile, keyfile: PEM certificate chain and key to serve HTTPS (both or neither); the
            parent's relay only speaks HTTPS to the gateway in production.

    Readiness: ``task_status.started(binds)`` once listening; ``binds`` are hypercorn's
    ``http(s)://host:port`` strings with the real ports.

    Cancellation: stops the server; open streams get ``graceful_timeout_s``, then are cut (the
    enclaves reconnect with ``Last-Event-ID``).

    Error handling: a bad ``listen_url`` raises :class:`~trio_sign.transport.TransportError` or
    ``ValueError``, only one of ``certfile``/``keyfile`` or a bad credential ``ValueError``, a
    bind failure or unreadable certificate ``OSError``/``ssl.SSLError``, all before ``started``.
    """
    # Refuse bad settings here, before any nursery would wrap the error in a group.
    if (certfile is None) != (keyfile is None):
        raise ValueError("give both certfile and keyfile to serve HTTPS, or neither")
    hypercorn_bind(listen_url)
    app = GatewayEventsApp(hub, credentials=credentials, keepalive_s=keepalive_s, retry_ms=retry_ms)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            functools.partial(
                serve_asgi,
                app,
                listen_url,
                logger=log,
                certfile=certfile,
                keyfile=keyfile,
                graceful_timeout_s=graceful_timeout_s,
            )
        )
        log.info("gateway events listening on %s", ", ".join(binds))
        task_status.started(binds)
