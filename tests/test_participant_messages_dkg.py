"""The version-2 DKG messages of the participant contract (docs/participants.md): round trips
with Hypothesis, ``"v": 2``, refused on a version-1 connection, bounds."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sign.participant import _messages as m

from .test_participant_messages import base, ids, int64, texts

b32 = st.binary(min_size=32, max_size=32)
elements = st.one_of(st.binary(min_size=32, max_size=32), st.binary(min_size=33, max_size=33))
members = st.builds(m.DkgMember, b32, ids)
packages = st.builds(
    m.DkgPackageField,
    b32,
    st.lists(elements, min_size=1, max_size=4).map(tuple),
    st.one_of(st.binary(min_size=64, max_size=64), st.binary(min_size=65, max_size=65)),
    b32,
    ids,
    st.binary(min_size=64, max_size=64),
)
shares = st.builds(m.DkgShareField, b32, b32, st.binary(min_size=1, max_size=256))
vshares = st.builds(m.DkgVerifyingShareField, b32, elements)

DKG_MESSAGES = st.one_of(
    st.builds(
        m.DkgRound1,
        ids,
        texts,
        texts,
        ids,
        st.integers(2, m.MAX_DKG_SIGNERS),
        st.integers(2, m.MAX_DKG_SIGNERS),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64),
        st.lists(members, min_size=2, max_size=5, unique_by=lambda x: x.identifier).map(tuple),
        b32,
        b32,
        int64,
    ),
    st.builds(m.DkgPackage, ids, packages),
    st.builds(
        m.DkgRound2,
        ids,
        st.lists(packages, min_size=2, max_size=4, unique_by=lambda x: x.identifier).map(tuple),
    ),
    st.builds(m.DkgShares, ids, st.lists(shares, min_size=1, max_size=4).map(tuple)),
    st.builds(m.DkgRound3, ids, st.lists(shares, min_size=1, max_size=4).map(tuple)),
    st.builds(
        m.DkgDone,
        ids,
        b32,
        elements,
        elements,
        st.lists(vshares, min_size=2, max_size=4).map(tuple),
    ),
)


@given(DKG_MESSAGES)
def test_round_trip_version_2(message: m.Message) -> None:
    text = m.encode_message(message)
    assert text.isascii()
    assert json.loads(text)["v"] == 2
    assert m.parse_message(text, max_version=2) == message
    # a version-1 connection refuses them as it always did (1002, "reserved")
    with pytest.raises(m.MessageError, match="reserved for DKG") as info:
        m.parse_message(text)
    assert info.value.close_code == m.CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize(
    "kind", ["dkg_round1", "dkg_package", "dkg_round2", "dkg_shares", "dkg_round3", "dkg_done"]
)
def test_dkg_messages_are_version_2_and_v1_messages_stay_1(kind: str) -> None:
    with pytest.raises(m.MessageError) as info:
        m.parse_message(json.dumps(base(kind) | {"v": 1}), max_version=2)
    assert info.value.close_code == m.CLOSE_UNSUPPORTED_VERSION
    with pytest.raises(m.MessageError) as info:
        m.parse_message(json.dumps(base("ping") | {"v": 2}), max_version=2)
    assert info.value.close_code == m.CLOSE_UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    ("kind", "change", "field"),
    [
        (
            "dkg_round1",
            {"participants": [{"identifier": "01" * 32, "key_id": "e"}]},
            "participants",
        ),
        ("dkg_round1", {"min_signers": 1}, "min_signers"),
        ("dkg_round1", {"max_signers": m.MAX_DKG_SIGNERS + 1}, "max_signers"),
        ("dkg_round1", {"policy": ""}, "policy"),
        ("dkg_round1", {"identifier": "01" * 31}, "identifier"),
        ("dkg_package", {"package": {"identifier": "01" * 32}}, "package"),
        ("dkg_round2", {"packages": []}, "packages"),
        ("dkg_shares", {"shares": []}, "shares"),
        ("dkg_round3", {"shares": [{"sender": "01" * 32, "recipient": "02" * 32}]}, "shares[0]"),
        (
            "dkg_round3",
            {"shares": [{"sender": "01" * 32, "recipient": "02" * 32, "ciphertext": "00" * 257}]},
            "ciphertext",
        ),
        ("dkg_done", {"verifying_share": "05" * 31}, "verifying_share"),
        ("dkg_done", {"verifying_shares": []}, "verifying_shares"),
    ],
)
def test_dkg_bounds_name_the_field(kind: str, change: dict[str, object], field: str) -> None:
    with pytest.raises(m.MessageError, match=field.replace("[", r"\[").replace("]", r"\]")):
        m.parse_message(json.dumps(base(kind) | change), max_version=2)


def test_duplicate_identifiers_refused() -> None:
    obj = base("dkg_round2")
    obj["packages"] = [obj["packages"][0], obj["packages"][0]]
    with pytest.raises(m.MessageError, match="one package per identifier"):
        m.parse_message(json.dumps(obj), max_version=2)
