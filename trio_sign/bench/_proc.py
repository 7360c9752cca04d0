"""What the benchmarks read about their child processes (from /proc) and how they stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (0.0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int, *, missing: float = 0.0) -> float:
    """User + system CPU time of process ``pid`` (all its threads); ``missing`` if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return missing
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def stop_child(proc: subprocess.Popen[str], grace_s: float = 5.0) -> None:
    """End a child we started, by its pid: SIGTERM, then SIGKILL after ``grace_s``; close
    the pipes we hold to it."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit (like Ctrl-C raises KeyboardInterrupt), so the ``finally``
    blocks stop the child processes instead of leaving them behind."""

    def exit_now(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
