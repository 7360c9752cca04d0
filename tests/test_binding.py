"""The attestation binding map (DESIGN §4): canonical CBOR, one encoding per binding."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sign.nitro._binding import (
    NO_DELTAS,
    Binding,
    BindingError,
    decode_binding,
    encode_binding,
)

digests = st.binary(min_size=32, max_size=32)


@given(digests, digests, digests)
def test_round_trip_and_canonical_order(shares: bytes, deltas: bytes, config: bytes) -> None:
    binding = Binding(shares, deltas, config)
    data = encode_binding(binding)
    assert decode_binding(data) == binding
    # keys sorted by their encoded bytes: config, deltas, shares (all six letters long)
    assert data.index(b"config") < data.index(b"deltas") < data.index(b"shares")
    assert data[0] == 0xA3  # a map of three


def test_the_exact_bytes() -> None:
    data = encode_binding(Binding(b"\x01" * 32, NO_DELTAS, b"\x02" * 32))
    expected = (
        b"\xa3"
        + b"\x66config\x58\x20"
        + b"\x02" * 32
        + b"\x66deltas\x58\x20"
        + b"\x00" * 32
        + b"\x66shares\x58\x20"
        + b"\x01" * 32
    )
    assert data == expected


@pytest.mark.parametrize(
    "user_data",
    [
        None,
        b"",
        b"\x01" * 32,  # the version 1 binding: the raw fingerprint
        cbor2.dumps({"shares": b"\x01" * 32, "deltas": NO_DELTAS}),
        cbor2.dumps({"shares": b"\x01" * 32, "deltas": NO_DELTAS, "config": b"\x02" * 31}),
        cbor2.dumps({"shares": b"\x01" * 32, "deltas": NO_DELTAS, "config": "x" * 32}),
        cbor2.dumps(
            {"shares": b"\x01" * 32, "deltas": NO_DELTAS, "config": b"\x02" * 32, "extra": 1}
        ),
        # the right map, not in canonical key order
        cbor2.dumps({"shares": b"\x01" * 32, "deltas": NO_DELTAS, "config": b"\x02" * 32}),
        b"\xff" * 40,
        cbor2.dumps({1: b"\x01" * 32, "deltas": NO_DELTAS, "config": b"\x02" * 32}),
    ],
)
def test_anything_else_is_refused(user_data: bytes | None) -> None:
    with pytest.raises(BindingError):
        decode_binding(user_data)
