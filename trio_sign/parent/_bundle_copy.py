"""The parent's copy of the sealed bundle: whole or absent, never a partial file.

The parent copies the bundle (ciphertext only) from a local path or ``s3://bucket/key`` into its
work directory before the enclave preloads it. The copy is written under a hidden temporary
name in that directory, fsynced, renamed to ``service_key_shares.json.enc`` and the directory
fsynced (as :mod:`trio_sign._atomic` does for share files); any failure (the source vanishing, a
full disk, S3 errors) or a cancellation deletes the temporary file and leaves the previous copy,
if any, untouched. The enclave would refuse a truncated bundle anyway (the sealed format detects
truncation); this keeps the parent's disk and its errors clean: the alert names the real cause
instead of a later ``truncated`` preload failure.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

import trio

from .._atomic import fsync_directory, temporary_name
from .._errors import TrioSignError

log = logging.getLogger("trio_sign.parent.bundle")

#: The name of the parent's copy inside its work directory.
BUNDLE_FILE_NAME: Final = "service_key_shares.json.enc"
#: Bytes read and written per step; cancellation takes effect between steps.
COPY_CHUNK_BYTES: Final = 1 << 20


class BundleCopyError(TrioSignError):
    """The bundle could not be copied; nothing was left under the copy's name.

    Attributes:
        alert: the alert code: ``"config"`` for a malformed ``s3://`` URL, otherwise
            ``"bundle_unavailable"`` (missing file, S3 refusal, full disk...).
    """

    def __init__(self, message: str, *, alert: str) -> None:
        super().__init__(message)
        self.alert = alert


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class S3Client(Protocol):
    """The one boto3 ``s3`` call used (boto3 is untyped)."""

    def get_object(self, *, Bucket: str, Key: str) -> Any: ...


def _parse_s3(source: str) -> tuple[str, str]:
    bucket, _, key = source.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise BundleCopyError(
            f"bad bundle URL {source!r}: expected s3://bucket/key", alert="config"
        )
    return bucket, key


def _default_s3_client() -> S3Client:
    import boto3  # type: ignore[import-untyped]  # boto3 ships no types

    client: S3Client = boto3.client("s3")
    return client


async def copy_bundle(source: str, work_dir: Path, *, s3_client: S3Client | None = None) -> Path:
    """Copy the sealed bundle into ``work_dir`` atomically; returns the copy's path.

    Args:
        source: a local path, or ``s3://bucket/key`` (fetched with boto3's default credential
            chain and region).
        work_dir: created if missing; the copy is ``work_dir / BUNDLE_FILE_NAME``.
        s3_client: a boto3 ``s3`` client to use instead of a default one.

    Cancellation:
        Checked between 1 MiB steps (each step's read or write runs in a worker thread). On
        cancellation the temporary file is deleted before ``Cancelled`` propagates.

    Error handling:
        ``BundleCopyError`` with ``alert`` set (``config`` for a malformed URL, else
        ``bundle_unavailable``) and a one-line message naming the source or the work
        directory; the temporary file is deleted and an earlier copy is left as it was.
    """
    s3 = source.startswith("s3://")
    bucket_key = _parse_s3(source) if s3 else None
    target = work_dir / BUNDLE_FILE_NAME
    try:
        await trio.to_thread.run_sync(
            functools.partial(work_dir.mkdir, parents=True, exist_ok=True)
        )
    except OSError as exc:
        raise _write_error(work_dir, exc) from exc
    tmp = temporary_name(target)
    out: BinaryIO | None = None
    committed = False
    try:
        try:
            out = await trio.to_thread.run_sync(_create, tmp)
        except OSError as exc:
            raise _write_error(work_dir, exc) from exc
        if bucket_key is not None:
            size = await _copy_from_s3(source, bucket_key, s3_client, out, work_dir)
        else:
            size = await _copy_from_path(source, out, work_dir)
        try:
            await trio.to_thread.run_sync(_finish, out)
            await trio.to_thread.run_sync(os.replace, tmp, target)
            committed = True
            await trio.to_thread.run_sync(fsync_directory, work_dir)
        except OSError as exc:
            raise _write_error(work_dir, exc) from exc
    except BaseException:
        # Plain system calls, no await: they run even while cancelled.
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()
        if not committed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    log.info("bundle fetched", extra={"source": source, "bytes": size})
    return target


def _create(tmp: Path) -> BinaryIO:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def _open_source(source: str) -> BinaryIO:
    return open(source, "rb")  # closed by the caller


def _finish(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())
    out.close()


def _write_error(work_dir: Path, exc: OSError) -> BundleCopyError:
    return BundleCopyError(
        f"cannot write the bundle copy in {work_dir}: {exc.strerror or exc} ([bundle] work_dir)",
        alert="bundle_unavailable",
    )


async def _pump(src: _Readable, out: BinaryIO, source: str, work_dir: Path) -> int:
    """Copy ``src`` to ``out`` in steps; read errors name the source, write errors the dir."""
    size = 0
    while True:
        try:
            chunk = await trio.to_thread.run_sync(src.read, COPY_CHUNK_BYTES)
        except OSError as exc:
            raise BundleCopyError(
                f"cannot read the bundle {source}: {exc.strerror or exc}",
                alert="bundle_unavailable",
            ) from exc
        if not chunk:
            return size
        try:
            await trio.to_thread.run_sync(out.write, chunk)
        except OSError as exc:
            raise _write_error(work_dir, exc) from exc
        size += len(chunk)


async def _copy_from_path(source: str, out: BinaryIO, work_dir: Path) -> int:
    try:
        src = await trio.to_thread.run_sync(_open_source, source)
    except OSError as exc:
        raise BundleCopyError(
            f"cannot read the bundle {source}: {exc.strerror or exc}", alert="bundle_unavailable"
        ) from exc
    try:
        return await _pump(src, out, source, work_dir)
    finally:
        src.close()


async def _copy_from_s3(
    source: str,
    bucket_key: tuple[str, str],
    client: S3Client | None,
    out: BinaryIO,
    work_dir: Path,
) -> int:
    bucket, key = bucket_key
    body: Any = None
    try:
        if client is None:
            client = await trio.to_thread.run_sync(_default_s3_client)
        response = await trio.to_thread.run_sync(
            functools.partial(client.get_object, Bucket=bucket, Key=key)
        )
        body = response["Body"]
        return await _pump(body, out, source, work_dir)
    except BundleCopyError:
        raise
    except Exception as exc:
        # botocore's ClientError, NoCredentialsError, EndpointConnectionError, a body cut
        # short (IncompleteReadError, ReadTimeoutError): anything S3 raised.
        raise BundleCopyError(
            f"cannot fetch the bundle {source}: {_s3_reason(exc)}", alert="bundle_unavailable"
        ) from exc
    finally:
        if body is not None:
            with contextlib.suppress(Exception):
                body.close()


def _s3_reason(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error")
        if isinstance(error, dict) and error.get("Code"):
            return f"{error['Code']}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
