"""The enclave's memory watermark: how close the process is to running out of memory.

Scheme A keeps every key share in memory, so memory is the resource that ends an enclave. An
enclave cannot swap and has no OOM story worth having: the kernel kills the process and the
parent sees it die. This module measures instead of hoping:

- :func:`read_rss_bytes` and :func:`read_memory_limit_bytes` read the process's resident set
  and the memory it may use (cgroup ``memory.max`` where there is one, else ``MemTotal``: the
  memory given to the enclave with ``--memory``).
- :class:`MemoryWatermark` turns a sample into a level, ``"ok"``, ``"alarm"`` (default 70% of
  the limit) or ``"hard"`` (default 90%), with hysteresis so that a process hovering at a
  threshold does not flap. At ``"hard"`` the session pool should refuse new sessions
  (:attr:`MemoryWatermark.refuse_new_sessions`).
- :func:`run_memory_monitor` samples periodically, logs one alert per crossing (a stable
  ``alert`` field: ``"memory_alarm"``, ``"memory_hard"``, ``"memory_recovered"``) and tells a
  callback (the status channel) about each change.
- :func:`check_preload_fits` refuses, before loading anything, a bundle that cannot fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal

import trio

from .._errors import TrioSignError

log = logging.getLogger("trio_sign.enclave.memory")

MemoryLevel = Literal["ok", "alarm", "hard"]

#: Fraction of the limit at which the watermark raises an alarm (DESIGN.md section 7).
DEFAULT_ALARM_FRACTION: Final = 0.70
#: Fraction of the limit at which new sessions are refused.
DEFAULT_HARD_FRACTION: Final = 0.90
#: How far (as a fraction of the limit) use must fall below a threshold to leave its level.
DEFAULT_HYSTERESIS_FRACTION: Final = 0.05
#: Default sampling period of :func:`run_memory_monitor`.
DEFAULT_MEMORY_INTERVAL_S: Final = 1.0
#: Rough in-memory cost of one account's share record (index entry, objects, buffers).
DEFAULT_BYTES_PER_ACCOUNT: Final = 400

_MIB = 1024 * 1024
# cgroup v1 reports "no limit" as a huge page-aligned number; anything above this is unlimited.
_UNLIMITED: Final = 1 << 60


class MemoryLimitError(TrioSignError):
    """The share bundle will not fit in the enclave's memory; nothing was loaded.

    Attributes:
        accounts: accounts in the bundle.
        needed_bytes: estimated bytes the accounts need.
        used_bytes: bytes in use before loading.
        hard_limit_bytes: the hard watermark (``hard_fraction`` of the limit).
    """

    def __init__(
        self,
        message: str,
        *,
        accounts: int,
        needed_bytes: int,
        used_bytes: int,
        hard_limit_bytes: int,
    ) -> None:
        super().__init__(message)
        self.accounts = accounts
        self.needed_bytes = needed_bytes
        self.used_bytes = used_bytes
        self.hard_limit_bytes = hard_limit_bytes


# ------------------------------------------------------------------------------------------
# Reading the numbers


def _read_kib_field(path: Path, name: str) -> int:
    """The value in bytes of a ``Name:   1234 kB`` line of a /proc file."""
    prefix = name + ":"
    with path.open("r", encoding="ascii") as f:
        for line in f:
            if line.startswith(prefix):
                parts = line[len(prefix) :].split()
                if not parts or not parts[0].isdigit():
                    break
                unit = parts[1].lower() if len(parts) > 1 else ""
                return int(parts[0]) * (1024 if unit == "kb" else 1)
    raise ValueError(f"{path}: no numeric {name!r} line")


def read_rss_bytes(path: str | Path = "/proc/self/status") -> int:
    """The process's resident set size (``VmRSS``), in bytes.

    Error handling: ``OSError`` if the file cannot be read, ``ValueError`` if it has no
    ``VmRSS`` line.
    """
    return _read_kib_field(Path(path), "VmRSS")


def read_system_used_bytes(meminfo_path: str | Path = "/proc/meminfo") -> int:
    """Memory in use by the whole system, ``MemTotal - MemAvailable``, in bytes.

    The better ``read_used`` inside a Nitro Enclave: the process is the only tenant, and the
    kernel and the in-memory root file system (the EIF's initramfs) use the same memory as the
    shares, which RSS does not see. On a shared development machine it counts other processes;
    use :func:`read_rss_bytes` there.

    Error handling: ``OSError``/``ValueError`` as :func:`read_rss_bytes`.
    """
    path = Path(meminfo_path)
    return _read_kib_field(path, "MemTotal") - _read_kib_field(path, "MemAvailable")


def _read_cgroup_limit(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if not text.isdigit():  # "max" (cgroup v2) or garbage: no limit here
        return None
    value = int(text)
    return value if 0 < value < _UNLIMITED else None


def read_memory_limit_bytes(
    *,
    cgroup_paths: tuple[str | Path, ...] = (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ),
    meminfo_path: str | Path = "/proc/meminfo",
) -> int:
    """The memory this process may use, in bytes: the smallest of the cgroup limits found
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and ``MemTotal``.

    In a Nitro Enclave there is normally no cgroup limit and ``MemTotal`` is the memory given
    to the enclave (less what the kernel keeps).

    Error handling: ``OSError``/``ValueError`` if ``meminfo_path`` cannot be read or parsed;
    unreadable cgroup files are skipped.
    """
    limit = _read_kib_field(Path(meminfo_path), "MemTotal")
    for path in cgroup_paths:
        cgroup = _read_cgroup_limit(Path(path))
        if cgroup is not None:
            limit = min(limit, cgroup)
    return limit


# ------------------------------------------------------------------------------------------
# The watermark


class MemoryWatermark:
    """Memory use against a limit, as a level with hysteresis.

    Levels go up as soon as use reaches a threshold (``alarm_fraction``, ``hard_fraction`` of
    ``limit_bytes``) and come down only once use is ``hysteresis_fraction`` of the limit below
    it, so a process hovering at a threshold reports one crossing, not hundreds.

    Args:
        limit_bytes: the memory the enclave may use (:func:`read_memory_limit_bytes`).
        alarm_fraction: level ``"alarm"`` from here (an ERROR log, the parent alerts).
        hard_fraction: level ``"hard"`` from here (new sessions are refused).
        hysteresis_fraction: how far below a threshold use must fall to leave its level.
        read_used: returns bytes in use now (default :func:`read_rss_bytes`); tests inject one.

    Error handling: ``ValueError`` for inconsistent settings. :meth:`sample` lets whatever
    ``read_used`` raises propagate (:func:`run_memory_monitor` logs and carries on).
    """

    def __init__(
        self,
        limit_bytes: int,
        *,
        alarm_fraction: float = DEFAULT_ALARM_FRACTION,
        hard_fraction: float = DEFAULT_HARD_FRACTION,
        hysteresis_fraction: float = DEFAULT_HYSTERESIS_FRACTION,
        read_used: Callable[[], int] = read_rss_bytes,
    ) -> None:
        if limit_bytes <= 0:
            raise ValueError("limit_bytes must be positive")
        if not 0 < alarm_fraction <= hard_fraction <= 1:
            raise ValueError("need 0 < alarm_fraction <= hard_fraction <= 1")
        if not 0 <= hysteresis_fraction < alarm_fraction:
            raise ValueError("need 0 <= hysteresis_fraction < alarm_fraction")
        self.limit_bytes = limit_bytes
        self.alarm_fraction = alarm_fraction
        self.hard_fraction = hard_fraction
        self.hysteresis_fraction = hysteresis_fraction
        self._read_used = read_used
        self.used_bytes = 0
        self.level: MemoryLevel = "ok"

    @property
    def alarm_bytes(self) -> int:
        return int(self.limit_bytes * self.alarm_fraction)

    @property
    def hard_bytes(self) -> int:
        return int(self.limit_bytes * self.hard_fraction)

    @property
    def refuse_new_sessions(self) -> bool:
        """True at the hard watermark: the pool should answer RESOURCE_EXHAUSTED."""
        return self.level == "hard"

    def _level_for(self, used: int) -> MemoryLevel:
        hyst = int(self.limit_bytes * self.hysteresis_fraction)
        if used >= self.hard_bytes:
            return "hard"
        if self.level == "hard" and used >= self.hard_bytes - hyst:
            return "hard"
        if used >= self.alarm_bytes:
            return "alarm"
        if self.level != "ok" and used >= self.alarm_bytes - hyst:
            return "alarm"
        return "ok"

    def sample(self) -> MemoryLevel:
        """Read the memory in use, update :attr:`level`, log a crossing; return the level.

        Logs (logger ``trio_sign.enclave.memory``), once per crossing: ERROR with
        ``alert="memory_alarm"`` or ``alert="memory_hard"`` on entering those levels, INFO
        with ``alert="memory_recovered"`` on coming down.
        """
        used = self._read_used()
        self.used_bytes = used
        previous = self.level
        level = self._level_for(used)
        self.level = level
        if level != previous:
            self._log_crossing(previous, level)
        return level

    def _log_crossing(self, previous: MemoryLevel, level: MemoryLevel) -> None:
        extra = {
            "memory_level": level,
            "previous_level": previous,
            "used_bytes": self.used_bytes,
            "limit_bytes": self.limit_bytes,
            "used_percent": round(100 * self.used_bytes / self.limit_bytes, 1),
        }
        rank = {"ok": 0, "alarm": 1, "hard": 2}
        if rank[level] > rank[previous]:
            threshold = self.hard_fraction if level == "hard" else self.alarm_fraction
            log.error(
                "memory use crossed the %s watermark (%d%% of the limit)%s",
                level,
                round(threshold * 100),
                "; refusing new sessions" if level == "hard" else "",
                extra={"alert": f"memory_{level}", **extra},
            )
        else:
            log.info(
                "memory use back down to level %s%s",
                level,
                "; taking new sessions again" if previous == "hard" else "",
                extra={"alert": "memory_recovered", **extra},
            )


async def run_memory_monitor(
    watermark: MemoryWatermark,
    *,
    interval_s: float = DEFAULT_MEMORY_INTERVAL_S,
    on_change: Callable[[MemoryLevel], object] | None = None,
    task_status: trio.TaskStatus[MemoryWatermark] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sample ``watermark`` every ``interval_s`` seconds, forever.

    The first sample is taken before ``task_status.started(watermark)``, so the level is real
    once this has started. ``on_change(level)`` is called (synchronously, from this task)
    whenever the level differs from the last one reported, starting from ``"ok"``.

    Cancellation: safe; nothing to clean up.

    Error handling: a failing read (``OSError``/``ValueError``) is logged as a WARNING (once
    until a read succeeds again) and the level is left as it was. ``on_change`` exceptions
    propagate (a bug in the caller; fail fast).
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    reported: MemoryLevel = "ok"
    read_failing = False
    first = True
    while True:
        try:
            level = watermark.sample()
        except (OSError, ValueError) as exc:
            if not read_failing:
                log.warning(
                    "cannot read memory use (%s); keeping level %s",
                    str(exc) or type(exc).__name__,
                    watermark.level,
                    extra={"alert": "memory_unreadable"},
                )
            read_failing = True
            level = watermark.level
        else:
            read_failing = False
        if level != reported:
            reported = level
            if on_change is not None:
                on_change(level)
        if first:
            first = False
            task_status.started(watermark)
        await trio.sleep(interval_s)


# ------------------------------------------------------------------------------------------
# Will the bundle fit?


def preload_fits(
    accounts: int,
    *,
    bytes_per_account: int = DEFAULT_BYTES_PER_ACCOUNT,
    limit_bytes: int,
    used_bytes: int,
    hard_fraction: float = DEFAULT_HARD_FRACTION,
) -> bool:
    """Whether ``accounts`` more accounts fit below the hard watermark.

    True when ``used_bytes + accounts * bytes_per_account <= hard_fraction * limit_bytes``.
    """
    if accounts < 0 or bytes_per_account < 0 or used_bytes < 0 or limit_bytes <= 0:
        raise ValueError("accounts, bytes_per_account and used_bytes must be >= 0, limit > 0")
    return used_bytes + accounts * bytes_per_account <= int(limit_bytes * hard_fraction)


def check_preload_fits(
    accounts: int,
    *,
    bytes_per_account: int = DEFAULT_BYTES_PER_ACCOUNT,
    limit_bytes: int,
    used_bytes: int,
    hard_fraction: float = DEFAULT_HARD_FRACTION,
) -> None:
    """Raise :class:`MemoryLimitError` unless :func:`preload_fits`; call it before loading."""
    if preload_fits(
        accounts,
        bytes_per_account=bytes_per_account,
        limit_bytes=limit_bytes,
        used_bytes=used_bytes,
        hard_fraction=hard_fraction,
    ):
        return
    needed = accounts * bytes_per_account
    hard = int(limit_bytes * hard_fraction)
    raise MemoryLimitError(
        f"{accounts} accounts need ~{_mib(needed)} MiB on top of {_mib(used_bytes)} MiB in use, "
        f"over the hard limit of {_mib(hard)} MiB ({round(hard_fraction * 100)}% of "
        f"{_mib(limit_bytes)} MiB); give the enclave more memory (see the enclave memory "
        "formula in docs/)",
        accounts=accounts,
        needed_bytes=needed,
        used_bytes=used_bytes,
        hard_limit_bytes=hard,
    )


def _mib(n: int) -> str:
    return f"{n / _MIB:.1f}"
