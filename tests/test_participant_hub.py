"""The gateway's participant endpoint (ParticipantHub) over in-memory WebSockets, with Trio's
autojump clock: the handshake (wrong key, replayed and expired challenges, timeouts), the
registry, and a participant that answers late, twice, badly, or not at all.

The fake participant is the sans-io ParticipantSession driven by hand, so a test can drop,
delay, duplicate or corrupt any frame it would send.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from tests.participant_helpers import (
    SUITES,
    Account,
    Shares,
    deal,
    entries_of,
    participant_keys,
    round2,
)
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import (
    SUBPROTOCOL,
    SUBPROTOCOL_V2,
    HubSettings,
    ParticipantConfigError,
    ParticipantError,
    ParticipantHub,
    ParticipantKey,
    check_signature_share,
    parse_participants_table,
)
from trio_sign.participant import _messages as m
from trio_sign.participant import _session as s

WALL_MS = 1_800_000_000_000


def close_code(exc: ConnectionClosed) -> int | None:
    return exc.reason.code if exc.reason is not None else None


def wall() -> int:
    return WALL_MS + int(trio.current_time() * 1000)


class Fake:
    """One participant connection driven by hand."""

    def __init__(
        self, ws: WebSocketConnection, session: s.ParticipantSession, nursery: trio.Nursery
    ) -> None:
        self.ws, self.session, self.nursery = ws, session, nursery

    async def flush(self) -> None:
        for frame in self.session.frames_to_send():
            await self.ws.send_message(frame)

    async def feed(self) -> list[s.Event]:
        text = await self.ws.get_message()
        return self.session.receive_frame(text, wall())

    async def authenticate(self) -> None:
        await self.flush()  # hello
        while self.session.state is not s.State.READY:
            events = await self.feed()
            await self.flush()
            assert not any(isinstance(e, s.CloseConnection) for e in events), events

    async def next_request(self) -> m.SignRequest:
        while True:
            events = await self.feed()
            await self.flush()
            for e in events:
                if isinstance(e, s.SignRequested):
                    return e.request

    async def raw(self) -> m.Message:
        return m.parse_message(await self.ws.get_message())

    async def commit(self, request: m.SignRequest) -> list[str]:
        """Accept: the frames it would send (not sent)."""
        self.session.accept(request.request_id, wall())
        return self.session.frames_to_send()

    async def closed_code(self) -> int | None:
        with trio.fail_after(120):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                return close_code(exc)


class World:
    def __init__(self, hub: ParticipantHub, nursery: trio.Nursery) -> None:
        self.hub, self.nursery = hub, nursery
        self.keys: dict[str, tuple[ApproverSigningKey, ParticipantKey]] = {}
        self.approver = ApproverSigningKey.generate("ed25519")

    async def open(
        self,
        path: str = "/v1/participants",
        protocols: Any = (SUBPROTOCOL,),
        client_nursery: trio.Nursery | None = None,
        stream_pair: Any = trio.testing.memory_stream_pair,
    ) -> Any:
        client_stream, server_stream = stream_pair()

        async def serve() -> None:
            request = await wrap_server_stream(self.nursery, server_stream)
            await self.hub.handle_request(request)

        self.nursery.start_soon(serve)
        return await wrap_client_stream(
            client_nursery or self.nursery,
            client_stream,
            "gateway",
            path,
            subprotocols=list(protocols),
        )

    async def rejected_status(self, **kw: Any) -> int:
        """Open a connection (``open``'s arguments) that the hub must reject: its status."""
        codes: list[int] = []
        try:
            async with trio.open_nursery() as nursery:
                await self.open(client_nursery=nursery, **kw)
        except* ConnectionRejected as group:
            codes += [
                int(e.status_code) for e in group.exceptions if isinstance(e, ConnectionRejected)
            ]
        assert len(codes) == 1, "not rejected"
        return codes[0]

    async def connect(
        self,
        pid: str,
        accounts: list[Account] = (),  # type: ignore[assignment]
        *,
        auth_key: ApproverSigningKey | None = None,
        authenticate: bool = True,
        stream_pair: Any = trio.testing.memory_stream_pair,
    ) -> Fake:
        key, pkey = self.keys[pid]
        ws = await self.open(stream_pair=stream_pair)
        session = s.ParticipantSession(
            participant_id=pid,
            key_id=pkey.key_id,
            auth_key=auth_key or key,
            shares=Shares(a.records[1] for a in accounts),
            approver=self.approver,
            approver_key_id="approver-1",
        )
        fake = Fake(ws, session, self.nursery)
        if authenticate:
            await fake.authenticate()
        return fake


@asynccontextmanager
async def world(pids: tuple[str, ...] = ("ops-1",), **settings: Any) -> AsyncIterator[World]:
    made = {pid: participant_keys(pid) for pid in pids}
    hub = ParticipantHub(
        {pid: k for pid, (_, k) in made.items()},
        HubSettings(gateway_id="gw-1", **settings),
        wall_clock_ms=wall,
    )
    async with trio.open_nursery() as nursery:
        w = World(hub, nursery)
        w.keys = made
        try:
            yield w
        finally:
            nursery.cancel_scope.cancel()
            for key, _ in made.values():
                key.close()
            w.approver.close()


async def start_sign(w: World, account: Account, pid: str = "ops-1", **kw: Any) -> Any:
    """Start hub.sign in the background; returns a box filled with its result or error."""
    box: dict[str, Any] = {}

    async def run() -> None:
        try:
            box["ok"] = await w.hub.sign(
                pid,
                account_id=account.account_id,
                session_id=kw.pop("session_id", "s-1"),
                ciphersuite=account.scheme.name,
                message=kw.pop("message", b"m"),
                timeout_s=kw.pop("timeout_s", 5.0),
            )
        except ParticipantError as exc:
            box["error"] = exc
        box["at"] = trio.current_time()

    w.nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return box


# -- handshake -----------------------------------------------------------------------------------


async def test_authenticates_and_registers(autojump_clock: trio.abc.Clock) -> None:
    async with world() as w:
        fake = await w.connect("ops-1")
        assert fake.session.welcome is not None
        assert fake.session.welcome.max_in_flight == w.hub.settings.max_in_flight
        assert w.hub.connected() == ["ops-1"]
        assert w.hub.counts["auth_ok"] == 1


async def test_wrong_key_and_unknown_participant_fail_alike(autojump_clock: trio.abc.Clock) -> None:
    async with world(("ops-1",)) as w:
        other, _ = participant_keys("x")
        fake = await w.connect("ops-1", auth_key=other, authenticate=False)
        await fake.flush()
        await fake.feed()  # challenge
        await fake.flush()  # auth, signed by the wrong key
        assert await fake.closed_code() == m.CLOSE_AUTH_FAILED
        # an id the gateway does not know: same code, same reason
        w.keys["stranger"] = participant_keys("stranger")
        fake2 = await w.connect("stranger", authenticate=False)
        await fake2.flush()
        await fake2.feed()
        await fake2.flush()
        assert await fake2.closed_code() == m.CLOSE_AUTH_FAILED
        assert w.hub.connected() == []
        assert w.hub.counts["auth_failed"] == 2
        other.close()


async def test_replayed_auth_is_refused(autojump_clock: trio.abc.Clock) -> None:
    async with world() as w:
        first = await w.connect("ops-1", authenticate=False)
        await first.flush()
        await first.feed()
        frames = first.session.frames_to_send()
        (auth_frame,) = frames
        await first.ws.send_message(auth_frame)
        await first.feed()  # welcome
        # a second connection replays the captured auth against its own fresh challenge
        ws = await w.open()
        _, pkey = w.keys["ops-1"]
        await ws.send_message(m.encode_message(m.Hello("ops-1", pkey.key_id)))
        challenge = m.parse_message(await ws.get_message())
        assert isinstance(challenge, m.Challenge)
        await ws.send_message(auth_frame)
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert close_code(info.value) == m.CLOSE_AUTH_FAILED
        assert w.hub.connected() == ["ops-1"]  # the first one is untouched


async def test_expired_challenge_is_refused(autojump_clock: trio.abc.Clock) -> None:
    async with world(challenge_ttl_s=5.0, handshake_timeout_s=10.0) as w:
        fake = await w.connect("ops-1", authenticate=False)
        await fake.flush()
        await fake.feed()
        challenge_at = trio.current_time()
        await trio.sleep(5.5)
        await fake.flush()  # a valid signature, too late
        assert await fake.closed_code() == m.CLOSE_AUTH_FAILED
        assert trio.current_time() - challenge_at == pytest.approx(5.5)
        assert w.hub.connected() == []


async def test_silent_connection_is_cut_at_the_handshake_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with world(handshake_timeout_s=7.0) as w:
        ws = await w.open()
        start = trio.current_time()
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert close_code(info.value) == m.CLOSE_AUTH_TIMEOUT
        assert trio.current_time() - start == pytest.approx(7.0)


async def test_wrong_path_or_subprotocol_is_rejected(autojump_clock: trio.abc.Clock) -> None:
    async with world() as w:
        assert await w.rejected_status(path="/other") == 404
        assert await w.rejected_status(protocols=()) == 400


async def test_a_new_connection_replaces_the_old_only_once_authenticated(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    async with world() as w:
        old = await w.connect("ops-1", [account])
        box = await start_sign(w, account, timeout_s=60)
        await old.next_request()  # pending at the old connection
        impostor, _ = participant_keys("ops-1")
        bad = await w.connect("ops-1", auth_key=impostor, authenticate=False)
        await bad.flush()
        await bad.feed()
        await bad.flush()
        assert await bad.closed_code() == m.CLOSE_AUTH_FAILED
        assert "error" not in box  # the old connection still serves
        new = await w.connect("ops-1", [account])
        assert await old.closed_code() == m.CLOSE_REPLACED
        await trio.testing.wait_all_tasks_blocked()
        assert box["error"].reason == "disconnected"
        assert w.hub.connected() == ["ops-1"]
        assert w.hub.counts["replaced"] == 1
        # and the new one serves
        box2 = await start_sign(w, account)
        request = await new.next_request()
        for frame in await new.commit(request):
            await new.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert "ok" in box2
        impostor.close()


# -- misbehaving participants --------------------------------------------------------------------


async def test_timeout_names_the_participant_and_a_late_answer_is_ignored(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        start = trio.current_time()
        box = await start_sign(w, account, timeout_s=5.0)
        request = await fake.next_request()
        late = await fake.commit(request)  # made, not sent yet
        cancel = await fake.raw()
        assert isinstance(cancel, m.Cancel)
        assert cancel.request_id == request.request_id
        assert box["error"].reason == "timeout"
        assert box["error"].participant_id == "ops-1"
        assert box["at"] - start == pytest.approx(5.0)
        for frame in late:
            await fake.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert w.hub.counts["late_answers"] == 1
        assert w.hub.in_flight("ops-1") == 0
        # the connection still works
        box = await start_sign(w, account)
        request = await fake.next_request()
        for frame in await fake.commit(request):
            await fake.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert box["ok"].request_id == request.request_id


async def test_answers_twice(autojump_clock: trio.abc.Clock) -> None:
    account = deal("acct-1", SUITES[1])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        box = await start_sign(w, account)
        request = await fake.next_request()
        (frame,) = await fake.commit(request)
        await fake.ws.send_message(frame)
        await fake.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        theirs = box["ok"]
        assert w.hub.counts["late_answers"] == 1
        enclave = account.records[0]
        ours = account.scheme.commit(enclave.identifier, enclave.signing_share)
        done: dict[str, Any] = {}

        async def second_round() -> None:
            done["share"], _ = await round2(w.hub, theirs, account, ours, enclave, b"m", None, 5.0)

        w.nursery.start_soon(second_round)
        events = await fake.feed()
        assert events == [s.Signed(request.request_id)]
        (share_frame,) = fake.session.frames_to_send()
        await fake.ws.send_message(share_frame)
        await fake.ws.send_message(share_frame)
        await trio.testing.wait_all_tasks_blocked()
        assert done["share"].participant_id == "ops-1"
        assert w.hub.counts["late_answers"] == 2
        # and a second round two for the same request finds nothing at the participant
        again = m.SignRound2(
            request.request_id,
            (theirs.commitment, m.CommitmentEntry(enclave.identifier, b"\x02" * 33, b"\x02" * 33)),
            enclave.identifier,
        )
        assert fake.session.receive_frame(m.encode_message(again), wall()) == []
        (error,) = fake.session.frames_to_send()
        assert m.parse_message(error) == m.Error(
            "unknown_request", "no committed request with this id", request.request_id
        )
        ours.zero()


async def test_a_bad_signature_share_is_named(autojump_clock: trio.abc.Clock) -> None:
    account = deal("acct-1", SUITES[0])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        box = await start_sign(w, account)
        request = await fake.next_request()
        for frame in await fake.commit(request):
            await fake.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        theirs = box["ok"]
        enclave = account.records[0]
        ours = account.scheme.commit(enclave.identifier, enclave.signing_share)
        done: dict[str, Any] = {}

        async def second_round() -> None:
            done["r"] = await round2(w.hub, theirs, account, ours, enclave, b"m", None, 5.0)

        w.nursery.start_soon(second_round)
        await fake.feed()
        (frame,) = fake.session.frames_to_send()
        honest = m.parse_message(frame)
        assert isinstance(honest, m.SignatureShare)
        forged = m.SignatureShare(request.request_id, b"\x01" + bytes(31), honest.approval)
        await fake.ws.send_message(m.encode_message(forged))
        await trio.testing.wait_all_tasks_blocked()
        share, commitments = done["r"]
        with pytest.raises(ParticipantError) as info:
            check_signature_share(
                account.scheme,
                share,
                verifying_share=account.records[1].verifying_share,
                commitments=commitments,
                group_public_key=account.group_public_key,
                message=b"m",
            )
        assert info.value.reason == "bad_share"
        assert info.value.participant_id == "ops-1"
        assert account.records[1].identifier.hex() in str(info.value)
        ours.zero()


async def test_a_malformed_frame_fails_the_requests_and_closes(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        box = await start_sign(w, account)
        await fake.next_request()
        await fake.ws.send_message('{"type": "commitment", "v": 1, "request_id": ')
        assert await fake.closed_code() == m.CLOSE_PROTOCOL_ERROR
        await trio.testing.wait_all_tasks_blocked()
        assert box["error"].reason == "malformed"
        assert box["error"].participant_id == "ops-1"
        assert w.hub.connected() == []


async def test_a_commitment_of_the_wrong_suite_size_is_malformed(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        box = await start_sign(w, account)
        request = await fake.next_request()
        (frame,) = await fake.commit(request)
        c = m.parse_message(frame)
        assert isinstance(c, m.Commitment)
        wrong = m.Commitment(c.request_id, c.identifier, b"\x02" * 33, b"\x02" * 33)
        await fake.ws.send_message(m.encode_message(wrong))
        await trio.testing.wait_all_tasks_blocked()
        assert box["error"].reason == "malformed"
        assert w.hub.connected() == ["ops-1"]  # one bad answer, not a broken connection


async def test_a_decline_names_the_reason(autojump_clock: trio.abc.Clock) -> None:
    account = deal("acct-1", SUITES[2])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        box = await start_sign(w, account)
        request = await fake.next_request()
        fake.session.decline(request.request_id, "rejected", "not today")
        await fake.flush()
        await trio.testing.wait_all_tasks_blocked()
        error = box["error"]
        assert (error.reason, error.decline_reason) == ("declined", "rejected")
        assert "not today" in str(error)


async def test_too_many_in_flight_is_refused_before_sending(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    async with world(max_in_flight=2) as w:
        fake = await w.connect("ops-1", [account])
        first = await start_sign(w, account, timeout_s=30)
        second = await start_sign(w, account, timeout_s=30)
        third = await start_sign(w, account, timeout_s=30)
        assert third["error"].reason == "busy"
        assert "ok" not in third
        assert w.hub.in_flight("ops-1") == 2
        seen = [await fake.next_request(), await fake.next_request()]
        assert len({r.request_id for r in seen}) == 2
        with trio.move_on_after(1):
            await fake.feed()
            raise AssertionError("a third request reached the participant")
        assert "error" not in first
        assert "error" not in second
        assert w.hub.counts["busy"] == 1


async def test_a_participant_that_never_reads_gets_busy_not_a_growing_queue(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Its socket stops taking bytes (a lockstep stream: nothing is buffered), so the hub's
    writer blocks; requests fill its outgoing queue (max_queued_frames) and the next is
    refused ``busy`` at once, while another participant is served as usual."""
    account = deal("acct-1", SUITES[0])
    async with world(("ops-1", "ops-2"), max_queued_frames=2) as w:
        slow = await w.connect("ops-1", [account], stream_pair=trio.testing.lockstep_stream_pair)
        other = await w.connect("ops-2", [account])
        boxes = [await start_sign(w, account, timeout_s=30) for _ in range(8)]
        refused = [b for b in boxes if "error" in b]
        assert refused, "every request was queued"
        assert all(b["error"].reason == "busy" for b in refused)
        assert all(b["at"] == 0 for b in refused)  # at once, not at the deadline
        assert "queue is full" in str(refused[0]["error"])
        # max_queued_frames, plus what the writer and the client's buffers already took
        assert w.hub.in_flight("ops-1") == len(boxes) - len(refused) <= 2 + 3
        box = await start_sign(w, account, "ops-2", timeout_s=30)
        for frame in await other.commit(await other.next_request()):
            await other.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert "ok" in box

        async def drain() -> None:  # let the hub's writer finish before the teardown
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await slow.ws.get_message()

        w.nursery.start_soon(drain)
        await trio.sleep(31)
        assert all("error" in b for b in boxes)


async def test_not_connected(autojump_clock: trio.abc.Clock) -> None:
    async with world() as w:
        box = await start_sign(w, deal("acct-1", SUITES[0]))
        assert box["error"].reason == "not_connected"


async def test_a_vanished_participant_does_not_stall_another(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    async with world(("ops-1", "ops-2")) as w:
        silent = await w.connect("ops-1", [account])
        live = await w.connect("ops-2", [account])
        start = trio.current_time()
        stuck = await start_sign(w, account, "ops-1", timeout_s=30)
        await silent.next_request()  # and never answers
        for _ in range(3):
            box = await start_sign(w, account, "ops-2")
            request = await live.next_request()
            for frame in await live.commit(request):
                await live.ws.send_message(frame)
            await trio.testing.wait_all_tasks_blocked()
            assert "ok" in box
        assert trio.current_time() == start  # no virtual time passed for ops-2
        assert "error" not in stuck
        await trio.sleep(31)
        assert stuck["error"].reason == "timeout"


async def test_an_idle_participant_is_cut(autojump_clock: trio.abc.Clock) -> None:
    async with world(ping_interval_s=10.0, idle_timeout_s=25.0) as w:
        fake = await w.connect("ops-1")
        start = trio.current_time()
        # never reads, never answers the pings
        with trio.fail_after(100):
            await w.hub.wait_disconnected("ops-1")
        assert trio.current_time() - start == pytest.approx(30.0)
        assert await fake.closed_code() == m.CLOSE_GOING_AWAY


async def test_frames_over_the_limit_close_with_1009(autojump_clock: trio.abc.Clock) -> None:
    async with world(max_frame_bytes=4096) as w:
        fake = await w.connect("ops-1")
        await fake.ws.send_message("x" * 5000)
        assert await fake.closed_code() == m.CLOSE_TOO_BIG


async def test_the_frame_limit_counts_utf8_bytes_not_characters(
    autojump_clock: trio.abc.Clock,
) -> None:
    """1100 four-byte characters are 4400 bytes: over a 4096-byte limit (1009), though
    under it in characters (the hub's check counted characters)."""
    async with world(max_frame_bytes=4096) as w:
        fake = await w.connect("ops-1")
        malformed = w.hub.counts["malformed"]
        await fake.ws.send_message("\U0001f600" * 1100)
        assert await fake.closed_code() == m.CLOSE_TOO_BIG
        assert w.hub.counts["malformed"] == malformed + 1


async def test_a_binary_frame_closes_with_1003_and_counts_as_malformed(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with world() as w:
        fake = await w.connect("ops-1")
        malformed = w.hub.counts["malformed"]
        await fake.ws.send_message(b"\x00binary")
        assert await fake.closed_code() == m.CLOSE_UNSUPPORTED_DATA
        assert w.hub.counts["malformed"] == malformed + 1  # on /metrics like the others


# -- configuration -------------------------------------------------------------------------------


def test_participants_table() -> None:
    pk = "ab" * 32
    keys = parse_participants_table({"ops-1": {"key_id": "ops-1-auth", "public_key": pk}})
    assert keys == {"ops-1": ParticipantKey("ops-1", "ops-1-auth", bytes.fromhex(pk))}
    assert parse_participants_table(None) == {}
    for bad, words in (
        ([], "table"),
        ({"bad id!": {"key_id": "k", "public_key": pk}}, "participant id"),
        ({"ops-1": {"key_id": "k"}}, "exactly key_id and public_key"),
        ({"ops-1": {"key_id": "k", "public_key": pk, "x": 1}}, "exactly"),
        ({"ops-1": {"key_id": "", "public_key": pk}}, "key_id"),
        ({"ops-1": {"key_id": "k", "public_key": "ab"}}, "64 hex digits"),
    ):
        with pytest.raises(ParticipantConfigError, match=words):
            parse_participants_table(bad)


def test_entries_of_is_exported_for_the_coordinator() -> None:
    account = deal("acct-1", SUITES[0])
    nonces = account.scheme.commit(account.records[0].identifier, account.records[0].signing_share)
    (entry,) = entries_of([nonces.commitment])
    assert entry.identifier == account.records[0].identifier
    nonces.zero()


async def test_a_cancelled_caller_frees_its_slot_and_tells_the_participant(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        scope = trio.CancelScope()

        async def sign() -> None:
            with scope:
                await w.hub.sign(
                    "ops-1",
                    account_id="acct-1",
                    session_id="s",
                    ciphersuite=SUITES[0],
                    message=b"m",
                    timeout_s=60,
                )

        w.nursery.start_soon(sign)
        request = await fake.next_request()
        commitment_frames = await fake.commit(request)  # committed, answer not sent yet
        assert fake.session.in_flight == 1
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert w.hub.in_flight("ops-1") == 0
        assert await fake.feed() == [s.RequestEnded(request.request_id, "cancelled")]
        assert fake.session.in_flight == 0  # its nonces are gone
        for frame in commitment_frames:  # the answer crossing the cancel is ignored
            await fake.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert w.hub.counts["late_answers"] == 1


async def test_a_malformed_commitment_is_cancelled_at_the_participant(
    autojump_clock: trio.abc.Clock,
) -> None:
    account = deal("acct-1", SUITES[0])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        box = await start_sign(w, account)
        request = await fake.next_request()
        (frame,) = await fake.commit(request)
        c = m.parse_message(frame)
        assert isinstance(c, m.Commitment)
        await fake.ws.send_message(
            m.encode_message(m.Commitment(c.request_id, c.identifier, b"\x02" * 33, c.binding))
        )
        await trio.testing.wait_all_tasks_blocked()
        assert box["error"].reason == "malformed"
        assert await fake.feed() == [s.RequestEnded(request.request_id, "cancelled")]
        assert fake.session.in_flight == 0


async def test_a_cancelled_round_two(autojump_clock: trio.abc.Clock) -> None:
    account = deal("acct-1", SUITES[2])
    async with world() as w:
        fake = await w.connect("ops-1", [account])
        box = await start_sign(w, account)
        request = await fake.next_request()
        for frame in await fake.commit(request):
            await fake.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        theirs = box["ok"]
        enclave = account.records[0]
        ours = account.scheme.commit(enclave.identifier, enclave.signing_share)
        scope = trio.CancelScope()

        async def second() -> None:
            with scope:
                await round2(w.hub, theirs, account, ours, enclave, b"m", None, 60.0)

        w.nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert w.hub.in_flight("ops-1") == 0
        # the participant got round two, then the cancel: it signed, and the share is ignored
        assert await fake.feed() == [s.Signed(request.request_id)]
        assert await fake.feed() == []  # the cancel finds nothing left to drop
        await fake.flush()
        await trio.testing.wait_all_tasks_blocked()
        assert w.hub.counts["late_answers"] == 1
        # hub.cancel on a commitment whose request is gone is a no-op
        w.hub.cancel(theirs)
        ours.zero()


async def test_handshakes_in_progress_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    async with world(max_handshakes=2, handshake_timeout_s=5.0) as w:
        silent = [await w.open(), await w.open()]  # never say hello
        assert await w.rejected_status() == 503
        # an authenticated participant no longer counts
        for ws in silent:
            with pytest.raises(ConnectionClosed):
                await ws.get_message()  # cut at the handshake deadline
        await w.connect("ops-1")
        extra = [await w.open(), await w.open()]
        assert len(extra) == 2
        assert await w.rejected_status() == 503


async def test_version_negotiation_and_dkg_only_on_version_2(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A participant proposing v1 and v2 gets v2; one proposing v1 alone gets v1, and the hub
    never sends it a DKG request (the call fails ``error``, nothing sent)."""
    async with world() as w:
        both = await w.open(protocols=(SUBPROTOCOL, SUBPROTOCOL_V2))
        assert both.subprotocol == SUBPROTOCOL_V2
        await both.aclose()
        fake = await w.connect("ops-1")  # proposes v1 only
        assert fake.ws.subprotocol == SUBPROTOCOL
        assert not w.hub.speaks_dkg("ops-1")
        member = (bytes(31) + b"\x01", "enclave")
        with pytest.raises(ParticipantError) as info:
            await w.hub.dkg_round1(
                "ops-1",
                dkg_id="dkg-1",
                account_id="a",
                ciphersuite="FROST-ED25519-SHA512-v1",
                min_signers=2,
                max_signers=2,
                policy="default",
                participants=[member, (bytes(31) + b"\x02", "ops-1-auth")],
                enclave_identifier=member[0],
                identifier=bytes(31) + b"\x02",
                timeout_s=5,
                dkg_timeout_s=5,
            )
        assert info.value.reason == "error"
        assert "version 1" in str(info.value)
        assert w.hub.in_flight("ops-1") == 0


UPGRADE = (
    b"GET /v1/participants HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n\r\n"
)


async def test_sockets_are_bounded_from_accept_and_always_closed() -> None:
    """Every socket holds a place from accept (max_connections + max_handshakes in all): one
    beyond is closed at once; a silent one is cut at the handshake deadline; a rejected one
    is closed by the hub even if its client keeps it open, and gives its place back. Real
    loopback sockets, so the real clock."""
    settings = HubSettings(max_connections=1, max_handshakes=1, handshake_timeout_s=0.5)
    hub = ParticipantHub({}, settings)

    async def until_closed(stream: trio.SocketStream) -> bytes:
        got = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                got += chunk
        return got

    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(hub.serve, "127.0.0.1", 0))
        for _ in range(5):  # more than there are places: each gives its place back
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(UPGRADE.replace(b"/v1/participants", b"/other"))
                assert (await until_closed(stream)).startswith(b"HTTP/1.1 404")
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        try:
            async with await trio.open_tcp_stream("127.0.0.1", port) as beyond:
                assert await until_closed(beyond) == b""
            start = trio.current_time()
            for stream in silent:
                assert await until_closed(stream) == b""
            assert trio.current_time() - start >= 0.3  # cut at the handshake deadline
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(UPGRADE)
                with trio.fail_after(5):
                    assert (await stream.receive_some()).startswith(b"HTTP/1.1 101")
        finally:
            for stream in silent:
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_client_that_resets_after_its_request_does_not_stop_the_hub() -> None:
    """The hub's reply (404, 101, or trio-websocket's 400 to what is not HTTP) meets a
    reset socket: that socket ends, the hub serves on (each used to end serve() with the
    reply's ConnectionClosed)."""
    hub = ParticipantHub({}, HubSettings(handshake_timeout_s=0.5))
    requests = [
        UPGRADE.replace(b"/v1/participants", b"/other"),
        UPGRADE,
        b"NOT HTTP\r\n\r\n",
    ]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(hub.serve, "127.0.0.1", 0))
        for request in requests * 5:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.send_all(request)
            await stream.aclose()  # a reset, not a FIN
            await trio.sleep(0.01)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(UPGRADE)
            with trio.fail_after(5):
                assert (await stream.receive_some()).startswith(b"HTTP/1.1 101")
        nursery.cancel_scope.cancel()


async def test_connections_beyond_max_connections_are_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with world(("ops-1", "ops-2"), max_connections=1) as w:
        await w.connect("ops-1")
        assert await w.rejected_status() == 503
        assert w.hub.connected() == ["ops-1"]
