"""The plaintext key-share file: JSON Lines, DESIGN §6.

A header line ``{"format": "trio-sign/key-shares", "version": 1, "ciphersuite":
"FROST-ED25519-SHA512-v1"}`` then one object per account. Readers stream (one bounded line at a
time) and validate every record fully, including the point checks and ``signing_share·G ==
verifying_share``.

Plaintext files are for key ceremonies, imports and development: JSON parsing makes immutable
``str`` copies of the signing-share hex that CPython cannot zero. Production loads sealed
bundles (:mod:`trio_sign.shares._sealed`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any, Final, Protocol

from .._errors import ShareFileError
from ._records import (
    CIPHERSUITE,
    PLAINTEXT_FORMAT,
    PLAINTEXT_VERSION,
    ShareRecord,
    check_plaintext_header,
    record_from_json,
    record_to_json_text,
)

#: Longest accepted line, newline included. A record with a 255-byte account id escaped as
#: JSON ``\uXXXX`` sequences is still well under this.
MAX_LINE_BYTES: Final = 4096


class _LineSource(Protocol):
    def readline(self, limit: int = -1, /) -> bytes: ...


HEADER_LINE: Final = json.dumps(
    {"format": PLAINTEXT_FORMAT, "version": PLAINTEXT_VERSION, "ciphersuite": CIPHERSUITE}
)


def _lines(fileobj: _LineSource, max_line: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` without ever reading more than ``max_line + 1`` bytes."""
    lineno = 0
    while True:
        line = fileobj.readline(max_line + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_line:
            raise ShareFileError(
                f"line is longer than {max_line} bytes", reason="line_too_long", line=lineno
            )
        yield lineno, line


def _parse(line: bytes, lineno: int) -> Any:
    try:
        return json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # JSONDecodeError messages carry a position, never the document's text.
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid UTF-8"
        raise ShareFileError(f"not valid JSON ({detail})", reason="bad_json", line=lineno) from None


def read_plaintext(
    fileobj: IO[bytes], *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[ShareRecord]:
    """Stream and validate a plaintext key-share file.

    Args:
        fileobj: a binary file object, read line by line (never whole).
        max_line_bytes: the longest accepted line.

    Yields:
        One fully validated :class:`ShareRecord` per account. The caller owns each record and
        should call :meth:`ShareRecord.zero` when done with it.

    Error handling:
        Raises ``ShareFileError`` with the 1-based line number and a stable ``reason`` on the
        first defect; see :mod:`trio_sign.shares._records` for the codes. Blank lines are
        skipped. A file with no header line (or no lines) is ``bad_header``.
    """
    return _read(fileobj, max_line_bytes=max_line_bytes, points=True)


def _read(fileobj: _LineSource, *, max_line_bytes: int, points: bool) -> Iterator[ShareRecord]:
    first_seen: dict[str, int] = {}
    header_seen = False
    for lineno, line in _lines(fileobj, max_line_bytes):
        if not line.strip():
            continue
        obj = _parse(line, lineno)
        if not header_seen:
            check_plaintext_header(obj, line=lineno)
            header_seen = True
            continue
        rec = record_from_json(obj, line=lineno, points=points)
        first = first_seen.get(rec.account_id)
        if first is not None:
            rec.zero()
            raise ShareFileError(
                f"duplicate account_id {_short(rec.account_id)} (first seen on line {first})",
                reason="duplicate_account",
                line=lineno,
            )
        first_seen[rec.account_id] = lineno
        yield rec
    if not header_seen:
        raise ShareFileError("empty file: missing header line", reason="bad_header", line=1)


def write_plaintext(fileobj: IO[bytes], records: Iterable[ShareRecord]) -> int:
    """Write the header and one line per record; returns the number of records written.

    Records are written as given (not validated): use it for tools and tests. Each line is a
    fresh ``str``/``bytes`` holding the signing-share hex, which CPython cannot zero.
    """
    fileobj.write(HEADER_LINE.encode("utf-8") + b"\n")
    n = 0
    for rec in records:
        fileobj.write(record_to_json_text(rec).encode("utf-8") + b"\n")
        n += 1
    return n


def _short(account_id: str) -> str:
    return repr(account_id if len(account_id) <= 64 else account_id[:61] + "...")


class HashingReader:
    """Wraps a binary file object; SHA-256 of every byte read through ``readline``."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._f = fileobj
        self.sha = hashlib.sha256()

    def readline(self, limit: int = -1, /) -> bytes:
        data = self._f.readline(limit)
        self.sha.update(data)
        return data


def read_plaintext_hashed(
    fileobj: IO[bytes], *, points: bool
) -> tuple[Iterator[ShareRecord], HashingReader]:
    """(records, reader) where ``reader.sha`` covers the file once the records are exhausted.

    For :func:`~trio_sign.shares._sealed.seal_file`: pass 1 validates fully and hashes; pass 2
    may skip the point checks because it proves (same hash, checked before the output is
    renamed into place) that it read the very bytes pass 1 validated.
    """
    reader = HashingReader(fileobj)
    return _read(reader, max_line_bytes=MAX_LINE_BYTES, points=points), reader
