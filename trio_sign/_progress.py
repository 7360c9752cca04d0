"""Progress display for long work: a single self-rewriting line on a terminal, silence otherwise.

Non-terminal runs (CI, systemd, pipes) get the final numbers from the caller's log record
instead of hundreds of progress lines.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call it with ``(done, total)``; redraws at most ``hz`` times a second on a TTY."""

    def __init__(
        self, label: str, *, stream: TextIO | None = None, hz: float = 8.0, force: bool = False
    ) -> None:
        self._label = label
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = force or self._stream.isatty()
        self._interval = 1.0 / hz
        self._start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last < self._interval and (total is None or done < total):
            return
        self._last = now
        elapsed = now - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        if total:
            pct = 100.0 * done / total
            eta = (total - done) / rate if rate > 0 else 0.0
            text = f"{self._label}: {pct:5.1f}% ({done:,}/{total:,}) {rate:,.0f}/s eta {eta:.0f}s"
        else:
            text = f"{self._label}: {done:,} {rate:,.0f}/s"
        self._stream.write("\r\x1b[2K" + text)
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the progress line (idempotent)."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
