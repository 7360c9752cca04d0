"""SessionPool: single-use nonces, slots, retries, TTL expiry, drain, freeze."""

from __future__ import annotations

import nacl.signing
import pytest
import trio
import trio.testing

from trio_sign.crypto import SigningCommitment
from trio_sign.enclave import PoolError, PoolErrorKind, SessionPool
from trio_sign.shares import ShareStore

from .enclave_helpers import Account, Peer, make_accounts, sorted_commitments


@pytest.fixture
def world() -> tuple[ShareStore, dict[str, Account]]:
    return make_accounts(3)


def _pool(store: ShareStore, **kw: object) -> SessionPool:
    return SessionPool(store.get, **kw)  # type: ignore[arg-type]


def _nonces_of(pool: SessionPool, session_id: str) -> bytearray:
    """The session's nonce buffer (to check it gets zeroed), via the private session record."""
    session = pool._sessions[session_id]
    assert session.nonces is not None
    buf: bytearray = getattr(session.nonces, "_buf")  # noqa: B009 - the suite class is private
    return buf


def _expect(kind: PoolErrorKind) -> pytest.RaisesExc[PoolError]:
    return pytest.raises(PoolError, check=lambda e: e.kind is kind)


async def test_full_session_verifies(world: tuple[ShareStore, dict[str, Account]]) -> None:
    store, accounts = world
    pool = _pool(store)
    acct = accounts["acct-0"]
    result = pool.commit("acct-0", "s1")
    assert pool.open_sessions == 1
    peer = Peer(acct)
    commitments = sorted_commitments(result.commitment, peer.commitment)
    buf = _nonces_of(pool, "s1")
    ident, share = pool.sign("s1", b"pay 1", commitments)
    assert ident == acct.service.identifier
    assert buf == bytearray(64)  # consumed and zeroed
    assert pool.open_sessions == 0
    sig = peer.aggregate(
        b"pay 1",
        commitments,
        {ident: share, acct.peer.identifier: peer.sign(b"pay 1", commitments)},
    )
    nacl.signing.VerifyKey(acct.group_public_key).verify(b"pay 1", sig)


async def test_commit_retry_returns_same_commitment(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    store, _ = world
    pool = _pool(store)
    a = pool.commit("acct-0", "s1")
    b = pool.commit("acct-0", "s1")
    assert a == b
    assert pool.open_sessions == 1
    with _expect(PoolErrorKind.ALREADY_EXISTS):
        pool.commit("acct-1", "s1")


async def test_unknown_account_and_session(world: tuple[ShareStore, dict[str, Account]]) -> None:
    store, _ = world
    pool = _pool(store)
    with _expect(PoolErrorKind.NOT_FOUND):
        pool.commit("nope", "s1")
    assert pool.open_sessions == 0
    with _expect(PoolErrorKind.NOT_FOUND):
        pool.sign("s1", b"m", [])
    with _expect(PoolErrorKind.NOT_FOUND):
        pool.abort("s1")
    with _expect(PoolErrorKind.INVALID_ARGUMENT):
        pool.commit("acct-0", "")


async def test_pool_full_then_slot_freed(world: tuple[ShareStore, dict[str, Account]]) -> None:
    store, accounts = world
    pool = _pool(store, max_sessions=2)
    pool.commit("acct-0", "a")
    r = pool.commit("acct-1", "b")
    with _expect(PoolErrorKind.RESOURCE_EXHAUSTED):
        pool.commit("acct-2", "c")
    peer = Peer(accounts["acct-1"])
    pool.sign("b", b"m", sorted_commitments(r.commitment, peer.commitment))
    pool.commit("acct-2", "c")
    pool.abort("a")
    pool.commit("acct-0", "d")
    assert pool.open_sessions == 2


async def test_sign_retry_and_reuse(world: tuple[ShareStore, dict[str, Account]]) -> None:
    store, accounts = world
    pool = _pool(store)
    r = pool.commit("acct-0", "s")
    peer = Peer(accounts["acct-0"])
    commitments = sorted_commitments(r.commitment, peer.commitment)
    first = pool.sign("s", b"m", commitments)
    assert pool.sign("s", b"m", commitments) == first  # byte-identical retry
    with _expect(PoolErrorKind.FAILED_PRECONDITION):
        pool.sign("s", b"other message", commitments)
    other = Peer(accounts["acct-0"])
    with _expect(PoolErrorKind.FAILED_PRECONDITION):
        pool.sign("s", b"m", sorted_commitments(r.commitment, other.commitment))
    # a Commit retry after Sign still answers the same (public) commitment, with no slot
    assert pool.commit("acct-0", "s").commitment == r.commitment
    assert pool.open_sessions == 0


async def test_invalid_input_keeps_session_usable(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    store, accounts = world
    pool = _pool(store)
    r = pool.commit("acct-0", "s")
    peer = Peer(accounts["acct-0"])
    bad = SigningCommitment(
        peer.commitment.identifier, b"\x01" + bytes(31), peer.commitment.binding
    )
    with _expect(PoolErrorKind.INVALID_ARGUMENT):
        pool.sign("s", b"m", sorted_commitments(r.commitment, bad))
    with _expect(PoolErrorKind.INVALID_ARGUMENT):
        pool.sign("s", b"m", [r.commitment])  # too few signers
    assert pool.open_sessions == 1
    pool.sign("s", b"m", sorted_commitments(r.commitment, peer.commitment))


async def test_abort_zeroes_and_frees(world: tuple[ShareStore, dict[str, Account]]) -> None:
    store, _ = world
    pool = _pool(store)
    pool.commit("acct-0", "s")
    buf = _nonces_of(pool, "s")
    assert buf != bytearray(64)
    pool.abort("s")
    assert buf == bytearray(64)
    assert pool.open_sessions == 0
    with _expect(PoolErrorKind.NOT_FOUND):
        pool.sign("s", b"m", [])


async def test_ttl_expiry_zeroes_nonces(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    store, _ = world
    pool = _pool(store, session_ttl_s=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        t0 = trio.current_time()
        pool.commit("acct-0", "early")
        early = _nonces_of(pool, "early")
        await trio.sleep(30)
        pool.commit("acct-1", "late")
        late = _nonces_of(pool, "late")
        await trio.sleep(30.5)  # t0 + 60.5: "early" expired at exactly t0 + 60
        assert early == bytearray(64)
        assert late != bytearray(64)
        assert pool.open_sessions == 1
        with _expect(PoolErrorKind.NOT_FOUND):
            pool.sign("early", b"m", [])
        await trio.sleep_until(t0 + 90)
        await trio.testing.wait_all_tasks_blocked()
        assert late == bytearray(64)
        assert pool.open_sessions == 0
        assert pool.tracked_sessions == 0
        nursery.cancel_scope.cancel()


async def test_wait_idle_returns_when_the_last_open_session_ends(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    """What a drain waits for: every open session signed, aborted or expired."""
    store, accounts = world
    pool = _pool(store, session_ttl_s=60.0)
    await pool.wait_idle()  # nothing open: returns at once
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        t0 = trio.current_time()
        signed = pool.commit("acct-0", "signed")
        pool.commit("acct-1", "aborted")
        pool.commit("acct-2", "expires")
        idle_at: list[float] = []

        async def waiter() -> None:
            await pool.wait_idle()
            idle_at.append(trio.current_time())

        nursery.start_soon(waiter)
        await trio.sleep(1)
        peer = Peer(accounts["acct-0"])
        pool.sign("signed", b"m", sorted_commitments(signed.commitment, peer.commitment))
        await trio.sleep(1)
        pool.abort("aborted")
        await trio.sleep(1)
        assert idle_at == []  # "expires" still holds its slot
        await trio.sleep_until(t0 + 61)
        assert idle_at == [pytest.approx(t0 + 60)]  # woken by the reaper's expiry
        nursery.cancel_scope.cancel()


async def test_expired_session_refused_even_before_reaper_runs(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    store, _ = world
    pool = _pool(store, session_ttl_s=1.0)  # no reaper running
    pool.commit("acct-0", "s")
    buf = _nonces_of(pool, "s")
    await trio.sleep(1.0)
    with _expect(PoolErrorKind.NOT_FOUND):
        pool.sign("s", b"m", [])
    assert buf == bytearray(64)
    assert pool.open_sessions == 0


async def test_reaper_cancellation_zeroes_everything(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    store, _ = world
    pool = _pool(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        pool.commit("acct-0", "a")
        pool.commit("acct-1", "b")
        bufs = [_nonces_of(pool, "a"), _nonces_of(pool, "b")]
        nursery.cancel_scope.cancel()
    assert all(b == bytearray(64) for b in bufs)
    assert pool.open_sessions == 0


async def test_drain_refuses_new_sessions_but_finishes_open_ones(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    store, accounts = world
    pool = _pool(store)
    r = pool.commit("acct-0", "open")
    pool.stop_accepting()
    with _expect(PoolErrorKind.UNAVAILABLE):
        pool.commit("acct-1", "new")
    peer = Peer(accounts["acct-0"])
    pool.sign("open", b"m", sorted_commitments(r.commitment, peer.commitment))


async def test_frozen_account(world: tuple[ShareStore, dict[str, Account]]) -> None:
    store, accounts = world
    frozen: set[str] = set()
    pool = SessionPool(store.get, is_frozen=frozen.__contains__)
    r = pool.commit("acct-0", "s")
    frozen.add("acct-0")
    with _expect(PoolErrorKind.FAILED_PRECONDITION):
        pool.commit("acct-0", "t")
    peer = Peer(accounts["acct-0"])
    with _expect(PoolErrorKind.FAILED_PRECONDITION):
        pool.sign("s", b"m", sorted_commitments(r.commitment, peer.commitment))
    frozen.discard("acct-0")
    pool.sign("s", b"m", sorted_commitments(r.commitment, peer.commitment))


async def test_overloaded_refuses_new_sessions_only(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    store, accounts = world
    reason: list[str | None] = [None]
    pool = SessionPool(store.get, overloaded=lambda: reason[0])
    r = pool.commit("acct-0", "open")
    reason[0] = "memory above the hard watermark (91% of 1024 MiB)"
    with _expect(PoolErrorKind.RESOURCE_EXHAUSTED) as info:
        pool.commit("acct-1", "new")
    assert "hard watermark" in str(info.value)
    assert pool.commit("acct-0", "open") == r  # a retry of an open session still answers
    peer = Peer(accounts["acct-0"])
    pool.sign("open", b"m", sorted_commitments(r.commitment, peer.commitment))
    reason[0] = None
    pool.commit("acct-1", "new")


async def test_signed_sessions_are_kept_as_untracked_tuples(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    """Retry records cost the garbage collector nothing, and the reaper drops them."""
    import gc

    store, accounts = world
    pool = _pool(store, session_ttl_s=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        for i in range(3):
            r = pool.commit("acct-0", f"s{i}")
            peer = Peer(accounts["acct-0"])
            pool.sign(f"s{i}", b"m", sorted_commitments(r.commitment, peer.commitment))
        assert pool.tracked_sessions == 3
        assert pool.open_sessions == 0
        gc.collect()
        assert not any(gc.is_tracked(record) for record in pool._signed.values())
        await trio.sleep(60)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.tracked_sessions == 0
        with _expect(PoolErrorKind.NOT_FOUND):
            pool.abort("s0")
        nursery.cancel_scope.cancel()


async def test_stats_count_every_way_a_session_starts_ends_or_is_refused(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    """What the enclave's metrics read: opened, and ended by signing, abort, expiry, shutdown;
    refused for a full pool, a drain, memory and a frozen account. Retries count once."""
    from trio_sign.enclave._pool import PoolStats

    store, accounts = world
    overload: list[str] = []
    frozen: set[str] = set()
    pool = _pool(
        store,
        max_sessions=2,
        session_ttl_s=10,
        is_frozen=frozen.__contains__,
        overloaded=lambda: overload[0] if overload else None,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        acct = accounts["acct-0"]
        mine = pool.commit("acct-0", "signed").commitment
        pool.commit("acct-0", "signed")  # a retry: no new session
        peer = Peer(acct)
        cs = sorted_commitments(mine, peer.commitment)
        pool.sign("signed", b"m", cs)
        pool.sign("signed", b"m", cs)  # a retry: signed once
        pool.commit("acct-1", "aborted")
        pool.abort("aborted")
        pool.commit("acct-1", "expires")
        pool.commit("acct-2", "fills")
        with _expect(PoolErrorKind.RESOURCE_EXHAUSTED):
            pool.commit("acct-2", "no-room")
        await trio.sleep(11)  # "expires" and "fills" run out
        frozen.add("acct-2")
        with _expect(PoolErrorKind.FAILED_PRECONDITION):
            pool.commit("acct-2", "frozen")
        overload.append("memory")
        with _expect(PoolErrorKind.RESOURCE_EXHAUSTED):
            pool.commit("acct-1", "heavy")
        overload.clear()
        pool.stop_accepting()
        with _expect(PoolErrorKind.UNAVAILABLE):
            pool.commit("acct-1", "late")
        pool.start_accepting()
        assert pool.accepting
        pool.commit("acct-1", "at-shutdown")
        nursery.cancel_scope.cancel()
    assert pool.stats == PoolStats(
        opened=5,
        signed=1,
        aborted=1,
        expired=2,
        closed_at_shutdown=1,
        failed=0,
        refused_full=1,
        refused_draining=1,
        refused_memory=1,
        refused_frozen=1,
    )
