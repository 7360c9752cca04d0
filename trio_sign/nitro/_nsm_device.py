"""The Nitro Security Module (``/dev/nsm``) client: raw ioctl through ctypes, CBOR messages.

Layers (sans-io first):

- :func:`encode_request` / :func:`decode_response`: the CBOR messages, exactly as the AWS Rust
  API (``aws-nitro-enclaves-nsm-api`` ``src/api/mod.rs``) serializes them with serde's
  externally tagged enums: unit variants are bare text (``"GetRandom"``, ``"DescribeNSM"``),
  struct variants are one-entry maps (``{"DescribePCR": {"index": 16}}``), ``None`` is CBOR null,
  and errors come back as ``{"Error": "InvalidIndex"}``.
- A *transport*: any callable ``bytes -> bytes`` that delivers one request and returns the raw
  response. :class:`NsmDevice.open` uses the real ioctl (:class:`IoctlTransport`); tests inject
  a fake that answers in the real CBOR format.
- :class:`NsmDevice`: the seven operations with typed arguments and checked answers. The
  development stand-in ``LocalNsm`` has the same methods.

The ioctl (Linux ``include/uapi/linux/nsm.h``, AWS ``src/driver/mod.rs``)::

    struct nsm_iovec { __u64 addr; __u64 len; };
    struct nsm_raw   { struct nsm_iovec request; struct nsm_iovec response; };
    NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw) = 0xC0200A00

The request is at most 4096 bytes, the response buffer is 12 KiB, and the kernel writes the
actual response length back into ``response.len``. The mainline driver restricts the ioctl to
CAP_SYS_ADMIN: open the device before dropping privileges.

Blocking and Trio: every :class:`NsmDevice` call is a blocking system call (milliseconds; an
attestation takes the longest). From Trio, never call them on the event loop thread: use
:class:`AsyncNsm`, which runs each call through ``trio.to_thread.run_sync``, or call
``trio.to_thread.run_sync`` yourself at the call site.

Also here: :func:`seed_entropy`, which feeds NSM randomness to the kernel pool and credits it
(``RNDADDENTROPY``) where permitted. The AWS enclave init does not credit entropy, and Graviton
has no RDRAND.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

import cbor2
import trio

from .._errors import TrioSignError
from ..crypto._sodium import memzero

#: ``_IOWR(0x0A, 0, struct nsm_raw)``.
NSM_IOCTL_RAW = 0xC0200A00
#: Largest request the driver accepts (larger fails with EMSGSIZE).
NSM_REQUEST_MAX_BYTES = 0x1000
#: Response buffer size, as the AWS driver allocates it.
NSM_RESPONSE_MAX_BYTES = 0x3000
#: ``_IOW('R', 0x03, int[2])``: add entropy to the pool and credit it (needs CAP_SYS_ADMIN).
RNDADDENTROPY = 0x40085203

#: The error names the NSM returns in ``{"Error": name}``.
NSM_ERROR_NAMES = frozenset(
    {
        "InvalidArgument",
        "InvalidIndex",
        "InvalidResponse",
        "ReadOnlyIndex",
        "InvalidOperation",
        "BufferTooSmall",
        "InputTooLarge",
        "InternalError",
    }
)

# Indirection so tests can emulate the kernel side of the ioctl.
_ioctl = fcntl.ioctl

Transport = Callable[[bytes], bytes]


class NsmError(TrioSignError):
    """The NSM refused a request, or talking to it failed.

    Attributes:
        reason: the NSM's own error name (one of :data:`NSM_ERROR_NAMES`, e.g.
            ``"InvalidIndex"``) when the NSM answered ``{"Error": ...}``; otherwise
            ``"request_too_large"``, ``"ioctl_failed"`` (the system call failed; see
            ``errno``) or ``"bad_response"`` (undecodable or unexpected answer).
        errno: the OS error number for ``"ioctl_failed"``, else None.
    """

    def __init__(self, message: str, *, reason: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.errno = errno


# ------------------------------------------------------------------------------------------
# Sans-io: the CBOR messages

_UNIT_REQUESTS = frozenset({"GetRandom", "DescribeNSM"})
_UNIT_RESPONSES = frozenset({"LockPCR", "LockPCRs"})


def encode_request(request: str, params: Mapping[str, Any] | None = None) -> bytes:
    """CBOR for one NSM request.

    Args:
        request: the variant name (``"Attestation"``, ``"DescribePCR"``, ``"ExtendPCR"``,
            ``"LockPCR"``, ``"LockPCRs"``, ``"GetRandom"``, ``"DescribeNSM"``).
        params: the variant's fields in declaration order, or None for unit variants.

    Error handling:
        ``NsmError(reason="request_too_large")`` above :data:`NSM_REQUEST_MAX_BYTES`.
    """
    if params is None:
        if request not in _UNIT_REQUESTS:
            raise ValueError(f"NSM request {request!r} needs parameters")
        data = cbor2.dumps(request)
    else:
        data = cbor2.dumps({request: dict(params)})
    if len(data) > NSM_REQUEST_MAX_BYTES:
        raise NsmError(
            f"NSM {request} request is {len(data)} bytes; the device accepts at most "
            f"{NSM_REQUEST_MAX_BYTES}",
            reason="request_too_large",
        )
    return data


def decode_response(data: bytes, request: str) -> Any:
    """Decode the NSM's answer to ``request``.

    Returns:
        The variant's field map (for ``LockPCR``/``LockPCRs``: None).

    Error handling:
        ``NsmError`` with the NSM's error name for ``{"Error": name}``, or
        ``reason="bad_response"`` for anything that is not the expected variant.
    """
    try:
        obj = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise NsmError(
            f"NSM answer to {request} is not valid CBOR ({exc.__class__.__name__})",
            reason="bad_response",
        ) from None
    if isinstance(obj, dict) and len(obj) == 1 and "Error" in obj:
        name = obj["Error"]
        if not isinstance(name, str):
            raise NsmError(f"NSM answer to {request}: malformed Error", reason="bad_response")
        # Unknown names are passed through (a newer NSM may add some), but bounded.
        name = name[:64]
        raise NsmError(f"NSM refused {request}: {name}", reason=name)
    if request in _UNIT_RESPONSES:
        if obj == request:
            return None
    elif isinstance(obj, dict) and len(obj) == 1 and isinstance(obj.get(request), dict):
        return obj[request]
    raise NsmError(
        f"NSM answered {request} with an unexpected {type(obj).__name__}", reason="bad_response"
    )


def _field(answer: Mapping[str, Any], request: str, name: str, kind: type) -> Any:
    value = answer.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise NsmError(
            f"NSM answer to {request}: field {name!r} missing or not {kind.__name__}",
            reason="bad_response",
        )
    return value


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 0xFFFF:
        raise ValueError(f"PCR index must be an integer in 0..65535, got {index!r}")


def _check_optional_bytes(name: str, value: object) -> None:
    if value is not None and not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes or None")


# ------------------------------------------------------------------------------------------
# The ioctl transport


class _NsmIovec(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _NsmRaw(ctypes.Structure):
    _fields_ = [("request", _NsmIovec), ("response", _NsmIovec)]


assert ctypes.sizeof(_NsmRaw) == 32


class IoctlTransport:
    """One request/response over ``ioctl(fd, NSM_IOCTL_RAW, &nsm_raw)``.

    The request and response live in ctypes buffers that stay referenced for the whole call
    (their addresses go into the struct; never ``id()``). The struct is passed to
    ``fcntl.ioctl`` as a mutable buffer so the kernel's write-back of ``response.len`` is seen.
    The response buffer is zeroed after each call (it may hold GetRandom output).

    Args:
        fd: an open ``/dev/nsm`` descriptor; the transport does not own it.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __call__(self, request: bytes) -> bytes:
        if len(request) > NSM_REQUEST_MAX_BYTES:
            raise NsmError(
                f"NSM request of {len(request)} bytes exceeds {NSM_REQUEST_MAX_BYTES}",
                reason="request_too_large",
            )
        req_buf = ctypes.create_string_buffer(request, len(request))
        resp_buf = (ctypes.c_uint8 * NSM_RESPONSE_MAX_BYTES)()
        raw = _NsmRaw(
            _NsmIovec(ctypes.addressof(req_buf), len(request)),
            _NsmIovec(ctypes.addressof(resp_buf), NSM_RESPONSE_MAX_BYTES),
        )
        try:
            try:
                _ioctl(self._fd, NSM_IOCTL_RAW, raw, True)
            except OSError as exc:
                hint = " (request too large)" if exc.errno == errno.EMSGSIZE else ""
                raise NsmError(
                    f"NSM ioctl failed: {os.strerror(exc.errno or 0)}{hint}",
                    reason="ioctl_failed",
                    errno=exc.errno,
                ) from None
            n = raw.response.len
            if n > NSM_RESPONSE_MAX_BYTES:
                raise NsmError(
                    f"NSM reported a {n}-byte response for a {NSM_RESPONSE_MAX_BYTES}-byte buffer",
                    reason="bad_response",
                )
            return bytes(resp_buf[:n])
        finally:
            ctypes.memset(resp_buf, 0, NSM_RESPONSE_MAX_BYTES)
            del req_buf, resp_buf


# ------------------------------------------------------------------------------------------
# The device


class NsmDevice:
    """The Nitro Security Module: attestation, PCRs, randomness.

    Args:
        transport: delivers one CBOR request and returns the CBOR response (see the module
            docstring); :meth:`open` provides the real one.
        on_close: called once by :meth:`close` (``open`` closes the file descriptor there).

    Every method blocks (see the module docstring for Trio). Calls are serialized by a lock,
    and :meth:`close` waits for a call in flight.

    Error handling:
        :class:`NsmError`; ``ValueError``/``TypeError`` for bad arguments; ``ValueError`` after
        :meth:`close`.
    """

    __slots__ = ("_closed", "_lock", "_on_close", "_transport")

    def __init__(self, transport: Transport, *, on_close: Callable[[], None] | None = None) -> None:
        self._transport = transport
        self._on_close = on_close
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, path: str = "/dev/nsm") -> NsmDevice:
        """Open the device (``O_RDWR | O_CLOEXEC``). Raises ``OSError`` if it is absent."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return cls(IoctlTransport(fd), on_close=functools.partial(os.close, fd))

    def _call(self, request: str, params: Mapping[str, Any] | None = None) -> Any:
        data = encode_request(request, params)
        with self._lock:
            if self._closed:
                raise ValueError("the NSM device is closed")
            response = self._transport(data)
        return decode_response(response, request)

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A signed attestation document (raw COSE_Sign1) binding the three optional fields."""
        for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
            _check_optional_bytes(name, value)
        answer = self._call(
            "Attestation",
            {
                "user_data": None if user_data is None else bytes(user_data),
                "nonce": None if nonce is None else bytes(nonce),
                "public_key": None if public_key is None else bytes(public_key),
            },
        )
        document: bytes = _field(answer, "Attestation", "document", bytes)
        return document

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        """``(locked, value)`` of PCR ``index``."""
        _check_index(index)
        answer = self._call("DescribePCR", {"index": index})
        return (
            _field(answer, "DescribePCR", "lock", bool),
            _field(answer, "DescribePCR", "data", bytes),
        )

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; returns the new value."""
        _check_index(index)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("data must be bytes")
        answer = self._call("ExtendPCR", {"index": index, "data": bytes(data)})
        value: bytes = _field(answer, "ExtendPCR", "data", bytes)
        return value

    def lock_pcr(self, index: int) -> None:
        """Lock PCR ``index`` against further extension (until the enclave ends)."""
        _check_index(index)
        self._call("LockPCR", {"index": index})

    def get_random(self) -> bytes:
        """Random bytes from the NSM's hardware source (up to 256 per call)."""
        value: bytes = _field(self._call("GetRandom"), "GetRandom", "random", bytes)
        return value

    def describe_nsm(self) -> dict[str, Any]:
        """Module version, id, PCR count, locked PCRs and digest, as the NSM reports them."""
        answer = self._call("DescribeNSM")
        for name, kind in (
            ("version_major", int),
            ("version_minor", int),
            ("version_patch", int),
            ("module_id", str),
            ("max_pcrs", int),
            ("locked_pcrs", list),
            ("digest", str),
        ):
            _field(answer, "DescribeNSM", name, kind)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in answer["locked_pcrs"]):
            raise NsmError(
                "NSM answer to DescribeNSM: locked_pcrs must be integers", reason="bad_response"
            )
        return dict(answer)

    def close(self) -> None:
        """Close the device (idempotent; waits for a call in flight)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def __enter__(self) -> NsmDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# Trio wrapper


class NsmLike(Protocol):
    """What :class:`NsmDevice` and the local stand-in both provide."""

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes: ...
    def describe_pcr(self, index: int) -> tuple[bool, bytes]: ...
    def extend_pcr(self, index: int, data: bytes) -> bytes: ...
    def lock_pcr(self, index: int) -> None: ...
    def get_random(self) -> bytes: ...
    def describe_nsm(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


_T = TypeVar("_T")


class AsyncNsm:
    """Async versions of the NSM calls, each run in a worker thread.

    Cancellation:
        An ioctl cannot be interrupted; a cancelled call waits for it to finish (milliseconds)
        and then raises ``trio.Cancelled``, so no call is ever left running unobserved.
    """

    __slots__ = ("device",)

    def __init__(self, device: NsmLike) -> None:
        self.device = device

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(fn)

    async def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        return await self._run(
            functools.partial(
                self.device.attestation, user_data=user_data, nonce=nonce, public_key=public_key
            )
        )

    async def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        return await self._run(functools.partial(self.device.describe_pcr, index))

    async def extend_pcr(self, index: int, data: bytes) -> bytes:
        return await self._run(functools.partial(self.device.extend_pcr, index, data))

    async def lock_pcr(self, index: int) -> None:
        await self._run(functools.partial(self.device.lock_pcr, index))

    async def get_random(self) -> bytes:
        return await self._run(self.device.get_random)

    async def describe_nsm(self) -> dict[str, Any]:
        return await self._run(self.device.describe_nsm)


# ------------------------------------------------------------------------------------------
# Entropy


_RAND_POOL_INFO = struct.Struct("=ii")  # int entropy_count (bits); int buf_size (bytes)
#: ``fcntl.ioctl`` copies argument buffers of at most 1024 bytes.
_IOCTL_ARG_MAX = 1024


def pack_rand_pool_info(data: bytes | bytearray | memoryview, *, entropy_bits: int) -> bytearray:
    """``struct rand_pool_info {int entropy_count; int buf_size; __u32 buf[];}`` for ``data``.

    The caller zeroes the returned buffer after the ioctl.
    """
    if not 0 <= entropy_bits <= 8 * len(data):
        raise ValueError("entropy_bits must be between 0 and 8 * len(data)")
    if _RAND_POOL_INFO.size + len(data) > _IOCTL_ARG_MAX:
        raise ValueError(f"at most {_IOCTL_ARG_MAX - _RAND_POOL_INFO.size} bytes per call")
    out = bytearray(_RAND_POOL_INFO.size + len(data))
    _RAND_POOL_INFO.pack_into(out, 0, entropy_bits, len(data))
    out[_RAND_POOL_INFO.size :] = data
    return out


@dataclass(frozen=True, slots=True)
class EntropySeed:
    """What :func:`seed_entropy` did.

    Attributes:
        nbytes: NSM random bytes mixed into the kernel pool.
        credited: True if they were also credited as entropy (``RNDADDENTROPY``).
        detail: why they were not credited (``"not requested"``, the OS error), or None.
    """

    nbytes: int
    credited: bool
    detail: str | None = None


class _HasGetRandom(Protocol):
    def get_random(self) -> bytes: ...


def seed_entropy(
    device: _HasGetRandom, *, credit: bool = True, path: str = "/dev/random"
) -> EntropySeed:
    """Mix one NSM ``GetRandom`` answer into the kernel pool, crediting it where permitted.

    With ``credit`` the bytes go in through ``ioctl(RNDADDENTROPY)``, which mixes and credits
    them (8 bits per byte; needs CAP_SYS_ADMIN, i.e. root in the enclave). If that is refused,
    or without ``credit``, they are written to ``path``, which mixes them without credit.
    Blocking; from Trio call it through ``trio.to_thread.run_sync``.

    Error handling:
        :class:`NsmError` from the device; ``OSError`` if ``path`` cannot be opened or written.
        A refused credit is not an error: see :attr:`EntropySeed.credited` and ``detail``.
    """
    random = device.get_random()  # immutable bytes: cannot be zeroed (NSM output, one use)
    if not random:
        raise NsmError("NSM GetRandom returned no bytes", reason="bad_response")
    random = random[: _IOCTL_ARG_MAX - _RAND_POOL_INFO.size]
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        detail = "not requested"
        if credit:
            info = pack_rand_pool_info(random, entropy_bits=8 * len(random))
            try:
                _ioctl(fd, RNDADDENTROPY, info, False)
                return EntropySeed(len(random), True)
            except OSError as exc:
                detail = f"RNDADDENTROPY refused: {os.strerror(exc.errno or 0)}"
            finally:
                memzero(info)
        os.write(fd, random)
        return EntropySeed(len(random), False, detail)
    finally:
        os.close(fd)
