"""The parent's delta store and its end of the deltas channel (docs/key-lifecycle.md §3, §4).

Delta bundles are sealed and signed inside the enclave; the parent keeps them durably and hands
them back, and never needs to read them (it checks only their framing and header, without a
key, to name their fingerprint and refuse to store something that is not a delta).

The store
---------
:class:`DeltaStore` is three blocking calls, run in worker threads by the async code here so the
event loop never waits on an ``fsync`` or on S3: ``put`` (put-if-absent), ``list`` and ``get``.
Objects are named ``delta-<sequence, 8 decimal digits>.enc`` and are at most
``max_delta_bytes`` long, on the way in and on the way out.

- :class:`FileDeltaStore` (``[deltas] location = "file:///dir"``): the bytes go to a temporary
  name in the same directory, are ``fsync``\\ ed, linked to the final name with ``link(2)``
  (which refuses an existing name), the directory is ``fsync``\\ ed and the temporary name
  removed. An existing object with the same bytes counts as stored (an enclave's retry), other
  bytes are a conflict. A file system without hard links is refused (the check and the rename
  would not be one step). Temporary names are ``.delta-NNNNNNNN.enc.<host>.<random>.tmp``:
  :meth:`FileDeltaStore.recover`, at the parent's start, removes this host's (a crash of this
  parent left them) and other hosts' older than an hour (a location shared by replicas on a
  network file system: another parent may be writing its own right now).
- :class:`S3DeltaStore` (``"s3://bucket/prefix/"``): ``PutObject`` with ``If-None-Match: *``;
  a ``PreconditionFailed`` (412) fetches the object and compares. Any other refusal,
  ``ConditionalRequestConflict`` (409, a concurrent conditional write still in progress)
  included, is a failure: nothing is known to be stored, so the enclave is told
  ``delta_store_failed`` and creates nothing. ``ListObjectsV2`` is read page by page.

``list`` returns the sequences from 1 up to the first missing one (:class:`DeltaListing`);
what lies beyond a gap is not served, and :class:`Deltas` raises the ``delta_gap`` alert once
per gap.

The deltas channel
------------------
The enclave connects (``hello {channel: "deltas"}``; the parent sends no hello back) and then,
in any order::

    enclave                                     parent
    delta_store {sequence, total_bytes}   ->
    delta_chunk {data} ... delta_end {}   ->    checks, then put-if-absent (a worker thread)
                                          <-    delta_stored {sequence, sha256}
                                                | delta_conflict {sequence}  (the winner is
                                                  pushed next, without waiting for a poll)
                                                | delta_store_failed {sequence, reason}
                                          <-    delta_push {sequence, total_bytes}
                                          <-    delta_chunk {data} ... delta_end {}
    delta_loaded {sequence, head, accounts} ->  (or delta_refused {sequence, reason})

Rules the parent keeps and expects (the doc leaves them open):

- A ``delta_store`` is followed only by its ``delta_chunk`` frames and ``delta_end``; anything
  else in between, a ``total_bytes`` over ``max_delta_bytes``, or chunks that add up to more
  or less than ``total_bytes`` is a protocol error: the connection is closed and nothing is
  stored.
- The parent writes each reply and each push as one unit (a push's frames are never
  interleaved with a reply), one push at a time: it waits for ``delta_loaded`` or
  ``delta_refused`` (at most ``answer_timeout_s``) before the next. The enclave must keep
  reading while it sends.
- A ``delta_store`` that is not a sealed bundle of kind ``delta`` (or whose header names
  another sequence) is answered ``delta_store_failed`` with a reason starting ``not_a_delta``.
- The watcher pushes every stored sequence above the enclave's position: its last
  ``delta_loaded`` (at boot, ``preload_result.deltas``, or every delta the boot streamed when
  the enclave does not say), and any sequence the enclave stored itself on this connection
  (it sealed it, so it holds it; it should still send ``delta_loaded`` once it has loaded it).
- A refused delta raises the ``delta_refused`` alert and is not pushed again before a back-off
  (``refused_backoff_initial_s``, doubling up to ``refused_backoff_max_s``) has passed.
- A newer deltas connection replaces an older one (an enclave that reconnects). The hello is
  not authenticated, so whoever can reach the listener can do this too: a put under way still
  finishes and the enclave's next connection displaces the intruder and is pushed what it
  lacks (a delay only; refusing newcomers would let a squatter hold the channel). The same
  reach also lets a client claim a position (``delta_loaded``) or store a well-framed delta
  the parent cannot verify, so the listener must be reachable by the enclave alone.

Compaction (docs/compaction.md) uses the same connection: ``compaction_key_request`` is
relayed to KMS ``GenerateDataKey`` with ``Recipient`` (``compaction_kms``; the answer is
``compaction_key`` or ``compaction_key_failed``), and ``base_store {sha256, total_bytes}``
with its ``delta_chunk`` frames and ``delta_end`` is checked (a sealed base with
``compacts`` whose fingerprint is ``sha256``, at most ``max_base_bytes``) and written
put-if-absent as ``base-<sha256>.enc`` beside the deltas (``base_stored {sha256, object}``
once durable, else ``base_store_failed``). Bases are never listed, served or pushed as deltas.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import hashlib
import io
import logging
import os
import re
import secrets
import socket
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import trio

from .._atomic import fsync_directory
from .._errors import ShareFileError, TrioSignError
from ..nitro import ChannelClosed, ChannelMessage, ChannelProtocolError, MessageStream
from ..nitro._channel import (
    MAX_DELTA_CHUNK_BYTES,
    MAX_DELTA_SEQUENCE,
    MAX_REASON_CHARS,
    BaseStoredMessage,
    BaseStoreFailedMessage,
    BaseStoreMessage,
    ChunkedBody,
    CompactionKeyFailedMessage,
    CompactionKeyMessage,
    CompactionKeyRequestMessage,
    DeltaConflictMessage,
    DeltaLoadedMessage,
    DeltaPushMessage,
    DeltaRefusedMessage,
    DeltaStoredMessage,
    DeltaStoreFailedMessage,
    DeltaStoreMessage,
    PreloadResultMessage,
    chunked_frames,
)
from ..rpc import RateLimitedLog
from ._channels import (
    CHANNEL_LOG_INTERVAL_S,
    HELLO_TIMEOUT_S,
    MAX_CHANNEL_CONNECTIONS,
    ChannelGuard,
    serve_guarded,
)

log = logging.getLogger("trio_sign.parent.deltas")

#: ``[deltas] max_delta_bytes`` by default.
DEFAULT_MAX_DELTA_BYTES: Final = 16 * 1024 * 1024
#: ``[deltas] poll_interval_s`` by default.
DEFAULT_POLL_INTERVAL_S: Final = 1.0
#: How long the watcher waits for the enclave's answer to one push.
DEFAULT_ANSWER_TIMEOUT_S: Final = 120.0
#: The first wait before a refused delta is pushed again; it doubles up to the maximum.
DEFAULT_REFUSED_BACKOFF_INITIAL_S: Final = 10.0
DEFAULT_REFUSED_BACKOFF_MAX_S: Final = 600.0
#: Another host's temporary file older than this is a crash's leftover.
STALE_TEMPORARY_S: Final = 3600.0

_NAME = re.compile(r"delta-(\d{8})\.enc")
_TEMPORARY = re.compile(
    r"\.(?:delta-\d{8}|base-[0-9a-f]{64})\.enc\.([0-9a-f]{12})\.[0-9a-f]{16}\.tmp"
)
#: ``[deltas] max_base_bytes`` by default: the largest compacted base stored (held in memory
#: while it arrives).
DEFAULT_MAX_BASE_BYTES: Final = 1 << 30
#: ``link(2)`` errors of file systems without hard links.
_NO_HARD_LINKS: Final = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV})

AlertFn = Callable[[str, str], None]
#: A compaction's KMS call: ``(attestation_document, kms_key_id, encryption_context) ->
#: (key_arn, ciphertext_blob, ciphertext_for_recipient)`` (``GenerateDataKey`` with
#: ``Recipient``; :func:`kms_compaction_relay`).
CompactionKms = Callable[[bytes, str, Mapping[str, str]], Awaitable[tuple[str, bytes, bytes]]]
#: The encryption context of a compacted base's data key (the enclave writes it in the header).
COMPACTION_CONTEXT: Final = {"format": "trio-sign/sealed-key-shares"}


def kms_compaction_relay(kms_client: Any) -> CompactionKms:
    """The parent's relay over boto3: :class:`~trio_sign.kms.KmsRecipientDataKey` for the key
    the enclave names (the enclave checks it against its pinned list; KMS refuses an
    attestation the key policy does not admit). The parent never holds the data key."""
    from ..kms import KmsRecipientDataKey

    async def relay(
        document: bytes, kms_key_id: str, context: Mapping[str, str]
    ) -> tuple[str, bytes, bytes]:
        return await KmsRecipientDataKey(kms_client, kms_key_id)(document, context)

    return relay


def object_name(sequence: int) -> str:
    """``delta-00000001.enc`` for sequence 1."""
    _check_sequence(sequence)
    return f"delta-{sequence:08d}.enc"


def parse_object_name(name: str) -> int | None:
    """The sequence an object name carries, or None for any other name (sequence 0 too)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    sequence = int(match.group(1))
    return sequence if sequence >= 1 else None


def _check_sequence(sequence: int) -> None:
    if isinstance(sequence, bool) or not 1 <= sequence <= MAX_DELTA_SEQUENCE:
        raise ValueError(f"delta sequence {sequence!r} is not in 1..{MAX_DELTA_SEQUENCE}")


# -- errors and results ------------------------------------------------------------------------


#: Test only (tests/test_crash_dkg.py, docs/testing-crashes.md): ``parent:before_write`` or
#: ``parent:after_write`` (the delta durable, ``delta_stored`` not sent) in this environment
#: variable (comma-separated, beside the enclave's steps) make the parent die there with
#: ``os._exit(137)``. Read only by a development parent: ``trio-sign parent --config FILE``
#: whose ``[enclave] backend`` is ``"local"`` (the local NSM).
CRASH_AT_ENV: Final = "TRIO_SIGN_TEST_CRASH_AT"


def crash_point(step: str) -> None:
    """Test only: die here, like SIGKILL (no cleanup, exit 137), if :data:`CRASH_AT_ENV` names
    ``parent:<step>`` and this parent runs a local enclave; otherwise do nothing."""
    wanted = os.environ.get(CRASH_AT_ENV)
    if not wanted or f"parent:{step}" not in wanted.split(","):
        return
    argv = sys.argv[1:]
    backend = None
    if "parent" in argv and "--config" in argv[:-1]:
        try:
            with open(argv[argv.index("--config") + 1], "rb") as f:
                backend = tomllib.load(f).get("enclave", {}).get("backend")
        except (OSError, tomllib.TOMLDecodeError, AttributeError):
            backend = None
    if backend != "local":
        log.warning("%s ignored: not a parent of a local enclave", CRASH_AT_ENV)
        return
    log.warning("test crash at parent:%s", step)
    os._exit(137)


class DeltaStoreError(TrioSignError):
    """The delta store could not be read or written (I/O, S3, an object too large or missing).
    The message names the location and the object, never their contents."""


class PutOutcome(enum.Enum):
    """What a put-if-absent did."""

    STORED = "stored"  # the object is new and durable
    ALREADY_STORED = "already_stored"  # the same bytes were already there (and are durable)
    CONFLICT = "conflict"  # other bytes hold the sequence


@dataclass(frozen=True, slots=True)
class DeltaListing:
    """The store's objects: ``sequences`` are 1, 2, ... up to the first missing one;
    ``beyond_gap`` are the objects after it (not served)."""

    sequences: tuple[int, ...] = ()
    beyond_gap: tuple[int, ...] = ()

    @classmethod
    def of(cls, found: Sequence[int]) -> DeltaListing:
        ordered = sorted(set(found))
        n = 0
        while n < len(ordered) and ordered[n] == n + 1:
            n += 1
        return cls(tuple(ordered[:n]), tuple(ordered[n:]))

    @property
    def head(self) -> int:
        """The last sequence served (0: none)."""
        return self.sequences[-1] if self.sequences else 0

    @property
    def gap(self) -> int | None:
        """The first missing sequence when objects lie beyond it, else None."""
        return self.head + 1 if self.beyond_gap else None


class DeltaStore(Protocol):
    """Where deltas are kept. Blocking calls: run them in a worker thread.

    Error handling: :class:`DeltaStoreError` for I/O and service failures, an object over
    ``max_delta_bytes`` and (``get``) a missing object; ``ValueError`` for a sequence outside
    1..99,999,999.
    """

    @property
    def location(self) -> str: ...

    @property
    def max_delta_bytes(self) -> int: ...

    def put(self, sequence: int, data: bytes) -> PutOutcome: ...

    def list(self) -> DeltaListing: ...

    def get(self, sequence: int) -> bytes: ...


def base_object_name(sha256: str) -> str:
    """``base-<sha256>.enc``: a compacted base in the delta location (docs/compaction.md)."""
    if re.fullmatch(r"[0-9a-f]{64}", sha256) is None:
        raise ValueError("a base's name carries its 64 lowercase hex fingerprint")
    return f"base-{sha256}.enc"


@runtime_checkable
class BaseStore(Protocol):
    """A store that also keeps compacted bases (both built-in stores do)."""

    def put_base(self, sha256: str, data: bytes) -> tuple[PutOutcome, str]:
        """Put-if-absent ``base-<sha256>.enc``; the outcome and the object's URL."""
        ...


def _too_large(what: str, size: int, limit: int) -> DeltaStoreError:
    return DeltaStoreError(
        f"{what} is {size} bytes, over max_delta_bytes ({limit}; [deltas] max_delta_bytes)"
    )


# -- the file store ----------------------------------------------------------------------------


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


class FileDeltaStore:
    """Deltas as files in one directory (a local disk, or a file system shared by replicas that
    supports ``link(2)`` and ``fsync``).

    Args:
        directory: where the objects live (created by :meth:`recover`).
        max_delta_bytes: the largest object written or read.
        host_tag: names this host's temporary files (default: from the host name).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES,
        host_tag: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._max = max_delta_bytes
        self._tag = host_tag if host_tag is not None else _host_tag()
        if not re.fullmatch(r"[0-9a-f]{12}", self._tag):
            raise ValueError("host_tag must be 12 lowercase hex digits")

    @property
    def location(self) -> str:
        return f"file://{self.directory}"

    @property
    def max_delta_bytes(self) -> int:
        return self._max

    def recover(self, *, stale_after_s: float = STALE_TEMPORARY_S) -> int:
        """At the parent's start: create the directory if missing and remove leftover
        temporary files (this host's, and other hosts' older than ``stale_after_s``); return
        how many were removed. A leftover is never visible as an object: it was not linked, or
        it was and the object is whole."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            removed = 0
            now = time.time()
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    match = _TEMPORARY.fullmatch(entry.name)
                    if match is None:
                        continue
                    ours = match.group(1) == self._tag
                    with contextlib.suppress(FileNotFoundError):
                        if ours or now - entry.stat().st_mtime > stale_after_s:
                            os.unlink(entry.path)
                            removed += 1
            if removed:
                fsync_directory(self.directory)
        except OSError as exc:
            raise DeltaStoreError(
                f"cannot prepare the delta directory {self.directory}: {exc.strerror or exc}"
            ) from exc
        if removed:
            log.warning(
                "removed temporary delta files left by a crash",
                extra={"count": removed, "location": self.location},
            )
        return removed

    def put(self, sequence: int, data: bytes) -> PutOutcome:
        """Put-if-absent, durable before it returns ``STORED`` or ``ALREADY_STORED``."""
        name = object_name(sequence)
        if len(data) > self._max:
            raise _too_large(f"delta {sequence}", len(data), self._max)
        final = self.directory / name
        tmp = self.directory / f".{name}.{self._tag}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)
            except FileExistsError:
                if self._read(final, sequence) != data:
                    log.info("delta conflict", extra={"sequence": sequence})
                    return PutOutcome.CONFLICT
                # Its writer may have died before fsyncing the directory: make it durable.
                fsync_directory(self.directory)
                return PutOutcome.ALREADY_STORED
            except OSError as exc:
                if exc.errno in _NO_HARD_LINKS:
                    raise DeltaStoreError(
                        f"{self.location} does not support hard links (link(2): "
                        f"{exc.strerror}); put-if-absent needs them ([deltas] location)"
                    ) from exc
                raise
            fsync_directory(self.directory)
            return PutOutcome.STORED
        except OSError as exc:
            raise DeltaStoreError(
                f"cannot store {name} in {self.location}: {exc.strerror or exc}"
            ) from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def put_base(self, sha256: str, data: bytes) -> tuple[PutOutcome, str]:
        """Put-if-absent a compacted base (as :meth:`put`: temporary name, ``fsync``,
        ``link(2)``, directory ``fsync``): never visible half written."""
        name = base_object_name(sha256)
        final = self.directory / name
        url = f"{self.location.rstrip('/')}/{name}"
        tmp = self.directory / f".{name}.{self._tag}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)
            except FileExistsError:
                if final.read_bytes() != data:
                    return PutOutcome.CONFLICT, url
                fsync_directory(self.directory)
                return PutOutcome.ALREADY_STORED, url
            fsync_directory(self.directory)
            return PutOutcome.STORED, url
        except OSError as exc:
            raise DeltaStoreError(
                f"cannot store {name} in {self.location}: {exc.strerror or exc}"
            ) from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def list(self) -> DeltaListing:
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise DeltaStoreError(f"cannot list {self.location}: {exc.strerror or exc}") from exc
        return DeltaListing.of([s for s in map(parse_object_name, names) if s is not None])

    def get(self, sequence: int) -> bytes:
        return self._read(self.directory / object_name(sequence), sequence)

    def _read(self, path: Path, sequence: int) -> bytes:
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > self._max:
                    raise _too_large(f"stored delta {sequence}", size, self._max)
                data = f.read(self._max + 1)
        except FileNotFoundError as exc:
            raise DeltaStoreError(f"delta {sequence} is not in {self.location}") from exc
        except OSError as exc:
            raise DeltaStoreError(
                f"cannot read {path.name} in {self.location}: {exc.strerror or exc}"
            ) from exc
        if len(data) > self._max:
            raise _too_large(f"stored delta {sequence}", len(data), self._max)
        return data


# -- the S3 store ------------------------------------------------------------------------------


class S3Client(Protocol):
    """The boto3 ``s3`` calls used (boto3 is untyped)."""

    def put_object(self, **kwargs: Any) -> Any: ...

    def get_object(self, **kwargs: Any) -> Any: ...

    def list_objects_v2(self, **kwargs: Any) -> Any: ...


def _s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of a botocore ``ClientError`` (duck-typed)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    code = error.get("Code") if isinstance(error, dict) else None
    status = meta.get("HTTPStatusCode") if isinstance(meta, dict) else None
    return (str(code) if code is not None else None), (status if isinstance(status, int) else None)


def _s3_reason(exc: BaseException) -> str:
    code, _ = _s3_error(exc)
    return code if code is not None else f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


class S3DeltaStore:
    """Deltas as S3 objects under ``prefix`` (``""`` or ending in ``/``).

    Args:
        client: a boto3 ``s3`` client (injected: tests use botocore's ``Stubber``).
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self._client = client
        self.bucket = bucket
        self.prefix = prefix
        self._max = max_delta_bytes

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def max_delta_bytes(self) -> int:
        return self._max

    def _key(self, sequence: int) -> str:
        return self.prefix + object_name(sequence)

    def put(self, sequence: int, data: bytes) -> PutOutcome:
        key = self._key(sequence)
        if len(data) > self._max:
            raise _too_large(f"delta {sequence}", len(data), self._max)
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:  # botocore's ClientError and transport errors
            code, status = _s3_error(exc)
            if code != "PreconditionFailed" and status != 412:
                raise DeltaStoreError(
                    f"cannot store {key} in s3://{self.bucket}: {_s3_reason(exc)}"
                ) from exc
            if self.get(sequence) != data:
                log.info("delta conflict", extra={"sequence": sequence})
                return PutOutcome.CONFLICT
            return PutOutcome.ALREADY_STORED
        return PutOutcome.STORED

    def put_base(self, sha256: str, data: bytes) -> tuple[PutOutcome, str]:
        """``PutObject`` of ``base-<sha256>.enc`` with ``If-None-Match: *``."""
        key = self.prefix + base_object_name(sha256)
        url = f"s3://{self.bucket}/{key}"
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:  # botocore's ClientError and transport errors
            code, status = _s3_error(exc)
            if code != "PreconditionFailed" and status != 412:
                raise DeltaStoreError(
                    f"cannot store {key} in s3://{self.bucket}: {_s3_reason(exc)}"
                ) from exc
            body: Any = None
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
                same = body.read(len(data) + 1) == data
            except Exception as read_exc:
                raise DeltaStoreError(
                    f"cannot read {key} in s3://{self.bucket}: {_s3_reason(read_exc)}"
                ) from read_exc
            finally:
                if body is not None:
                    with contextlib.suppress(Exception):
                        body.close()
            return (PutOutcome.ALREADY_STORED if same else PutOutcome.CONFLICT), url
        return PutOutcome.STORED, url

    def list(self) -> DeltaListing:
        found: list[int] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + "delta-"}
        try:
            while True:
                page = self._client.list_objects_v2(**kwargs)
                for item in page.get("Contents", ()):
                    key = item.get("Key", "")
                    if key.startswith(self.prefix):
                        sequence = parse_object_name(key[len(self.prefix) :])
                        if sequence is not None:
                            found.append(sequence)
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    break
                kwargs["ContinuationToken"] = token
        except Exception as exc:
            raise DeltaStoreError(f"cannot list {self.location}: {_s3_reason(exc)}") from exc
        return DeltaListing.of(found)

    def get(self, sequence: int) -> bytes:
        key = self._key(sequence)
        body: Any = None
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"]
            size = response.get("ContentLength")
            if isinstance(size, int) and size > self._max:
                raise _too_large(f"stored delta {sequence}", size, self._max)
            data: bytes = body.read(self._max + 1)
        except DeltaStoreError:
            raise
        except Exception as exc:
            code, status = _s3_error(exc)
            if code in ("NoSuchKey", "404") or status == 404:
                raise DeltaStoreError(f"delta {sequence} is not in {self.location}") from exc
            raise DeltaStoreError(
                f"cannot read {key} in {self.location}: {_s3_reason(exc)}"
            ) from exc
        finally:
            if body is not None:
                with contextlib.suppress(Exception):
                    body.close()
        if len(data) > self._max:
            raise _too_large(f"stored delta {sequence}", len(data), self._max)
        return data


def open_delta_store(
    location: str,
    *,
    max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES,
    s3_client: S3Client | None = None,
) -> DeltaStore:
    """The store a ``[deltas] location`` names (blocking: the file store's :meth:`recover`
    runs here). ``file://`` takes the rest as a path; ``s3://bucket/prefix/`` uses
    ``s3_client`` or boto3's default credential chain and region."""
    if location.startswith("file://"):
        store = FileDeltaStore(Path(location[len("file://") :]), max_delta_bytes=max_delta_bytes)
        store.recover()
        return store
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"bad delta location {location!r}: expected s3://bucket/prefix/")
        if s3_client is None:
            import boto3  # type: ignore[import-untyped]  # boto3 ships no types

            s3_client = boto3.client("s3")
        assert s3_client is not None
        return S3DeltaStore(s3_client, bucket, prefix, max_delta_bytes=max_delta_bytes)
    raise ValueError(f"bad delta location {location!r}: expected file:///path or s3://bucket/")


# -- what the parent checks of a delta it is asked to store ------------------------------------


class NotADelta(TrioSignError):
    """Bytes sent to be stored are not a sealed delta bundle for that sequence."""


def delta_fingerprint(data: bytes, sequence: int) -> str:
    """The fingerprint (hex) of a sealed delta bundle, checked without a key: its framing, a
    header of ``kind`` ``delta``, and (when the header names one) the same ``sequence``.

    Error handling: :class:`NotADelta` says what is wrong.
    """
    from ..shares import inspect_sealed

    try:
        header, end = inspect_sealed(io.BytesIO(data))
    except (ShareFileError, ValueError) as exc:
        raise NotADelta(f"not a sealed bundle ({exc})") from None
    if header.get("kind") != "delta":
        raise NotADelta(f"the bundle's kind is {header.get('kind', 'base')!r}, not 'delta'")
    if "sequence" in header and header["sequence"] != sequence:
        raise NotADelta(f"the header's sequence is {header['sequence']!r}, not {sequence}")
    return end.sha256_hex


def base_fingerprint(data: bytes, sha256: str) -> str:
    """Check, without a key, that ``data`` is a compacted base (framing, a header of kind
    ``base`` with ``compacts``) whose fingerprint is ``sha256``.

    Error handling: :class:`NotADelta` says what is wrong.
    """
    from ..shares import inspect_sealed

    try:
        header, end = inspect_sealed(io.BytesIO(data))
    except (ShareFileError, ValueError) as exc:
        raise NotADelta(f"not a sealed bundle ({exc})") from None
    if header.get("kind", "base") != "base" or "compacts" not in header:
        raise NotADelta("not a compacted base (kind base with compacts)")
    if end.sha256_hex != sha256:
        raise NotADelta(f"its fingerprint is {end.sha256_hex}, not {sha256}")
    return end.sha256_hex


def delta_frames(
    sequence: int, data: bytes, chunk_bytes: int = MAX_DELTA_CHUNK_BYTES
) -> Iterator[ChannelMessage]:
    """``delta_push``, the ``delta_chunk`` frames, ``delta_end``: one delta on the wire."""
    return chunked_frames(
        DeltaPushMessage(sequence=sequence, total_bytes=len(data)), data, chunk_bytes
    )


# -- the shared state: the store, what the enclave holds, counters, alerts ---------------------


@dataclass(slots=True)
class DeltaStats:
    """What health reports about deltas.

    Attributes:
        store_head: the store's head sequence at the last listing (None: not listed yet).
        enclave_sequence: the enclave's position: at boot what it loaded, then its last
            ``delta_loaded`` (None before the boot's preload finished).
        enclave_head, enclave_accounts: from its last ``delta_loaded`` (or its boot result).
        written_total: new objects this parent wrote; pushed_total: deltas pushed on the
            deltas channel; conflicts_total: puts that found other bytes; refused_total: pushes
            the enclave refused; store_failures_total: failed store calls.
        connected: a deltas connection is up.
    """

    store_head: int | None = None
    enclave_sequence: int | None = None
    enclave_head: str | None = None
    enclave_accounts: int | None = None
    written_total: int = 0
    pushed_total: int = 0
    conflicts_total: int = 0
    refused_total: int = 0
    store_failures_total: int = 0
    connected: bool = False


async def _to_thread(fn: Callable[..., Any], *args: Any) -> Any:
    # A put is waited for even when cancelled: it finishes (or cleans up) before we go on.
    return await trio.to_thread.run_sync(fn, *args)


async def _to_thread_abandoning(fn: Callable[..., Any], *args: Any) -> Any:
    # A read may be abandoned on cancellation (a stop must not wait out botocore's timeouts
    # on an unreachable S3); its thread ends by itself and its result is dropped.
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def _no_alert(code: str, message: str) -> None:
    log.error("alert %s: %s", code, message, extra={"alert": code})


@dataclass(slots=True)
class _Refusal:
    count: int
    not_before: float


class Deltas:
    """The delta store as the parent's services use it: blocking calls in worker threads,
    alerts, the counters health shows, and the enclave's position across its boot and its
    deltas connection.

    Args:
        store: the backend.
        on_alert: ``(code, message)``; the supervisor passes ``Alerts.raise_alert``.
        poll_interval_s: how often the watcher lists the store (``[deltas] poll_interval_s``).
        answer_timeout_s: how long a push waits for ``delta_loaded``/``delta_refused``.
        refused_backoff_initial_s, refused_backoff_max_s: before a refused delta is pushed
            again.
        offload: runs a blocking call (default: a Trio worker thread, abandoned on
            cancellation for reads, waited for on puts; tests pass an inline one so that virtual
            time does not run while "disk" work happens).
        compaction_kms: relays a compaction's ``GenerateDataKey`` with ``Recipient``
            (:func:`kms_compaction_relay`); None: compactions are refused
            (``compaction_key_failed``).
        max_base_bytes: the largest compacted base stored (``[deltas] max_base_bytes``).
    """

    def __init__(
        self,
        store: DeltaStore,
        *,
        stats: DeltaStats | None = None,
        on_alert: AlertFn = _no_alert,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
        refused_backoff_initial_s: float = DEFAULT_REFUSED_BACKOFF_INITIAL_S,
        refused_backoff_max_s: float = DEFAULT_REFUSED_BACKOFF_MAX_S,
        offload: Callable[..., Awaitable[Any]] = _to_thread,
        compaction_kms: CompactionKms | None = None,
        max_base_bytes: int = DEFAULT_MAX_BASE_BYTES,
    ) -> None:
        self.store = store
        self.compaction_kms = compaction_kms
        self.max_base_bytes = max_base_bytes
        self.stats = stats if stats is not None else DeltaStats()
        self.on_alert = on_alert
        self.poll_interval_s = poll_interval_s
        self.answer_timeout_s = answer_timeout_s
        self.refused_backoff_initial_s = refused_backoff_initial_s
        self.refused_backoff_max_s = refused_backoff_max_s
        self._offload = offload
        self._offload_read = _to_thread_abandoning if offload is _to_thread else offload
        self.boot_streamed = 0
        self._booted = trio.Event()
        self._alerted_gap: int | None = None
        self._failing = False
        self._refusals: dict[int, _Refusal] = {}
        self._active: trio.CancelScope | None = None
        self._disconnected = trio.Event()
        self._disconnected.set()
        # What the peer can repeat at its own pace is logged at most once per interval (the
        # channel's hello is not authenticated: DESIGN §16).
        rated = functools.partial(
            RateLimitedLog, log, interval_s=CHANNEL_LOG_INTERVAL_S, clock=trio.current_time
        )
        self._log_not_a_delta = rated("refused to store a delta: not a delta")
        self._log_not_a_base = rated("refused to store a base: not a base")
        self.log_unpushed_refusal = rated("the enclave refused a delta that was not pushed")
        self._log_key_refused = rated("compaction data key refused")
        self.log_unasked_loaded = rated("enclave loaded a delta", level=logging.INFO)

    # -- runs and boots ------------------------------------------------------------------------

    def new_run(self) -> None:
        """A new enclave run: nothing is known of its position until its boot finishes."""
        self.boot_streamed = 0
        self._booted = trio.Event()
        self._refusals.clear()
        self.stats.enclave_sequence = None
        self.stats.enclave_head = None
        self.stats.enclave_accounts = None
        if self._active is not None:
            self._active.cancel()

    def mark_booted(self, result: PreloadResultMessage) -> None:
        """The boot's preload succeeded: the enclave holds what it says it loaded, or (if it
        does not say) every delta the boot streamed. The watcher starts from there."""
        loaded = result.deltas if result.deltas is not None else self.boot_streamed
        if loaded != self.boot_streamed:
            log.warning(
                "the enclave loaded fewer deltas at boot than were streamed",
                extra={"loaded": loaded, "streamed": self.boot_streamed},
            )
        self.stats.enclave_sequence = loaded
        self.stats.enclave_head = result.deltas_head
        self.stats.enclave_accounts = result.accounts
        self._booted.set()

    async def wait_booted(self) -> None:
        await self._booted.wait()

    # -- the store, off the event loop ---------------------------------------------------------

    async def listing(self) -> DeltaListing:
        """The store's listing (also kept in the stats; a gap is alerted once)."""
        try:
            listing: DeltaListing = await self._offload_read(self.store.list)
        except DeltaStoreError as exc:
            self._store_failed(str(exc))
            raise
        self._store_ok()
        self.stats.store_head = listing.head
        gap = listing.gap
        if gap is not None and gap != self._alerted_gap:
            self.on_alert(
                "delta_gap",
                f"delta {gap} is missing from {self.store.location}: deltas "
                f"{listing.beyond_gap[0]}..{listing.beyond_gap[-1]} are not served until it "
                "appears",
            )
        self._alerted_gap = gap
        return listing

    async def fetch(self, sequence: int) -> bytes:
        try:
            data: bytes = await self._offload_read(self.store.get, sequence)
        except DeltaStoreError as exc:
            self._store_failed(str(exc))
            raise
        self._store_ok()
        return data

    async def store_delta(self, sequence: int, data: bytes) -> ChannelMessage:
        """Check and put one delta; the reply for the enclave. Never raises for the store's
        failures (they are the reply, and an alert)."""
        try:
            fingerprint: str = await self._offload(delta_fingerprint, data, sequence)
        except NotADelta as exc:
            self._log_not_a_delta(sequence=sequence, error=str(exc))
            return DeltaStoreFailedMessage(
                sequence=sequence, reason=f"not_a_delta: {exc}"[:MAX_REASON_CHARS]
            )
        crash_point("before_write")
        try:
            outcome: PutOutcome = await self._offload(self.store.put, sequence, data)
        except DeltaStoreError as exc:
            self._store_failed(str(exc))
            return DeltaStoreFailedMessage(sequence=sequence, reason=str(exc)[:MAX_REASON_CHARS])
        self._store_ok()
        if outcome is PutOutcome.CONFLICT:
            self.stats.conflicts_total += 1
            log.info("delta sequence taken by another delta", extra={"sequence": sequence})
            return DeltaConflictMessage(sequence=sequence)
        if outcome is PutOutcome.STORED:
            self.stats.written_total += 1
            crash_point("after_write")
        log.info(
            "delta stored",
            extra={
                "sequence": sequence,
                "bytes": len(data),
                "sha256": fingerprint,
                "outcome": outcome.value,
            },
        )
        return DeltaStoredMessage(sequence=sequence, sha256=fingerprint)

    async def store_base(self, sha256: str, data: bytes) -> ChannelMessage:
        """Check and put one compacted base; the reply for the enclave (never raises for the
        store's failures: they are the reply, and an alert)."""
        store = self.store
        if not isinstance(store, BaseStore):
            return BaseStoreFailedMessage(sha256=sha256, reason="this store keeps no bases")
        try:
            await self._offload(base_fingerprint, data, sha256)
        except NotADelta as exc:
            self._log_not_a_base(sha256=sha256, error=str(exc))
            return BaseStoreFailedMessage(
                sha256=sha256, reason=f"not_a_base: {exc}"[:MAX_REASON_CHARS]
            )
        try:
            outcome, url = await self._offload(store.put_base, sha256, data)
        except DeltaStoreError as exc:
            self._store_failed(str(exc))
            return BaseStoreFailedMessage(sha256=sha256, reason=str(exc)[:MAX_REASON_CHARS])
        self._store_ok()
        if outcome is PutOutcome.CONFLICT:  # another object under its own fingerprint
            return BaseStoreFailedMessage(
                sha256=sha256, reason=f"{url} holds other bytes (a damaged object?)"
            )
        log.info(
            "compacted base stored",
            extra={"sha256": sha256, "bytes": len(data), "object": url, "outcome": outcome.value},
        )
        return BaseStoredMessage(sha256=sha256, object=url)

    async def compaction_key(self, request: CompactionKeyRequestMessage) -> ChannelMessage:
        """Relay one ``GenerateDataKey`` with ``Recipient``; the reply for the enclave."""
        if self.compaction_kms is None:
            return CompactionKeyFailedMessage(
                reason="this parent has no KMS client for compaction ([kms] mode is dev-key)"
            )
        try:
            arn, blob, envelope = await self.compaction_kms(
                request.document, request.kms_key_id, COMPACTION_CONTEXT
            )
        except TrioSignError as exc:
            self._log_key_refused(error=str(exc))
            return CompactionKeyFailedMessage(reason=str(exc)[:MAX_REASON_CHARS] or "refused")
        log.info("compaction data key relayed", extra={"kms_key_id": arn})
        return CompactionKeyMessage(key_id=arn, ciphertext_blob=blob, ciphertext=envelope)

    def _store_failed(self, message: str) -> None:
        self.stats.store_failures_total += 1
        if not self._failing:  # once per streak of failures
            self._failing = True
            self.on_alert("delta_store_failed", message)
        else:
            log.warning("delta store still failing: %s", message)

    def _store_ok(self) -> None:
        self._failing = False

    # -- refusals ------------------------------------------------------------------------------

    def refused(self, sequence: int, reason: str) -> None:
        previous = self._refusals.get(sequence)
        count = 1 if previous is None else previous.count + 1
        delay = min(self.refused_backoff_max_s, self.refused_backoff_initial_s * 2 ** (count - 1))
        self._refusals[sequence] = _Refusal(count, trio.current_time() + delay)
        self.stats.refused_total += 1
        self.on_alert(
            "delta_refused",
            f"the enclave refused delta {sequence}: {reason} (pushed again in {delay:g} s)",
        )

    def may_push(self, sequence: int) -> bool:
        refusal = self._refusals.get(sequence)
        return refusal is None or trio.current_time() >= refusal.not_before

    def loaded(self, message: DeltaLoadedMessage) -> None:
        self.stats.enclave_sequence = message.sequence
        self.stats.enclave_head = message.head
        self.stats.enclave_accounts = message.accounts
        for sequence in [s for s in self._refusals if s <= message.sequence]:
            del self._refusals[sequence]

    # -- one connection at a time --------------------------------------------------------------

    async def wait_disconnected(self) -> None:
        """Return once no deltas connection is being served: a store whose bytes were read
        has been written (or failed) by then. After the enclave died its connection ends
        as soon as what it sent is handled; the supervisor waits for that before it ends the
        run (which stops this channel), so that a delta sent just before a crash is kept."""
        await self._disconnected.wait()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        if self._active is not None:
            log.info("a newer deltas connection replaces the open one")
            self._active.cancel()
        scope = trio.CancelScope()
        self._active = scope
        if self._disconnected.is_set():
            self._disconnected = trio.Event()
        self.stats.connected = True
        try:
            with scope:
                yield
        finally:
            if self._active is scope:
                self._active = None
                self.stats.connected = False
                self._disconnected.set()


# -- the deltas channel ------------------------------------------------------------------------


class _Connection:
    """One deltas connection: the reader (stores, answers to pushes) and the watcher."""

    def __init__(self, messages: MessageStream, deltas: Deltas, guard: ChannelGuard) -> None:
        self.messages = messages
        self.deltas = deltas
        self.guard = guard
        self._send_lock = trio.Lock()
        self._wake = trio.Event()
        self._held = 0  # the highest sequence the enclave stored itself on this connection
        self._pushing: int | None = None
        self._answered = trio.Event()

    async def send(self, messages: Sequence[ChannelMessage] | Iterator[ChannelMessage]) -> None:
        """Write frames as one unit (a push is never interleaved with a reply)."""
        async with self._send_lock:
            for message in messages:
                await self.messages.send(message)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_broken, self._read, nursery.cancel_scope)
            nursery.start_soon(self._until_broken, self._watch, nursery.cancel_scope)

    async def _until_broken(
        self, fn: Callable[[], Awaitable[None]], scope: trio.CancelScope
    ) -> None:
        try:
            await fn()
        except ChannelClosed:
            log.info("the enclave closed its deltas connection")
        except (ChannelProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # Once per log interval: a peer that says hello and then garbage, over and over,
            # must not write a line per connection.
            self.guard.warn("channel broken", error=str(exc))
        finally:
            scope.cancel()

    # -- from the enclave ----------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            message = await self.messages.receive()
            if isinstance(message, DeltaStoreMessage):
                await self._store(message)
            elif isinstance(message, DeltaLoadedMessage):
                self.deltas.loaded(message)
                fields = {"sequence": message.sequence, "accounts": message.accounts}
                if message.sequence == self._pushing:
                    log.info("enclave loaded a delta", extra=fields)
                    self._answered.set()
                else:
                    # Unasked (after a store of its own, which has its line): at the peer's
                    # pace, so at most once per interval.
                    self.deltas.log_unasked_loaded(**fields)
            elif isinstance(message, BaseStoreMessage):
                await self._store_base(message)
            elif isinstance(message, CompactionKeyRequestMessage):
                await self.send([await self.deltas.compaction_key(message)])
            elif isinstance(message, DeltaRefusedMessage):
                if message.sequence == self._pushing:
                    self.deltas.refused(message.sequence, message.reason)
                    self._answered.set()
                else:
                    self.deltas.log_unpushed_refusal(
                        sequence=message.sequence, reason=message.reason
                    )
            else:
                raise ChannelProtocolError(
                    f"unexpected {message.TYPE!r} on the deltas channel",
                    reason="unexpected_message",
                )

    async def _store(self, request: DeltaStoreMessage) -> None:
        sequence, total = request.sequence, request.total_bytes
        limit = self.deltas.store.max_delta_bytes
        if total > limit:
            raise ChannelProtocolError(
                f"delta_store {sequence} of {total} bytes exceeds max_delta_bytes ({limit}; "
                "[deltas] max_delta_bytes)",
                reason="oversized",
            )
        data = await self._receive_body(f"delta_store {sequence}", total)
        reply = await self.deltas.store_delta(sequence, data)
        if isinstance(reply, DeltaStoredMessage):
            self._held = max(self._held, sequence)
        await self.send([reply])
        self.wake()  # a conflict's winner goes out now; a new head shows in the stats now

    async def _store_base(self, request: BaseStoreMessage) -> None:
        sha256, total = request.sha256, request.total_bytes
        limit = self.deltas.max_base_bytes
        if total > limit:
            raise ChannelProtocolError(
                f"base_store of {total} bytes exceeds max_base_bytes ({limit}; [deltas] "
                "max_base_bytes)",
                reason="oversized",
            )
        data = await self._receive_body("base_store", total)
        await self.send([await self.deltas.store_base(sha256, data)])

    async def _receive_body(self, what: str, total: int) -> bytes:
        """The chunks after a ``delta_store`` or ``base_store`` (``what``) whose ``total``
        the caller checked against its limit."""
        body = ChunkedBody(what, total)
        while (data := body.feed(await self.messages.receive())) is None:
            pass
        return data

    # -- to the enclave ------------------------------------------------------------------------

    def _position(self) -> int:
        return max(self.deltas.stats.enclave_sequence or 0, self._held)

    async def _watch(self) -> None:
        deltas = self.deltas
        await deltas.wait_booted()
        while True:
            self._wake = trio.Event()
            await self._push_pending()
            with trio.move_on_after(deltas.poll_interval_s):
                await self._wake.wait()

    async def _push_pending(self) -> None:
        deltas = self.deltas
        try:
            listing = await deltas.listing()
        except DeltaStoreError:
            return  # alerted; the next poll tries again
        while (sequence := self._position() + 1) <= listing.head:
            if not deltas.may_push(sequence):
                return
            try:
                data = await deltas.fetch(sequence)
            except DeltaStoreError:
                return
            if not await self._push(sequence, data):
                return

    async def _push(self, sequence: int, data: bytes) -> bool:
        """Push one delta and wait for the enclave's answer; True if it loaded it."""
        deltas = self.deltas
        self._pushing = sequence
        self._answered = trio.Event()
        try:
            await self.send(delta_frames(sequence, data))
            deltas.stats.pushed_total += 1
            log.info("delta pushed", extra={"sequence": sequence, "bytes": len(data)})
            with trio.move_on_after(deltas.answer_timeout_s):
                await self._answered.wait()
                return self._position() >= sequence
            deltas.refused(sequence, f"no answer within {deltas.answer_timeout_s:g} s")
            return False
        finally:
            self._pushing = None


async def serve_deltas_connection(
    stream: trio.abc.Stream, deltas: Deltas, *, guard: ChannelGuard | None = None
) -> None:
    """One deltas connection from the enclave: its stores, and the pushes of what it lacks,
    until it closes or breaks the protocol (the connection is then closed; a store whose bytes
    did not all arrive is not stored). A newer connection replaces this one.

    ``guard`` bounds it with the channel's other connections (``parent._channels``: its hello
    must arrive whole within ``hello_timeout_s``, and a newer connection at the channel's
    ``max_connections`` may close it); none: a fresh :class:`ChannelGuard` (the deadline holds,
    the cap does not).

    Cancellation: closes the connection; a put already in its worker thread finishes first (it
    is never left half done, but its reply is not sent).
    """
    messages = MessageStream(stream)
    guard = guard if guard is not None else ChannelGuard("deltas")
    try:
        with guard.hold() as held:
            try:
                hello = await guard.receive_hello(messages, held)
            except ChannelClosed:
                return
            except (ChannelProtocolError, trio.BrokenResourceError) as exc:
                guard.warn("broken before hello", error=str(exc))
                return
            if hello is None:
                return
            if hello.channel != "deltas":
                guard.warn("wrong channel on connection", got=hello.channel[:64])
                return
            with deltas._connection():
                await _Connection(messages, deltas, guard).run()
    finally:
        await trio.aclose_forcefully(messages.stream)


async def serve_deltas(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    deltas: Deltas,
    *,
    max_connections: int = MAX_CHANNEL_CONNECTIONS,
    hello_timeout_s: float = HELLO_TIMEOUT_S,
    task_status: trio.TaskStatus[list[trio.abc.Listener[trio.abc.Stream]]] = (
        trio.TASK_STATUS_IGNORED
    ),
) -> None:
    """Accept deltas connections on ``listeners`` until cancelled, all bounded by one
    :class:`ChannelGuard` (at most ``max_connections`` held; each hello within
    ``hello_timeout_s``)."""

    async def serve_one(stream: trio.abc.Stream, guard: ChannelGuard) -> None:
        await serve_deltas_connection(stream, deltas, guard=guard)

    await serve_guarded(
        listeners, "deltas", serve_one, max_connections, hello_timeout_s, task_status
    )


__all__ = [
    "DEFAULT_MAX_BASE_BYTES",
    "DEFAULT_MAX_DELTA_BYTES",
    "BaseStore",
    "CompactionKms",
    "base_fingerprint",
    "base_object_name",
    "kms_compaction_relay",
    "DEFAULT_POLL_INTERVAL_S",
    "DeltaListing",
    "DeltaStats",
    "DeltaStore",
    "DeltaStoreError",
    "Deltas",
    "FileDeltaStore",
    "NotADelta",
    "PutOutcome",
    "S3DeltaStore",
    "delta_fingerprint",
    "delta_frames",
    "object_name",
    "open_delta_store",
    "parse_object_name",
    "serve_deltas",
    "serve_deltas_connection",
]
