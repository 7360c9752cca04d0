"""The status channel: state reporting, coalescing, reconnects, the exit frame and metrics."""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from trio_sign.enclave._status import (
    StatusReporter,
    run_status_channel,
)
from trio_sign.nitro import (
    MAX_METRICS_BYTES,
    ChannelClosed,
    ChannelMessage,
    ExitMessage,
    HelloMessage,
    MessageStream,
    MetricsMessage,
    StateMessage,
)

SHA = "ab" * 32


class FakeParent:
    """Hands out connections; the parent's end of each arrives on ``accepted``."""

    def __init__(self, *, lockstep: bool = False) -> None:
        self._send, self.accepted = trio.open_memory_channel[MessageStream](100)
        self.attempts = 0
        self.fail = 0  # refuse this many attempts
        self.lockstep = lockstep

    async def connect(self) -> trio.abc.Stream:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        if self.fail:
            self.fail -= 1
            raise OSError("connection refused")
        pair = (
            trio.testing.lockstep_stream_pair if self.lockstep else trio.testing.memory_stream_pair
        )
        a, b = pair()
        self._send.send_nowait(MessageStream(b))
        return a


def start_status(
    parent: FakeParent,
    reporter: StatusReporter | None = None,
    *,
    backoff_initial_s: float = 0.5,
    backoff_max_s: float = 10.0,
) -> Callable[..., Awaitable[object]]:
    return functools.partial(
        run_status_channel,
        parent.connect,
        reporter,
        backoff_initial_s=backoff_initial_s,
        backoff_max_s=backoff_max_s,
        rng=random.Random(7),
    )


async def states(stream: MessageStream, n: int) -> list[str]:
    out = []
    for _ in range(n):
        message = await stream.receive_expected(StateMessage)
        out.append(message.state)
    return out


async def test_states_arrive_in_order() -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        assert await conn.receive() == HelloMessage(channel="status")
        assert await conn.receive() == StateMessage(state="booting")
        await reporter.wait_connected()
        assert reporter.connected
        reporter.set_state("preloading")
        assert await conn.receive() == StateMessage(state="preloading")
        reporter.set_state("serving", accounts=1000, sha256=SHA, preload_ms=1234)
        assert await conn.receive() == StateMessage(
            state="serving", accounts=1000, sha256=SHA, preload_ms=1234
        )
        reporter.set_state("draining")  # accounts etc. are kept
        assert await conn.receive() == StateMessage(
            state="draining", accounts=1000, sha256=SHA, preload_ms=1234
        )
        nursery.cancel_scope.cancel()


async def test_state_set_before_the_channel_runs_is_sent() -> None:
    parent = FakeParent()
    reporter = StatusReporter()
    reporter.set_state("preloading")
    async with trio.open_nursery() as nursery:
        assert await nursery.start(start_status(parent, reporter)) is reporter
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        assert await states(conn, 1) == ["preloading"]
        nursery.cancel_scope.cancel()


async def test_coalescing_keeps_the_newest_and_every_critical_state() -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        assert await states(conn, 1) == ["booting"]
        # No checkpoint between these: the sender sees only the newest.
        reporter.set_state("preloading")
        reporter.set_state("serving")
        reporter.set_state("draining")
        assert await states(conn, 1) == ["draining"]
        # failed and exiting are never coalesced away; the states around them are.
        reporter.set_state("serving")
        reporter.set_state("failed", reason="preload: truncated")
        reporter.set_state("draining")
        reporter.set_state("exiting")
        reporter.set_state("exiting", reason="again")
        got = [await conn.receive_expected(StateMessage) for _ in range(3)]
        assert [(m.state, m.reason) for m in got] == [
            ("failed", "preload: truncated"),
            ("exiting", None),
            ("exiting", "again"),
        ]
        reporter.set_state("exiting", reason="last")
        assert (await conn.receive_expected(StateMessage)).reason == "last"
        nursery.cancel_scope.cancel()


async def test_a_state_being_sent_is_not_lost_to_coalescing() -> None:
    parent = FakeParent(lockstep=True)  # send_all blocks until the parent reads
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        assert await states(conn, 1) == ["booting"]
        reporter.set_state("preloading")
        await trio.testing.wait_all_tasks_blocked()  # the sender is stuck writing "preloading"
        reporter.set_state("serving")
        reporter.set_state("draining")
        assert await states(conn, 2) == ["preloading", "draining"]
        nursery.cancel_scope.cancel()


async def test_reconnect_sends_hello_and_the_current_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        first = await parent.accepted.receive()
        await first.receive_expected(HelloMessage)
        assert await states(first, 1) == ["booting"]
        reporter.set_state("serving", accounts=5)
        assert await states(first, 1) == ["serving"]
        await first.aclose()  # the parent goes away
        second = await parent.accepted.receive()
        assert trio.current_time() <= 0.5  # backoff_initial_s
        assert await second.receive() == HelloMessage(channel="status")
        assert await second.receive() == StateMessage(state="serving", accounts=5)
        assert parent.attempts == 2
        nursery.cancel_scope.cancel()


async def test_connect_failures_back_off_exponentially_and_never_raise(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    parent.fail = 6
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(
            start_status(parent, backoff_initial_s=1.0, backoff_max_s=4.0)
        )
        reporter.set_state("preloading")  # while the channel is down
        assert not reporter.connected
        conn = await parent.accepted.receive()
        elapsed = trio.current_time()
        # Six failures: ceilings 1, 2, 4, 4, 4, 4 seconds (full jitter below each).
        assert 0 < elapsed <= 19
        assert parent.attempts == 7
        await conn.receive_expected(HelloMessage)
        assert await states(conn, 1) == ["preloading"]
        nursery.cancel_scope.cancel()


async def test_cancelling_the_channel_closes_the_stream() -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        await states(conn, 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(ChannelClosed):
        await conn.receive()
    assert not reporter.connected


async def test_frames_from_the_parent_are_ignored() -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        await conn.send(HelloMessage(channel="status"))
        await conn.receive_expected(HelloMessage)
        await states(conn, 1)
        reporter.set_state("preloading")
        assert await states(conn, 1) == ["preloading"]
        assert parent.attempts == 1
        nursery.cancel_scope.cancel()


async def test_exit_frame_follows_the_final_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    received: list[ChannelMessage] = []

    async def parent_reader() -> None:
        conn = await parent.accepted.receive()
        while True:
            try:
                received.append(await conn.receive())
            except ChannelClosed:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parent_reader)
        reporter: StatusReporter = await nursery.start(start_status(parent))
        await reporter.wait_connected()
        await trio.testing.wait_all_tasks_blocked()  # "booting" is out
        reporter.set_state("failed", reason="preload: wrong key")
        reporter.request_exit(3)
        assert not reporter.exit_delivered
        assert await reporter.wait_exit_delivered()
        assert reporter.exit_delivered
        assert trio.current_time() == 0
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert received == [
        HelloMessage(channel="status"),
        StateMessage(state="booting"),
        StateMessage(state="failed", reason="preload: wrong key"),
        ExitMessage(code=3),
    ]


async def test_wait_exit_delivered_returns_when_no_sender_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lonely = StatusReporter()
    lonely.request_exit(0)
    assert not await lonely.wait_exit_delivered()  # never ran: nobody to wait for
    parent = FakeParent()
    parent.fail = 10**6
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        reporter.request_exit(1)
        with trio.move_on_after(2.5):
            await reporter.wait_exit_delivered()  # the parent is away: it keeps trying
        assert trio.current_time() == pytest.approx(2.5)
        nursery.start_soon(reporter.wait_exit_delivered)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # the sender is gone: the waiter returns (no hang)
    assert not reporter.exit_delivered


async def test_a_new_connection_repeats_the_exit_frame() -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        first = await parent.accepted.receive()
        await first.receive_expected(HelloMessage)
        await states(first, 1)
        reporter.set_state("exiting")
        reporter.request_exit(0)
        assert await states(first, 1) == ["exiting"]
        assert await first.receive() == ExitMessage(code=0)
        await first.aclose()
        second = await parent.accepted.receive()
        await second.receive_expected(HelloMessage)
        assert await states(second, 1) == ["exiting"]
        assert await second.receive() == ExitMessage(code=0)
        nursery.cancel_scope.cancel()


async def test_a_second_exit_request_is_delivered_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        await states(conn, 1)
        reporter.set_state("failed", reason="boom")
        reporter.request_exit(2)
        assert await reporter.wait_exit_delivered()
        reporter.set_state("exiting")
        reporter.request_exit(2)
        assert not reporter.exit_delivered
        assert await reporter.wait_exit_delivered()
        got = [await conn.receive() for _ in range(4)]
        assert got == [
            StateMessage(state="failed", reason="boom"),
            ExitMessage(code=2),
            StateMessage(state="exiting"),
            ExitMessage(code=2),
        ]
        nursery.cancel_scope.cancel()


async def test_hurry_cuts_the_back_off_to_the_initial_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The last words must not wait out a 10 s back-off: once hurried, the channel retries
    at least every backoff_initial_s."""
    parent = FakeParent()
    parent.fail = 8
    hurry = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                run_status_channel,
                parent.connect,
                backoff_initial_s=0.5,
                backoff_max_s=60.0,
                rng=random.Random(7),
                hurry=hurry,
            )
        )
        while parent.attempts < 7:  # noqa: ASYNC110 - virtual time; counting attempts
            await trio.sleep(0.001)
        hurry.set()
        hurried_at, attempts = trio.current_time(), parent.attempts
        await parent.accepted.receive()  # the 9th attempt gets through
        assert parent.attempts == 9
        assert trio.current_time() - hurried_at <= 0.5 * (9 - attempts) + 0.01
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# metrics


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {"trio_sign_snapshots_total": self.calls}


async def metrics_and_states(conn: MessageStream, n: int) -> list[tuple[float, ChannelMessage]]:
    out = []
    for _ in range(n):
        message = await conn.receive()
        out.append((trio.current_time(), message))
    return out


async def test_metrics_every_interval_while_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    source = Counter()
    reporter = StatusReporter(metrics_source=source, metrics_interval_s=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(start_status(parent, reporter))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        assert await states(conn, 1) == ["booting"]
        got = await metrics_and_states(conn, 2)
        assert got == [
            (10.0, MetricsMessage(snapshot={"trio_sign_snapshots_total": 1})),
            (20.0, MetricsMessage(snapshot={"trio_sign_snapshots_total": 2})),
        ]
        reporter.set_state("serving")  # states go out at once, between snapshots
        assert await metrics_and_states(conn, 2) == [
            (20.0, StateMessage(state="serving")),
            (30.0, MetricsMessage(snapshot={"trio_sign_snapshots_total": 3})),
        ]
        assert reporter.metrics_sent == 3
        await conn.aclose()  # the parent goes away: no snapshots while disconnected
        second = await parent.accepted.receive()
        reconnected = trio.current_time()
        assert source.calls == 3
        await second.receive_expected(HelloMessage)
        assert await states(second, 1) == ["serving"]
        ((at, message),) = await metrics_and_states(second, 1)
        assert at == pytest.approx(reconnected + 10.0)
        assert message == MetricsMessage(snapshot={"trio_sign_snapshots_total": 4})
        nursery.cancel_scope.cancel()


async def test_a_metrics_source_set_late_is_sent_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        await states(conn, 1)
        await trio.sleep(25)  # no source yet: nothing to send
        reporter.metrics_source = Counter()
        assert await metrics_and_states(conn, 2) == [
            (25.0, MetricsMessage(snapshot={"trio_sign_snapshots_total": 1})),
            (35.0, MetricsMessage(snapshot={"trio_sign_snapshots_total": 2})),
        ]
        nursery.cancel_scope.cancel()


async def test_a_bad_snapshot_is_skipped_logged_once_and_never_breaks_the_channel(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    snapshots: list[Any] = [
        {"big": "x" * (MAX_METRICS_BYTES + 1)},  # over the bound
        {"bytes": b"raw"},  # not JSON-like
        RuntimeError("registry bug"),  # the source itself fails
        {"ok": 1},
    ]

    def source() -> dict[str, Any]:
        item = snapshots.pop(0)
        if isinstance(item, Exception):
            raise item
        assert isinstance(item, dict)
        return item

    parent = FakeParent()
    reporter = StatusReporter(metrics_source=source, metrics_interval_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(start_status(parent, reporter))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        await states(conn, 1)
        assert await metrics_and_states(conn, 1) == [(4.0, MetricsMessage(snapshot={"ok": 1}))]
        assert parent.attempts == 1  # the same connection throughout
        nursery.cancel_scope.cancel()
    errors = [r for r in caplog.records if r.msg.startswith("metrics snapshot not sent")]
    assert len(errors) == 1  # once per failing streak, not once per interval
    assert "snapshot" in errors[0].getMessage()


async def test_no_metrics_once_the_exit_is_requested(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    source = Counter()
    reporter = StatusReporter(metrics_source=source, metrics_interval_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(start_status(parent, reporter))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        await states(conn, 1)
        reporter.set_state("exiting")
        reporter.request_exit(0)
        assert await states(conn, 1) == ["exiting"]
        assert await conn.receive() == ExitMessage(code=0)
        await trio.sleep(5)
        assert source.calls == 0
        nursery.cancel_scope.cancel()


def test_metrics_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="metrics_interval_s"):
        StatusReporter(metrics_interval_s=0)


async def test_memory_level_shows_in_the_reason() -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        await states(conn, 1)
        reporter.set_memory_level("alarm")  # booting: no change
        reporter.set_state("serving", accounts=2)
        assert (await conn.receive_expected(StateMessage)).reason == "memory_alarm"
        reporter.set_memory_level("hard")
        assert (await conn.receive_expected(StateMessage)).reason == "memory_hard"
        reporter.set_memory_level("ok")
        message = await conn.receive_expected(StateMessage)
        assert (message.state, message.reason, message.accounts) == ("serving", None, 2)
        reporter.set_memory_level("alarm")
        assert (await conn.receive_expected(StateMessage)).reason == "memory_alarm"
        reporter.set_state("failed", reason="boom")  # an own reason wins
        assert (await conn.receive_expected(StateMessage)).reason == "boom"
        reporter.set_memory_level("ok")  # no change to a failed state's reason
        reporter.set_state("exiting")
        assert (await conn.receive_expected(StateMessage)).reason is None
        nursery.cancel_scope.cancel()


def test_set_state_refuses_bad_input() -> None:
    reporter = StatusReporter()
    with pytest.raises(ValueError, match="unknown enclave state"):
        reporter.set_state("dancing")
    with pytest.raises(ValueError, match="sha256"):
        reporter.set_state("serving", sha256="xyz")
    assert reporter.state == StateMessage(state="booting")
    reporter.set_state("failed", reason="r" * 10_000)
    assert reporter.state.reason is not None
    assert len(reporter.state.reason) == 2048


async def test_bad_backoff_settings() -> None:
    parent = FakeParent()
    with pytest.raises(ValueError, match="backoff"):
        await run_status_channel(parent.connect, backoff_initial_s=5, backoff_max_s=1)
