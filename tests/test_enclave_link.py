"""ParentLink: the status and log channels outlive the services, and the last words (final
state, exit code, last log lines) reach the parent however the services end."""

from __future__ import annotations

import functools
import json
import logging
import random
from typing import Any

import pytest
import trio
import trio.testing

from trio_sign.enclave import (
    EnclaveEvent,
    EnclaveState,
    LifecycleError,
    ParentLink,
)
from trio_sign.nitro import (
    ChannelClosed,
    ChannelMessage,
    DrainMessage,
    ExitMessage,
    HelloMessage,
    LogMessage,
    MessageStream,
    MetricsMessage,
    StateMessage,
)

log = logging.getLogger("trio_sign.enclave.tests")
SHA = "cd" * 32


class FakeParent:
    """Both channels' parent ends on memory streams; records what each connection received."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.status: list[list[ChannelMessage]] = []  # one list per connection
        self.logs: list[list[ChannelMessage]] = []
        self.status_streams: list[MessageStream] = []
        self.refuse = False
        self.attempts = 0

    async def _connect(self, into: list[list[ChannelMessage]]) -> trio.abc.Stream:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        if self.refuse:
            raise OSError("connection refused")
        ours, theirs = trio.testing.memory_stream_pair()
        received: list[ChannelMessage] = []
        into.append(received)
        messages = MessageStream(theirs)
        if into is self.status:
            self.status_streams.append(messages)
        self._nursery.start_soon(self._read, messages, received)
        return ours

    async def _read(self, messages: MessageStream, into: list[ChannelMessage]) -> None:
        while True:
            try:
                into.append(await messages.receive())
            except (ChannelClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def connect_status(self) -> trio.abc.Stream:
        return await self._connect(self.status)

    async def connect_logs(self) -> trio.abc.Stream:
        return await self._connect(self.logs)

    def link(self, **kwargs: Any) -> ParentLink:
        return ParentLink(self.connect_status, self.connect_logs, rng=random.Random(5), **kwargs)

    def all_status(self) -> list[ChannelMessage]:
        return [m for conn in self.status for m in conn]

    def log_messages(self) -> list[str]:
        return [
            json.loads(m.line)["msg"]
            for conn in self.logs
            for m in conn
            if isinstance(m, LogMessage)
        ]


async def run_services_that_fail(link: ParentLink) -> None:
    async with trio.open_nursery() as services:
        link.advance(EnclaveEvent.PRELOAD)
        link.advance(EnclaveEvent.READY, accounts=2, sha256=SHA, preload_ms=7)

        async def reaper() -> None:
            await trio.sleep(30)
            raise RuntimeError("reaper bug")

        services.start_soon(reaper)
        services.start_soon(trio.sleep_forever)


async def test_a_failing_service_is_reported_with_state_exit_code_and_last_log_lines(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The services' nursery dies of a bug; the link, in the nursery around it, is still up
    on the same connections to say ``failed``, the reason, the exit code and the last lines."""
    async with trio.open_nursery() as parent_side:
        parent = FakeParent(parent_side)
        link = parent.link()
        async with trio.open_nursery() as outer:
            await outer.start(link.run)
            with pytest.raises(ExceptionGroup):
                await run_services_that_fail(link)
            assert link.state is EnclaveState.SERVING  # nothing moved it: close() does
            log.error("enclave failed", extra={"reason": "internal"})
            assert await link.close(1, reason="internal")
            assert link.lifecycle.history == [
                EnclaveState.BOOTING,
                EnclaveState.PRELOADING,
                EnclaveState.SERVING,
                EnclaveState.FAILED,
                EnclaveState.EXITED,
            ]
        await trio.testing.wait_all_tasks_blocked()
        parent_side.cancel_scope.cancel()
    assert trio.current_time() == pytest.approx(30)  # nothing waited on a timeout
    assert parent.attempts == 2  # one status and one log connection: they outlived the services
    (status,) = parent.status
    assert status[0] == HelloMessage(channel="status")
    assert status[-2:] == [
        StateMessage(state="failed", reason="internal", accounts=2, sha256=SHA, preload_ms=7),
        ExitMessage(code=1),
    ]
    assert StateMessage(state="serving", accounts=2, sha256=SHA, preload_ms=7) in status
    assert parent.log_messages()[-1] == "enclave failed"
    assert link.log_handler is not None
    assert link.log_handler not in logging.getLogger("trio_sign").handlers  # detached


async def test_the_last_words_survive_an_outside_cancellation(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever cancels the process's tree (a KeyboardInterrupt, a test), the channels are
    shielded until close() has said ``exiting`` and ``exit(0)``."""
    async with trio.open_nursery() as parent_side:
        parent = FakeParent(parent_side)
        link = parent.link()
        caplog.set_level(logging.INFO, "trio_sign")
        with trio.CancelScope() as everything:
            async with trio.open_nursery() as outer:
                await outer.start(link.run)
                try:
                    link.advance(EnclaveEvent.PRELOAD)
                    everything.cancel()
                    await trio.sleep_forever()
                finally:
                    log.info("enclave stopped; shares zeroed")
                    assert await link.close(0)
        assert everything.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        parent_side.cancel_scope.cancel()
    assert link.state is EnclaveState.EXITED
    assert parent.all_status()[-2:] == [StateMessage(state="exiting"), ExitMessage(code=0)]
    assert parent.log_messages()[-1] == "enclave stopped; shares zeroed"


async def test_close_is_bounded_when_the_parent_is_away_and_skips_the_log_flush(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as parent_side:
        parent = FakeParent(parent_side)
        parent.refuse = True
        link = parent.link(final_report_timeout_s=2.0)
        async with trio.open_nursery() as outer:
            await outer.start(link.run)
            log.error("enclave failed")
            start = trio.current_time()
            assert not await link.close(3, reason="tampered")
            # the status step only: without the exit frame through, the logs are not awaited
            assert trio.current_time() - start == pytest.approx(2.0)
        parent_side.cancel_scope.cancel()
    assert link.state is EnclaveState.EXITED
    assert link.reporter.state == StateMessage(state="failed", reason="tampered")
    assert link.log_handler is not None
    assert link.log_handler.buffered >= 1  # kept, never sent


async def test_the_last_words_reconnect_quickly_when_the_parent_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A long back-off (the parent was away for minutes) is cut short by close(): the exit
    frame is delivered within final_report_timeout_s of the parent coming back."""
    async with trio.open_nursery() as parent_side:
        parent = FakeParent(parent_side)
        parent.refuse = True
        link = parent.link(final_report_timeout_s=3.0, backoff_initial_s=0.5, backoff_max_s=300)
        async with trio.open_nursery() as outer:
            await outer.start(link.run)
            await trio.sleep(600)  # ceilings now far above the 3 s the last words have
            parent.refuse = False
            start = trio.current_time()
            assert await link.close(5, reason="memory")
            assert trio.current_time() - start <= 0.5 + 0.01
        await trio.testing.wait_all_tasks_blocked()
        parent_side.cancel_scope.cancel()
    assert parent.all_status()[-2:] == [
        StateMessage(state="failed", reason="memory"),
        ExitMessage(code=5),
    ]


async def test_metrics_snapshots_while_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    snapshots = iter(range(1, 100))
    async with trio.open_nursery() as parent_side:
        parent = FakeParent(parent_side)
        link = parent.link()  # the default interval: 10 s
        async with trio.open_nursery() as outer:
            await outer.start(link.run)
            link.advance(EnclaveEvent.PRELOAD)
            link.advance(EnclaveEvent.READY, accounts=1)
            await trio.sleep(15)
            assert link.reporter.metrics_sent == 0  # no source yet
            link.metrics_source = lambda: {"sessions_total": next(snapshots)}
            await trio.sleep(21)  # at once (late source), then at 25 s and 35 s
            await link.close(0)
        await trio.testing.wait_all_tasks_blocked()
        parent_side.cancel_scope.cancel()
    metrics = [m for m in parent.all_status() if isinstance(m, MetricsMessage)]
    assert metrics == [MetricsMessage(snapshot={"sessions_total": n}) for n in (1, 2, 3)]
    assert parent.all_status()[-1] == ExitMessage(code=0)


async def test_a_drain_from_the_parent_is_seen_and_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as parent_side:
        parent = FakeParent(parent_side)
        link = parent.link()
        async with trio.open_nursery() as outer:
            await outer.start(link.run)
            link.advance(EnclaveEvent.PRELOAD)
            link.advance(EnclaveEvent.READY)
            await link.reporter.wait_connected()
            await parent.status_streams[0].send(DrainMessage())
            await link.drain_requested.wait()
            assert link.advance(EnclaveEvent.DRAIN) is EnclaveState.DRAINING
            await trio.testing.wait_all_tasks_blocked()  # else "draining" may be coalesced
            await link.close(0)
        await trio.testing.wait_all_tasks_blocked()
        parent_side.cancel_scope.cancel()
    states = [m.state for m in parent.all_status() if isinstance(m, StateMessage)]
    assert states[-2:] == ["draining", "exiting"]


async def test_moves_that_are_not_the_callers_to_make() -> None:
    link = ParentLink(None, None)
    for event in (EnclaveEvent.STOP, EnclaveEvent.FAIL, EnclaveEvent.EXIT):
        with pytest.raises(ValueError, match="close"):
            link.advance(event)
    with pytest.raises(LifecycleError):
        link.advance(EnclaveEvent.DRAIN)  # booting: nothing to drain
    assert link.state is EnclaveState.BOOTING
    assert link.reporter.state == StateMessage(state="booting")


async def test_without_channels_it_keeps_the_lifecycle_only() -> None:
    link = ParentLink(None, None)
    assert link.log_handler is None
    async with trio.open_nursery() as outer:
        assert await outer.start(link.run) is link
        link.advance(EnclaveEvent.PRELOAD)
        assert not await link.close(4, reason="timeout")
    assert link.closed
    assert link.lifecycle.history[-2:] == [EnclaveState.FAILED, EnclaveState.EXITED]
    assert repr(link) == "<ParentLink exited>"


async def test_close_is_idempotent_and_run_runs_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as parent_side:
        parent = FakeParent(parent_side)
        link = parent.link()
        async with trio.open_nursery() as outer:
            await outer.start(link.run)
            with pytest.raises(RuntimeError, match="once"):
                await link.run()
            assert await link.close(0)
            assert await link.close(1, reason="ignored")  # the first call's result
        await trio.testing.wait_all_tasks_blocked()
        parent_side.cancel_scope.cancel()
    exits = [m for m in parent.all_status() if isinstance(m, ExitMessage)]
    assert exits == [ExitMessage(code=0)]


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="final_report_timeout_s"):
        ParentLink(None, None, final_report_timeout_s=0)
    with pytest.raises(ValueError, match="backoff"):
        ParentLink(None, None, backoff_initial_s=5, backoff_max_s=1)
    with pytest.raises(ValueError, match="metrics_interval_s"):
        ParentLink(None, None, metrics_interval_s=-1)


async def test_from_config_uses_the_configured_addresses(tmp_path: Any) -> None:
    from trio_sign.enclave import EnclaveConfig

    config = EnclaveConfig(
        status_address=f"unix://{tmp_path}/status.sock",
        log_address=f"unix://{tmp_path}/logs.sock",
        final_report_timeout_s=0.25,
    )
    link = ParentLink.from_config(config, metrics_source=dict)
    assert link.final_report_timeout_s == 0.25
    assert link.metrics_source is dict
    assert link.log_handler is not None
    async with trio.open_nursery() as outer:
        await outer.start(functools.partial(link.run))
        assert not await link.close(0)  # nobody listens there: bounded, not raised
