"""Atomic output files: a reader sees the whole file under its final name, or no file at all.

Every file trio_sign writes for someone else to read later (plaintext share files, sealed
bundles, development key files, the parent's copy of a bundle) goes through
:func:`atomic_files`: each file is written under a temporary name in its final directory
(created ``O_EXCL`` with the final mode, so a secret is never readable by others, not even
briefly), flushed and fsynced, then renamed into place, and the directory is fsynced so the
rename itself survives a power cut. An exception (including a cancellation or
``KeyboardInterrupt``) removes the temporary files; a ``kill -9`` can leave one behind under its
``.NAME.XXXXXXXX.tmp`` name, never a truncated file under ``NAME``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Final

#: Buffer of each temporary file (large sequential writes).
BUFFER_BYTES: Final = 1 << 20


def temporary_name(path: Path) -> Path:
    """A fresh hidden name next to ``path``: ``.NAME.<16 hex digits>.tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def fsync_directory(directory: Path) -> None:
    """fsync a directory so the entries renamed into it are durable.

    Error handling: a file system that cannot fsync a directory (``EINVAL``, ``ENOTSUP``,
    ``EBADF`` on some network and FUSE file systems) is accepted silently; other errors raise.
    """
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


_FSYNC_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def _create(tmp: Path, mode: int) -> BinaryIO:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        # The umask may have narrowed the mode; the mode asked for is the one wanted.
        os.fchmod(fd, mode)
        return os.fdopen(fd, "wb", buffering=BUFFER_BYTES)
    except BaseException:
        os.close(fd)
        raise


def _commit(tmp: Path, final: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, final)
        return
    # link() refuses an existing target, so a file that appeared meanwhile is never replaced.
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:
        # File systems without hard links: the check and the rename are not one step here.
        if final.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(final)) from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_files(
    paths: Sequence[Path], *, overwrite: bool = False, mode: int = 0o600
) -> Iterator[list[BinaryIO]]:
    """Write several files that appear under their final names only once all are complete.

    Yields one binary file object per path, in order. When the block ends normally every file
    is flushed and fsynced, then each is renamed to its final name and each directory fsynced.

    Args:
        paths: the final names; their directories must exist.
        overwrite: replace existing files; otherwise an existing file is never touched and
            ``FileExistsError`` is raised (before anything is written if it already exists, at
            the rename if it appeared meanwhile).
        mode: the permission bits of the new files (0600: share files and keys are secrets).

    Cancellation and error handling:
        Any exception inside the block, or while finishing, deletes every temporary file and
        propagates; no final name is created or changed by a failed write. Should a rename fail
        half way through several files, the files already renamed are complete ones.
    """
    finals = [Path(p) for p in paths]
    if not overwrite:
        for final in finals:
            if final.exists():
                raise FileExistsError(errno.EEXIST, "File exists", str(final))
    temps: list[Path] = []
    files: list[BinaryIO] = []
    try:
        for final in finals:
            tmp = temporary_name(final)
            files.append(_create(tmp, mode))
            temps.append(tmp)
        yield files
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, final in zip(temps, finals, strict=True):
            _commit(tmp, final, overwrite)
        for directory in dict.fromkeys(final.parent for final in finals):
            fsync_directory(directory)
    except BaseException:
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, *, overwrite: bool = False, mode: int = 0o600) -> Iterator[BinaryIO]:
    """:func:`atomic_files` for one file."""
    with atomic_files([path], overwrite=overwrite, mode=mode) as (f,):
        yield f
