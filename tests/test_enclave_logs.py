"""The log channel: bounded, never-blocking handler; lines, drop reports, reconnects, threads."""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from trio_sign.enclave._logchannel import (
    ChannelLogHandler,
    attach_log_handler,
    detach_log_handler,
    run_log_channel,
)
from trio_sign.nitro import (
    ChannelClosed,
    DroppedMessage,
    HelloMessage,
    LogMessage,
    MessageStream,
)

LOGGER = "trio_sign.tests.logchannel"


class FakeParent:
    def __init__(self, *, lockstep: bool = False) -> None:
        self._send, self.accepted = trio.open_memory_channel[MessageStream](100)
        self.attempts = 0
        self.lockstep = lockstep
        self.refuse = False

    async def connect(self) -> trio.abc.Stream:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        if self.refuse:
            raise OSError("connection refused")
        pair = (
            trio.testing.lockstep_stream_pair if self.lockstep else trio.testing.memory_stream_pair
        )
        a, b = pair()
        self._send.send_nowait(MessageStream(b))
        return a


@pytest.fixture
def logger() -> logging.Logger:
    # Not registered with logging.getLogger: pytest's capture handlers stay off it (the
    # 100,000-line test must measure our handler only).
    logger = logging.Logger(LOGGER, logging.DEBUG)
    logger.propagate = False
    return logger


def make_handler(logger: logging.Logger, **kwargs: Any) -> ChannelLogHandler:
    handler = ChannelLogHandler(**kwargs)
    attach_log_handler(handler, logger)
    attach_log_handler(handler, logger)  # idempotent
    assert logger.handlers == [handler]
    return handler


def start_logs(parent: FakeParent, handler: ChannelLogHandler) -> Callable[..., Awaitable[object]]:
    return functools.partial(run_log_channel, parent.connect, handler, rng=random.Random(3))


async def receive_lines(conn: MessageStream, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        message = await conn.receive_expected(LogMessage)
        out.append(json.loads(message.line))
    return out


async def receive_until_closed(conn: MessageStream) -> list[LogMessage]:
    received = []
    while True:
        try:
            received.append(await conn.receive_expected(LogMessage))
        except ChannelClosed:
            return received


async def test_lines_arrive_as_json(logger: logging.Logger) -> None:
    handler = make_handler(logger)
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        assert await nursery.start(start_logs(parent, handler)) is handler
        conn = await parent.accepted.receive()
        assert await conn.receive() == HelloMessage(channel="logs")
        logger.info("session %s opened", "s-1", extra={"account_id": "acct-7"})
        logger.warning("pool at %d%%", 93)
        first, second = await receive_lines(conn, 2)
        assert first["msg"] == "session s-1 opened"
        assert first["level"] == "INFO"
        assert first["logger"] == LOGGER
        assert first["account_id"] == "acct-7"
        assert second["msg"] == "pool at 93%"
        assert handler.buffered == 0
        nursery.cancel_scope.cancel()
    detach_log_handler(handler, logger)
    detach_log_handler(handler, logger)
    assert logger.handlers == []


async def test_secret_fields_are_redacted(logger: logging.Logger) -> None:
    handler = make_handler(logger)
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        logger.info("loaded", extra={"signing_share": "abcd", "data_key_hex": "beef"})
        message = await conn.receive_expected(LogMessage)
        assert "abcd" not in message.line
        assert "beef" not in message.line
        fields = json.loads(message.line)
        assert fields["signing_share"] == "<redacted>"
        assert fields["data_key_hex"] == "<redacted>"
        nursery.cancel_scope.cancel()


async def test_overflow_drops_new_lines_and_reports_the_exact_count(
    logger: logging.Logger,
) -> None:
    handler = make_handler(logger, capacity=5)
    for i in range(12):  # no channel yet: buffered up to the bound, the rest counted
        logger.info("line %d", i)
    assert handler.buffered == 5
    assert handler.dropped_total == 7
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        lines = await receive_lines(conn, 5)
        assert [line["msg"] for line in lines] == [f"line {i}" for i in range(5)]
        assert await conn.receive() == DroppedMessage(count=7)
        logger.info("after")
        (after,) = await receive_lines(conn, 1)  # no further dropped() frame before it
        assert after["msg"] == "after"
        assert handler.dropped_total == 7
        nursery.cancel_scope.cancel()


async def test_a_parent_that_never_reads_does_not_block_emit(logger: logging.Logger) -> None:
    handler = make_handler(logger, capacity=10)
    parent = FakeParent(lockstep=True)  # send_all blocks until the parent reads: it never does
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        logger.info("first")
        await trio.testing.wait_all_tasks_blocked()  # the sender is stuck writing "first"
        started = time.perf_counter()
        for i in range(100_000):
            logger.info("line %d", i)
        elapsed = time.perf_counter() - started
        assert handler.buffered <= 10
        assert handler._chars <= 10 * 200
        assert handler.dropped_total >= 100_000 - 10
        assert handler.buffered + handler.dropped_total == 100_001
        assert elapsed < 5.0
        nursery.cancel_scope.cancel()


async def test_reconnect_resends_buffered_lines(
    logger: logging.Logger, autojump_clock: trio.testing.MockClock
) -> None:
    handler = make_handler(logger, capacity=100)
    parent = FakeParent(lockstep=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        first = await parent.accepted.receive()
        await first.receive_expected(HelloMessage)
        for i in range(3):
            logger.info("line %d", i)
        await trio.testing.wait_all_tasks_blocked()  # the batch is being written...
        await first.aclose()  # ...when the parent goes away
        for i in range(3, 5):
            logger.info("line %d", i)  # buffered while the channel is down
        parent.lockstep = False
        second = await parent.accepted.receive()
        assert trio.current_time() <= 0.5
        await second.receive_expected(HelloMessage)
        lines = await receive_lines(second, 5)
        assert [line["msg"] for line in lines] == [f"line {i}" for i in range(5)]
        assert handler.buffered == 0
        assert handler.dropped_total == 0
        nursery.cancel_scope.cancel()


async def test_emit_from_worker_threads_wakes_the_sender(logger: logging.Logger) -> None:
    handler = make_handler(logger)
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        await trio.testing.wait_all_tasks_blocked()  # the sender is parked, waiting for lines

        def worker(n: int) -> None:
            for i in range(50):
                logger.info(
                    "worker %d line %d", n, i, extra={"worker_thread": threading.get_ident()}
                )

        async with trio.open_nursery() as workers:
            for n in range(4):
                workers.start_soon(functools.partial(trio.to_thread.run_sync, worker, n))
        lines = await receive_lines(conn, 200)
        for n in range(4):  # each thread's lines in its order
            mine = [line["msg"] for line in lines if line["msg"].startswith(f"worker {n} ")]
            assert mine == [f"worker {n} line {i}" for i in range(50)]
        nursery.cancel_scope.cancel()


async def test_emit_never_raises_and_bounds_line_length(
    logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", True)
    handler = make_handler(logger, max_line_chars=1000)
    logger.info("%d apples", "not a number")  # formatting fails: counted as dropped
    assert handler.dropped_total == 1
    logger.info("x" * 5000)
    logger.info("bad name \udcff")  # a lone surrogate, as from an undecodable file name
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        long, surrogate = await receive_lines(conn, 2)
        assert await conn.receive() == DroppedMessage(count=1)
        assert long["msg"] == "x" * 125
        assert long["truncated_chars"] > 5000
        # Sent as valid UTF-8 (a JSON \\u escape); the parent's JSON parser gets it back.
        assert surrogate["msg"] == "bad name \udcff"
        nursery.cancel_scope.cancel()


async def test_cancelling_the_channel_closes_the_stream_and_keeps_lines(
    logger: logging.Logger,
) -> None:
    handler = make_handler(logger)
    parent = FakeParent(lockstep=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        logger.info("unsent")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # A lockstep stream may still hand over the cancelled write's bytes; then it is closed.
    assert len(await receive_until_closed(conn)) <= 1
    assert handler.buffered == 1  # not known to be written: kept for the next connection


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ChannelLogHandler(capacity=0)
    with pytest.raises(ValueError, match="max_line_chars"):
        ChannelLogHandler(max_line_chars=10**7)


async def test_wait_flushed_with_the_channel_running_waits_for_it(
    logger: logging.Logger,
) -> None:
    handler = make_handler(logger)
    parent = FakeParent()
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        conn = await parent.accepted.receive()
        await conn.receive_expected(HelloMessage)
        for i in range(3):
            logger.info("line %d", i)
        assert not handler.empty
        assert await handler.wait_flushed()
        assert handler.empty
        assert handler.buffered == 0
        assert len(await receive_lines(conn, 3)) == 3
        assert parent.attempts == 1
        nursery.cancel_scope.cancel()


async def test_wait_flushed_is_bounded_by_the_caller_and_ends_with_the_sender(
    logger: logging.Logger, autojump_clock: trio.testing.MockClock
) -> None:
    handler = make_handler(logger)
    logger.info("nobody hears this")
    assert not await handler.wait_flushed()  # run_log_channel never ran: nothing to wait for
    assert trio.current_time() == 0
    parent = FakeParent()
    parent.refuse = True
    async with trio.open_nursery() as nursery:
        await nursery.start(start_logs(parent, handler))
        with trio.move_on_after(2.0):
            await handler.wait_flushed()
        assert trio.current_time() == pytest.approx(2.0)
        nursery.start_soon(handler.wait_flushed)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # the sender is gone: the waiter returns (no hang)
    assert not handler.empty
    assert handler.buffered >= 1
