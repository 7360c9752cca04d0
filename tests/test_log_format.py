"""Issue 12, defect 9: logs a person can read on a terminal, and progress lines they do not break.

* ``--log-format text|json``: text by default when stderr is a terminal, JSON otherwise; the
  JSON format is exactly what it was (the parent's forwarding and the tests read it).
* ``--log-level`` and ``--log-format`` work before and after the subcommand.
* A log record written while a progress line is drawn lands on a line of its own, and the
  progress line is drawn again below it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trio_sign._logging import JsonFormatter, TextFormatter, configure_logging
from trio_sign._progress import Progress
from trio_sign.cli import main
from trio_sign.cli._main import build_parser

EXE = str(Path(sys.executable).with_name("trio-sign"))


def _record(
    msg: str = "preload finished in %d ms", *args: object, **extra: object
) -> logging.LogRecord:
    record = logging.LogRecord("trio_sign.enclave", logging.INFO, __file__, 1, msg, args, None)
    record.created = 1796285080.647
    record.msecs = 647.0
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_format_is_unchanged() -> None:
    record = _record("preload finished in %d ms", 55, accounts=30, signing_share="abcd", sha="x y")
    assert JsonFormatter().format(record) == (
        '{"ts":"2026-12-03T08:04:40.647Z","level":"INFO","logger":"trio_sign.enclave",'
        '"msg":"preload finished in 55 ms","accounts":30,"signing_share":"<redacted>",'
        '"sha":"x y"}'
    )


def test_text_format_one_line_with_extras_and_redaction() -> None:
    record = _record(
        "preload finished in %d ms",
        55,
        accounts=30,
        listen="unix:///run/x.sock",
        reason="two words",
        data_key_bytes=b"\x01" * 4,
        nonce_hex="00ff",
        ratio=0.5,
        missing=None,
    )
    assert TextFormatter().format(record) == (
        "2026-12-03T08:04:40.647Z INFO    trio_sign.enclave preload finished in 55 ms "
        'accounts=30 listen=unix:///run/x.sock reason="two words" data_key_bytes=<redacted> '
        "nonce_hex=<redacted> ratio=0.5 missing=null"
    )


def test_text_format_keeps_one_record_on_one_line() -> None:
    record = _record("first line\nsecond line", quoted='say "hi"\n')
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.endswith(
        'first line\\nsecond line quoted="say \\"hi\\"\\n" error="ValueError: bad\\nthing"'
    )


def test_the_same_fields_are_redacted_in_both_formats() -> None:
    extra = {"secret_x": 1, "plaintext": "p", "private_key": "k", "key_material": "m", "ok": 1}
    json_line = JsonFormatter().format(_record("m", **extra))
    text_line = TextFormatter().format(_record("m", **extra))
    for key in ("secret_x", "plaintext", "private_key", "key_material"):
        assert f'"{key}":"<redacted>"' in json_line
        assert f"{key}=<redacted>" in text_line
    assert '"ok":1' in json_line
    assert "ok=1" in text_line


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "DEBUG", "--log-format", "text", "parent", "--config", "p.toml"],
        ["parent", "--config", "p.toml", "--log-level", "DEBUG", "--log-format", "text"],
        [
            "--log-level",
            "ERROR",
            "parent",
            "--log-level",
            "debug",
            "--config",
            "p.toml",
            "--log-format",
            "text",
        ],
        ["shares", "inspect", "f.enc", "--log-format", "text", "--log-level", "DEBUG"],
        ["dev", "up", "--shares", "s.json", "--log-level", "DEBUG", "--log-format", "text"],
        ["attestation", "verify", "d.cose", "--log-level", "DEBUG", "--log-format", "text"],
    ],
)
def test_logging_options_before_and_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_format) == ("DEBUG", "text")


def test_logging_options_default() -> None:
    args = build_parser().parse_args(["parent", "--config", "p.toml"])
    assert (args.log_level, args.log_format) == ("INFO", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["parent", "--config", "p.toml", "--log-format", "yaml"])


def test_main_applies_the_options_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "shares",
            "inspect",
            str(tmp_path / "missing.enc"),
            "--log-level",
            "DEBUG",
            "--log-format",
            "text",
        ]
    )
    assert code == 1
    root = logging.getLogger("trio_sign")
    assert root.level == logging.DEBUG
    assert isinstance(root.handlers[0].formatter, TextFormatter)


def _warning_through(stderr_is_tty: bool, tmp_path: Path, nsm_dir: Path, *extra: str) -> str:
    """stderr of `trio-sign kms-local` (which logs a WARNING, then fails: it cannot listen in a
    directory that does not exist)."""
    argv = [
        EXE,
        *extra,
        "kms-local",
        "--listen",
        f"unix://{tmp_path}/missing/kms.sock",
        "--keys",
        str(tmp_path / "keys.json"),
        "--nsm-root",
        str(nsm_dir / "local-nsm-root.pem"),
    ]
    if not stderr_is_tty:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False).stderr
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=60)
    finally:
        os.close(master)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_text_on_a_terminal_json_otherwise(tmp_path: Path, nsm_dir: Path) -> None:
    on_terminal = _warning_through(True, tmp_path, nsm_dir)
    assert re.search(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING trio_sign\.cli kms-local runs without "
        r"--policy: every request is allowed$",
        on_terminal,
        re.M,
    ), on_terminal
    assert '{"ts"' not in on_terminal
    piped = _warning_through(False, tmp_path, nsm_dir)
    assert '"level":"WARNING","logger":"trio_sign.cli"' in piped.splitlines()[0]
    # asked for explicitly, either format wins over the default
    assert '"level":"WARNING"' in _warning_through(True, tmp_path, nsm_dir, "--log-format", "json")
    assert " WARNING trio_sign.cli " in _warning_through(
        False, tmp_path, nsm_dir, "--log-format", "text"
    )


def _screen(output: str) -> list[str]:
    """What a terminal shows for ``output``: ``\\r\\x1b[2K`` erases the current line."""
    lines = [""]
    for part in re.split(r"(\r\x1b\[2K|\n)", output):
        if part == "\n":
            lines.append("")
        elif part == "\r\x1b[2K":
            lines[-1] = ""
        else:
            lines[-1] += part
    return lines


def test_log_records_do_not_overwrite_the_progress_line() -> None:
    terminal = io.StringIO()
    configure_logging("INFO", terminal, log_format="text")
    log = logging.getLogger("trio_sign.test")
    progress = Progress("      loading", stream=terminal, force=True)
    progress(500, 1000)
    log.warning("slow disk", extra={"ms": 12})
    progress(1000, 1000)
    log.info("done")
    progress.close()
    screen = _screen(terminal.getvalue())
    assert screen[0].endswith("WARNING trio_sign.test slow disk ms=12")
    assert screen[1].endswith("INFO    trio_sign.test done")
    assert screen[2].startswith("      loading: 100.0% (1,000/1,000)")
    assert screen[3] == ""
    assert len(screen) == 4


def test_a_status_line_is_redrawn_below_a_record() -> None:
    terminal = io.StringIO()
    configure_logging("INFO", terminal, log_format="json")
    with Progress("      waiting for readiness", stream=terminal, force=True) as waiting:
        waiting.status("enclave preloading (0.2 s)")
        logging.getLogger("trio_sign.test").info("preload started")
        assert _screen(terminal.getvalue())[-1] == (
            "      waiting for readiness: enclave preloading (0.2 s)"
        )
    screen = _screen(terminal.getvalue())
    assert screen[0].startswith('{"ts":')
    assert screen[0].endswith('"msg":"preload started"}')
    assert screen[1:] == ["      waiting for readiness: enclave preloading (0.2 s)", ""]


def test_no_progress_off_a_terminal() -> None:
    stream = io.StringIO()
    with Progress("x", stream=stream) as progress:
        progress(1, 2)
        progress.status("y")
    assert stream.getvalue() == ""
