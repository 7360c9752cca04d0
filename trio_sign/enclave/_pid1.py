"""Correct behaviour as PID 1 (``unshare --pid``, or a minimal init-less image).

As PID 1 the kernel gives us no default signal actions (SIGTERM/SIGINT are handled by the
command's signal receiver) and hands us every orphaned process to reap. We start no children
ourselves, but a library or a debugging shell might; their zombies are reaped here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import struct

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


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")


def bring_up_loopback() -> bool | None:
    """Set ``lo`` up if it is down (a fresh enclave or network namespace starts with it down).

    Returns True if it was brought up, False if it already was, None if not permitted or not
    possible here (best effort: nothing in the enclave needs ``lo``, but libraries may).
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            result = fcntl.ioctl(sock, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
            flags = _IFREQ.unpack(result)[1]
            if flags & _IFF_UP:
                return False
            fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))
            return True
    except OSError as exc:
        log.debug("cannot bring lo up", extra={"error": str(exc)})
        return None
