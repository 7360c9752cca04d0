"""The parent's enclave-channel listeners (status, logs, deltas) under a hostile peer
(DESIGN §16): the hello deadline and the per-channel connection cap, in virtual time over
memory streams."""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from trio_sign.nitro import (
    MAX_FRAME_BYTES,
    ChannelMessage,
    FrameChannel,
    HelloMessage,
    LogMessage,
    MessageStream,
    StateMessage,
)
from trio_sign.nitro._channel import DeltaLoadedMessage
from trio_sign.parent._channels import (
    HELLO_MAX_FRAME_BYTES,
    HELLO_TIMEOUT_S,
    ChannelGuard,
    StatusLink,
    serve_log_connection,
    serve_logs,
    serve_status,
    serve_status_connection,
)
from trio_sign.parent._deltas import Deltas, FileDeltaStore, serve_deltas, serve_deltas_connection

CHANNELS = ["status", "logs", "deltas"]
LOGGER = "trio_sign.parent.channels"


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def make_deltas(tmp_path: Path) -> Deltas:
    store = FileDeltaStore(tmp_path / "deltas", host_tag="0123456789ab")
    store.recover()
    return Deltas(store, on_alert=lambda code, message: None, offload=_inline)


class Parent:
    """One channel's parent end: what its connections delivered."""

    def __init__(self, channel: str, tmp_path: Path) -> None:
        self.channel = channel
        self.received: list[ChannelMessage] = []
        self.deltas = make_deltas(tmp_path)

    async def serve(self, stream: trio.abc.Stream, guard: ChannelGuard | None = None) -> None:
        if self.channel == "status":
            await serve_status_connection(stream, self.received.append, guard=guard)
        elif self.channel == "logs":
            await serve_log_connection(stream, self.received.append, guard=guard)
        else:
            await serve_deltas_connection(stream, self.deltas, guard=guard)

    def serving(self, count: int) -> bool:
        """Whether the enclave's connection is up and ``count`` messages arrived on it."""
        if self.channel == "deltas":
            return self.deltas.stats.connected
        return len(self.received) == count


async def say(messages: MessageStream, channel: str) -> None:
    """What a real enclave sends after its hello (deltas: nothing, it is served at once)."""
    if channel == "status":
        await messages.send(StateMessage(state="serving"))
    elif channel == "logs":
        await messages.send(LogMessage(line='{"msg": "hi"}'))


class Client:
    """A peer's end; ``closed_at`` is set when the parent closes the connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.closed_at: float | None = None

    async def watch(self) -> None:
        while await self.stream.receive_some():
            pass
        self.closed_at = trio.current_time()


async def connect(nursery: trio.Nursery, parent: Parent, guard: ChannelGuard | None) -> Client:
    parent_end, peer_end = trio.testing.memory_stream_pair()
    nursery.start_soon(parent.serve, parent_end, guard)
    client = Client(peer_end)
    nursery.start_soon(client.watch)
    await trio.testing.wait_all_tasks_blocked()
    return client


def hello_frame(channel: str) -> bytes:
    return FrameChannel().send(HelloMessage(channel=channel))


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


# -- the hello deadline ------------------------------------------------------------------------


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("sent", ["nothing", "half_a_hello"])
async def test_a_connection_without_a_whole_hello_is_closed_at_the_deadline(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    channel: str,
    sent: str,
) -> None:
    caplog.set_level(logging.WARNING)
    parent = Parent(channel, tmp_path)
    enclave = await connect(nursery, parent, None)  # says hello just in time, below
    parent_end, peer_end = trio.testing.memory_stream_pair()
    if sent == "half_a_hello":
        frame = hello_frame(channel)
        await peer_end.send_all(frame[: len(frame) - 1])

    async def hello_late() -> None:
        await trio.sleep(HELLO_TIMEOUT_S - 1)
        await enclave.stream.send_all(hello_frame(channel))

    nursery.start_soon(hello_late)
    with trio.fail_after(10 * HELLO_TIMEOUT_S):  # without the deadline: held forever
        await parent.serve(parent_end)
    assert trio.current_time() == HELLO_TIMEOUT_S
    assert await peer_end.receive_some() == b""  # closed
    [record] = lines(caplog, "no hello")
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"{channel} channel: no hello within 10 s; connection closed"

    # The deadline is the hello's alone: a connection that said it in time stays.
    await trio.sleep(10 * HELLO_TIMEOUT_S)
    await say(MessageStream(enclave.stream), channel)
    await trio.testing.wait_all_tasks_blocked()
    assert enclave.closed_at is None
    assert parent.serving(1)


# -- the connection cap ------------------------------------------------------------------------


@pytest.mark.parametrize("channel", CHANNELS)
async def test_silent_connections_beyond_the_cap_are_closed_and_the_enclave_gets_in(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    channel: str,
) -> None:
    caplog.set_level(logging.WARNING)
    cap = 8
    parent = Parent(channel, tmp_path)
    guard = ChannelGuard(channel, max_connections=cap)
    squatters = [await connect(nursery, parent, guard) for _ in range(cap + 5)]
    assert guard.held == cap
    assert [c.closed_at for c in squatters] == [0.0] * 5 + [None] * cap  # the oldest went

    enclave = await connect(nursery, parent, guard)
    messages = MessageStream(enclave.stream)
    await messages.send(HelloMessage(channel=channel))
    await say(messages, channel)
    await trio.testing.wait_all_tasks_blocked()
    assert parent.serving(1)
    assert guard.held == cap
    assert squatters[5].closed_at == 0.0  # room for the enclave: the oldest silent one
    assert guard.evicted == 6
    [evicted] = lines(caplog, "max_connections")  # once per interval, not once per connection
    assert evicted.getMessage() == f"{channel} channel: 8 connections (max_connections); " + (
        "closed the oldest"
    )

    await trio.sleep(HELLO_TIMEOUT_S)  # the squatters left run out of time
    await trio.testing.wait_all_tasks_blocked()
    assert [c.closed_at for c in squatters[6:]] == [HELLO_TIMEOUT_S] * (cap - 1)
    assert guard.held == 1
    assert guard.timed_out == cap - 1
    assert len(lines(caplog, "no hello")) == 1
    await say(messages, channel)
    await trio.testing.wait_all_tasks_blocked()
    assert enclave.closed_at is None
    assert parent.serving(2)


async def test_at_the_cap_with_every_hello_said_the_oldest_connection_is_closed(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    parent = Parent("status", tmp_path)
    guard = ChannelGuard("status", max_connections=2)
    clients = []
    for _ in range(3):  # the third is the enclave reconnecting
        client = await connect(nursery, parent, guard)
        await MessageStream(client.stream).send(HelloMessage(channel="status"))
        await trio.testing.wait_all_tasks_blocked()
        clients.append(client)
    assert [c.closed_at for c in clients] == [0.0, None, None]
    assert guard.held == 2
    await say(MessageStream(clients[2].stream), "status")
    await trio.testing.wait_all_tasks_blocked()
    assert parent.serving(1)


async def test_a_closed_greeted_status_connection_detaches_the_link(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    link = StatusLink()
    guard = ChannelGuard("status", max_connections=1)
    ends = []
    for _ in range(2):
        parent_end, peer_end = trio.testing.memory_stream_pair()
        nursery.start_soon(
            functools.partial(
                serve_status_connection, parent_end, lambda m: None, link, guard=guard
            )
        )
        await MessageStream(peer_end).send(HelloMessage(channel="status"))
        await trio.testing.wait_all_tasks_blocked()
        ends.append(peer_end)
    with trio.fail_after(1):  # without the cap: the first is held forever
        assert await ends[0].receive_some() == b""
        assert await link.request_drain()  # on the newest connection
        assert await ends[1].receive_some() != b""


# -- the listener-level serve functions --------------------------------------------------------


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](0)

    async def connect(self) -> trio.abc.Stream:
        parent_end, peer_end = trio.testing.memory_stream_pair()
        await self._send.send(parent_end)
        return peer_end

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("channel", CHANNELS)
async def test_the_serve_functions_share_one_guard_per_channel(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock, channel: str
) -> None:
    listener = MemoryListener()
    received: list[ChannelMessage] = []
    kw: dict[str, Any] = {"max_connections": 2, "hello_timeout_s": 3.0}
    if channel == "status":
        await nursery.start(functools.partial(serve_status, [listener], received.append, **kw))
    elif channel == "logs":
        await nursery.start(functools.partial(serve_logs, [listener], received.append, **kw))
    else:
        listeners = cast(list[trio.SocketListener], [listener])
        await nursery.start(functools.partial(serve_deltas, listeners, make_deltas(tmp_path), **kw))
    clients = [Client(await listener.connect()) for _ in range(3)]
    for client in clients:
        nursery.start_soon(client.watch)
    await trio.testing.wait_all_tasks_blocked()
    assert [c.closed_at for c in clients] == [0.0, None, None]
    await trio.sleep(5)
    assert [c.closed_at for c in clients] == [0.0, 3.0, 3.0]


# -- the frame limit before the hello ----------------------------------------------------------


class CountingStream(trio.abc.Stream):
    """A stream that counts the bytes the parent read from it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.read = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.read += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


def padded_frame(message: ChannelMessage, payload_bytes: int) -> bytes:
    """``message``'s frame with an unknown field (ignored by the receiver) that makes its
    payload exactly ``payload_bytes`` long."""
    fields = {**message.to_frame(), "pad": b""}
    base = len(FrameChannel().send(fields)) - 4
    for pad in range(payload_bytes - base, payload_bytes - base - 10, -1):  # the length's own size
        frame = FrameChannel().send({**fields, "pad": b"\0" * pad})
        if len(frame) - 4 == payload_bytes:
            return frame
    raise AssertionError("no padding gives that size")


@pytest.mark.parametrize("channel", CHANNELS)
async def test_a_frame_over_the_hello_limit_before_the_hello_closes_the_connection_at_once(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    channel: str,
) -> None:
    caplog.set_level(logging.WARNING)
    parent = Parent(channel, tmp_path)
    guard = ChannelGuard(channel)
    assert guard.hello_max_frame_bytes == HELLO_MAX_FRAME_BYTES == 4096
    peers = []
    for claimed in [MAX_FRAME_BYTES, HELLO_MAX_FRAME_BYTES + 1]:
        parent_end, peer_end = trio.testing.memory_stream_pair()
        counting = CountingStream(parent_end)
        nursery.start_soon(parent.serve, counting, guard)
        client = Client(peer_end)
        nursery.start_soon(client.watch)
        # A length prefix within MAX_FRAME_BYTES, then the first byte of its body.
        await peer_end.send_all(struct.pack(">I", claimed) + b"\xa1")
        await trio.testing.wait_all_tasks_blocked()
        assert client.closed_at == 0.0  # at once, not at the hello deadline
        assert counting.read == 4  # the prefix alone: none of the body was read
        peers.append(client)
    assert guard.oversized == 2
    assert guard.held == 0
    [record] = lines(caplog, "before the hello")  # rate-limited: once for both
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"{channel} channel: a frame over 4096 bytes before the hello (hello_max_frame_bytes); "
        "connection closed"
    )
    assert not lines(caplog, "broken")

    # A hello of exactly the limit is taken (a real one is some 40 bytes).
    enclave = await connect(nursery, parent, guard)
    hello = padded_frame(HelloMessage(channel=channel), HELLO_MAX_FRAME_BYTES)
    await enclave.stream.send_all(hello)
    messages = MessageStream(enclave.stream)
    await say(messages, channel)
    await trio.testing.wait_all_tasks_blocked()
    assert enclave.closed_at is None
    assert parent.serving(1)


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("together", [True, False])
async def test_after_the_hello_a_512_kib_frame_is_taken(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    channel: str,
    together: bool,
) -> None:
    caplog.set_level(logging.WARNING)
    parent = Parent(channel, tmp_path)
    enclave = await connect(nursery, parent, ChannelGuard(channel))
    message: ChannelMessage
    if channel == "status":
        message = StateMessage(state="serving", accounts=3)
    elif channel == "logs":
        message = LogMessage(line='{"msg": "hi"}')
    else:
        message = DeltaLoadedMessage(sequence=1, head="ab" * 32, accounts=3)
    big = padded_frame(message, 512 * 1024)
    if together:  # in one write: the hello's read must not run into the big frame
        await enclave.stream.send_all(hello_frame(channel) + big)
    else:
        await enclave.stream.send_all(hello_frame(channel))
        await trio.testing.wait_all_tasks_blocked()
        await enclave.stream.send_all(big)
    await trio.testing.wait_all_tasks_blocked()
    assert enclave.closed_at is None
    assert not caplog.records
    if channel == "deltas":
        assert parent.deltas.stats.enclave_accounts == 3
    else:
        assert parent.received == [message]


@pytest.mark.parametrize("channel", CHANNELS)
async def test_refused_connections_make_one_line_per_kind_not_one_each(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    channel: str,
) -> None:
    """Whoever can connect must not write the log at its own pace: 50 connections that say
    hello for the wrong channel, and 50 that send garbage, make one line of each kind per
    log_interval_s, and the next line says how many were held back."""
    caplog.set_level(logging.WARNING)
    parent = Parent(channel, tmp_path)
    guard = ChannelGuard(channel)
    wrong = hello_frame("preload")  # a valid name, not this channel's
    garbage = struct.pack(">I", 3) + b"\xff\xff\xff"  # a frame that is not CBOR
    for payload in [wrong] * 50 + [garbage] * 50:
        parent_end, peer_end = trio.testing.memory_stream_pair()
        nursery.start_soon(parent.serve, parent_end, guard)
        await peer_end.send_all(payload)
        await trio.testing.wait_all_tasks_blocked()
        await peer_end.aclose()
    assert len(lines(caplog, "wrong channel")) == 1
    assert len(lines(caplog, "broken")) == 1
    await trio.sleep(10)
    parent_end, peer_end = trio.testing.memory_stream_pair()
    nursery.start_soon(parent.serve, parent_end, guard)
    await peer_end.send_all(wrong)
    await trio.testing.wait_all_tasks_blocked()
    _first, second = lines(caplog, "wrong channel")
    assert getattr(second, "suppressed", None) == 49


async def test_a_greeted_deltas_peer_cannot_write_the_log_at_its_own_pace(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a hello (not authenticated), 50 stores of something that is not a delta and 50
    refusals of deltas never pushed make one line each, not 100."""
    from trio_sign.nitro._channel import (
        DeltaChunkMessage,
        DeltaEndMessage,
        DeltaRefusedMessage,
        DeltaStoreFailedMessage,
        DeltaStoreMessage,
    )

    caplog.set_level(logging.WARNING)
    parent = Parent("deltas", tmp_path)
    parent_end, peer_end = trio.testing.memory_stream_pair()
    nursery.start_soon(parent.serve, parent_end, ChannelGuard("deltas"))
    peer = MessageStream(peer_end)
    await peer.send(HelloMessage(channel="deltas"))
    for sequence in range(1, 51):
        await peer.send(DeltaStoreMessage(sequence=sequence, total_bytes=3))
        await peer.send(DeltaChunkMessage(data=b"abc"))
        await peer.send(DeltaEndMessage())
        assert isinstance(await peer.receive(), DeltaStoreFailedMessage)
        await peer.send(DeltaRefusedMessage(sequence=sequence, reason="no"))
    await trio.testing.wait_all_tasks_blocked()
    assert len(lines(caplog, "refused to store a delta")) == 1
    assert len(lines(caplog, "refused a delta that was not pushed")) == 1
    assert parent.deltas.stats.connected  # still served: these are answered, not fatal


@pytest.mark.parametrize("channel", CHANNELS)
async def test_greeted_connections_that_break_make_one_line_not_one_each(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    channel: str,
) -> None:
    """50 connections that say hello, then send a frame that is not CBOR, make one
    "broken" line per log_interval_s, on every channel (deltas: its own reader)."""
    caplog.set_level(logging.WARNING)
    parent = Parent(channel, tmp_path)
    guard = ChannelGuard(channel)
    garbage = struct.pack(">I", 3) + b"\xff\xff\xff"
    for _ in range(50):
        client = await connect(nursery, parent, guard)
        await client.stream.send_all(hello_frame(channel) + garbage)
        await trio.testing.wait_all_tasks_blocked()
        assert client.closed_at is not None
    assert len(lines(caplog, "broken")) == 1


async def test_a_greeted_deltas_peer_cannot_write_a_line_per_refused_compaction_key(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50 compaction key requests that KMS refuses (a made-up attestation document) are
    each answered, and make one line, not 50."""
    from trio_sign._errors import TrioSignError
    from trio_sign.nitro._channel import CompactionKeyFailedMessage, CompactionKeyRequestMessage

    async def refusing(document: bytes, kms_key_id: str, context: Any) -> tuple[str, bytes, bytes]:
        raise TrioSignError("KMS refused: not an attestation document")

    caplog.set_level(logging.WARNING)
    parent = Parent("deltas", tmp_path)
    parent.deltas.compaction_kms = refusing
    parent_end, peer_end = trio.testing.memory_stream_pair()
    nursery.start_soon(parent.serve, parent_end, ChannelGuard("deltas"))
    peer = MessageStream(peer_end)
    await peer.send(HelloMessage(channel="deltas"))
    for _ in range(50):
        await peer.send(CompactionKeyRequestMessage(document=b"junk", kms_key_id="alias/k"))
        assert isinstance(await peer.receive(), CompactionKeyFailedMessage)
    assert len(lines(caplog, "compaction data key refused")) == 1


async def test_a_greeted_deltas_peer_cannot_write_a_line_per_unasked_loaded(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50 ``delta_loaded`` that answer no push (free to send, nothing to store) make one
    INFO line, not 50; the position they report is still taken."""
    caplog.set_level(logging.INFO)
    parent = Parent("deltas", tmp_path)
    parent_end, peer_end = trio.testing.memory_stream_pair()
    nursery.start_soon(parent.serve, parent_end, ChannelGuard("deltas"))
    peer = MessageStream(peer_end)
    await peer.send(HelloMessage(channel="deltas"))
    for accounts in range(50):
        await peer.send(DeltaLoadedMessage(sequence=1, head="ab" * 32, accounts=accounts))
    await trio.testing.wait_all_tasks_blocked()
    assert len(lines(caplog, "enclave loaded a delta")) == 1
    assert parent.deltas.stats.enclave_accounts == 49
