"""The participant hub's log lines a peer can repeat are bounded (DESIGN §16): a participant
flooding ``error`` frames, or anyone failing handshakes over and over, makes at most one line
per ``log_interval_s`` (per participant for the former), and the next line says how many
were held back; the hub's counter still counts every ``error`` frame."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from tests.test_participant_hub import world
from trio_sign.gateway._participants import HubSettings
from trio_sign.participant import _messages as m

LOGGER = "trio_sign.gateway.participants"


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


async def test_an_error_flood_makes_one_line_per_interval(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with world(("ops-1", "ops-2"), log_interval_s=10.0) as w:
        flood = await w.connect("ops-1")
        other = await w.connect("ops-2")
        frame = m.encode_message(m.Error("internal", "x"))
        for _ in range(1000):
            await flood.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert w.hub.counts["errors"] == 1000
        assert lines(caplog, "participant ops-1 sent error") == [
            "participant ops-1 sent error internal (0 more since the last such line)"
        ]
        # another participant's line is not held back by ops-1's flood
        await other.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert len(lines(caplog, "participant ops-2 sent error")) == 1
        # once the interval has passed, the next line says how many were held back
        await trio.sleep(10.0)
        await flood.ws.send_message(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert lines(caplog, "participant ops-1 sent error")[1:] == [
            "participant ops-1 sent error internal (999 more since the last such line)"
        ]
        assert w.hub.connected() == ["ops-1", "ops-2"]  # an error frame closes nothing


async def test_refused_handshakes_make_one_line_per_interval(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with world() as w:
        for _ in range(50):
            ws = await w.open()
            await ws.send_message(m.encode_message(m.Ping(1)))  # not hello: refused at once
            await trio.testing.wait_all_tasks_blocked()
        assert lines(caplog, "participant connection refused") == [
            "participant connection refused: the first message must be hello"
            " (0 more since the last such line)"
        ]


def test_log_interval_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="log_interval_s"):
        HubSettings(log_interval_s=-1.0)
