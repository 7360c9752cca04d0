"""``trio-sign enclave --dev`` failing the way an operator meets it (issue 12, defect 5): one
line on stderr naming what was wrong, and the documented exit code, never a traceback.

Each test runs the real command in a subprocess (started and waited for here) against files
and sockets in ``tmp_path`` and on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_sign.enclave import ExitCode
from trio_sign.shares import write_plaintext

from .share_helpers import make_record

EXE = Path(sys.executable).with_name("trio-sign")


@pytest.fixture
def shares(tmp_path: Path) -> Path:
    path = tmp_path / "service_key_shares.json"
    with path.open("wb") as f:
        write_plaintext(f, [make_record(f"acct-{i}") for i in range(2)])
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback TCP port another socket is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def run_enclave(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXE), "enclave", "--dev", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def the_one_line(stderr: str) -> str:
    """The human line on stderr; everything else must be a JSON log record."""
    assert "Traceback" not in stderr
    human = []
    for line in stderr.splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            human.append(line)
    assert len(human) == 1, stderr
    # a few log lines (the development configuration's two warnings among them: no bundle
    # keys and a placeholder CA; NO AUTHORIZATION), not a traceback
    assert len(stderr.splitlines()) <= 6, stderr
    return human[0]


def test_grpc_port_in_use_is_one_line_and_exit_7(shares: Path, busy_port: int) -> None:
    address = f"tcp://127.0.0.1:{busy_port}"
    done = run_enclave("--dev-plaintext-shares", str(shares), "--grpc-listen", address)
    assert done.returncode == 7 == int(ExitCode.SERVICE_FAILED), done.stderr
    line = the_one_line(done.stderr)
    assert line.startswith("trio-sign: enclave failed (listen): ")
    assert f"cannot listen on {address}" in line
    assert "Address already in use" in line


def test_missing_shares_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    done = run_enclave("--dev-plaintext-shares", str(missing), "--grpc-listen", "tcp://127.0.0.1:0")
    assert done.returncode == ExitCode.PRELOAD_FAILED, done.stderr
    line = the_one_line(done.stderr)
    assert line.startswith("trio-sign: enclave failed (shares_unreadable): ")
    assert str(missing) in line
    assert "No such file or directory" in line


@pytest.mark.parametrize(
    ("content", "reason", "detail"),
    [
        (b"garbage\n", "bad_json", "line 1"),
        (b"", "bad_header", "empty file"),
    ],
    ids=["garbage", "empty"],
)
def test_bad_shares_file_is_one_line(
    tmp_path: Path, content: bytes, reason: str, detail: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    done = run_enclave("--dev-plaintext-shares", str(bad), "--grpc-listen", "tcp://127.0.0.1:0")
    assert done.returncode == ExitCode.PRELOAD_FAILED, done.stderr
    line = the_one_line(done.stderr)
    assert line.startswith(f"trio-sign: enclave failed ({reason}): shares file refused: {bad}")
    assert detail in line


def test_a_shares_file_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    done = run_enclave(
        "--dev-plaintext-shares", str(tmp_path), "--grpc-listen", "tcp://127.0.0.1:0"
    )
    assert done.returncode == ExitCode.PRELOAD_FAILED, done.stderr
    line = the_one_line(done.stderr)
    assert line.startswith("trio-sign: enclave failed (shares_unreadable): ")
    assert str(tmp_path) in line
