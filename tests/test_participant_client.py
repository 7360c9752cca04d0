"""The participant client's timing with Trio's autojump clock: back-off between attempts,
the handshake deadline, decisions that never come, nonces swept at the deadline, and one
slow decision among many. The client runs on anyio; here on Trio, over an in-memory stream
into the real hub (its transport is injected)."""

from __future__ import annotations

import errno
import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from trio_websocket import wrap_server_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.participant_helpers import SUITES, Account, Shares, deal, participant_keys
from trio_sign._backoff import full_jitter_delay
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import HubSettings, ParticipantError, ParticipantHub
from trio_sign.participant import (
    CallbackPolicy,
    ClientSettings,
    ParticipantClient,
    ParticipantConnectionError,
    PassphraseKey,
    SealedShareStore,
)
from trio_sign.participant import _messages as m
from trio_sign.participant._store import MIN_MEMLIMIT, MIN_OPSLIMIT

WALL_MS = 1_800_000_000_000


def wall() -> int:
    return WALL_MS + int(trio.current_time() * 1000)


class TrioByteStream(anyio.abc.ByteStream):
    """A trio stream seen as an anyio byte stream (the test's transport)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._stream.receive_some(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return bytes(data)

    async def send(self, item: bytes) -> None:
        try:
            await self._stream.send_all(item)
        except trio.BrokenResourceError as exc:
            raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def setup(
    accounts: list[Account],
    *,
    policy: Any = None,
    silent_gateway: bool = False,
    hub_settings: HubSettings | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[ParticipantHub, ParticipantClient]]:
    auth, key = participant_keys("ops-1")
    approver = ApproverSigningKey.generate()
    hub = ParticipantHub(
        {"ops-1": key}, hub_settings or HubSettings(gateway_id="gw"), wall_clock_ms=wall
    )
    async with trio.open_nursery() as nursery:

        async def connect() -> anyio.abc.ByteStream:
            client_stream, server_stream = trio.testing.memory_stream_pair()

            async def serve() -> None:
                if silent_gateway:
                    await trio.sleep_forever()
                request = await wrap_server_stream(nursery, server_stream)
                await hub.handle_request(request)

            nursery.start_soon(serve)
            return TrioByteStream(client_stream)

        client = ParticipantClient(
            ClientSettings("ws://gateway/v1/participants", **settings),
            participant_id="ops-1",
            key_id=key.key_id,
            auth_key=auth,
            approver=approver,
            approver_key_id="approver-1",
            shares=Shares(a.records[1] for a in accounts),
            policy=policy or CallbackPolicy(lambda r: _true()),
            wall_clock_ms=wall,
            connect=connect,
        )
        try:
            yield hub, client
        finally:
            nursery.cancel_scope.cancel()
            auth.close()
            approver.close()


async def _true() -> bool:
    return True


def lone_client(
    settings: ClientSettings, auth: ApproverSigningKey, key_id: str, **kw: Any
) -> ParticipantClient:
    """ops-1's client, approving with its auth key and everything its policy is asked, with
    no shares unless ``shares`` is given: for tests of its connection and store, not of its
    decisions (``kw``: the rest of ParticipantClient's keywords)."""
    kw.setdefault("shares", Shares([]))
    return ParticipantClient(
        settings,
        participant_id="ops-1",
        key_id=key_id,
        auth_key=auth,
        approver=auth,
        approver_key_id="a",
        policy=CallbackPolicy(lambda r: _true()),
        **kw,
    )


async def test_back_off_between_attempts(autojump_clock: trio.abc.Clock) -> None:
    attempts: list[float] = []

    async def refused() -> anyio.abc.ByteStream:
        attempts.append(trio.current_time())
        raise OSError(errno.ECONNREFUSED, "Connection refused")

    auth, key = participant_keys()
    client = lone_client(
        ClientSettings(
            "ws://127.0.0.1:9/v1/participants", reconnect_initial_s=0.5, reconnect_max_s=4.0
        ),
        auth,
        key.key_id,
        rng=random.Random(7),
        connect=refused,
    )
    with trio.move_on_after(60):
        await client.run()
    rng = random.Random(7)
    expected, t = [0.0], 0.0
    while True:
        t += full_jitter_delay(rng, base=0.5, maximum=4.0, failures=len(expected) - 1)
        if t >= 60:
            break
        expected.append(t)
    assert attempts == pytest.approx(expected)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert max(gaps) <= 4.0
    assert len(attempts) > 15  # capped: it keeps trying
    auth.close()


async def test_handshake_deadline(autojump_clock: trio.abc.Clock) -> None:
    async with setup([], silent_gateway=True, connect_timeout_s=3.0) as (_, client):
        start = trio.current_time()
        with pytest.raises(ParticipantConnectionError, match="handshake timed out"):
            await client.run_once()
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_a_decision_that_never_comes_is_declined_at_the_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    never = trio.Event()

    async def person(request: m.SignRequest) -> bool:
        await never.wait()
        return True

    async with (
        setup([account], policy=CallbackPolicy(person)) as (hub, client),
        trio.open_nursery() as nursery,
    ):
        if True:
            nursery.start_soon(client.run)
            await hub.wait_connected("ops-1")
            start = trio.current_time()
            with pytest.raises(ParticipantError) as info:
                await hub.sign(
                    "ops-1",
                    account_id="acct-1",
                    session_id="s",
                    ciphersuite=SUITES[0],
                    message=b"m",
                    timeout_s=30,
                )
            # the participant declined 'expired' when its deadline (the hub's timeout) came
            assert info.value.reason in ("declined", "timeout")
            assert trio.current_time() - start == pytest.approx(30.0, abs=0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert client.session is not None
            assert client.session.in_flight == 0
            # declined 'expired' at its deadline, by the decision's own timer or by the sweeper
            counts = client.session.counts
            assert counts["declined"] + counts["expired"] == 1
            nursery.cancel_scope.cancel()


async def test_committed_nonces_are_swept_at_the_deadline(autojump_clock: trio.abc.Clock) -> None:
    account = deal("acct-1", SUITES[1])
    async with (
        setup([account], sweep_interval_s=0.5) as (hub, client),
        trio.open_nursery() as nursery,
    ):
        if True:
            nursery.start_soon(client.run)
            await hub.wait_connected("ops-1")
            await hub.sign(
                "ops-1",
                account_id="acct-1",
                session_id="s",
                ciphersuite=SUITES[1],
                message=b"m",
                timeout_s=10,
            )
            session = client.session
            assert session is not None
            (entry,) = session._requests.values()
            nonces = entry.nonces
            assert any(nonces._buf)
            # round two never comes: the sweeper drops the request at its deadline
            await trio.sleep(9.9)  # just before the deadline
            assert session.in_flight == 1
            assert any(nonces._buf)
            await trio.sleep(0.6)  # the deadline, and the sweep (every 0.5 s) after it
            assert session.in_flight == 0
            assert not any(nonces._buf)
            assert session.counts["expired"] == 1
            nursery.cancel_scope.cancel()


async def test_one_slow_decision_among_many(autojump_clock: trio.abc.Clock) -> None:
    accounts = [deal(f"acct-{i}", SUITES[i % 3]) for i in range(3)]
    release = trio.Event()

    async def person(request: m.SignRequest) -> bool:
        if request.account_id == "acct-0":
            await release.wait()
        return True

    async with (
        setup(accounts, policy=CallbackPolicy(person)) as (hub, client),
        trio.open_nursery() as nursery,
    ):
        if True:
            nursery.start_soon(client.run)
            await hub.wait_connected("ops-1")
            slow: dict[str, Any] = {}

            async def sign_slow() -> None:
                slow["c"] = await hub.sign(
                    "ops-1",
                    account_id="acct-0",
                    session_id="slow",
                    ciphersuite=accounts[0].scheme.name,
                    message=b"m",
                    timeout_s=60,
                )

            nursery.start_soon(sign_slow)
            start = trio.current_time()
            for i in range(50):
                account = accounts[1 + i % 2]
                await hub.sign(
                    "ops-1",
                    account_id=account.account_id,
                    session_id=f"s-{i}",
                    ciphersuite=account.scheme.name,
                    message=b"m",
                    timeout_s=60,
                )
            assert trio.current_time() == start  # none of them waited for the slow one
            assert "c" not in slow
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert "c" in slow
            nursery.cancel_scope.cancel()


async def test_cancelled_mid_handshake_and_mid_session(autojump_clock: trio.abc.Clock) -> None:
    account = deal("acct-1", SUITES[0])
    async with setup([account], silent_gateway=True) as (_, client):
        with trio.move_on_after(1.0):
            await client.run_once()
        assert client.session is not None
        assert client.session.state.value == "closed"
    async with setup([account]) as (hub, client), trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await client.run()

        nursery.start_soon(run)
        await hub.wait_connected("ops-1")
        await hub.sign(
            "ops-1",
            account_id="acct-1",
            session_id="s",
            ciphersuite=SUITES[0],
            message=b"m",
            timeout_s=30,
        )
        session = client.session
        assert session is not None
        (entry,) = session._requests.values()
        nonces = entry.nonces
        scope.cancel()
        await hub.wait_disconnected("ops-1")
        assert session.in_flight == 0
        assert not any(nonces._buf)  # zeroed when the connection went


@pytest.mark.parametrize(
    "reply",
    [
        b"not http at all\r\n\r\n",  # not an HTTP response
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: wrong\r\n\r\n",  # an upgrade with a wrong accept key
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000,  # a response head that never ends
    ],
)
async def test_a_hostile_handshake_reply_ends_the_connection_not_the_client(
    autojump_clock: trio.abc.Clock, reply: bytes
) -> None:
    """A hub that answers the WebSocket upgrade with garbage costs one connection: run_once
    raises ParticipantConnectionError and run() goes on reconnecting."""
    attempts = 0

    async def connect() -> anyio.abc.ByteStream:
        nonlocal attempts
        attempts += 1
        client_stream, server_stream = trio.testing.memory_stream_pair()
        await server_stream.send_all(reply)
        return TrioByteStream(client_stream)

    auth, key = participant_keys()
    client = lone_client(
        ClientSettings("ws://gateway/v1/participants", reconnect_max_s=1.0),
        auth,
        key.key_id,
        connect=connect,
    )
    with pytest.raises(ParticipantConnectionError, match="1002"):
        await client.run_once()
    with trio.move_on_after(10):
        await client.run()
    assert attempts > 3  # it kept reconnecting
    auth.close()


async def test_a_gateway_gone_silent_is_left_at_idle_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A connection on which nothing arrives (a half-open TCP connection; here a hub whose
    heartbeat is off) is closed 1001 after idle_timeout_s, so run() makes a new one."""
    silent = HubSettings(gateway_id="gw", ping_interval_s=10_000.0, idle_timeout_s=30_000.0)
    async with setup([], hub_settings=silent, idle_timeout_s=20.0) as (_, client):
        start = trio.current_time()
        with (
            trio.fail_after(100),  # without the idle timeout, run_once never returns
            pytest.raises(ParticipantConnectionError, match="nothing from the gateway") as info,
        ):
            await client.run_once()
        assert info.value.close_code == m.CLOSE_GOING_AWAY
        assert client.counts["welcomed"] == 1
        assert trio.current_time() - start == pytest.approx(20.0)


async def test_an_endless_message_from_the_gateway_closes_1009_by_its_bytes(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A hostile gateway that accepts the upgrade, then sends one text message that never
    finishes: the client holds at most max_frame_bytes of it (counted in UTF-8 bytes, not
    characters: 4-byte characters cannot carry four times the limit) and closes 1009."""
    limit = 8192
    chunk = "\U0001f600" * 2100  # 2100 characters, 8400 UTF-8 bytes: over the limit

    async def hostile(server: trio.abc.Stream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            ws.receive_data(bytes(await server.receive_some(65536)))
            requests = [e for e in ws.events() if isinstance(e, Request)]
            if requests:
                break
        await server.send_all(ws.send(AcceptConnection(subprotocol=requests[0].subprotocols[0])))
        await server.send_all(ws.send(TextMessage(data=chunk, message_finished=False)))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:

        async def connect() -> anyio.abc.ByteStream:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(hostile, server_stream)
            return TrioByteStream(client_stream)

        auth, key = participant_keys()
        client = lone_client(
            ClientSettings("ws://gateway/v1/participants", max_frame_bytes=limit),
            auth,
            key.key_id,
            connect=connect,
        )
        with pytest.raises(ParticipantConnectionError, match="max_frame_bytes") as info:
            await client.run_once()
        assert info.value.close_code == m.CLOSE_TOO_BIG
        nursery.cancel_scope.cancel()
    auth.close()


async def test_a_share_whose_save_failed_leaves_the_store(tmp_path: Path) -> None:
    """A DKG's share that could not be sealed (the DKG is declined ``internal``) must not
    stay in the store's memory: the next save would put on disk a share the gateway never
    heard of, and a retry of the same account would be refused as already held."""
    key = PassphraseKey(bytearray(b"pw" * 8), opslimit=MIN_OPSLIMIT, memlimit=MIN_MEMLIMIT)
    store = SealedShareStore.create(tmp_path / "p.store", "ops-1", [], key)
    auth, pkey = participant_keys()
    client = lone_client(
        ClientSettings("ws://gateway/v1/participants"), auth, pkey.key_id, shares=store
    )
    real_save = store.save
    failures = [OSError(28, "No space left on device")]

    def save(**kw: Any) -> None:
        if failures:
            raise failures.pop()
        real_save(**kw)

    store.save = save  # type: ignore[method-assign]
    failed = deal("acct-1", SUITES[0]).records[1]
    with pytest.raises(OSError, match="No space"):
        await client.store_share(failed)
    assert store.share("acct-1") is None
    assert not any(failed.signing_share)  # zeroed: nobody holds it any more
    retry = deal("acct-1", SUITES[0]).records[1]
    await client.store_share(retry)
    assert store.share("acct-1") is retry
    store.close()
    auth.close()


async def test_the_gateways_error_frames_are_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway that sends a thousand error frames makes one log line, not a thousand; the
    next line after the interval says how many were held back."""
    import logging
    from typing import cast

    from trio_sign.participant import _client
    from trio_sign.participant import _session as s
    from trio_sign.rpc import LogThrottle

    caplog.set_level(logging.INFO, "trio_sign.participant")
    auth, key = participant_keys()
    client = lone_client(ClientSettings("ws://gateway/v1/participants"), auth, key.key_id)
    stream, _ = trio.testing.memory_stream_pair()
    conn = _client._Connection(client, cast(Any, TrioByteStream(stream)), "gateway", "/")
    now = [0.0]
    conn.error_log = LogThrottle(_client.ERROR_LOG_INTERVAL_S, lambda: now[0])
    error = s.RemoteError(m.Error(code="busy"))
    for _ in range(1000):
        await conn._on_session_event(error, cast(Any, None))
    now[0] = _client.ERROR_LOG_INTERVAL_S
    await conn._on_session_event(error, cast(Any, None))
    lines = [r.getMessage() for r in caplog.records if "gateway error" in r.getMessage()]
    assert lines == [
        "participant ops-1: gateway error busy (0 more since the last such line)",
        "participant ops-1: gateway error busy (999 more since the last such line)",
    ]
    auth.close()
