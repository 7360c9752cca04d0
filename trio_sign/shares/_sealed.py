"""The sealed key-share bundle: a sans-io encoder and decoder, plus thin file helpers.

Layout::

    b"TSSEALv1" ‖ u32be header_len ‖ header (canonical JSON, <= 64 KiB)
    ‖ secretstream header (24 bytes)
    ‖ chunk* where chunk = u32be ct_len ‖ secretstream ciphertext
    [‖ signature record (104 bytes)]

Everything up to the end of the FINAL chunk is the bundle's **body**; its SHA-256 is the
bundle's fingerprint. The optional signature record after it (DESIGN §12,
:mod:`trio_sign.shares._signature`) is an Ed25519 signature over that fingerprint and names
its key; it is not part of the fingerprint, so re-signing a bundle does not change it.

The secretstream is XChaCha20-Poly1305 (libsodium ``crypto_secretstream``) under a fresh data
key wrapped by a :class:`~trio_sign.shares._keywrap.DataKeyProvider`. The associated data of
every chunk is the exact prefix bytes ``MAGIC ‖ header_len ‖ header``, so any change to the
header fails authentication of chunk 0. The stream's own chaining detects reordered, dropped or
duplicated chunks; the FINAL tag on the last chunk detects truncation at a chunk boundary.

Chunk plaintext is whole ``binary-v1`` records only (``binary-v2`` when some account has a
policy other than ``default``, ``binary-v3`` when some account's suite is not Ed25519: the
header's ``record_format`` says which; a bundle of Ed25519 accounts that all use ``default``
is written ``binary-v1``, byte for byte as before, and an Ed25519-only bundle never
``binary-v3``). A ``binary-v3`` header also carries ``ciphersuites``, the accounts per suite
(public), which the loaders hold the records to. Records
never span chunks; the last chunk carries ``TAG_FINAL``, the others ``TAG_MESSAGE``; zero
accounts is a single empty FINAL chunk.

``ShareFileError.reason`` codes raised here: ``bad_magic``, ``bad_header``, ``truncated`` (also
a header whose counts cannot fit in the bundle's size, when the size is known up front),
``tampered`` (a reordered chunk is indistinguishable from a tampered one and is reported as
``tampered`` at its position), ``trailing_data`` (bytes after the FINAL chunk that cannot be a
signature record), ``bad_signature_record``, ``count_mismatch``, ``chunk_too_large``,
``bad_record`` (a chunk does not end on a record boundary), ``unknown_ciphersuite`` (a
``binary-v3`` record's suite code), ``output_exists`` and
``input_changed`` (:func:`seal_file`), and every record-level code of
:mod:`trio_sign.shares._records` with the 1-based record number.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import os
import struct
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from .._atomic import atomic_file
from .._errors import InternalError, KeyWrapError, ShareFileError
from ..crypto import _sodium, _stream
from ..crypto._schemes import ED25519, SCHEMES, Scheme, scheme_by_name
from ._keywrap import DataKeyProvider, canonical_json
from ._plaintext import read_plaintext_hashed
from ._records import (
    BINARY_FIXED_BYTES,
    CIPHERSUITE,
    MAX_ACCOUNT_ID_BYTES,
    RECORD_FORMAT_V1,
    RECORD_FORMAT_V2,
    RECORD_FORMAT_V3,
    RECORD_FORMATS,
    ShareRecord,
    check_account_id,
    check_points,
    check_policy,
    check_scalars,
    check_threshold,
    record_error,
    scheme_coded,
)
from ._signature import (
    KIND_BASE,
    KIND_DELTA,
    KINDS,
    SIGNATURE_MAGIC,
    SIGNATURE_RECORD_BYTES,
    BundleSignature,
    BundleSigner,
    sign_bundle_digest,
)

MAGIC: Final = b"TSSEALv1"
SEALED_FORMAT: Final = "trio-sign/sealed-key-shares"
SEALED_VERSION: Final = 1
RECORD_FORMAT: Final = RECORD_FORMAT_V1
MAX_HEADER_BYTES: Final = 64 * 1024
DEFAULT_CHUNK_SIZE: Final = 64 * 1024
#: Smallest chunk that still holds the largest possible record.
MIN_CHUNK_SIZE: Final = 1 + MAX_ACCOUNT_ID_BYTES + BINARY_FIXED_BYTES
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
#: A sanity bound on the header's count. Nothing is allocated from the count (a forged header
#: is refused against the bundle's size when known, and loaders grow with the records found).
MAX_ACCOUNTS: Final = 1 << 28
READ_SIZE: Final = 1 << 20
#: The smallest ``binary-v1`` record (a 1-byte account id).
MIN_RECORD_BYTES: Final = 1 + 1 + BINARY_FIXED_BYTES
#: The smallest chunk frame: its length and the authentication tag, no plaintext.
MIN_FRAME_BYTES: Final = 4 + _stream.ABYTES

_PREFIX_FIXED = len(MAGIC) + 4
_U32 = struct.Struct(">I")
_HEADER_FIELDS: Final = frozenset(
    {
        "format",
        "version",
        "ciphersuite",
        "record_format",
        "key_provider",
        "kms_key_id",
        "encrypted_data_key",
        "encryption_context",
        "chunk_size",
        "accounts",
        "chunks",
    }
)
#: The fields of a ``delta`` header (docs/key-lifecycle.md §1): refused in a ``base``.
DELTA_FIELDS: Final = ("sequence", "previous", "operation", "dkg_id")
#: What a delta does (docs/key-lifecycle.md §1).
OPERATION_CREATE: Final = "create"
OPERATION_REFRESH: Final = "refresh"
OPERATION_REPAIR: Final = "repair"
OPERATIONS: Final = (OPERATION_CREATE, OPERATION_REFRESH, OPERATION_REPAIR)
#: Largest delta sequence (object names carry it in 8 decimal digits).
MAX_DELTA_SEQUENCE: Final = 99_999_999
#: Longest ``dkg_id`` a delta header may carry.
MAX_DKG_ID_CHARS: Final = 128
#: A compacted base's record of what it holds (docs/compaction.md): only in a ``base``.
COMPACTS_FIELD: Final = "compacts"
#: Header fields a reader accepts but does not require (bundles sealed before they existed;
#: ``ciphersuites`` is in ``binary-v3`` headers only; the delta fields in ``delta`` headers
#: only, where :func:`check_delta_header` requires them; ``compacts`` in a compacted base).
_OPTIONAL_FIELDS: Final = frozenset({"kind", "ciphersuites", COMPACTS_FIELD, *DELTA_FIELDS})
_HEX64_CHARS: Final = frozenset("0123456789abcdef")


# ---------------------------------------------------------------------------------------------
# Header


def _header_error(message: str) -> ShareFileError:
    return ShareFileError(f"sealed header: {message}", reason="bad_header")


def _is_int(v: Any) -> bool:
    return type(v) is int


def check_sealed_header(header: Any) -> dict[str, Any]:
    """Validate a parsed sealed header; returns it (as a dict) or raises ``bad_header``."""
    if not isinstance(header, dict):
        raise _header_error("not a JSON object")
    missing = sorted(_HEADER_FIELDS - set(header))
    if missing:
        raise _header_error(f"missing field {missing[0]!r}")
    extra = sorted(set(header) - _HEADER_FIELDS - _OPTIONAL_FIELDS)
    if extra:
        raise _header_error(f"unknown field {extra[0]!r}")
    if header["format"] != SEALED_FORMAT:
        raise _header_error(f"format must be {SEALED_FORMAT!r}")
    if not _is_int(header["version"]) or header["version"] != SEALED_VERSION:
        raise _header_error(f"version must be {SEALED_VERSION}")
    if header["record_format"] not in RECORD_FORMATS:
        raise _header_error(f"record_format must be one of {', '.join(RECORD_FORMATS)}")
    _check_header_suites(header)
    if "kind" in header and header["kind"] not in KINDS:
        raise _header_error(f"kind must be one of {', '.join(KINDS)}")
    _check_delta_fields(header)
    if COMPACTS_FIELD in header:
        check_compacts(header[COMPACTS_FIELD], kind=header.get("kind", KIND_BASE))
    for name in ("key_provider", "kms_key_id", "encrypted_data_key"):
        if not isinstance(header[name], str) or not header[name]:
            raise _header_error(f"{name} must be a non-empty string")
    try:
        base64.b64decode(header["encrypted_data_key"], validate=True)
    except (binascii.Error, ValueError):
        raise _header_error("encrypted_data_key is not valid base64") from None
    ctx = header["encryption_context"]
    if not isinstance(ctx, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()
    ):
        raise _header_error("encryption_context must be an object of strings")
    if ctx.get("format") != SEALED_FORMAT:
        raise _header_error(f"encryption_context must include format={SEALED_FORMAT!r}")
    cs = header["chunk_size"]
    if not _is_int(cs) or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE:
        raise _header_error(f"chunk_size must be an integer in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    accounts, chunks = header["accounts"], header["chunks"]
    if not _is_int(accounts) or not 0 <= accounts <= MAX_ACCOUNTS:
        raise _header_error(f"accounts must be an integer in 0..{MAX_ACCOUNTS}")
    if not _is_int(chunks) or not 1 <= chunks <= max(1, accounts):
        raise _header_error("chunks must be an integer in 1..max(1, accounts)")
    return header


def _check_delta_fields(header: dict[str, Any]) -> None:
    """The delta fields are refused in a ``base`` header and, where present, well-formed."""
    present = [name for name in DELTA_FIELDS if name in header]
    if header.get("kind", KIND_BASE) != KIND_DELTA:
        if present:
            raise _header_error(f"{present[0]} is only allowed in a delta bundle")
        return
    if "sequence" in header:
        seq = header["sequence"]
        if not _is_int(seq) or not 1 <= seq <= MAX_DELTA_SEQUENCE:
            raise _header_error(f"sequence must be an integer in 1..{MAX_DELTA_SEQUENCE}")
    if "previous" in header:
        prev = header["previous"]
        if not isinstance(prev, str) or len(prev) != 64 or not set(prev) <= _HEX64_CHARS:
            raise _header_error("previous must be 64 lowercase hex digits (a SHA-256)")
    if "operation" in header and header["operation"] not in OPERATIONS:
        raise _header_error(f"operation must be one of {', '.join(OPERATIONS)}")
    if "dkg_id" in header:
        dkg_id = header["dkg_id"]
        if not isinstance(dkg_id, str) or len(dkg_id) > MAX_DKG_ID_CHARS:
            raise _header_error(f"dkg_id must be a text string of at most {MAX_DKG_ID_CHARS}")
        if header.get("operation") == OPERATION_CREATE and not dkg_id:
            raise _header_error("a create delta names the DKG that made it (dkg_id)")


def check_compacts(value: Any, *, kind: str = KIND_BASE) -> dict[str, Any]:
    """A base header's ``compacts`` (docs/compaction.md): ``{"base": hex, "head": hex,
    "deltas": n}``, exactly those keys; ``head`` is what delta ``n + 1`` names as its
    ``previous`` (the last compacted delta's fingerprint; with ``n`` 0, what delta 1 on
    ``base`` names: ``base``, or ``base``'s own ``compacts.head`` when it is compacted).

    Error handling: ``bad_header`` (also in a ``delta`` header, where it has no meaning).
    """
    if kind != KIND_BASE:
        raise _header_error("compacts is only allowed in a base bundle")
    if not isinstance(value, dict) or set(value) != {"base", "head", "deltas"}:
        raise _header_error("compacts must be an object with exactly base, head and deltas")
    for name in ("base", "head"):
        digest = value[name]
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX64_CHARS:
            raise _header_error(f"compacts.{name} must be 64 lowercase hex digits (a SHA-256)")
    deltas = value["deltas"]
    if not _is_int(deltas) or not 0 <= deltas <= MAX_DELTA_SEQUENCE:
        raise _header_error(f"compacts.deltas must be an integer in 0..{MAX_DELTA_SEQUENCE}")
    return value


def check_delta_header(header: Mapping[str, Any]) -> None:
    """A (checked) header is a ``delta`` with every delta field (what an enclave loads).

    :func:`check_sealed_header` checks the fields' form where present; a delta an enclave
    chains and applies must carry all four (``bad_header`` otherwise).
    """
    if header.get("kind", KIND_BASE) != KIND_DELTA:
        raise _header_error("not a delta bundle (kind must be 'delta')")
    missing = [name for name in DELTA_FIELDS if name not in header]
    if missing:
        raise _header_error(f"a delta bundle needs {missing[0]!r}")


def _check_header_suites(header: dict[str, Any]) -> None:
    """``binary-v1``/``-v2`` hold Ed25519 accounts only; a ``binary-v3`` header names a known
    suite and counts the accounts of each (``ciphersuites``, summing to ``accounts``)."""
    v3 = header["record_format"] == RECORD_FORMAT_V3
    if not v3:
        if header["ciphersuite"] != CIPHERSUITE:
            raise _header_error(f"ciphersuite must be {CIPHERSUITE!r}")
        if "ciphersuites" in header:
            raise _header_error(f"ciphersuites is only allowed with {RECORD_FORMAT_V3}")
        return
    known = {s.name for s in SCHEMES}
    if header["ciphersuite"] not in known:
        raise _header_error(
            f"unknown ciphersuite {header['ciphersuite']!r}; known: {', '.join(sorted(known))}"
        )
    counts = header.get("ciphersuites")
    if not isinstance(counts, dict):
        raise _header_error(f"{RECORD_FORMAT_V3} needs ciphersuites, the accounts per suite")
    for name, n in counts.items():
        if name not in known:
            raise _header_error(f"ciphersuites names an unknown ciphersuite {name!r}")
        if not _is_int(n) or n < 0:
            raise _header_error("ciphersuites counts must be non-negative integers")
    if _is_int(header["accounts"]) and sum(counts.values()) != header["accounts"]:
        raise _header_error("ciphersuites counts must add up to accounts")


def header_suite_counts(header: Mapping[str, Any]) -> dict[str, int]:
    """Accounts per suite a (checked) header declares: ``ciphersuites`` of a ``binary-v3``
    header, else every account Ed25519."""
    counts = header.get("ciphersuites")
    if isinstance(counts, dict):
        return {str(k): int(v) for k, v in counts.items()}
    return {CIPHERSUITE: int(header["accounts"])}


def check_suite_counts(header: Mapping[str, Any], counts: Mapping[str, int]) -> None:
    """``count_mismatch`` unless the records' suites are what the header declares."""
    declared = {k: v for k, v in header_suite_counts(header).items() if v}
    found = {k: v for k, v in counts.items() if v}
    if declared != found:
        raise ShareFileError(
            f"bundle holds {_counts_text(found)}, but the header declares {_counts_text(declared)}",
            reason="count_mismatch",
        )


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "no accounts"


def record_format_for(records_suites: Iterable[str], policies: bool) -> str:
    """The layout a bundle of these accounts is written in: ``binary-v3`` if any suite is not
    Ed25519, else ``binary-v2`` if any account names a policy, else ``binary-v1``."""
    if any(name != CIPHERSUITE for name in records_suites):
        return RECORD_FORMAT_V3
    return RECORD_FORMAT_V2 if policies else RECORD_FORMAT_V1


def check_header_fits(header: Mapping[str, Any], *, prefix_bytes: int, total_bytes: int) -> None:
    """Refuse a header whose counts cannot fit in a bundle of ``total_bytes`` bytes.

    A bundle of N bytes holds at most ``(N - prefix - stream header - chunks * 21) / 134``
    records (every record is at least 134 bytes, every chunk frame at least 21), so a forged
    count is refused before anything is decrypted or sized from it.

    Error handling:
        ``ShareFileError`` with reason ``truncated`` (the bytes are too few for what the header
        declares: a cut file, or a forged count), naming the claimed and the largest possible
        count.
    """
    room = total_bytes - prefix_bytes - _stream.HEADER_BYTES
    chunks, accounts = header["chunks"], header["accounts"]
    max_chunks = max(0, room) // MIN_FRAME_BYTES
    if chunks > max_chunks:
        raise ShareFileError(
            f"the header declares {chunks} chunks, but a {total_bytes}-byte bundle holds "
            f"{max_chunks} at most (truncated, or a forged header)",
            reason="truncated",
        )
    max_records = (room - chunks * MIN_FRAME_BYTES) // MIN_RECORD_BYTES
    if accounts > max_records:
        raise ShareFileError(
            f"the header declares {accounts} accounts, but a {total_bytes}-byte bundle holds "
            f"{max_records} at most (truncated, or a forged header)",
            reason="truncated",
        )


def input_size(fileobj: IO[bytes]) -> int | None:
    """Bytes left in ``fileobj`` from its position, or None if it cannot tell (a pipe)."""
    try:
        if not fileobj.seekable():
            return None
        pos = fileobj.tell()
        end = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(pos)
    except (OSError, ValueError):
        return None
    return max(0, end - pos)


def build_header(
    *,
    provider: DataKeyProvider,
    encrypted_data_key: bytes,
    encryption_context: Mapping[str, str],
    chunk_size: int,
    accounts: int,
    chunks: int,
    kind: str = KIND_BASE,
    record_format: str = RECORD_FORMAT_V1,
    ciphersuites: Mapping[str, int] | None = None,
    ciphersuite: str = CIPHERSUITE,
    delta: Mapping[str, Any] | None = None,
    compacts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A sealed header (validated); ``kind`` is ``base`` (a ceremony) or ``delta`` (§13).

    ``compacts`` (a base only) records the base and deltas a compacted base holds
    (:func:`check_compacts`, docs/compaction.md).

    ``delta`` holds a delta's ``sequence``, ``previous``, ``operation`` and ``dkg_id``
    (docs/key-lifecycle.md §1), written into the header (so the signature covers them).

    A ``binary-v3`` header also takes ``ciphersuites`` (accounts per suite) and
    ``ciphersuite`` (the bundle's default suite: the plaintext header's when sealed from a
    file); other layouts are Ed25519 only and carry neither.
    """
    header: dict[str, Any] = {
        "format": SEALED_FORMAT,
        "kind": kind,
        "version": SEALED_VERSION,
        "ciphersuite": ciphersuite if record_format == RECORD_FORMAT_V3 else CIPHERSUITE,
        "record_format": record_format,
        "key_provider": provider.provider,
        "kms_key_id": provider.key_id,
        "encrypted_data_key": base64.b64encode(encrypted_data_key).decode("ascii"),
        "encryption_context": dict(encryption_context),
        "chunk_size": chunk_size,
        "accounts": accounts,
        "chunks": chunks,
    }
    if delta is not None:
        unknown = sorted(set(delta) - set(DELTA_FIELDS))
        if unknown:
            raise ValueError(f"unknown delta header field {unknown[0]!r}")
        header.update(delta)
    if compacts is not None:
        header[COMPACTS_FIELD] = dict(compacts)
    if record_format == RECORD_FORMAT_V3:
        header["ciphersuites"] = {
            s.name: int((ciphersuites or {}).get(s.name, 0))
            for s in SCHEMES
            if (ciphersuites or {}).get(s.name)
        }
    return check_sealed_header(header)


def encryption_context_for(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The encryption context: ``extra`` plus ``format`` (which cannot be overridden)."""
    ctx = dict(extra or {})
    ctx["format"] = SEALED_FORMAT
    return ctx


def unwrap_data_key(header: Mapping[str, Any], provider: DataKeyProvider) -> bytearray:
    """Ask ``provider`` for the bundle's data key; the caller zeroes it.

    Error handling:
        ``KeyWrapError`` if the provider or key id differs from the header's, or unwrapping
        fails (wrong key, wrong context, tampered blob).
    """
    if header["key_provider"] != provider.provider:
        raise KeyWrapError(
            f"bundle was sealed with key provider {header['key_provider']}, "
            f"but {provider.provider} was given"
        )
    if not provider.names_key(header["kms_key_id"]):
        raise KeyWrapError(
            f"bundle was sealed under key {header['kms_key_id']}, "
            f"but the key file holds {provider.key_id}"
        )
    blob = base64.b64decode(header["encrypted_data_key"], validate=True)
    key = provider.decrypt_data_key(blob, header["encryption_context"])
    if len(key) != _stream.KEY_BYTES:
        _sodium.memzero(key)
        raise KeyWrapError(f"provider returned a {len(key)}-byte data key, expected 32")
    return key


# ---------------------------------------------------------------------------------------------
# Chunk planning (shared by pass 1 and the encoder, so both always agree)


class ChunkPlanner:
    """Greedy packing of whole records into chunks of at most ``chunk_size`` plaintext bytes."""

    __slots__ = ("_fill", "chunk_size", "completed", "records")

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.completed = 0
        self.records = 0
        self._fill = 0

    def add(self, size: int) -> bool:
        """Account for one record; True if the current chunk closed before it."""
        if size > self.chunk_size:
            raise ValueError(f"record of {size} bytes exceeds chunk_size {self.chunk_size}")
        closed = False
        if self._fill + size > self.chunk_size:
            self.completed += 1
            self._fill = 0
            closed = True
        self._fill += size
        self.records += 1
        return closed

    @property
    def chunks(self) -> int:
        """Total chunks if the input ended now (the open chunk, possibly empty, is the last)."""
        return self.completed + 1


# ---------------------------------------------------------------------------------------------
# Encoder (sans-io)


class SealedEncoder:
    """Produce the bytes of a sealed bundle. No I/O, no record validation.

    Usage: ``start()`` once, ``add_record()`` per record, ``finish()`` once; write each returned
    ``bytes`` in order. The header's ``accounts``/``chunks`` must match what is added (pass 1 of
    :func:`seal_file` computes them with :class:`ChunkPlanner`); ``finish()`` checks.

    The encoder validates nothing about records beyond what the layout needs: that is the
    reader's job, and tests use this to seal deliberately bad records.

    Args:
        header: a header from :func:`build_header`.
        data_key: the 32-byte data key; only read here (the caller zeroes it).
    """

    def __init__(self, header: Mapping[str, Any], data_key: _sodium.Buffer) -> None:
        self.header = check_sealed_header(dict(header))
        header_bytes = canonical_json(self.header)
        if len(header_bytes) > MAX_HEADER_BYTES:
            raise ShareFileError("sealed header is larger than 64 KiB", reason="bad_header")
        self.prefix = MAGIC + _U32.pack(len(header_bytes)) + header_bytes
        self._push = _stream.SecretStreamPush(data_key)
        self._planner = ChunkPlanner(self.header["chunk_size"])
        self._format = self.header["record_format"]
        self._chunk = bytearray(self.header["chunk_size"])
        self._fill = 0
        self._emitted = 0
        self._started = False
        self._finished = False

    def start(self) -> bytes:
        """The prefix and the secretstream header."""
        if self._started:
            raise InternalError("SealedEncoder.start() called twice")
        self._started = True
        return self.prefix + self._push.header

    def _emit(self, tag: int) -> bytes:
        ct = self._push.push(memoryview(self._chunk)[: self._fill], ad=self.prefix, tag=tag)
        _sodium.memzero(self._chunk)
        self._fill = 0
        self._emitted += 1
        return _U32.pack(len(ct)) + ct

    def add_record(self, rec: ShareRecord) -> bytes:
        """Pack ``rec``; returns a finished chunk frame if one closed, else ``b""``."""
        if not self._started or self._finished:
            raise InternalError("SealedEncoder.add_record() outside start()..finish()")
        out = b""
        if self._planner.add(rec.binary_size(self._format)):
            out = self._emit(_stream.TAG_MESSAGE)
        self._fill = rec.pack_into(self._chunk, self._fill, self._format)
        return out

    def finish(self) -> bytes:
        """The FINAL chunk frame. Zeroes the encoder's buffers."""
        if not self._started or self._finished:
            raise InternalError("SealedEncoder.finish() outside start()..finish()")
        try:
            out = self._emit(_stream.TAG_FINAL)
            self._finished = True
            if (
                self._planner.records != self.header["accounts"]
                or self._emitted != self.header["chunks"]
            ):
                raise ShareFileError(
                    f"sealed {self._planner.records} records in {self._emitted} chunks, but the "
                    f"header says {self.header['accounts']} in {self.header['chunks']} "
                    "(did the input change between passes?)",
                    reason="count_mismatch",
                )
            return out
        finally:
            self.close()

    def _reencrypt_chunk(self, plaintext: bytearray, *, final: bool) -> bytes:
        """Encrypt an already-packed chunk as-is (for :func:`reseal`)."""
        if len(plaintext) > self.header["chunk_size"]:
            raise ShareFileError("chunk larger than chunk_size", reason="chunk_too_large")
        tag = _stream.TAG_FINAL if final else _stream.TAG_MESSAGE
        ct = self._push.push(plaintext, ad=self.prefix, tag=tag)
        self._emitted += 1
        return _U32.pack(len(ct)) + ct

    def close(self) -> None:
        """Zero the chunk buffer and the stream state. Idempotent."""
        _sodium.memzero(self._chunk)
        self._push.close()


# ---------------------------------------------------------------------------------------------
# Decoder (sans-io)


@dataclass(frozen=True, slots=True)
class HeaderReceived:
    """The header was parsed and validated (not yet authenticated: chunk 0 does that)."""

    header: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChunkDecrypted:
    """Chunk ``index`` (0-based) authenticated and decrypted.

    The receiver owns ``plaintext`` (secret key shares) and must zero it when done.
    """

    index: int
    plaintext: bytearray = field(repr=False)


@dataclass(frozen=True, slots=True)
class EndOfBundle:
    """The bundle ended after its FINAL chunk (and its signature record, if any).

    ``sha256_hex`` is the fingerprint: the SHA-256 of the body (every byte up to the end of
    the FINAL chunk; the whole file of an unsigned bundle). ``signature`` is the record that
    followed, parsed but not verified (:class:`~trio_sign.shares.BundleTrust` does that).
    """

    accounts: int
    chunks: int
    sha256_hex: str
    signature: BundleSignature | None = None

    @property
    def digest(self) -> bytes:
        """The fingerprint as 32 bytes (what the signature signs)."""
        return bytes.fromhex(self.sha256_hex)


Event = HeaderReceived | ChunkDecrypted | EndOfBundle

_MAGIC, _HEADER, _STREAM_HEADER, _FRAMES, _DONE, _CLOSED = range(6)


class SealedDecoder:
    """Parse (and decrypt) a sealed bundle from bytes, h11-style.

    Feed bytes with :meth:`receive_data` and end of file with :meth:`receive_eof`; each returns
    the events that became available. After ``HeaderReceived`` (and in decrypting mode) call
    :meth:`set_data_key`, then ``receive_data(b"")`` to continue with what is buffered.

    Args:
        decrypt: False walks the framing only (no key needed): it checks the header, the frame
            sizes and count and computes the fingerprint, but yields no ``ChunkDecrypted``.
        total_bytes: the bundle's size, if known (a file): a header whose counts cannot fit
            in it is refused (``truncated``) as soon as it is parsed. Callers that allocate
            per account pass it; nothing in the decoder itself is sized from the counts.

    Error handling:
        Raises ``ShareFileError`` (reason ``bad_magic``, ``bad_header``, ``truncated``,
        ``tampered``, ``trailing_data``, ``bad_signature_record``, ``count_mismatch``,
        ``chunk_too_large``). After an error
        the decoder is closed and re-raises the same error. A call that raises returns no
        events: every chunk it had decrypted before the error is zeroed first.
    """

    def __init__(self, *, decrypt: bool = True, total_bytes: int | None = None) -> None:
        if total_bytes is not None and total_bytes < 0:
            raise ValueError("total_bytes must be >= 0")
        self._decrypt = decrypt
        self._total_bytes = total_bytes
        self._buf = bytearray()
        self._state = _MAGIC
        self._sha = hashlib.sha256()
        self._prefix = b""
        self.header: dict[str, Any] | None = None
        self._key: bytearray | None = None
        self._pull: _stream.SecretStreamPull | None = None
        self._index = 0
        self._error: ShareFileError | None = None

    # -- commands --------------------------------------------------------------------------

    def set_data_key(self, key: _sodium.Buffer) -> None:
        """Supply the 32-byte data key (copied; the caller zeroes its own)."""
        if self.header is None or self._state != _STREAM_HEADER or self._key is not None:
            raise InternalError("set_data_key() is only valid once, right after HeaderReceived")
        if len(key) != _stream.KEY_BYTES:
            raise KeyWrapError(f"data key must be 32 bytes, got {len(key)}")
        self._key = bytearray(key)

    def receive_data(self, data: _sodium.Buffer) -> list[Event]:
        """Feed more bytes; ``b""`` just resumes processing of buffered bytes."""
        self._check_usable()
        if data:
            if self._state == _DONE:
                head = (bytes(self._buf) + bytes(data[: len(SIGNATURE_MAGIC)]))[:8]
                error = _after_final_error(head, len(self._buf) + len(data))
                if error is not None:
                    self._fail(error)
            self._buf += data
        return self._run(self._process)

    def receive_eof(self) -> list[Event]:
        """Signal end of file; returns ``[EndOfBundle]`` if the bundle was complete."""
        self._check_usable()
        return self._run(self._eof)

    def close(self) -> None:
        """Zero the key copy and the stream state. Idempotent."""
        if self._key is not None:
            _sodium.memzero(self._key)
            self._key = None
        if self._pull is not None:
            self._pull.close()
            self._pull = None
        self._state = _CLOSED

    # -- internals -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state == _CLOSED:
            raise ShareFileError("sealed decoder is closed", reason="closed")

    def _fail(self, exc: ShareFileError) -> None:
        self._error = exc
        self.close()
        raise exc

    def _run(self, step: Any) -> list[Event]:
        events: list[Event] = []
        try:
            step(events)
        except BaseException as exc:
            # The events never reach the caller: zero the chunks decrypted in this call.
            zero_events(events)
            if isinstance(exc, ShareFileError):
                if self._error is None:
                    self._error = exc
                    self.close()
            else:
                self.close()
            raise
        return events

    def _process(self, events: list[Event]) -> None:
        pos = 0
        buf = self._buf
        try:
            while True:
                avail = len(buf) - pos
                if self._state == _MAGIC:
                    n = min(avail, len(MAGIC))
                    if bytes(buf[pos : pos + n]) != MAGIC[:n]:
                        raise ShareFileError(
                            "not a sealed key-share bundle (bad magic)", reason="bad_magic"
                        )
                    if avail < _PREFIX_FIXED:
                        return
                    (hlen,) = _U32.unpack_from(buf, pos + len(MAGIC))
                    if hlen == 0 or hlen > MAX_HEADER_BYTES:
                        raise _header_error(f"length {hlen} is outside 1..{MAX_HEADER_BYTES}")
                    self._hlen = hlen
                    self._state = _HEADER
                elif self._state == _HEADER:
                    end = _PREFIX_FIXED + self._hlen
                    if avail < end:
                        return
                    self._prefix = bytes(buf[pos : pos + end])
                    pos += end
                    self.header = self._parse_header(self._prefix[_PREFIX_FIXED:])
                    if self._total_bytes is not None:
                        check_header_fits(
                            self.header, prefix_bytes=end, total_bytes=self._total_bytes
                        )
                    self._state = _STREAM_HEADER
                    events.append(HeaderReceived(dict(self.header)))
                elif self._state == _STREAM_HEADER:
                    if avail < _stream.HEADER_BYTES or (self._decrypt and self._key is None):
                        return
                    if self._decrypt:
                        assert self._key is not None
                        try:
                            self._pull = _stream.SecretStreamPull(
                                bytes(buf[pos : pos + _stream.HEADER_BYTES]), self._key
                            )
                        finally:
                            _sodium.memzero(self._key)
                            self._key = None
                    pos += _stream.HEADER_BYTES
                    self._state = _FRAMES
                elif self._state == _FRAMES:
                    if avail < 4:
                        return
                    (clen,) = _U32.unpack_from(buf, pos)
                    self._check_frame_len(clen)
                    if avail < 4 + clen:
                        return
                    final = self._frame(buf, pos + 4, clen, events)
                    pos += 4 + clen
                    self._index += 1
                    if final:
                        self._state = _DONE
                        if self._pull is not None:
                            self._pull.close()
                            self._pull = None
                elif self._state == _DONE:
                    # The signature record waits in the buffer (unhashed) for end of file.
                    error = _after_final_error(bytes(buf[pos : pos + 8]), avail)
                    if error is not None:
                        raise error
                    return
                else:  # pragma: no cover
                    raise InternalError(f"SealedDecoder in unexpected state {self._state}")
        finally:
            if pos:
                # The fingerprint covers exactly the body bytes consumed here.
                with memoryview(buf) as mv, mv[:pos] as body:
                    self._sha.update(body)
                del buf[:pos]

    def _parse_header(self, raw: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _header_error("not valid UTF-8 JSON") from None
        header = check_sealed_header(obj)
        if canonical_json(header) != raw:
            raise _header_error("not in canonical form (sorted keys, compact separators)")
        return header

    def _check_frame_len(self, clen: int) -> None:
        assert self.header is not None
        limit = self.header["chunk_size"] + _stream.ABYTES
        if clen > limit:
            raise ShareFileError(
                f"chunk {self._index} is {clen} bytes; chunk_size allows at most {limit}",
                reason="chunk_too_large",
            )
        if clen < _stream.ABYTES:
            raise ShareFileError(
                f"chunk {self._index} is shorter than its authentication tag", reason="tampered"
            )

    def _frame(self, buf: bytearray, start: int, clen: int, events: list[Event]) -> bool:
        assert self.header is not None
        expected: int = self.header["chunks"]
        index = self._index
        if index >= expected:  # only reachable when not decrypting (no FINAL tag to see)
            raise ShareFileError(
                f"more than the {expected} chunks the header declares", reason="trailing_data"
            )
        if not self._decrypt:
            return index == expected - 1
        assert self._pull is not None
        out = bytearray(clen - _stream.ABYTES)
        try:
            with memoryview(buf) as mv, mv[start : start + clen] as ct:
                tag = self._pull.pull_into(out, ct, ad=self._prefix)
        except BaseException:
            _sodium.memzero(out)
            raise
        if tag is None:
            if index == 0:
                msg = "chunk 0 failed authentication: wrong data key or tampered header"
            else:
                msg = f"chunk {index} failed authentication (tampered, reordered or replaced)"
            raise ShareFileError(msg, reason="tampered")
        if tag == _stream.TAG_FINAL:
            if index != expected - 1:
                _sodium.memzero(out)
                raise ShareFileError(
                    f"chunk {index} is FINAL, but the header declares {expected} chunks",
                    reason="count_mismatch",
                )
        elif tag == _stream.TAG_MESSAGE:
            if index == expected - 1:
                _sodium.memzero(out)
                raise ShareFileError(
                    f"chunk {index} should be FINAL (the header declares {expected} chunks)",
                    reason="count_mismatch",
                )
        else:
            _sodium.memzero(out)
            raise ShareFileError(f"chunk {index} has an unexpected tag", reason="tampered")
        events.append(ChunkDecrypted(index, out))
        return tag == _stream.TAG_FINAL

    def _eof(self, events: list[Event]) -> None:
        buffered = len(self._buf)
        if self._state == _DONE:
            assert self.header is not None
            signature = None
            if buffered:
                if buffered != SIGNATURE_RECORD_BYTES:
                    raise ShareFileError(
                        f"the signature record after the FINAL chunk is cut short ({buffered} "
                        f"of {SIGNATURE_RECORD_BYTES} bytes)",
                        reason="bad_signature_record",
                    )
                signature = BundleSignature.decode(self._buf)
                self._buf.clear()
            events.append(
                EndOfBundle(
                    self.header["accounts"],
                    self.header["chunks"],
                    self._sha.hexdigest(),
                    signature,
                )
            )
            self.close()
            return
        if self._state == _MAGIC:
            msg = f"file ends after {buffered} bytes, inside the fixed prefix"
        elif self._state == _HEADER:
            msg = "file ends inside the header"
        elif self._state == _STREAM_HEADER:
            if self._decrypt and self._key is None and buffered >= _stream.HEADER_BYTES:
                raise InternalError("receive_eof() before set_data_key()")
            msg = "file ends inside the stream header"
        else:
            assert self.header is not None
            where = f"inside chunk {self._index}" if buffered else "before the FINAL chunk"
            msg = f"file ends {where}, after {self._index} of {self.header['chunks']} chunks"
        raise ShareFileError(msg, reason="truncated")


def _after_final_error(head: bytes, total: int) -> ShareFileError | None:
    """Only one signature record may follow the FINAL chunk: anything else is refused as soon
    as it is seen (``head`` is its first bytes, ``total`` its length so far), so a parent that
    streams garbage there is not buffered."""
    if total > SIGNATURE_RECORD_BYTES:
        return ShareFileError(
            f"{total} bytes follow the FINAL chunk (a signature record is "
            f"{SIGNATURE_RECORD_BYTES})",
            reason="trailing_data",
        )
    if head != SIGNATURE_MAGIC[: len(head)]:
        return ShareFileError(
            "bytes follow the FINAL chunk that are not a signature record",
            reason="trailing_data",
        )
    return None


def zero_events(events: Iterable[Event]) -> None:
    """Zero the plaintext of every ``ChunkDecrypted`` in ``events`` (ones nobody will use)."""
    for ev in events:
        if isinstance(ev, ChunkDecrypted):
            _sodium.memzero(ev.plaintext)


# ---------------------------------------------------------------------------------------------
# Records inside chunks


def iter_chunk_records(
    plaintext: bytearray, *, first_record: int, record_format: str = RECORD_FORMAT_V1
) -> Iterator[ShareRecord]:
    """Decode the ``binary-v1``, ``-v2`` or ``-v3`` records of one chunk (structure only, no
    validation beyond a known suite code).

    Each yielded record's ``signing_share`` is a fresh ``bytearray`` the caller zeroes.
    ``first_record`` is the 1-based number of the chunk's first record, for errors. Every
    length is checked against the chunk before it is used.
    """
    mv = memoryview(plaintext)
    pos, end, number = 0, len(plaintext), first_record
    v2 = record_format != RECORD_FORMAT_V1
    v3 = record_format == RECORD_FORMAT_V3
    try:
        while pos < end:
            alen = plaintext[pos]
            p = pos + 1 + alen
            policy_at = plen = 0
            scheme: Scheme = ED25519
            fits = True
            if v2:
                fits = p < end and p + 1 + plaintext[p] + (1 if v3 else 0) <= end
                if fits:
                    plen = plaintext[p]
                    policy_at = p + 1
                    p += 1 + plen
                    if v3:
                        if alen:
                            scheme = scheme_coded(plaintext[p], record=number)
                        p += 1
            n = scheme.element_size
            stop = p + 68 + 2 * n
            if alen == 0 or not fits or stop > end:
                raise record_error(
                    "record does not fit in its chunk" if alen else "account_id is empty",
                    reason="bad_record" if alen else "bad_account_id",
                    record=number,
                )
            # The whole record is inside the chunk: only now is anything copied out of it.
            policy = "default"
            if plen:
                policy = bytes(mv[policy_at : policy_at + plen]).decode("ascii", "replace")
            try:
                account_id = bytes(mv[pos + 1 : pos + 1 + alen]).decode("utf-8")
            except UnicodeDecodeError:
                raise record_error(
                    "account_id is not valid UTF-8", reason="bad_account_id", record=number
                ) from None
            mn, mx = struct.unpack_from(">HH", plaintext, p + 64 + 2 * n)
            yield ShareRecord(
                account_id=account_id,
                identifier=bytes(mv[p : p + 32]),
                signing_share=bytearray(mv[p + 32 : p + 64]),
                verifying_share=bytes(mv[p + 64 : p + 64 + n]),
                group_public_key=bytes(mv[p + 64 + n : p + 64 + 2 * n]),
                min_signers=mn,
                max_signers=mx,
                policy=policy,
                ciphersuite=scheme.name,
            )
            pos = stop
            number += 1
    finally:
        mv.release()


def check_record_count(
    header: Mapping[str, Any], records: int, suites: Mapping[str, int] | None = None
) -> None:
    """``count_mismatch`` unless ``records`` equals the header's ``accounts`` (and, if given,
    the records' ``suites`` are the header's per-suite counts)."""
    if records != header["accounts"]:
        raise ShareFileError(
            f"bundle holds {records} records, but the header declares {header['accounts']}",
            reason="count_mismatch",
        )
    if suites is not None:
        check_suite_counts(header, suites)


def read_sealed(
    fileobj: IO[bytes], provider: DataKeyProvider, *, verify_points: bool = True
) -> Generator[ShareRecord, None, None]:
    """Stream, decrypt and validate every record of a sealed bundle.

    Yields fresh :class:`ShareRecord` objects the caller zeroes (a caller that stops early
    should ``close()`` the generator: that zeroes the chunks decrypted but not read). The
    records are fully validated (as in the plaintext reader, with ``record N`` positions;
    duplicates included) unless ``verify_points`` is False, which skips the two point checks
    and ``s·G``.
    ``ShareStore.load_sealed`` is the fast path for loading a service.

    Nothing here is sized from the header's count (records are yielded one at a time), so the
    file's size is not checked against it up front: a record-level defect is reported as such.
    """
    decoder = SealedDecoder()
    feed = _feed_with_key(fileobj, decoder, provider)
    seen: dict[str, int] = {}
    suites: dict[str, int] = {}
    number = 1
    try:
        for ev in feed:
            if isinstance(ev, ChunkDecrypted):
                try:
                    assert decoder.header is not None
                    for rec in iter_chunk_records(
                        ev.plaintext,
                        first_record=number,
                        record_format=decoder.header["record_format"],
                    ):
                        try:
                            _check_binary_record(rec, number, seen, verify_points)
                        except BaseException:
                            rec.zero()
                            raise
                        number += 1
                        suites[rec.ciphersuite] = suites.get(rec.ciphersuite, 0) + 1
                        yield rec
                finally:
                    _sodium.memzero(ev.plaintext)
            elif isinstance(ev, EndOfBundle):
                assert decoder.header is not None
                check_record_count(decoder.header, number - 1, suites)
    finally:
        feed.close()
        decoder.close()


def _check_binary_record(
    rec: ShareRecord, number: int, seen: dict[str, int], verify_points: bool
) -> None:
    check_account_id(rec.account_id, record=number)
    check_policy(rec.policy, record=number)
    scheme = scheme_by_name(rec.ciphersuite)  # iter_chunk_records decoded a known code
    check_scalars(rec.identifier, rec.signing_share, record=number, scheme=scheme)
    check_threshold(rec.min_signers, rec.max_signers, record=number)
    if verify_points:
        check_points(
            rec.signing_share,
            rec.verifying_share,
            rec.group_public_key,
            record=number,
            scheme=scheme,
        )
    first = seen.setdefault(rec.account_id, number)
    if first != number:
        raise record_error(
            f"duplicate account_id (first seen at record {first})",
            reason="duplicate_account",
            record=number,
        )


def _feed_with_key(
    fileobj: IO[bytes], decoder: SealedDecoder, provider: DataKeyProvider
) -> Generator[Event, None, None]:
    """Feed ``fileobj`` to ``decoder``, answering ``HeaderReceived`` with the provider's key.

    The consumer owns (and zeroes) each ``ChunkDecrypted`` it is given; the ones a read
    decrypted but that were not yet given out are zeroed here when the consumer stops early
    (an error, or :meth:`close` on this generator: consumers close it in ``finally``).
    """
    pending: deque[Event] = deque()
    try:
        while True:
            data = fileobj.read(READ_SIZE)
            pending.extend(decoder.receive_data(data) if data else decoder.receive_eof())
            while pending:
                ev = pending.popleft()
                yield ev
                if isinstance(ev, HeaderReceived):
                    # Events after HeaderReceived cannot exist yet (we waited for the key).
                    assert not pending
                    key = unwrap_data_key(ev.header, provider)
                    try:
                        decoder.set_data_key(key)
                    finally:
                        _sodium.memzero(key)
                    pending.extend(decoder.receive_data(b""))
            if not data:
                return
    except BaseException:
        zero_events(pending)
        raise


# ---------------------------------------------------------------------------------------------
# File helpers


@dataclass(frozen=True, slots=True)
class SealResult:
    """What :func:`seal_file` / :func:`reseal` wrote (``signer``: the signing key's public key,
    None for an unsigned bundle)."""

    path: str
    accounts: int
    chunks: int
    sha256_hex: str
    signer: bytes | None = None

    @property
    def sha256(self) -> str:
        """Alias of ``sha256_hex`` (the CLI's name for the fingerprint)."""
        return self.sha256_hex


def read_sealed_header(fileobj: IO[bytes]) -> tuple[dict[str, Any], str]:
    """Walk a sealed bundle's framing without a key (for ``shares inspect``).

    Returns:
        ``(header, sha256_hex)``; the header's frame count and sizes were checked (and its
        counts against the file's size, when it has one), nothing was decrypted or
        authenticated. ``sha256_hex`` is the fingerprint (the body, without the signature).
    """
    header, end = inspect_sealed(fileobj)
    return header, end.sha256_hex


def inspect_sealed(fileobj: IO[bytes]) -> tuple[dict[str, Any], EndOfBundle]:
    """Like :func:`read_sealed_header`, with the whole :class:`EndOfBundle`: the fingerprint
    and the signature record (parsed, not verified; check it with ``BundleTrust`` or
    ``BundleSignature.verifies(end.digest)``)."""
    decoder = SealedDecoder(decrypt=False, total_bytes=input_size(fileobj))
    header: dict[str, Any] | None = None
    while True:
        data = fileobj.read(READ_SIZE)
        events = decoder.receive_data(data) if data else decoder.receive_eof()
        for ev in events:
            if isinstance(ev, HeaderReceived):
                header = ev.header
            elif isinstance(ev, EndOfBundle):
                assert header is not None
                return header, ev


def _check_output(dst: str, overwrite: bool) -> None:
    if not overwrite and os.path.exists(dst):
        raise ShareFileError(
            f"{dst} exists; pass overwrite=True (--force) to replace it", reason="output_exists"
        )


@contextlib.contextmanager
def _atomic_output(dst: str, overwrite: bool) -> Iterator[IO[bytes]]:
    """Write ``dst`` atomically (mode 0600): a temporary name in its directory, fsync, rename,
    fsync the directory (:func:`trio_sign._atomic.atomic_file`)."""
    _check_output(dst, overwrite)
    try:
        with atomic_file(Path(dst), overwrite=overwrite) as out:
            yield out
    except FileExistsError:
        _check_output(dst, overwrite)
        raise


class _HashingWriter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if data:
            self.sha.update(data)
            self.out.write(data)

    def sign(self, signer: BundleSigner | None) -> bytes | None:
        """After the FINAL chunk: append the signature record over the body written so far
        (not hashed: it is not part of the fingerprint). Returns the signer's public key."""
        if signer is None:
            return None
        record = sign_bundle_digest(signer, self.sha.digest())
        self.out.write(record.encode())
        return record.public_key


def seal_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    provider: DataKeyProvider,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    encryption_context: Mapping[str, str] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    signer: BundleSigner | None = None,
) -> SealResult:
    """Seal a plaintext key-share file into a ``base`` bundle, signed by ``signer`` if given.

    Two streaming passes: pass 1 validates every record fully and counts records and chunks,
    so nothing is written for a bad file; pass 2 encrypts, repeating the cheap checks but not
    the point checks, and proves it read the same bytes (SHA-256 of the input in both passes,
    compared before the output is renamed into place; otherwise ``input_changed``). Never holds
    more than one chunk of plaintext. Writes ``dst`` atomically (a hidden temporary name in
    its directory, fsync, rename, directory fsync; see :mod:`trio_sign._atomic`).

    ``progress(done, total)`` is called every 1024 records and at the end of each pass: with
    ``total == 0`` (unknown) during pass 1, then with the real total during pass 2.

    ``signer`` signs the bundle's fingerprint (a ceremony key file or KMS ``Sign``); the
    signature is checked against the signer's public key before the file is renamed into
    place. Without one the bundle is unsigned, which only a development enclave loads.

    Error handling:
        ``ShareFileError`` for any defect in the input (with its line), ``output_exists`` if
        ``dst`` exists and not ``overwrite``; ``KeyWrapError`` from the provider;
        ``SigningError`` (or the signer's own error) if signing fails: nothing is written.
    """
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    _check_output(dst_s, overwrite)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    # One planner per layout the file may need; the accounts decide which one is used.
    # A record too large for a chunk matters only in the layout actually used.
    planners = {fmt: ChunkPlanner(chunk_size) for fmt in RECORD_FORMATS}
    too_large: dict[str, ValueError] = {}
    suites: dict[str, int] = {}
    policies = False
    with open(src_s, "rb") as f:
        records, pass1 = read_plaintext_hashed(f, points=True)
        for rec in records:
            for fmt, plan in planners.items():
                if fmt in too_large or (fmt != RECORD_FORMAT_V3 and rec.ciphersuite != CIPHERSUITE):
                    continue
                try:
                    plan.add(rec.binary_size(fmt))
                except ValueError as exc:
                    too_large[fmt] = exc
            policies = policies or rec.policy != "default"
            suites[rec.ciphersuite] = suites.get(rec.ciphersuite, 0) + 1
            rec.zero()
            if progress is not None and planners[RECORD_FORMAT_V3].records & 1023 == 0:
                progress(planners[RECORD_FORMAT_V3].records, 0)
    record_format = record_format_for(suites, policies)
    if record_format in too_large:
        raise too_large[record_format]
    planner = planners[record_format]
    total = planner.records
    if progress is not None:
        progress(total, 0)
    encoder = _new_encoder(
        provider,
        planner,
        chunk_size,
        encryption_context,
        record_format=record_format,
        ciphersuites=suites,
        ciphersuite=pass1.header_suite,
    )
    try:
        with _atomic_output(dst_s, overwrite) as out, open(src_s, "rb") as f:
            w = _HashingWriter(out)
            w.write(encoder.start())
            records, pass2 = read_plaintext_hashed(f, points=False)
            for n, rec in enumerate(records, 1):
                try:
                    w.write(encoder.add_record(rec))
                finally:
                    rec.zero()
                if progress is not None and n & 1023 == 0:
                    progress(min(n, total), total)
            if pass2.sha.digest() != pass1.sha.digest():
                raise ShareFileError(
                    f"{src_s} changed while it was being sealed; nothing was written",
                    reason="input_changed",
                )
            w.write(encoder.finish())
            signed_by = w.sign(signer)
    finally:
        encoder.close()
    if progress is not None:
        progress(total, total)
    return SealResult(dst_s, planner.records, planner.chunks, w.sha.hexdigest(), signed_by)


def _new_encoder(
    provider: DataKeyProvider,
    planner: ChunkPlanner,
    chunk_size: int,
    encryption_context: Mapping[str, str] | None,
    kind: str = KIND_BASE,
    *,
    record_format: str = RECORD_FORMAT_V1,
    ciphersuites: Mapping[str, int] | None = None,
    ciphersuite: str = CIPHERSUITE,
    delta: Mapping[str, Any] | None = None,
    compacts: Mapping[str, Any] | None = None,
) -> SealedEncoder:
    """A fresh data key from ``provider``, the header for what ``planner`` counted, and the
    encoder (which keeps its own copy of the key: ours is zeroed here)."""
    ctx = encryption_context_for(encryption_context)
    data_key, blob = provider.generate_data_key(ctx)
    try:
        header = build_header(
            provider=provider,
            encrypted_data_key=blob,
            encryption_context=ctx,
            chunk_size=chunk_size,
            accounts=planner.records,
            chunks=planner.chunks,
            kind=kind,
            record_format=record_format,
            ciphersuites=ciphersuites,
            ciphersuite=ciphersuite,
            delta=delta,
            compacts=compacts,
        )
        return SealedEncoder(header, data_key)
    finally:
        _sodium.memzero(data_key)


def encode_bundle(
    records: Iterable[ShareRecord],
    provider: DataKeyProvider,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    encryption_context: Mapping[str, str] | None = None,
    signer: BundleSigner | None = None,
    kind: str = KIND_BASE,
    delta: Mapping[str, Any] | None = None,
    compacts: Mapping[str, Any] | None = None,
) -> bytes:
    """Seal ``records`` into bytes in memory, WITHOUT validating them (tests and tools),
    signed by ``signer`` if given. ``delta``: a delta header's fields (:func:`build_header`;
    :func:`trio_sign.shares._deltas.seal_delta` is the enclave's checked way); ``compacts``: a
    compacted base's (the enclave's way is :mod:`trio_sign.enclave._compact`).

    Holds everything in memory; use :func:`seal_file` for real files.
    """
    recs = list(records)
    planner = ChunkPlanner(chunk_size)
    suites: dict[str, int] = {}
    for rec in recs:
        suites[rec.ciphersuite] = suites.get(rec.ciphersuite, 0) + 1
    record_format = record_format_for(suites, any(rec.policy != "default" for rec in recs))
    for rec in recs:
        planner.add(rec.binary_size(record_format))
    encoder = _new_encoder(
        provider,
        planner,
        chunk_size,
        encryption_context,
        kind,
        record_format=record_format,
        ciphersuites=suites,
        ciphersuite=recs[0].ciphersuite if recs else CIPHERSUITE,
        delta=delta,
        compacts=compacts,
    )
    try:
        parts = [encoder.start()]
        parts.extend(encoder.add_record(rec) for rec in recs)
        parts.append(encoder.finish())
    finally:
        encoder.close()
    body = b"".join(parts)
    if signer is None:
        return body
    return sign_bundle(body, signer)


def sign_bundle(bundle: bytes, signer: BundleSigner) -> bytes:
    """``bundle`` (signed or not) with its signature record replaced by one from ``signer``.

    The fingerprint does not change: it covers the body, not the record. In memory; the
    framing is walked (no key needed) to find where the body ends.
    """
    _, end = inspect_sealed(io.BytesIO(bundle))
    body = bundle[: len(bundle) - (0 if end.signature is None else SIGNATURE_RECORD_BYTES)]
    return body + sign_bundle_digest(signer, end.digest).encode()


def sign_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    signer: BundleSigner,
    *,
    overwrite: bool = False,
) -> SealResult:
    """Write ``src`` (signed or not) to ``dst`` with a signature record from ``signer``.

    The body is copied unchanged, so the fingerprint is the same: gateways' pins and
    attestation bindings do not move. Nothing is decrypted (no data key is needed); the
    framing is walked once to find the body's end and its digest, and the copy is hashed
    again to prove it is the body that was signed (``input_changed`` otherwise).

    Error handling:
        ``ShareFileError`` for a malformed bundle or ``output_exists``; what the signer raises.
    """
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    _check_output(dst_s, overwrite)
    with open(src_s, "rb") as f:
        header, end = inspect_sealed(f)
        body_bytes = f.seek(0, os.SEEK_END) - (
            0 if end.signature is None else SIGNATURE_RECORD_BYTES
        )
    with _atomic_output(dst_s, overwrite) as out, open(src_s, "rb") as f:
        w = _HashingWriter(out)
        left = body_bytes
        while left > 0:
            data = f.read(min(READ_SIZE, left))
            if not data:
                break
            w.write(data)
            left -= len(data)
        if w.sha.hexdigest() != end.sha256_hex:
            raise ShareFileError(
                f"{src_s} changed while it was being signed; nothing was written",
                reason="input_changed",
            )
        signed_by = w.sign(signer)
    return SealResult(dst_s, header["accounts"], header["chunks"], end.sha256_hex, signed_by)


def reseal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    old_provider: DataKeyProvider,
    new_provider: DataKeyProvider,
    *,
    overwrite: bool = False,
    signer: BundleSigner | None = None,
) -> SealResult:
    """Re-encrypt a sealed bundle under a new data key wrapped by ``new_provider``.

    Chunks are decrypted and re-encrypted one at a time with the same boundaries (so the
    counts carry over); records are checked structurally (layout and count) but not
    re-validated, since the source is authenticated and was validated when sealed.

    The result is a new body (a new data key, new ciphertext), so it has a new fingerprint and
    the source's signature cannot carry over: it is signed afresh by ``signer``, or unsigned
    without one. The source's ``kind`` is kept. The source's signature is not checked here
    (the enclave checks what it loads); ``shares inspect`` shows it.
    """
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    _check_output(dst_s, overwrite)
    decoder = SealedDecoder(total_bytes=os.path.getsize(src_s))
    encoder: SealedEncoder | None = None
    feed: Generator[Event, None, None] | None = None
    records = 0
    suites: dict[str, int] = {}
    try:
        with open(src_s, "rb") as f, _atomic_output(dst_s, overwrite) as out:
            w = _HashingWriter(out)
            feed = _feed_with_key(f, decoder, old_provider)
            for ev in feed:
                if isinstance(ev, HeaderReceived):
                    ctx = dict(ev.header["encryption_context"])
                    data_key, blob = new_provider.generate_data_key(ctx)
                    try:
                        header = dict(ev.header)
                        header.update(
                            key_provider=new_provider.provider,
                            kms_key_id=new_provider.key_id,
                            encrypted_data_key=base64.b64encode(blob).decode("ascii"),
                        )
                        encoder = SealedEncoder(header, data_key)
                    finally:
                        _sodium.memzero(data_key)
                    w.write(encoder.start())
                elif isinstance(ev, ChunkDecrypted):
                    assert encoder is not None
                    try:
                        for rec in iter_chunk_records(
                            ev.plaintext,
                            first_record=records + 1,
                            record_format=encoder.header["record_format"],
                        ):
                            rec.zero()
                            records += 1
                            suites[rec.ciphersuite] = suites.get(rec.ciphersuite, 0) + 1
                        final = ev.index == encoder.header["chunks"] - 1
                        w.write(encoder._reencrypt_chunk(ev.plaintext, final=final))
                    finally:
                        _sodium.memzero(ev.plaintext)
                elif isinstance(ev, EndOfBundle):
                    assert decoder.header is not None
                    check_record_count(decoder.header, records, suites)
                    signed_by = w.sign(signer)
    finally:
        if feed is not None:
            feed.close()
        decoder.close()
        if encoder is not None:
            encoder.close()
    assert encoder is not None
    return SealResult(dst_s, records, encoder.header["chunks"], w.sha.hexdigest(), signed_by)
