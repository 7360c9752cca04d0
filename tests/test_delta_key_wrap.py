"""The delta bundles' data-key wrapping under the identity key (docs/key-lifecycle.md §2)."""

from __future__ import annotations

import io

import pytest

from trio_sign import KeyWrapError
from trio_sign.crypto import _kdf, _sodium
from trio_sign.enclave._identity import DELTA_KEK_INFO, IdentityKey
from trio_sign.shares import BundleTrust, ShareStore, encode_bundle
from trio_sign.shares._signature import CeremonyKey

from .enclave_helpers import make_accounts

CONTEXT = {"format": "trio-sign/sealed-key-shares", "purpose": "delta"}


def _identity(seed_byte: int) -> IdentityKey:
    return IdentityKey(CeremonyKey.from_seed(bytes([seed_byte]) * 32))


def test_the_kek_is_hkdf_of_the_seed_and_repr_hides_it() -> None:
    with _identity(7) as ident, ident.delta_key_wrap() as wrap:
        expected = bytearray(32)
        _kdf.hkdf_sha256_into(expected, bytes([7]) * 32, info=DELTA_KEK_INFO)
        assert _sodium.ct_equal(wrap._kek, expected)
        assert wrap.key_id == ident.public_key.hex()
        assert wrap.provider == "enclave-identity"
        assert expected.hex() not in repr(wrap)
        assert "kek=<secret>" in repr(wrap)


def test_round_trip_across_boots_and_refusals() -> None:
    with _identity(1) as first_boot, first_boot.delta_key_wrap() as wrap:
        key, blob = wrap.generate_data_key(CONTEXT)
    # A later boot derives the same KEK from the same identity key.
    with _identity(1) as second_boot, second_boot.delta_key_wrap() as wrap:
        assert wrap.decrypt_data_key(blob, CONTEXT) == key
        with pytest.raises(KeyWrapError, match="another encryption context"):
            wrap.decrypt_data_key(blob, {**CONTEXT, "purpose": "other"})
        tampered = bytearray(blob)
        tampered[-1] ^= 1
        with pytest.raises(KeyWrapError, match="blob was changed"):
            wrap.decrypt_data_key(bytes(tampered), CONTEXT)
        with pytest.raises(KeyWrapError, match="not an enclave-identity blob"):
            wrap.decrypt_data_key(blob[:-1], CONTEXT)
    with (
        _identity(2) as other,
        other.delta_key_wrap() as wrap,
        pytest.raises(KeyWrapError, match="another identity key"),
    ):
        wrap.decrypt_data_key(blob, CONTEXT)
    wrap.close()
    assert wrap._kek == bytearray(32)
    with pytest.raises(KeyWrapError, match="closed"):
        wrap.generate_data_key(CONTEXT)


def test_a_delta_bundle_sealed_and_signed_by_the_identity_key_loads() -> None:
    source, accounts = make_accounts(3)
    source.close()
    records = [a.service for a in accounts.values()]
    with _identity(3) as ident, ident.delta_key_wrap() as wrap:
        bundle = encode_bundle(records, wrap, signer=ident, kind="delta")
        store = ShareStore.load_sealed(
            io.BytesIO(bundle),
            wrap,
            trust=BundleTrust.pinned([ident.public_key], kind="delta"),
        )
        with store:
            assert len(store) == 3
            assert store.signer == ident.public_key
