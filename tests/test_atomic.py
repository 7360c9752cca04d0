"""trio_sign._atomic: whole files under their final names, or nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from trio_sign._atomic import atomic_file, atomic_files


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_file_that_appears_meanwhile_is_never_replaced(tmp_path: Path) -> None:
    final = tmp_path / "out.json"

    def collide() -> None:
        with atomic_file(final) as f:
            f.write(b"new")
            final.write_bytes(b"someone else's")

    with pytest.raises(FileExistsError):
        collide()
    assert final.read_bytes() == b"someone else's"
    assert names(tmp_path) == ["out.json"]


def test_overwrite_replaces_and_existing_is_refused_up_front(tmp_path: Path) -> None:
    final = tmp_path / "out.json"
    final.write_bytes(b"old")
    with pytest.raises(FileExistsError):  # noqa: SIM117 - the block must not run
        with atomic_file(final):
            raise AssertionError("not reached")
    with atomic_file(final, overwrite=True) as f:
        f.write(b"new")
    assert final.read_bytes() == b"new"


def test_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        with atomic_files([tmp_path / "a", tmp_path / "b"], mode=0o640) as (a, b):
            a.write(b"a")
            b.write(b"b")
    finally:
        os.umask(old)
    assert [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in "ab"] == [0o640, 0o640]


def test_nothing_is_renamed_until_every_file_is_complete(tmp_path: Path) -> None:
    def fail_half_way() -> None:
        with atomic_files([tmp_path / "a", tmp_path / "b"]) as (a, _b):
            a.write(b"a")
            assert names(tmp_path)[0].startswith(".a.")
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail_half_way()
    assert names(tmp_path) == []
