"""Parent <-> enclave channel framing (sans-io) and the messages the enclave runtime exchanges.

Framing
-------
Every vsock channel between the parent and the enclave (preload, status, logs, deltas) carries
the same frames, in both directions::

    frame   = length payload
    length  = u32, big-endian: the number of payload bytes (not counting these 4)
    payload = one CBOR data item (RFC 8949): a map whose "type" key is a text string

Rules a receiver enforces (a violation raises :class:`ChannelProtocolError` and leaves the
connection unusable: the peer is broken or hostile, and we cannot resynchronise a byte stream):

- ``length`` is at most ``max_frame_bytes`` (:data:`MAX_FRAME_BYTES`, 1 MiB, by default). An
  oversized length is refused as soon as its 4 bytes arrive, before any payload is buffered;
  ``length`` 0 is refused too.
- The payload is exactly one well-formed CBOR item: no bytes after it inside the frame.
- Strict CBOR subset: no tags (major type 6) at all, no indefinite-length items, no simple
  values other than false/true/null, no ``undefined``; text is valid UTF-8; map keys are text
  or byte strings and unique; nesting at most :data:`MAX_CBOR_DEPTH` deep.
- The top-level item is a map with text keys and a text ``"type"``.

Chunking is irrelevant: :meth:`FrameChannel.receive_data` accepts bytes as they arrive in any
split and returns every frame completed so far. A stream that ends inside a frame is detected by
:meth:`FrameChannel.receive_eof`. Senders build frames with :meth:`FrameChannel.send`, which
refuses a frame larger than the limit (nothing is sent then; the channel stays usable).

Messages
--------
The message vocabulary is a set of frozen dataclasses, one per ``"type"``, with ``to_frame()``
and ``from_frame()``. ``from_frame`` checks every field's type (``bool`` is not an integer;
integers are non-negative where they count things) and ignores fields it does not know, so a
newer peer can add optional fields. A field marked *optional* below may be absent (an older
peer): ``from_frame`` then uses its default; ``to_frame`` always writes it. Byte strings are
CBOR byte strings, text is CBOR text.

=========================  ====================  =============================================
type                       direction             fields
=========================  ====================  =============================================
``hello``                  both, first frame     ``channel`` ("preload"/"status"/"logs"/
                                                 "deltas"), ``version`` (int,
                                                 :data:`PROTOCOL_VERSION`)
``attestation``            enclave -> parent     ``document`` (bytes, raw COSE_Sign1 whose
                                                 ``public_key`` is the recipient RSA key)
``recipient_ciphertext``   parent -> enclave     ``ciphertext`` (bytes, KMS
                                                 ``CiphertextForRecipient``)
``identity``               parent -> enclave     optional, every boot with a delta identity
                                                 key, right after the bundle's
                                                 ``recipient_ciphertext``: ``sealed`` (bytes,
                                                 the sealed identity file, public data, at
                                                 most :data:`MAX_SEALED_IDENTITY_BYTES`). The
                                                 enclave answers with a second
                                                 ``attestation`` (a fresh RSA key), the parent
                                                 with a second ``recipient_ciphertext`` (KMS
                                                 Decrypt with Recipient of the file's data
                                                 key); then the bundle follows
``identity_genesis``       parent -> enclave     genesis boot only, instead of ``events`` and
                                                 ``recipient_ciphertext``: no fields; create
                                                 the identity key (docs/runbook.md §7)
``genesis_attestation``    enclave -> parent     ``document`` (bytes, COSE_Sign1 with a fresh
                                                 RSA key), ``public_key`` (bytes, 32: the new
                                                 identity key, for the encryption context)
``genesis_data_key``       parent -> enclave     ``key_id`` (text, the KMS key ARN),
                                                 ``ciphertext_blob`` (bytes, KMS
                                                 ``CiphertextBlob``), ``ciphertext`` (bytes,
                                                 ``CiphertextForRecipient``)
``identity_sealed``        enclave -> parent     ``sealed`` (bytes, the sealed identity file)
``identity_stored``        parent -> enclave     ``public_key`` (hex): the file is durable; the
                                                 genesis enclave exits 0 (reason ``genesis``)
``bundle_chunk``           parent -> enclave     ``data`` (bytes, the next piece of the sealed
                                                 bundle)
``bundle_end``             parent -> enclave     ``total_bytes`` (int, bytes sent in chunks),
                                                 ``deltas`` (int, optional, default 0: how many
                                                 stored deltas follow on the preload channel,
                                                 each as ``delta_push``, ``delta_chunk``...,
                                                 ``delta_end``; docs/key-lifecycle.md §4)
``events``                 parent -> enclave     optional, just before ``recipient_ciphertext``:
                                                 ``gateway_url`` (text), ``node_id`` (text),
                                                 where the enclave's SSE client subscribes
                                                 (through the parent's relay)
``preload_result``         enclave -> parent     ``ok`` (bool), ``reason`` (text|null),
                                                 ``accounts`` (int), ``sha256`` (hex|null: the
                                                 base's fingerprint), ``preload_ms`` (int);
                                                 optional: ``deltas`` (int|null, the deltas
                                                 loaded at boot), ``deltas_head`` (hex|null)
``state``                  enclave -> parent     ``state`` (one of :data:`STATES`), ``reason``
                                                 (text|null), ``accounts``, ``sha256``,
                                                 ``preload_ms`` (each null until known)
``exit``                   enclave -> parent     ``code`` (int, the process exit status)
``drain``                  parent -> enclave     (status channel) no fields: stop taking new
                                                 sessions, finish open ones, exit 0
``log``                    enclave -> parent     ``line`` (text, one redacted JSON log line)
``dropped``                enclave -> parent     ``count`` (int, log lines dropped since the
                                                 last ``dropped``)
``metrics``                enclave -> parent     (status channel) ``snapshot`` (map with text
                                                 keys of JSON-like values: text, int, float,
                                                 bool, null, arrays, maps; at most
                                                 :data:`MAX_METRICS_BYTES` encoded), the
                                                 enclave's numbers for the parent's
                                                 ``/metrics``, every ``metrics_interval_s``
=========================  ====================  =============================================
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import cbor2

from .._errors import TrioSignError

#: Default maximum CBOR payload size of one frame (the 4-byte length prefix not included).
MAX_FRAME_BYTES = 1 << 20
#: Maximum nesting of CBOR arrays and maps inside a frame.
MAX_CBOR_DEPTH = 16
#: The version a ``hello`` frame carries.
PROTOCOL_VERSION = 1
#: The channels a ``hello`` may name.
CHANNELS = frozenset({"preload", "status", "logs", "deltas"})
#: Enclave states reported on the status channel.
STATES = frozenset({"booting", "preloading", "serving", "draining", "failed", "exiting"})
#: Largest ``metrics`` snapshot (its CBOR encoding), far below :data:`MAX_FRAME_BYTES`.
MAX_METRICS_BYTES = 64 * 1024
#: Largest ``data`` of one ``delta_chunk`` (docs/key-lifecycle.md §4).
MAX_DELTA_CHUNK_BYTES = 256 * 1024
#: Largest delta sequence: object names carry it in 8 decimal digits (``delta-00000001.enc``).
MAX_DELTA_SEQUENCE = 99_999_999
#: Longest ``reason`` of a ``delta_store_failed`` or ``delta_refused``.
MAX_REASON_CHARS = 1024
#: Largest sealed identity file an ``identity`` or ``identity_sealed`` frame carries.
MAX_SEALED_IDENTITY_BYTES = 16 * 1024
#: An Ed25519 public key.
_PUBLIC_KEY_BYTES = 32

_LENGTH = struct.Struct(">I")


class ChannelProtocolError(TrioSignError):
    """The peer broke the channel framing or sent a malformed message.

    Attributes:
        reason: ``"oversized"``, ``"empty_frame"``, ``"bad_cbor"``, ``"tag"``,
            ``"trailing_data"``, ``"not_a_map"``, ``"missing_type"``, ``"truncated"``,
            ``"unusable"`` (a previous error already broke the connection), ``"unknown_type"``
            or ``"bad_field"`` (a message's field has the wrong type or value).
        frames: frames completely received in the same :meth:`FrameChannel.receive_data` call
            before the bad one, so that nothing valid is lost.
    """

    def __init__(self, message: str, *, reason: str, frames: tuple[Frame, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.frames = frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One received frame: its ``"type"`` and the whole decoded map (``"type"`` included)."""

    type: str
    fields: Mapping[str, Any]


# ------------------------------------------------------------------------------------------
# Strict CBOR well-formedness check (cbor2 decodes tags and ignores trailing bytes; we don't)

_SIMPLE_OK = {20, 21, 22}  # false, true, null
_FLOATS = {25, 26, 27}


def _cbor_error(message: str, reason: str = "bad_cbor") -> ChannelProtocolError:
    return ChannelProtocolError(f"malformed frame: {message}", reason=reason)


def _check_item(data: bytes, pos: int, depth: int) -> int:
    """Validate one CBOR item at ``pos``; return the offset just past it."""
    if pos >= len(data):
        raise _cbor_error("CBOR item truncated")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if major == 7:
        if info < 24:
            if info not in _SIMPLE_OK:
                raise _cbor_error(f"CBOR simple value {info} is not allowed")
            return pos
        if info in _FLOATS:
            end = pos + (1 << (info - 24))
            if end > len(data):
                raise _cbor_error("CBOR float truncated")
            return end
        raise _cbor_error(f"CBOR simple/break byte 0x{initial:02x} is not allowed")
    if info < 24:
        arg = info
    elif info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise _cbor_error("CBOR argument truncated")
        arg = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    elif info == 31:
        raise _cbor_error("indefinite-length CBOR items are not allowed")
    else:
        raise _cbor_error(f"reserved CBOR additional information {info}")
    if major == 6:
        raise _cbor_error(f"CBOR tag {arg} is not allowed", reason="tag")
    if major in (0, 1):
        return pos
    if major in (2, 3):
        end = pos + arg
        if end > len(data):
            raise _cbor_error("CBOR string truncated")
        return end
    # Arrays (4) and maps (5).
    if depth >= MAX_CBOR_DEPTH:
        raise _cbor_error(f"CBOR nesting deeper than {MAX_CBOR_DEPTH}")
    count = arg * 2 if major == 5 else arg
    if count > len(data) - pos:  # every item takes at least one byte
        raise _cbor_error("CBOR container truncated")
    for _ in range(count):
        pos = _check_item(data, pos, depth + 1)
    return pos


def _decode_payload(payload: bytes) -> Frame:
    end = _check_item(payload, 0, 0)
    if end != len(payload):
        raise _cbor_error(
            f"{len(payload) - end} bytes of trailing data after the CBOR item",
            reason="trailing_data",
        )
    if payload[0] >> 5 != 5:
        raise ChannelProtocolError(
            "malformed frame: the payload is not a CBOR map", reason="not_a_map"
        )
    try:
        obj = cbor2.loads(
            payload,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
            max_depth=MAX_CBOR_DEPTH + 1,
        )
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise _cbor_error(f"CBOR decoding failed ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):  # pragma: no cover - the pre-check guarantees a map
        raise ChannelProtocolError(
            "malformed frame: the payload is not a CBOR map", reason="not_a_map"
        )
    if not all(isinstance(k, str) for k in obj):
        raise _cbor_error("a frame's top-level keys must be text", reason="not_a_map")
    type_ = obj.get("type")
    if not isinstance(type_, str):
        raise ChannelProtocolError('malformed frame: no text "type" field', reason="missing_type")
    return Frame(type_, obj)


# ------------------------------------------------------------------------------------------
# The sans-io framing state machine


class FrameChannel:
    """Length-prefixed CBOR framing for one byte stream, in both directions.

    No I/O: feed received bytes to :meth:`receive_data` and write what :meth:`send` returns.

    Args:
        max_frame_bytes: the largest payload accepted or produced.

    Error handling:
        Any framing violation raises :class:`ChannelProtocolError`; after one, every later
        :meth:`receive_data` raises ``reason="unusable"``: close the connection.
    """

    __slots__ = ("_broken", "_buffer", "max_frame_bytes")

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if not 1 <= max_frame_bytes <= 0xFFFFFFFF:
            raise ValueError("max_frame_bytes must be between 1 and 2**32 - 1")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def broken(self) -> bool:
        """True once a protocol error made the connection unusable."""
        return self._broken is not None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buffer)

    @property
    def needed(self) -> int:
        """Bytes still to receive to complete the frame in progress: what its length prefix
        still lacks, or once the prefix is in, the rest of its payload (a reader that wants
        nothing past one frame asks for no more). Meaningful while no complete frame is
        buffered, which is so after every :meth:`receive_data`."""
        buf = self._buffer
        if len(buf) < _LENGTH.size:
            return _LENGTH.size - len(buf)
        length: int = _LENGTH.unpack_from(buf, 0)[0]
        return _LENGTH.size + length - len(buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Take received bytes (any chunking); return the frames they complete, in order."""
        if self._broken is not None:
            raise ChannelProtocolError(
                f"channel unusable after an earlier protocol error ({self._broken})",
                reason="unusable",
            )
        self._buffer += data
        frames: list[Frame] = []
        buf = self._buffer
        pos = 0
        try:
            while len(buf) - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, pos)
                if length > self.max_frame_bytes:
                    raise ChannelProtocolError(
                        f"frame of {length} bytes exceeds max_frame_bytes ({self.max_frame_bytes})",
                        reason="oversized",
                    )
                if length == 0:
                    raise ChannelProtocolError(
                        "malformed frame: empty payload", reason="empty_frame"
                    )
                end = pos + _LENGTH.size + length
                if end > len(buf):
                    break
                frames.append(_decode_payload(bytes(buf[pos + _LENGTH.size : end])))
                pos = end
        except ChannelProtocolError as exc:
            self._broken = exc.reason
            self._buffer = bytearray()
            exc.frames = tuple(frames)
            raise
        del buf[:pos]
        return frames

    def receive_eof(self) -> None:
        """The peer closed the stream. Raises ``reason="truncated"`` if it did so mid-frame."""
        if self._buffer and self._broken is None:
            self._broken = "truncated"
            n = len(self._buffer)
            self._buffer = bytearray()
            raise ChannelProtocolError(
                f"stream ended inside a frame ({n} bytes buffered)", reason="truncated"
            )

    def send(self, obj: Mapping[str, Any] | ChannelMessage) -> bytes:
        """Encode one frame: a message, or a map with a text ``"type"``.

        Error handling:
            ``ChannelProtocolError`` (``"oversized"``, ``"missing_type"``) if the frame would
            be refused by a receiver with the same limit; nothing is sent, the channel stays
            usable. ``TypeError``/``ValueError`` from cbor2 for unencodable values.
        """
        frame = obj.to_frame() if isinstance(obj, ChannelMessage) else obj
        if not isinstance(frame.get("type"), str):
            raise ChannelProtocolError('a frame needs a text "type" field', reason="missing_type")
        if not all(isinstance(k, str) for k in frame):
            raise ChannelProtocolError("a frame's top-level keys must be text", reason="not_a_map")
        payload = cbor2.dumps(dict(frame))
        # What cbor2 may add on its own (tags for datetimes, sets, big ints...) a receiver
        # refuses; find out here, not on the other side.
        _check_item(payload, 0, 0)
        if len(payload) > self.max_frame_bytes:
            raise ChannelProtocolError(
                f"frame of {len(payload)} bytes exceeds max_frame_bytes ({self.max_frame_bytes})",
                reason="oversized",
            )
        return _LENGTH.pack(len(payload)) + payload


# ------------------------------------------------------------------------------------------
# Messages

_M = TypeVar("_M", bound="ChannelMessage")


def _bad_field(type_: str, name: str, expected: str) -> ChannelProtocolError:
    return ChannelProtocolError(
        f"{type_!r} message: field {name!r} must be {expected}", reason="bad_field"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: object) -> bool:
    return _is_int(value) and value >= 0  # type: ignore[operator]


def _is_sha256_hex(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


#: The default of a field that must be present.
_REQUIRED: Any = object()


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    check: Callable[[object], bool]
    expected: str
    default: Any = _REQUIRED  # optional fields: the value when an older peer leaves it out


class ChannelMessage:
    """Base class of the channel messages: ``to_frame()`` / ``from_frame()`` with validation."""

    __slots__ = ()
    TYPE: ClassVar[str]
    _FIELDS: ClassVar[tuple[_Field, ...]]

    def to_frame(self) -> dict[str, Any]:
        """The frame map (``"type"`` first), validated like a received one."""
        frame: dict[str, Any] = {"type": self.TYPE}
        for f in self._FIELDS:
            frame[f.name] = getattr(self, f.name)
        self._validate(frame)
        return frame

    @classmethod
    def _validate(cls, frame: Mapping[str, Any]) -> None:
        if frame.get("type") != cls.TYPE:
            raise ChannelProtocolError(
                f"expected a {cls.TYPE!r} frame, got {frame.get('type')!r}", reason="bad_field"
            )
        for f in cls._FIELDS:
            if f.name not in frame:
                if f.default is not _REQUIRED:
                    continue
                raise _bad_field(cls.TYPE, f.name, f"present ({f.expected})")
            if not f.check(frame[f.name]):
                raise _bad_field(cls.TYPE, f.name, f.expected)

    @classmethod
    def from_frame(cls: type[_M], frame: Frame | Mapping[str, Any]) -> _M:
        """Validate a received frame and build the message (unknown fields are ignored)."""
        fields = frame.fields if isinstance(frame, Frame) else frame
        cls._validate(fields)
        ctor: Callable[..., _M] = cls
        return ctor(**{f.name: fields.get(f.name, f.default) for f in cls._FIELDS})


def _fields(*spec: tuple[str, Callable[[object], bool], str]) -> tuple[_Field, ...]:
    return tuple(_Field(*s) for s in spec)


def _optional_field(
    name: str, check: Callable[[object], bool], expected: str, default: Any
) -> _Field:
    """A field an older peer may leave out (``default`` then)."""
    return _Field(name, check, expected, default)


_BYTES = (lambda v: isinstance(v, bytes), "a byte string")
_TEXT = (lambda v: isinstance(v, str), "a text string")
_COUNT = (_count, "a non-negative integer")
_OPT_TEXT = (_optional(lambda v: isinstance(v, str)), "a text string or null")
_OPT_COUNT = (_optional(_count), "a non-negative integer or null")
_OPT_SHA256 = (_optional(_is_sha256_hex), "64 lowercase hex digits or null")


@dataclass(frozen=True, slots=True)
class HelloMessage(ChannelMessage):
    """First frame on every channel, in both directions."""

    TYPE: ClassVar[str] = "hello"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        ("channel", lambda v: v in CHANNELS, f"one of {sorted(CHANNELS)}"),
        ("version", _is_int, "an integer"),
    )
    channel: str
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class AttestationMessage(ChannelMessage):
    """The enclave's attestation document (its ``public_key`` is the recipient RSA key)."""

    TYPE: ClassVar[str] = "attestation"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("document", *_BYTES))
    document: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class RecipientCiphertextMessage(ChannelMessage):
    """KMS ``CiphertextForRecipient`` for the bundle's data key, from the parent."""

    TYPE: ClassVar[str] = "recipient_ciphertext"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("ciphertext", *_BYTES))
    ciphertext: bytes = field(repr=False)


#: Longest ``gateway_url`` / ``node_id`` an ``events`` message may carry.
MAX_EVENTS_URL_CHARS = 2048
MAX_NODE_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class EventsConfigMessage(ChannelMessage):
    """Where the enclave subscribes to the gateway's events: sent by the parent, so that one
    image (one PCR0) serves every node. The parent is untrusted, but it relays the event stream
    anyway; the enclave still checks both values (:func:`trio_sign.sse.events_url` and
    :func:`trio_sign.sse.valid_node_id`) and a ``--gateway-url`` on its measured command line
    wins."""

    TYPE: ClassVar[str] = "events"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        (
            "gateway_url",
            lambda v: isinstance(v, str) and 0 < len(v) <= MAX_EVENTS_URL_CHARS,
            f"a text string of 1 to {MAX_EVENTS_URL_CHARS} characters",
        ),
        (
            "node_id",
            lambda v: isinstance(v, str) and 0 < len(v) <= MAX_NODE_ID_CHARS,
            f"a text string of 1 to {MAX_NODE_ID_CHARS} characters",
        ),
    )
    gateway_url: str
    node_id: str


@dataclass(frozen=True, slots=True)
class BundleChunkMessage(ChannelMessage):
    """The next piece of the sealed share bundle."""

    TYPE: ClassVar[str] = "bundle_chunk"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("data", *_BYTES))
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class BundleEndMessage(ChannelMessage):
    """No more chunks; ``total_bytes`` lets the enclave detect a transport-level loss.
    ``deltas`` stored deltas follow, in sequence order from 1 (docs/key-lifecycle.md §4)."""

    TYPE: ClassVar[str] = "bundle_end"
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        *_fields(("total_bytes", *_COUNT)),
        _optional_field("deltas", *_COUNT, 0),
    )
    total_bytes: int
    deltas: int = 0


@dataclass(frozen=True, slots=True)
class PreloadResultMessage(ChannelMessage):
    """The preload outcome: account count, bundle fingerprint, load time, or why it failed.

    ``sha256`` is the base bundle's fingerprint. ``deltas`` and ``deltas_head`` (optional: an
    enclave that predates deltas leaves them out) are the deltas loaded at boot and the head
    (docs/key-lifecycle.md §1)."""

    TYPE: ClassVar[str] = "preload_result"
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        *_fields(
            ("ok", lambda v: isinstance(v, bool), "a boolean"),
            ("reason", *_OPT_TEXT),
            ("accounts", *_COUNT),
            ("sha256", *_OPT_SHA256),
            ("preload_ms", *_COUNT),
        ),
        _optional_field("deltas", *_OPT_COUNT, None),
        _optional_field("deltas_head", *_OPT_SHA256, None),
    )
    ok: bool
    reason: str | None = None
    accounts: int = 0
    sha256: str | None = None
    preload_ms: int = 0
    deltas: int | None = None
    deltas_head: str | None = None


@dataclass(frozen=True, slots=True)
class StateMessage(ChannelMessage):
    """The enclave's lifecycle state on the status channel."""

    TYPE: ClassVar[str] = "state"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        ("state", lambda v: v in STATES, f"one of {sorted(STATES)}"),
        ("reason", *_OPT_TEXT),
        ("accounts", *_OPT_COUNT),
        ("sha256", *_OPT_SHA256),
        ("preload_ms", *_OPT_COUNT),
    )
    state: str
    reason: str | None = None
    accounts: int | None = None
    sha256: str | None = None
    preload_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ExitMessage(ChannelMessage):
    """The enclave process is exiting with ``code``."""

    TYPE: ClassVar[str] = "exit"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("code", _is_int, "an integer"))
    code: int


@dataclass(frozen=True, slots=True)
class DrainMessage(ChannelMessage):
    """The parent asks the enclave to drain and exit (an orderly stop: a rolling restart, a
    host shutdown). Availability only: the parent can stop the enclave anyway."""

    TYPE: ClassVar[str] = "drain"
    _FIELDS: ClassVar[tuple[_Field, ...]] = ()


@dataclass(frozen=True, slots=True)
class LogMessage(ChannelMessage):
    """One redacted JSON log line (no trailing newline)."""

    TYPE: ClassVar[str] = "log"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("line", *_TEXT))
    line: str


@dataclass(frozen=True, slots=True)
class DroppedMessage(ChannelMessage):
    """``count`` log lines were dropped (the log queue was full) since the last report."""

    TYPE: ClassVar[str] = "dropped"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("count", *_COUNT))
    count: int


def _is_json_like(value: object, depth: int = 0) -> bool:
    """Text, int, float, bool, null, or arrays and text-keyed maps of them (bounded depth)."""
    if value is None or isinstance(value, (str, int, float)):
        return True  # bool is an int
    if depth >= MAX_CBOR_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_json_like(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_like(v, depth + 1) for k, v in value.items())
    return False


def _is_snapshot(value: object) -> bool:
    # Depth 1: the snapshot sits inside the frame's own map.
    if not isinstance(value, dict) or not _is_json_like(value, 1):
        return False
    try:
        encoded = cbor2.dumps(dict(value))
    except (TypeError, ValueError):  # pragma: no cover - _is_json_like admits only encodables
        return False
    return len(encoded) <= MAX_METRICS_BYTES


@dataclass(frozen=True, slots=True)
class MetricsMessage(ChannelMessage):
    """The enclave's numbers (sessions, signatures, latency, pool, refusals), for the parent to
    serve on its ``/metrics``. Sent on the status channel every ``metrics_interval_s``.

    ``snapshot`` is whatever the enclave's metrics registry reports, as JSON-like values; the
    parent reads it for reporting only. A snapshot over :data:`MAX_METRICS_BYTES` is refused
    (``ChannelProtocolError``, ``reason="bad_field"``) on both sides."""

    TYPE: ClassVar[str] = "metrics"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        (
            "snapshot",
            _is_snapshot,
            f"a map of JSON-like values of at most {MAX_METRICS_BYTES} bytes",
        ),
    )
    snapshot: dict[str, Any]


# -- the deltas channel (docs/key-lifecycle.md §4) ----------------------------------------------

_SEQUENCE = (
    lambda v: _is_int(v) and 1 <= v <= MAX_DELTA_SEQUENCE,
    f"an integer from 1 to {MAX_DELTA_SEQUENCE}",
)
_SHA256 = (_is_sha256_hex, "64 lowercase hex digits")
_REASON = (
    lambda v: isinstance(v, str) and 0 < len(v) <= MAX_REASON_CHARS,
    f"a text string of 1 to {MAX_REASON_CHARS} characters",
)


@dataclass(frozen=True, slots=True)
class DeltaStoreMessage(ChannelMessage):
    """The enclave asks the parent to store delta ``sequence`` (``total_bytes`` long) durably;
    the bundle follows in ``delta_chunk`` frames and a ``delta_end``."""

    TYPE: ClassVar[str] = "delta_store"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        ("sequence", *_SEQUENCE), ("total_bytes", *_COUNT)
    )
    sequence: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class DeltaChunkMessage(ChannelMessage):
    """The next piece of a delta bundle being stored or pushed (at most
    :data:`MAX_DELTA_CHUNK_BYTES`, never empty)."""

    TYPE: ClassVar[str] = "delta_chunk"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        (
            "data",
            lambda v: isinstance(v, bytes) and 0 < len(v) <= MAX_DELTA_CHUNK_BYTES,
            f"a byte string of 1 to {MAX_DELTA_CHUNK_BYTES} bytes",
        ),
    )
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DeltaEndMessage(ChannelMessage):
    """The delta's last chunk was sent."""

    TYPE: ClassVar[str] = "delta_end"
    _FIELDS: ClassVar[tuple[_Field, ...]] = ()


def chunked_frames(
    head: ChannelMessage, data: bytes, chunk_bytes: int = MAX_DELTA_CHUNK_BYTES
) -> Iterator[ChannelMessage]:
    """``head`` (a ``delta_store``, ``base_store`` or ``delta_push`` naming ``len(data)``),
    ``data`` in ``delta_chunk`` frames of at most ``chunk_bytes`` (never above
    :data:`MAX_DELTA_CHUNK_BYTES`), then ``delta_end``. Lazy: one chunk is copied at a time."""
    step = max(1, min(chunk_bytes, MAX_DELTA_CHUNK_BYTES))
    yield head
    view = memoryview(data)
    for start in range(0, len(data), step):
        yield DeltaChunkMessage(data=bytes(view[start : start + step]))
    yield DeltaEndMessage()


class ChunkedBody:
    """Sans-io: the ``delta_chunk`` frames and ``delta_end`` after a ``delta_store``,
    ``base_store`` or ``delta_push`` (``what``, for messages) of ``total`` bytes. The caller
    checks ``total`` against its limit first; never more than ``total`` bytes are held.

    Error handling: :meth:`feed` raises ``ChannelProtocolError`` (``bad_length``,
    ``unexpected_message``) for chunks over or under ``total`` and for any other message.
    """

    __slots__ = ("_data", "total", "what")

    def __init__(self, what: str, total: int) -> None:
        self.what = what
        self.total = total
        self._data = bytearray()

    def feed(self, message: ChannelMessage) -> bytes | None:
        """Take the next message; the whole body once ``delta_end`` arrives, else None."""
        if isinstance(message, DeltaChunkMessage):
            self._data += message.data
            if len(self._data) > self.total:
                raise ChannelProtocolError(
                    f"{self.what}: chunks exceed total_bytes ({self.total})", reason="bad_length"
                )
            return None
        if not isinstance(message, DeltaEndMessage):
            raise ChannelProtocolError(
                f"unexpected {message.TYPE!r} inside {self.what}", reason="unexpected_message"
            )
        if len(self._data) != self.total:
            raise ChannelProtocolError(
                f"{self.what}: {len(self._data)} bytes received, total_bytes said {self.total}",
                reason="bad_length",
            )
        return bytes(self._data)


@dataclass(frozen=True, slots=True)
class DeltaStoredMessage(ChannelMessage):
    """Delta ``sequence`` is durable in the parent's store (``sha256``: its fingerprint)."""

    TYPE: ClassVar[str] = "delta_stored"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sequence", *_SEQUENCE), ("sha256", *_SHA256))
    sequence: int
    sha256: str


@dataclass(frozen=True, slots=True)
class DeltaConflictMessage(ChannelMessage):
    """Another delta already holds ``sequence``; the parent pushes it next."""

    TYPE: ClassVar[str] = "delta_conflict"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sequence", *_SEQUENCE))
    sequence: int


@dataclass(frozen=True, slots=True)
class DeltaStoreFailedMessage(ChannelMessage):
    """Delta ``sequence`` was not stored (I/O error, S3 refused, not a delta bundle)."""

    TYPE: ClassVar[str] = "delta_store_failed"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sequence", *_SEQUENCE), ("reason", *_REASON))
    sequence: int
    reason: str


@dataclass(frozen=True, slots=True)
class DeltaPushMessage(ChannelMessage):
    """The parent sends stored delta ``sequence`` (``total_bytes`` long); ``delta_chunk``
    frames and a ``delta_end`` follow."""

    TYPE: ClassVar[str] = "delta_push"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        ("sequence", *_SEQUENCE), ("total_bytes", *_COUNT)
    )
    sequence: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class DeltaLoadedMessage(ChannelMessage):
    """The enclave verified and loaded delta ``sequence``: its head is now ``head`` and it
    holds ``accounts`` accounts."""

    TYPE: ClassVar[str] = "delta_loaded"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        ("sequence", *_SEQUENCE), ("head", *_SHA256), ("accounts", *_COUNT)
    )
    sequence: int
    head: str
    accounts: int


@dataclass(frozen=True, slots=True)
class DeltaRefusedMessage(ChannelMessage):
    """The enclave refused pushed delta ``sequence`` (``reason``: its stable code)."""

    TYPE: ClassVar[str] = "delta_refused"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sequence", *_SEQUENCE), ("reason", *_REASON))
    sequence: int
    reason: str


# -- the delta identity key on the boot channel (docs/runbook.md §7) ----------------------------

_SEALED = (
    lambda v: isinstance(v, bytes) and 0 < len(v) <= MAX_SEALED_IDENTITY_BYTES,
    f"a byte string of 1 to {MAX_SEALED_IDENTITY_BYTES} bytes",
)


@dataclass(frozen=True, slots=True)
class IdentityMessage(ChannelMessage):
    """The sealed delta identity file (public data), sent every boot after the bundle's
    ``recipient_ciphertext``; the enclave attests again for its data key."""

    TYPE: ClassVar[str] = "identity"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sealed", *_SEALED))
    sealed: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class IdentityGenesisMessage(ChannelMessage):
    """A genesis boot: create the delta identity key instead of loading a bundle."""

    TYPE: ClassVar[str] = "identity_genesis"
    _FIELDS: ClassVar[tuple[_Field, ...]] = ()


@dataclass(frozen=True, slots=True)
class GenesisAttestationMessage(ChannelMessage):
    """Genesis: a fresh attestation document for KMS ``GenerateDataKey`` with ``Recipient``,
    and the new identity public key (the encryption context names it)."""

    TYPE: ClassVar[str] = "genesis_attestation"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        ("document", *_BYTES),
        (
            "public_key",
            lambda v: isinstance(v, bytes) and len(v) == _PUBLIC_KEY_BYTES,
            f"a byte string of {_PUBLIC_KEY_BYTES} bytes",
        ),
    )
    document: bytes = field(repr=False)
    public_key: bytes


@dataclass(frozen=True, slots=True)
class GenesisDataKeyMessage(ChannelMessage):
    """KMS's answer to ``GenerateDataKey`` with ``Recipient``: the key ARN, the wrapped data
    key (``CiphertextBlob``) and ``CiphertextForRecipient`` (only the enclave opens it)."""

    TYPE: ClassVar[str] = "genesis_data_key"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        (
            "key_id",
            lambda v: isinstance(v, str) and 0 < len(v) <= 2048,
            "a text string of 1 to 2048 characters",
        ),
        ("ciphertext_blob", *_BYTES),
        ("ciphertext", *_BYTES),
    )
    key_id: str
    ciphertext_blob: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class IdentitySealedMessage(ChannelMessage):
    """Genesis: the sealed identity file for the parent to store (public data)."""

    TYPE: ClassVar[str] = "identity_sealed"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sealed", *_SEALED))
    sealed: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class IdentityStoredMessage(ChannelMessage):
    """Genesis: the parent stored the sealed file durably (``public_key``: the key it names)."""

    TYPE: ClassVar[str] = "identity_stored"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("public_key", *_SHA256))
    public_key: str


# -- compaction on the deltas channel (docs/compaction.md) ------------------------------------

#: Longest KMS key ARN a compaction names.
MAX_KMS_KEY_ID_CHARS = 2048
_KMS_KEY_ID = (
    lambda v: isinstance(v, str) and 0 < len(v) <= MAX_KMS_KEY_ID_CHARS,
    f"a text string of 1 to {MAX_KMS_KEY_ID_CHARS} characters",
)
_OBJECT_NAME = (
    lambda v: isinstance(v, str) and 0 < len(v) <= 1024,
    "a text string of 1 to 1024 characters",
)


@dataclass(frozen=True, slots=True)
class CompactionKeyRequestMessage(ChannelMessage):
    """Compaction: the enclave asks for a data key under ``kms_key_id`` (KMS
    ``GenerateDataKey`` with ``Recipient`` = ``document``, a fresh attestation)."""

    TYPE: ClassVar[str] = "compaction_key_request"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        ("document", *_BYTES), ("kms_key_id", *_KMS_KEY_ID)
    )
    document: bytes = field(repr=False)
    kms_key_id: str


@dataclass(frozen=True, slots=True)
class CompactionKeyMessage(ChannelMessage):
    """KMS's answer relayed: the key ARN, ``CiphertextBlob`` and ``CiphertextForRecipient``
    (only the enclave opens it)."""

    TYPE: ClassVar[str] = "compaction_key"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(
        ("key_id", *_KMS_KEY_ID), ("ciphertext_blob", *_BYTES), ("ciphertext", *_BYTES)
    )
    key_id: str
    ciphertext_blob: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CompactionKeyFailedMessage(ChannelMessage):
    """The parent could not get a compaction data key (no KMS configured, KMS refused)."""

    TYPE: ClassVar[str] = "compaction_key_failed"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("reason", *_REASON))
    reason: str


@dataclass(frozen=True, slots=True)
class BaseStoreMessage(ChannelMessage):
    """The enclave asks the parent to store a compacted base (fingerprint ``sha256``,
    ``total_bytes`` long) put-if-absent as ``base-<sha256>.enc``; ``delta_chunk`` frames and
    a ``delta_end`` follow."""

    TYPE: ClassVar[str] = "base_store"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sha256", *_SHA256), ("total_bytes", *_COUNT))
    sha256: str
    total_bytes: int


@dataclass(frozen=True, slots=True)
class BaseStoredMessage(ChannelMessage):
    """The compacted base ``sha256`` is durable, as ``object`` (its URL in the store)."""

    TYPE: ClassVar[str] = "base_stored"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sha256", *_SHA256), ("object", *_OBJECT_NAME))
    sha256: str
    object: str


@dataclass(frozen=True, slots=True)
class BaseStoreFailedMessage(ChannelMessage):
    """The compacted base ``sha256`` was not stored (``reason``)."""

    TYPE: ClassVar[str] = "base_store_failed"
    _FIELDS: ClassVar[tuple[_Field, ...]] = _fields(("sha256", *_SHA256), ("reason", *_REASON))
    sha256: str
    reason: str


#: Every message class by its ``"type"``.
MESSAGE_TYPES: Mapping[str, type[ChannelMessage]] = {
    cls.TYPE: cls
    for cls in (
        HelloMessage,
        AttestationMessage,
        RecipientCiphertextMessage,
        EventsConfigMessage,
        BundleChunkMessage,
        BundleEndMessage,
        PreloadResultMessage,
        StateMessage,
        ExitMessage,
        DrainMessage,
        LogMessage,
        DroppedMessage,
        MetricsMessage,
        DeltaStoreMessage,
        DeltaChunkMessage,
        DeltaEndMessage,
        DeltaStoredMessage,
        DeltaConflictMessage,
        DeltaStoreFailedMessage,
        DeltaPushMessage,
        DeltaLoadedMessage,
        DeltaRefusedMessage,
        IdentityMessage,
        IdentityGenesisMessage,
        GenesisAttestationMessage,
        GenesisDataKeyMessage,
        IdentitySealedMessage,
        IdentityStoredMessage,
        CompactionKeyRequestMessage,
        CompactionKeyMessage,
        CompactionKeyFailedMessage,
        BaseStoreMessage,
        BaseStoredMessage,
        BaseStoreFailedMessage,
    )
}


def decode_message(frame: Frame) -> ChannelMessage:
    """The message a frame carries. Raises ``reason="unknown_type"`` for other types."""
    cls = MESSAGE_TYPES.get(frame.type)
    if cls is None:
        raise ChannelProtocolError(
            f"unknown message type {frame.type[:64]!r}", reason="unknown_type"
        )
    return cls.from_frame(frame)
