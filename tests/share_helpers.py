"""Test key-share records: random canonical scalars, their points, and ShareRecords."""

from __future__ import annotations

import secrets
from typing import Any

from trio_sign.crypto import _sodium
from trio_sign.shares import ShareRecord

#: A point of order 8 (small-order; never valid in a share file).
ORDER_8_HEX = "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"
ORDER_8 = bytes.fromhex(ORDER_8_HEX)


def random_scalar() -> bytearray:
    return bytearray((secrets.randbelow(_sodium.L - 1) + 1).to_bytes(32, "little"))


def point_of(s: bytes | bytearray) -> bytes:
    out = bytearray(32)
    assert _sodium.base_mult(out, s)
    return bytes(out)


GROUP_KEY = point_of(random_scalar())


def make_record(account_id: str = "acct-1", **over: Any) -> ShareRecord:
    """A valid record (consistent signing and verifying shares); ``over`` replaces fields."""
    share = random_scalar()
    fields: dict[str, Any] = {
        "account_id": account_id,
        "identifier": (secrets.randbelow(5) + 1).to_bytes(32, "little"),
        "signing_share": share,
        "verifying_share": point_of(share),
        "group_public_key": GROUP_KEY,
        "min_signers": 2,
        "max_signers": 3,
    }
    fields.update(over)
    return ShareRecord(**fields)
