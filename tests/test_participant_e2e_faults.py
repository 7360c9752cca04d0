"""Misbehaving participants, with the real library under asyncio AND Trio against the real
endpoint on loopback: the library's sans-io session is swapped for one that misbehaves on
the way out (answers late, answers twice, sends a bad share, signs its challenge too late,
replays another connection's auth). The hub names the participant every time, and no
misbehaviour costs another session anything."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import anyio
import pytest
import trio

from tests.participant_helpers import (
    SUITES,
    GatewayThread,
    Shares,
    deal,
    participant_keys,
    sign_with_hub,
    wall_clock_ms,
)
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import (
    HubSettings,
    ParticipantError,
    ParticipantHub,
    ParticipantKey,
)
from trio_sign.participant import (
    AutoPolicy,
    ClientSettings,
    ParticipantClient,
    ParticipantConnectionError,
)
from trio_sign.participant import _messages as m
from trio_sign.participant import _session as s

pytest_plugins = ["tests.participant_anyio"]
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Faulty(s.ParticipantSession):
    """A participant session that misbehaves in ``mode`` on the frames it sends."""

    mode: ClassVar[str] = ""
    auths: ClassVar[list[str]] = []
    hold_auth_ms: ClassVar[int] = 0

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._held: list[tuple[int, str]] = []

    def frames_to_send(self) -> list[str]:
        now = wall_clock_ms()
        out: list[str] = []
        for frame in super().frames_to_send():
            msg = m.parse_message(frame)
            if isinstance(msg, m.Auth):
                if self.mode == "replay" and self.auths:
                    frame = self.auths[0]
                self.auths.append(frame)
                if self.mode == "slow_auth":
                    self._held.append((now + self.hold_auth_ms, frame))
                    continue
            elif isinstance(msg, m.Commitment) and self.mode == "late":
                entry = self._requests.get(msg.request_id)
                assert entry is not None
                self._held.append((entry.request.deadline_unix_ms + 50, frame))
                continue
            elif isinstance(msg, m.SignatureShare) and self.mode == "bad_share":
                frame = m.encode_message(
                    dataclasses.replace(msg, signature_share=b"\x01" + bytes(31))
                )
            if self.mode == "twice" and isinstance(msg, (m.Commitment, m.SignatureShare)):
                out.append(frame)
            out.append(frame)
        due = [f for t, f in self._held if t <= now]
        self._held = [(t, f) for t, f in self._held if t > now]
        return due + out


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Faulty]]:
    monkeypatch.setattr(s, "ParticipantSession", Faulty)  # what _client builds per connection
    Faulty.auths = []
    yield Faulty
    Faulty.mode = ""


class Setup:
    def __init__(self, **hub_settings: Any) -> None:
        self.auth, self.key = participant_keys("ops-1")
        self.approver = ApproverSigningKey.generate()
        self.accounts = [deal(f"acct-{i}", SUITES[i]) for i in range(3)]
        self.gw = GatewayThread(
            ParticipantHub({"ops-1": self.key}, HubSettings(gateway_id="gw", **hub_settings))
        )

    def client(self) -> ParticipantClient:
        return ParticipantClient(
            ClientSettings(self.gw.url, sweep_interval_s=0.02, reconnect_initial_s=0.05),
            participant_id="ops-1",
            key_id=self.key.key_id,
            auth_key=self.auth,
            approver=self.approver,
            approver_key_id="approver-1",
            shares=Shares(a.records[1] for a in self.accounts),
            policy=AutoPolicy(),
        )

    def __enter__(self) -> Setup:
        self.gw.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gw.stop()
        self.auth.close()
        self.approver.close()

    async def connected(self) -> None:
        async def wait() -> None:
            with trio.fail_after(10):
                await self.gw.hub.wait_connected("ops-1")

        await self.gw.call(wait)

    async def sign(self, index: int = 0, timeout_s: float = 10.0) -> Any:
        return await self.gw.call(
            sign_with_hub,
            self.gw.hub,
            "ops-1",
            self.accounts[index],
            b"message %d" % index,
            timeout_s=timeout_s,
        )


async def test_answers_late(faulty: type[Faulty]) -> None:
    faulty.mode = "late"
    with Setup() as t:
        client = t.client()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await t.connected()
            with pytest.raises(ParticipantError) as info:
                await t.sign(0, timeout_s=0.3)
            assert (info.value.reason, info.value.participant_id) == ("timeout", "ops-1")
            with anyio.fail_after(10):
                while t.gw.hub.counts["late_answers"] < 1:  # noqa: ASYNC110 - another thread's counter
                    await anyio.sleep(0.02)
            assert client.session is not None
            assert client.session.in_flight == 0  # cancelled, or swept at its deadline
            assert t.gw.hub.connected() == ["ops-1"]
            tg.cancel_scope.cancel()


async def test_answers_twice(faulty: type[Faulty]) -> None:
    faulty.mode = "twice"
    with Setup() as t:
        client = t.client()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await t.connected()
            for i in range(3):  # every suite signs; the duplicates are counted, never used
                await t.sign(i)
            with anyio.fail_after(10):  # the last duplicate may still be on its way
                while t.gw.hub.counts["late_answers"] < 6:  # noqa: ASYNC110 - another thread's counter
                    await anyio.sleep(0.01)
            assert t.gw.hub.counts["late_answers"] == 6
            assert t.gw.hub.in_flight("ops-1") == 0
            tg.cancel_scope.cancel()


async def test_a_bad_share_is_named(faulty: type[Faulty]) -> None:
    faulty.mode = "bad_share"
    with Setup() as t:
        client = t.client()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await t.connected()
            for i in range(3):
                with pytest.raises(ParticipantError) as info:
                    await t.sign(i)
                assert info.value.reason == "bad_share"
                assert info.value.participant_id == "ops-1"
                assert t.accounts[i].records[1].identifier.hex() in str(info.value)
            tg.cancel_scope.cancel()


async def test_an_expired_challenge(faulty: type[Faulty]) -> None:
    faulty.mode = "slow_auth"
    faulty.hold_auth_ms = 600
    with Setup(challenge_ttl_s=0.3) as t:
        client = t.client()
        with pytest.raises(ParticipantConnectionError) as info:
            await client.run_once()
        assert info.value.close_code == m.CLOSE_AUTH_FAILED
        assert "expired" in str(info.value)
        assert t.gw.hub.connected() == []


async def test_a_replayed_auth(faulty: type[Faulty]) -> None:
    faulty.mode = "replay"
    with Setup() as t:
        first = t.client()
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.run)
            await t.connected()
            second = t.client()  # the same keys, replaying the first connection's auth
            with pytest.raises(ParticipantConnectionError) as info:
                await second.run_once()
            assert info.value.close_code == m.CLOSE_AUTH_FAILED
            assert t.gw.hub.counts["replaced"] == 0  # the first connection is untouched
            await t.sign(1)
            tg.cancel_scope.cancel()


async def test_wrong_key_id(faulty: type[Faulty]) -> None:
    with Setup() as t:
        t.key = ParticipantKey("ops-1", "not-the-configured-id", t.key.public_key)
        with pytest.raises(ParticipantConnectionError) as info:
            await t.client().run_once()
        assert info.value.close_code == m.CLOSE_AUTH_FAILED
