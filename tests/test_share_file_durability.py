"""Issue 12 defect 7: share files are written atomically and end with a trailer line that every
reader requires, so an interrupted ``shares generate`` can never be sealed or loaded."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_sign import ShareFileError
from trio_sign.cli import main
from trio_sign.crypto import ED25519, Scheme
from trio_sign.shares import (
    DevKeyFile,
    PlaintextEncoder,
    ShareRecord,
    ShareStore,
    inspect_plaintext,
    read_plaintext,
    seal_file,
    write_plaintext,
    write_plaintext_file,
)
from trio_sign.testing import generate_share_files

from .share_helpers import make_record

HEADER = {"format": "trio-sign/key-shares", "version": 1, "ciphersuite": "FROST-ED25519-SHA512-v1"}


def records(n: int) -> list[ShareRecord]:
    return [make_record(f"acct-{i}") for i in range(n)]


def plaintext(n: int) -> bytes:
    buf = io.BytesIO()
    assert write_plaintext(buf, records(n)) == n
    return buf.getvalue()


def refusal(data: bytes, name: str | None = None) -> ShareFileError:
    with pytest.raises(ShareFileError) as info:
        list(read_plaintext(io.BytesIO(data), name=name))
    return info.value


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- the trailer ---------------------------------------------------------------------------


def test_writer_ends_with_the_trailer() -> None:
    lines = plaintext(3).decode().splitlines()
    assert json.loads(lines[0]) == HEADER
    assert json.loads(lines[-1]) == {"end": True, "accounts": 3}
    assert len(lines) == 5
    assert len(list(read_plaintext(io.BytesIO(plaintext(3))))) == 3


def test_encoder_enforces_its_order() -> None:
    enc = PlaintextEncoder()
    with pytest.raises(RuntimeError):
        enc.add_record(make_record())
    with pytest.raises(RuntimeError):
        enc.finish()
    enc.start()
    with pytest.raises(RuntimeError):
        enc.start()
    enc.add_record(make_record())
    assert enc.finish() == b'{"end": true, "accounts": 1}\n'
    with pytest.raises(RuntimeError):
        enc.add_record(make_record())


def test_truncation_at_every_line_boundary_is_refused() -> None:
    data = plaintext(4)
    lines = data.splitlines(keepends=True)
    for k in range(len(lines)):  # every proper prefix of whole lines
        err = refusal(b"".join(lines[:k]))
        assert err.reason == ("bad_header" if k == 0 else "missing_trailer"), k
        if k:
            assert err.line == k + 1
            assert "incomplete" in str(err)
            assert "\n" not in str(err)
    assert len(list(read_plaintext(io.BytesIO(data)))) == 4


def test_truncation_at_every_byte_is_refused() -> None:
    data = plaintext(2)
    complete = len(data) - 1  # only the trailer's own newline may be missing
    for cut in range(complete):
        err = refusal(data[:cut])
        assert err.reason in {"bad_header", "missing_trailer", "truncated"}, cut
        if err.reason == "truncated":
            assert "cut short" in str(err)
    assert len(list(read_plaintext(io.BytesIO(data[:complete])))) == 2


@pytest.mark.parametrize(
    ("trailer", "reason", "words"),
    [
        ('{"end": true, "accounts": 3}', "count_mismatch", "trailer says 3 accounts"),
        ('{"end": true, "accounts": 1}', "count_mismatch", "file has 2 records"),
        ('{"end": false, "accounts": 2}', "bad_trailer", '"end" must be true'),
        ('{"end": 1, "accounts": 2}', "bad_trailer", '"end" must be true'),
        ('{"end": true, "accounts": "2"}', "bad_trailer", "non-negative integer"),
        ('{"end": true, "accounts": -1}', "bad_trailer", "non-negative integer"),
        ('{"end": true}', "bad_trailer", "non-negative integer"),
        ('{"end": true, "accounts": 2, "sha": "x"}', "bad_trailer", "unknown field 'sha'"),
    ],
)
def test_a_wrong_trailer_is_refused(trailer: str, reason: str, words: str) -> None:
    lines = plaintext(2).splitlines(keepends=True)
    err = refusal(b"".join(lines[:-1]) + trailer.encode() + b"\n")
    assert (err.reason, err.line) == (reason, 4)
    assert words in str(err)


@pytest.mark.parametrize(
    "after",
    [b"\n", b"   \n", b'{"end": true, "accounts": 2}\n', b"x", None],
)
def test_anything_after_the_trailer_is_refused(after: bytes | None) -> None:
    data = plaintext(2)
    if after is None:  # a whole record after the trailer
        after = plaintext(1).splitlines(keepends=True)[1]
    err = refusal(data + after)
    assert (err.reason, err.line) == ("after_trailer", 5)
    assert "line 4" in str(err)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "service_key_shares.json"
    path.write_bytes(b"".join(plaintext(2).splitlines(keepends=True)[:-1]))
    with path.open("rb") as f, pytest.raises(ShareFileError) as info:
        list(read_plaintext(f))
    assert str(info.value).startswith(f"{path}: line 4: no trailer line")
    assert (info.value.reason, info.value.line) == ("missing_trailer", 4)
    assert refusal(b"", name="x.json").args[0].startswith("x.json: line 1: ")


# -- every reader refuses a file without its trailer ----------------------------------------


@pytest.fixture
def cut_file(tmp_path: Path) -> Path:
    """A generated service file cut after its second record (the trailer is lost)."""
    gen = generate_share_files(tmp_path / "shares", 3, counterparts=False)
    lines = gen.service_file.read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.json"
    cut.write_bytes(b"".join(lines[:3]))
    return cut


def test_seal_refuses_and_writes_nothing(tmp_path: Path, cut_file: Path) -> None:
    out = tmp_path / "out.enc"
    key = DevKeyFile.create(tmp_path / "k.json")
    with pytest.raises(ShareFileError) as info:
        seal_file(cut_file, out, key)
    key.close()
    assert info.value.reason == "missing_trailer"
    assert str(cut_file) in str(info.value)
    assert not out.exists()
    assert [n for n in files_in(tmp_path) if n.endswith(".tmp")] == []


def test_share_store_refuses(cut_file: Path) -> None:
    """The loader behind ``enclave --dev --dev-plaintext-shares`` and the gateway's files."""
    with cut_file.open("rb") as f, pytest.raises(ShareFileError) as info:
        ShareStore.load_plaintext(f)
    assert info.value.reason == "missing_trailer"
    assert str(cut_file) in str(info.value)


def test_dev_enclave_refuses(cut_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``trio-sign enclave --dev --dev-plaintext-shares`` exits non-zero before serving."""
    args = ["enclave", "--dev", "--dev-plaintext-shares", str(cut_file)]
    assert main([*args, "--grpc-listen", "tcp://127.0.0.1:0"]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{cut_file}: line 4: no trailer line" in last
    assert "missing_trailer" in last


def test_cli_seal_and_inspect_print_one_line_naming_the_file(
    tmp_path: Path, cut_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.enc"
    DevKeyFile.create(tmp_path / "k.json").close()
    seal = ["shares", "seal", "--in", str(cut_file), "--out", str(out)]
    assert main([*seal, "--dev-key", str(tmp_path / "k.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"trio-sign: error: {cut_file}: line 4: no trailer line")
    assert not out.exists()

    assert main(["shares", "inspect", str(cut_file)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{cut_file}: line 4: no trailer line" in err


def test_cli_inspect_shows_a_complete_plaintext_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = generate_share_files(tmp_path, 3, counterparts=False)
    data = gen.service_file.read_bytes()
    assert main(["shares", "inspect", "--json", str(gen.service_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["accounts"] == 3
    assert info["trailer"] is True
    assert info["sealed"] is False
    assert info["file_bytes"] == len(data)
    with gen.service_file.open("rb") as f:
        assert inspect_plaintext(f)["sha256"] == info["sha256"]
    for line in data.splitlines()[1:-1]:
        assert json.loads(line)["signing_share"] not in json.dumps(info)


# -- atomic writes -----------------------------------------------------------------------------


class Boom(Exception):
    pass


def failing_after(n: int) -> Iterator[ShareRecord]:
    yield from records(n)
    raise Boom


def test_write_plaintext_file_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "shares.json"
    with pytest.raises(Boom):
        write_plaintext_file(path, failing_after(3))
    assert files_in(tmp_path) == []

    assert write_plaintext_file(path, records(2)) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(ShareFileError) as info:
        write_plaintext_file(path, records(1))
    assert info.value.reason == "output_exists"
    with pytest.raises(Boom):
        write_plaintext_file(path, failing_after(5), overwrite=True)
    assert path.read_bytes() == before  # the old file, whole
    assert files_in(tmp_path) == ["shares.json"]


def test_generate_interrupted_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in the middle of writing (here: the 5th account's keygen) leaves nothing under
    the final names and no temporary file; with --force the previous files stay whole."""
    suite = type(ED25519)  # the dealer generate_share_files calls for Ed25519 accounts
    real = suite.trusted_dealer_keygen
    calls = [0]

    def flaky(self: Scheme, *args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(suite, "trusted_dealer_keygen", flaky)
    out = tmp_path / "shares"
    with pytest.raises(KeyboardInterrupt):
        generate_share_files(out, 10)
    assert files_in(out) == []

    monkeypatch.setattr(suite, "trusted_dealer_keygen", real)
    gen = generate_share_files(out, 2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls[0] = 0
    monkeypatch.setattr(suite, "trusted_dealer_keygen", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_share_files(out, 10, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with gen.service_file.open("rb") as f:
        assert len(list(read_plaintext(f))) == 2


def test_generate_fsyncs_files_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    gen = generate_share_files(tmp_path, 2)
    assert synced == ["file", "file", "file", "dir"]
    for path in [gen.service_file, *gen.participant_files.values()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_dev_key_file_is_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        DevKeyFile.create(tmp_path / "k.json")
    assert files_in(tmp_path) == []


def test_killed_generate_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    """``kill -9`` in the middle of ``trio-sign shares generate``: the final names never exist
    (a temporary file may stay behind, under its own hidden name)."""
    out = tmp_path / "shares"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_sign.cli", "shares", "generate", "--accounts", "1000000",
         "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in out.iterdir()):
            assert proc.poll() is None, "generate ended before it was killed"
            assert time.monotonic() < deadline, "generate never started writing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = files_in(out)
    assert names, "the temporary files were being written"
    assert all(n.startswith(".") and n.endswith(".tmp") for n in names), names
