"""A development profiler a process turns on and off by signal, for the time that matters.

``scripts/bench --hostile --hostile-profile`` needs to know where the enclave's and the
parent's event loops spend the first seconds of an attack. py-spy cannot attach to the local
enclave (it runs in its own pid namespace), and a profile of the whole run is dominated by boot.
So a server process started with ``TRIO_SIGN_PROFILE_DIR`` set installs a ``SIGUSR1`` handler:
the first signal starts pyinstrument (wall-clock samples of the main thread; not with
``TRIO_SIGN_PROFILE_MODE=passes``), the next writes
the text report to ``<dir>/<role>-<pid>-<n>.txt`` and stops, and so on. Beside the samples
the report has the event loop's batches over the same time (`BatchRecorder`): how long the
longest ran and how many task steps they held, which is the delay every task woke in them saw
(a loop that is not busy on average can still make one connection wait behind a thousand).

Development only: on Nitro the enclave's environment is the image's own (the parent cannot set
it), and reports hold function names and line numbers, never a value.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any, Final

import trio

log = logging.getLogger("trio_sign.profile")

ENV: Final = "TRIO_SIGN_PROFILE_DIR"
#: ``passes``: record the loop's passes only, no samples (a profile of what the loop does
#: doubles its CPU; its passes are what a waiting call sees).
MODE_ENV: Final = "TRIO_SIGN_PROFILE_MODE"
SIGNAL: Final = signal.SIGUSR1
INTERVAL_S: Final = 0.0005


class BatchRecorder(trio.abc.Instrument):
    """Durations of the event loop's batches (from one I/O wait's end to the next one's
    start) and the task steps in each, while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.started = 0.0
        self._steps = 0
        self._t = 0.0
        self.batches: list[tuple[float, float, int]] = []  # (start, seconds, steps)
        # The garbage collector's pauses in the same time: (start, seconds, generation).
        self.collections: list[tuple[float, float, int]] = []
        self._gc_t = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._gc_t = time.perf_counter()
        elif self._gc_t:
            now = time.perf_counter()
            self.collections.append((self._gc_t, now - self._gc_t, info["generation"]))
            self._gc_t = 0.0

    def after_io_wait(self, timeout: float) -> None:
        if self.on:
            self._t = time.perf_counter()
            self._steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._steps += 1

    def before_io_wait(self, timeout: float) -> None:
        if self.on and self._t:
            now = time.perf_counter()
            self.batches.append((self._t, now - self._t, self._steps))

    def report(self) -> str:
        if not self.batches:
            return "loop batches: none recorded\n"
        t0 = self.batches[0][0]
        ordered = sorted(self.batches, key=lambda b: b[1])
        total = sum(b[1] for b in self.batches)
        p99 = ordered[int(0.99 * (len(ordered) - 1))][1]
        lines = [
            f"loop batches: {len(self.batches)}, busy {total:.3f} s; longest "
            f"{ordered[-1][1] * 1000:.1f} ms; p99 {p99 * 1000:.1f} ms",
            "longest batches (offset s, ms, task steps):",
        ]
        for start, seconds, steps in sorted(ordered[-15:]):
            lines.append(f"  {start - t0:7.3f}  {seconds * 1000:7.1f}  {steps}")
        pauses = sorted(self.collections, key=lambda c: c[1])
        by_gen = {g: sum(1 for c in pauses if c[2] == g) for g in (0, 1, 2)}
        lines.append(
            f"gc collections: {len(pauses)} (by generation {by_gen}), "
            f"{sum(c[1] for c in pauses) * 1000:.1f} ms in all; longest (offset s, ms, gen):"
        )
        for start, seconds, generation in sorted(pauses[-5:]):
            lines.append(f"  {start - t0:7.3f}  {seconds * 1000:7.1f}  {generation}")
        return "\n".join(lines) + "\n"


def install_profile_toggle(role: str) -> list[trio.abc.Instrument]:
    """With ``TRIO_SIGN_PROFILE_DIR`` set, let ``SIGUSR1`` start and stop a profile of this
    process; returns the instruments to pass to ``trio.run`` (none when not asked). Call from
    the main thread before ``trio.run``."""
    where = os.environ.get(ENV)
    if not where:
        return []
    try:
        from pyinstrument import Profiler
    except ImportError:  # a test dependency, absent from the enclave image
        log.warning("%s is set but pyinstrument is not installed; no profiling", ENV)
        return []
    out = Path(where)
    batches = BatchRecorder()
    state: dict[str, Any] = {"profiler": None, "n": 0, "started": 0.0}

    # Samples cost every call a hook (CPU time roughly doubles); the passes alone are cheap.
    sample = os.environ.get(MODE_ENV, "") != "passes"

    def toggle(signum: int, frame: FrameType | None) -> None:
        if not batches.on:
            batches.batches = []
            batches.collections = []
            batches.on = True
            if sample:
                profiler = Profiler(interval=INTERVAL_S, async_mode="disabled")
                profiler.start()
                state["profiler"] = profiler
            state["started"] = time.time()
            return
        batches.on = False
        profiler = state["profiler"]
        text = ""
        if profiler is not None:
            profiler.stop()
            text = profiler.output_text(unicode=False, color=False, show_all=False)
        state["profiler"] = None
        state["n"] += 1
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{role}-{os.getpid()}-{state['n']}.txt"
        head = f"# {role} pid {os.getpid()} from {state['started']:.3f}\n"
        path.write_text(head + batches.report() + text)

    signal.signal(SIGNAL, toggle)
    return [batches]
