"""Hypothesis against the hub: after authenticating, a participant sends any sequence of
frames (answers to real requests, answers to made-up ones, duplicates, wrong-phase answers,
garbage) while the coordinator has sessions pending. Whatever it sends: every hub call ends
with a result or a ParticipantError naming the participant, nothing else; no request stays
in flight; the connection is open or closed with a code of the contract."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, wrap_client_stream, wrap_server_stream

from tests.participant_helpers import SUITES, Shares, deal, participant_keys
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import (
    SUBPROTOCOL,
    HubSettings,
    ParticipantError,
    ParticipantHub,
)
from trio_sign.participant import _messages as m
from trio_sign.participant import _session as s

ACCOUNT = deal("acct-1", SUITES[0])
RIDS = ["r0", "r1", "r2", "real0", "real1", "real2"]
b32 = st.binary(min_size=32, max_size=32)
b33 = st.binary(min_size=33, max_size=33)

FRAMES = st.one_of(
    st.builds(lambda rid, h, b: ("commitment", rid, h, b), st.sampled_from(RIDS), b32 | b33, b32),
    st.builds(
        lambda rid, why: ("decline", rid, why),
        st.sampled_from(RIDS),
        st.sampled_from(sorted(m.DECLINE_REASONS)),
    ),
    st.builds(lambda rid, share: ("share", rid, share), st.sampled_from(RIDS), b32),
    st.builds(lambda rid: ("error", rid), st.sampled_from(RIDS)),
    st.just(("honest",)),
    st.just(("ping",)),
    st.sampled_from(
        [
            ("raw", "{"),
            ("raw", '{"type":"hello","v":1,"participant_id":"x","key_id":"y"}'),
            ("raw", '{"type":"ping","v":2,"seq":1}'),
        ]
    ),
    st.just(("sleep",)),
)
#: What the fake participant sees: the hub's close codes, or 1006 when it had stopped reading
#: (its queue full of pongs) and never took the close frame before the hub cut the stream.
ALLOWED_CLOSE = {
    m.CLOSE_PROTOCOL_ERROR,
    m.CLOSE_UNSUPPORTED_VERSION,
    m.CLOSE_GOING_AWAY,
    m.CLOSE_NORMAL,
    m.CLOSE_TOO_BIG,
    1006,
}


def resolve(rid: str, real: dict[str, str]) -> str:
    return real.get(rid, rid)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAMES, max_size=25))
def test_any_participant_behaviour_keeps_the_hub_sound(frames: list[tuple[Any, ...]]) -> None:
    auth, key = participant_keys("ops-1")
    approver = ApproverSigningKey.generate()
    results: list[Any] = []

    async def main() -> None:
        hub = ParticipantHub({"ops-1": key}, HubSettings(gateway_id="gw"))
        async with trio.open_nursery() as nursery:
            client_stream, server_stream = trio.testing.memory_stream_pair()

            async def serve() -> None:
                await hub.handle_request(await wrap_server_stream(nursery, server_stream))

            nursery.start_soon(serve)
            ws = await wrap_client_stream(
                nursery,
                client_stream,  # type: ignore[arg-type]
                "gw",
                "/v1/participants",
                subprotocols=[SUBPROTOCOL],
            )
            session = s.ParticipantSession(
                participant_id="ops-1",
                key_id=key.key_id,
                auth_key=auth,
                shares=Shares([ACCOUNT.records[1]]),
                approver=approver,
                approver_key_id="a",
            )
            for frame in session.frames_to_send():
                await ws.send_message(frame)
            while session.state is not s.State.READY:
                session.receive_frame(await ws.get_message(), 0)
                for frame in session.frames_to_send():
                    await ws.send_message(frame)

            async def call(i: int) -> None:
                try:
                    c = await hub.sign(
                        "ops-1",
                        account_id="acct-1",
                        session_id=f"s{i}",
                        ciphersuite=SUITES[0],
                        message=b"m",
                        timeout_s=5,
                    )
                    results.append(c)
                except ParticipantError as exc:
                    results.append(exc)

            for i in range(3):
                nursery.start_soon(call, i)
            await trio.testing.wait_all_tasks_blocked()
            real: dict[str, str] = {}
            close_codes: list[int | None] = []
            try:
                while len(real) < 3:
                    with trio.move_on_after(0.01):
                        msg = m.parse_message(await ws.get_message())
                        if isinstance(msg, m.SignRequest):
                            real[f"real{len(real)}"] = msg.request_id
                        continue
                    break
                for action in frames:
                    kind = action[0]
                    if kind == "sleep":
                        await trio.sleep(1)
                        continue
                    if kind == "honest":
                        # a real answer to the first real request
                        text = m.encode_message(
                            m.Commitment(
                                resolve("real0", real),
                                ACCOUNT.records[1].identifier,
                                b"\x02" * 32,
                                b"\x03" * 32,
                            )
                        )
                    elif kind == "ping":
                        text = m.encode_message(m.Ping(1))
                    elif kind == "raw":
                        text = action[1]
                    elif kind == "commitment":
                        text = m.encode_message(
                            m.Commitment(resolve(action[1], real), bytes(32), action[2], action[3])
                        )
                    elif kind == "decline":
                        text = m.encode_message(m.Decline(resolve(action[1], real), action[2]))
                    elif kind == "share":
                        text = m.encode_message(
                            m.SignatureShare(
                                resolve(action[1], real),
                                action[2],
                                m.ApprovalField("a", bytes(64), 1),
                            )
                        )
                    else:
                        text = m.encode_message(m.Error("internal", "", resolve(action[1], real)))
                    await ws.send_message(text)
                    await trio.testing.wait_all_tasks_blocked()
            except ConnectionClosed as exc:
                close_codes.append(exc.reason.code if exc.reason is not None else None)
            assert set(close_codes) <= ALLOWED_CLOSE
            await trio.sleep(6)  # every call is over by its timeout
            assert len(results) == 3
            for r in results:
                assert r.participant_id == "ops-1"
            for r in results:
                if not isinstance(r, ParticipantError):
                    hub.cancel(r)
            assert hub.in_flight("ops-1") == 0
            nursery.cancel_scope.cancel()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        auth.close()
        approver.close()
