"""The gateway's SSE endpoint: the sans-io encoder (against the enclave's own parser), the
EventHub's replay and back-pressure rules, and the server over real loopback HTTP (hypercorn,
Trio worker) with the enclave's real client, up to a real dev enclave."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_sign.gateway import (
    KEEPALIVE_COMMENT,
    EventHub,
    GatewayEventsApp,
    NodeSubscriberLimitError,
    SendProbe,
    SubscriberLimitError,
    accepts_event_stream,
    format_comment,
    format_event,
    format_id,
    format_retry,
    serve_gateway_events,
    valid_node_id,
)
from trio_sign.sse import (
    BodyData,
    EventStreamParser,
    MessageEvent,
    ResponseHead,
    ResponseParser,
    RetryChanged,
    SseClientStatus,
    SseEventHandler,
    events_url,
    run_sse_client,
)

from .relay_helpers import running_relay

NODE = "node-7"
TOKEN = "node-7-events-token-0123456789abcdef"
#: What the gateway's config would hold: a token per node id.
CREDENTIALS = {
    NODE: TOKEN,
    "a": "node-a-events-token-0123456789",
    "b": "node-b-events-token-012345",
}
AUTH = (b"authorization", f"Bearer {TOKEN}".encode())


# -- the encoder -------------------------------------------------------------------------------


def test_format_event_bytes() -> None:
    wire = format_event("probe", {"nonce": "n-1"}, id="abc-1", retry_ms=250)
    assert wire == b'id: abc-1\nevent: probe\nretry: 250\ndata: {"nonce":"n-1"}\n\n'
    assert format_event("drain", {}) == b"event: drain\ndata: {}\n\n"
    assert format_retry(1000) == b"retry: 1000\n\n"
    assert format_id("abc-0") == b"id: abc-0\n\n"
    assert EventStreamParser().receive_data(format_id("abc-0")) == []
    assert format_comment() == b":\n\n"
    assert format_comment("keepalive") == KEEPALIVE_COMMENT == b": keepalive\n\n"


@given(
    event=st.text(min_size=1).filter(lambda s: not set(s) & set("\r\n\x00")),
    event_id=st.text(min_size=1).filter(lambda s: not set(s) & set("\r\n\x00")),
    data=st.dictionaries(st.text(), st.text() | st.integers() | st.none()),
)
def test_format_event_round_trips_through_the_enclave_parser(
    event: str, event_id: str, data: dict[str, Any]
) -> None:
    parsed = EventStreamParser().receive_data(format_event(event, data, id=event_id))
    assert len(parsed) == 1
    message = parsed[0]
    assert isinstance(message, MessageEvent)
    assert (message.type, message.last_event_id) == (event, event_id)
    assert json.loads(message.data) == data


def test_comments_and_retry_dispatch_nothing_but_retry() -> None:
    parser = EventStreamParser()
    assert parser.receive_data(KEEPALIVE_COMMENT + format_comment()) == []
    assert parser.receive_data(format_retry(1500)) == [RetryChanged(1500)]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"event": "a\nb", "data": {}}, ValueError),
        ({"event": "a\rb", "data": {}}, ValueError),
        ({"event": "a\x00", "data": {}}, ValueError),
        ({"event": "", "data": {}}, ValueError),
        ({"event": "probe", "data": {}, "id": "1\n2"}, ValueError),
        ({"event": "probe", "data": {}, "id": "\x00"}, ValueError),
        ({"event": "probe", "data": {}, "id": ""}, ValueError),
        ({"event": "probe", "data": {}, "retry_ms": -1}, ValueError),
        ({"event": "probe", "data": {"x": float("nan")}}, ValueError),
        ({"event": "probe", "data": ["not", "an", "object"]}, TypeError),
    ],
)
def test_format_event_refuses(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        format_event(**kwargs)


def test_format_comment_and_id_refuse_line_breaks() -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        format_comment("a\nevent: drain")
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        format_id("1\rdata: x")
    with pytest.raises(ValueError, match="must not be empty"):
        format_id("")


# -- the hub (no I/O) --------------------------------------------------------------------------


def _ids(events: Any) -> list[str]:
    return [e.id for e in events]


async def _drain_queue(sub: Any) -> list[Any]:
    out = []
    while True:
        try:
            out.append(sub._receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


async def test_hub_publishes_in_order_with_increasing_ids() -> None:
    hub = EventHub()
    with hub.subscribe(NODE) as sub:
        assert hub.subscribers(NODE) == 1
        nonce = hub.probe(NODE)
        hub.freeze(NODE, "acct-0")
        hub.unfreeze(NODE, "acct-0")
        hub.abort(NODE, "s-1")
        hub.drain(NODE)
        hub.undrain(NODE)
        got = [await sub.receive() for _ in range(6)]
    assert hub.subscribers(NODE) == 0
    assert [e.type for e in got] == ["probe", "freeze", "unfreeze", "abort", "drain", "undrain"]
    assert [e.seq for e in got] == [1, 2, 3, 4, 5, 6]
    assert _ids(got) == [f"{hub.epoch}-{n}" for n in range(1, 7)]
    assert hub.last_event_id(NODE) == got[-1].id
    parsed = EventStreamParser().receive_data(b"".join(e.wire for e in got))
    assert [(e.type, json.loads(e.data)) for e in parsed if isinstance(e, MessageEvent)] == [
        ("probe", {"nonce": nonce}),
        ("freeze", {"account_id": "acct-0"}),
        ("unfreeze", {"account_id": "acct-0"}),
        ("abort", {"session_id": "s-1"}),
        ("drain", {}),
        ("undrain", {}),
    ]
    assert len(nonce) >= 16
    assert hub.probe(NODE) != nonce
    assert hub.stats.published == 7


async def test_hub_probe_with_the_probers_nonce_and_the_send_probe_hook() -> None:
    hub = EventHub()
    with hub.subscribe(NODE) as sub:
        assert hub.probe(NODE, "n-1") == "n-1"
        await hub.send_probe(NODE, "n-2")
        got = [await sub.receive(), await sub.receive()]
    assert [json.loads(e.wire.split(b"data: ")[1]) for e in got] == [
        {"nonce": "n-1"},
        {"nonce": "n-2"},
    ]
    await hub.send_probe(NODE, "n-3")  # no subscriber: kept for replay, not an error
    with hub.subscribe(NODE, got[-1].id) as sub:
        assert [e.type for e in sub.backlog] == ["probe"]
    for bad in ("", "x" * 1025):
        with pytest.raises(ValueError, match="nonce"):
            hub.probe(NODE, bad)


async def test_hub_streams_are_per_node() -> None:
    hub = EventHub()
    with hub.subscribe("a") as a, hub.subscribe("b") as b:
        hub.drain("a")
        hub.freeze("b", "x")
        assert (await a.receive()).type == "drain"
        assert (await b.receive()).type == "freeze"
        assert await _drain_queue(a) == []
        assert await _drain_queue(b) == []


async def test_hub_replays_exactly_after_last_event_id() -> None:
    hub = EventHub(replay_events=8)
    ids = [hub.freeze(NODE, f"acct-{n}") for n in range(5)]
    with hub.subscribe(NODE, ids[1]) as sub:
        assert _ids(sub.backlog) == ids[2:]
        later = hub.drain(NODE)
        assert (await sub.receive()).id == later
    with hub.subscribe(NODE, later) as sub:
        assert sub.backlog == ()
    with hub.subscribe(NODE) as sub:  # no Last-Event-ID: live events only
        assert sub.backlog == ()
    assert hub.stats.replayed == 3


async def test_hub_too_old_last_event_id_replays_all_kept_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = EventHub(replay_events=3)
    ids = [hub.freeze(NODE, f"acct-{n}") for n in range(6)]
    with caplog.at_level(logging.WARNING, "trio_sign.gateway.events"):
        with hub.subscribe(NODE, ids[0]) as sub:
            assert _ids(sub.backlog) == ids[3:]
        assert "may have been missed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "trio_sign.gateway.events"):
        with hub.subscribe(NODE, ids[2]) as sub:  # the one just before the oldest: no gap
            assert _ids(sub.backlog) == ids[3:]
        assert "missed" not in caplog.text
    assert hub.stats.gaps == 1


@pytest.mark.parametrize(
    "last_event_id", ["garbage", "1", "-1", "zz-1", "\ufffd", "{epoch}-00", "{epoch}-99"]
)
async def test_hub_unknown_last_event_id_gets_new_events_only(
    last_event_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    hub = EventHub()
    hub.drain(NODE)
    with (
        caplog.at_level(logging.WARNING, "trio_sign.gateway.events"),
        hub.subscribe(NODE, last_event_id.format(epoch=hub.epoch)) as sub,
    ):
        assert sub.backlog == ()
        new = hub.probe(NODE)
        event = await sub.receive()
    assert json.loads(event.wire.split(b"data: ")[1]) == {"nonce": new}
    assert "unknown Last-Event-ID" in caplog.text


async def test_hub_id_of_another_gateway_replays_everything_kept() -> None:
    old = EventHub()
    old_id = old.drain(NODE)
    new = EventHub()
    assert new.epoch != old.epoch
    ids = [new.freeze(NODE, "a"), new.unfreeze(NODE, "a")]
    with new.subscribe(NODE, old_id) as sub:
        assert _ids(sub.backlog) == ids


async def test_hub_disconnects_a_slow_subscriber_who_then_resumes_by_replay() -> None:
    hub = EventHub(subscriber_queue=2, replay_events=16)
    with hub.subscribe(NODE) as slow, hub.subscribe(NODE) as fast:
        assert slow.cursor == f"{hub.epoch}-0"
        ids = []
        for account in "ab":  # fast keeps up; slow's queue fills
            ids.append(hub.freeze(NODE, account))
            assert (await fast.receive()).id == ids[-1]
        assert slow.dropped == ""
        ids.append(hub.freeze(NODE, "c"))  # never waited on: dropped at once
        assert slow.dropped == "fell behind"
        assert slow.cancel_scope.cancel_called
        assert not fast.dropped
        assert hub.subscribers(NODE) == 1
        assert (await fast.receive()).id == ids[-1]
        assert hub.stats.dropped_slow == 1
        seen = [(await slow.receive()).id, (await slow.receive()).id]
        assert seen == ids[:2]
        with pytest.raises(trio.EndOfChannel):
            await slow.receive()
        with hub.subscribe(NODE, seen[-1]) as again:
            assert again.cursor == seen[-1]
            assert _ids(again.backlog) == ids[2:]
        with hub.subscribe(NODE, slow.cursor) as again:  # dropped before its first event
            assert _ids(again.backlog) == ids
    assert hub.subscribers(NODE) == 0


async def test_hub_cursor_is_the_position_before_what_is_sent() -> None:
    hub = EventHub(replay_events=2)
    with hub.subscribe(NODE) as sub:
        assert sub.cursor == f"{hub.epoch}-0"
        assert sub.backlog == ()
    ids = [hub.drain(NODE) for _ in range(3)]
    with hub.subscribe(NODE) as sub:  # live only: after the latest
        assert sub.cursor == ids[-1]
        assert sub.backlog == ()
    with hub.subscribe(NODE, "garbage") as sub:
        assert sub.cursor == ids[-1]
        assert sub.backlog == ()
    with hub.subscribe(NODE, f"{hub.epoch}-0") as sub:  # too old: from the oldest kept
        assert sub.cursor == ids[0]
        assert _ids(sub.backlog) == ids[1:]


async def test_hub_a_subscription_beyond_the_node_limit_is_refused_not_displacing() -> None:
    """Attack (c): a holder of the node's token opens more subscriptions than the node may have;
    the extra ones are refused and the subscribers already there keep their slots and events
    (the old hub evicted the oldest, i.e. the enclave)."""
    hub = EventHub(max_subscribers_per_node=2)
    with hub.subscribe(NODE) as first, hub.subscribe(NODE) as second:
        for _ in range(5):
            with (
                pytest.raises(NodeSubscriberLimitError, match="max_subscribers_per_node"),
                hub.subscribe(NODE),
            ):
                pass
        assert not first.dropped
        assert not second.dropped
        assert hub.subscribers(NODE) == 2
        event_id = hub.drain(NODE)
        assert (await first.receive()).id == event_id
        assert (await second.receive()).id == event_id
    assert hub.subscribers(NODE) == 0
    assert hub.stats.refused_node == 5
    assert hub.stats.refused == 0


async def test_hub_one_subscriber_per_node_keeps_its_slot_until_it_leaves() -> None:
    hub = EventHub(max_subscribers_per_node=1)
    with hub.subscribe(NODE) as first:
        with pytest.raises(NodeSubscriberLimitError), hub.subscribe(NODE):
            pass
        assert not first.dropped
    with hub.subscribe(NODE) as second:  # the slot is free again
        event_id = hub.drain(NODE)
        assert (await second.receive()).id == event_id
    assert hub.subscribers(NODE) == 0


async def test_hub_total_subscriber_limit_and_forgetting_unpublished_nodes() -> None:
    hub = EventHub(max_subscribers=2)
    with (
        hub.subscribe("a"),
        hub.subscribe("b"),
        pytest.raises(SubscriberLimitError, match="max_subscribers"),
        hub.subscribe("c"),
    ):
        pass
    assert hub.stats.refused == 1
    assert hub._nodes == {}  # only subscribed to: forgotten
    hub.drain("a")
    with hub.subscribe("a"):
        pass
    assert list(hub._nodes) == ["a"]  # published to: the replay buffer is kept


@pytest.mark.parametrize("node_id", ["", ".", "..", "a/b", "a b", "ä", "x" * 129, "a\n"])
def test_hub_refuses_bad_node_ids(node_id: str) -> None:
    hub = EventHub()
    assert not valid_node_id(node_id)
    with pytest.raises(ValueError, match="node id"):
        hub.drain(node_id)
    with pytest.raises(ValueError, match="node id"), hub.subscribe(node_id):
        pass


def test_hub_refuses_empty_ids_and_bad_limits() -> None:
    hub = EventHub()
    assert valid_node_id("Node_1.eu-west-1")
    assert valid_node_id("x" * 128)
    with pytest.raises(ValueError, match="account_id"):
        hub.freeze(NODE, "")
    with pytest.raises(ValueError, match="session_id"):
        hub.abort(NODE, "")
    with pytest.raises(ValueError, match="at least 1"):
        EventHub(subscriber_queue=0)


@pytest.mark.parametrize(
    ("accept", "ok"),
    [
        (None, True),
        ("text/event-stream", True),
        ("Text/Event-Stream; charset=utf-8", True),
        ("*/*", True),
        ("text/*", True),
        ("application/json, text/event-stream;q=0.5", True),
        ("application/json", False),
        ("text/event-stream;q=0", False),
        ("text/event-stream;q=0, */*", False),
        ("text/*;q=0, */*", False),
        ("text/event-stream;q=bogus", False),
        ("", False),
    ],
)
def test_accepts_event_stream(accept: str | None, ok: bool) -> None:
    assert accepts_event_stream(accept) is ok


# -- the ASGI app alone, in virtual time ---------------------------------------------------------


class FakeAsgi:
    """A fake server for :class:`GatewayEventsApp`: records what is sent, and when; ``send`` can
    be made to block like a stuck peer."""

    def __init__(self, *headers: tuple[bytes, bytes]) -> None:
        self.scope: dict[str, Any] = {
            "type": "http",
            "method": "GET",
            "path": f"/v1/enclaves/{NODE}/events",
            "headers": [(b"accept", b"text/event-stream"), AUTH, *headers],
        }
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.disconnected = trio.Event()
        self.stuck = False
        self.before_first_send: Callable[[], None] | None = None
        self._requested = False

    async def receive(self) -> dict[str, Any]:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        if self.before_first_send is not None:
            self.before_first_send()
            self.before_first_send = None
        if self.stuck:
            await trio.sleep_forever()
        self.sent.append((trio.current_time(), dict(message)))

    def bodies(self) -> list[tuple[float, bytes]]:
        return [(t, m["body"]) for t, m in self.sent if m["type"] == "http.response.body"]

    async def run(self, app: GatewayEventsApp) -> None:
        await app(self.scope, self.receive, self.send)


async def test_app_keepalive_comments_at_exact_virtual_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub()
    app = GatewayEventsApp(hub, credentials=CREDENTIALS, keepalive_s=15, retry_ms=500)
    fake = FakeAsgi()
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(fake.run, app)
        await trio.sleep(46)
        event_id = hub.drain(NODE)
        await trio.sleep(20)
        assert hub.subscribers(NODE) == 1
        fake.disconnected.set()
    assert hub.subscribers(NODE) == 0
    head = fake.sent[0][1]
    assert head["status"] == 200
    assert (b"content-type", b"text/event-stream") in head["headers"]
    assert (b"cache-control", b"no-cache") in head["headers"]
    drain = f"id: {event_id}\nevent: drain\ndata: {{}}\n\n".encode()
    assert [(t - start, body) for t, body in fake.bodies()] == [
        (0, f"retry: 500\n\nid: {hub.epoch}-0\n\n".encode()),
        (15, KEEPALIVE_COMMENT),
        (30, KEEPALIVE_COMMENT),
        (45, KEEPALIVE_COMMENT),
        (46, drain),  # an event restarts the keepalive timer
        (61, KEEPALIVE_COMMENT),
    ]


async def test_app_does_not_wait_on_a_stuck_peer(autojump_clock: trio.testing.MockClock) -> None:
    hub = EventHub(subscriber_queue=2)
    app = GatewayEventsApp(hub, credentials=CREDENTIALS, keepalive_s=15)
    fake = FakeAsgi()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.run, app)
        await trio.testing.wait_all_tasks_blocked()
        fake.stuck = True
        hub.drain(NODE)  # the writer blocks sending this one
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        for _ in range(3):
            hub.drain(NODE)
        with trio.fail_after(1):
            while hub.subscribers(NODE):
                await trio.lowlevel.checkpoint()
    assert trio.current_time() == start  # the app returned at once, without a final body
    assert [m["type"] for _, m in fake.sent] == ["http.response.start", "http.response.body"]
    assert hub.stats.dropped_slow == 1


async def test_app_gives_up_on_a_peer_stuck_from_the_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub()
    fake = FakeAsgi()
    fake.stuck = True
    start = trio.current_time()
    await fake.run(GatewayEventsApp(hub, credentials=CREDENTIALS, keepalive_s=15))
    assert trio.current_time() - start == 15
    assert hub.subscribers(NODE) == 0
    assert fake.sent == []


async def test_app_dropped_before_its_first_write_still_sends_the_cursor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Events burst in between the subscription and the stream's first write: the subscriber
    is dropped, but the enclave still learns where it stands and resumes without a gap."""
    hub = EventHub(subscriber_queue=2)
    ids: list[str] = []
    fake = FakeAsgi()
    fake.before_first_send = lambda: ids.extend(hub.freeze(NODE, f"a{n}") for n in range(4))
    await fake.run(GatewayEventsApp(hub, credentials=CREDENTIALS))
    assert hub.stats.dropped_slow == 1
    assert hub.subscribers(NODE) == 0
    assert [m["type"] for _, m in fake.sent] == ["http.response.start", "http.response.body"]
    parser = EventStreamParser()
    assert parser.receive_data(fake.bodies()[0][1]) == [RetryChanged(1000)]
    again = FakeAsgi((b"last-event-id", parser.last_event_id.encode()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(again.run, GatewayEventsApp(hub, credentials=CREDENTIALS))
        await trio.testing.wait_all_tasks_blocked()
        again.disconnected.set()
    replayed = EventStreamParser().receive_data(again.bodies()[0][1])
    assert [e.last_event_id for e in replayed if isinstance(e, MessageEvent)] == ids


async def test_app_cancelled_mid_stream_unsubscribes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub()
    fake = FakeAsgi((b"last-event-id", b"\xff\xfe"))  # not UTF-8: new events only
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.run, GatewayEventsApp(hub, credentials=CREDENTIALS))
        await trio.testing.wait_all_tasks_blocked()
        assert hub.subscribers(NODE) == 1
        nursery.cancel_scope.cancel()
    assert hub.subscribers(NODE) == 0
    assert hub._nodes == {}


def test_app_refuses_a_bad_keepalive() -> None:
    with pytest.raises(ValueError, match="keepalive_s"):
        GatewayEventsApp(EventHub(), credentials=CREDENTIALS, keepalive_s=0)


# -- over loopback HTTP ------------------------------------------------------------------------


class _RecordingSet(set[str]):
    def __init__(self, log: list[tuple[str, str]]) -> None:
        super().__init__()
        self._log = log

    def add(self, item: str) -> None:
        self._log.append(("freeze", item))
        super().add(item)

    def discard(self, item: object) -> None:
        self._log.append(("unfreeze", str(item)))
        super().discard(item)


class FakePool:
    def __init__(self, log: list[tuple[str, str]]) -> None:
        self._log = log

    def abort(self, session_id: str) -> None:
        self._log.append(("abort", session_id))


class FakeEnclave:
    """Satisfies ``trio_sign.sse.SseControlled`` and records what was applied, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.frozen: set[str] = _RecordingSet(self.log)
        self._pool = FakePool(self.log)
        self._probe = ""

    @property
    def last_sse_probe(self) -> str:
        return self._probe

    @last_sse_probe.setter
    def last_sse_probe(self, nonce: str) -> None:
        self.log.append(("probe", nonce))
        self._probe = nonce

    @property
    def pool(self) -> FakePool:
        return self._pool

    def start_draining(self, *, reversible: bool = False) -> None:
        self.log.append(("drain" if reversible else "stop", ""))

    def stop_draining(self) -> bool:
        self.log.append(("undrain", ""))
        return True


async def until(predicate: Callable[[], bool]) -> None:
    # Real sockets: poll, bounded.
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.005)


@asynccontextmanager
async def running_gateway(hub: EventHub, **kwargs: Any) -> AsyncIterator[int]:
    kwargs.setdefault("retry_ms", 10)
    kwargs.setdefault("credentials", CREDENTIALS)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(serve_gateway_events, "tcp://127.0.0.1:0", hub, **kwargs)
        )
        yield int(binds[0].rsplit(":", 1)[1])
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def enclave_client(
    port: int,
    target: FakeEnclave,
    *,
    last_event_id: str = "",
    node_id: str = NODE,
    token: str | None = TOKEN,
) -> AsyncIterator[SseClientStatus]:
    """The enclave's real SSE client and handler, through the parent's real relay."""
    async with running_relay(port, token) as relay_port, trio.open_nursery() as nursery:
        status = await nursery.start(
            functools.partial(
                run_sse_client,
                events_url(f"http://127.0.0.1:{port}", node_id),
                connect=functools.partial(trio.open_tcp_stream, "127.0.0.1", relay_port),
                on_event=SseEventHandler(target),
                last_event_id=last_event_id,
                keepalive_timeout_s=5,
                rng=random.Random(7),
            )
        )
        yield status
        nursery.cancel_scope.cancel()


async def test_the_enclave_client_applies_every_event_in_order() -> None:
    hub = EventHub()
    enclave = FakeEnclave()
    async with running_gateway(hub) as port, enclave_client(port, enclave) as status:
        await until(lambda: hub.subscribers(NODE) == 1)
        nonce = hub.probe(NODE)
        hub.freeze(NODE, "acct-0")
        hub.unfreeze(NODE, "acct-0")
        hub.abort(NODE, "sess-9")
        hub.publish(NODE, "mystery", {"x": 1})  # ignored by the enclave
        hub.freeze(NODE, "acct-1")
        hub.drain(NODE)
        last = hub.undrain(NODE)
        await until(lambda: len(enclave.log) == 7)
        assert enclave.log == [
            ("probe", nonce),
            ("freeze", "acct-0"),
            ("unfreeze", "acct-0"),
            ("abort", "sess-9"),
            ("freeze", "acct-1"),
            ("drain", ""),
            ("undrain", ""),
        ]
        assert enclave.frozen == {"acct-1"}
        await until(lambda: status.last_event_id == last)
        assert status.connects == 1
        assert status.reconnects == 0


async def test_reconnect_with_last_event_id_replays_without_duplicates_or_gaps() -> None:
    hub = EventHub()
    enclave = FakeEnclave()
    async with running_gateway(hub) as port:
        async with enclave_client(port, enclave) as status:
            await until(lambda: hub.subscribers(NODE) == 1)
            hub.freeze(NODE, "a")
            hub.freeze(NODE, "b")
            await until(lambda: len(enclave.log) == 2)
            await until(lambda: status.last_event_id == hub.last_event_id(NODE))
            resume_from = status.last_event_id
        await until(lambda: hub.subscribers(NODE) == 0)
        hub.freeze(NODE, "c")  # published while the enclave is away
        hub.freeze(NODE, "d")
        async with enclave_client(port, enclave, last_event_id=resume_from):
            await until(lambda: len(enclave.log) == 4)
            hub.freeze(NODE, "e")  # live again
            await until(lambda: len(enclave.log) == 5)
    assert enclave.log == [("freeze", x) for x in "abcde"]


async def test_a_too_old_last_event_id_replays_from_the_oldest_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = EventHub(replay_events=3)
    ids = [hub.freeze(NODE, f"acct-{n}") for n in range(6)]
    enclave = FakeEnclave()
    with caplog.at_level(logging.WARNING, "trio_sign.gateway.events"):
        async with (
            running_gateway(hub) as port,
            enclave_client(port, enclave, last_event_id=ids[0]) as status,
        ):
            await until(lambda: len(enclave.log) == 3)
            await until(lambda: status.last_event_id == ids[-1])
    assert enclave.log == [("freeze", f"acct-{n}") for n in (3, 4, 5)]
    assert "may have been missed" in caplog.text


async def _open_raw(port: int, request: bytes) -> tuple[trio.SocketStream, ResponseParser]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    return stream, ResponseParser()


def _get(path: str, *headers: str, method: str = "GET", token: str | None = TOKEN) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_stream_head_retry_cursor_and_keepalive_comments_over_http() -> None:
    """Exact keepalive timing is checked in virtual time above; here, on a real socket, only
    that comments flow at about the interval (loose bounds: loaded CI machines stall)."""
    hub = EventHub()
    interval = 0.05
    async with running_gateway(hub, keepalive_s=interval, retry_ms=1234) as port:
        stream, http = await _open_raw(
            port, _get(f"/v1/enclaves/{NODE}/events", "Accept: text/event-stream")
        )
        async with stream:
            head: ResponseHead | None = None
            body = b""
            with trio.move_on_after(interval * 6.5):
                while True:
                    for item in http.receive_data(await stream.receive_some()):
                        if isinstance(item, ResponseHead):
                            head = item
                        elif isinstance(item, BodyData):
                            body += item.data
    assert head is not None
    assert head.status == 200
    assert head.get("content-type") == "text/event-stream"
    assert head.get("cache-control") == "no-cache"
    assert body.startswith(f"retry: 1234\n\nid: {hub.epoch}-0\n\n".encode())
    assert 2 <= body.count(KEEPALIVE_COMMENT) <= 6
    parser = EventStreamParser()
    assert parser.receive_data(body) == [RetryChanged(1234)]
    assert parser.last_event_id == f"{hub.epoch}-0"


async def test_a_slow_subscriber_is_disconnected_and_recovers_by_replay() -> None:
    hub = EventHub(subscriber_queue=2)
    enclave = FakeEnclave()
    async with running_gateway(hub) as port, enclave_client(port, enclave) as status:
        await until(lambda: hub.subscribers(NODE) == 1)
        for n in range(8):  # a burst larger than the queue: the subscriber cannot keep up
            hub.freeze(NODE, f"acct-{n}")
        assert hub.stats.dropped_slow == 1
        await until(lambda: len(enclave.log) == 8)
        hub.drain(NODE)
        await until(lambda: len(enclave.log) == 9)
        assert status.reconnects >= 1
        assert status.connects >= 2
    assert enclave.log == [("freeze", f"acct-{n}") for n in range(8)] + [("drain", "")]


async def test_a_stuck_reader_is_not_waited_on() -> None:
    """A peer that never reads: once its queue overflows the handler gives up at once."""
    hub = EventHub(subscriber_queue=4)
    async with running_gateway(hub) as port:
        stream, _http = await _open_raw(port, _get(f"/v1/enclaves/{NODE}/events"))
        async with stream:
            await until(lambda: hub.subscribers(NODE) == 1)
            with trio.fail_after(5):
                while hub.stats.dropped_slow == 0:
                    hub.publish(NODE, "filler", {"x": "y" * 4000})
                    await trio.lowlevel.checkpoint()
            assert hub.subscribers(NODE) == 0


async def test_a_closed_connection_unsubscribes() -> None:
    hub = EventHub()
    async with running_gateway(hub) as port:
        stream, _http = await _open_raw(port, _get(f"/v1/enclaves/{NODE}/events"))
        await until(lambda: hub.subscribers(NODE) == 1)
        await stream.aclose()
        await until(lambda: hub.subscribers(NODE) == 0)


async def test_two_subscribers_of_one_node_both_get_events() -> None:
    hub = EventHub()
    first, second = FakeEnclave(), FakeEnclave()
    async with (
        running_gateway(hub) as port,
        enclave_client(port, first),
        enclave_client(port, second),
    ):
        await until(lambda: hub.subscribers(NODE) == 2)
        hub.freeze(NODE, "z")
        await until(lambda: first.log == second.log == [("freeze", "z")])


async def _request(port: int, request: bytes) -> tuple[ResponseHead, bytes]:
    head_only = request.startswith(b"HEAD ")
    stream, http = await _open_raw(port, request)
    async with stream:
        head: ResponseHead | None = None
        body = b""
        with trio.fail_after(5):
            while True:
                data = await stream.receive_some()
                for item in http.receive_data(data) if data else http.receive_eof():
                    if isinstance(item, ResponseHead):
                        head = item
                        if head_only:
                            return head, b""
                    elif isinstance(item, BodyData):
                        body += item.data
                    else:
                        assert head is not None
                        return head, body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (_get("/"), 404),
        (_get("/v1/enclaves/node-7"), 404),
        (_get("/v1/enclaves/node-7/events/"), 404),
        (_get("/v1/enclaves/node-7/other"), 404),
        (_get("/v1/enclaves//events"), 400),
        (_get("/v1/enclaves/bad!id/events"), 400),
        (_get("/v1/enclaves/a%20b/events"), 400),
        (_get("/v1/enclaves/" + "x" * 129 + "/events"), 400),
        (_get("/v1/enclaves/node-7/events", method="POST"), 405),
        (_get("/v1/enclaves/node-7/events", method="HEAD"), 405),
        (_get("/v1/enclaves/node-7/events", "Accept: application/json"), 406),
        (_get("/v1/enclaves/node-7/events", "Accept: text/event-stream;q=0"), 406),
    ],
)
async def test_refusals(request_bytes: bytes, status: int) -> None:
    hub = EventHub()
    async with running_gateway(hub) as port:
        head, _body = await _request(port, request_bytes)
    assert head.status == status
    if status == 405:
        assert head.get("allow") == "GET"
    assert hub.subscribers(NODE) == 0
    assert hub._nodes == {}


async def test_over_the_subscriber_limit_is_503() -> None:
    hub = EventHub(max_subscribers=1)
    async with running_gateway(hub) as port:
        stream, _http = await _open_raw(port, _get("/v1/enclaves/a/events", token=CREDENTIALS["a"]))
        async with stream:
            await until(lambda: hub.subscribers("a") == 1)
            head, _body = await _request(
                port, _get("/v1/enclaves/b/events", token=CREDENTIALS["b"])
            )
    assert head.status == 503
    assert head.get("retry-after") == "5"


async def test_serve_on_a_unix_socket(tmp_path: Path) -> None:
    hub = EventHub()
    path = tmp_path / "events.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(serve_gateway_events, f"unix://{path}", hub, credentials=CREDENTIALS)
        )
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(_get(f"/v1/enclaves/{NODE}/events"))
            await until(lambda: hub.subscribers(NODE) == 1)
        nursery.cancel_scope.cancel()


async def test_serve_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match=r"tcp:// or unix://"):
        await serve_gateway_events("vsock://3:5000", EventHub(), credentials=CREDENTIALS)


async def test_serve_refuses_half_a_tls_config() -> None:
    with pytest.raises(ValueError, match="certfile and keyfile"):
        await serve_gateway_events(
            "tcp://127.0.0.1:0", EventHub(), credentials=CREDENTIALS, certfile="cert.pem"
        )


GATEWAY_HOST = "gateway.test"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName(GATEWAY_HOST)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "gateway.pem", tmp_path / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    hub = EventHub()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(
                serve_gateway_events,
                "tcp://127.0.0.1:0",
                hub,
                credentials=CREDENTIALS,
                certfile=str(cert),
                keyfile=str(key),
            )
        )
        assert binds[0].startswith("https://")
        port = int(binds[0].rsplit(":", 1)[1])
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=context, https_compatible=True
        )
        async with stream:
            await stream.send_all(_get(f"/v1/enclaves/{NODE}/events"))
            await until(lambda: hub.subscribers(NODE) == 1)
            nonce = hub.probe(NODE)
            http, body = ResponseParser(), b""
            with trio.fail_after(5):
                while nonce.encode() not in body:
                    for item in http.receive_data(await stream.receive_some()):
                        if isinstance(item, ResponseHead):
                            assert item.status == 200
                        elif isinstance(item, BodyData):
                            body += item.data
        nursery.cancel_scope.cancel()


async def test_through_the_parent_relay_over_https(tmp_path: Path) -> None:
    """Enclave client -> the parent's real relay -> HTTPS gateway: events arrive, and a dropped
    stream resumes through the relay with ``Last-Event-ID`` (which the relay forwards)."""
    from trio_sign.parent import serve_sse_relay

    cert, key = _self_signed(tmp_path)
    hub = EventHub(subscriber_queue=2)
    enclave = FakeEnclave()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(
                serve_gateway_events,
                "tcp://127.0.0.1:0",
                hub,
                credentials=CREDENTIALS,
                retry_ms=10,
                certfile=str(cert),
                keyfile=str(key),
            )
        )
        port = int(binds[0].rsplit(":", 1)[1])

        async def connect_upstream(host: str, upstream_port: int) -> trio.abc.Stream:
            assert (host, upstream_port) == (GATEWAY_HOST, port)
            return await trio.open_tcp_stream("127.0.0.1", port)

        relay_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        relay_port = relay_listeners[0].socket.getsockname()[1]
        await nursery.start(
            functools.partial(
                serve_sse_relay,
                relay_listeners,
                [f"https://{GATEWAY_HOST}:{port}/v1/enclaves/"],
                ssl_context_for_upstream=ssl.create_default_context(cafile=str(cert)),
                connect_upstream=connect_upstream,
                upstream_token=TOKEN,
            )
        )
        status = await nursery.start(
            functools.partial(
                run_sse_client,
                events_url(f"https://{GATEWAY_HOST}:{port}", NODE),
                connect=functools.partial(trio.open_tcp_stream, "127.0.0.1", relay_port),
                on_event=SseEventHandler(enclave),
                rng=random.Random(3),
            )
        )
        await until(lambda: hub.subscribers(NODE) == 1)
        nonce = hub.probe(NODE)
        await until(lambda: enclave.last_sse_probe == nonce)
        for n in range(5):  # a burst over the queue: the gateway drops the stream
            hub.freeze(NODE, f"acct-{n}")
        await until(lambda: len(enclave.log) == 6)
        assert status.reconnects >= 1
        assert hub.stats.dropped_slow == 1
        assert enclave.log == [("probe", nonce)] + [("freeze", f"acct-{n}") for n in range(5)]
        nursery.cancel_scope.cancel()


# -- end to end with a real dev enclave --------------------------------------------------------


async def test_a_dev_enclave_follows_the_gateway(tmp_path: Path) -> None:
    from proto_min import sign_service_pb2 as pb
    from trio_sign.enclave import EnclaveConfig, serve_dev_enclave
    from trio_sign.rpc import RpcError, StatusCode, open_grpc_channel
    from trio_sign.shares import write_plaintext
    from trio_sign.transport import connect

    from .enclave_helpers import make_accounts

    store, accounts = make_accounts(2)
    store.close()
    shares = tmp_path / "service_key_shares.json"
    with shares.open("wb") as f:
        write_plaintext(f, [a.service for a in accounts.values()])
    service = "/trio_sign.v1.SignService/"

    async def call(ch: Any, method: str, request: Any, response_type: Any) -> Any:
        raw = await ch.unary_unary(service + method, request.SerializeToString())
        return response_type.FromString(raw)

    hub = EventHub()
    async with running_gateway(hub) as port, running_relay(port, TOKEN) as relay_port:
        config = EnclaveConfig(
            grpc_listen="tcp://127.0.0.1:0",
            dev=True,
            dev_plaintext_shares=shares,
            gateway_url=f"http://127.0.0.1:{port}",
            node_id=NODE,
            sse_via=f"tcp://127.0.0.1:{relay_port}",
            drain_grace_s=1.0,  # the test leaves a session open
        )
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve_dev_enclave, config)
            async with open_grpc_channel(await connect(handle.addresses[0])) as ch:
                await until(lambda: hub.subscribers(NODE) == 1)
                nonce = hub.probe(NODE)
                await until(lambda: handle.service.last_sse_probe == nonce)
                status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
                assert status.last_sse_probe == nonce
                send_probe: SendProbe = hub.send_probe  # the prober's hook
                await send_probe(NODE, "prober-nonce-1")
                await until(lambda: handle.service.last_sse_probe == "prober-nonce-1")

                hub.freeze(NODE, "acct-0")
                await until(lambda: "acct-0" in handle.service.frozen)
                with pytest.raises(RpcError) as info:
                    await call(
                        ch,
                        "Commit",
                        pb.CommitRequest(account_id="acct-0", session_id="s"),
                        pb.CommitResponse,
                    )
                assert info.value.status == StatusCode.FAILED_PRECONDITION

                hub.unfreeze(NODE, "acct-0")
                await until(lambda: "acct-0" not in handle.service.frozen)
                await call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-0", session_id="s"),
                    pb.CommitResponse,
                )
            await handle.drain()
            nursery.cancel_scope.cancel()


async def test_publish_right_after_disconnect_does_not_raise() -> None:
    """A cut subscription stays listed until its stream task cleans up; publishing in that
    window must not raise, and the event is kept for replay."""
    from trio_sign.gateway import EventHub

    hub = EventHub()
    with hub.subscribe("node-1") as sub:
        assert hub.disconnect("node-1") == 1
        assert sub.dropped
        event_id = hub.probe("node-1")  # no ClosedResourceError
        assert hub.last_event_id("node-1") is not None
        assert event_id
    assert hub.disconnect("nobody") == 0


# -- hostile subscribers (DESIGN §16) ------------------------------------------------------------


def _response_without_date(head: ResponseHead) -> tuple[int, list[tuple[str, str]]]:
    return head.status, [(k, v) for k, v in head.headers if k != "date"]


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer wrong-token-0123456789abcdef",
        f"Bearer {TOKEN}x",
        f"Bearer {CREDENTIALS['a']}",  # another node's token
        f"Basic {TOKEN}",
        f"bearer  {TOKEN[:-1]}",
    ],
)
async def test_an_unauthenticated_subscriber_gets_401_and_takes_no_slot(auth: str | None) -> None:
    """Attack (a): without the node's token, nothing is subscribed (not even counted towards
    the hub's limits), and the answer does not say whether the node exists."""
    hub = EventHub(max_subscribers=1)
    async with running_gateway(hub) as port:
        extra = () if auth is None else (f"Authorization: {auth}",)
        head, body = await _request(port, _get(f"/v1/enclaves/{NODE}/events", *extra, token=None))
        unknown, unknown_body = await _request(
            port, _get("/v1/enclaves/nobody/events", *extra, token=None)
        )
        assert head.status == 401
        assert head.get("www-authenticate") == "Bearer"
        assert (_response_without_date(head), body) == (
            _response_without_date(unknown),
            unknown_body,
        )
        assert hub._total_subscribers == 0
        assert hub._nodes == {}
        assert hub.stats.unauthorized == 2
        enclave = FakeEnclave()  # the one slot is still there for the real node
        async with enclave_client(port, enclave):
            await until(lambda: hub.subscribers(NODE) == 1)


async def test_a_token_in_two_headers_or_from_the_enclave_alone_is_401() -> None:
    hub = EventHub()
    async with running_gateway(hub) as port:
        twice = _get(f"/v1/enclaves/{NODE}/events", f"Authorization: Bearer {TOKEN}")
        assert (await _request(port, twice))[0].status == 401
        # The relay has no token: what the enclave itself sends is dropped, so still 401.
        enclave = FakeEnclave()
        async with enclave_client(port, enclave, token=None) as status:
            await until(lambda: status.last_error != "")
            assert "401" in status.last_error
            assert hub.subscribers(NODE) == 0


async def test_a_thousand_bad_subscriptions_do_not_evict_the_real_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack (b), as reproduced: 1019 fake subscriptions and 4 for the real node id, all with
    wrong or no tokens, held open concurrently, while the real enclave is subscribed through
    its relay. Before, they pushed it out and hit the global limit; now every one is a 401,
    the enclave keeps its one subscription and keeps receiving events, and the refusals make
    one log line, not a thousand."""
    caplog.set_level(logging.WARNING, "trio_sign.gateway.events")
    hub = EventHub(max_subscribers=8)
    enclave = FakeEnclave()
    attempts = [(f"fake-{n}", f"Bearer guess-{n:04d}-0123456789abcdef") for n in range(1019)]
    attempts += [(NODE, f"Bearer guess-{n}-0123456789abcdef") for n in range(3)] + [(NODE, "")]
    statuses: list[int] = []
    async with running_gateway(hub) as port, enclave_client(port, enclave) as client:
        await until(lambda: hub.subscribers(NODE) == 1)
        gate = trio.Semaphore(64)  # at most 64 sockets of ours at once

        async def attack(node_id: str, auth: str) -> None:
            extra = (f"Authorization: {auth}",) if auth else ()
            async with gate:
                head, _ = await _request(
                    port, _get(f"/v1/enclaves/{node_id}/events", *extra, token=None)
                )
            statuses.append(head.status)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for node_id, auth in attempts:
                    nursery.start_soon(attack, node_id, auth)
                hub.freeze(NODE, "during-the-attack")
        assert statuses == [401] * len(attempts)
        nonce = hub.probe(NODE)
        await until(lambda: enclave.last_sse_probe == nonce)
        assert hub.subscribers(NODE) == 1
        assert hub._total_subscribers == 1
        assert client.connects == 1
        assert client.reconnects == 0
        assert enclave.log[0] == ("freeze", "during-the-attack")
    assert hub.stats.unauthorized == len(attempts)
    assert hub.stats.refused == hub.stats.refused_node == 0
    refusal_lines = [r for r in caplog.records if "unauthenticated" in r.getMessage()]
    assert 1 <= len(refusal_lines) <= 2  # at most once per 10 s
    assert "guess-" not in caplog.text


async def test_authenticated_duplicates_beyond_the_node_limit_get_429_and_displace_nobody() -> None:
    """Attack (c) over HTTP: with the node's own token, subscriptions beyond
    ``max_subscribers_per_node`` are refused with 429; the enclave's stays and gets events."""
    hub = EventHub(max_subscribers_per_node=2)
    enclave = FakeEnclave()
    async with running_gateway(hub) as port, enclave_client(port, enclave) as client:
        await until(lambda: hub.subscribers(NODE) == 1)
        second, _http = await _open_raw(port, _get(f"/v1/enclaves/{NODE}/events"))
        async with second:
            await until(lambda: hub.subscribers(NODE) == 2)
            for _ in range(4):
                head, body = await _request(port, _get(f"/v1/enclaves/{NODE}/events"))
                assert head.status == 429
                assert head.get("retry-after") == "5"
                assert b"max_subscribers_per_node" in body
            assert hub.subscribers(NODE) == 2
            nonce = hub.probe(NODE)
            await until(lambda: enclave.last_sse_probe == nonce)
        assert client.reconnects == 0
    assert hub.stats.refused_node == 4


async def test_refusals_are_logged_at_most_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trio_sign.gateway.events")
    hub = EventHub()
    app = GatewayEventsApp(hub, credentials=CREDENTIALS, refusal_log_interval_s=10)

    async def knock() -> int:
        fake = FakeAsgi()
        fake.scope["headers"] = [(b"authorization", b"Bearer nope-0123456789abcdef")]
        await fake.run(app)
        return int(fake.sent[0][1]["status"])

    for _ in range(50):
        assert await knock() == 401
    await trio.sleep(10)
    assert await knock() == 401
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "49 more" in lines[1]
    assert hub.stats.unauthorized == 51


@pytest.mark.parametrize(
    ("credentials", "message"),
    [
        ({NODE: "short"}, "events token of node 'node-7'"),
        ({NODE: "has spaces in it 0123456789"}, "events token of node 'node-7'"),
        ({"bad id": TOKEN}, "node id"),
    ],
)
def test_app_refuses_bad_credentials_without_quoting_the_token(
    credentials: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        GatewayEventsApp(EventHub(), credentials=credentials)
    assert "has spaces" not in str(info.value)
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(GatewayEventsApp(EventHub(), credentials=CREDENTIALS))
