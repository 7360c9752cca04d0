"""Issue 12 defect 7, the parent's half: the bundle copy is whole or absent, whatever fails."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trio
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

import trio_sign.parent._bundle_copy as bundle_copy_mod
from trio_sign.parent._bundle_copy import (
    BUNDLE_FILE_NAME,
    COPY_CHUNK_BYTES,
    BundleCopyError,
    copy_bundle,
)

DATA = os.urandom(3 * COPY_CHUNK_BYTES + 123)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class FakeBody:
    """An S3 ``StreamingBody``: ``read(n)`` hands out ``data``; ``on_read(i)`` runs first."""

    def __init__(self, data: bytes, on_read: Callable[[int], None] | None = None) -> None:
        self._data = data
        self._pos = 0
        self._reads = 0
        self._on_read = on_read
        self.closed = False

    def read(self, size: int) -> bytes:
        self._reads += 1
        if self._on_read is not None:
            self._on_read(self._reads)
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


class FakeS3:
    def __init__(self, body: FakeBody | None = None, error: Exception | None = None) -> None:
        self.body = body
        self.error = error
        self.asked: list[tuple[str, str]] = []

    def get_object(self, *, Bucket: str, Key: str) -> Any:
        self.asked.append((Bucket, Key))
        if self.error is not None:
            raise self.error
        return {"Body": self.body}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def earlier(work: Path) -> bytes:
    """An earlier, complete copy that a failed copy must leave alone."""
    work.mkdir()
    old = b"an earlier complete bundle"
    (work / BUNDLE_FILE_NAME).write_bytes(old)
    return old


async def test_local_copy_is_whole_private_and_durable(
    tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "bundle.enc"
    src.write_bytes(DATA)
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    out = await copy_bundle(str(src), work)
    assert out == work / BUNDLE_FILE_NAME
    assert out.read_bytes() == DATA
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert synced == ["file", "dir"]
    assert names(work) == [BUNDLE_FILE_NAME]
    src.write_bytes(b"v2")
    await copy_bundle(str(src), work)  # replaces the earlier copy
    assert out.read_bytes() == b"v2"


async def test_missing_source_leaves_the_earlier_copy(work: Path, earlier: bytes) -> None:
    with pytest.raises(BundleCopyError) as info:
        await copy_bundle(str(work.parent / "nope.enc"), work)
    assert info.value.alert == "bundle_unavailable"
    assert "cannot read the bundle" in str(info.value)
    assert "No such file" in str(info.value)
    assert (work / BUNDLE_FILE_NAME).read_bytes() == earlier
    assert names(work) == [BUNDLE_FILE_NAME]


@pytest.mark.parametrize("url", ["s3://", "s3://bucket", "s3://bucket/", "s3:///key"])
async def test_bad_s3_url_is_a_config_error(work: Path, url: str) -> None:
    with pytest.raises(BundleCopyError) as info:
        await copy_bundle(url, work, s3_client=FakeS3())
    assert info.value.alert == "config"
    assert names(work.parent) == []  # not even the work directory


async def test_s3_copy(work: Path) -> None:
    body = FakeBody(DATA)
    s3 = FakeS3(body)
    out = await copy_bundle("s3://bucket/path/to/bundle.enc", work, s3_client=s3)
    assert out.read_bytes() == DATA
    assert s3.asked == [("bucket", "path/to/bundle.enc")]
    assert body.closed


async def test_s3_refusal_is_one_line(work: Path, earlier: bytes) -> None:
    error = ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}}, "GetObject")
    with pytest.raises(BundleCopyError) as info:
        await copy_bundle("s3://b/k", work, s3_client=FakeS3(error=error))
    assert str(info.value) == "cannot fetch the bundle s3://b/k: NoSuchKey: gone"
    assert info.value.alert == "bundle_unavailable"
    assert names(work) == [BUNDLE_FILE_NAME]
    assert (work / BUNDLE_FILE_NAME).read_bytes() == earlier


async def test_s3_body_cut_short_deletes_the_partial_copy(work: Path, earlier: bytes) -> None:
    def cut(reads: int) -> None:
        if reads == 3:  # two chunks already written
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    with pytest.raises(BundleCopyError) as info:
        await copy_bundle("s3://b/k", work, s3_client=FakeS3(FakeBody(DATA, cut)))
    assert "Connection reset" in str(info.value)
    assert names(work) == [BUNDLE_FILE_NAME]
    assert (work / BUNDLE_FILE_NAME).read_bytes() == earlier


class FullDisk:
    """A file that takes ``free`` bytes, then fails with ENOSPC."""

    def __init__(self, f: BinaryIO, free: int) -> None:
        self._f = f
        self._free = free

    def write(self, data: bytes) -> int:
        if len(data) > self._free:
            self._f.write(data[: self._free])
            self._free = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._free -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


async def test_full_disk_deletes_the_partial_copy(
    tmp_path: Path, work: Path, earlier: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "bundle.enc"
    src.write_bytes(DATA)
    real_create = bundle_copy_mod._create

    def create(tmp: Path) -> Any:
        return FullDisk(real_create(tmp), COPY_CHUNK_BYTES + 10)

    monkeypatch.setattr(bundle_copy_mod, "_create", create)
    with pytest.raises(BundleCopyError) as info:
        await copy_bundle(str(src), work)
    assert str(info.value) == (
        f"cannot write the bundle copy in {work}: No space left on device ([bundle] work_dir)"
    )
    assert info.value.alert == "bundle_unavailable"
    assert names(work) == [BUNDLE_FILE_NAME]
    assert (work / BUNDLE_FILE_NAME).read_bytes() == earlier


async def test_cancellation_mid_copy_deletes_the_partial_copy(work: Path, earlier: bytes) -> None:
    with trio.CancelScope() as scope:

        def cancel_on_third_read(reads: int) -> None:
            if reads == 3:
                trio.from_thread.run_sync(scope.cancel)

        body = FakeBody(DATA, cancel_on_third_read)
        await copy_bundle("s3://b/k", work, s3_client=FakeS3(body))
    assert scope.cancelled_caught
    assert body.closed
    assert names(work) == [BUNDLE_FILE_NAME]
    assert (work / BUNDLE_FILE_NAME).read_bytes() == earlier


async def test_unwritable_work_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(BundleCopyError) as info:
        await copy_bundle(str(blocker), blocker / "work")
    assert info.value.alert == "bundle_unavailable"
    assert f"cannot write the bundle copy in {blocker / 'work'}" in str(info.value)
