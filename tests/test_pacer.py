"""`BatchPacer` (DESIGN §16): at most ``per_batch`` turns per pass of the scheduler, the
newest waiter first, cancellation leaving the queue, and no spinning while idle."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_sign.transport._pacer import BatchPacer


class PassCounter(trio.abc.Instrument):
    """Numbers the scheduler's passes (one per I/O wait)."""

    def __init__(self) -> None:
        self.passes = 0
        self.steps = 0

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


def _renewed_by_nobody(pacer: BatchPacer) -> None:
    """As if run() were running but its task had not had its turn yet: turns queue up."""
    pacer._running = True


async def test_at_most_per_batch_turns_per_pass() -> None:
    counter = PassCounter()
    trio.lowlevel.add_instrument(counter)
    pacer = BatchPacer(4)
    passed: list[int] = []

    async def worker() -> None:
        await pacer.turn()
        passed.append(counter.passes)

    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.run)
        async with trio.open_nursery() as workers:
            for _ in range(100):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    trio.lowlevel.remove_instrument(counter)
    assert len(passed) == 100
    per_pass: dict[int, int] = {}
    for p in passed:
        per_pass[p] = per_pass.get(p, 0) + 1
    # the budget is renewed once per pass; granted waiters run in the next pass, beside at
    # most one more budget's worth of callers that found it unused
    assert max(per_pass.values()) <= 2 * 4
    assert len(per_pass) >= 100 // 8
    assert pacer.paced > 0


async def test_the_newest_waiter_goes_first() -> None:
    pacer = BatchPacer(1)
    order: list[int] = []

    async def worker(i: int) -> None:
        await pacer.turn()
        order.append(i)

    async with trio.open_nursery() as nursery:
        _renewed_by_nobody(pacer)
        await pacer.turn()  # the budget is spent, and nobody renews it until run() starts
        for i in range(5):
            nursery.start_soon(worker, i)
            await trio.testing.wait_all_tasks_blocked()
        assert pacer.waiting == 5
        await nursery.start(pacer.run)
        while len(order) < 5:
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert order == [4, 3, 2, 1, 0]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    pacer = BatchPacer(1)
    got: list[str] = []

    async def worker(name: str, scope: trio.CancelScope | None = None) -> None:
        if scope is None:
            await pacer.turn()
            got.append(name)
            return
        with scope:
            await pacer.turn()
            got.append(name)

    async with trio.open_nursery() as nursery:
        _renewed_by_nobody(pacer)
        await pacer.turn()
        cancelled = trio.CancelScope()
        nursery.start_soon(worker, "kept")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(worker, "cancelled", cancelled)
        await trio.testing.wait_all_tasks_blocked()
        assert pacer.waiting == 2
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert pacer.waiting == 1
        await nursery.start(pacer.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert got == ["kept"]


async def test_idle_pacer_sleeps(autojump_clock: trio.testing.MockClock) -> None:
    counter = PassCounter()
    pacer = BatchPacer(2)
    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.run)
        for _ in range(5):
            await pacer.turn()
        await trio.sleep(1)
        trio.lowlevel.add_instrument(counter)
        await trio.sleep(3600)  # the clock jumps only if nothing spins
        trio.lowlevel.remove_instrument(counter)
        nursery.cancel_scope.cancel()
    assert counter.steps <= 3


async def test_without_run_turns_are_not_paced_and_stopping_frees_the_waiters() -> None:
    pacer = BatchPacer(1)
    for _ in range(5):  # nothing would renew the budget: turns do not wait
        await pacer.turn()
    got: list[int] = []

    async def worker(i: int) -> None:
        await pacer.turn()
        got.append(i)

    async with trio.open_nursery() as nursery:
        _renewed_by_nobody(pacer)
        pacer._budget = 0
        for i in range(3):
            nursery.start_soon(worker, i)
        await trio.testing.wait_all_tasks_blocked()
        assert pacer.waiting == 3
        with trio.CancelScope() as stopped:
            stopped.cancel()  # run() starts and stops at once: nobody is left waiting
            await pacer.run()
    assert sorted(got) == [0, 1, 2]
    assert pacer.waiting == 0
    await pacer.turn()  # and later turns do not wait


def test_per_batch_is_checked() -> None:
    with pytest.raises(ValueError, match="per_batch"):
        BatchPacer(0)
