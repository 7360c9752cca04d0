"""The participant WebSocket codec (docs/participants.md): round trips of every message,
every bound on both sides of it, and garbage refused with a MessageError (never anything
else) carrying the right close code."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign.participant import _messages as m

ID_CHARS = "ABCXYZabcxyz0189._:@-"
ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("Aa0z9"),
    st.text(ID_CHARS, max_size=63),
)
texts = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="\x7f"),
    min_size=1,
    max_size=60,
)
int64 = st.integers(0, m.INT64_MAX)
elements = st.one_of(st.binary(min_size=32, max_size=32), st.binary(min_size=33, max_size=33))
b32 = st.binary(min_size=32, max_size=32)
b64 = st.binary(min_size=64, max_size=64)
entries = st.builds(m.CommitmentEntry, b32, elements, elements)

MESSAGES = st.one_of(
    st.builds(m.Hello, ids, ids),
    st.builds(m.Challenge, b32, ids, int64),
    st.builds(m.Auth, b64),
    st.builds(m.Welcome, ids, st.integers(1, 65535), st.integers(1024, m.MAX_FRAME_BYTES)),
    st.builds(
        m.SignRequest,
        ids,
        texts,
        texts,
        ids,
        st.binary(max_size=200),
        int64,
        st.one_of(st.none(), st.just(b""), b32),
    ),
    st.builds(m.Commitment, ids, b32, elements, elements),
    st.builds(m.Decline, ids, st.sampled_from(sorted(m.DECLINE_REASONS)), st.text(max_size=0)),
    st.builds(
        m.SignRound2,
        ids,
        st.lists(entries, min_size=2, max_size=6, unique_by=lambda e: e.identifier).map(tuple),
        b32,
    ),
    st.builds(m.SignatureShare, ids, b32, st.builds(m.ApprovalField, ids, b64, int64)),
    st.builds(m.Cancel, ids),
    st.builds(m.Error, st.sampled_from(sorted(m.ERROR_CODES)), texts, st.one_of(st.none(), ids)),
    st.builds(m.Ping, int64),
    st.builds(m.Pong, int64),
)


@given(MESSAGES)
def test_round_trip(message: m.Message) -> None:
    text = m.encode_message(message)
    assert text.isascii()
    assert json.loads(text)["v"] == 1
    assert m.parse_message(text) == message
    assert m.parse_message(text.encode()) == message


def test_every_type_has_a_parser_a_sender_and_fields() -> None:
    assert set(m.TYPES) == set(m.SENDER)
    for name, cls in m.TYPES.items():
        assert m._NAMES[cls] == name


def test_optional_fields_left_out_and_null_is_absent() -> None:
    req = m.SignRequest("r", "a", "s", "FROST-ED25519-SHA512-v1", b"", 1)
    assert "taproot_merkle_root" not in m.message_to_json(req)
    obj = m.message_to_json(req) | {"taproot_merkle_root": None}
    assert m.parse_message(json.dumps(obj)) == req
    empty = m.SignRequest("r", "a", "s", "FROST-ED25519-SHA512-v1", b"", 1, b"")
    assert m.message_to_json(empty)["taproot_merkle_root"] == ""
    assert m.parse_message(m.encode_message(empty)).taproot_merkle_root == b""  # type: ignore[union-attr]


def base(kind: str) -> dict[str, Any]:
    """A valid object of each type, to break one field at a time."""
    entry = {"identifier": "01" * 32, "hiding": "02" * 32, "binding": "03" * 32}
    entry2 = {"identifier": "04" * 32, "hiding": "02" * 33, "binding": "03" * 33}
    package = {
        "identifier": "01" * 32,
        "commitment": ["02" * 32, "03" * 32],
        "proof_of_knowledge": "04" * 64,
        "encryption_key": "05" * 32,
        "key_id": "enclave",
        "signature": "06" * 64,
    }
    share = {"sender": "01" * 32, "recipient": "02" * 32, "ciphertext": "07" * 72}
    objects: dict[str, dict[str, Any]] = {
        "hello": {"participant_id": "ops-1", "key_id": "k"},
        "challenge": {"challenge": "00" * 32, "gateway_id": "gw", "expires_at_unix_ms": 5},
        "auth": {"signature": "00" * 64},
        "welcome": {"participant_id": "p", "max_in_flight": 1, "max_frame_bytes": 4096},
        "sign_request": {
            "request_id": "r",
            "account_id": "a",
            "session_id": "s",
            "ciphersuite": "FROST-ED25519-SHA512-v1",
            "message": "",
            "deadline_unix_ms": 1,
        },
        "commitment": {"request_id": "r", **entry},
        "decline": {"request_id": "r", "reason": "policy"},
        "sign_round2": {
            "request_id": "r",
            "commitments": [entry, entry2],
            "enclave_identifier": "01" * 32,
        },
        "signature_share": {
            "request_id": "r",
            "signature_share": "00" * 32,
            "approval": {"key_id": "k", "signature": "00" * 64, "expires_at_unix_ms": 1},
        },
        "cancel": {"request_id": "r"},
        "error": {"code": "bad_message"},
        "ping": {"seq": 0},
        "pong": {"seq": 0},
        "dkg_round1": {
            "request_id": "r",
            "dkg_id": "dkg-1",
            "account_id": "a",
            "ciphersuite": "FROST-ED25519-SHA512-v1",
            "min_signers": 2,
            "max_signers": 2,
            "policy": "default",
            "participants": [
                {"identifier": "01" * 32, "key_id": "enclave"},
                {"identifier": "02" * 32, "key_id": "ops-1"},
            ],
            "enclave_identifier": "01" * 32,
            "identifier": "02" * 32,
            "deadline_unix_ms": 1,
        },
        "dkg_package": {"request_id": "r", "package": package},
        "dkg_round2": {
            "request_id": "r",
            "packages": [package, package | {"identifier": "02" * 32}],
        },
        "dkg_shares": {"request_id": "r", "shares": [share]},
        "dkg_round3": {"request_id": "r", "shares": [share]},
        "dkg_done": {
            "request_id": "r",
            "identifier": "02" * 32,
            "verifying_share": "05" * 32,
            "group_public_key": "06" * 32,
            "verifying_shares": [
                {"identifier": "01" * 32, "verifying_share": "07" * 33},
                {"identifier": "02" * 32, "verifying_share": "05" * 32},
            ],
        },
    }
    return objects[kind] | {"type": kind, "v": m.version_of(kind)}


@pytest.mark.parametrize("kind", sorted(m.TYPES))
def test_base_objects_parse(kind: str) -> None:
    assert m.type_name(m.parse_message(json.dumps(base(kind)), max_version=2)) == kind


def refused(obj: Any, words: str = "", code: int = m.CLOSE_PROTOCOL_ERROR) -> None:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    with pytest.raises(m.MessageError, match=words) as info:
        m.parse_message(text)
    assert info.value.close_code == code
    assert "\n" not in str(info.value)


def accepted(obj: dict[str, Any]) -> m.Message:
    return m.parse_message(json.dumps(obj))


# (type, field, largest accepted value, smallest refused value)
BOUNDS: list[tuple[str, str, Any, Any]] = [
    ("hello", "participant_id", "a" * 64, "a" * 65),
    ("hello", "key_id", "k", ""),
    ("hello", "key_id", "k", "-k"),
    ("hello", "key_id", "k", "k/1"),
    ("sign_request", "account_id", "é" * 127, "é" * 128),
    ("sign_request", "account_id", "a", ""),
    ("sign_request", "account_id", "a b", "a\nb"),
    ("sign_request", "session_id", "s" * 128, "s" * 129),
    ("sign_request", "message", "00" * m.MAX_MESSAGE_BYTES, "00" * (m.MAX_MESSAGE_BYTES + 1)),
    ("sign_request", "message", "ab", "abc"),
    ("sign_request", "message", "AB", "zz"),
    ("sign_request", "deadline_unix_ms", m.INT64_MAX, m.INT64_MAX + 1),
    ("sign_request", "deadline_unix_ms", 0, -1),
    ("sign_request", "deadline_unix_ms", 0, True),
    ("sign_request", "deadline_unix_ms", 0, 1.5),
    ("sign_request", "taproot_merkle_root", "00" * 32, "00" * 31),
    ("sign_request", "ciphersuite", "FROST-secp256k1-SHA256-v1", "FROST ed"),
    ("challenge", "challenge", "00" * 32, "00" * 33),
    ("auth", "signature", "00" * 64, "00" * 63),
    ("welcome", "max_in_flight", 65535, 0),
    ("welcome", "max_frame_bytes", m.MAX_FRAME_BYTES, m.MAX_FRAME_BYTES + 1),
    ("commitment", "hiding", "00" * 33, "00" * 34),
    ("commitment", "binding", "00" * 32, "00" * 31),
    ("commitment", "identifier", "00" * 32, "00" * 33),
    ("decline", "reason", "busy", "because"),
    ("decline", "detail", "x" * m.MAX_DETAIL_CHARS, "x" * (m.MAX_DETAIL_CHARS + 1)),
    ("signature_share", "signature_share", "00" * 32, "00" * 33),
    ("sign_round2", "enclave_identifier", "01" * 32, "01" * 31),
    ("error", "code", "internal", "oops"),
    ("ping", "seq", 0, -1),
]


@pytest.mark.parametrize(("kind", "name", "good", "bad"), BOUNDS)
def test_bounds(kind: str, name: str, good: Any, bad: Any) -> None:
    accepted(base(kind) | {name: good})
    refused(base(kind) | {name: bad}, f"{kind}.{name}")


def test_commitment_list_bounds() -> None:
    def entry(i: int) -> dict[str, str]:
        return {
            "identifier": i.to_bytes(32, "big").hex(),
            "hiding": "02" * 33,
            "binding": "03" * 33,
        }

    obj = base("sign_round2")
    accepted(obj | {"commitments": [entry(i) for i in range(m.MAX_COMMITMENTS)]})
    refused(obj | {"commitments": [entry(i) for i in range(m.MAX_COMMITMENTS + 1)]}, "2..255")
    refused(obj | {"commitments": [entry(1)]}, "2..255")
    refused(obj | {"commitments": [entry(1), entry(1)]}, "one commitment per identifier")
    refused(obj | {"commitments": [entry(1), {"identifier": "00"}]}, r"commitments\[1\]")
    bad = entry(2) | {"hiding": "zz" * 32}
    refused(obj | {"commitments": [entry(1), bad]}, r"commitments\[1\]\.hiding")


def test_approval_object() -> None:
    obj = base("signature_share")
    refused(obj | {"approval": {"key_id": "k"}}, "signature_share.approval")
    bad = obj["approval"] | {"key_id": "no way"}
    refused(obj | {"approval": bad}, r"signature_share\.approval\.key_id")
    bad = obj["approval"] | {"expires_at_unix_ms": -5}
    refused(obj | {"approval": bad}, r"approval\.expires_at_unix_ms")


def test_envelope() -> None:
    refused("[1, 2]", "one JSON object")
    refused('{"v": 1}', '"type"')
    refused('{"type": "ping", "seq": 1}', '"v"')
    refused('{"type": "ping", "v": "1", "seq": 1}', '"v"')
    refused(base("ping") | {"v": 2}, "version 2", code=m.CLOSE_UNSUPPORTED_VERSION)
    refused(base("ping") | {"type": "dkg_round1"}, "reserved for DKG")
    refused(base("ping") | {"type": "pingg"}, "unknown message type")
    refused(base("ping") | {"extra": 1}, "unknown field")
    refused({k: v for k, v in base("hello").items() if k != "key_id"}, "lacks key_id")
    refused('{"type": "ping", "v": 1, "seq": NaN}', "not valid JSON")
    refused("{" * 100_000, "not valid JSON")
    refused(b"\xff\xfe".decode("latin-1"), "not valid JSON")
    big = json.dumps(base("sign_request") | {"message": "00" * (m.MAX_FRAME_BYTES // 2)})
    refused(big, "limit", code=m.CLOSE_TOO_BIG)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_garbage_is_refused_cleanly(data: str | bytes) -> None:
    code = None
    try:
        m.parse_message(data)
    except m.MessageError as exc:
        code = exc.close_code
    assert code in (None, m.CLOSE_PROTOCOL_ERROR, m.CLOSE_UNSUPPORTED_VERSION)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.sampled_from(sorted(m.TYPES)), st.text(max_size=20), json_values)
def test_one_field_replaced_by_anything(kind: str, name: str, value: Any) -> None:
    """Any field of a valid object set to any JSON value: a message, or MessageError."""
    obj = base(kind)
    name = name if name not in ("type", "v") else "x"
    obj[name] = value
    with contextlib.suppress(m.MessageError):
        m.parse_message(json.dumps(obj), max_version=2)


def test_auth_payload_layout() -> None:
    payload = m.auth_payload(bytes(32), "gw", "ops-1", "k")
    assert payload == (
        b"trio-sign/participant-auth/v1\x00" + bytes(32) + b"\x00\x02gw\x00\x05ops-1\x00\x01k"
    )
    with pytest.raises(ValueError, match="32 bytes"):
        m.auth_payload(bytes(31), "gw", "p", "k")


def test_reprs_hide_the_message_and_signatures() -> None:
    req = m.SignRequest("r", "a", "s", "FROST-ED25519-SHA512-v1", b"secret-ish payload", 1)
    assert "secret-ish" not in repr(req)
    assert "00" * 64 not in repr(m.Auth(bytes(64)))
