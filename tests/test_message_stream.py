"""MessageStream: typed channel messages over Trio streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_sign.nitro import (
    BundleChunkMessage,
    ChannelClosed,
    ChannelProtocolError,
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
