"""Bulk connection work spread over the scheduler's passes (DESIGN §16).

Trio runs every task that became runnable in one pass ("batch") before it polls for I/O
again, so a task woken at the same moment as a thousand others waits for all of them. When
1500 connections arrive at once, each connection's setup (a peek, a socket to the enclave, a
nursery and its pumps) lands in the same few passes: the parent's ingress ran passes of
0.2 - 0.5 s with 1000 - 2400 task steps, and a legitimate call already forwarded on a warm
connection waited that long for its turn to move its bytes, although the loop was idle a
quarter of the time.

`BatchPacer` bounds that: at most ``per_batch`` callers of :meth:`BatchPacer.turn` go on per
pass; the others wait, newest first (a client arriving during a burst is not queued behind
it; the stale ones are an attacker's, and the caller's own deadlines end them). It adapts to
load by itself: on an idle loop passes are short and turns come fast; on a busy one, setup
work takes a bounded share of each pass.
"""

from __future__ import annotations

import trio
import trio.lowlevel


class BatchPacer:
    """At most ``per_batch`` :meth:`turn` calls return per scheduler pass; run :meth:`run` in
    a nursery beside the callers.

    Attributes:
        paced: turns that had to wait for a later pass (counters only grow).
    """

    def __init__(self, per_batch: int) -> None:
        if per_batch < 1:
            raise ValueError("per_batch must be >= 1")
        self._per_batch = per_batch
        self._budget = per_batch
        self._waiting: dict[trio.Event, None] = {}  # insertion order: newest last
        self._kick = trio.Event()
        self._running = False
        self.paced = 0

    @property
    def waiting(self) -> int:
        """Callers waiting for a turn now."""
        return len(self._waiting)

    async def turn(self) -> None:
        """Return once this caller may do its bulk work in the current pass (at once while
        :meth:`run` is not running: nothing would hand out later turns).

        Cancellation: a waiting caller leaves the queue (its turn goes to the next).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._running:
            return
        if self._budget > 0 and not self._waiting:
            self._budget -= 1
            self._kick.set()
            return
        self.paced += 1
        granted = trio.Event()
        self._waiting[granted] = None
        self._kick.set()
        try:
            await granted.wait()
        finally:
            self._waiting.pop(granted, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Give each pass its budget, handing turns to the newest waiters; sleeps while no
        one waits and the budget is whole.

        Cancellation: stops pacing; every waiting caller gets its turn at once, and later
        ones do not wait.
        """
        self._running = True
        task_status.started()
        try:
            while True:
                self._budget = self._per_batch
                while self._budget > 0 and self._waiting:
                    newest = next(reversed(self._waiting))
                    del self._waiting[newest]
                    newest.set()
                    self._budget -= 1
                if self._waiting or self._budget < self._per_batch:
                    # Turns were used in this pass: a fresh budget in the next one.
                    await trio.lowlevel.checkpoint()
                else:
                    await self._kick.wait()
                    self._kick = trio.Event()
        finally:
            self._running = False
            for granted in self._waiting:
                granted.set()
            self._waiting.clear()


__all__ = ["BatchPacer"]
