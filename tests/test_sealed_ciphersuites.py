"""Sealed bundles holding accounts of several ciphersuites (``binary-v3``), and that an
Ed25519-only bundle is still written ``binary-v1``/``-v2`` exactly as before."""

from __future__ import annotations

import contextlib
import io
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_sign import ShareFileError
from trio_sign.crypto import ED25519, SCHEMES, SECP256K1, SECP256K1_TR, Scheme, _sodium, _stream
from trio_sign.shares import (
    DevKeyFile,
    SealedLoader,
    ShareRecord,
    ShareStore,
    encode_bundle,
    inspect_sealed,
    read_sealed,
    reseal,
    seal_file,
    write_plaintext_file,
)
from trio_sign.shares._keywrap import canonical_json
from trio_sign.shares._records import RECORD_FORMAT_V3
from trio_sign.shares._sealed import MAGIC, build_header, encryption_context_for

from .test_share_ciphersuites import ED, K1, TR, dealt, mixed


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DevKeyFile:
    return DevKeyFile.create(tmp_path_factory.mktemp("k") / "dev.key")


@pytest.fixture(scope="module")
def invalid_element(vectors_dir: Path) -> bytes:
    path = vectors_dir / "frost/zcash_frost/frost-secp256k1/elements.json"
    return bytes.fromhex(json.loads(path.read_text())["elements"]["invalid_element"])


def header_of(bundle: bytes) -> dict[str, Any]:
    (hlen,) = struct.unpack_from(">I", bundle, 8)
    h: dict[str, Any] = json.loads(bundle[12 : 12 + hlen])
    return h


def v3_packed(*recs: ShareRecord) -> bytes:
    buf = bytearray(sum(r.binary_size(RECORD_FORMAT_V3) for r in recs))
    pos = 0
    for r in recs:
        pos = r.pack_into(buf, pos, RECORD_FORMAT_V3)
    return bytes(buf)


def raw_v3_bundle(
    provider: DevKeyFile,
    chunks: list[bytes],
    *,
    accounts: int,
    ciphersuites: Mapping[str, int],
    header_over: Mapping[str, Any] | None = None,
) -> bytes:
    """A ``binary-v3`` bundle with arbitrary chunk plaintexts (the last FINAL) under a valid
    key: authentic, whatever it says."""
    ctx = encryption_context_for()
    dk, blob = provider.generate_data_key(ctx)
    try:
        header = build_header(
            provider=provider,
            encrypted_data_key=blob,
            encryption_context=ctx,
            chunk_size=4096,
            accounts=accounts,
            chunks=len(chunks),
            record_format=RECORD_FORMAT_V3,
            ciphersuites=ciphersuites,
        )
        header.update(header_over or {})
        hb = canonical_json(header)
        prefix = MAGIC + struct.pack(">I", len(hb)) + hb
        push = _stream.SecretStreamPush(dk)
        try:
            out = [prefix, push.header]
            for i, pt in enumerate(chunks):
                tag = _stream.TAG_FINAL if i == len(chunks) - 1 else _stream.TAG_MESSAGE
                ct = push.push(pt, ad=prefix, tag=tag)
                out.append(struct.pack(">I", len(ct)) + ct)
            return b"".join(out)
        finally:
            push.close()
    finally:
        _sodium.memzero(dk)


def load(data: bytes, key: DevKeyFile, verify: Literal["lazy", "full"] = "lazy") -> ShareStore:
    return ShareStore.load_sealed(io.BytesIO(data), key, verify=verify)


def refused_load(data: bytes, key: DevKeyFile, verify: Literal["lazy", "full"]) -> ShareFileError:
    with pytest.raises(ShareFileError) as info:
        load(data, key, verify)
    return info.value


def refused_read(data: bytes, key: DevKeyFile) -> ShareFileError:
    with pytest.raises(ShareFileError) as info:
        list(read_sealed(io.BytesIO(data), key))
    return info.value


def assert_store_holds(store: ShareStore, recs: list[ShareRecord]) -> None:
    assert len(store) == len(recs)
    for rec in recs:
        got = store[rec.account_id]
        assert got.ciphersuite == rec.ciphersuite
        assert got.identifier == rec.identifier
        assert bytes(got.signing_share) == bytes(rec.signing_share)
        assert got.verifying_share == rec.verifying_share
        assert got.group_public_key == rec.group_public_key
        assert (got.min_signers, got.max_signers, got.policy) == (
            rec.min_signers,
            rec.max_signers,
            rec.policy,
        )


# -- layout choice and compatibility ---------------------------------------------------------


def test_ed25519_only_bundle_stays_binary_v1(key: DevKeyFile) -> None:
    recs = [dealt(ED25519, f"e{i}") for i in range(4)]
    data = encode_bundle(recs, key)
    h = header_of(data)
    assert h["record_format"] == "binary-v1"
    assert h["ciphersuite"] == ED
    assert "ciphersuites" not in h
    # The plaintext is exactly the binary-v1 packing (what loaders before suites read).
    chunks = []
    from trio_sign.shares import SealedDecoder
    from trio_sign.shares._sealed import ChunkDecrypted, HeaderReceived, unwrap_data_key

    dec = SealedDecoder()
    for ev in dec.receive_data(data):
        assert isinstance(ev, HeaderReceived)
        k = unwrap_data_key(ev.header, key)
        dec.set_data_key(k)
        _sodium.memzero(k)
    events = dec.receive_data(b"") + dec.receive_eof()
    chunks = [bytes(ev.plaintext) for ev in events if isinstance(ev, ChunkDecrypted)]
    expected = b"".join(
        bytes([len(r.account_id)])
        + r.account_id.encode()
        + r.identifier
        + bytes(r.signing_share)
        + r.verifying_share
        + r.group_public_key
        + struct.pack(">HH", 2, 3)
        for r in recs
    )
    assert chunks == [expected]
    dec.close()


def test_ed25519_with_policy_stays_binary_v2(key: DevKeyFile) -> None:
    recs = [dealt(ED25519, "e", policy="vip"), dealt(ED25519, "f")]
    h = header_of(encode_bundle(recs, key))
    assert (h["record_format"], h["ciphersuite"], "ciphersuites" in h) == ("binary-v2", ED, False)


@pytest.mark.parametrize("scheme", [SECP256K1, SECP256K1_TR], ids=lambda s: s.name)
def test_single_secp_suite_bundle(key: DevKeyFile, scheme: Scheme) -> None:
    recs = [dealt(scheme, f"k{i}", which=i % 3) for i in range(7)]
    data = encode_bundle(recs, key, chunk_size=1024)
    h = header_of(data)
    assert h["record_format"] == "binary-v3"
    assert (h["ciphersuite"], h["ciphersuites"]) == (scheme.name, {scheme.name: 7})
    for verify in ("lazy", "full"):
        store = load(data, key, verify)
        assert_store_holds(store, recs)
        assert store.ciphersuites() == {scheme.name: 7}
        # A single-suite store sizes its lane exactly and leaves the Ed25519 lane empty.
        assert len(store._wide.arena) == 32 * 7
        assert len(store._arena) == 0
        store.close()
    back = list(read_sealed(io.BytesIO(data), key))
    assert all(a.same_as(b) for a, b in zip(recs, back, strict=True))


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_mixed_bundle_round_trip(key: DevKeyFile, verify: Literal["lazy", "full"]) -> None:
    recs = mixed(40)
    recs[5].policy = "vip"
    data = encode_bundle(recs, key, chunk_size=1024)
    h = header_of(data)
    assert h["record_format"] == "binary-v3"
    assert h["ciphersuites"] == {ED: 14, K1: 13, TR: 13}
    assert h["ciphersuite"] == recs[0].ciphersuite
    store = load(data, key, verify)
    assert store.is_verified(recs[1].account_id) == (verify == "full")
    assert_store_holds(store, recs)
    assert all(store.is_verified(r.account_id) for r in recs)
    assert store.ciphersuites() == {ED: 14, K1: 13, TR: 13}
    assert store.policies() == {"default", "vip"}
    # Lanes end exactly sized to the header's per-suite counts.
    assert (len(store._arena), len(store._wide.arena)) == (32 * 14, 32 * 26)
    store.close()


def test_seal_file_mixed_and_reseal(tmp_path: Path, key: DevKeyFile) -> None:
    other = DevKeyFile.create(tmp_path / "other.key")
    recs = mixed(12)
    src = tmp_path / "shares.json"
    write_plaintext_file(src, recs, ciphersuite=TR)
    res = seal_file(src, tmp_path / "s.enc", key, chunk_size=1024)
    data = (tmp_path / "s.enc").read_bytes()
    h = header_of(data)
    assert (h["ciphersuite"], h["ciphersuites"]) == (TR, {ED: 4, K1: 4, TR: 4})
    assert res.accounts == 12
    with (tmp_path / "s.enc").open("rb") as f:
        header, end = inspect_sealed(f)
    assert header["ciphersuites"] == {ED: 4, K1: 4, TR: 4}
    assert end.sha256_hex == res.sha256_hex
    moved = reseal(tmp_path / "s.enc", tmp_path / "r.enc", key, other)
    assert moved.accounts == 12
    rh = header_of((tmp_path / "r.enc").read_bytes())
    assert (rh["record_format"], rh["ciphersuites"]) == ("binary-v3", h["ciphersuites"])
    with (tmp_path / "r.enc").open("rb") as f:
        store = ShareStore.load_sealed(f, other, verify="full")
    assert_store_holds(store, recs)
    store.close()


def test_seal_file_ed25519_only_header_unchanged(tmp_path: Path, key: DevKeyFile) -> None:
    src = tmp_path / "shares.json"
    write_plaintext_file(src, [dealt(ED25519, "e")])
    seal_file(src, tmp_path / "s.enc", key)
    h = header_of((tmp_path / "s.enc").read_bytes())
    assert set(h) == {
        "format",
        "kind",
        "version",
        "ciphersuite",
        "record_format",
        "key_provider",
        "kms_key_id",
        "encrypted_data_key",
        "encryption_context",
        "chunk_size",
        "accounts",
        "chunks",
    }
    assert (h["ciphersuite"], h["record_format"]) == (ED, "binary-v1")


# -- refusals ----------------------------------------------------------------------------------


def _with_code(rec: ShareRecord, code: int) -> bytes:
    """``rec``'s binary-v3 bytes with its suite code byte replaced."""
    raw = bytearray(v3_packed(rec))
    at = 1 + len(rec.account_id.encode()) + 1 + len(rec._policy_bytes())
    assert raw[at] == rec.scheme.code
    raw[at] = code
    return bytes(raw)


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_unknown_suite_code_names_the_record(
    key: DevKeyFile, verify: Literal["lazy", "full"]
) -> None:
    good = [dealt(SECP256K1, "a"), dealt(ED25519, "b")]
    bad = dealt(SECP256K1, "c")
    data = raw_v3_bundle(
        key,
        [v3_packed(*good) + _with_code(bad, 3)],
        accounts=3,
        ciphersuites={K1: 2, ED: 1},
    )
    err = refused_load(data, key, verify)
    assert (err.reason, err.line, err.unit) == ("unknown_ciphersuite", 3, "record")
    assert "unknown ciphersuite code 3" in str(err)
    err = refused_read(data, key)
    assert (err.reason, err.line) == ("unknown_ciphersuite", 3)


def test_failed_mixed_load_zeroes_every_lane(
    key: DevKeyFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    arenas: list[bytearray] = []
    real_close = ShareStore.close

    def close(self: ShareStore) -> None:
        arenas.extend([self._arena, self._wide.arena])
        real_close(self)

    monkeypatch.setattr(ShareStore, "close", close)
    good = [dealt(SECP256K1, "a"), dealt(ED25519, "b")]
    data = raw_v3_bundle(
        key,
        [v3_packed(*good), _with_code(dealt(SECP256K1_TR, "c"), 255)],
        accounts=3,
        ciphersuites={K1: 1, ED: 1, TR: 1},
    )
    err = refused_load(data, key, "lazy")
    assert err.reason == "unknown_ciphersuite"
    assert any(len(a) for a in arenas)
    assert all(not any(a) for a in arenas)


def _feed_all(loader: SealedLoader, data: bytes) -> None:
    loader.feed(data)
    loader.finish()


def test_v3_record_cut_short(key: DevKeyFile) -> None:
    rec = dealt(SECP256K1, "a")
    raw = v3_packed(rec)
    for cut in (1, 3, len(raw) - 1):  # in the policy length, the code, the thresholds
        data = raw_v3_bundle(key, [raw[:cut]], accounts=1, ciphersuites={K1: 1})
        for verify in ("lazy", "full"):
            # Streamed (no size known up front), so the record itself is what is refused.
            loader = SealedLoader(key, verify=verify)
            with pytest.raises(ShareFileError) as info:
                _feed_all(loader, data)
            assert (info.value.reason, info.value.line) == ("bad_record", 1)
        assert refused_read(data, key).reason == "bad_record"


def test_suite_counts_must_match_the_header(key: DevKeyFile) -> None:
    recs = [dealt(SECP256K1, "a"), dealt(SECP256K1_TR, "b")]
    # The header says two plain secp256k1 accounts; the second record is Taproot.
    data = raw_v3_bundle(key, [v3_packed(*recs)], accounts=2, ciphersuites={K1: 2})
    err = refused_load(data, key, "lazy")
    assert err.reason == "count_mismatch"
    assert refused_read(data, key).reason == "count_mismatch"
    # More Ed25519 records than declared: refused at the record, before any lane grows.
    eds = [dealt(ED25519, "x"), dealt(ED25519, "y")]
    data = raw_v3_bundle(key, [v3_packed(recs[0], *eds)], accounts=3, ciphersuites={K1: 2, ED: 1})
    err = refused_load(data, key, "lazy")
    assert (err.reason, err.line) == ("count_mismatch", 3)


@pytest.mark.parametrize(
    "over",
    [
        {"ciphersuite": "FROST-RISTRETTO255-SHA512-v1"},
        {"ciphersuites": {"FROST-P256-SHA256-v1": 1}},
        {"ciphersuites": {K1: 2}},
        {"ciphersuites": {K1: -1, ED: 2}},
        {"ciphersuites": [K1]},
    ],
)
def test_bad_v3_headers(key: DevKeyFile, over: dict[str, Any]) -> None:
    data = raw_v3_bundle(
        key, [v3_packed(dealt(SECP256K1, "a"))], accounts=1, ciphersuites={K1: 1}, header_over=over
    )
    err = refused_load(data, key, "lazy")
    assert err.reason == "bad_header"


def test_v1_header_cannot_name_other_suites(key: DevKeyFile) -> None:
    data = raw_v3_bundle(
        key,
        [v3_packed(dealt(SECP256K1, "a"))],
        accounts=1,
        ciphersuites={K1: 1},
        header_over={"record_format": "binary-v1", "ciphersuites": {K1: 1}},
    )
    assert refused_load(data, key, "lazy").reason == "bad_header"
    data = raw_v3_bundle(
        key,
        [v3_packed(dealt(SECP256K1, "a"))],
        accounts=1,
        ciphersuites={K1: 1},
        header_over={"record_format": "binary-v2", "ciphersuite": K1, "ciphersuites": None},
    )
    assert refused_load(data, key, "lazy").reason == "bad_header"


@pytest.mark.parametrize("scheme", [SECP256K1, SECP256K1_TR], ids=lambda s: s.name)
@pytest.mark.parametrize("field", ["verifying_share", "group_public_key"])
def test_invalid_element_lazy_and_full(
    key: DevKeyFile, invalid_element: bytes, scheme: Scheme, field: str
) -> None:
    over: dict[str, Any] = {field: invalid_element}
    recs = [dealt(scheme, "a"), dealt(scheme, "b", **over)]
    data = encode_bundle(recs, key)
    err = refused_load(data, key, "full")
    assert (err.reason, err.line) == ("invalid_point", 2)
    assert field in str(err)
    store = load(data, key, "lazy")  # lazy: loads; the record fails at first use
    assert store["a"].ciphersuite == scheme.name
    with pytest.raises(ShareFileError) as info:
        store.get("b")
    assert (info.value.reason, info.value.line) == ("invalid_point", 2)
    assert not store.is_verified("b")
    store.close()
    assert refused_read(data, key).reason == "invalid_point"


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_share_mismatch_in_a_mixed_store_names_the_account(key: DevKeyFile, scheme: Scheme) -> None:
    other = dealt(scheme, "z")
    bad = dealt(scheme, "bad", verifying_share=other.verifying_share)
    recs = [dealt(s, f"ok-{s.code}") for s in SCHEMES] + [bad]
    data = encode_bundle(recs, key)
    err = refused_load(data, key, "full")
    assert (err.reason, err.line) == ("share_mismatch", 4)
    store = load(data, key, "lazy")
    for s in SCHEMES:
        assert store[f"ok-{s.code}"].ciphersuite == s.name
    with pytest.raises(ShareFileError) as info:
        store.get("bad")
    assert info.value.reason == "share_mismatch"
    assert "'bad'" in str(info.value)
    assert bad.signing_share.hex() not in str(info.value)
    store.close()


def test_odd_y_taproot_key_kept_as_dealt_through_a_bundle(key: DevKeyFile) -> None:
    from .test_share_ciphersuites import _odd_y_taproot_record

    rec = _odd_y_taproot_record("odd")
    data = encode_bundle([rec, dealt(ED25519, "e")], key)
    for verify in ("lazy", "full"):
        store = load(data, key, verify)
        assert store["odd"].group_public_key == rec.group_public_key
        assert store["odd"].group_public_key[0] == 3
        store.close()


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    suites=st.lists(st.sampled_from(SCHEMES), min_size=0, max_size=10),
    policies=st.lists(st.booleans(), min_size=10, max_size=10),
    chunk=st.sampled_from([460, 1024, 65536]),
)
def test_mixed_record_lists_through_bundles(
    key: DevKeyFile, suites: list[Scheme], policies: list[bool], chunk: int
) -> None:
    recs = [
        dealt(s, f"r{i}", which=i % 3, policy="vip" if policies[i] else "default")
        for i, s in enumerate(suites)
    ]
    data = encode_bundle(recs, key, chunk_size=chunk)
    expected = (
        "binary-v3"
        if any(s is not ED25519 for s in suites)
        else ("binary-v2" if any(policies[: len(suites)]) else "binary-v1")
    )
    assert header_of(data)["record_format"] == expected
    back = list(read_sealed(io.BytesIO(data), key))
    assert all(a.same_as(b) for a, b in zip(recs, back, strict=True))
    assert len(back) == len(recs)
    store = load(data, key, "full")
    assert_store_holds(store, recs)
    store.close()


# -- memory --------------------------------------------------------------------------------------


def _secp_records(n: int, suite: str) -> list[ShareRecord]:
    """``n`` valid secp256k1 records, quickly (one base multiplication each)."""
    import secrets

    from trio_sign.crypto import _secp256k1

    group = _secp256k1.base_mult((7).to_bytes(32, "big"))
    out = []
    for i in range(n):
        share = bytearray((secrets.randbelow(_secp256k1.N - 1) + 1).to_bytes(32, "big"))
        out.append(
            ShareRecord(
                f"acct-{i:08d}",
                (1).to_bytes(32, "big"),
                share,
                _secp256k1.base_mult(share),
                group,
                2,
                3,
                ciphersuite=suite,
            )
        )
    return out


def test_secp_store_memory_per_account(key: DevKeyFile) -> None:
    """Issue 15's target: preload memory per secp256k1 account <= 400 B, index included,
    measured as the Ed25519 store is (memory the load retains, traced, and ``nbytes``)."""
    import tracemalloc

    n = 10_000
    data = encode_bundle(_secp_records(n, TR), key)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = ShareStore.load_sealed(io.BytesIO(data), key)
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained / n <= 400
    assert store.nbytes() / n <= 400
    # The wide lane holds exactly the accounts; the Ed25519 lane stays empty.
    assert len(store._wide.arena) == 32 * n
    assert len(store._wide.public) == 98 * n
    assert len(store._arena) == len(store._public) == 0
    store.close()


def test_ed25519_lane_layout_unchanged(key: DevKeyFile) -> None:
    """An Ed25519-only store is laid out as before suites existed: 32 + 96 + 4 + 1 + 1 bytes
    of buffers per account, and an empty wide lane."""
    recs = [dealt(ED25519, f"e{i}") for i in range(50)]
    store = load(encode_bundle(recs, key), key)
    assert (len(store._arena), len(store._public), len(store._thresholds)) == (
        32 * 50,
        96 * 50,
        100,
    )
    assert (len(store._flags), len(store._policy)) == (50, 50)
    wide = store._wide
    assert (len(wide.arena), len(wide.public), len(wide.suite), wide.capacity) == (0, 0, 0, 0)
    store.close()


# -- hostile chunk contents ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.lists(st.sampled_from(SCHEMES), max_size=3),
    noise=st.binary(max_size=300),
    cut=st.integers(min_value=0, max_value=900),
)
def test_v3_parsers_refuse_any_bytes_cleanly(prefix: list[Scheme], noise: bytes, cut: int) -> None:
    """Valid records followed by arbitrary bytes, or cut anywhere: both v3 parsers either
    accept or raise ShareFileError (never IndexError, struct.error, ...), and a store that
    refused zeroes its lanes on close."""
    from trio_sign.shares._sealed import iter_chunk_records

    recs = [dealt(s, f"p{i}") for i, s in enumerate(prefix)]
    body = v3_packed(*recs)
    pt = (body + noise)[:cut]
    with contextlib.suppress(ShareFileError):
        for rec in iter_chunk_records(
            bytearray(pt), first_record=1, record_format=RECORD_FORMAT_V3
        ):
            rec.zero()
    store = ShareStore(0)
    with contextlib.suppress(ShareFileError):
        store._ingest_v3(bytearray(pt), full=False, limits=(len(pt), len(pt)))
    store.close()
    assert not any(store._arena)
    assert not any(store._wide.arena)
