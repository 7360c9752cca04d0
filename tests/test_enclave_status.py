"""The status channel: state reporting, coalescing, reconnects and the final report."""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from trio_sign.enclave._status import (
    StatusReporter,
    report_final,
    run_status_channel,
)
from trio_sign.nitro import (
    ChannelClosed,
    ChannelMessage,
    ExitMessage,
    HelloMessage,
    MessageStream,
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


async def test_report_final_delivers_state_and_exit(
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
        delivered = await report_final(
            reporter, "failed", code=3, reason="preload: wrong key", timeout_s=2.0
        )
        assert delivered
        assert reporter.exit_delivered
        assert trio.current_time() < 0.001
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert received == [
        HelloMessage(channel="status"),
        StateMessage(state="booting"),
        StateMessage(state="failed", reason="preload: wrong key"),
        ExitMessage(code=3),
    ]


async def test_report_final_is_shielded_and_works_after_the_channel_task_is_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        first = await parent.accepted.receive()
        await first.receive_expected(HelloMessage)
        await states(first, 1)
        nursery.cancel_scope.cancel()  # the whole tree is being torn down
    with trio.CancelScope() as scope:
        scope.cancel()  # report_final runs inside a cancelled scope
        delivered = await report_final(reporter, "exiting", code=0, timeout_s=1.0)
    assert delivered
    second = await parent.accepted.receive()
    await second.receive_expected(HelloMessage)
    assert await states(second, 1) == ["exiting"]
    assert await second.receive() == ExitMessage(code=0)
    with pytest.raises(ChannelClosed):
        await second.receive()


async def test_report_final_gives_up_after_the_timeout_when_the_channel_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    parent.fail = 10**6
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        start = trio.current_time()
        delivered = await report_final(reporter, "failed", code=1, reason="x", timeout_s=2.5)
        assert not delivered
        assert trio.current_time() - start == pytest.approx(2.5)
        nursery.cancel_scope.cancel()
    # Without the channel task it retries on its own connections, still bounded.
    start = trio.current_time()
    assert not await report_final(reporter, "failed", code=1, timeout_s=1.5, retry_s=0.1)
    assert trio.current_time() - start == pytest.approx(1.5)
    # Never connected at all: just records the state.
    lonely = StatusReporter()
    assert not await report_final(lonely, "exiting", code=0, timeout_s=5)
    assert lonely.state.state == "exiting"


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


async def test_a_second_report_final_is_delivered_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        reporter: StatusReporter = await nursery.start(start_status(parent))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        await states(conn, 1)
        assert await report_final(reporter, "failed", code=2, reason="boom", timeout_s=1)
        assert await report_final(reporter, "exiting", code=2, timeout_s=1)
        got = [await conn.receive() for _ in range(4)]
        assert got == [
            StateMessage(state="failed", reason="boom"),
            ExitMessage(code=2),
            StateMessage(state="exiting"),
            ExitMessage(code=2),
        ]
        nursery.cancel_scope.cancel()
