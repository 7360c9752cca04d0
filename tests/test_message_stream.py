"""MessageStream: typed channel messages over Trio streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_sign.nitro import (
    MAX_FRAME_BYTES,
    BundleChunkMessage,
    ChannelClosed,
    ChannelProtocolError,
    FrameChannel,
    HelloMessage,
    MessageStream,
    StateMessage,
)


async def test_round_trip_and_close() -> None:
    a, b = trio.testing.memory_stream_pair()
    left, right = MessageStream(a), MessageStream(b)
    await left.send(HelloMessage(channel="status"))
    await left.send(StateMessage(state="serving", accounts=3))
    assert await right.receive() == HelloMessage(channel="status")
    state = await right.receive_expected(StateMessage)
    assert state.accounts == 3
    await left.aclose()
    with pytest.raises(ChannelClosed):
        await right.receive()


async def test_unexpected_message_type() -> None:
    a, b = trio.testing.memory_stream_pair()
    left, right = MessageStream(a), MessageStream(b)
    await left.send(HelloMessage(channel="preload"))
    with pytest.raises(ChannelProtocolError, match="expected a BundleChunkMessage"):
        await right.receive_expected(BundleChunkMessage)


async def test_good_frames_before_a_bad_one_are_delivered() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = MessageStream(b)
    good = MessageStream(a)._channel.send(HelloMessage(channel="logs"))
    await a.send_all(good + b"\x00\x00\x00\x01\xff")  # a valid frame, then garbage
    assert await right.receive() == HelloMessage(channel="logs")
    with pytest.raises(ChannelProtocolError):
        await right.receive()
    with pytest.raises(ChannelProtocolError):
        await right.receive()  # stays broken


async def test_truncated_frame_at_eof() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = MessageStream(b)
    frame = MessageStream(a)._channel.send(HelloMessage(channel="logs"))
    await a.send_all(frame[:-1])
    await a.aclose()
    with pytest.raises(ChannelProtocolError) as info:
        await right.receive()
    assert not isinstance(info.value, ChannelClosed)


# -- a frame limit of its own for one receive (the parent's hello) ----------------------------


class _Counting(trio.abc.ReceiveStream):
    """A memory receive stream that counts the bytes read from it."""

    def __init__(self) -> None:
        self.inner = trio.testing.MemoryReceiveStream()
        self.put_data = self.inner.put_data
        self.put_eof = self.inner.put_eof
        self.read = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.read += len(data)
        return bytes(data)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _peer() -> tuple[_Counting, MessageStream]:
    receive = _Counting()
    stream = trio.StapledStream(trio.testing.MemorySendStream(), receive)
    return receive, MessageStream(stream)


async def test_a_bounded_receive_refuses_a_long_frame_on_its_prefix() -> None:
    receive, right = _peer()
    receive.put_data((1 << 20).to_bytes(4, "big") + b"\xa1" * 100)
    with pytest.raises(ChannelProtocolError, match="exceeds max_frame_bytes \\(4096\\)") as info:
        await right.receive_frame(max_frame_bytes=4096)
    assert info.value.reason == "oversized"
    assert receive.read == 4  # the prefix alone
    with pytest.raises(ChannelProtocolError):
        await right.receive()  # stays broken


async def test_a_bounded_receive_reads_nothing_past_its_frame() -> None:
    receive, right = _peer()
    hello = FrameChannel().send(HelloMessage(channel="logs"))
    big = FrameChannel().send(BundleChunkMessage(data=b"\0" * (512 * 1024)))
    receive.put_data(hello + big)  # as if in one segment
    got = await right.receive_expected(HelloMessage, max_frame_bytes=64)
    assert got == HelloMessage(channel="logs")
    assert receive.read == len(hello)
    assert await right.receive() == BundleChunkMessage(data=b"\0" * (512 * 1024))


async def test_a_bounded_receive_at_eof() -> None:
    receive, right = _peer()
    receive.put_eof()
    with pytest.raises(ChannelClosed):
        await right.receive_frame(max_frame_bytes=64)
    receive, right = _peer()
    receive.put_data(FrameChannel().send(HelloMessage(channel="logs"))[:-1])
    receive.put_eof()
    with pytest.raises(ChannelProtocolError) as info:
        await right.receive_frame(max_frame_bytes=64)
    assert info.value.reason == "truncated"


async def test_a_bounded_receive_needs_nothing_read_ahead() -> None:
    receive, right = _peer()
    receive.put_data(FrameChannel().send(HelloMessage(channel="logs")) * 2)
    with pytest.raises(ValueError, match="between 1 and"):
        await right.receive_frame(max_frame_bytes=MAX_FRAME_BYTES + 1)
    await right.receive()  # reads both frames at once
    with pytest.raises(RuntimeError, match="nothing read ahead"):
        await right.receive_frame(max_frame_bytes=64)
