"""Correct behaviour as PID 1 (``unshare --pid``, or a minimal init-less image).

As PID 1 the kernel gives us no default signal actions (SIGTERM/SIGINT are handled by the
command's signal receiver) and hands us every orphaned process to reap. We start no children
ourselves, but a library or a debugging shell might; their zombies are reaped here.
"""

from __future__ import annotations

import logging
import os
import signal

import trio

log = logging.getLogger("trio_sign.enclave")


def reap_zombies() -> int:
    """Reap every exited child without blocking; returns how many were reaped."""
    reaped = 0
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


async def run_child_reaper(
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Reap children on every SIGCHLD, forever (only started when we are PID 1)."""
    with trio.open_signal_receiver(signal.SIGCHLD) as signals:
        task_status.started()
        reap_zombies()
        async for _ in signals:
            count = reap_zombies()
            if count:
                log.debug("reaped children", extra={"count": count})
