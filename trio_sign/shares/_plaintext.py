"""The plaintext key-share file: JSON Lines, DESIGN §6.

A header line ``{"format": "trio-sign/key-shares", "version": 1, "ciphersuite":
"FROST-ED25519-SHA512-v1"}``, one object per account, then the trailer line ``{"end": true,
"accounts": N}``. The header's ciphersuite (any suite of DESIGN §14) is every record's unless a
record carries its own ``"ciphersuite"``, so one file can hold accounts of several suites.
Readers stream (one bounded line at a time), validate every record fully, including the point
checks and ``signing_share·G == verifying_share``, and refuse a file whose trailer is missing
(an interrupted write), wrong, or followed by anything.

Plaintext files are for key ceremonies, imports and development: JSON parsing makes immutable
``str`` copies of the signing-share hex that CPython cannot zero. Production loads sealed
bundles (:mod:`trio_sign.shares._sealed`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Final, Protocol

from .._atomic import atomic_file
from .._errors import ShareFileError
from ..crypto._schemes import ED25519, Scheme
from ._records import (
    CIPHERSUITE,
    PLAINTEXT_FORMAT,
    PLAINTEXT_VERSION,
    TRAILER_KEY,
    ShareRecord,
    check_plaintext_header,
    check_trailer,
    record_from_json,
    record_to_json_text,
    scheme_named,
    trailer_line,
)

#: Longest accepted line, newline included. A record with a 255-byte account id escaped as
#: JSON ``\uXXXX`` sequences is still well under this.
MAX_LINE_BYTES: Final = 4096


class _LineSource(Protocol):
    def readline(self, limit: int = -1, /) -> bytes: ...


def header_line(ciphersuite: str = CIPHERSUITE) -> str:
    """The header line (no newline) of a file whose default suite is ``ciphersuite``."""
    return json.dumps(
        {"format": PLAINTEXT_FORMAT, "version": PLAINTEXT_VERSION, "ciphersuite": ciphersuite}
    )


HEADER_LINE: Final = header_line()


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
    fileobj: IO[bytes], *, max_line_bytes: int = MAX_LINE_BYTES, name: str | None = None
) -> Iterator[ShareRecord]:
    """Stream and validate a plaintext key-share file.

    Args:
        fileobj: a binary file object, read line by line (never whole).
        max_line_bytes: the longest accepted line.
        name: how errors name the file; default ``fileobj.name`` when it is a path (as for
            ``open(path, "rb")``), otherwise errors name only the line.

    Yields:
        One fully validated :class:`ShareRecord` per account. The caller owns each record and
        should call :meth:`ShareRecord.zero` when done with it. Records come out as they are
        read, before the trailer is checked: a caller must exhaust the iterator before it acts
        on the file as a whole (an incomplete file raises at its end).

    Error handling:
        Raises ``ShareFileError`` with the file's name, the 1-based line number and a stable
        ``reason`` on the first defect; see :mod:`trio_sign.shares._records` for the codes.
        Blank lines before the trailer are skipped. A file with no header line (or no lines) is
        ``bad_header``; one that ends without the trailer line is ``missing_trailer`` (an
        interrupted write); a last line cut short is ``truncated``; a wrong trailer is
        ``bad_trailer`` or ``count_mismatch``; anything after the trailer is ``after_trailer``.
    """
    return _read(fileobj, max_line_bytes=max_line_bytes, points=True, name=_name_of(fileobj, name))


def _name_of(fileobj: object, name: str | None) -> str | None:
    if name is not None:
        return name
    found = getattr(fileobj, "name", None)
    return found if isinstance(found, str) else None


def _read(
    fileobj: _LineSource,
    *,
    max_line_bytes: int,
    points: bool,
    name: str | None,
    on_header: Callable[[Scheme], None] | None = None,
) -> Iterator[ShareRecord]:
    try:
        yield from _read_lines(
            fileobj, max_line_bytes=max_line_bytes, points=points, on_header=on_header
        )
    except ShareFileError as exc:
        if name is None:
            raise
        raise _in_file(exc, name) from None


def _in_file(exc: ShareFileError, name: str) -> ShareFileError:
    """The same error, its one-line message starting with the file's name."""
    located = ShareFileError(f"{name}: {exc}", reason=exc.reason)
    located.line, located.unit = exc.line, exc.unit
    return located


def _read_lines(
    fileobj: _LineSource,
    *,
    max_line_bytes: int,
    points: bool,
    on_header: Callable[[Scheme], None] | None = None,
) -> Iterator[ShareRecord]:
    first_seen: dict[str, int] = {}
    suite: Scheme = ED25519
    header_seen = False
    trailer_at: int | None = None
    lineno = 0
    for lineno, line in _lines(fileobj, max_line_bytes):
        if trailer_at is not None:
            raise ShareFileError(
                f"data after the trailer line (line {trailer_at}); the trailer must be last",
                reason="after_trailer",
                line=lineno,
            )
        if not line.strip():
            continue
        obj = _parse_line(line, lineno)
        if not header_seen:
            suite = check_plaintext_header(obj, line=lineno)
            header_seen = True
            if on_header is not None:
                on_header(suite)
            continue
        if isinstance(obj, dict) and TRAILER_KEY in obj:
            check_trailer(obj, records=len(first_seen), line=lineno)
            trailer_at = lineno
            continue
        rec = record_from_json(obj, line=lineno, points=points, default=suite)
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
    if trailer_at is None:
        raise ShareFileError(
            f'no trailer line {{"end": true, "accounts": N}} after {len(first_seen)} records: '
            "the file is incomplete (an interrupted write?)",
            reason="missing_trailer",
            line=lineno + 1,
        )


def _parse_line(line: bytes, lineno: int) -> Any:
    try:
        return _parse(line, lineno)
    except ShareFileError:
        if line.endswith(b"\n"):
            raise
        raise ShareFileError(
            "the last line is cut short (no newline and not valid JSON): "
            "the file is incomplete (an interrupted write?)",
            reason="truncated",
            line=lineno,
        ) from None


class PlaintextEncoder:
    """The plaintext format as bytes (sans-io): header, one line per record, the trailer.

    ``start()`` first, ``add_record()`` per account, ``finish()`` last; each returns the bytes to
    write. The trailer counts the records added, so a file cut anywhere is refused by readers.
    Records are encoded as given (not validated). Each record line is a fresh ``bytes`` holding
    the signing-share hex, which CPython cannot zero.

    ``ciphersuite`` is the header's (a known suite; ``ShareFileError`` ``unknown_ciphersuite``
    otherwise): a record of another suite carries its own ``"ciphersuite"``.
    """

    def __init__(self, ciphersuite: str = CIPHERSUITE) -> None:
        self.ciphersuite = scheme_named(ciphersuite).name
        self.records = 0
        self._started = False
        self._finished = False

    def start(self) -> bytes:
        if self._started:
            raise RuntimeError("PlaintextEncoder.start() called twice")
        self._started = True
        return header_line(self.ciphersuite).encode("utf-8") + b"\n"

    def add_record(self, rec: ShareRecord) -> bytes:
        if not self._started or self._finished:
            raise RuntimeError("PlaintextEncoder.add_record() outside start() .. finish()")
        self.records += 1
        return record_to_json_text(rec, self.ciphersuite).encode("utf-8") + b"\n"

    def finish(self) -> bytes:
        if not self._started or self._finished:
            raise RuntimeError("PlaintextEncoder.finish() without start(), or twice")
        self._finished = True
        return trailer_line(self.records).encode("utf-8") + b"\n"


def write_plaintext(
    fileobj: IO[bytes], records: Iterable[ShareRecord], *, ciphersuite: str = CIPHERSUITE
) -> int:
    """Write the header, one line per record and the trailer; returns the number of records.

    ``ciphersuite`` is the header's, the default of every record (records of another suite
    name theirs).

    Records are written as given (not validated): use it for tools and tests. Each line is a
    fresh ``str``/``bytes`` holding the signing-share hex, which CPython cannot zero. To make a
    file on disk, :func:`write_plaintext_file` writes it atomically.
    """
    encoder = PlaintextEncoder(ciphersuite)
    fileobj.write(encoder.start())
    for rec in records:
        fileobj.write(encoder.add_record(rec))
    fileobj.write(encoder.finish())
    return encoder.records


def write_plaintext_file(
    path: str | os.PathLike[str],
    records: Iterable[ShareRecord],
    *,
    overwrite: bool = False,
    ciphersuite: str = CIPHERSUITE,
) -> int:
    """:func:`write_plaintext` into ``path`` atomically (mode 0600); returns the record count.

    The file appears under ``path`` only once complete and fsynced (see
    :func:`trio_sign._atomic.atomic_files`); an exception, cancellation or interruption leaves
    no file, or the previous one, under that name.

    Error handling:
        ``ShareFileError`` (``output_exists``) if ``path`` exists and not ``overwrite``;
        ``OSError`` from the file system.
    """
    target = Path(path)
    try:
        with atomic_file(target, overwrite=overwrite) as f:
            return write_plaintext(f, records, ciphersuite=ciphersuite)
    except FileExistsError:
        raise ShareFileError(
            f"{target} exists; pass overwrite=True (--force) to replace it",
            reason="output_exists",
        ) from None


def _short(account_id: str) -> str:
    return repr(account_id if len(account_id) <= 64 else account_id[:61] + "...")


class HashingReader:
    """Wraps a binary file object; SHA-256 of every byte read through ``readline``.

    ``header_suite`` is the file header's ciphersuite once the header line has been read.
    """

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._f = fileobj
        self.sha = hashlib.sha256()
        self.header_suite = CIPHERSUITE

    def _on_header(self, scheme: Scheme) -> None:
        self.header_suite = scheme.name

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
    name = _name_of(fileobj, None)
    records = _read(
        reader, max_line_bytes=MAX_LINE_BYTES, points=points, name=name, on_header=reader._on_header
    )
    return records, reader


def inspect_plaintext(fileobj: IO[bytes]) -> dict[str, Any]:
    """What ``trio-sign shares inspect`` shows of a plaintext file: no secrets.

    Reads the whole file with every structural check and the trailer check (the point checks,
    about 45 µs per record, are skipped: ``seal`` runs them), zeroing each record at once.

    Returns:
        ``format``, ``version``, ``ciphersuite`` (the header's), ``accounts``, ``ciphersuites``
        (accounts per suite, public), ``trailer`` (always true: a file without one is
        refused), ``sha256`` of the file's bytes.

    Error handling:
        ``ShareFileError`` as :func:`read_plaintext`, naming the file.
    """
    records, reader = read_plaintext_hashed(fileobj, points=False)
    accounts = 0
    suites: dict[str, int] = {}
    for rec in records:
        rec.zero()
        accounts += 1
        suites[rec.ciphersuite] = suites.get(rec.ciphersuite, 0) + 1
    return {
        "format": PLAINTEXT_FORMAT,
        "version": PLAINTEXT_VERSION,
        "ciphersuite": reader.header_suite,
        "accounts": accounts,
        "ciphersuites": dict(sorted(suites.items())),
        "trailer": True,
        "sha256": reader.sha.hexdigest(),
    }
