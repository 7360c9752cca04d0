"""Progress display for long work: a single self-rewriting line on a terminal, silence otherwise.

Non-terminal runs (CI, systemd, pipes) get the final numbers from the caller's log record
instead of hundreds of progress lines.

A progress line and log records share stderr. So that a log record never lands in the middle
of a progress line (or is overwritten by its next redraw), every drawn line is registered
here, and the log handler (:mod:`trio_sign._logging`) writes each record inside
:func:`progress_paused`: the line is erased, the record written, the line drawn again below it.
Use :class:`Progress` for counted work (``progress(done, total)``) and
:meth:`Progress.status` for a free-text state line ("waiting for readiness ..."); call
:meth:`Progress.close` (or use it as a context manager) when the work ends.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TextIO

_ERASE = "\r\x1b[2K"

# One lock for every drawn line and every log record written beside one: records come from
# worker threads (trio.to_thread) as well as from the main thread.
_lock = threading.RLock()
_drawn: dict[int, str] = {}  # id(stream) -> the text of the line drawn on it now


@contextmanager
def progress_paused(stream: TextIO) -> Iterator[None]:
    """Erase the progress line drawn on ``stream`` (if any) for the duration of the block, and
    draw it again afterwards: write other lines to ``stream`` inside this block."""
    with _lock:
        text = _drawn.get(id(stream))
        if text is not None:
            stream.write(_ERASE)
        try:
            yield
        finally:
            if text is not None:
                stream.write(_ERASE + text)
                stream.flush()


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
        self._draw(text)

    def status(self, text: str) -> None:
        """Show ``text`` after the label as the line's whole content (not rate limited)."""
        if self._enabled:
            self._draw(f"{self._label}: {text}")

    def _draw(self, text: str) -> None:
        with _lock:
            self._stream.write(_ERASE + text)
            self._stream.flush()
            _drawn[id(self._stream)] = text
            self._drawn = True

    def close(self) -> None:
        """End the progress line (idempotent); later output starts on a line of its own."""
        with _lock:
            if self._drawn:
                _drawn.pop(id(self._stream), None)
                self._stream.write("\n")
                self._stream.flush()
                self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
