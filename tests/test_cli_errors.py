"""Issue 12, defect 5: one-line errors everywhere the README promises them.

Every command here is the real console script in a child process that the test starts and
ends: what a user sees on stderr and the exit code are the point. ``trio-sign: error: ...``
(exit 1), ``trio-sign: interrupted`` (exit 130), and never a traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_sign._errors import TrioSignError
from trio_sign.cli import main
from trio_sign.cli._main import EXIT_FAILED, EXIT_INTERRUPTED, _report

EXE = str(Path(sys.executable).with_name("trio-sign"))
TOKEN = "test-token-0123456789abcdef"


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "--log-format", "json", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _error_lines(stderr: str) -> list[str]:
    """stderr without the JSON log records: what the command says to a person."""
    return [line for line in stderr.splitlines() if line and not line.startswith("{")]


def _assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert proc.returncode == code, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback TCP port another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def shares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trio_sign.testing import generate_share_files

    gen = generate_share_files(tmp_path_factory.mktemp("shares"), 4)
    return gen.service_file.parent


def test_kms_local_port_in_use(tmp_path: Path, busy_port: int, nsm_dir: Path) -> None:
    proc = _run(
        "kms-local",
        "--listen",
        f"tcp://127.0.0.1:{busy_port}",
        "--keys",
        str(tmp_path / "keys.json"),
        "--nsm-root",
        str(nsm_dir / "local-nsm-root.pem"),
    )
    line = _assert_one_line(proc, EXIT_FAILED, "address already in use", "--listen")
    assert line.startswith(f"trio-sign: error: cannot listen on tcp://127.0.0.1:{busy_port}")


def _gateway_toml(tmp_path: Path, api_port: int, participant: Path) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[api]
listen = "tcp://127.0.0.1:{api_port}"
token = "{TOKEN}"
[events]
listen = "tcp://127.0.0.1:0"
[shares]
participant_files = ["{participant}"]
[dev]
skip_attestation = true
[[node]]
id = "node-1"
address = "tcp://127.0.0.1:9"
events_token = "{TOKEN}"
"""
    )
    return config


def test_gateway_port_in_use(tmp_path: Path, busy_port: int, shares: Path) -> None:
    config = _gateway_toml(tmp_path, busy_port, shares / "participant-2_key_shares.json")
    proc = _run("gateway", "--config", str(config))
    _assert_one_line(proc, EXIT_FAILED, "trio-sign: error: ", str(busy_port), "in use")


def test_gateway_missing_participant_file(tmp_path: Path, shares: Path) -> None:
    missing = tmp_path / "participant-9_key_shares.json"
    config = _gateway_toml(tmp_path, 0, missing)
    proc = _run("gateway", "--config", str(config))
    # 1 when the file is found missing at start, 2 if the config check finds it first
    assert proc.returncode in (1, 2), proc.stderr[-3000:]
    _assert_one_line(proc, proc.returncode, "trio-sign: error: ", str(missing))


def test_dev_up_port_in_use(tmp_path: Path, busy_port: int, shares: Path) -> None:
    proc = _run(
        "dev",
        "up",
        "--shares",
        str(shares / "service_key_shares.json"),
        "--workdir",
        str(tmp_path / "stack"),
        "--health",
        f"tcp://127.0.0.1:{busy_port}",
    )
    _assert_one_line(proc, EXIT_FAILED, "trio-sign: error: ", str(busy_port), "in use")


def test_dev_up_missing_shares_file(tmp_path: Path) -> None:
    proc = _run("dev", "up", "--shares", str(tmp_path / "nope.json"), "--workdir", str(tmp_path))
    _assert_one_line(proc, EXIT_FAILED, "trio-sign: error: --shares ", "nope.json")


def test_attestation_verify_into_a_closed_pipe(vectors_dir: Path) -> None:
    """`trio-sign attestation verify FILE | head -1` where head has already gone: the document
    is valid, so exit 0, and nothing on stderr (Python's note on SIGPIPE)."""
    document = vectors_dir / "nitro" / "attestation" / "blocky_prod.cose"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: every write is EPIPE
    try:
        proc = subprocess.run(
            [EXE, "attestation", "verify", str(document), "--at", "document"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 0


def test_attestation_verify_head_keeps_the_first_line(vectors_dir: Path) -> None:
    document = vectors_dir / "nitro" / "attestation" / "blocky_prod.cose"
    proc = subprocess.run(
        f"'{EXE}' attestation verify '{document}' --at document | head -1; "
        'echo "rc=${PIPESTATUS[0]}"',
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("attestation document OK")
    assert lines[-1] == "rc=0"
    assert proc.stderr == ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("to_group", [True, False], ids=["ctrl-c", "kill-int"])
def test_ctrl_c_during_demo(tmp_path: Path, to_group: bool) -> None:
    """Ctrl-C while the full-stack demo signs: one line, exit 130, and every process it started
    (the parent's enclave) is gone. Ctrl-C on a terminal signals the whole process group;
    ``kill -INT`` only the demo itself, whose parent must then stop the enclave."""
    proc = subprocess.Popen(
        [
            EXE,
            "--log-format",
            "json",
            "demo",
            "--accounts",
            "20",
            "--signatures",
            "1000000",
            "--concurrency",
            "4",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a shell job would have
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("[3/3]"):
                break
        else:  # pragma: no cover - the failure path
            pytest.fail(f"the demo never started signing: {proc.communicate()[1][-3000:]}")
        time.sleep(0.5)  # signing is under way
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert "Traceback" not in stderr, stderr[-3000:]
        assert _error_lines(stderr) == ["trio-sign: interrupted"], stderr[-3000:]
        assert proc.returncode == EXIT_INTERRUPTED
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(proc.pid), "a process the demo started outlived it"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# -- the mapping itself (in-process) ---------------------------------------------------------------


def test_errors_inside_exception_groups_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    assert _report(BaseExceptionGroup("nursery", [ExceptionGroup("inner", [in_use])])) == 1
    assert capsys.readouterr().err == (
        "trio-sign: error: cannot listen: address already in use (another process is "
        "listening there: stop it, or choose another listen address)\n"
    )
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "p.json")
    assert _report(ExceptionGroup("g", [missing])) == 1
    assert capsys.readouterr().err == "trio-sign: error: p.json: No such file or directory\n"
    assert _report(ExceptionGroup("g", [OSError(5, "x"), TrioSignError("the reason\nhere")])) == 1
    assert capsys.readouterr().err == "trio-sign: error: the reason here\n"


def test_interrupt_wins_and_bugs_keep_their_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    import trio

    async def interrupted() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.lowlevel.checkpoint()
            raise KeyboardInterrupt

    with pytest.raises(BaseExceptionGroup) as info:
        trio.run(interrupted)
    assert _report(info.value) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "trio-sign: interrupted\n"
    # a bug beside a known error is not hidden behind the known error's line
    assert _report(ExceptionGroup("g", [TrioSignError("known"), ValueError("bug")])) is None
    assert _report(ValueError("bug")) is None
    assert capsys.readouterr().err == ""


def test_missing_file_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dev", "up", "--shares", str(tmp_path / "x.json")]) == EXIT_FAILED
    assert (
        capsys.readouterr().err
        == f"trio-sign: error: --shares {tmp_path / 'x.json'}: no such file\n"
    )


@pytest.mark.parametrize("option", ["per_source_rate", "=5", "per source=5", "a=1\n[evil]"])
def test_dev_up_refuses_a_malformed_ingress_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """Checked before anything starts: KEY=VALUE, one line of [ingress]."""
    shares = tmp_path / "s.json"
    shares.write_text("{}")
    argv = ["dev", "up", "--shares", str(shares), "--health", "tcp://127.0.0.1:0"]
    assert main([*argv, "--ingress-option", option]) == EXIT_FAILED
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_ctrl_c_while_dev_up_boots(tmp_path: Path, shares: Path) -> None:
    """Ctrl-C before the stack is ready stops it at once (it used to wait for readiness, up
    to --ready-timeout): one line, exit 130, nothing left running."""
    proc = subprocess.Popen(
        [
            EXE,
            "--log-format",
            "json",
            "dev",
            "up",
            "--shares",
            str(shares / "service_key_shares.json"),
            "--workdir",
            str(tmp_path / "stack"),
            "--health",
            "tcp://127.0.0.1:0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "starting the parent" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, stderr = proc.communicate(timeout=60)
        assert "local stack ready" not in out
        assert "Traceback" not in stderr, stderr[-3000:]
        assert _error_lines(stderr) == ["trio-sign: interrupted"], stderr[-3000:]
        assert proc.returncode == EXIT_INTERRUPTED
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(proc.pid), "a process dev up started outlived it"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
