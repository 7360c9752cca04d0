"""The memory watermark: readers, levels with hysteresis, alerts, the monitor, preload_fits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from trio_sign.enclave._memory import (
    MemoryLevel,
    MemoryLimitError,
    MemoryWatermark,
    check_preload_fits,
    preload_fits,
    read_memory_limit_bytes,
    read_rss_bytes,
    read_system_used_bytes,
    run_memory_monitor,
)

MIB = 1024 * 1024
LIMIT = 1000 * MIB


class FakeMemory:
    def __init__(self, used: int = 0) -> None:
        self.used = used
        self.fail: Exception | None = None

    def __call__(self) -> int:
        if self.fail is not None:
            raise self.fail
        return self.used

    def percent(self, p: float) -> None:
        self.used = int(LIMIT * p / 100)


def alerts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.levelname, r.__dict__["alert"])
        for r in caplog.records
        if r.name == "trio_sign.enclave.memory" and "alert" in r.__dict__
    ]


def test_reads_rss_and_limits(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  9000 kB\nVmRSS:\t  1234 kB\n")
    assert read_rss_bytes(status) == 1234 * 1024
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2048000 kB\nMemFree:  1 kB\n")
    v2 = tmp_path / "memory.max"
    v1 = tmp_path / "memory.limit_in_bytes"
    assert read_memory_limit_bytes(cgroup_paths=(v2, v1), meminfo_path=meminfo) == 2048000 * 1024
    v2.write_text("max\n")
    v1.write_text(f"{(1 << 63) - 4096}\n")  # cgroup v1 "unlimited"
    assert read_memory_limit_bytes(cgroup_paths=(v2, v1), meminfo_path=meminfo) == 2048000 * 1024
    v2.write_text("536870912\n")
    assert read_memory_limit_bytes(cgroup_paths=(v2, v1), meminfo_path=meminfo) == 512 * MIB
    meminfo.write_text("MemTotal:       2048000 kB\nMemFree:  1 kB\nMemAvailable: 1048000 kB\n")
    assert read_system_used_bytes(meminfo) == 1000000 * 1024
    assert 0 < read_system_used_bytes() < read_memory_limit_bytes() * 2
    with pytest.raises(ValueError, match="VmRSS"):
        read_rss_bytes(meminfo)
    assert read_rss_bytes() > 0  # the real /proc/self/status
    assert read_memory_limit_bytes() > 0


def test_levels_and_hysteresis(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_sign.enclave.memory")
    mem = FakeMemory()
    wm = MemoryWatermark(LIMIT, read_used=mem)
    steps: list[tuple[float, MemoryLevel]] = [
        (10, "ok"),
        (69.9, "ok"),
        (70, "alarm"),
        (66, "alarm"),  # within 5% of the alarm threshold: still alarm
        (71, "alarm"),
        (64.9, "ok"),  # below 65%: recovered
        (70, "alarm"),
        (90, "hard"),
        (86, "hard"),  # hysteresis below the hard threshold
        (95, "hard"),
        (84.9, "alarm"),
        (89.9, "alarm"),
        (92, "hard"),
        (10, "ok"),  # straight down
    ]
    for percent, expected in steps:
        mem.percent(percent)
        assert wm.sample() == expected, percent
        assert wm.level == expected
        assert wm.refuse_new_sessions is (expected == "hard")
    assert wm.used_bytes == int(LIMIT * 0.10)
    assert alerts(caplog) == [
        ("ERROR", "memory_alarm"),
        ("INFO", "memory_recovered"),
        ("ERROR", "memory_alarm"),
        ("ERROR", "memory_hard"),
        ("INFO", "memory_recovered"),
        ("ERROR", "memory_hard"),
        ("INFO", "memory_recovered"),
    ]
    hard = next(r for r in caplog.records if r.__dict__.get("alert") == "memory_hard")
    assert hard.__dict__["memory_level"] == "hard"
    assert hard.__dict__["limit_bytes"] == LIMIT
    assert "refusing new sessions" in hard.getMessage()


def test_flapping_at_a_threshold_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_sign.enclave.memory")
    mem = FakeMemory()
    wm = MemoryWatermark(LIMIT, read_used=mem)
    for i in range(100):
        mem.percent(70 if i % 2 else 69)
        wm.sample()
    assert alerts(caplog) == [("ERROR", "memory_alarm")]


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="limit_bytes"):
        MemoryWatermark(0)
    with pytest.raises(ValueError, match="alarm_fraction"):
        MemoryWatermark(LIMIT, alarm_fraction=0.95, hard_fraction=0.9)
    with pytest.raises(ValueError, match="hysteresis"):
        MemoryWatermark(LIMIT, alarm_fraction=0.1, hysteresis_fraction=0.2)


async def test_monitor_reports_changes(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_sign.enclave.memory")
    mem = FakeMemory()
    mem.percent(75)
    wm = MemoryWatermark(LIMIT, read_used=mem)
    changes: list[tuple[float, MemoryLevel]] = []
    async with trio.open_nursery() as nursery:
        started = await nursery.start(
            lambda task_status: run_memory_monitor(
                wm,
                interval_s=2.0,
                on_change=lambda level: changes.append((trio.current_time(), level)),
                task_status=task_status,
            )
        )
        assert started is wm
        assert wm.level == "alarm"  # sampled before started
        await trio.sleep(1)
        mem.percent(91)
        await trio.sleep(2)
        mem.fail = OSError("gone")  # logged once, level kept
        await trio.sleep(4)
        mem.fail = None
        mem.percent(20)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert changes == [(0.0, "alarm"), (2.0, "hard"), (8.0, "ok")]
    unreadable = [r for r in caplog.records if r.__dict__.get("alert") == "memory_unreadable"]
    assert len(unreadable) == 1


def test_preload_fits_math() -> None:
    # 1,000,000 accounts * 400 B = 400 MB; hard limit 90% of 1000 MiB = 900 MiB.
    assert preload_fits(1_000_000, limit_bytes=LIMIT, used_bytes=100 * MIB)
    hard = int(LIMIT * 0.9)
    assert preload_fits(1000, bytes_per_account=1000, limit_bytes=LIMIT, used_bytes=hard - 10**6)
    assert not preload_fits(
        1001, bytes_per_account=1000, limit_bytes=LIMIT, used_bytes=hard - 10**6
    )
    assert not preload_fits(0, limit_bytes=LIMIT, used_bytes=hard + 1)
    assert preload_fits(10, limit_bytes=LIMIT, used_bytes=0, hard_fraction=0.5)
    with pytest.raises(ValueError, match="accounts"):
        preload_fits(-1, limit_bytes=LIMIT, used_bytes=0)


def test_check_preload_fits_message() -> None:
    check_preload_fits(10, limit_bytes=LIMIT, used_bytes=0)
    with pytest.raises(MemoryLimitError) as info:
        check_preload_fits(3_000_000, limit_bytes=LIMIT, used_bytes=100 * MIB)
    err = info.value
    message = str(err)
    assert "3000000 accounts need ~1144.4 MiB" in message
    assert "over the hard limit of 900.0 MiB" in message
    assert "give the enclave more memory" in message
    assert "\n" not in message
    assert err.needed_bytes == 1_200_000_000
    assert err.hard_limit_bytes == int(LIMIT * 0.9)
