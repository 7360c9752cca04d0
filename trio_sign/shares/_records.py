"""The key-share record and the validation every reader applies.

A record holds one account's FROST key share in one of the ciphersuites of DESIGN §14
(``ciphersuite``, default ``FROST-ED25519-SHA512-v1``). The identifier and the signing share
are 32-byte scalars in every suite; the verifying share and the group key are the suite's
elements (32 bytes for Ed25519, 33-byte compressed SEC1 points for both secp256k1 suites).
The scalar and point checks are the suite's own (:class:`trio_sign.crypto.Scheme`'s
``scalar_problem``/``point_problem``); this module attaches the line or record number.

Every reader (plaintext JSON Lines, sealed bundle, in-memory store) funnels its input through
the checks here, so each kind of defect has one stable ``ShareFileError.reason`` code wherever
it is found:

``bad_json``, ``bad_header``, ``missing_field``, ``unknown_field``, ``bad_type``, ``bad_hex``,
``bad_account_id``, ``bad_policy``, ``unknown_ciphersuite``, ``zero_identifier``,
``non_canonical_scalar``, ``zero_signing_share``,
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

from .._errors import FrostError, ShareFileError
from ..authz._policy import DEFAULT_POLICY, check_policy_name
from ..crypto import _sodium
from ..crypto._schemes import ED25519, Scheme, scheme_by_code, scheme_by_name

#: The default ciphersuite: the plaintext header's usual one and a record's when it names none.
CIPHERSUITE: Final = "FROST-ED25519-SHA512-v1"
PLAINTEXT_FORMAT: Final = "trio-sign/key-shares"
PLAINTEXT_VERSION: Final = 1
#: The key that marks the plaintext file's last line, ``{"end": true, "accounts": N}``.
TRAILER_KEY: Final = "end"

MAX_ACCOUNT_ID_BYTES: Final = 255
MAX_SIGNERS_LIMIT: Final = 65535
#: Fixed part of an Ed25519 binary record after the account id: 4 x 32 bytes + 2 x u16.
BINARY_FIXED_BYTES: Final = 4 * 32 + 4
#: The sealed record layouts: ``binary-v1`` (no policy: every account's is ``default``),
#: ``binary-v2`` (``u8 len ‖ policy`` after the account id; length 0 = ``default``), both
#: Ed25519 only, and ``binary-v3`` (``binary-v2`` with a ``u8`` suite code after the policy
#: and the suite's element size for the two points), written only for a bundle that holds an
#: account of another suite.
RECORD_FORMAT_V1: Final = "binary-v1"
RECORD_FORMAT_V2: Final = "binary-v2"
RECORD_FORMAT_V3: Final = "binary-v3"
RECORD_FORMATS: Final = (RECORD_FORMAT_V1, RECORD_FORMAT_V2, RECORD_FORMAT_V3)
MAX_POLICY_BYTES: Final = 64
#: Largest element of any suite (a compressed SEC1 point); bounds a ``binary-v3`` record.
MAX_ELEMENT_BYTES: Final = 33


def binary_v3_fixed_bytes(element_size: int) -> int:
    """Bytes of a ``binary-v3`` record after its policy, for a suite's ``element_size``: the
    suite code, two 32-byte scalars, two elements and two u16."""
    return 1 + 64 + 2 * element_size + 4


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
#: Fields a record may carry (version 2, DESIGN §6): the account's policy (default ``default``)
#: and its ciphersuite (default: the header's).
OPTIONAL_RECORD_FIELDS: Final = ("policy", "ciphersuite")


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
    @property
    def ciphersuite(self) -> str: ...


def public_repr(share: _PublicShareFields) -> str:
    """A share record's repr: every public field, and ``<secret>`` for the signing share."""
    return (
        f"{type(share).__name__}(account_id={share.account_id!r}, "
        f"identifier={share.identifier.hex()}, signing_share=<secret>, "
        f"verifying_share={share.verifying_share.hex()}, "
        f"group_public_key={share.group_public_key.hex()}, "
        f"min_signers={share.min_signers}, max_signers={share.max_signers}, "
        f"policy={share.policy!r}, ciphersuite={share.ciphersuite!r})"
    )


@dataclass(slots=True, eq=False)
class ShareRecord:
    """One account's key share.

    ``identifier`` and ``signing_share`` are 32 bytes in every suite; ``verifying_share`` and
    ``group_public_key`` are the suite's ``element_size`` (33 for secp256k1). ``ciphersuite``
    is the suite's name (DESIGN §14); it is last, with a default, so that records built before
    it existed still are.

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
    ciphersuite: str = CIPHERSUITE

    def __repr__(self) -> str:
        return public_repr(self)

    @property
    def scheme(self) -> Scheme:
        """The record's :class:`~trio_sign.crypto.Scheme` (``FrostError`` if unknown)."""
        return scheme_by_name(self.ciphersuite)

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
            and self.ciphersuite == other.ciphersuite
        )

    def _policy_bytes(self) -> bytes:
        return b"" if self.policy == DEFAULT_POLICY else self.policy.encode("utf-8")

    def binary_size(self, record_format: str = RECORD_FORMAT_V1) -> int:
        """Length of this record in the sealed layout ``record_format``."""
        aid = 1 + len(self.account_id.encode("utf-8"))
        if record_format == RECORD_FORMAT_V3:
            element = scheme_by_name(self.ciphersuite).element_size
            return aid + 1 + len(self._policy_bytes()) + binary_v3_fixed_bytes(element)
        extra = 1 + len(self._policy_bytes()) if record_format == RECORD_FORMAT_V2 else 0
        return aid + extra + BINARY_FIXED_BYTES

    def pack_into(
        self, out: bytearray | memoryview, offset: int, record_format: str = RECORD_FORMAT_V1
    ) -> int:
        """Write the ``record_format`` layout at ``out[offset:]``; returns the new offset.

        ``binary-v1``: ``u8 len`` ‖ account_id ‖ identifier ‖ signing_share ‖ verifying_share ‖
        group_public_key ‖ ``u16be min_signers`` ‖ ``u16be max_signers``. ``binary-v2``: the
        same with ``u8 len`` ‖ policy after the account id (length 0: ``default``).
        ``binary-v3``: ``binary-v2`` with ``u8`` suite code after the policy and the suite's
        element size for verifying_share and group_public_key. ``binary-v1``/``-v2`` hold
        Ed25519 records only. Only the structure is checked here (lengths and ranges that the
        layout cannot express); validation is the reader's job.
        """
        aid = self.account_id.encode("utf-8")
        if not 1 <= len(aid) <= MAX_ACCOUNT_ID_BYTES:
            raise ValueError("account_id must be 1..255 UTF-8 bytes")
        policy = self._policy_bytes()
        if record_format == RECORD_FORMAT_V1 and policy:
            raise ValueError("binary-v1 cannot carry a policy other than 'default'")
        if len(policy) > MAX_POLICY_BYTES:
            raise ValueError(f"policy must be at most {MAX_POLICY_BYTES} bytes")
        scheme = scheme_by_name(self.ciphersuite)
        if record_format != RECORD_FORMAT_V3 and scheme is not ED25519:
            raise ValueError(f"{record_format} holds only {CIPHERSUITE} records")
        n = scheme.element_size
        for name, size in (
            ("identifier", 32),
            ("signing_share", 32),
            ("verifying_share", n),
            ("group_public_key", n),
        ):
            if len(getattr(self, name)) != size:
                raise ValueError(f"{name} must be {size} bytes")
        if not (0 <= self.min_signers <= 0xFFFF and 0 <= self.max_signers <= 0xFFFF):
            raise ValueError("min_signers and max_signers must fit in 16 bits")
        out[offset] = len(aid)
        p = offset + 1
        out[p : p + len(aid)] = aid
        p += len(aid)
        if record_format != RECORD_FORMAT_V1:
            out[p] = len(policy)
            out[p + 1 : p + 1 + len(policy)] = policy
            p += 1 + len(policy)
        if record_format == RECORD_FORMAT_V3:
            out[p] = scheme.code
            p += 1
        out[p : p + 32] = self.identifier
        out[p + 32 : p + 64] = self.signing_share
        out[p + 64 : p + 64 + n] = self.verifying_share
        out[p + 64 + n : p + 64 + 2 * n] = self.group_public_key
        _U16X2.pack_into(out, p + 64 + 2 * n, self.min_signers, self.max_signers)
        return p + 68 + 2 * n


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


def scheme_named(name: str, *, line: int | None = None, record: int | None = None) -> Scheme:
    """The suite called ``name``; ``unknown_ciphersuite`` (naming it and the known ones) if
    there is none."""
    try:
        return scheme_by_name(name)
    except FrostError as exc:
        raise _err(str(exc), "unknown_ciphersuite", line, record) from None


def scheme_coded(code: int, *, record: int | None = None) -> Scheme:
    """The suite a sealed ``binary-v3`` record's code byte names; ``unknown_ciphersuite``."""
    try:
        return scheme_by_code(code)
    except FrostError as exc:
        raise _err(str(exc), "unknown_ciphersuite", None, record) from None


def check_scalars(
    identifier: _sodium.Buffer,
    signing_share: _sodium.Buffer,
    *,
    line: int | None = None,
    record: int | None = None,
    scheme: Scheme = ED25519,
) -> None:
    """Identifier and signing share are canonical, non-zero scalars of ``scheme``."""
    problem = scheme.scalar_problem(identifier, signing_share)
    if problem is not None:
        raise _err(problem[0], problem[1], line, record)


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


def check_points(
    signing_share: _sodium.Buffer,
    verifying_share: _sodium.Buffer,
    group_public_key: _sodium.Buffer,
    *,
    line: int | None = None,
    record: int | None = None,
    scheme: Scheme = ED25519,
) -> None:
    """Both points are valid elements of ``scheme`` and ``signing_share·G`` matches.

    The expensive part of validation: for Ed25519 about 45 µs per record (one subgroup check
    at ~31 µs, one base multiplication at ~12 µs). ``signing_share`` must already have passed
    :func:`check_scalars`. A Taproot group key with odd Y is valid: dealt keys are stored as
    dealt (the suite normalises Y when signing).
    """
    problem = scheme.point_problem(signing_share, verifying_share, group_public_key)
    if problem is not None:
        raise _err(problem[0], problem[1], line, record)


def check_record(rec: ShareRecord, *, line: int | None = None, record: int | None = None) -> None:
    """Every check except duplicates (which need the reader's context)."""
    check_account_id(rec.account_id, line=line, record=record)
    check_policy(rec.policy, line=line, record=record)
    scheme = scheme_named(rec.ciphersuite, line=line, record=record)
    check_scalars(rec.identifier, rec.signing_share, line=line, record=record, scheme=scheme)
    check_threshold(rec.min_signers, rec.max_signers, line=line, record=record)
    check_points(
        rec.signing_share,
        rec.verifying_share,
        rec.group_public_key,
        line=line,
        record=record,
        scheme=scheme,
    )


# ---------------------------------------------------------------------------------------------
# JSON objects (plaintext format)


def check_plaintext_header(obj: Any, *, line: int = 1) -> Scheme:
    """The first line must be exactly the DESIGN §6 header object; returns its suite (every
    record's unless the record names its own).

    Error handling:
        ``bad_header`` for a wrong shape, format, version or field; ``unknown_ciphersuite``
        for a ``ciphersuite`` that names no suite this build knows (the message names it).
    """
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
    extra = set(obj) - {"format", "version", "ciphersuite"}
    if extra:
        raise ShareFileError(
            f"header has unknown field {sorted(extra)[0]!r}", reason="bad_header", line=line
        )
    if not isinstance(obj.get("ciphersuite"), str):
        raise ShareFileError(
            "header ciphersuite must be a ciphersuite name such as " + repr(CIPHERSUITE),
            reason="bad_header",
            line=line,
        )
    return scheme_named(obj["ciphersuite"], line=line)


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


def _hex_field(obj: dict[str, Any], name: str, line: int, nbytes: int = 32) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise ShareFileError(f"{name} must be a hex string", reason="bad_type", line=line)
    if len(value) != 2 * nbytes or _HEX.fullmatch(value) is None:
        raise ShareFileError(
            f"{name} must be {2 * nbytes} hex characters ({nbytes} bytes), "
            f"got {len(value)} characters"
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


def record_from_json(
    obj: Any, *, line: int, points: bool = True, default: Scheme = ED25519
) -> ShareRecord:
    """Validate a parsed JSON record object completely and build a :class:`ShareRecord`.

    ``default`` is the header's suite, the record's unless it carries ``"ciphersuite"``; the
    hex lengths and the scalar and point checks are that suite's.

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
    scheme = default
    if "ciphersuite" in obj:
        suite = obj["ciphersuite"]
        if not isinstance(suite, str):
            raise ShareFileError("ciphersuite must be a string", reason="bad_type", line=line)
        scheme = scheme_named(suite, line=line)
    n = scheme.element_size
    ident_hex = _hex_field(obj, "identifier", line)
    share_hex = _hex_field(obj, "signing_share", line)
    vs_hex = _hex_field(obj, "verifying_share", line, n)
    gk_hex = _hex_field(obj, "group_public_key", line, n)
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
        ciphersuite=scheme.name,
    )
    try:
        check_scalars(rec.identifier, rec.signing_share, line=line, scheme=scheme)
        check_threshold(min_signers, max_signers, line=line)
        if points:
            check_points(
                rec.signing_share,
                rec.verifying_share,
                rec.group_public_key,
                line=line,
                scheme=scheme,
            )
    except BaseException:
        rec.zero()
        raise
    return rec


def record_to_json_text(rec: ShareRecord, header_suite: str = CIPHERSUITE) -> str:
    """One JSON Lines record (no newline). The hex of the secret is an unzeroable ``str``.

    ``"ciphersuite"`` is written only when the record's differs from ``header_suite``, the
    file header's (which readers take as every record's default).
    """
    return (
        '{"account_id": '
        + _json_str(rec.account_id)
        + f', "identifier": "{rec.identifier.hex()}"'
        + f', "signing_share": "{rec.signing_share.hex()}"'
        + f', "verifying_share": "{rec.verifying_share.hex()}"'
        + f', "group_public_key": "{rec.group_public_key.hex()}"'
        + f', "min_signers": {int(rec.min_signers)}, "max_signers": {int(rec.max_signers)}'
        + ("" if rec.policy == DEFAULT_POLICY else ', "policy": ' + _json_str(rec.policy))
        + (
            ""
            if rec.ciphersuite == header_suite
            else ', "ciphersuite": ' + _json_str(rec.ciphersuite)
        )
        + "}"
    )


def _json_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)
