"""ShareStore: compact in-memory index of key shares, loaded from sealed or plaintext files."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_sign.shares._store as store_mod
from trio_sign import ShareFileError
from trio_sign.crypto import _sodium
from trio_sign.shares import (
    ChunkDecrypted,
    DevKeyFile,
    Event,
    SealedDecoder,
    SealedLoader,
    ShareRecord,
    ShareStore,
    encode_bundle,
    write_plaintext,
)
from trio_sign.shares._sealed import MIN_CHUNK_SIZE

from .forged_bundles import forged_bundle
from .share_helpers import ORDER_8, point_of, random_scalar
from .share_helpers import make_record as _make_record


def make_record(account_id: str, **over: Any) -> ShareRecord:
    over.setdefault("max_signers", 3 + len(account_id) % 5)  # vary the thresholds stored
    return _make_record(account_id, **over)


RECORDS = [make_record(f"acct-{i:04d}") for i in range(50)]


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DevKeyFile:
    return DevKeyFile.create(tmp_path_factory.mktemp("k") / "dev.key")


@pytest.fixture(scope="module")
def bundle(key: DevKeyFile) -> bytes:
    return encode_bundle(RECORDS, key, chunk_size=1024)


def assert_same(store: ShareStore, records: list[ShareRecord]) -> None:
    assert len(store) == len(records)
    for rec in records:
        got = store.get(rec.account_id)
        assert got is not None
        assert got.account_id == rec.account_id
        assert got.identifier == rec.identifier
        assert bytes(got.signing_share) == rec.signing_share
        assert got.verifying_share == rec.verifying_share
        assert got.group_public_key == rec.group_public_key
        assert (got.min_signers, got.max_signers) == (rec.min_signers, rec.max_signers)


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_load_sealed_round_trip(bundle: bytes, key: DevKeyFile, verify: Any) -> None:
    seen: list[tuple[int, int]] = []
    store = ShareStore.load_sealed(
        io.BytesIO(bundle), key, verify=verify, progress=lambda d, t: seen.append((d, t))
    )
    assert store.fingerprint is not None
    assert len(store.fingerprint) == 64
    assert store.load_seconds > 0
    assert store.accounts == 50
    assert seen[-1] == (50, 50)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert all(store.is_verified(r.account_id) == (verify == "full") for r in RECORDS)
    assert_same(store, RECORDS)
    assert all(store.is_verified(r.account_id) for r in RECORDS)
    store.close()


def test_load_plaintext_round_trip() -> None:
    many = RECORDS + [make_record(f"more-{i}") for i in range(1100)]  # forces arena growth
    buf = io.BytesIO()
    write_plaintext(buf, many)
    buf.seek(0)
    calls: list[tuple[int, int]] = []
    store = ShareStore.load_plaintext(buf, progress=lambda d, t: calls.append((d, t)))
    assert store.fingerprint is None
    assert_same(store, many)
    assert calls[0] == (1000, 0)
    assert calls[-1] == (len(many), len(many))
    store.close()


def test_plaintext_growth_zeroes_the_old_arena(monkeypatch: pytest.MonkeyPatch) -> None:
    arenas: list[bytearray] = []
    real_grow = ShareStore._grow

    def spy(self: ShareStore, need: int) -> None:
        arenas.append(self._arena)
        real_grow(self, need)

    monkeypatch.setattr(ShareStore, "_grow", spy)
    buf = io.BytesIO()
    write_plaintext(buf, [make_record(f"g{i}") for i in range(1030)])
    buf.seek(0)
    store = ShareStore.load_plaintext(buf)
    assert len(arenas) == 2  # 0 -> 1024 -> 2048 slots
    assert arenas[1] is not store._arena
    assert all(a == bytes(len(a)) for a in arenas)
    store.close()


def test_plaintext_errors_propagate() -> None:
    buf = io.BytesIO()
    write_plaintext(buf, [make_record("a"), make_record("a")])
    buf.seek(0)
    with pytest.raises(ShareFileError) as info:
        ShareStore.load_plaintext(buf)
    assert (info.value.reason, info.value.line) == ("duplicate_account", 3)


def test_get_contains_len(bundle: bytes, key: DevKeyFile) -> None:
    store = ShareStore.load_sealed(io.BytesIO(bundle), key)
    assert "acct-0003" in store
    assert "nope" not in store
    assert 3 not in store
    assert store.get("nope") is None
    with pytest.raises(KeyError):
        store["nope"]
    share = store["acct-0003"]
    assert share.signing_share.readonly
    with pytest.raises(TypeError):
        share.signing_share[0] = 1
    assert bytes(share.signing_share) not in repr(share).encode()
    assert share.signing_share.hex() not in repr(share)
    assert "<secret>" in repr(share)
    assert "acct-0003" in repr(share)
    assert "50 accounts" in repr(store)


def test_close_zeroes_arena_and_refuses_access(bundle: bytes, key: DevKeyFile) -> None:
    store = ShareStore.load_sealed(io.BytesIO(bundle), key)
    arena = store._arena
    view = store["acct-0001"].signing_share
    assert arena != bytes(len(arena))
    assert len(arena) == 32 * 50
    store.close()
    assert arena == bytes(32 * 50)
    assert bytes(view) == bytes(32)
    store.close()  # idempotent
    for access in (
        lambda: store.get("acct-0001"),
        lambda: "acct-0001" in store,
        lambda: len(store),
        lambda: store.nbytes(),
    ):
        with pytest.raises(ShareFileError) as info:
            access()
        assert info.value.reason == "closed"
    assert "closed" in repr(store)


def test_arena_ends_sized_to_the_header_count(bundle: bytes, key: DevKeyFile) -> None:
    store = ShareStore.load_sealed(io.BytesIO(bundle), key)
    assert len(store._arena) == 32 * 50
    assert len(store._public) == 96 * 50
    assert store.nbytes() > 32 * 50 + 96 * 50
    store.close()


def test_lazy_verification_catches_bad_record(key: DevKeyFile) -> None:
    bad = make_record("bad", verifying_share=point_of(random_scalar()))
    worse = make_record("worse", group_public_key=ORDER_8)
    data = encode_bundle([*RECORDS[:3], bad, worse], key)
    store = ShareStore.load_sealed(io.BytesIO(data), key)  # lazy: loads fine
    assert store["acct-0001"].account_id == "acct-0001"
    for account, reason, number in (("bad", "share_mismatch", 4), ("worse", "invalid_point", 5)):
        for _ in range(2):  # and keeps refusing
            with pytest.raises(ShareFileError) as info:
                store.get(account)
            assert (info.value.reason, info.value.line) == (reason, number)
        assert not store.is_verified(account)
    store.close()
    with pytest.raises(ShareFileError) as info:
        ShareStore.load_sealed(io.BytesIO(data), key, verify="full")
    assert (info.value.reason, info.value.line) == ("share_mismatch", 4)


def test_verify_mode_checked(bundle: bytes, key: DevKeyFile) -> None:
    with pytest.raises(ValueError, match="verify"):
        ShareStore.load_sealed(io.BytesIO(bundle), key, verify="sometimes")  # type: ignore[arg-type]


class _SpyDecoder(SealedDecoder):
    chunks: ClassVar[list[bytearray]] = []
    instances: ClassVar[list[SealedDecoder]] = []

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        _SpyDecoder.instances.append(self)

    def receive_data(self, data: Any) -> list[Event]:
        events = super().receive_data(data)
        _SpyDecoder.chunks.extend(e.plaintext for e in events if isinstance(e, ChunkDecrypted))
        return events


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> type[_SpyDecoder]:
    _SpyDecoder.chunks = []
    _SpyDecoder.instances = []
    monkeypatch.setattr(store_mod, "SealedDecoder", _SpyDecoder)
    return _SpyDecoder


def test_decrypted_chunks_are_zeroed(bundle: bytes, key: DevKeyFile, spy: Any) -> None:
    store = ShareStore.load_sealed(io.BytesIO(bundle), key)
    assert len(spy.chunks) > 5
    assert all(len(c) > 0 and c == bytes(len(c)) for c in spy.chunks)
    (dec,) = spy.instances
    assert dec._key is None
    assert dec._pull is None
    store.close()


def test_failed_load_zeroes_everything(key: DevKeyFile, spy: Any) -> None:
    bad = make_record("acct-0002")  # duplicate, found in a later chunk
    data = encode_bundle([*RECORDS[:20], bad], key, chunk_size=MIN_CHUNK_SIZE)
    arenas: list[bytearray] = []
    real_init = ShareStore.__init__
    real_grow = ShareStore._grow

    def init(self: ShareStore, capacity: int = 0) -> None:
        real_init(self, capacity)
        arenas.append(self._arena)

    def grow(self: ShareStore, need: int, limit: int | None = None) -> None:
        real_grow(self, need, limit)
        arenas.append(self._arena)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShareStore, "__init__", init)
        mp.setattr(ShareStore, "_grow", grow)
        with pytest.raises(ShareFileError) as info:
            ShareStore.load_sealed(io.BytesIO(data), key)
    assert (info.value.reason, info.value.line) == ("duplicate_account", 21)
    assert "first seen at record 3" in str(info.value)
    assert len(arenas[-1]) == 32 * 21
    assert all(arena == bytes(len(arena)) for arena in arenas)
    assert all(c == bytes(len(c)) for c in spy.chunks)


def test_integrity_errors_surface(bundle: bytes, key: DevKeyFile, tmp_path: Path) -> None:
    with pytest.raises(ShareFileError) as info:
        ShareStore.load_sealed(io.BytesIO(bundle[:-5]), key)
    assert info.value.reason == "truncated"
    with pytest.raises(ShareFileError) as info:
        ShareStore.load_sealed(io.BytesIO(bundle + b"x"), key)
    assert info.value.reason == "trailing_data"
    other = DevKeyFile.create(tmp_path / "other.key")
    with pytest.raises(Exception, match="sealed under key"):
        ShareStore.load_sealed(io.BytesIO(bundle), other)


@pytest.mark.parametrize(
    ("reason", "bad"),
    [
        ("bad_account_id", lambda: make_record("tab\there")),
        ("zero_identifier", lambda: make_record("c", identifier=bytes(32))),
        (
            "non_canonical_scalar",
            lambda: make_record("c", identifier=_sodium.L.to_bytes(32, "little")),
        ),
        (
            "non_canonical_scalar",
            lambda: make_record("c", signing_share=bytearray(_sodium.L.to_bytes(32, "little"))),
        ),
        ("non_canonical_scalar", lambda: make_record("c", signing_share=bytearray(b"\xff" * 32))),
        ("zero_signing_share", lambda: make_record("c", signing_share=bytearray(32))),
        ("bad_threshold", lambda: make_record("c", min_signers=1)),
        ("bad_threshold", lambda: make_record("c", min_signers=9, max_signers=3)),
        ("duplicate_account", lambda: make_record("acct-0000")),
    ],
)
def test_structural_checks_always_run(key: DevKeyFile, reason: str, bad: Any) -> None:
    data = encode_bundle([*RECORDS[:2], bad()], key)
    with pytest.raises(ShareFileError) as info:
        ShareStore.load_sealed(io.BytesIO(data), key)
    assert (info.value.reason, info.value.line) == (reason, 3)
    assert str(info.value).startswith("record 3: ")


def test_signing_share_just_below_l_accepted(key: DevKeyFile) -> None:
    s = bytearray((_sodium.L - 1).to_bytes(32, "little"))
    rec = make_record("top", signing_share=s, verifying_share=point_of(s))
    store = ShareStore.load_sealed(io.BytesIO(encode_bundle([rec], key)), key, verify="full")
    got = store["top"]
    assert bytes(got.signing_share) == s
    store.close()


def test_empty_bundle(key: DevKeyFile) -> None:
    store = ShareStore.load_sealed(io.BytesIO(encode_bundle([], key)), key)
    assert len(store) == 0
    store.close()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cuts=st.lists(st.integers(min_value=1, max_value=4096), max_size=30))
def test_sealed_loader_any_feed_sizes(bundle: bytes, key: DevKeyFile, cuts: list[int]) -> None:
    """Feeding the bundle in arbitrary pieces gives the same store as one file read."""
    loader = SealedLoader(key)
    pos = 0
    for n in cuts:
        loader.feed(bundle[pos : pos + n])
        pos += n
    loader.feed(bundle[pos:])
    store = loader.finish()
    with ShareStore.load_sealed(io.BytesIO(bundle), key) as reference:
        assert len(store) == len(reference)
        assert store.fingerprint == reference.fingerprint
        for account_id in reference._index:
            a, b = store[account_id], reference[account_id]
            assert bytes(a.signing_share) == bytes(b.signing_share)
            assert a.verifying_share == b.verifying_share
    store.close()


def test_sealed_loader_abort_zeroes_partial_store(key: DevKeyFile, spy: Any) -> None:
    records = [make_record(f"acct-{i}") for i in range(300)]
    data = encode_bundle(records, key, chunk_size=MIN_CHUNK_SIZE)
    loader = SealedLoader(key)
    loader.feed(data[: len(data) // 2])
    partial = loader._store
    assert partial is not None
    assert len(partial) > 0
    arena = partial._arena
    assert arena != bytearray(len(arena))
    loader.abort()
    assert arena == bytearray(len(arena))
    loader.abort()  # idempotent


# -- hostile bundles: no decrypted chunk left behind, nothing sized from the header's count ---


def test_one_byte_appended_zeroes_every_decrypted_chunk(
    bundle: bytes, key: DevKeyFile, decrypted: list[bytearray]
) -> None:
    """The whole bundle plus one byte arrives in one feed: every chunk is decrypted in that
    call, then the trailing byte fails it; none of those chunks may stay in memory."""
    arenas: list[bytearray] = []
    real_grow = ShareStore._grow

    def grow(self: ShareStore, need: int, limit: int | None = None) -> None:
        real_grow(self, need, limit)
        arenas.append(self._arena)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShareStore, "_grow", grow)
        with pytest.raises(ShareFileError) as info:
            ShareStore.load_sealed(io.BytesIO(bundle + b"\0"), key)
    assert info.value.reason == "trailing_data"
    assert len(decrypted) > 5
    assert all(len(b) > 0 and b == bytes(len(b)) for b in decrypted)
    assert all(a == bytes(len(a)) for a in arenas)


def test_failed_feed_zeroes_the_partial_store_without_abort(
    key: DevKeyFile, decrypted: list[bytearray]
) -> None:
    """A caller that forgets :meth:`SealedLoader.abort` still leaves nothing in clear."""
    records = [make_record(f"acct-{i}") for i in range(40)]
    data = encode_bundle([*records, make_record("acct-3")], key, chunk_size=MIN_CHUNK_SIZE)
    loader = SealedLoader(key)
    loader.feed(data[: len(data) // 2])
    partial = loader._store
    assert partial is not None
    arena = partial._arena
    assert arena != bytes(len(arena))
    with pytest.raises(ShareFileError) as info:
        loader.feed(data[len(data) // 2 :])
    assert info.value.reason == "duplicate_account"
    assert arena == bytes(len(arena))
    assert loader._store is None
    assert all(b == bytes(len(b)) for b in decrypted)
    loader.abort()  # still fine


@pytest.fixture
def no_big_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse (rather than make) any store of more than 2**20 slots, so that a regression
    fails this test without first allocating gigabytes."""
    real_init = ShareStore.__init__
    real_grow = ShareStore._grow

    def init(self: ShareStore, capacity: int = 0) -> None:
        assert capacity <= 1 << 20, f"store preallocated for {capacity} accounts"
        real_init(self, capacity)

    def grow(self: ShareStore, need: int, limit: int | None = None) -> None:
        assert need <= 1 << 20, f"store grown to {need} accounts"
        real_grow(self, need, limit)
        assert self._capacity <= 1 << 20, f"store grown to {self._capacity} accounts"

    monkeypatch.setattr(ShareStore, "__init__", init)
    monkeypatch.setattr(ShareStore, "_grow", grow)
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _peak_mib() -> float:
    return tracemalloc.get_traced_memory()[1] / (1 << 20)


def test_forged_account_count_fails_fast_from_a_file(key: DevKeyFile, no_big_store: None) -> None:
    """A header claiming 2**24 accounts over 3 records (about 2 GB if sized from the header)
    is refused at the header: the file is far too small for that count."""
    data = forged_bundle(key, [make_record(f"acct-{i}") for i in range(3)], accounts=1 << 24)
    unwrapped: list[object] = []

    def unwrap(header: dict[str, Any]) -> bytearray:
        unwrapped.append(header)
        raise AssertionError("the data key was asked for")

    tracemalloc.reset_peak()
    with pytest.raises(ShareFileError) as info:
        ShareStore.load_sealed(io.BytesIO(data), key)
    assert info.value.reason == "truncated"
    assert "declares 16777216 accounts" in str(info.value)
    assert "holds 3 at most" in str(info.value)
    loader = SealedLoader(unwrap=unwrap, total_bytes=len(data))
    with pytest.raises(ShareFileError):
        loader.feed(data)
    assert not unwrapped
    assert _peak_mib() < 50


def test_forged_account_count_streamed_grows_with_records_only(
    key: DevKeyFile, no_big_store: None
) -> None:
    """Streamed without a known size (the enclave's boot channel), the same bundle fails at
    its end, having allocated for the records it held, not for the count it claimed."""
    data = forged_bundle(key, [make_record(f"acct-{i}") for i in range(3)], accounts=1 << 24)
    tracemalloc.reset_peak()
    loader = SealedLoader(key)
    loader.feed(data)
    partial = loader._store
    assert partial is not None
    assert len(partial) == 3
    assert partial._capacity == 1024
    with pytest.raises(ShareFileError) as info:
        loader.finish()
    assert info.value.reason == "count_mismatch"
    assert "holds 3 records, but the header declares 16777216" in str(info.value)
    assert partial._arena == bytes(len(partial._arena))
    assert _peak_mib() < 50


def test_sealed_arena_grows_with_records_and_zeroes_the_old_ones(key: DevKeyFile) -> None:
    records = [make_record(f"g{i}") for i in range(1100)]
    data = encode_bundle(records, key, chunk_size=64 * 1024)
    arenas: list[bytearray] = []
    real_grow = ShareStore._grow

    def grow(self: ShareStore, need: int, limit: int | None = None) -> None:
        arenas.append(self._arena)
        real_grow(self, need, limit)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShareStore, "_grow", grow)
        store = ShareStore.load_sealed(io.BytesIO(data), key)
    assert len(arenas) == 2  # 0 -> 1024 -> 1100 slots (capped at the header's count)
    assert all(a == bytes(len(a)) for a in arenas)
    assert len(store._arena) == 32 * 1100
    assert len(store._public) == 96 * 1100
    assert_same(store, records)
    store.close()


def test_memory_check_runs_before_the_key_is_unwrapped(bundle: bytes, key: DevKeyFile) -> None:
    seen: list[int] = []

    class TooBig(Exception):
        pass

    def memory_check(accounts: int) -> None:
        seen.append(accounts)
        raise TooBig

    def unwrap(header: dict[str, Any]) -> bytearray:
        raise AssertionError("the data key was asked for")

    with pytest.raises(TooBig):
        ShareStore.load_sealed(io.BytesIO(bundle), key, memory_check=memory_check)
    loader = SealedLoader(unwrap=unwrap, memory_check=memory_check)
    with pytest.raises(TooBig):
        loader.feed(bundle)
    assert seen == [50, 50]
    store = ShareStore.load_sealed(io.BytesIO(bundle), key, memory_check=seen.append)
    assert seen[-1] == 50
    store.close()
