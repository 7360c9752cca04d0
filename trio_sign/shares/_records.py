"""The key-share record and the validation every reader applies.

A record holds one account's FROST(Ed25519) key share. Every reader (plaintext JSON Lines,
sealed bundle, in-memory store) funnels its input through the checks here, so each kind of
defect has one stable ``ShareFileError.reason`` code wherever it is found:

``bad_json``, ``bad_header``, ``missing_field``, ``unknown_field``, ``bad_type``, ``bad_hex``,
``bad_account_id``, ``bad_policy``, ``zero_identifier``, ``non_canonical_scalar``,
``zero_signing_share``,
``invalid_point``, ``share_mismatch``, ``bad_threshold``, ``duplicate_account``,
``line_too_long``; for the plaintext file as a whole ``missing_trailer``, ``bad_trailer``,
``count_mismatch``, ``after_trailer``, ``truncated`` (plus the sealed-format codes in
:mod:`trio_sign.shares._sealed`).

Messages are one line, name the field, and never contain secret values.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .._errors import ShareFileError
from ..authz._policy import DEFAULT_POLICY, check_policy_name
from ..crypto import _sodium

CIPHERSUITE: Final = "FROST-ED25519-SHA512-v1"
PLAINTEXT_FORMAT: Final = "trio-sign/key-shares"
PLAINTEXT_VERSION: Final = 1
#: The key that marks the plaintext file's last line, ``{"end": true, "accounts": N}``.
TRAILER_KEY: Final = "end"

MAX_ACCOUNT_ID_BYTES: Final = 255
MAX_SIGNERS_LIMIT: Final = 65535
#: Fixed part of a binary record after the account id: 4 x 32 bytes + 2 x u16.
BINARY_FIXED_BYTES: Final = 4 * 32 + 4
#: The sealed record layouts: ``binary-v1`` (no policy: every account's is ``default``) and
#: ``binary-v2`` (``u8 len ‖ policy`` after the account id; length 0 = ``default``).
RECORD_FORMAT_V1: Final = "binary-v1"
RECORD_FORMAT_V2: Final = "binary-v2"
RECORD_FORMATS: Final = (RECORD_FORMAT_V1, RECORD_FORMAT_V2)
MAX_POLICY_BYTES: Final = 64

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HEX = re.compile(r"[0-9a-fA-F]*")
_U16X2 = struct.Struct(">HH")

RECORD_FIELDS: Final = (
    "account_id",
    "identifier",
    "signing_share",
    "verifying_share",
    "group_public_key",
    "min_signers",
    "max_signers",
)
#: Fields a record may carry (version 2, DESIGN §6): the account's policy (default ``default``).
OPTIONAL_RECORD_FIELDS: Final = ("policy",)


def record_error(message: str, *, reason: str, record: int | None) -> ShareFileError:
    """A ``ShareFileError`` located at a sealed-bundle record number (1-based), if given."""
    return ShareFileError(message, reason=reason, line=record, unit="record")


class _PublicShareFields(Protocol):
    @property
    def account_id(self) -> str: ...
    @property
    def identifier(self) -> bytes: ...
    @property
    def verifying_share(self) -> bytes: ...
    @property
    def group_public_key(self) -> bytes: ...
    @property
    def min_signers(self) -> int: ...
    @property
    def max_signers(self) -> int: ...
    @property
    def policy(self) -> str: ...


def public_repr(share: _PublicShareFields) -> str:
    """A share record's repr: every public field, and ``<secret>`` for the signing share."""
    return (
        f"{type(share).__name__}(account_id={share.account_id!r}, "
        f"identifier={share.identifier.hex()}, signing_share=<secret>, "
        f"verifying_share={share.verifying_share.hex()}, "
        f"group_public_key={share.group_public_key.hex()}, "
        f"min_signers={share.min_signers}, max_signers={share.max_signers}, "
        f"policy={share.policy!r})"
    )


@dataclass(slots=True, eq=False)
class ShareRecord:
    """One account's key share.

    ``signing_share`` is secret: it is a mutable ``bytearray`` so :meth:`zero` can wipe it, and
    the repr never shows it. Records are compared with :meth:`same_as`, not ``==`` (which would
    not be constant time).
    """

    account_id: str
    identifier: bytes
    signing_share: bytearray
    verifying_share: bytes
    group_public_key: bytes
    min_signers: int
    max_signers: int
    policy: str = DEFAULT_POLICY

    def __repr__(self) -> str:
        return public_repr(self)

    def zero(self) -> None:
        """Overwrite the signing share with zeros."""
        _sodium.memzero(self.signing_share)

    def same_as(self, other: ShareRecord) -> bool:
        """True if every field is equal (the signing share compared in constant time)."""
        return (
            self.account_id == other.account_id
            and self.identifier == other.identifier
            and _sodium.ct_equal(self.signing_share, other.signing_share)
            and self.verifying_share == other.verifying_share
            and self.group_public_key == other.group_public_key
            and self.min_signers == other.min_signers
            and self.max_signers == other.max_signers
            and self.policy == other.policy
        )

    def _policy_bytes(self) -> bytes:
        return b"" if self.policy == DEFAULT_POLICY else self.policy.encode("utf-8")

    def binary_size(self, record_format: str = RECORD_FORMAT_V1) -> int:
        """Length of this record in the sealed layout ``record_format``."""
        extra = 1 + len(self._policy_bytes()) if record_format == RECORD_FORMAT_V2 else 0
        return 1 + len(self.account_id.encode("utf-8")) + extra + BINARY_FIXED_BYTES

    def pack_into(
        self, out: bytearray | memoryview, offset: int, record_format: str = RECORD_FORMAT_V1
    ) -> int:
        """Write the ``record_format`` layout at ``out[offset:]``; returns the new offset.

        ``binary-v1``: ``u8 len`` ‖ account_id ‖ identifier ‖ signing_share ‖ verifying_share ‖
        group_public_key ‖ ``u16be min_signers`` ‖ ``u16be max_signers``. ``binary-v2``: the
        same with ``u8 len`` ‖ policy after the account id (length 0: ``default``). Only the
        structure is checked here (lengths and ranges that the layout cannot express);
        validation is the reader's job.
        """
        aid = self.account_id.encode("utf-8")
        if not 1 <= len(aid) <= MAX_ACCOUNT_ID_BYTES:
            raise ValueError("account_id must be 1..255 UTF-8 bytes")
        policy = self._policy_bytes()
        if record_format == RECORD_FORMAT_V1 and policy:
            raise ValueError("binary-v1 cannot carry a policy other than 'default'")
        if len(policy) > MAX_POLICY_BYTES:
            raise ValueError(f"policy must be at most {MAX_POLICY_BYTES} bytes")
        for name in ("identifier", "signing_share", "verifying_share", "group_public_key"):
            if len(getattr(self, name)) != 32:
                raise ValueError(f"{name} must be 32 bytes")
        if not (0 <= self.min_signers <= 0xFFFF and 0 <= self.max_signers <= 0xFFFF):
            raise ValueError("min_signers and max_signers must fit in 16 bits")
        out[offset] = len(aid)
        p = offset + 1
        out[p : p + len(aid)] = aid
        p += len(aid)
        if record_format == RECORD_FORMAT_V2:
            out[p] = len(policy)
            out[p + 1 : p + 1 + len(policy)] = policy
            p += 1 + len(policy)
        out[p : p + 32] = self.identifier
        out[p + 32 : p + 64] = self.signing_share
        out[p + 64 : p + 96] = self.verifying_share
        out[p + 96 : p + 128] = self.group_public_key
        _U16X2.pack_into(out, p + 128, self.min_signers, self.max_signers)
        return p + 132


# ---------------------------------------------------------------------------------------------
# Field checks shared by every reader. ``line`` is a plaintext line number; ``record`` a sealed
# record number; at most one of them is given.


def _err(message: str, reason: str, line: int | None, record: int | None) -> ShareFileError:
    if record is not None:
        return record_error(message, reason=reason, record=record)
    return ShareFileError(message, reason=reason, line=line)


def check_account_id(
    account_id: str, *, line: int | None = None, record: int | None = None
) -> None:
    """Non-empty, at most 255 UTF-8 bytes, no control characters."""
    if not account_id:
        raise _err("account_id is empty", "bad_account_id", line, record)
    try:
        n = len(account_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise _err("account_id is not valid UTF-8 text", "bad_account_id", line, record) from None
    if n > MAX_ACCOUNT_ID_BYTES:
        raise _err(
            f"account_id is {n} UTF-8 bytes; the limit is {MAX_ACCOUNT_ID_BYTES}",
            "bad_account_id",
            line,
            record,
        )
    if not account_id.isprintable() and _CONTROL.search(account_id):
        raise _err("account_id contains control characters", "bad_account_id", line, record)


def check_policy(policy: str, *, line: int | None = None, record: int | None = None) -> None:
    """A policy name (DESIGN §6, §11): 1..64 characters of ``A-Z a-z 0-9 . _ -``. Whether
    the enclave's configuration has it is checked at preload, not here."""
    problem = check_policy_name(policy)
    if problem is not None:
        raise _err(f"policy {problem}", "bad_policy", line, record)


def check_scalars(
    identifier: _sodium.Buffer,
    signing_share: _sodium.Buffer,
    *,
    line: int | None = None,
    record: int | None = None,
) -> None:
    """Identifier and signing share are canonical, non-zero scalars (mod L)."""
    # The identifier is public, so a Python int is fine (and faster than two FFI calls).
    ident = int.from_bytes(identifier, "little")
    if ident == 0:
        raise _err("identifier is zero", "zero_identifier", line, record)
    if ident >= _sodium.L:
        raise _err(
            "identifier is not a canonical scalar (>= L)", "non_canonical_scalar", line, record
        )
    if not _sodium.scalar_is_canonical(signing_share):
        raise _err(
            "signing_share is not a canonical scalar (>= L)", "non_canonical_scalar", line, record
        )
    if _sodium.scalar_is_zero(signing_share):
        raise _err("signing_share is zero", "zero_signing_share", line, record)


def check_threshold(
    min_signers: int, max_signers: int, *, line: int | None = None, record: int | None = None
) -> None:
    """``2 <= min_signers <= max_signers <= 65535``."""
    if not 2 <= min_signers <= max_signers <= MAX_SIGNERS_LIMIT:
        raise _err(
            f"need 2 <= min_signers <= max_signers <= {MAX_SIGNERS_LIMIT}, "
            f"got min_signers={min_signers}, max_signers={max_signers}",
            "bad_threshold",
            line,
            record,
        )


_INVALID_POINT = (
    "is not a valid group element "
    "(non-canonical, identity, small order or outside the prime-order subgroup)"
)


def check_points(
    signing_share: _sodium.Buffer,
    verifying_share: _sodium.Buffer,
    group_public_key: _sodium.Buffer,
    *,
    line: int | None = None,
    record: int | None = None,
) -> None:
    """Both points are valid prime-order-subgroup elements and ``signing_share·G`` matches.

    The expensive part of validation: about 45 µs per record (one subgroup check at ~31 µs,
    one base multiplication at ~12 µs). ``signing_share`` must already have passed
    :func:`check_scalars`.
    """
    if not _sodium.is_valid_point(group_public_key):
        raise _err(f"group_public_key {_INVALID_POINT}", "invalid_point", line, record)
    expected = bytearray(32)
    try:
        ok = _sodium.base_mult(expected, signing_share)
        if ok and _sodium.ct_equal(expected, verifying_share):
            # verifying_share is byte-for-byte the canonical encoding of s·G with s in 1..L-1,
            # so it is a valid, non-identity element of the prime-order subgroup: its own
            # (expensive) subgroup check would be redundant.
            return
    finally:
        _sodium.memzero(expected)
    if not _sodium.is_valid_point(verifying_share):
        raise _err(f"verifying_share {_INVALID_POINT}", "invalid_point", line, record)
    raise _err(
        "verifying_share does not match signing_share (signing_share·G differs)",
        "share_mismatch",
        line,
        record,
    )


def check_record(rec: ShareRecord, *, line: int | None = None, record: int | None = None) -> None:
    """Every check except duplicates (which need the reader's context)."""
    check_account_id(rec.account_id, line=line, record=record)
    check_policy(rec.policy, line=line, record=record)
    check_scalars(rec.identifier, rec.signing_share, line=line, record=record)
    check_threshold(rec.min_signers, rec.max_signers, line=line, record=record)
    check_points(
        rec.signing_share, rec.verifying_share, rec.group_public_key, line=line, record=record
    )


# ---------------------------------------------------------------------------------------------
# JSON objects (plaintext format)


def check_plaintext_header(obj: Any, *, line: int = 1) -> None:
    """The first line must be exactly the DESIGN §6 header object."""
    if not isinstance(obj, dict):
        raise ShareFileError("header line is not a JSON object", reason="bad_header", line=line)
    if "format" not in obj:
        raise ShareFileError(
            f'missing header line: expected {{"format": "{PLAINTEXT_FORMAT}", ...}} first',
            reason="bad_header",
            line=line,
        )
    if obj.get("format") != PLAINTEXT_FORMAT:
        raise ShareFileError(
            f"header format must be {PLAINTEXT_FORMAT!r}", reason="bad_header", line=line
        )
    version = obj.get("version")
    if type(version) is not int or version != PLAINTEXT_VERSION:
        raise ShareFileError(
            f"header version must be {PLAINTEXT_VERSION}", reason="bad_header", line=line
        )
    if obj.get("ciphersuite") != CIPHERSUITE:
        raise ShareFileError(
            f"header ciphersuite must be {CIPHERSUITE!r}", reason="bad_header", line=line
        )
    extra = set(obj) - {"format", "version", "ciphersuite"}
    if extra:
        raise ShareFileError(
            f"header has unknown field {sorted(extra)[0]!r}", reason="bad_header", line=line
        )


def trailer_line(accounts: int) -> str:
    """The plaintext file's last line (no newline): ``{"end": true, "accounts": N}``."""
    return json.dumps({TRAILER_KEY: True, "accounts": int(accounts)})


def check_trailer(obj: dict[str, Any], *, records: int, line: int) -> None:
    """The trailer must be exactly ``{"end": true, "accounts": N}`` with N the records read."""
    if obj.get(TRAILER_KEY) is not True:
        raise ShareFileError('trailer "end" must be true', reason="bad_trailer", line=line)
    extra = set(obj) - {TRAILER_KEY, "accounts"}
    if extra:
        raise ShareFileError(
            f"trailer has unknown field {sorted(extra)[0]!r}", reason="bad_trailer", line=line
        )
    accounts = obj.get("accounts")
    if type(accounts) is not int or accounts < 0:
        raise ShareFileError(
            'trailer "accounts" must be a non-negative integer', reason="bad_trailer", line=line
        )
    if accounts != records:
        raise ShareFileError(
            f"trailer says {accounts} accounts but the file has {records} records",
            reason="count_mismatch",
            line=line,
        )


def _hex_field(obj: dict[str, Any], name: str, line: int) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise ShareFileError(f"{name} must be a hex string", reason="bad_type", line=line)
    if len(value) != 64 or _HEX.fullmatch(value) is None:
        raise ShareFileError(
            f"{name} must be 64 hex characters (32 bytes), got {len(value)} characters"
            + ("" if _HEX.fullmatch(value) is not None else " including non-hex ones"),
            reason="bad_hex",
            line=line,
        )
    return value


def _int_field(obj: dict[str, Any], name: str, line: int) -> int:
    value = obj[name]
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise ShareFileError(f"{name} must be an integer", reason="bad_type", line=line)
    return int(value)


def record_from_json(obj: Any, *, line: int, points: bool = True) -> ShareRecord:
    """Validate a parsed JSON record object completely and build a :class:`ShareRecord`.

    The caller zeroes the returned record's signing share when done. ``points=False`` skips the
    point checks; only :func:`~trio_sign.shares._sealed.seal_file`'s second pass uses it, on a
    file whose bytes it proves identical to the fully validated first pass. (The hex text of the
    signing share inside ``obj`` is an immutable ``str`` that CPython cannot zero; this is why
    plaintext files are a development and ceremony format only.)
    """
    if not isinstance(obj, dict):
        raise ShareFileError("record is not a JSON object", reason="bad_type", line=line)
    for name in RECORD_FIELDS:
        if name not in obj:
            raise ShareFileError(f"missing field {name!r}", reason="missing_field", line=line)
    if len(obj) != len(RECORD_FIELDS):
        extra = sorted(set(obj) - set(RECORD_FIELDS) - set(OPTIONAL_RECORD_FIELDS))
        if extra:
            raise ShareFileError(f"unknown field {extra[0]!r}", reason="unknown_field", line=line)
    account_id = obj["account_id"]
    if not isinstance(account_id, str):
        raise ShareFileError("account_id must be a string", reason="bad_type", line=line)
    check_account_id(account_id, line=line)
    policy = obj.get("policy", DEFAULT_POLICY)
    if not isinstance(policy, str):
        raise ShareFileError("policy must be a string", reason="bad_type", line=line)
    check_policy(policy, line=line)
    ident_hex = _hex_field(obj, "identifier", line)
    share_hex = _hex_field(obj, "signing_share", line)
    vs_hex = _hex_field(obj, "verifying_share", line)
    gk_hex = _hex_field(obj, "group_public_key", line)
    min_signers = _int_field(obj, "min_signers", line)
    max_signers = _int_field(obj, "max_signers", line)
    rec = ShareRecord(
        account_id=account_id,
        identifier=bytes.fromhex(ident_hex),
        signing_share=bytearray.fromhex(share_hex),
        verifying_share=bytes.fromhex(vs_hex),
        group_public_key=bytes.fromhex(gk_hex),
        min_signers=min_signers,
        max_signers=max_signers,
        policy=policy,
    )
    try:
        check_scalars(rec.identifier, rec.signing_share, line=line)
        check_threshold(min_signers, max_signers, line=line)
        if points:
            check_points(rec.signing_share, rec.verifying_share, rec.group_public_key, line=line)
    except BaseException:
        rec.zero()
        raise
    return rec


def record_to_json_text(rec: ShareRecord) -> str:
    """One JSON Lines record (no newline). The hex of the secret is an unzeroable ``str``."""
    return (
        '{"account_id": '
        + _json_str(rec.account_id)
        + f', "identifier": "{rec.identifier.hex()}"'
        + f', "signing_share": "{rec.signing_share.hex()}"'
        + f', "verifying_share": "{rec.verifying_share.hex()}"'
        + f', "group_public_key": "{rec.group_public_key.hex()}"'
        + f', "min_signers": {int(rec.min_signers)}, "max_signers": {int(rec.max_signers)}'
        + ("" if rec.policy == DEFAULT_POLICY else ', "policy": ' + _json_str(rec.policy))
        + "}"
    )


def _json_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)
