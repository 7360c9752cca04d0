"""gRPC status codes, the RPC error, and the small text encodings of the gRPC HTTP/2 spec.

Everything here is pure: no I/O, no Trio.
"""

from __future__ import annotations

import enum
import math
from typing import Final

from .._errors import TrioSignError


class StatusCode(enum.IntEnum):
    """The gRPC status codes (``grpc-status`` values), numbered as in the gRPC spec."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(TrioSignError):
    """A call ended with a non-OK gRPC status.

    Handlers raise it to answer with that status; `GrpcChannel` raises it when the server (or
    the local protocol core) ends a call with that status.

    Attributes:
        status: the `StatusCode`.
        details: the human-readable ``grpc-message`` (may be empty). Never put key material here:
            it goes on the wire.
    """

    def __init__(self, status: StatusCode, details: str = "") -> None:
        super().__init__(f"{status.name}: {details}" if details else status.name)
        self.status = status
        self.details = details


class GrpcProtocolError(TrioSignError):
    """The gRPC protocol core was used in a way the protocol does not allow (a local bug or a
    call on a stream that is already gone)."""


def status_from_int(value: int) -> StatusCode:
    """Map a wire ``grpc-status`` number to a `StatusCode`; unknown numbers become UNKNOWN."""
    try:
        return StatusCode(value)
    except ValueError:
        return StatusCode.UNKNOWN


# --- grpc-message percent-encoding -----------------------------------------------------------

# The spec: percent-encode the UTF-8 bytes outside %x20-%x7E, and '%' itself.
_PLAIN: Final = frozenset(range(0x20, 0x7F)) - {ord("%")}
_HEX: Final = b"0123456789ABCDEF"


def encode_grpc_message(message: str) -> bytes:
    """Percent-encode a status message for the ``grpc-message`` header."""
    raw = message.encode("utf-8", "replace")
    if all(b in _PLAIN for b in raw):
        return raw
    out = bytearray()
    for b in raw:
        if b in _PLAIN:
            out.append(b)
        else:
            out += b"%" + _HEX[b >> 4 : (b >> 4) + 1] + _HEX[b & 15 : (b & 15) + 1]
    return bytes(out)


def decode_grpc_message(value: bytes) -> str:
    """Decode ``grpc-message``; malformed escapes are kept literally, as the spec asks."""
    if b"%" not in value:
        return value.decode("utf-8", "replace")
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        b = value[i]
        if b == 0x25 and i + 2 < n and _is_hex(value[i + 1]) and _is_hex(value[i + 2]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(b: int) -> bool:
    return 0x30 <= b <= 0x39 or 0x41 <= b <= 0x46 or 0x61 <= b <= 0x66


# --- grpc-timeout ------------------------------------------------------------------------------

_TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
# Largest to smallest resolution; formatting picks the finest unit that fits in 8 digits.
_FORMAT_UNITS: Final = (
    (b"n", 1e9),
    (b"u", 1e6),
    (b"m", 1e3),
    (b"S", 1.0),
    (b"M", 1 / 60),
    (b"H", 1 / 3600),
)
_MAX_TIMEOUT_VALUE: Final = 99_999_999


def parse_grpc_timeout(value: bytes) -> float:
    """Parse ``grpc-timeout`` (1 to 8 ASCII digits and a unit of H M S m u n) into seconds.

    Raises:
        ValueError: the value is malformed.
    """
    if not 2 <= len(value) <= 9:
        raise ValueError("grpc-timeout must be 1 to 8 digits and a unit")
    unit = _TIMEOUT_UNITS.get(value[-1])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        raise ValueError("grpc-timeout must be 1 to 8 digits and a unit (H, M, S, m, u, n)")
    return int(digits) * unit


def format_grpc_timeout(seconds: float) -> bytes:
    """Format a relative timeout for ``grpc-timeout``, rounded up, at the finest unit that fits.

    Non-positive timeouts become ``1n`` (already expired; the server answers DEADLINE_EXCEEDED).
    """
    if seconds <= 0 or math.isnan(seconds):
        return b"1n"
    for unit, per_second in _FORMAT_UNITS:
        count = math.ceil(seconds * per_second)
        if count <= _MAX_TIMEOUT_VALUE:
            return str(count).encode("ascii") + unit
    return str(_MAX_TIMEOUT_VALUE).encode("ascii") + b"H"


# gRPC's mapping from an HTTP status (when no grpc-status came) to a gRPC status.
_HTTP_TO_GRPC: Final = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}


def status_from_http(http_status: int) -> StatusCode:
    """The gRPC status a client reports for a non-200 HTTP response without ``grpc-status``."""
    return _HTTP_TO_GRPC.get(http_status, StatusCode.UNKNOWN)


# gRPC's mapping from an HTTP/2 RST_STREAM error code to a gRPC status.
_H2_TO_GRPC: Final = {
    0x8: StatusCode.CANCELLED,  # CANCEL
    0x7: StatusCode.UNAVAILABLE,  # REFUSED_STREAM
    0xB: StatusCode.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}


def status_from_h2_error(error_code: int) -> StatusCode:
    """The gRPC status for a stream reset with this HTTP/2 error code."""
    return _H2_TO_GRPC.get(error_code, StatusCode.INTERNAL)
