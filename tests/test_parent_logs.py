"""The parent's log forwarder: redaction, the JSON-lines sink, the CloudWatch sink against a fake
client (virtual time, no network), the live tail's bounded subscribers."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from trio_sign.nitro import DroppedMessage, LogMessage
from trio_sign.parent._logs import (
    EVENT_OVERHEAD_BYTES,
    MAX_BATCH_BYTES,
    REDACTED,
    CloudWatchSink,
    JsonLinesSink,
    LogFileSink,
    LogForwarder,
    LogTail,
    Redactor,
    TailFull,
    cloudwatch_logs_client,
)

HEX64 = "ab" * 32
HEX128 = "0123456789abcdef" * 8
NOW_MS = 1_790_000_000_000


def line(**fields: Any) -> str:
    return json.dumps({"ts": "2026-09-21T10:00:00.000Z", "level": "INFO", **fields})


# -- redaction ---------------------------------------------------------------------------------


def test_secret_field_names_are_redacted() -> None:
    out = Redactor().redact(line(msg="x", signing_share=HEX64, data_key="k", Nonce=1))
    obj = json.loads(out.text)
    assert obj["signing_share"] == REDACTED
    assert obj["data_key"] == REDACTED
    assert obj["Nonce"] == REDACTED
    assert out.redactions == 3
    assert HEX64 not in out.text


def test_long_opaque_runs_are_redacted_except_in_kept_fields() -> None:
    doc = "hEAREQ" + "A1b2" * 100
    out = Redactor().redact(
        line(
            msg=f"leaked {HEX128} here",
            shares_sha256=HEX64,
            sha256=HEX64,
            attestation_document_b64=doc,
            nested={"blob": HEX128, "items": [HEX128, "short"]},
        )
    )
    obj = json.loads(out.text)
    assert obj["msg"] == f"leaked {REDACTED} here"
    assert obj["shares_sha256"] == HEX64
    assert obj["sha256"] == HEX64
    assert obj["attestation_document_b64"] == doc
    assert obj["nested"] == {"blob": REDACTED, "items": [REDACTED, "short"]}
    assert out.redactions == 3
    assert obj["source"] == "enclave"
    assert out.timestamp_ms == 1_789_984_800_000


def test_ordinary_text_is_kept() -> None:
    text = "sse relay: forwarding to https://gateway.internal:8443/v1/enclaves/node-1/events"
    long_word = "x" * 100  # no digit: not random hex/base64
    out = Redactor().redact(line(msg=text, note=long_word, accounts=100_000))
    obj = json.loads(out.text)
    assert (obj["msg"], obj["note"], obj["accounts"]) == (text, long_word, 100_000)
    assert out.redactions == 0


def test_non_json_lines_are_wrapped_and_redacted() -> None:
    out = Redactor().redact(f"panic: key {HEX128}")
    obj = json.loads(out.text)
    assert obj == {"msg": f"panic: key {REDACTED}", "unparsed": True, "source": "enclave"}
    assert out.timestamp_ms is None
    assert json.loads(Redactor().redact("[1, 2]").text)["unparsed"] is True


# -- stdout / file -----------------------------------------------------------------------------


def test_json_lines_sink_stdout_and_file(tmp_path: Path) -> None:
    buffer = io.StringIO()
    path = tmp_path / "enclave.log"
    with path.open("a", encoding="utf-8") as file:
        forwarder = LogForwarder(sinks=[JsonLinesSink(buffer), JsonLinesSink(file)])
        forwarder.on_message(LogMessage(line(msg="one")))
        forwarder.on_message(LogMessage(line(msg="two", signing_share=HEX64)))
        forwarder.on_message(DroppedMessage(7))
        # Flushed per line: readable before the file is closed.
        on_disk = path.read_text("utf-8").splitlines()
    assert on_disk == buffer.getvalue().splitlines()
    objs = [json.loads(x) for x in on_disk]
    assert [o["msg"] for o in objs[:2]] == ["one", "two"]
    assert objs[1]["signing_share"] == REDACTED
    assert objs[2]["count"] == 7
    assert forwarder.stats.received == 2
    assert forwarder.stats.forwarded == 3
    assert forwarder.stats.enclave_dropped == 7
    assert forwarder.stats.redactions == 1


def test_sink_write_failure_is_counted_not_raised() -> None:
    stream = io.StringIO()
    stream.close()
    errors: list[OSError] = []
    forwarder = LogForwarder(sinks=[JsonLinesSink(stream)], on_write_error=errors.append)
    forwarder.forward(line(msg="x"))
    forwarder.forward(line(msg="y"))
    assert (forwarder.stats.write_errors, forwarder.stats.sink_dropped) == (2, 2)
    assert forwarder.stats.forwarded == 0
    assert len(errors) == 1  # once per streak
    assert errors[0].errno == errno.EBADF


# -- durability (issue 12 defect 3) ------------------------------------------------------------


class FillingDisk:
    """``os.write`` on a disk with ``free`` bytes left: a short write, then ``ENOSPC``."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if self.free <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(fd, bytes(data[: self.free]))
        self.free -= n
        return n


def numbered(n: int) -> list[str]:
    return [line(msg=f"line {i}", n=i) for i in range(n)]


def test_disk_full_never_leaves_half_a_line_and_counts_every_loss(tmp_path: Path) -> None:
    """The issue's report: 12 lines, the disk fills during the 8th. The file must hold 7 whole
    lines (not 8 with the last cut mid-JSON) and the metrics must say 5 lost."""
    path = tmp_path / "enclave.log"
    lines = numbered(12)
    sizes = [len(Redactor().redact(x).text) + 1 for x in lines]
    disk = FillingDisk(sum(sizes[:7]) + sizes[7] // 2)
    errors: list[OSError] = []
    with LogFileSink(path, write=disk) as sink:
        forwarder = LogForwarder(sinks=[sink], on_write_error=errors.append)
        for x in lines:
            forwarder.forward(x)
    text = path.read_text("utf-8")
    assert text.endswith("\n")
    got = [json.loads(x)["n"] for x in text.splitlines()]
    assert got == list(range(7))
    stats = forwarder.stats
    assert (stats.forwarded, stats.sink_dropped, stats.write_errors) == (7, 5, 5)
    assert [e.errno for e in errors] == [errno.ENOSPC]


def test_a_recovered_sink_reports_its_next_failure_again(tmp_path: Path) -> None:
    disk = FillingDisk(0)
    errors: list[OSError] = []
    with LogFileSink(tmp_path / "x.log", write=disk) as sink:
        forwarder = LogForwarder(sinks=[sink], on_write_error=errors.append)
        forwarder.forward(line(msg="a"))
        forwarder.forward(line(msg="b"))
        disk.free = 10_000
        forwarder.forward(line(msg="c"))
        disk.free = 0
        forwarder.forward(line(msg="d"))
    assert len(errors) == 2
    assert (forwarder.stats.forwarded, forwarder.stats.sink_dropped) == (1, 3)
    assert [json.loads(x)["msg"] for x in (tmp_path / "x.log").read_text().splitlines()] == ["c"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_dev_full_is_counted_and_other_sinks_still_get_the_line() -> None:
    buffer = io.StringIO()
    errors: list[OSError] = []
    with LogFileSink("/dev/full") as full:
        forwarder = LogForwarder(sinks=[full, JsonLinesSink(buffer)], on_write_error=errors.append)
        forwarder.forward(line(msg="one"))
    assert [e.errno for e in errors] == [errno.ENOSPC]
    assert json.loads(buffer.getvalue())["msg"] == "one"
    assert (forwarder.stats.write_errors, forwarder.stats.sink_dropped) == (1, 1)
    assert forwarder.stats.forwarded == 0


def test_rename_then_reopen_sends_new_lines_to_the_new_file(tmp_path: Path) -> None:
    path, rotated = tmp_path / "enclave.log", tmp_path / "enclave.log.1"
    with LogFileSink(path) as sink:
        forwarder = LogForwarder(sinks=[sink])
        forwarder.forward(line(msg="before"))
        path.rename(rotated)  # logrotate
        forwarder.forward(line(msg="between"))  # still the old inode, as with any open file
        forwarder.reopen()  # SIGHUP
        forwarder.forward(line(msg="after"))
    msgs = [json.loads(x)["msg"] for x in rotated.read_text().splitlines()]
    assert msgs == ["before", "between"]
    assert [json.loads(x)["msg"] for x in path.read_text().splitlines()] == ["after"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert forwarder.stats.write_errors == 0


def test_a_failed_reopen_keeps_the_old_file_and_is_reported(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    errors: list[OSError] = []
    with LogFileSink(logs / "enclave.log") as sink:
        forwarder = LogForwarder(sinks=[sink], on_write_error=errors.append)
        logs.rename(tmp_path / "gone")
        forwarder.reopen()
        forwarder.forward(line(msg="still written"))
    assert [e.errno for e in errors] == [errno.ENOENT]
    assert forwarder.stats.write_errors == 1
    assert forwarder.stats.forwarded == 1
    assert "still written" in (tmp_path / "gone" / "enclave.log").read_text()


def test_boot_audit_record_is_fsynced_before_it_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "enclave.log"
    synced: list[str] = []

    def fsync(fd: int) -> None:
        synced.append(path.read_text("utf-8").splitlines()[-1])  # written before the fsync

    monkeypatch.setattr(os, "fsync", fsync)
    with LogFileSink(path) as sink:
        forwarder = LogForwarder(sinks=[sink])
        forwarder.forward(line(msg="ordinary"))
        forwarder.forward(line(msg="sign", audit="sign"))
        assert synced == []
        assert forwarder.stats.forwarded == 2
        forwarder.forward(line(msg="boot audit", audit="boot", shares_sha256=HEX64))
    assert len(synced) == 1
    assert json.loads(synced[0])["audit"] == "boot"
    assert (forwarder.stats.forwarded, forwarder.stats.audit_synced) == (3, 1)


def test_a_failed_fsync_of_the_audit_record_is_not_counted_forwarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    errors: list[OSError] = []
    with LogFileSink(tmp_path / "enclave.log") as sink:
        forwarder = LogForwarder(sinks=[sink], on_write_error=errors.append)
        forwarder.forward(line(msg="boot audit", audit="boot"))
    assert [e.errno for e in errors] == [errno.EIO]
    stats = forwarder.stats
    assert (stats.forwarded, stats.audit_synced, stats.sink_dropped) == (0, 0, 1)


def test_stream_sink_syncs_files_and_skips_pipes(tmp_path: Path) -> None:
    with (tmp_path / "out.log").open("a") as f:
        sink = JsonLinesSink(f)
        sink(line(msg="x"))
        sink.sync()
    JsonLinesSink(io.StringIO()).sync()  # no descriptor: nothing to do
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "w") as w:
            pipe_sink = JsonLinesSink(w)
            pipe_sink(line(msg="y"))
            pipe_sink.sync()  # EINVAL from fsync(pipe): nothing to make durable
            pipe_sink.reopen()
        assert json.loads(os.read(read_fd, 4096))["msg"] == "y"
    finally:
        os.close(read_fd)


def test_a_lone_surrogate_is_escaped_not_a_crash(tmp_path: Path) -> None:
    with LogFileSink(tmp_path / "x.log") as sink:
        forwarder = LogForwarder(sinks=[sink])
        forwarder.forward('{"msg": "bad \\ud800 text", "word": "caf\u00e9"}')
    text = (tmp_path / "x.log").read_text("utf-8")
    assert json.loads(text)["msg"] == "bad \ud800 text"
    assert forwarder.stats.forwarded == 1


def test_closed_file_sink_raises_and_close_is_idempotent(tmp_path: Path) -> None:
    sink = LogFileSink(tmp_path / "x.log")
    sink.close()
    sink.close()
    with pytest.raises(OSError, match="closed"):
        sink(line(msg="x"))


# -- CloudWatch --------------------------------------------------------------------------------


def client_error(code: str, message: str = "", **extra: Any) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}, **extra}, "PutLogEvents")


class FakeLogs:
    """Records calls (with their virtual time); raises the queued errors first."""

    def __init__(self) -> None:
        self.puts: list[tuple[float, dict[str, Any]]] = []
        self.creates = 0
        self.put_errors: list[Exception] = []
        self.extra: dict[str, Any] = {}
        self.create_errors: list[Exception] = []

    def put_log_events(self, **kwargs: Any) -> dict[str, Any]:
        self.puts.append((trio.current_time(), kwargs))
        if self.put_errors:
            raise self.put_errors.pop(0)
        return {"nextSequenceToken": f"t{len(self.puts)}", **self.extra}

    def create_log_stream(self, **kwargs: Any) -> dict[str, Any]:
        assert kwargs == {"logGroupName": "g", "logStreamName": "s"}
        self.creates += 1
        if self.create_errors:
            raise self.create_errors.pop(0)
        return {}

    def events(self) -> list[dict[str, Any]]:
        return [event for _, put in self.puts for event in put["logEvents"]]


def sink(client: FakeLogs, **kwargs: Any) -> CloudWatchSink:
    return CloudWatchSink(
        client, log_group="g", log_stream="s", in_thread=False, clock=lambda: NOW_MS, **kwargs
    )


async def test_cloudwatch_batches_by_count_and_sorts(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = FakeLogs()
    cw = sink(client, max_requests_per_s=2.0, max_queue=30_000)
    for i in range(25_000):
        cw.submit(f"m{i}", NOW_MS - (i % 7))
    start = trio.current_time()
    await nursery.start(cw.run)
    await trio.sleep(10)
    sizes = [len(put["logEvents"]) for _, put in client.puts]
    assert sizes == [10_000, 10_000, 5_000]
    for _, put in client.puts:
        stamps = [e["timestamp"] for e in put["logEvents"]]
        assert stamps == sorted(stamps)
    assert sorted(e["message"] for e in client.events()) == sorted(f"m{i}" for i in range(25_000))
    # The stream is created first; then at most 2 PutLogEvents per second.
    assert client.creates == 1
    assert [t - start for t, _ in client.puts] == pytest.approx([0.0, 0.5, 1.0])
    assert cw.stats.sent == 25_000
    assert cw.stats.queued == 0


async def test_cloudwatch_batch_byte_limit_counts_26_bytes_per_event(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = FakeLogs()
    cw = sink(client)
    size = 100_000 - EVENT_OVERHEAD_BYTES
    # 10 events of exactly 100,000 bytes with overhead fit in 1 MiB; the 11th would not.
    per_batch = MAX_BATCH_BYTES // 100_000
    for i in range(25):
        cw.submit(str(i % 10) * size, NOW_MS + i)
    await nursery.start(cw.run)
    await trio.sleep(10)
    sizes = [len(put["logEvents"]) for _, put in client.puts]
    assert sizes == [per_batch, per_batch, 25 - 2 * per_batch]
    for _, put in client.puts:
        total = sum(len(e["message"].encode()) + EVENT_OVERHEAD_BYTES for e in put["logEvents"])
        assert total <= MAX_BATCH_BYTES


async def test_cloudwatch_flush_interval_and_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = FakeLogs()
    cw = sink(client, flush_interval_s=2.0)
    await nursery.start(cw.run)
    start = trio.current_time()
    cw.submit("late", NOW_MS + 5)
    cw.submit("early", NOW_MS + 1)
    cw.submit("no-ts", None)
    await trio.sleep(1)
    assert client.puts == []
    await trio.sleep(1.5)
    ((at, put),) = client.puts
    assert at - start == pytest.approx(2.0)
    assert [e["message"] for e in put["logEvents"]] == ["no-ts", "early", "late"]
    assert [e["timestamp"] for e in put["logEvents"]] == [NOW_MS, NOW_MS + 1, NOW_MS + 5]


async def test_cloudwatch_retries_throttling_with_backoff(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = FakeLogs()
    client.put_errors = [
        client_error("ThrottlingException", "Rate exceeded"),
        client_error("ServiceUnavailableException"),
    ]
    cw = sink(client, flush_interval_s=0.1, backoff_initial_s=1.0, max_requests_per_s=100)
    await nursery.start(cw.run)
    cw.submit("x", NOW_MS)
    await trio.sleep(10)
    times = [t for t, _ in client.puts]
    assert len(times) == 3
    assert times[1] - times[0] == pytest.approx(1.0)
    assert times[2] - times[1] == pytest.approx(2.0)
    assert cw.stats.retries == 2
    assert cw.stats.sent == 1
    assert [e["message"] for e in client.events()] == ["x", "x", "x"]


async def test_cloudwatch_gives_up_after_max_attempts_and_on_fatal_errors(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = FakeLogs()
    client.put_errors = [client_error("ThrottlingException") for _ in range(3)]
    client.put_errors.append(client_error("AccessDeniedException", "no"))
    cw = sink(client, flush_interval_s=0.1, max_attempts=3, max_requests_per_s=100)
    await nursery.start(cw.run)
    cw.submit("a", NOW_MS)
    await trio.sleep(30)
    cw.submit("b", NOW_MS)
    await trio.sleep(30)
    cw.submit("c", NOW_MS)
    await trio.sleep(30)
    assert [e["message"] for e in client.events()] == ["a", "a", "a", "b", "c"]
    assert cw.stats.failed_batches == 2
    assert cw.stats.dropped == 2
    assert cw.stats.sent == 1


async def test_cloudwatch_sequence_token_and_missing_stream(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = FakeLogs()
    client.create_errors = [client_error("ResourceAlreadyExistsException")]
    client.put_errors = [
        client_error("InvalidSequenceTokenException", expectedSequenceToken="tok-9"),
        client_error("ResourceNotFoundException", "The specified log stream does not exist."),
    ]
    cw = sink(client, flush_interval_s=0.1, max_requests_per_s=100)
    await nursery.start(cw.run)
    cw.submit("x", NOW_MS)
    await trio.sleep(10)
    tokens = [put.get("sequenceToken") for _, put in client.puts]
    assert tokens == [None, "tok-9", "tok-9"]
    assert client.creates == 2  # already existed; then recreated after ResourceNotFound
    cw.submit("y", NOW_MS)
    await trio.sleep(10)
    assert client.puts[-1][1]["sequenceToken"] == "t3"
    assert cw.stats.sent == 2


async def test_cloudwatch_drops_oldest_when_slow(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = FakeLogs()
    # CloudWatch throttles for a long while; the log channel keeps submitting.
    client.put_errors = [client_error("ThrottlingException") for _ in range(5)]
    cw = sink(client, max_queue=100, flush_interval_s=0.1, backoff_initial_s=5.0)
    await nursery.start(cw.run)
    cw.submit("first", NOW_MS)
    await trio.sleep(0.5)  # the first batch (1 event) is now being retried
    for i in range(250):
        cw.submit(f"n{i}", NOW_MS + i)  # never blocks
    assert cw.stats.queued == 100
    assert cw.stats.dropped == 150
    await trio.sleep(300)
    messages = [e["message"] for _, put in client.puts[-2:] for e in put["logEvents"]]
    assert messages == ["first"] + [f"n{i}" for i in range(150, 250)]


async def test_cloudwatch_counts_rejected_events(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = FakeLogs()
    # Events 0..1 too old, 4.. too new (AWS: inclusive end index, start index).
    client.extra = {
        "rejectedLogEventsInfo": {"tooOldLogEventEndIndex": 1, "tooNewLogEventStartIndex": 4}
    }
    cw = sink(client, flush_interval_s=0.1)
    await nursery.start(cw.run)
    for i in range(6):
        cw.submit(f"e{i}", NOW_MS + i)
    await trio.sleep(1)
    assert (cw.stats.sent, cw.stats.rejected) == (2, 4)


async def test_cloudwatch_refuses_out_of_range_timestamps() -> None:
    cw = sink(FakeLogs())
    cw.submit("ancient", NOW_MS - 20 * 86_400_000)
    cw.submit("future", NOW_MS + 10 * 3_600_000)
    assert [e.timestamp_ms for e in cw.take_batch()] == [NOW_MS, NOW_MS]


async def test_forwarder_feeds_cloudwatch_and_tail() -> None:
    client = FakeLogs()
    cw = sink(client)
    tail = LogTail(queue_size=4)
    forwarder = LogForwarder(cloudwatch=cw, tail=tail)
    async with tail.subscribe() as lines:
        forwarder.on_message(LogMessage(line(msg="hello", private_key=HEX64)))
        received = json.loads(lines.receive_nowait())
    assert received["msg"] == "hello"
    assert received["private_key"] == REDACTED
    (event,) = cw.take_batch()
    assert json.loads(event.message) == received
    assert event.timestamp_ms == 1_789_984_800_000


# -- live tail ---------------------------------------------------------------------------------


async def test_tail_drops_a_slow_subscriber_without_waiting() -> None:
    tail = LogTail(queue_size=2, max_subscribers=2)
    async with tail.subscribe() as slow, tail.subscribe() as fast:
        for i in range(3):
            tail.publish(f"l{i}")
            assert fast.receive_nowait() == f"l{i}"
        assert tail.subscribers == 1
        assert tail.dropped_subscribers == 1
        assert [x async for x in slow] == ["l0", "l1"]  # then the stream ends
        tail.publish("l3")
        assert fast.receive_nowait() == "l3"
    assert tail.subscribers == 0


async def test_tail_subscriber_limit() -> None:
    tail = LogTail(max_subscribers=1)
    async with tail.subscribe():
        with pytest.raises(TailFull):
            async with tail.subscribe():
                pass
    async with tail.subscribe():
        pass


# -- real boto3 against a loopback stand-in (no network) ---------------------------------------


class LoopbackLogs:
    """A minimal CloudWatch Logs JSON endpoint: records each call; answers the queued errors
    (HTTP status, ``__type``) first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.errors: list[tuple[int, str]] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some()
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                headers = dict(
                    line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
                )
                lowered = {k.lower(): v for k, v in headers.items()}
                length = int(lowered[b"content-length"])
                while len(buffer) < length:
                    buffer += await stream.receive_some()
                body, buffer = buffer[:length], buffer[length:]
                target = lowered[b"x-amz-target"].decode().rsplit(".", 1)[1]
                self.calls.append((target, json.loads(body)))
                status, payload = 200, b"{}"
                if target == "PutLogEvents":
                    payload = b'{"nextSequenceToken": "t1"}'
                    if self.errors:
                        status, code = self.errors.pop(0)
                        payload = json.dumps({"__type": code, "message": "m"}).encode()
                await stream.send_all(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/x-amz-json-1.1\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (status, len(payload), payload)
                )


async def test_cloudwatch_sink_with_boto3_over_loopback(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, "/dev/null")
    server = LoopbackLogs()
    server.errors = [(400, "ThrottlingException"), (503, "ServiceUnavailableException")]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await nursery.start(trio.serve_listeners, server.handle, listeners)
    client = cloudwatch_logs_client(
        region_name="eu-west-1",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="AKIDTEST",
        aws_secret_access_key="test-secret",
    )
    cw = CloudWatchSink(
        client,
        log_group="trio-sign",
        log_stream="node-1",
        flush_interval_s=0.01,
        backoff_initial_s=0.01,
        max_requests_per_s=1000,
    )
    await nursery.start(cw.run)
    now_ms = int(time.time() * 1000)  # the real clock: the sink refuses far-off timestamps
    cw.submit(line(msg="b"), now_ms + 1)
    cw.submit(line(msg="a"), now_ms)
    with trio.fail_after(20):
        while cw.stats.sent < 2:  # noqa: ASYNC110  (a worker thread does the work)
            await trio.sleep(0.01)
    targets = [target for target, _ in server.calls]
    # botocore's own retries are off: every attempt is ours (and counted).
    assert targets == ["CreateLogStream", "PutLogEvents", "PutLogEvents", "PutLogEvents"]
    assert server.calls[0][1] == {"logGroupName": "trio-sign", "logStreamName": "node-1"}
    events = server.calls[-1][1]["logEvents"]
    assert [json.loads(e["message"])["msg"] for e in events] == ["a", "b"]
    assert [e["timestamp"] for e in events] == [now_ms, now_ms + 1]
    assert cw.stats.retries == 2


def test_sign_audit_digests_are_kept_and_redaction_warnings_are_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every Sign writes an audit record with the message's SHA-256: it is a public digest
    (kept, not redacted), and a flood of lines that do need redaction is one warning a minute,
    not one per line (the demo once wrote 10,006)."""
    import json as _json
    import logging as _logging

    from trio_sign.nitro import LogMessage
    from trio_sign.parent._logs import LogForwarder

    lines: list[str] = []
    forwarder = LogForwarder(sinks=[lines.append])
    digest = "ab" * 32
    forwarder.on_message(LogMessage(_json.dumps({"audit": "sign", "message_sha256": digest})))
    assert _json.loads(lines[-1])["message_sha256"] == digest
    caplog.set_level(_logging.WARNING, logger="trio_sign.parent.logs")
    for _ in range(50):
        forwarder.on_message(LogMessage(_json.dumps({"msg": "x", "signing_share": "ab"})))
    assert forwarder.stats.redactions == 50
    assert len([r for r in caplog.records if "redacted" in r.getMessage()]) <= 1
