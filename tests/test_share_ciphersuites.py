"""The ciphersuite per account (DESIGN §6 version 2, §14): share records, the plaintext file
and ``ShareStore.load_plaintext`` for Ed25519, secp256k1 and secp256k1-TR accounts, alone and
mixed in one file."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign import ShareFileError
from trio_sign.crypto import ED25519, SCHEMES, SECP256K1, SECP256K1_TR, Scheme
from trio_sign.shares import ShareRecord, ShareStore, read_plaintext, write_plaintext
from trio_sign.shares._store import _Lane

from .share_helpers import ORDER_8_HEX

ED = ED25519.name
K1 = SECP256K1.name
TR = SECP256K1_TR.name
N_HEX = "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141"


def header(suite: str = ED) -> dict[str, Any]:
    return {"format": "trio-sign/key-shares", "version": 1, "ciphersuite": suite}


def dealt(scheme: Scheme, account_id: str, *, which: int = 0, **over: Any) -> ShareRecord:
    """Participant ``which + 1``'s record of a fresh 2-of-3 key dealt in ``scheme``."""
    out = scheme.trusted_dealer_keygen(2, 3)
    share = out.shares[which]
    fields: dict[str, Any] = {
        "account_id": account_id,
        "identifier": share.identifier,
        "signing_share": bytearray(share.signing_share),
        "verifying_share": share.verifying_share,
        "group_public_key": out.group_public_key,
        "min_signers": 2,
        "max_signers": 3,
        "ciphersuite": scheme.name,
    }
    for s in out.shares:
        s.zero()
    fields.update(over)
    return ShareRecord(**fields)


def mixed(n: int) -> list[ShareRecord]:
    return [dealt(SCHEMES[i % 3], f"acct-{i:04d}") for i in range(n)]


def obj_of(rec: ShareRecord, **over: Any) -> dict[str, Any]:
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


def jsonl(*lines: Any) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())


def refused(f: io.BytesIO) -> ShareFileError:
    with pytest.raises(ShareFileError) as info:
        list(read_plaintext(f))
    return info.value


def written(records: list[ShareRecord], suite: str = ED) -> io.BytesIO:
    buf = io.BytesIO()
    write_plaintext(buf, records, ciphersuite=suite)
    buf.seek(0)
    return buf


def elements_invalid(vectors_dir: Path) -> str:
    path = vectors_dir / "frost/zcash_frost/frost-secp256k1/elements.json"
    value: str = json.loads(path.read_text())["elements"]["invalid_element"]
    return value


# -- records ----------------------------------------------------------------------------------


def test_record_suite_is_last_with_the_ed25519_default() -> None:
    rec = ShareRecord("a", bytes(32), bytearray(32), bytes(32), bytes(32), 2, 3)
    assert rec.ciphersuite == ED
    assert rec.scheme is ED25519
    rec = ShareRecord("a", bytes(32), bytearray(32), bytes(33), bytes(33), 2, 3, "default", TR)
    assert rec.scheme is SECP256K1_TR
    assert f"ciphersuite={TR!r}" in repr(rec)


def test_same_as_compares_the_suite() -> None:
    a = dealt(SECP256K1, "x")
    b = ShareRecord(**{**_fields(a), "ciphersuite": TR})
    assert a.same_as(ShareRecord(**_fields(a)))
    assert not a.same_as(b)


def _fields(rec: ShareRecord) -> dict[str, Any]:
    return {
        name: getattr(rec, name)
        for name in (
            "account_id",
            "identifier",
            "signing_share",
            "verifying_share",
            "group_public_key",
            "min_signers",
            "max_signers",
            "policy",
            "ciphersuite",
        )
    }


# -- plaintext --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_plaintext_round_trip_per_suite(scheme: Scheme) -> None:
    recs = [dealt(scheme, f"a{i}", which=i % 3) for i in range(5)]
    buf = written(recs, scheme.name)
    lines = buf.getvalue().decode().splitlines()
    assert json.loads(lines[0]) == header(scheme.name)
    assert all("ciphersuite" not in json.loads(line) for line in lines[1:-1])
    back = list(read_plaintext(buf))
    assert [r.ciphersuite for r in back] == [scheme.name] * 5
    assert all(a.same_as(b) for a, b in zip(recs, back, strict=True))
    if scheme is not ED25519:
        assert all(len(r.verifying_share) == len(r.group_public_key) == 33 for r in back)


@pytest.mark.parametrize("head", [ED, K1, TR])
def test_mixed_plaintext_round_trip(head: str) -> None:
    recs = mixed(9)
    buf = written(recs, head)
    lines = [json.loads(x) for x in buf.getvalue().decode().splitlines()]
    assert lines[0]["ciphersuite"] == head
    for rec, line in zip(recs, lines[1:-1], strict=True):
        # The writer names a record's suite only where it is not the header's.
        assert line.get("ciphersuite", head) == rec.ciphersuite
        assert ("ciphersuite" in line) == (rec.ciphersuite != head)
    back = list(read_plaintext(buf))
    assert all(a.same_as(b) for a, b in zip(recs, back, strict=True))


def test_record_suite_overrides_the_header() -> None:
    rec = dealt(SECP256K1, "k")
    assert next(read_plaintext(jsonl(header(ED), obj_of(rec, ciphersuite=K1), _end(1)))).same_as(
        rec
    )
    # ... and without it the header's suite applies: 33-byte hex under an Ed25519 header.
    err = refused(jsonl(header(ED), obj_of(rec), _end(1)))
    assert (err.reason, err.line) == ("bad_hex", 2)
    assert "verifying_share must be 64 hex characters (32 bytes)" in str(err)


def _end(n: int) -> dict[str, Any]:
    return {"end": True, "accounts": n}


@pytest.mark.parametrize("scheme", [SECP256K1, SECP256K1_TR], ids=lambda s: s.name)
@pytest.mark.parametrize("field", ["verifying_share", "group_public_key"])
def test_secp_elements_must_be_33_bytes(scheme: Scheme, field: str) -> None:
    rec = dealt(scheme, "k")
    short = getattr(rec, field)[:32].hex()
    err = refused(jsonl(header(scheme.name), obj_of(rec, **{field: short}), _end(1)))
    assert (err.reason, err.line) == ("bad_hex", 2)
    assert f"{field} must be 66 hex characters (33 bytes), got 64" in str(err)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("field", ["identifier", "signing_share"])
def test_scalars_are_32_bytes_in_every_suite(scheme: Scheme, field: str) -> None:
    rec = dealt(scheme, "k")
    err = refused(jsonl(header(scheme.name), obj_of(rec, **{field: "00" * 33}), _end(1)))
    assert (err.reason, err.line) == ("bad_hex", 2)
    assert f"{field} must be 64 hex characters" in str(err)


def test_unknown_suite_in_the_header() -> None:
    err = refused(jsonl(header("FROST-RISTRETTO255-SHA512-v1"), _end(0)))
    assert (err.reason, err.line) == ("unknown_ciphersuite", 1)
    assert "'FROST-RISTRETTO255-SHA512-v1'" in str(err)
    assert K1 in str(err)  # names the known ones


def test_unknown_suite_in_a_record() -> None:
    rec = dealt(ED25519, "e")
    err = refused(jsonl(header(), obj_of(rec, ciphersuite="FROST-P256-SHA256-v1"), _end(1)))
    assert (err.reason, err.line) == ("unknown_ciphersuite", 2)
    assert "'FROST-P256-SHA256-v1'" in str(err)
    err = refused(jsonl(header(), obj_of(rec, ciphersuite=1), _end(1)))
    assert (err.reason, err.line) == ("bad_type", 2)


@pytest.mark.parametrize("scheme", [SECP256K1, SECP256K1_TR], ids=lambda s: s.name)
@pytest.mark.parametrize("field", ["verifying_share", "group_public_key"])
def test_zf_invalid_element_refused(vectors_dir: Path, scheme: Scheme, field: str) -> None:
    bad = elements_invalid(vectors_dir)
    rec = dealt(scheme, "k")
    err = refused(jsonl(header(scheme.name), obj_of(rec, **{field: bad}), _end(1)))
    assert (err.reason, err.line) == ("invalid_point", 2)
    assert field in str(err)


@pytest.mark.parametrize("scheme", [SECP256K1, SECP256K1_TR], ids=lambda s: s.name)
def test_secp_identity_and_prefix_refused(scheme: Scheme) -> None:
    rec = dealt(scheme, "k")
    for bad in ("00" * 33, "04" + rec.group_public_key[1:].hex()):
        err = refused(jsonl(header(scheme.name), obj_of(rec, group_public_key=bad), _end(1)))
        assert (err.reason, err.line) == ("invalid_point", 2)


def test_ed25519_small_order_still_refused_beside_secp_accounts() -> None:
    recs = [dealt(SECP256K1, "k"), dealt(ED25519, "e")]
    err = refused(
        jsonl(
            header(K1),
            obj_of(recs[0]),
            obj_of(recs[1], ciphersuite=ED, group_public_key=ORDER_8_HEX),
            _end(2),
        )
    )
    assert (err.reason, err.line) == ("invalid_point", 3)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_share_mismatch_per_suite(scheme: Scheme) -> None:
    a, b = dealt(scheme, "a"), dealt(scheme, "b")
    err = refused(
        jsonl(header(scheme.name), obj_of(a, verifying_share=b.verifying_share.hex()), _end(1))
    )
    assert (err.reason, err.line) == ("share_mismatch", 2)
    assert a.signing_share.hex() not in str(err)


@pytest.mark.parametrize("scheme", [SECP256K1, SECP256K1_TR], ids=lambda s: s.name)
def test_secp_scalars_refused(scheme: Scheme) -> None:
    rec = dealt(scheme, "k")
    cases = {
        "zero_identifier": {"identifier": "00" * 32},
        "non_canonical_scalar": {"signing_share": N_HEX},
        "zero_signing_share": {"signing_share": "00" * 32},
    }
    for reason, over in cases.items():
        err = refused(jsonl(header(scheme.name), obj_of(rec, **over), _end(1)))
        assert (err.reason, err.line) == (reason, 2)
    err = refused(jsonl(header(scheme.name), obj_of(rec, identifier=N_HEX), _end(1)))
    assert err.reason == "non_canonical_scalar"
    # secp256k1 scalars are big-endian: identifier 1 is 00..01, and 01..00 is 2**248 (valid).
    assert rec.identifier.hex().startswith("00")


def _odd_y_taproot_record(account_id: str) -> ShareRecord:
    for _ in range(64):
        rec = dealt(SECP256K1_TR, account_id)
        if rec.group_public_key[0] == 3:
            return rec
        rec.zero()
    raise AssertionError("no odd-Y key in 64 draws")  # pragma: no cover


def test_odd_y_taproot_group_key_kept_as_dealt() -> None:
    rec = _odd_y_taproot_record("tr-odd")
    back = next(read_plaintext(written([rec], TR)))
    assert back.group_public_key == rec.group_public_key
    assert back.group_public_key[0] == 3
    store = ShareStore.load_plaintext(written([rec], ED))
    assert store["tr-odd"].group_public_key[0] == 3
    store.close()


# -- the store (plaintext loads) ---------------------------------------------------------------


def test_store_loads_mixed_plaintext() -> None:
    recs = mixed(30)
    store = ShareStore.load_plaintext(written(recs, K1))
    assert len(store) == 30
    assert store.ciphersuites() == {ED: 10, K1: 10, TR: 10}
    for rec in recs:
        got = store[rec.account_id]
        assert got.ciphersuite == rec.ciphersuite
        assert got.scheme.name == rec.ciphersuite
        assert got.identifier == rec.identifier
        assert bytes(got.signing_share) == bytes(rec.signing_share)
        assert got.verifying_share == rec.verifying_share
        assert got.group_public_key == rec.group_public_key
        assert (got.min_signers, got.max_signers) == (2, 3)
        assert store.is_verified(rec.account_id)
        assert bytes(got.signing_share).hex() not in repr(got)
        assert f"ciphersuite={rec.ciphersuite!r}" in repr(got)
    # The Ed25519 lane holds only the Ed25519 accounts.
    assert len(store._arena) >= 32 * 10
    assert store._count == 10
    assert store._wide.count == 20
    store.close()


def test_store_policies_across_lanes() -> None:
    recs = [
        dealt(ED25519, "e", policy="vip"),
        dealt(SECP256K1, "k", policy="cold"),
        dealt(SECP256K1_TR, "t"),
    ]
    store = ShareStore.load_plaintext(written(recs))
    assert store.policies() == {"vip", "cold", "default"}
    assert store["k"].policy == "cold"
    store.close()


def test_store_close_wipes_every_lane() -> None:
    store = ShareStore.load_plaintext(written(mixed(6)))
    views = [store[f"acct-{i:04d}"].signing_share for i in range(6)]
    wide = store._wide.arena
    assert any(wide)
    store.close()
    assert not any(wide)
    assert all(bytes(v) == bytes(32) for v in views)
    with pytest.raises(ShareFileError) as info:
        store.ciphersuites()
    assert info.value.reason == "closed"


def test_store_wide_lane_growth_zeroes_old_arenas(monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [dealt(SECP256K1, f"k{i}") for i in range(1030)]
    arenas: list[bytearray] = []
    real = _Lane.resize

    def spy(self: _Lane, cap: int) -> None:
        arenas.append(self.arena)
        real(self, cap)

    monkeypatch.setattr(_Lane, "resize", spy)
    store = ShareStore.load_plaintext(written(recs, K1))
    assert len(arenas) == 2  # 0 -> 1024 -> 2048 slots
    assert arenas[1] is not store._wide.arena
    assert all(not any(a) for a in arenas)
    assert store["k1029"].verifying_share == recs[1029].verifying_share
    store.close()


_SUITES = st.sampled_from(SCHEMES)


@settings(max_examples=25, deadline=None)
@given(
    suites=st.lists(_SUITES, max_size=12),
    head=_SUITES,
    policies=st.lists(st.sampled_from(["default", "vip", "a.b-c"]), min_size=12, max_size=12),
)
def test_mixed_record_lists_round_trip(
    suites: list[Scheme], head: Scheme, policies: list[str]
) -> None:
    recs = [dealt(s, f"h{i}", which=i % 3, policy=policies[i]) for i, s in enumerate(suites)]
    back = list(read_plaintext(written(recs, head.name)))
    assert all(a.same_as(b) for a, b in zip(recs, back, strict=True))
    assert len(back) == len(recs)
    store = ShareStore.load_plaintext(written(recs, head.name))
    for rec in recs:
        got = store[rec.account_id]
        assert (got.ciphersuite, got.policy) == (rec.ciphersuite, rec.policy)
        assert got.verifying_share == rec.verifying_share
        assert bytes(got.signing_share) == bytes(rec.signing_share)
    store.close()


# -- generated files ------------------------------------------------------------------------------


def test_generate_round_robin_over_suites(tmp_path: Path) -> None:
    from trio_sign.testing import generate_share_files

    report = generate_share_files(tmp_path, 7, ciphersuites=[TR, ED])
    assert report.ciphersuites == {TR: 4, ED: 3}
    files = [report.service_file, *report.participant_files.values()]
    stores = []
    for path in files:
        with path.open("rb") as f:
            stores.append(ShareStore.load_plaintext(f))
    for n in range(7):
        account = f"acct-{n:08d}"
        views = [s[account] for s in stores]
        assert {v.ciphersuite for v in views} == {(TR, ED)[n % 2]}
        assert len({v.group_public_key for v in views}) == 1
        assert len({v.identifier for v in views}) == 3
    assert json.loads(report.service_file.read_text().splitlines()[0])["ciphersuite"] == TR
    for s in stores:
        s.close()


def test_generate_refuses_an_unknown_suite(tmp_path: Path) -> None:
    from trio_sign import TrioSignError
    from trio_sign.testing import generate_share_files

    with pytest.raises(TrioSignError, match="FROST-P256"):
        generate_share_files(tmp_path, 1, ciphersuites=["FROST-P256-SHA256-v1"])
    assert not list(tmp_path.iterdir())
