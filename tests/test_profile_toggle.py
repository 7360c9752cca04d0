"""The development profiler (``TRIO_SIGN_PROFILE_DIR``): SIGUSR1 starts it, the next SIGUSR1
writes the report with the loop's longest passes; without the variable nothing is installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pyinstrument")

CHILD = textwrap.dedent(
    """
    import os, signal, time
    import trio
    from trio_sign._profile import install_profile_toggle

    instruments = install_profile_toggle("probe")
    assert len(instruments) == 1

    async def main():
        os.kill(os.getpid(), signal.SIGUSR1)
        await trio.sleep(0.05)
        time.sleep(0.12)  # one long pass
        await trio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)
        await trio.sleep(0.01)

    trio.run(main, instruments=instruments)
    """
)


def test_sigusr1_writes_a_profile_with_the_longest_passes(tmp_path: Path) -> None:
    env = {**os.environ, "TRIO_SIGN_PROFILE_DIR": str(tmp_path / "out")}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    (report,) = (tmp_path / "out").iterdir()
    assert report.name.startswith("probe-")
    assert report.name.endswith("-1.txt")
    text = report.read_text()
    assert "loop batches:" in text
    longest = float(text.split("longest ")[1].split(" ms")[0])
    assert longest >= 100.0
    assert "main" in text  # pyinstrument's samples


def test_nothing_is_installed_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_sign._profile import install_profile_toggle

    monkeypatch.delenv("TRIO_SIGN_PROFILE_DIR", raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    assert install_profile_toggle("x") == []
    assert signal.getsignal(signal.SIGUSR1) is before
