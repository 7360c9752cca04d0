"""The parent's log forwarder: enclave log lines to stdout/file, CloudWatch Logs and a live tail.

The enclave's lines arrive already redacted (``JsonFormatter`` inside the enclave); the parent
makes a last redaction pass anyway (DESIGN §7: nothing secret in logs): it parses each line as
JSON, replaces the values of fields whose names suggest secrets, and replaces any long hex or
base64 run in a string value except in a few fields known to hold public digests or documents.

Fan-out never blocks the enclave's log channel: the stdout/file sink writes one flushed line, the
CloudWatch sink queues (bounded, drop-oldest, counted) for its own task, and the live tail hands
each line to bounded per-subscriber queues and drops a subscriber that falls behind.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final, Protocol

import trio

from ..nitro import ChannelMessage, DroppedMessage, LogMessage

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
    }
)
#: A run of hex or base64 characters at least this long is redacted outside ``KEEP_FIELDS``.
DEFAULT_MAX_OPAQUE_RUN: Final = 64
REDACTED: Final = "<redacted>"


@dataclass(frozen=True, slots=True)
class RedactedLine:
    """One line after the parent's redaction pass.

    Attributes:
        text: the JSON line to forward (no newline).
        timestamp_ms: the line's ``ts`` as Unix milliseconds, or None if it had none.
        redactions: how many values were replaced.
    """

    text: str
    timestamp_ms: int | None
    redactions: int


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
        return RedactedLine(
            text=json.dumps(out, separators=(",", ":"), ensure_ascii=False),
            timestamp_ms=_timestamp_ms(out.get("ts")),
            redactions=counter[0],
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


class JsonLinesSink:
    """Write each line plus ``\\n`` to a text stream and flush (stdout, or a file in append mode).

    Error handling: a failing write (disk full, closed pipe) is counted in ``write_errors`` and
    logged once per streak; it never raises into the log channel.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.write_errors = 0
        self._failing = False

    def __call__(self, line: str) -> None:
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:
            self.write_errors += 1
            if not self._failing:
                log.error("log sink write failed: %s", exc)
            self._failing = True
        else:
            self._failing = False


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
        forwarded: lines handed to the sinks.
        redactions: values the parent's pass replaced (should stay 0: the enclave redacts).
        enclave_dropped: lines the enclave reported dropped (its queue was full).
    """

    received: int = 0
    forwarded: int = 0
    redactions: int = 0
    enclave_dropped: int = 0


LineSink = Callable[[str], None]


class LogForwarder:
    """Take the enclave's log channel messages and fan them out; never blocks.

    Pass :meth:`on_message` to :func:`~trio_sign.parent.serve_log_connection`.

    Args:
        sinks: synchronous line writers (a :class:`JsonLinesSink` on stdout or a file).
        cloudwatch: queued for its own task (run :meth:`CloudWatchSink.run` in the nursery).
        tail: the live tail behind ``GET /v1/logs/tail``.
    """

    def __init__(
        self,
        *,
        sinks: Sequence[LineSink] = (),
        cloudwatch: CloudWatchSink | None = None,
        tail: LogTail | None = None,
        redactor: Redactor | None = None,
        stats: LogStats | None = None,
    ) -> None:
        self._sinks = tuple(sinks)
        self.cloudwatch = cloudwatch
        self.tail = tail
        self._redactor = redactor if redactor is not None else Redactor()
        self.stats = stats if stats is not None else LogStats()

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
        """Redact one line and hand it to every sink."""
        redacted = self._redactor.redact(line)
        if redacted.redactions:
            self.stats.redactions += redacted.redactions
            log.warning("redacted %d values in an enclave log line", redacted.redactions)
        for sink in self._sinks:
            sink(redacted.text)
        if self.cloudwatch is not None:
            self.cloudwatch.submit(redacted.text, redacted.timestamp_ms)
        if self.tail is not None:
            self.tail.publish(redacted.text)
        self.stats.forwarded += 1


def _now_rfc3339() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
