"""Delta bundles and their chain (docs/key-lifecycle.md §1, §2): the header's delta fields,
sealing, the chain checks, and applying a delta to a ShareStore all or nothing."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_sign import KeyWrapError, ShareFileError
from trio_sign.enclave._identity import IdentityKey
from trio_sign.shares import BundleTrust, DevKeyFile, ShareRecord, ShareStore, encode_bundle
from trio_sign.shares._deltas import (
    NO_DELTAS_HEX,
    DeltaChain,
    SealedDelta,
    apply_delta,
    load_delta,
    seal_delta,
)
from trio_sign.shares._sealed import check_delta_header, check_sealed_header
from trio_sign.shares._signature import CeremonyKey

from .share_helpers import make_record, point_of, random_scalar


def _identity(seed: int) -> IdentityKey:
    return IdentityKey(CeremonyKey.from_seed(bytes([seed]) * 32))


@pytest.fixture
def ident() -> Iterator[IdentityKey]:
    with _identity(9) as key:
        yield key


@pytest.fixture
def base(tmp_path: Path) -> bytes:
    key = DevKeyFile.create(tmp_path / "dev.key")
    return encode_bundle([make_record(f"base-{i}") for i in range(20)], key)


@pytest.fixture
def base_key(tmp_path: Path, base: bytes) -> DevKeyFile:
    return DevKeyFile.load(tmp_path / "dev.key")


def _load(base: bytes, key: DevKeyFile) -> ShareStore:
    return ShareStore.load_sealed(io.BytesIO(base), key)


def _seal(
    ident: IdentityKey,
    chain: DeltaChain,
    records: list[ShareRecord],
    *,
    operation: str = "create",
    dkg_id: str = "dkg-1",
    sequence: int | None = None,
    previous: str | None = None,
) -> SealedDelta:
    with ident.delta_key_wrap() as wrap:
        return seal_delta(
            records,
            sequence=chain.next_sequence if sequence is None else sequence,
            previous=chain.next_previous if previous is None else previous,
            operation=operation,
            dkg_id=dkg_id,
            provider=wrap,
            signer=ident,
        )


def _apply(ident: IdentityKey, store: ShareStore, chain: DeltaChain, data: bytes) -> object:
    with ident.delta_key_wrap() as wrap:
        return apply_delta(
            store,
            chain,
            data,
            provider=wrap,
            trust=BundleTrust.pinned([ident.public_key], kind="delta"),
        )


def _snapshot(store: ShareStore) -> dict[str, tuple[object, ...]]:
    """Everything a store holds per account (the shares as bytes: test only)."""
    out: dict[str, tuple[object, ...]] = {}
    for account_id in list(store._index):
        s = store[account_id]
        out[account_id] = (
            s.identifier,
            bytes(s.signing_share),
            s.verifying_share,
            s.group_public_key,
            s.min_signers,
            s.max_signers,
            s.policy,
            s.ciphersuite,
        )
    return out


# -- the header --------------------------------------------------------------------------------


def _header(**over: object) -> dict[str, object]:
    header: dict[str, object] = {
        "format": "trio-sign/sealed-key-shares",
        "kind": "delta",
        "version": 1,
        "ciphersuite": "FROST-ED25519-SHA512-v1",
        "record_format": "binary-v1",
        "key_provider": "enclave-identity",
        "kms_key_id": "ab" * 32,
        "encrypted_data_key": "AAAA",
        "encryption_context": {"format": "trio-sign/sealed-key-shares"},
        "chunk_size": 65536,
        "accounts": 1,
        "chunks": 1,
        "sequence": 1,
        "previous": "cd" * 32,
        "operation": "create",
        "dkg_id": "dkg-1",
    }
    header.update(over)
    return {k: v for k, v in header.items() if v is not None}


def test_a_delta_header_carries_its_chain_fields_and_a_base_refuses_them() -> None:
    check_sealed_header(_header())
    check_delta_header(_header())
    for name in ("sequence", "previous", "operation", "dkg_id"):
        header = _header(**{name: None})
        check_sealed_header(header)  # older tools' deltas still parse ...
        with pytest.raises(ShareFileError, match=name) as info:
            check_delta_header(header)  # ... but no enclave chains one
        assert info.value.reason == "bad_header"
        base = _header(kind="base", **{n: None for n in ("sequence", "previous", "operation")})
        base.pop("dkg_id")
        base[name] = _header()[name]
        with pytest.raises(ShareFileError, match="only allowed in a delta") as info:
            check_sealed_header(base)
        assert info.value.reason == "bad_header"
    for bad in (
        {"sequence": 0},
        {"sequence": True},
        {"sequence": 100_000_000},
        {"previous": "CD" * 32},
        {"previous": "cd" * 31},
        {"operation": "delete"},
        {"dkg_id": 7},
        {"dkg_id": "x" * 129},
        {"dkg_id": ""},
    ):
        with pytest.raises(ShareFileError) as info:
            check_sealed_header(_header(**bad))
        assert info.value.reason == "bad_header", bad
    check_sealed_header(_header(operation="refresh", dkg_id=""))


def test_seal_delta_writes_the_fields_signs_and_refuses_bad_input(ident: IdentityKey) -> None:
    chain = DeltaChain("ee" * 32)
    sealed = _seal(ident, chain, [make_record("new-1"), make_record("new-2")])
    assert (sealed.sequence, sealed.previous, sealed.operation) == (1, "ee" * 32, "create")
    assert sealed.accounts == 2
    n = struct.unpack(">I", sealed.data[8:12])[0]
    header = json.loads(sealed.data[12 : 12 + n])
    assert header["kind"] == "delta"
    assert header["key_provider"] == "enclave-identity"
    assert header["kms_key_id"] == ident.public_key.hex()
    assert (header["sequence"], header["previous"], header["dkg_id"]) == (1, "ee" * 32, "dkg-1")
    assert "signing_share" not in repr(sealed)
    assert sealed.fingerprint in repr(sealed)
    with pytest.raises(ValueError, match="at least one"):
        _seal(ident, chain, [])
    with pytest.raises(ValueError, match="dkg_id"):
        _seal(ident, chain, [make_record("x")], dkg_id="")
    with pytest.raises(ValueError, match="operation"):
        _seal(ident, chain, [make_record("x")], operation="merge")
    with pytest.raises(ShareFileError) as info:
        _seal(ident, chain, [make_record("x"), make_record("x")])
    assert info.value.reason == "duplicate_account"
    bad = make_record("x")
    bad.verifying_share = make_record("y").verifying_share
    with pytest.raises(ShareFileError) as info:
        _seal(ident, chain, [bad])
    assert info.value.reason == "share_mismatch"


# -- the chain ---------------------------------------------------------------------------------


def test_deltas_apply_in_order_and_the_head_moves(
    ident: IdentityKey, base: bytes, base_key: DevKeyFile
) -> None:
    with _load(base, base_key) as store:
        assert store.fingerprint is not None
        chain = DeltaChain(store.fingerprint)
        assert chain.head == NO_DELTAS_HEX
        assert chain.next_previous == store.fingerprint
        first = _seal(ident, chain, [make_record("new-1")], dkg_id="dkg-a")
        _apply(ident, store, chain, first.data)
        second = _seal(ident, chain, [make_record("new-2", policy="hot")], dkg_id="dkg-b")
        assert second.previous == first.fingerprint
        _apply(ident, store, chain, second.data)
        assert (chain.count, chain.head) == (2, second.fingerprint)
        assert len(store) == 22
        assert store["new-2"].policy == "hot"
        assert chain.find_dkg("dkg-a") == (1, first.fingerprint)
        assert chain.find_dkg("dkg-b") == (2, second.fingerprint)
        assert chain.find_dkg("dkg-c") is None
        assert chain.dkg_accounts("dkg-b") == ("new-2",)
        assert chain.dkg_accounts("dkg-c") == ()


def _refused(
    ident: IdentityKey, store: ShareStore, chain: DeltaChain, data: bytes, reason: str
) -> None:
    before = (_snapshot(store), chain.count, chain.head)
    with pytest.raises((ShareFileError, KeyWrapError)) as info:
        _apply(ident, store, chain, data)
    assert getattr(info.value, "reason", "key_unwrap") == reason
    assert (_snapshot(store), chain.count, chain.head) == before  # nothing applied


def test_missing_reordered_duplicated_foreign_and_altered_deltas_are_refused(
    ident: IdentityKey, base: bytes, base_key: DevKeyFile, tmp_path: Path
) -> None:
    with _load(base, base_key) as store:
        assert store.fingerprint is not None
        chain = DeltaChain(store.fingerprint)
        # What a replica makes on the same base: delta 1, then delta 2 on it.
        other = DeltaChain(store.fingerprint)
        d1 = _seal(ident, other, [make_record("n1")])
        other.advance({**_fields(d1)}, d1.fingerprint)
        d2 = _seal(ident, other, [make_record("n2")])
        # missing (2 before 1) = reordered
        _refused(ident, store, chain, d2.data, "delta_chain")
        _apply(ident, store, chain, d1.data)
        # duplicated
        _refused(ident, store, chain, d1.data, "delta_chain")
        # foreign: made on another base
        foreign = _seal(ident, DeltaChain("ab" * 32), [make_record("n3")], sequence=2)
        _refused(ident, store, chain, foreign.data, "delta_chain")
        # a delta that claims the right place but was made on another head
        forked = _seal(ident, chain, [make_record("n4")], previous="ab" * 32)
        _refused(ident, store, chain, forked.data, "delta_chain")
        # altered header: its sequence changed in place (same length) fails chunk 0
        altered = bytearray(d2.data)
        at = altered.index(b'"sequence":2')
        altered[at : at + 12] = b'"sequence":3'
        chain_copy = DeltaChain(store.fingerprint)
        chain_copy.count, chain_copy._head = chain.count, chain._head
        with pytest.raises(ShareFileError) as info:
            _apply(ident, store, chain, bytes(altered))
        assert info.value.reason == "delta_chain"  # sequence 3 is out of order
        altered[at : at + 12] = b'"sequence":2'
        altered[altered.index(b'"dkg_id":"dkg-1"') + 10] ^= 1
        _refused(ident, store, chain, bytes(altered), "tampered")
        _apply(ident, store, chain, d2.data)
        assert chain.count == 2
        assert sorted(a for a in store._index if a.startswith("n")) == ["n1", "n2"]


def _fields(sealed: SealedDelta) -> dict[str, object]:
    return {
        "kind": "delta",
        "sequence": sealed.sequence,
        "previous": sealed.previous,
        "operation": sealed.operation,
        "dkg_id": sealed.dkg_id,
    }


def test_a_delta_signed_by_another_key_or_unsigned_is_refused(
    ident: IdentityKey, base: bytes, base_key: DevKeyFile
) -> None:
    with _load(base, base_key) as store, _identity(10) as stranger:
        assert store.fingerprint is not None
        chain = DeltaChain(store.fingerprint)
        # Sealed under our identity's wrap (so it opens) but signed by another key.
        with ident.delta_key_wrap() as wrap:
            by_stranger = seal_delta(
                [make_record("n1")],
                sequence=1,
                previous=chain.next_previous,
                operation="create",
                dkg_id="d",
                provider=wrap,
                signer=stranger,
            )
        _refused(ident, store, chain, by_stranger.data, "bundle_signer_unknown")
        unsigned = by_stranger.data[:-104]
        _refused(ident, store, chain, unsigned, "bundle_unsigned")
        # Made entirely by another identity: its data key does not open here.
        foreign = _seal(stranger, chain, [make_record("n1")])
        _refused(ident, store, chain, foreign.data, "key_unwrap")
        # A base bundle where a delta is loaded
        _refused(ident, store, chain, base, "bundle_kind")


def test_a_create_for_an_existing_account_applies_nothing(
    ident: IdentityKey, base: bytes, base_key: DevKeyFile
) -> None:
    with _load(base, base_key) as store:
        assert store.fingerprint is not None
        chain = DeltaChain(store.fingerprint)
        delta = _seal(ident, chain, [make_record("fresh"), make_record("base-3")])
        _refused(ident, store, chain, delta.data, "delta_account_exists")
        assert "fresh" not in store


def test_refresh_replaces_the_share_and_zeroes_the_old_one(
    ident: IdentityKey, base: bytes, base_key: DevKeyFile
) -> None:
    with _load(base, base_key) as store:
        assert store.fingerprint is not None
        chain = DeltaChain(store.fingerprint)
        old = store["base-5"]
        old_share = bytes(old.signing_share)
        view = old.signing_share  # what an earlier get() handed out
        new = make_record(
            "base-5", group_public_key=old.group_public_key, identifier=old.identifier
        )
        refresh = _seal(ident, chain, [new], operation="refresh", dkg_id="")
        _apply(ident, store, chain, refresh.data)
        now = store["base-5"]
        assert bytes(now.signing_share) == bytes(new.signing_share)
        assert now.verifying_share == new.verifying_share
        assert bytes(view) == bytes(new.signing_share)  # the old bytes are gone
        assert old_share not in bytes(store._arena)
        assert store.is_verified("base-5")
        # A refresh must keep the group key and the thresholds, and name an existing account.
        for bad, why in (
            (make_record("base-6", group_public_key=point_of(random_scalar())), "group key"),
            (make_record("base-6", group_public_key=old.group_public_key, min_signers=3), "min"),
            (make_record("nobody", group_public_key=old.group_public_key), "does not exist"),
        ):
            delta = _seal(ident, chain, [bad], operation="repair", dkg_id="")
            with pytest.raises(ShareFileError, match=why) as info:
                _apply(ident, store, chain, delta.data)
            assert info.value.reason == "delta_account_mismatch"
        assert chain.count == 1


def test_load_delta_leaves_the_store_alone_and_lazy_equals_full(
    ident: IdentityKey, base: bytes, base_key: DevKeyFile
) -> None:
    records = [make_record(f"n{i}", policy="p" if i % 2 else "default") for i in range(30)]
    with _load(base, base_key) as lazy, _load(base, base_key) as full:
        assert lazy.fingerprint is not None
        chains = DeltaChain(lazy.fingerprint), DeltaChain(lazy.fingerprint)
        delta = _seal(ident, chains[0], records)
        with ident.delta_key_wrap() as wrap:
            trust = BundleTrust.pinned([ident.public_key], kind="delta")
            loaded = load_delta(delta.data, provider=wrap, trust=trust, chain=chains[0])
            with loaded.store:
                assert len(loaded.store) == 30
                assert (loaded.sequence, loaded.operation) == (1, "create")
            assert len(lazy) == 20
            assert chains[0].count == 0
            apply_delta(lazy, chains[0], delta.data, provider=wrap, trust=trust, verify="lazy")
            apply_delta(full, chains[1], delta.data, provider=wrap, trust=trust)
        assert not lazy.is_verified("n3")
        assert full.is_verified("n3")
        assert _snapshot(lazy) == _snapshot(full)
        assert lazy.policies() == {"default", "p"}


def test_deltas_of_every_suite_land_in_their_lanes(ident: IdentityKey, tmp_path: Path) -> None:
    """A mixed base (Ed25519 and both secp256k1 suites) takes a mixed create (binary-v3) into
    both lanes, then a secp256k1 refresh over its wide slot; boot = live in every suite."""
    from trio_sign.crypto import SCHEMES, SECP256K1_TR

    from .test_share_ciphersuites import dealt

    key = DevKeyFile.create(tmp_path / "mixed.key")
    base = encode_bundle([dealt(SCHEMES[i % 3], f"base-{i}") for i in range(6)], key)
    with ShareStore.load_sealed(io.BytesIO(base), key) as store:
        assert store.fingerprint is not None
        chain = DeltaChain(store.fingerprint)
        new = [
            dealt(SCHEMES[i % 3], f"new-{i}", policy="p" if i == 2 else "default") for i in range(5)
        ]
        create = _seal(ident, chain, new)
        _apply(ident, store, chain, create.data)
        assert store.ciphersuites() == {s.name: 4 if i < 2 else 3 for i, s in enumerate(SCHEMES)}
        for rec in new:
            got = store[rec.account_id]
            assert got.ciphersuite == rec.ciphersuite
            assert bytes(got.signing_share) == bytes(rec.signing_share)
            assert got.group_public_key == rec.group_public_key
            assert got.policy == rec.policy
        old = store["base-2"]
        assert old.ciphersuite == SECP256K1_TR.name
        again = dealt(SECP256K1_TR, "base-2", group_public_key=old.group_public_key)
        old_share = bytes(old.signing_share)
        # (A refresh's new share is checked against its own verifying share; that it belongs
        # to the group key is the DKG's proof, made before the delta is sealed.)
        refresh = _seal(ident, chain, [again], operation="refresh", dkg_id="")
        _apply(ident, store, chain, refresh.data)
        assert bytes(store["base-2"].signing_share) == bytes(again.signing_share)
        assert old_share not in bytes(store._wide.arena)
        wrong_suite = dealt(SCHEMES[1], "base-2", group_public_key=old.group_public_key)
        refused = _seal(ident, chain, [wrong_suite], operation="refresh", dkg_id="")
        with pytest.raises(ShareFileError, match="ciphersuite") as info:
            _apply(ident, store, chain, refused.data)
        assert info.value.reason == "delta_account_mismatch"
        live = _snapshot(store)
        with ShareStore.load_sealed(io.BytesIO(base), key) as rebooted:
            second = DeltaChain(store.fingerprint)
            _apply(ident, rebooted, second, create.data)
            _apply(ident, rebooted, second, refresh.data)
            assert _snapshot(rebooted) == live
