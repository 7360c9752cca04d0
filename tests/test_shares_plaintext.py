"""Plaintext key-share files (DESIGN §6) and the record validation every reader shares."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_sign.shares as shares_pkg
from trio_sign import ShareFileError
from trio_sign.crypto import _sodium
from trio_sign.shares import ShareRecord, read_plaintext, write_plaintext

from .share_helpers import ORDER_8_HEX, point_of, random_scalar
from .share_helpers import make_record as _make_record

HEADER = {"format": "trio-sign/key-shares", "version": 1, "ciphersuite": "FROST-ED25519-SHA512-v1"}
IDENTITY = "01" + "00" * 31
ORDER_2 = "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"

ORDER_8 = ORDER_8_HEX
NON_CANONICAL_Y = "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"
ZF_INVALID = "123456f9e9d319cad973b84cc4c835c8ee73281f5e2638d2d2b352c09edccbfb"
L_HEX = _sodium.L.to_bytes(32, "little").hex()


def make_record(account_id: str = "acct-1", **over: Any) -> ShareRecord:
    over.setdefault("group_public_key", point_of(random_scalar()))  # a fresh key per record
    return _make_record(account_id, **over)


def record_obj(rec: ShareRecord | None = None, /, **over: Any) -> dict[str, Any]:
    rec = rec or make_record()
    obj: dict[str, Any] = {
        "account_id": rec.account_id,
        "identifier": rec.identifier.hex(),
        "signing_share": rec.signing_share.hex(),
        "verifying_share": rec.verifying_share.hex(),
        "group_public_key": rec.group_public_key.hex(),
        "min_signers": rec.min_signers,
        "max_signers": rec.max_signers,
    }
    obj.update(over)
    return obj


def end(accounts: int) -> dict[str, Any]:
    """The trailer line of a file with ``accounts`` records."""
    return {"end": True, "accounts": accounts}


def jsonl(*lines: Any) -> io.BytesIO:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    return io.BytesIO(text.encode("utf-8"))


def load_all(f: io.BytesIO) -> list[ShareRecord]:
    return list(read_plaintext(f))


def refused(f: io.BytesIO) -> ShareFileError:
    with pytest.raises(ShareFileError) as info:
        load_all(f)
    return info.value


# -- round trips ---------------------------------------------------------------------------


def test_round_trip() -> None:
    recs = [make_record(f"acct-{i}", max_signers=2 + i) for i in range(5)]
    recs.append(make_record("ünïcødé ✓ with spaces"))
    buf = io.BytesIO()
    assert write_plaintext(buf, recs) == len(recs)
    lines = buf.getvalue().decode().splitlines()
    assert json.loads(lines[0]) == HEADER
    assert list(json.loads(lines[1])) == [
        "account_id",
        "identifier",
        "signing_share",
        "verifying_share",
        "group_public_key",
        "min_signers",
        "max_signers",
    ]
    buf.seek(0)
    back = load_all(buf)
    assert len(back) == len(recs)
    for a, b in zip(recs, back, strict=True):
        assert a.same_as(b)
        assert isinstance(b.signing_share, bytearray)


_ACCOUNT_IDS = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60
).filter(lambda s: len(s.encode("utf-8")) <= 255)


@settings(max_examples=50, deadline=None)
@given(st.lists(_ACCOUNT_IDS, unique=True, max_size=6), st.integers(2, 65535))
def test_round_trip_any_account_ids(account_ids: list[str], max_signers: int) -> None:
    recs = [make_record(a, max_signers=max_signers) for a in account_ids]
    buf = io.BytesIO()
    write_plaintext(buf, recs)
    buf.seek(0)
    back = load_all(buf)
    assert [r.account_id for r in back] == account_ids
    assert all(a.same_as(b) for a, b in zip(recs, back, strict=True))


def test_empty_account_list_and_blank_lines() -> None:
    assert load_all(jsonl(HEADER, end(0))) == []
    rec = make_record()
    got = load_all(jsonl("", HEADER, "  ", record_obj(rec), "", end(1)))
    assert len(got) == 1
    assert got[0].same_as(rec)


def test_uppercase_hex_accepted() -> None:
    rec = make_record()
    obj = record_obj(rec, signing_share=rec.signing_share.hex().upper())
    assert load_all(jsonl(HEADER, obj, end(1)))[0].same_as(rec)


def test_reader_streams() -> None:
    """The reader consumes one line at a time: records come out before the file ends."""
    buf = jsonl(HEADER, record_obj(make_record("a")), "{not json")
    it = read_plaintext(buf)
    assert next(it).account_id == "a"
    with pytest.raises(ShareFileError) as info:
        next(it)
    assert info.value.reason == "bad_json"


def test_record_repr_and_zero() -> None:
    rec = make_record()
    secret_hex = rec.signing_share.hex()
    assert secret_hex not in repr(rec)
    assert "<secret>" in repr(rec)
    rec.zero()
    assert rec.signing_share == bytes(32)


def test_public_api() -> None:
    assert sorted(shares_pkg.__all__) == sorted(
        name for name in dir(shares_pkg) if not name.startswith("_")
    )
    for name in shares_pkg.__all__:
        assert getattr(shares_pkg, name) is not None


# -- every reason code ---------------------------------------------------------------------


def test_bad_json() -> None:
    err = refused(jsonl(HEADER, '{"account_id": '))
    assert (err.reason, err.line) == ("bad_json", 2)
    err = refused(io.BytesIO(json.dumps(HEADER).encode() + b"\n\xff\xfe\n"))
    assert (err.reason, err.line) == ("bad_json", 2)


@pytest.mark.parametrize(
    "header",
    [
        {**HEADER, "format": "something-else"},
        {**HEADER, "version": 2},
        {**HEADER, "version": True},
        {**HEADER, "ciphersuite": 7},
        {k: v for k, v in HEADER.items() if k != "ciphersuite"},
        {**HEADER, "extra": 1},
        [1, 2],
    ],
)
def test_bad_header(header: Any) -> None:
    err = refused(jsonl(header, record_obj()))
    assert (err.reason, err.line) == ("bad_header", 1)


def test_missing_header_line() -> None:
    err = refused(jsonl(record_obj()))
    assert (err.reason, err.line) == ("bad_header", 1)
    assert "missing header" in str(err)


def test_empty_file() -> None:
    err = refused(io.BytesIO(b""))
    assert err.reason == "bad_header"
    assert "empty" in str(err)


def test_missing_field() -> None:
    obj = record_obj()
    del obj["verifying_share"]
    err = refused(jsonl(HEADER, obj))
    assert (err.reason, err.line) == ("missing_field", 2)
    assert "verifying_share" in str(err)


def test_unknown_field() -> None:
    err = refused(jsonl(HEADER, record_obj(comment="hi")))
    assert (err.reason, err.line) == ("unknown_field", 2)
    assert "comment" in str(err)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("account_id", 7),
        ("identifier", 1),
        ("signing_share", None),
        ("min_signers", "2"),
        ("max_signers", 3.0),
        ("max_signers", True),
    ],
)
def test_bad_type(field: str, value: Any) -> None:
    err = refused(jsonl(HEADER, record_obj(**{field: value})))
    assert (err.reason, err.line) == ("bad_type", 2)
    assert field in str(err)


def test_bad_type_not_object() -> None:
    err = refused(jsonl(HEADER, [1, 2, 3]))
    assert (err.reason, err.line) == ("bad_type", 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("identifier", "00" * 31),
        ("signing_share", "zz" * 32),
        ("verifying_share", "00" * 33),
        ("group_public_key", "0 " * 32),
    ],
)
def test_bad_hex(field: str, value: str) -> None:
    err = refused(jsonl(HEADER, record_obj(**{field: value})))
    assert (err.reason, err.line) == ("bad_hex", 2)
    assert field in str(err)
    assert "64 hex characters (32 bytes)" in str(err)


def test_bad_hex_message_never_shows_the_secret() -> None:
    secret = "ab" * 31 + "zz"
    err = refused(jsonl(HEADER, record_obj(signing_share=secret)))
    assert "ab" * 4 not in str(err)


@pytest.mark.parametrize(
    "account_id", ["", "x" * 256, "é" * 128, "tab\there", "nl\nhere", "nul\0", "del\x7f", "c1\x85"]
)
def test_bad_account_id(account_id: str) -> None:
    err = refused(jsonl(HEADER, record_obj(account_id=account_id)))
    assert (err.reason, err.line) == ("bad_account_id", 2)


def test_account_id_limits_accepted() -> None:
    for account_id in ("x" * 255, "é" * 127 + "x", "a b"):
        assert load_all(jsonl(HEADER, record_obj(make_record(account_id)), end(1)))


def test_zero_identifier() -> None:
    err = refused(jsonl(HEADER, record_obj(identifier="00" * 32)))
    assert (err.reason, err.line) == ("zero_identifier", 2)


@pytest.mark.parametrize("field", ["identifier", "signing_share"])
@pytest.mark.parametrize("value", [L_HEX, "ff" * 32, "ed" + "ff" * 30 + "1f"])
def test_non_canonical_scalar(field: str, value: str) -> None:
    err = refused(jsonl(HEADER, record_obj(**{field: value})))
    assert (err.reason, err.line) == ("non_canonical_scalar", 2)
    assert field in str(err)


def test_zero_signing_share() -> None:
    err = refused(jsonl(HEADER, record_obj(signing_share="00" * 32)))
    assert (err.reason, err.line) == ("zero_signing_share", 2)


def _torsioned_point() -> str:
    """A valid point plus the order-2 point: decodes, but is outside the prime-order subgroup."""
    out = bytearray(32)
    assert _sodium.point_add(out, point_of(random_scalar()), bytes.fromhex(ORDER_2))
    return out.hex()


@pytest.mark.parametrize("field", ["verifying_share", "group_public_key"])
@pytest.mark.parametrize(
    "point", [IDENTITY, ORDER_2, ORDER_8, NON_CANONICAL_Y, ZF_INVALID, "torsioned"]
)
def test_invalid_point(field: str, point: str) -> None:
    if point == "torsioned":
        point = _torsioned_point()
    err = refused(jsonl(HEADER, record_obj(**{field: point})))
    assert (err.reason, err.line) == ("invalid_point", 2)
    assert field in str(err)


def test_share_mismatch() -> None:
    other = point_of(random_scalar()).hex()
    err = refused(jsonl(HEADER, record_obj(), record_obj(make_record("b"), verifying_share=other)))
    assert (err.reason, err.line) == ("share_mismatch", 3)


@pytest.mark.parametrize(("mn", "mx"), [(1, 3), (0, 0), (4, 3), (2, 65536), (-1, 3)])
def test_bad_threshold(mn: int, mx: int) -> None:
    err = refused(jsonl(HEADER, record_obj(min_signers=mn, max_signers=mx)))
    assert (err.reason, err.line) == ("bad_threshold", 2)


def test_threshold_limits_accepted() -> None:
    assert load_all(jsonl(HEADER, record_obj(min_signers=65535, max_signers=65535), end(1)))
    assert load_all(jsonl(HEADER, record_obj(min_signers=2, max_signers=2), end(1)))


def test_duplicate_account() -> None:
    err = refused(
        jsonl(
            HEADER,
            record_obj(make_record("a")),
            record_obj(make_record("b")),
            "",
            record_obj(make_record("a")),
        )
    )
    assert err.reason == "duplicate_account"
    assert err.line == 5
    assert "line 2" in str(err).split(":", 1)[1]


def test_line_too_long() -> None:
    long_line = json.dumps(record_obj(account_id="x" * 5000))
    err = refused(jsonl(HEADER, record_obj(make_record("a")), long_line))
    assert (err.reason, err.line) == ("line_too_long", 3)


def test_line_limit_is_configurable_and_exact() -> None:
    line = json.dumps(record_obj()).encode()
    trailer = json.dumps(end(1)).encode()
    for limit, ok in ((len(line) + 1, True), (len(line), False)):
        f = io.BytesIO(json.dumps(HEADER).encode() + b"\n" + line + b"\n" + trailer + b"\n")
        if ok:
            assert list(read_plaintext(f, max_line_bytes=limit))
        else:
            with pytest.raises(ShareFileError) as info:
                list(read_plaintext(f, max_line_bytes=limit))
            assert info.value.reason == "line_too_long"
    # the last line may lack its newline
    f = io.BytesIO(json.dumps(HEADER).encode() + b"\n" + line + b"\n" + trailer)
    assert list(read_plaintext(f, max_line_bytes=len(line) + 1))


def test_messages_are_one_line_and_secret_free() -> None:
    rec = make_record()
    cases = [
        record_obj(rec, verifying_share=IDENTITY),
        record_obj(rec, verifying_share=point_of(random_scalar()).hex()),
        record_obj(rec, min_signers=9),
    ]
    for obj in cases:
        err = refused(jsonl(HEADER, obj))
        assert "\n" not in str(err)
        assert rec.signing_share.hex() not in str(err).lower()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_crashes(data: bytes) -> None:
    """Arbitrary bytes after a header are refused with a ShareFileError, never anything else."""
    f = io.BytesIO(json.dumps(HEADER).encode() + b"\n" + data)
    reason = "accepted"
    try:
        for rec in read_plaintext(f):
            rec.zero()
    except ShareFileError as exc:
        reason = exc.reason
    assert reason
