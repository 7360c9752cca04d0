"""Parent <-> enclave channel framing (sans-io) and its message vocabulary."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign import TrioSignError
from trio_sign.nitro import (
    MAX_FRAME_BYTES,
    MAX_METRICS_BYTES,
    AttestationMessage,
    BundleChunkMessage,
    BundleEndMessage,
    ChannelMessage,
    ChannelProtocolError,
    DrainMessage,
    DroppedMessage,
    EventsConfigMessage,
    ExitMessage,
    Frame,
    FrameChannel,
    HelloMessage,
    LogMessage,
    MetricsMessage,
    PreloadResultMessage,
    RecipientCiphertextMessage,
    StateMessage,
    decode_message,
)
from trio_sign.nitro._channel import (
    MAX_CBOR_DEPTH,
    MAX_DELTA_CHUNK_BYTES,
    MAX_DELTA_SEQUENCE,
    MAX_REASON_CHARS,
    MESSAGE_TYPES,
    BaseStoredMessage,
    BaseStoreFailedMessage,
    BaseStoreMessage,
    CompactionKeyFailedMessage,
    CompactionKeyMessage,
    CompactionKeyRequestMessage,
    DeltaChunkMessage,
    DeltaConflictMessage,
    DeltaEndMessage,
    DeltaLoadedMessage,
    DeltaPushMessage,
    DeltaRefusedMessage,
    DeltaStoredMessage,
    DeltaStoreFailedMessage,
    DeltaStoreMessage,
    GenesisAttestationMessage,
    GenesisDataKeyMessage,
    IdentityGenesisMessage,
    IdentityMessage,
    IdentitySealedMessage,
    IdentityStoredMessage,
)

SHA = "0123456789abcdef" * 4

MESSAGES: list[ChannelMessage] = [
    HelloMessage(channel="preload"),
    HelloMessage(channel="logs", version=7),
    AttestationMessage(document=b"\x84\x44\xa1\x01\x38\x22" + bytes(100)),
    RecipientCiphertextMessage(ciphertext=b"\x30\x80" + bytes(50)),
    EventsConfigMessage(gateway_url="https://gateway.internal:8443", node_id="node-a"),
    BundleChunkMessage(data=bytes(range(256)) * 4),
    BundleChunkMessage(data=b""),
    BundleEndMessage(total_bytes=1024),
    PreloadResultMessage(ok=True, accounts=10_000, sha256=SHA, preload_ms=1234),
    PreloadResultMessage(ok=False, reason="duplicate account on record 7"),
    StateMessage(state="booting"),
    StateMessage(state="serving", accounts=3, sha256=SHA, preload_ms=55),
    StateMessage(state="failed", reason="truncated bundle"),
    ExitMessage(code=0),
    ExitMessage(code=-15),
    DrainMessage(),
    LogMessage(line='{"level":"info","msg":"ready"}'),
    DroppedMessage(count=12),
    MetricsMessage(
        snapshot={
            "trio_sign_sessions_total": {"outcome=signed": 12, "outcome=expired": 1},
            "trio_sign_sign_seconds": {"buckets": [[0.001, 3], [float("inf"), 4]], "sum": 0.5},
            "trio_sign_build_info": {"version": "1.0", "labels": None, "up": True},
            "pool_open": 0,
        }
    ),
    MetricsMessage(snapshot={}),
    HelloMessage(channel="deltas"),
    BundleEndMessage(total_bytes=1024, deltas=3),
    PreloadResultMessage(ok=True, accounts=5, sha256=SHA, deltas=2, deltas_head=SHA),
    DeltaStoreMessage(sequence=1, total_bytes=4096),
    DeltaChunkMessage(data=b"\x01" * MAX_DELTA_CHUNK_BYTES),
    DeltaEndMessage(),
    DeltaStoredMessage(sequence=MAX_DELTA_SEQUENCE, sha256=SHA),
    DeltaConflictMessage(sequence=2),
    DeltaStoreFailedMessage(sequence=2, reason="disk full"),
    DeltaPushMessage(sequence=3, total_bytes=0),
    DeltaLoadedMessage(sequence=3, head=SHA, accounts=10_001),
    DeltaRefusedMessage(sequence=4, reason="delta_chain"),
    IdentityMessage(sealed=b'{"format":"trio-sign/sealed-identity-key"}\n'),
    IdentityGenesisMessage(),
    GenesisAttestationMessage(document=b"\x84" + bytes(40), public_key=bytes(range(32))),
    GenesisDataKeyMessage(
        key_id="arn:aws:kms:us-east-1:1:key/k", ciphertext_blob=b"blob", ciphertext=b"\x30"
    ),
    IdentitySealedMessage(sealed=b"{}"),
    IdentityStoredMessage(public_key=SHA),
    CompactionKeyRequestMessage(document=b"\x84" + bytes(40), kms_key_id="arn:aws:kms:r:1:key/k"),
    CompactionKeyMessage(
        key_id="arn:aws:kms:us-east-1:1:key/k", ciphertext_blob=b"blob", ciphertext=b"\x30"
    ),
    CompactionKeyFailedMessage(reason="no KMS"),
    BaseStoreMessage(sha256=SHA, total_bytes=1 << 32),
    BaseStoredMessage(sha256=SHA, object="file:///var/lib/trio-sign/deltas/base-" + SHA + ".enc"),
    BaseStoreFailedMessage(sha256=SHA, reason="disk full"),
]


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _reason(data: bytes, channel: FrameChannel | None = None) -> str:
    channel = channel or FrameChannel()
    with pytest.raises(ChannelProtocolError) as info:
        channel.receive_data(data)
    assert channel.broken
    return info.value.reason


def test_every_message_type_is_covered() -> None:
    assert {m.TYPE for m in MESSAGES} == set(MESSAGE_TYPES)
    assert set(MESSAGE_TYPES) == {
        "hello",
        "attestation",
        "recipient_ciphertext",
        "events",
        "bundle_chunk",
        "bundle_end",
        "preload_result",
        "state",
        "exit",
        "drain",
        "log",
        "dropped",
        "metrics",
        "delta_store",
        "delta_chunk",
        "delta_end",
        "delta_stored",
        "delta_conflict",
        "delta_store_failed",
        "delta_push",
        "delta_loaded",
        "delta_refused",
        "identity",
        "identity_genesis",
        "genesis_attestation",
        "genesis_data_key",
        "identity_sealed",
        "identity_stored",
        "compaction_key_request",
        "compaction_key",
        "compaction_key_failed",
        "base_store",
        "base_stored",
        "base_store_failed",
    }


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE)
def test_message_round_trip(message: ChannelMessage) -> None:
    wire = FrameChannel().send(message)
    frames = FrameChannel().receive_data(wire)
    assert len(frames) == 1
    assert frames[0].type == message.TYPE
    assert decode_message(frames[0]) == message
    assert type(message).from_frame(message.to_frame()) == message


def test_wire_format() -> None:
    wire = FrameChannel().send(ExitMessage(code=3))
    payload = cbor2.dumps({"type": "exit", "code": 3})
    assert wire == struct.pack(">I", len(payload)) + payload
    assert FrameChannel().send({"type": "x", "n": 1}) == _frame(cbor2.dumps({"type": "x", "n": 1}))


def test_secret_ish_bytes_not_in_repr() -> None:
    assert "\\x30\\x80" not in repr(RecipientCiphertextMessage(ciphertext=b"\x30\x80"))
    assert "data=" not in repr(BundleChunkMessage(data=b"abc"))


def test_many_frames_in_one_chunk_and_byte_by_byte() -> None:
    sender = FrameChannel()
    wire = b"".join(sender.send(m) for m in MESSAGES)
    assert [decode_message(f) for f in FrameChannel().receive_data(wire)] == MESSAGES
    receiver = FrameChannel()
    got: list[Frame] = []
    for i in range(len(wire)):
        got += receiver.receive_data(wire[i : i + 1])
    assert [decode_message(f) for f in got] == MESSAGES
    assert receiver.buffered == 0
    receiver.receive_eof()  # clean end


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_any_chunking(cuts: list[int]) -> None:
    wire = b"".join(FrameChannel().send(m) for m in MESSAGES)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    receiver = FrameChannel()
    got: list[Frame] = []
    for a, b in itertools.pairwise(points):
        got += receiver.receive_data(memoryview(wire)[a:b])
    assert [decode_message(f) for f in got] == MESSAGES


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    type_=st.text(max_size=10),
    body=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), _cbor_values),
)
def test_arbitrary_maps_round_trip(type_: str, body: dict[str, Any]) -> None:
    obj = {"type": type_, **body}
    frames = FrameChannel().receive_data(FrameChannel().send(obj))
    assert frames == [Frame(type_, obj)]


def test_oversized_frame_is_refused_before_buffering() -> None:
    channel = FrameChannel(max_frame_bytes=100)
    # Only the 4-byte header of a 101-byte frame: refused at once.
    assert _reason(struct.pack(">I", 101), channel) == "oversized"
    with pytest.raises(ChannelProtocolError) as info:
        channel.receive_data(b"more")
    assert info.value.reason == "unusable"
    assert channel.buffered == 0


def test_default_limit() -> None:
    assert FrameChannel().max_frame_bytes == MAX_FRAME_BYTES == 1 << 20
    assert _reason(struct.pack(">I", MAX_FRAME_BYTES + 1)) == "oversized"
    ok = FrameChannel().send(BundleChunkMessage(data=bytes(MAX_FRAME_BYTES - 64)))
    assert len(FrameChannel().receive_data(ok)) == 1


def test_send_oversized_leaves_channel_usable() -> None:
    channel = FrameChannel(max_frame_bytes=64)
    with pytest.raises(ChannelProtocolError) as info:
        channel.send(BundleChunkMessage(data=bytes(64)))
    assert info.value.reason == "oversized"
    assert not channel.broken
    assert channel.send(ExitMessage(code=1))


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"code": 1}, "missing_type"),
        ({"type": 1}, "missing_type"),
        ({"type": "x", 1: 2}, "not_a_map"),
        ({"type": "x", "when": cbor2.CBORTag(1, 0)}, "tag"),
        ({"type": "x", "big": 2**70}, "tag"),
    ],
)
def test_send_refuses_what_a_receiver_would(obj: dict[Any, Any], reason: str) -> None:
    with pytest.raises(ChannelProtocolError) as info:
        FrameChannel().send(obj)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty_frame"),
        (cbor2.dumps([1, 2]), "not_a_map"),
        (cbor2.dumps("type"), "not_a_map"),
        (cbor2.dumps({1: "x", "type": "y"}), "bad_cbor"),  # int keys: strict_hashable_types
        (cbor2.dumps({b"k": "x", "type": "y"}), "not_a_map"),
        (cbor2.dumps({"kind": "x"}), "missing_type"),
        (cbor2.dumps({"type": b"x"}), "missing_type"),
        (cbor2.dumps({"type": None}), "missing_type"),
        (cbor2.dumps({"type": "x"}) + b"\x00", "trailing_data"),
        (cbor2.dumps({"type": "x"}) + cbor2.dumps({"type": "y"}), "trailing_data"),
        (b"\xa1\x64type\xc1\x01", "tag"),  # tag 1 (epoch datetime)
        (b"\xd9\xd9\xf7" + cbor2.dumps({"type": "x"}), "tag"),  # self-describe tag 55799
        (b"\xa1\x64type\xd8\x1c\x61x", "tag"),  # shareable (28)
        (b"\xa2\x64type\x61x\x61n\xc2\x41\x01", "tag"),  # bignum
        (b"\xbf\x64type\x61x\xff", "bad_cbor"),  # indefinite map
        (b"\xa1\x64type\x7f\x61x\xff", "bad_cbor"),  # indefinite text
        (b"\xa2\x64type\x61x\x61u\xf7", "bad_cbor"),  # undefined
        (b"\xa2\x64type\x61x\x61u\xf0", "bad_cbor"),  # simple(16)
        (b"\xa2\x64type\x61x\x61u\xf8\x20", "bad_cbor"),  # simple(32)
        (b"\xa2\x64type\x61x\x61u\xff", "bad_cbor"),  # lone break
        (b"\xa1\x64type\x1c", "bad_cbor"),  # reserved additional info
        (b"\xa1\x64type\x62\xff\xfe", "bad_cbor"),  # invalid UTF-8
        (b"\xa2\x64type\x61x\x64type\x61y", "bad_cbor"),  # duplicate key
        (b"\xa1\x64type", "bad_cbor"),  # truncated inside the frame
        (b"\xa1\x64type\x7a\xff\xff\xff\xff", "bad_cbor"),  # string longer than the frame
        (b"\xa1\x64type\x9b" + b"\xff" * 8, "bad_cbor"),  # huge array count
        (b"\xa2\x64type\x61x\x61n" + b"\x81" * (MAX_CBOR_DEPTH + 5) + b"\x00", "bad_cbor"),
        (b"\xa2\x64type\x61x\x61k\xa1\x01\x02", "bad_cbor"),  # nested int key
    ],
)
def test_malformed_frames(payload: bytes, reason: str) -> None:
    assert _reason(_frame(payload)) == reason


def test_good_frames_before_a_bad_one_are_kept() -> None:
    good = FrameChannel().send(LogMessage(line="one"))
    with pytest.raises(ChannelProtocolError) as info:
        FrameChannel().receive_data(good + _frame(cbor2.dumps([1])))
    assert [decode_message(f) for f in info.value.frames] == [LogMessage(line="one")]


def test_eof_mid_frame() -> None:
    wire = FrameChannel().send(LogMessage(line="hello"))
    channel = FrameChannel()
    assert channel.receive_data(wire[:-1]) == []
    with pytest.raises(ChannelProtocolError) as info:
        channel.receive_eof()
    assert info.value.reason == "truncated"
    assert channel.broken


def test_bad_max_frame_bytes() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameChannel(max_frame_bytes=0)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_only_raises_protocol_errors(data: bytes) -> None:
    channel = FrameChannel(max_frame_bytes=1000)
    try:
        for frame in channel.receive_data(data):
            assert isinstance(frame.type, str)
    except ChannelProtocolError as exc:
        assert isinstance(exc, TrioSignError)  # noqa: PT017


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=1, max_size=64))
def test_garbage_payloads_only_raise_protocol_errors(payload: bytes) -> None:
    channel = FrameChannel()
    try:
        channel.receive_data(_frame(payload))
    except ChannelProtocolError:
        assert channel.broken


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        ({"type": "hello", "channel": "nope", "version": 1}, "channel"),
        ({"type": "hello", "channel": "logs"}, "version"),
        ({"type": "hello", "channel": "logs", "version": True}, "version"),
        ({"type": "attestation", "document": "text"}, "document"),
        ({"type": "recipient_ciphertext", "ciphertext": None}, "ciphertext"),
        ({"type": "bundle_chunk", "data": [1]}, "data"),
        ({"type": "bundle_end", "total_bytes": -1}, "total_bytes"),
        ({"type": "bundle_end", "total_bytes": 1.0}, "total_bytes"),
        (
            {
                "type": "preload_result",
                "ok": 1,
                "reason": None,
                "accounts": 0,
                "sha256": None,
                "preload_ms": 0,
            },
            "ok",
        ),
        (
            {
                "type": "preload_result",
                "ok": True,
                "reason": None,
                "accounts": 0,
                "sha256": "AB" * 32,
                "preload_ms": 0,
            },
            "sha256",
        ),
        (
            {
                "type": "state",
                "state": "dancing",
                "reason": None,
                "accounts": None,
                "sha256": None,
                "preload_ms": None,
            },
            "state",
        ),
        (
            {
                "type": "state",
                "state": "serving",
                "reason": 3,
                "accounts": None,
                "sha256": None,
                "preload_ms": None,
            },
            "reason",
        ),
        ({"type": "events", "gateway_url": "", "node_id": "n"}, "gateway_url"),
        ({"type": "events", "gateway_url": "h" * 2049, "node_id": "n"}, "gateway_url"),
        ({"type": "events", "gateway_url": "https://g", "node_id": "n" * 129}, "node_id"),
        ({"type": "events", "gateway_url": "https://g", "node_id": None}, "node_id"),
        ({"type": "exit", "code": "1"}, "code"),
        ({"type": "log", "line": b"x"}, "line"),
        ({"type": "dropped", "count": False}, "count"),
        ({"type": "metrics"}, "snapshot"),
        ({"type": "metrics", "snapshot": [1, 2]}, "snapshot"),
        ({"type": "metrics", "snapshot": {"a": b"bytes"}}, "snapshot"),
        ({"type": "metrics", "snapshot": {"a": "x" * MAX_METRICS_BYTES}}, "snapshot"),
        ({"type": "bundle_end", "total_bytes": 1, "deltas": -1}, "deltas"),
        ({"type": "bundle_end", "total_bytes": 1, "deltas": None}, "deltas"),
        ({"type": "delta_store", "sequence": 0, "total_bytes": 1}, "sequence"),
        ({"type": "delta_store", "sequence": MAX_DELTA_SEQUENCE + 1, "total_bytes": 1}, "sequence"),
        ({"type": "delta_store", "sequence": True, "total_bytes": 1}, "sequence"),
        ({"type": "delta_store", "sequence": 1, "total_bytes": -1}, "total_bytes"),
        ({"type": "delta_store", "sequence": 1}, "total_bytes"),
        ({"type": "delta_chunk", "data": b""}, "data"),
        ({"type": "delta_chunk", "data": b"x" * (MAX_DELTA_CHUNK_BYTES + 1)}, "data"),
        ({"type": "delta_chunk", "data": "text"}, "data"),
        ({"type": "delta_stored", "sequence": 1, "sha256": "AB" * 32}, "sha256"),
        ({"type": "delta_conflict", "sequence": "1"}, "sequence"),
        ({"type": "delta_store_failed", "sequence": 1, "reason": ""}, "reason"),
        (
            {"type": "delta_store_failed", "sequence": 1, "reason": "x" * (MAX_REASON_CHARS + 1)},
            "reason",
        ),
        ({"type": "delta_push", "sequence": 1, "total_bytes": 1.5}, "total_bytes"),
        ({"type": "delta_loaded", "sequence": 1, "head": SHA, "accounts": -1}, "accounts"),
        ({"type": "delta_loaded", "sequence": 1, "head": "00", "accounts": 1}, "head"),
        ({"type": "delta_refused", "sequence": 1, "reason": None}, "reason"),
    ],
)
def test_message_field_validation(frame: dict[str, Any], match: str) -> None:
    wire = FrameChannel().send(frame)
    (received,) = FrameChannel().receive_data(wire)
    with pytest.raises(ChannelProtocolError, match=match) as info:
        decode_message(received)
    assert info.value.reason == "bad_field"


def test_to_frame_validates_too() -> None:
    with pytest.raises(ChannelProtocolError, match="state"):
        StateMessage(state="bogus").to_frame()


def test_unknown_fields_are_ignored_and_unknown_types_refused() -> None:
    frame = Frame("exit", {"type": "exit", "code": 2, "future": [1, 2]})
    assert decode_message(frame) == ExitMessage(code=2)
    with pytest.raises(ChannelProtocolError) as info:
        decode_message(Frame("reboot", {"type": "reboot"}))
    assert info.value.reason == "unknown_type"
    with pytest.raises(ChannelProtocolError, match="expected a 'exit' frame"):
        ExitMessage.from_frame({"type": "log", "code": 1})


def _snapshot_of(size: int) -> dict[str, Any]:
    """A snapshot whose CBOR encoding is exactly ``size`` bytes."""
    overhead = len(cbor2.dumps({"m": ""}))
    value = "x" * (size - overhead)
    snapshot = {"m": value}
    # Text lengths of 24, 256 and 65536 characters take longer headers: adjust to the byte.
    while len(cbor2.dumps(snapshot)) > size:
        value = value[:-1]
        snapshot = {"m": value}
    assert len(cbor2.dumps(snapshot)) == size
    return snapshot


def test_metrics_snapshot_size_bound_on_both_sides() -> None:
    """A snapshot of exactly MAX_METRICS_BYTES goes through; one byte more is refused by the
    sender (nothing is sent, the channel stays usable) and by the receiver."""
    channel = FrameChannel()
    fits = MetricsMessage(snapshot=_snapshot_of(MAX_METRICS_BYTES))
    (frame,) = FrameChannel().receive_data(channel.send(fits))
    assert decode_message(frame) == fits
    too_big = MetricsMessage(snapshot=_snapshot_of(MAX_METRICS_BYTES + 1))
    with pytest.raises(ChannelProtocolError, match="snapshot") as info:
        channel.send(too_big)
    assert info.value.reason == "bad_field"
    assert channel.send(ExitMessage(code=0))  # still usable
    # A peer that does not check (a raw map) still meets the receiver's check.
    wire = FrameChannel().send({"type": "metrics", "snapshot": too_big.snapshot})
    (raw,) = FrameChannel().receive_data(wire)
    with pytest.raises(ChannelProtocolError, match="snapshot"):
        decode_message(raw)
    assert MAX_METRICS_BYTES == 64 * 1024 < MAX_FRAME_BYTES


def test_metrics_snapshot_values_are_json_like() -> None:
    for bad in ({"a": {1: 2}}, {"a": {1, 2}}, {"a": b"x"}, {"a": object()}):
        with pytest.raises(ChannelProtocolError, match="snapshot"):
            MetricsMessage(snapshot=bad).to_frame()


def test_metrics_snapshot_nesting_is_bounded() -> None:
    deep: dict[str, Any] = {"v": 1}
    for _ in range(MAX_CBOR_DEPTH):
        deep = {"d": deep}
    with pytest.raises(ChannelProtocolError, match="snapshot"):
        MetricsMessage(snapshot=deep).to_frame()
    shallow: dict[str, Any] = {"v": 1}
    for _ in range(MAX_CBOR_DEPTH - 2):
        shallow = {"d": shallow}
    message = MetricsMessage(snapshot=shallow)
    (frame,) = FrameChannel().receive_data(FrameChannel().send(message))
    assert decode_message(frame) == message


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@given(st.dictionaries(st.text(max_size=12), json_values, max_size=8))
@settings(max_examples=200)
def test_any_json_like_snapshot_round_trips(snapshot: dict[str, Any]) -> None:
    message = MetricsMessage(snapshot=snapshot)
    (frame,) = FrameChannel().receive_data(FrameChannel().send(message))
    assert decode_message(frame) == message


def test_optional_fields_take_their_defaults_when_an_older_peer_leaves_them_out() -> None:
    """``bundle_end`` without ``deltas`` (a parent without a delta store) means no deltas
    follow; a ``preload_result`` without ``deltas``/``deltas_head`` (an enclave that predates
    deltas) says nothing about them. Both are still written on the way out."""
    end = decode_message(
        FrameChannel().receive_data(FrameChannel().send({"type": "bundle_end", "total_bytes": 9}))[
            0
        ]
    )
    assert end == BundleEndMessage(total_bytes=9, deltas=0)
    old = {
        "type": "preload_result",
        "ok": True,
        "reason": None,
        "accounts": 1,
        "sha256": SHA,
        "preload_ms": 2,
    }
    result = PreloadResultMessage.from_frame(old)
    assert (result.deltas, result.deltas_head) == (None, None)
    assert BundleEndMessage(total_bytes=9).to_frame() == {
        "type": "bundle_end",
        "total_bytes": 9,
        "deltas": 0,
    }


def test_delta_chunk_bytes_are_not_in_repr() -> None:
    assert "data=" not in repr(DeltaChunkMessage(data=b"abc"))


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "identity", "sealed": b""},
        {"type": "identity", "sealed": bytes(16 * 1024 + 1)},
        {"type": "identity", "sealed": "text"},
        {"type": "genesis_attestation", "document": b"d", "public_key": bytes(31)},
        {"type": "genesis_data_key", "key_id": "", "ciphertext_blob": b"b", "ciphertext": b"c"},
        {"type": "identity_stored", "public_key": "ab"},
    ],
)
def test_identity_messages_are_checked(frame: dict[str, object]) -> None:
    with pytest.raises(ChannelProtocolError) as info:
        decode_message(Frame(str(frame["type"]), frame))
    assert info.value.reason == "bad_field"


def test_needed_is_what_completes_the_frame_in_progress() -> None:
    """`FrameChannel.needed`: the prefix's missing bytes, then the payload's, byte by byte;
    after a whole frame, a new prefix's four."""
    from trio_sign.nitro import FrameChannel, HelloMessage

    frame = FrameChannel().send(HelloMessage(channel="logs"))
    channel = FrameChannel()
    assert channel.needed == 4
    for i, byte in enumerate(frame[:-1]):
        assert channel.receive_data(bytes([byte])) == []
        got = i + 1
        assert channel.needed == (4 - got if got < 4 else len(frame) - got)
    assert len(channel.receive_data(frame[-1:])) == 1
    assert channel.needed == 4
