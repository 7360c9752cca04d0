"""The parent's log forwarder: enclave log lines to stdout/file, CloudWatch Logs and a live tail.

The enclave's lines arrive already redacted (``JsonFormatter`` inside the enclave); the parent
makes a last redaction pass anyway (DESIGN §7: nothing secret in logs): it parses each line as
JSON, replaces the values of fields whose names suggest secrets, and replaces any long hex or
base64 run in a string value except in a few fields known to hold public digests or documents.

Fan-out never blocks the enclave's log channel: the stdout/file sinks write one whole line, the
CloudWatch sink queues (bounded, drop-oldest, counted) for its own task, and the live tail hands
each line to bounded per-subscriber queues and drops a subscriber that falls behind.

Durability (issue 12): the file sink is opened by path and :meth:`LogFileSink.reopen` follows a
rotated file (the parent calls :meth:`LogForwarder.reopen` on SIGHUP); a line is written whole
or not at all (a write cut short by a full disk is truncated away); a failed write is counted
(``LogStats.write_errors``, ``LogStats.sink_dropped``) and reported to ``on_write_error``; the
enclave's boot audit record (``"audit": "boot"``) is fsynced before it counts as forwarded.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import io
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Protocol, runtime_checkable

import trio

from ..nitro import ChannelMessage, DroppedMessage, LogMessage
from ..rpc import RateLimitedLog

log = logging.getLogger("trio_sign.parent.logs")

# -- redaction (sans-io) -----------------------------------------------------------------------

#: Field-name fragments that mark a value as secret (matched case-insensitively).
SECRET_FIELD_WORDS: Final = (
    "secret",
    "signing_share",
    "nonce",
    "data_key",
    "datakey",
    "plaintext",
    "private",
    "key_material",
    "password",
    "passwd",
    "token",
    "authorization",
    "cookie",
    "credential",
    "seed",
)
#: Fields whose values are public digests or documents: kept even when long and opaque.
KEEP_FIELDS: Final = frozenset(
    {
        "attestation_document_b64",
        "shares_sha256",
        "sha256",
        "bundle_sha256",
        "shares_pcr_value",
        "pcr_value",
        "message_sha256",  # the Sign audit record (issue 14): a digest, never the message
        "config_sha256",
        "spki_sha256",
        "deltas_head",
    }
)
_redaction_log = RateLimitedLog(
    logging.getLogger("trio_sign.parent.logs"),
    "redacted values in enclave log lines (trio_sign_log_redactions_total counts them all)",
    interval_s=60.0,
    clock=time.monotonic,
)
#: A run of hex or base64 characters at least this long is redacted outside ``KEEP_FIELDS``.
DEFAULT_MAX_OPAQUE_RUN: Final = 64
REDACTED: Final = "<redacted>"
#: ``audit`` values of the records a file sink fsyncs before they count as forwarded (DESIGN
#: §7: every boot leaves its audit record). Per-signature audit records are not fsynced: one
#: fsync per session would bound the signing rate by the disk.
DURABLE_AUDIT: Final = frozenset({"boot"})


@dataclass(frozen=True, slots=True)
class RedactedLine:
    """One line after the parent's redaction pass.

    Attributes:
        text: the JSON line to forward (no newline).
        timestamp_ms: the line's ``ts`` as Unix milliseconds, or None if it had none.
        redactions: how many values were replaced.
        durable: an audit record that must reach the disk (``audit`` in
            :data:`DURABLE_AUDIT`): sinks fsync it.
    """

    text: str
    timestamp_ms: int | None
    redactions: int
    durable: bool = False


class Redactor:
    """The parent's last redaction pass over one enclave log line.

    Args:
        keep_fields: field names whose values are never scanned for opaque runs (public digests).
        max_opaque_run: the shortest hex/base64 run that is redacted.
        extra: fields added to every object (e.g. ``{"source": "enclave"}``), unless present.
    """

    def __init__(
        self,
        *,
        keep_fields: Iterable[str] = KEEP_FIELDS,
        secret_words: Iterable[str] = SECRET_FIELD_WORDS,
        max_opaque_run: int = DEFAULT_MAX_OPAQUE_RUN,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        if max_opaque_run < 16:
            raise ValueError("max_opaque_run below 16 would redact ordinary words")
        self._keep = frozenset(keep_fields)
        self._words = tuple(w.lower() for w in secret_words)
        self._run = re.compile(rf"[A-Za-z0-9+/_=-]{{{max_opaque_run},}}")
        self._extra = dict(extra if extra is not None else {"source": "enclave"})

    def redact(self, line: str) -> RedactedLine:
        """Redact one line. A line that is not a JSON object is wrapped as ``{"msg": ...}`` (its
        text redacted too) with ``"unparsed": true``, so no free text escapes the pass."""
        counter = [0]
        try:
            value: Any = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            value = {"msg": line, "unparsed": True}
        out = self._object(value, counter)
        for key, extra in self._extra.items():
            out.setdefault(key, extra)
        audit = value.get("audit")
        text = json.dumps(out, separators=(",", ":"), ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (from a "\\udXXX" escape) cannot be written as UTF-8: escape all.
            text = json.dumps(out, separators=(",", ":"))
        return RedactedLine(
            text=text,
            timestamp_ms=_timestamp_ms(out.get("ts")),
            redactions=counter[0],
            durable=isinstance(audit, str) and audit in DURABLE_AUDIT,
        )

    def _secret_name(self, key: str) -> bool:
        lowered = key.lower()
        return key not in self._keep and any(word in lowered for word in self._words)

    def _object(self, value: dict[Any, Any], counter: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for raw_key, item in value.items():
            key = str(raw_key)
            if self._secret_name(key):
                out[key] = REDACTED
                counter[0] += 1
            elif key in self._keep:
                out[key] = item
            else:
                out[key] = self._value(item, counter)
        return out

    def _value(self, item: Any, counter: list[int]) -> Any:
        if isinstance(item, str):
            return self._run.sub(lambda m: _opaque(m, counter), item)
        if isinstance(item, dict):
            return self._object(item, counter)
        if isinstance(item, list):
            return [self._value(element, counter) for element in item]
        return item


def _opaque(match: re.Match[str], counter: list[int]) -> str:
    # Random hex or base64 of this length contains a digit; long words and paths do not.
    if not any(c.isdigit() for c in match.group()):
        return match.group()
    counter[0] += 1
    return REDACTED


def _timestamp_ms(ts: object) -> int | None:
    if not isinstance(ts, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return int(parsed.timestamp() * 1000)


# -- stdout / file -----------------------------------------------------------------------------


@runtime_checkable
class DurableSink(Protocol):
    """A line sink that can also fsync what it wrote and reopen its file.

    ``__call__`` writes one line (no newline) and raises ``OSError`` if it could not; the
    :class:`LogForwarder` counts and reports the failure.
    """

    def __call__(self, line: str, /) -> None: ...

    def sync(self) -> None: ...

    def reopen(self) -> None: ...


#: fsync of a pipe, a terminal or a socket fails with these: there is nothing to make durable.
_NOT_SYNCABLE: Final = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS})


class JsonLinesSink:
    """Write each line plus ``\\n`` to a text stream and flush (stdout, usually journald).

    For a log file use :class:`LogFileSink`: it is opened by path (so it can be reopened), and
    it never leaves half a line.

    Error handling: a failing write (disk full, closed pipe, closed stream) raises ``OSError``
    for the forwarder to count and report.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, line: str) -> None:
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except ValueError as exc:  # a closed stream
            raise OSError(errno.EBADF, f"log stream unusable: {exc}") from None

    def sync(self) -> None:
        """fsync the stream's file if it is one (a pipe or terminal has nothing to sync)."""
        try:
            self._stream.flush()
            fd = self._stream.fileno()
        except io.UnsupportedOperation:  # no descriptor behind it (StringIO)
            return
        except ValueError as exc:  # a closed stream
            raise OSError(errno.EBADF, f"log stream unusable: {exc}") from None
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _NOT_SYNCABLE:
                raise

    def reopen(self) -> None:
        """Nothing to reopen: the stream is not ours."""


WriteCall = Callable[[int, bytes | memoryview], int]


class LogFileSink:
    """Append whole JSON lines to a log file opened by path.

    Args:
        path: the log file; created (``mode``) if missing, always appended to.
        mode: permission bits of a new file.
        write: the ``os.write`` system call (tests inject one that fails after N bytes).

    A line is one ``write`` of its bytes and newline (more only if the kernel writes short);
    if the file system refuses part of it (``ENOSPC``, ``EDQUOT``, ``EIO``), the bytes that did
    reach the file are truncated away, so a reader never sees half a line: the file holds
    whole lines only, and the lost ones are counted by the forwarder. The parent is the only
    writer of this file (``O_APPEND``; ``logrotate``'s ``copytruncate`` is also fine).

    :meth:`reopen` opens ``path`` again (after ``logrotate`` renamed the file away, new lines
    go to the new file, not to the old inode). :meth:`sync` fsyncs. Error handling: every
    method raises ``OSError``; none of them blocks for long, except ``sync`` on a slow disk.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, mode: int = 0o640, write: WriteCall = os.write
    ) -> None:
        self.path = Path(path)
        self._mode = mode
        self._write = write
        self._fd: int | None = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self._mode)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, f"log file {self.path} is closed")
        return self._fd

    def __call__(self, line: str) -> None:
        fd = self._require_fd()
        data = memoryview((line + "\n").encode("utf-8"))
        written = 0
        try:
            while written < len(data):
                n = self._write(fd, data[written:])
                if n <= 0:
                    raise OSError(errno.EIO, f"write to {self.path} returned {n}")
                written += n
        except OSError:
            if written:
                self._take_back(fd, written)
            raise

    def _take_back(self, fd: int, written: int) -> None:
        """Truncate away the ``written`` bytes of a line that could not be finished."""
        try:
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - written))
        except OSError as exc:
            log.error(
                "log file %s: could not remove a partly written line (%s)", self.path, exc.strerror
            )

    def sync(self) -> None:
        """fsync the file (data and size)."""
        os.fsync(self._require_fd())

    def reopen(self) -> None:
        """Open ``path`` again and switch to it (logrotate, SIGHUP).

        Error handling: if ``path`` cannot be opened (its directory is gone, permissions),
        ``OSError`` is raised and the sink keeps writing to the file it had.
        """
        fd = self._open()
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)

    def close(self) -> None:
        """Close the file; idempotent. Later writes raise ``OSError`` (counted)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> LogFileSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- live tail ---------------------------------------------------------------------------------

#: Lines a tail subscriber may fall behind before it is dropped.
DEFAULT_TAIL_QUEUE: Final = 256
#: Concurrent tail subscribers.
DEFAULT_MAX_TAIL_SUBSCRIBERS: Final = 8


class TailFull(Exception):
    """Too many live-tail subscribers (``max_subscribers``)."""


class LogTail:
    """Fan lines out to live subscribers without ever waiting for one.

    Each subscriber has a queue of ``queue_size`` lines; a subscriber whose queue is full when a
    line arrives is dropped (its stream ends), counted in ``dropped_subscribers``.
    """

    def __init__(
        self,
        *,
        queue_size: int = DEFAULT_TAIL_QUEUE,
        max_subscribers: int = DEFAULT_MAX_TAIL_SUBSCRIBERS,
    ) -> None:
        if queue_size < 1 or max_subscribers < 1:
            raise ValueError("queue_size and max_subscribers must be positive")
        self._queue_size = queue_size
        self._max = max_subscribers
        self._subscribers: set[trio.MemorySendChannel[str]] = set()
        self.dropped_subscribers = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, line: str) -> None:
        """Offer ``line`` to every subscriber (never blocks)."""
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(line)
            except trio.WouldBlock:
                self._subscribers.discard(channel)
                channel.close()
                self.dropped_subscribers += 1
                log.warning(
                    "log tail: dropped a subscriber that fell %d lines behind", self._queue_size
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[str]]:
        """A receive channel of new lines; it ends if the subscriber falls behind.

        Raises:
            TailFull: ``max_subscribers`` are already subscribed.
        """
        if len(self._subscribers) >= self._max:
            raise TailFull(f"{self._max} log tail subscribers already (max_subscribers)")
        send, receive = trio.open_memory_channel[str](self._queue_size)
        self._subscribers.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.discard(send)
            send.close()


# -- CloudWatch Logs ---------------------------------------------------------------------------

#: CloudWatch ``PutLogEvents`` limits (AWS documentation).
MAX_BATCH_EVENTS: Final = 10_000
MAX_BATCH_BYTES: Final = 1_048_576
EVENT_OVERHEAD_BYTES: Final = 26
MAX_EVENT_BYTES: Final = 256 * 1024 - EVENT_OVERHEAD_BYTES
MAX_BATCH_SPAN_MS: Final = 24 * 3600 * 1000
#: Defaults of the sink's named settings.
DEFAULT_CLOUDWATCH_QUEUE: Final = 20_000
DEFAULT_MAX_REQUESTS_PER_S: Final = 5.0
DEFAULT_FLUSH_INTERVAL_S: Final = 1.0
DEFAULT_BACKOFF_INITIAL_S: Final = 0.2
DEFAULT_BACKOFF_MAX_S: Final = 10.0
DEFAULT_MAX_ATTEMPTS: Final = 8

_RETRIABLE: Final = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ServiceUnavailableException",
        "ServiceUnavailable",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


class CloudWatchLogsClient(Protocol):
    """The two calls of a boto3 ``logs`` client that the sink uses (boto3 is untyped)."""

    def put_log_events(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def create_log_stream(self, **kwargs: Any) -> Any: ...


def cloudwatch_logs_client(**kwargs: Any) -> CloudWatchLogsClient:
    """``boto3.client("logs", **kwargs)`` (``region_name``, ``endpoint_url``, ...).

    Unless ``config`` is given, botocore's own retries are off (one attempt per call): the sink
    retries with its own back-off and counts the retries, and a worker thread is not held
    through botocore's sleeps.
    """
    import boto3  # type: ignore[import-untyped]  # boto3 ships no types
    from botocore.config import Config  # type: ignore[import-untyped]

    kwargs.setdefault("config", Config(retries={"total_max_attempts": 1}))
    client: CloudWatchLogsClient = boto3.client("logs", **kwargs)
    return client


def _error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ``ClientError`` (duck-typed), or None."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error")
        if isinstance(error, Mapping):
            code = error.get("Code")
            return str(code) if code is not None else None
    return None


@dataclass(slots=True)
class CloudWatchStats:
    """Counters of the CloudWatch sink.

    Attributes:
        queued: events waiting now.
        sent: events accepted by CloudWatch.
        dropped: events dropped: oldest ones when the queue was full, or a batch given up on.
        rejected: events CloudWatch refused (too old, too new, expired).
        requests: ``PutLogEvents`` calls made.
        retries: calls retried after throttling or a transient failure.
        failed_batches: batches given up on.
    """

    queued: int = 0
    sent: int = 0
    dropped: int = 0
    rejected: int = 0
    requests: int = 0
    retries: int = 0
    failed_batches: int = 0


@dataclass(slots=True)
class _Event:
    timestamp_ms: int
    message: str
    queued_at: float
    size: int = field(init=False)

    def __post_init__(self) -> None:
        encoded = self.message.encode("utf-8")
        if len(encoded) > MAX_EVENT_BYTES:
            self.message = (
                encoded[: MAX_EVENT_BYTES - 16].decode("utf-8", "ignore") + "...<truncated>"
            )
            encoded = self.message.encode("utf-8")
        self.size = len(encoded) + EVENT_OVERHEAD_BYTES


class CloudWatchSink:
    """Batch lines to CloudWatch Logs from a task of its own (:meth:`run`).

    Args:
        client: a boto3 ``logs`` client (or a fake with the same two methods).
        max_queue: events held while CloudWatch is slow; beyond it the oldest are dropped.
        max_requests_per_s: at most this many ``PutLogEvents`` calls per second.
        flush_interval_s: how long the oldest queued event waits for company before a send
            (a full batch goes at once).
        in_thread: run the blocking boto3 calls in a worker thread (tests with a fake pass
            False).
        clock: wall-clock milliseconds for lines without a usable ``ts``.
    """

    def __init__(
        self,
        client: CloudWatchLogsClient,
        *,
        log_group: str,
        log_stream: str,
        max_queue: int = DEFAULT_CLOUDWATCH_QUEUE,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_requests_per_s: float = DEFAULT_MAX_REQUESTS_PER_S,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        in_thread: bool = True,
        clock: Callable[[], int] | None = None,
    ) -> None:
        if not 0 < max_batch_events <= MAX_BATCH_EVENTS:
            raise ValueError(f"max_batch_events must be in 1..{MAX_BATCH_EVENTS}")
        if not MAX_EVENT_BYTES + EVENT_OVERHEAD_BYTES <= max_batch_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"max_batch_bytes must be in 256 KiB..{MAX_BATCH_BYTES}")
        if max_queue < 1 or max_requests_per_s <= 0 or max_attempts < 1:
            raise ValueError("max_queue, max_requests_per_s and max_attempts must be positive")
        self._client = client
        self._group = log_group
        self._stream = log_stream
        self._max_queue = max_queue
        self._max_events = max_batch_events
        self._max_bytes = max_batch_bytes
        self._interval = 1.0 / max_requests_per_s
        self._flush_interval = flush_interval_s
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._max_attempts = max_attempts
        self._in_thread = in_thread
        self._clock = clock if clock is not None else (lambda: int(time.time() * 1000))
        self._queue: collections.deque[_Event] = collections.deque()
        self._queued_bytes = 0
        self._wakeup = trio.Event()
        self._sequence_token: str | None = None
        self._stream_ready = False
        self._last_request: float | None = None
        self.stats = CloudWatchStats()

    def submit(self, message: str, timestamp_ms: int | None = None) -> None:
        """Queue one event; never blocks. The oldest event is dropped when the queue is full."""
        now = self._clock()
        # CloudWatch refuses events older than 14 days or over 2 hours ahead: use now instead.
        if timestamp_ms is None or not now - 13 * 86_400_000 < timestamp_ms < now + 3_600_000:
            timestamp_ms = now
        event = _Event(timestamp_ms, message, trio.current_time())
        self._queue.append(event)
        self._queued_bytes += event.size
        while len(self._queue) > self._max_queue:
            old = self._queue.popleft()
            self._queued_bytes -= old.size
            self.stats.dropped += 1
        self.stats.queued = len(self._queue)
        self._wakeup.set()

    def _full_batch_waiting(self) -> bool:
        return len(self._queue) >= self._max_events or self._queued_bytes >= self._max_bytes

    def take_batch(self) -> list[_Event]:
        """The next batch (sans-io): arrival order up to the count, byte and 24-hour limits,
        then sorted by timestamp (stable)."""
        batch: list[_Event] = []
        size = 0
        low = high = None
        while self._queue and len(batch) < self._max_events:
            event = self._queue[0]
            if size + event.size > self._max_bytes:
                break
            new_low = event.timestamp_ms if low is None else min(low, event.timestamp_ms)
            new_high = event.timestamp_ms if high is None else max(high, event.timestamp_ms)
            if new_high - new_low > MAX_BATCH_SPAN_MS:
                break
            low, high = new_low, new_high
            self._queue.popleft()
            self._queued_bytes -= event.size
            size += event.size
            batch.append(event)
        self.stats.queued = len(self._queue)
        batch.sort(key=lambda e: e.timestamp_ms)
        return batch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches until cancelled.

        Readiness: ``started()`` at once; the log stream is created (if missing) before the
        first send, so the parent never waits on CloudWatch to start.

        Cancellation: queued events are lost (bounded by ``max_queue``); a call in a worker
        thread finishes in the background.

        Error handling: throttling and transient failures are retried with exponential back-off
        up to ``max_attempts``; then the batch is dropped and counted. Nothing is raised.
        """
        task_status.started()
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            if not self._full_batch_waiting():
                # The oldest event waits at most flush_interval_s for company.
                with trio.move_on_at(self._queue[0].queued_at + self._flush_interval):
                    while not self._full_batch_waiting():
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
            batch = self.take_batch()
            if batch:
                await self._send(batch)

    async def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        if self._in_thread:
            # Abandoned on cancel: shutdown does not wait for botocore's socket timeouts.
            return await trio.to_thread.run_sync(lambda: method(**kwargs), abandon_on_cancel=True)
        return method(**kwargs)

    async def _pace(self) -> None:
        now = trio.current_time()
        if self._last_request is not None:
            await trio.sleep_until(self._last_request + self._interval)
            now = trio.current_time()
        self._last_request = now

    async def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        try:
            await self._call(
                self._client.create_log_stream,
                logGroupName=self._group,
                logStreamName=self._stream,
            )
        except Exception as exc:
            if _error_code(exc) != "ResourceAlreadyExistsException":
                raise
        self._stream_ready = True
        log.info("cloudwatch: log stream %s/%s ready", self._group, self._stream)

    async def _send(self, batch: list[_Event]) -> None:
        delay = self._backoff_initial
        for attempt in range(1, self._max_attempts + 1):
            try:
                await self._ensure_stream()
                await self._pace()
                self.stats.requests += 1
                kwargs: dict[str, Any] = {
                    "logGroupName": self._group,
                    "logStreamName": self._stream,
                    "logEvents": [
                        {"timestamp": e.timestamp_ms, "message": e.message} for e in batch
                    ],
                }
                if self._sequence_token is not None:
                    kwargs["sequenceToken"] = self._sequence_token
                response = await self._call(self._client.put_log_events, **kwargs)
            except Exception as exc:
                code = _error_code(exc)
                if code == "DataAlreadyAcceptedException":
                    self.stats.sent += len(batch)
                    return
                if code == "InvalidSequenceTokenException":
                    self._sequence_token = _expected_token(exc)
                elif code == "ResourceNotFoundException":
                    self._stream_ready = False
                elif code is not None and code not in _RETRIABLE:
                    self._give_up(batch, f"{code}: {_message(exc)}")
                    return
                if attempt == self._max_attempts:
                    break
                self.stats.retries += 1
                log.warning(
                    "cloudwatch: PutLogEvents failed (%s); retry %d in %.2f s",
                    code or type(exc).__name__,
                    attempt,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            self._sequence_token = _next_token(response)
            self._account(response, len(batch))
            return
        self._give_up(batch, f"still failing after {self._max_attempts} attempts (max_attempts)")

    def _account(self, response: Any, count: int) -> None:
        rejected = response.get("rejectedLogEventsInfo") if isinstance(response, Mapping) else None
        refused = 0
        if isinstance(rejected, Mapping):
            too_new = rejected.get("tooNewLogEventStartIndex")
            too_old = rejected.get("tooOldLogEventEndIndex")
            expired = rejected.get("expiredLogEventEndIndex")
            first_bad_new = too_new if isinstance(too_new, int) else count
            last_bad_old = max(
                too_old if isinstance(too_old, int) else -1,
                expired if isinstance(expired, int) else -1,
            )
            refused = (last_bad_old + 1) + (count - first_bad_new)
            refused = min(refused, count)
            log.warning("cloudwatch: %d of %d events rejected (too old/new)", refused, count)
        self.stats.rejected += refused
        self.stats.sent += count - refused

    def _give_up(self, batch: list[_Event], reason: str) -> None:
        self.stats.dropped += len(batch)
        self.stats.failed_batches += 1
        log.error("cloudwatch: dropped a batch of %d events: %s", len(batch), reason)


def _expected_token(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    token = response.get("expectedSequenceToken") if isinstance(response, Mapping) else None
    if token is None:
        # Older botocore puts it only in the message: "...The next expected sequenceToken is: X"
        match = re.search(r"sequenceToken(?: is)?: (\S+)", _message(exc))
        token = match.group(1) if match else None
    return str(token) if token not in (None, "null") else None


def _next_token(response: Any) -> str | None:
    token = response.get("nextSequenceToken") if isinstance(response, Mapping) else None
    return str(token) if token is not None else None


def _message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error")
        if isinstance(error, Mapping) and error.get("Message"):
            return str(error["Message"])
    return str(exc)


# -- the forwarder -----------------------------------------------------------------------------


@dataclass(slots=True)
class LogStats:
    """Counters of the forwarder (for ``/metrics``).

    Attributes:
        received: enclave log lines received.
        forwarded: lines every line sink wrote (a boot audit record: wrote and fsynced).
        redactions: values the parent's pass replaced (should stay 0: the enclave redacts).
        enclave_dropped: lines the enclave reported dropped (its queue was full).
        write_errors: failed writes, fsyncs and reopens of the line sinks (disk full, a
            closed pipe, a missing directory).
        sink_dropped: lines at least one line sink lost (they may still have reached
            CloudWatch and the live tail).
        audit_synced: boot audit records written and fsynced by every line sink.
    """

    received: int = 0
    forwarded: int = 0
    redactions: int = 0
    enclave_dropped: int = 0
    write_errors: int = 0
    sink_dropped: int = 0
    audit_synced: int = 0


#: A line writer: a :class:`DurableSink` (``JsonLinesSink``, ``LogFileSink``) or any callable
#: that writes one line and raises ``OSError`` when it cannot.
LineSink = Callable[[str], None]


class LogForwarder:
    """Take the enclave's log channel messages and fan them out; never blocks.

    Pass :meth:`on_message` to :func:`~trio_sign.parent.serve_log_connection`.

    Args:
        sinks: synchronous line writers (a :class:`JsonLinesSink` on stdout, a
            :class:`LogFileSink`).
        cloudwatch: queued for its own task (run :meth:`CloudWatchSink.run` in the nursery).
        tail: the live tail behind ``GET /v1/logs/tail``.
        on_write_error: called with the ``OSError`` when a line sink starts failing (once per
            streak of failures of that sink, and again after it recovered and failed anew);
            the supervisor raises an alert from it. It must not block.

    Error handling:
        A line sink's ``OSError`` never reaches the log channel: it is counted in
        ``stats.write_errors`` (and the line in ``stats.sink_dropped``), logged once per
        streak and reported to ``on_write_error``. The other sinks still get the line.
    """

    def __init__(
        self,
        *,
        sinks: Sequence[LineSink] = (),
        cloudwatch: CloudWatchSink | None = None,
        tail: LogTail | None = None,
        redactor: Redactor | None = None,
        stats: LogStats | None = None,
        on_write_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self._sinks = tuple(sinks)
        self.cloudwatch = cloudwatch
        self.tail = tail
        self._redactor = redactor if redactor is not None else Redactor()
        self.stats = stats if stats is not None else LogStats()
        self._on_write_error = on_write_error
        self._failing: set[int] = set()  # id() of the sinks in a failure streak

    def on_message(self, message: ChannelMessage) -> None:
        """Handle one ``log`` or ``dropped`` message from the enclave."""
        if isinstance(message, LogMessage):
            self.stats.received += 1
            self.forward(message.line)
        elif isinstance(message, DroppedMessage):
            self.stats.enclave_dropped += message.count
            self.forward(
                json.dumps(
                    {
                        "ts": _now_rfc3339(),
                        "level": "WARNING",
                        "logger": "trio_sign.parent.logs",
                        "msg": "the enclave dropped log lines (its queue was full)",
                        "count": message.count,
                    },
                    separators=(",", ":"),
                )
            )

    def forward(self, line: str) -> None:
        """Redact one line and hand it to every sink.

        A boot audit record (:data:`DURABLE_AUDIT`) is fsynced by every line sink that can
        (:class:`DurableSink`) before it counts as forwarded.
        """
        redacted = self._redactor.redact(line)
        if redacted.redactions:
            self.stats.redactions += redacted.redactions
            _redaction_log(values=redacted.redactions)  # at most once a minute: counted in stats
        written = True
        for sink in self._sinks:
            written = self._write(sink, redacted.text, redacted.durable) and written
        if self.cloudwatch is not None:
            self.cloudwatch.submit(redacted.text, redacted.timestamp_ms)
        if self.tail is not None:
            self.tail.publish(redacted.text)
        if written:
            self.stats.forwarded += 1
            if redacted.durable:
                self.stats.audit_synced += 1
        else:
            self.stats.sink_dropped += 1

    def _write(self, sink: LineSink, text: str, durable: bool) -> bool:
        try:
            sink(text)
            if durable and isinstance(sink, DurableSink):
                sink.sync()
        except OSError as exc:
            self._failed(sink, exc, "write")
            return False
        self._failing.discard(id(sink))
        return True

    def _failed(self, sink: object, exc: OSError, what: str) -> None:
        self.stats.write_errors += 1
        if id(sink) in self._failing:
            return
        self._failing.add(id(sink))
        log.error("log sink %s failed: %s", what, exc.strerror or exc)
        if self._on_write_error is not None:
            self._on_write_error(exc)

    def reopen(self) -> None:
        """Reopen every line sink's file (SIGHUP after logrotate).

        Error handling: a sink that cannot reopen keeps its old file; the failure is counted
        and reported like a write failure. Never raises ``OSError``.
        """
        for sink in self._sinks:
            if isinstance(sink, DurableSink):
                try:
                    sink.reopen()
                except OSError as exc:
                    self._failed(sink, exc, "reopen")
        log.info("log sinks reopened")


def _now_rfc3339() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
