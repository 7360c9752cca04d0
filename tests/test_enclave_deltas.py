"""The enclave's deltas (docs/key-lifecycle.md §1-4, §6): storing through the parent (the real
parent code and small fakes speaking the doc's frames), conflicts, timeouts, pushes while
serving, the boot's deltas, and the crash points of a store, all in virtual time."""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from trio_sign.crypto import SigningCommitment
from trio_sign.enclave import SessionPool
from trio_sign.enclave._deltas import (
    DeltaStatus,
    DeltaStoreError,
    DeltaWriter,
    EnclaveDeltas,
    store_frames,
)
from trio_sign.enclave._identity import IdentityKey
from trio_sign.enclave._preload import _load_boot_deltas
from trio_sign.nitro import ChannelMessage, HelloMessage, MessageStream, PreloadResultMessage
from trio_sign.nitro._channel import (
    ChannelProtocolError,
    ChunkedBody,
    DeltaChunkMessage,
    DeltaEndMessage,
    DeltaLoadedMessage,
    DeltaRefusedMessage,
    DeltaStoredMessage,
    DeltaStoreFailedMessage,
    DeltaStoreMessage,
)
from trio_sign.parent._deltas import Deltas, FileDeltaStore, delta_frames, serve_deltas_connection
from trio_sign.shares import BundleTrust, DevKeyFile, ShareRecord, ShareStore, encode_bundle
from trio_sign.shares._deltas import DeltaChain, seal_delta
from trio_sign.shares._signature import CeremonyKey

from .enclave_helpers import Account, Peer, make_accounts, sorted_commitments

TAG = "0123456789ab"


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _identity(seed: int) -> IdentityKey:
    return IdentityKey(CeremonyKey.from_seed(bytes([seed]) * 32))


def fresh_accounts(prefix: str, n: int) -> dict[str, Account]:
    """``n`` dealt 2-of-3 accounts named ``prefix-i`` (the service's and a peer's shares)."""
    store, accounts = make_accounts(n)
    store.close()
    out: dict[str, Account] = {}
    for i, account in enumerate(accounts.values()):
        aid = f"{prefix}-{i}"
        out[aid] = Account(
            aid,
            account.group_public_key,
            dataclasses.replace(account.service, account_id=aid),
            dataclasses.replace(account.peer, account_id=aid),
        )
    return out


@dataclass
class World:
    base: bytes
    key: DevKeyFile
    ident: IdentityKey
    accounts: dict[str, Account]
    dir: Path

    def load_base(self) -> ShareStore:
        return ShareStore.load_sealed(io.BytesIO(self.base), self.key)

    def node(self, *, store_timeout_s: float = 30.0, store_retries: int = 5) -> Node:
        store = self.load_base()
        assert store.fingerprint is not None
        wrap = self.ident.delta_key_wrap()
        statuses: list[DeltaStatus] = []
        deltas = EnclaveDeltas(
            store,
            DeltaChain(store.fingerprint),
            provider=wrap,
            signer=self.ident,
            signing_keys=(self.ident.public_key,),
            on_change=statuses.append,
        )
        writer = DeltaWriter(deltas, store_timeout_s=store_timeout_s, store_retries=store_retries)
        return Node(store, deltas, writer, statuses)

    def file_store(self) -> FileDeltaStore:
        store = FileDeltaStore(self.dir / "deltas", host_tag=TAG)
        store.recover()
        return store

    def parent(self, **kw: Any) -> Deltas:
        kw.setdefault("offload", inline)
        kw.setdefault("poll_interval_s", 60.0)
        return Deltas(self.file_store(), **kw)

    async def reboot(self) -> tuple[ShareStore, DeltaChain]:
        """A new boot: the base, then every stored delta as the parent's preload streams them
        (``delta_frames``), through the enclave's boot path."""
        store = self.load_base()
        assert store.fingerprint is not None
        chain = DeltaChain(store.fingerprint)
        files = self.file_store()
        sequences = files.list().sequences
        parent_end, enclave_end = trio.testing.memory_stream_pair()
        parent, enclave = MessageStream(parent_end), MessageStream(enclave_end)

        async def stream() -> None:
            for sequence in sequences:
                for message in delta_frames(sequence, files.get(sequence)):
                    await parent.send(message)

        with self.ident.delta_key_wrap() as wrap:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream)
                await _load_boot_deltas(
                    enclave,
                    store,
                    chain,
                    len(sequences),
                    provider=wrap,
                    trust=BundleTrust.pinned([self.ident.public_key], kind="delta"),
                    verify="lazy",
                    check=None,
                )
        return store, chain


@dataclass
class Node:
    store: ShareStore
    deltas: EnclaveDeltas
    writer: DeltaWriter
    statuses: list[DeltaStatus]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    _, base_accounts = make_accounts(4)
    _.close()
    key = DevKeyFile.create(tmp_path / "dev.key")
    base = encode_bundle([a.service for a in base_accounts.values()], key, chunk_size=1024)
    with _identity(21) as ident:
        yield World(base, key, ident, base_accounts, tmp_path)


def records_of(accounts: dict[str, Account]) -> list[ShareRecord]:
    return [a.service for a in accounts.values()]


async def connect_parent(nursery: trio.Nursery, node: Node, parent: Deltas) -> trio.CancelScope:
    """The real parent's deltas connection to ``node``; cancel the scope to cut it."""
    parent_end, enclave_end = trio.testing.memory_stream_pair()
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(serve_deltas_connection, parent_end, parent)
                messages = MessageStream(enclave_end)
                await messages.send(HelloMessage(channel="deltas"))
                await node.writer.converse(messages)

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return scope


def booted(parent: Deltas, node: Node) -> None:
    parent.mark_booted(
        PreloadResultMessage(
            ok=True,
            accounts=len(node.store),
            sha256=node.store.fingerprint,
            deltas=node.deltas.chain.count,
            deltas_head=node.deltas.chain.head,
        )
    )


def sign_with(pool: SessionPool, account: Account, session_id: str, message: bytes) -> bytes:
    """A whole FROST session through the pool, the peer's share added; the Ed25519 signature
    (verified by libsodium)."""
    result = pool.commit(account.account_id, session_id)
    peer = Peer(account)
    commitments = sorted_commitments(cast(SigningCommitment, result.commitment), peer.commitment)
    ident, share = pool.sign(session_id, message, commitments)
    return peer.complete_and_verify(message, commitments, ident, share)


# -- store and acknowledge ---------------------------------------------------------------------


async def test_store_round_trip_with_the_parent(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node()
    parent = world.parent()
    new = fresh_accounts("dkg", 1)
    async with trio.open_nursery() as nursery:
        await connect_parent(nursery, node, parent)
        booted(parent, node)
        sequence, head = await node.writer.store(records_of(new), "create", "dkg-1")
        assert sequence == 1
        assert head == node.deltas.chain.head
        assert (world.dir / "deltas" / "delta-00000001.enc").exists()
        assert node.deltas.find_dkg("dkg-1") == (1, head)
        assert node.statuses == [DeltaStatus(1, head)]
        pool = SessionPool(node.store.get)
        sign_with(pool, new["dkg-0"], "s1", b"hello")
        await trio.testing.wait_all_tasks_blocked()
        assert parent.stats.enclave_sequence == 1  # our delta_loaded reached the parent
        assert parent.stats.enclave_head == head
        await trio.sleep(120)
        assert parent.stats.pushed_total == 0  # it never pushes our own delta back
        nursery.cancel_scope.cancel()


async def test_a_conflict_is_sealed_again_on_the_winners_head(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    """Two replicas share a location: the loser gets delta_conflict, loads the pushed winner,
    seals again on it and stores sequence 2; the winner then gets the loser's delta pushed."""
    a, b = world.node(), world.node()
    parent_a, parent_b = world.parent(), world.parent(poll_interval_s=1.0)
    mine, theirs = fresh_accounts("a", 1), fresh_accounts("b", 1)
    async with trio.open_nursery() as nursery:
        await connect_parent(nursery, a, parent_a)
        await connect_parent(nursery, b, parent_b)
        booted(parent_a, a)
        booted(parent_b, b)
        assert await b.writer.store(records_of(theirs), "create", "dkg-b") == (
            1,
            b.deltas.chain.head,
        )
        assert a.deltas.chain.count == 0  # a has not polled yet (60 s)
        start = trio.current_time()
        sequence, head = await a.writer.store(records_of(mine), "create", "dkg-a")
        assert trio.current_time() == start  # the winner was pushed at once, no poll waited
        assert sequence == 2
        assert parent_a.stats.conflicts_total == 1
        assert a.deltas.find_dkg("dkg-b") == (1, b.deltas.chain.head)
        with trio.fail_after(5):
            await b.deltas.wait_for(2)
        assert b.deltas.chain.head == a.deltas.chain.head == head
        for node in (a, b):
            assert "a-0" in node.store
            assert "b-0" in node.store
            sign_with(SessionPool(node.store.get), mine["a-0"], "s", b"m")
        nursery.cancel_scope.cancel()


async def test_conflicts_beyond_store_retries_give_up(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node(store_retries=0)
    parent = world.parent()
    other = world.node()
    files = world.file_store()
    async with trio.open_nursery() as nursery:
        await connect_parent(nursery, node, parent)
        booted(parent, node)
        # Another replica's delta 1 lands in the store just before ours.
        sealed = other.writer._seal(records_of(fresh_accounts("o", 1)), "create", "dkg-o")
        files.put(1, sealed.data)
        with pytest.raises(DeltaStoreError) as info:
            await node.writer.store(records_of(fresh_accounts("n", 1)), "create", "dkg-n")
        assert info.value.reason == "conflicts"
        assert node.deltas.chain.count == 1  # the winner was loaded
        assert "n-0" not in node.store
        nursery.cancel_scope.cancel()


class FakeParent:
    """The parent's end speaking the doc's frames, scripted by the test."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.messages = MessageStream(stream)

    async def receive_store(self) -> tuple[int, bytes]:
        hello = await self.messages.receive()
        if isinstance(hello, HelloMessage):
            request = await self.messages.receive()
        else:
            request = hello
        assert isinstance(request, DeltaStoreMessage)
        data = b""
        while True:
            message = await self.messages.receive()
            if isinstance(message, DeltaEndMessage):
                break
            assert isinstance(message, DeltaChunkMessage)
            data += message.data
        assert len(data) == request.total_bytes
        return request.sequence, data

    async def send(self, *messages: ChannelMessage) -> None:
        for message in messages:
            await self.messages.send(message)


@asynccontextmanager
async def fake_connection(node: Node) -> AsyncIterator[tuple[FakeParent, trio.Nursery]]:
    parent_end, enclave_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.writer.converse, MessageStream(enclave_end))
        await trio.testing.wait_all_tasks_blocked()
        yield FakeParent(parent_end), nursery
        nursery.cancel_scope.cancel()


async def test_no_answer_within_the_timeout_is_an_error_and_applies_nothing(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node(store_timeout_s=7.0)
    new = fresh_accounts("t", 1)
    async with fake_connection(node) as (parent, _):
        start = trio.current_time()

        async def swallow() -> None:
            await parent.receive_store()  # and never answer

        async with trio.open_nursery() as nursery:
            nursery.start_soon(swallow)
            with pytest.raises(DeltaStoreError) as info:
                await node.writer.store(records_of(new), "create", "dkg-t")
        assert info.value.reason == "timeout"
        assert trio.current_time() - start == 7.0
        assert node.deltas.chain.count == 0
        assert "t-0" not in node.store
        await trio.testing.wait_all_tasks_blocked()
        assert not node.writer.connected  # dropped: a late answer cannot be mistaken


async def test_a_store_failure_and_a_wrong_fingerprint_are_errors(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node()
    for reply, reason in (
        (lambda s, _: DeltaStoreFailedMessage(sequence=s, reason="disk full"), "store_failed"),
        (lambda s, _: DeltaStoredMessage(sequence=s, sha256="ab" * 32), "protocol"),
    ):
        async with fake_connection(node) as (parent, _):

            async def answer(make: Callable[[int, bytes], ChannelMessage] = reply) -> None:
                sequence, data = await parent.receive_store()
                await parent.send(make(sequence, data))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer)
                with pytest.raises(DeltaStoreError) as info:
                    await node.writer.store(records_of(fresh_accounts("f", 1)), "create", "d")
            assert info.value.reason == reason
            assert node.deltas.chain.count == 0


async def test_a_delta_that_would_be_refused_is_never_sent(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node()
    existing = next(iter(world.accounts.values())).service
    async with fake_connection(node):
        with pytest.raises(DeltaStoreError) as info:
            await node.writer.store([existing], "create", "dkg-x")
    assert info.value.reason == "delta_account_exists"
    with _identity(22) as other:
        bare = EnclaveDeltas(node.store, node.deltas.chain, provider=None)
        with pytest.raises(DeltaStoreError) as info:
            await DeltaWriter(bare).store([existing], "create", "d")
        assert info.value.reason == "no_identity"
        assert other.public_key != world.ident.public_key


async def test_pushes_that_do_not_verify_are_refused(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node()
    assert node.store.fingerprint is not None
    with _identity(23) as stranger, world.ident.delta_key_wrap() as wrap:
        forged = seal_delta(
            records_of(fresh_accounts("x", 1)),
            sequence=1,
            previous=node.store.fingerprint,
            operation="create",
            dkg_id="d",
            provider=wrap,
            signer=stranger,
        )
    async with fake_connection(node) as (parent, _):
        for data, reason in ((forged.data, "bundle_signer_unknown"), (b"junk", "bad_magic")):
            await parent.send(*delta_frames(1, data))
            answer = await parent.messages.receive()
            assert answer == DeltaRefusedMessage(sequence=1, reason=reason)
    assert node.deltas.chain.count == 0
    assert "x-0" not in node.store


# -- hot add while serving ---------------------------------------------------------------------


async def test_a_pushed_delta_becomes_signable_without_a_restart_or_a_failed_session(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node()
    parent = world.parent(poll_interval_s=1.0)
    pool = SessionPool(node.store.get)
    base_account = next(iter(world.accounts.values()))
    open_session = pool.commit(base_account.account_id, "open")
    peer = Peer(base_account)
    new = fresh_accounts("hot", 2)
    other = world.node()  # the replica that made the accounts
    sealed = other.writer._seal(records_of(new), "create", "dkg-hot")
    async with trio.open_nursery() as nursery:
        await connect_parent(nursery, node, parent)
        booted(parent, node)
        with pytest.raises(Exception, match="unknown"):
            pool.commit("hot-0", "before")
        world.file_store().put(1, sealed.data)  # the other replica's parent stored it
        stored_at = trio.current_time()
        with trio.fail_after(5):
            await node.deltas.wait_for(1)
        assert trio.current_time() - stored_at <= 1.0  # within one poll
        for i, account in enumerate(new.values()):
            sign_with(pool, account, f"new-{i}", b"after the hot add")
        # the session opened before the delta still completes
        commitments = sorted_commitments(
            cast(SigningCommitment, open_session.commitment), peer.commitment
        )
        ident, share = pool.sign("open", b"old account", commitments)
        peer.complete_and_verify(b"old account", commitments, ident, share)
        await trio.testing.wait_all_tasks_blocked()
        assert parent.stats.enclave_sequence == 1
        assert node.statuses[-1] == DeltaStatus(1, sealed.fingerprint)
        nursery.cancel_scope.cancel()


# -- boot --------------------------------------------------------------------------------------


def _snapshot(store: ShareStore) -> dict[str, tuple[object, ...]]:
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
        )
    return out


async def test_a_boot_with_the_base_and_n_deltas_is_the_live_store(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node()
    parent = world.parent()
    async with trio.open_nursery() as nursery:
        await connect_parent(nursery, node, parent)
        booted(parent, node)
        for i in range(6):
            await node.writer.store(records_of(fresh_accounts(f"d{i}", 3)), "create", f"dkg-{i}")
        nursery.cancel_scope.cancel()
    rebooted, chain = await world.reboot()
    with rebooted:
        assert (chain.count, chain.head) == (node.deltas.chain.count, node.deltas.chain.head)
        assert len(rebooted) == 4 + 18
        assert _snapshot(rebooted) == _snapshot(node.store)
        assert chain.find_dkg("dkg-3") == node.deltas.find_dkg("dkg-3")


async def test_a_boot_delta_that_is_refused_stops_the_chain_there(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node()
    files = world.file_store()
    first = node.writer._seal(records_of(fresh_accounts("g", 1)), "create", "dkg-g")
    node.deltas.apply(first.data)
    second = node.writer._seal(records_of(fresh_accounts("h", 1)), "create", "dkg-h")
    files.put(1, first.data)
    files.put(2, b"not a delta at all")
    files.put(3, second.data)  # chains on 1, but 2 came first
    rebooted, chain = await world.reboot()
    with rebooted:
        assert chain.count == 1
        assert "g-0" in rebooted
        assert "h-0" not in rebooted


# -- crash points ------------------------------------------------------------------------------


CRASH_POINTS = ("before_seal", "sealed_not_stored", "stored_not_acked", "acked")


@pytest.mark.parametrize("crash", CRASH_POINTS)
async def test_a_crash_at_every_step_of_a_store_loses_no_reported_account(
    world: World, autojump_clock: trio.abc.Clock, crash: str
) -> None:
    """Kill the enclave (cancel its tasks) at each step of storing a delta, then reboot from
    what the store holds: every account a store() reported exists; one whose delta reached
    the store exists (and its DKG is found, so a retried DkgRound3 answers, §6); no other."""
    node = world.node()
    parent = world.parent()
    files = world.file_store()
    # An earlier, acknowledged delta: it must survive every crash.
    earlier = fresh_accounts("early", 1)
    new = fresh_accounts("new", 1)
    reported: list[str] = []
    parent_end, enclave_end = trio.testing.memory_stream_pair()
    fake = FakeParent(parent_end)

    async def parent_side() -> None:
        # The real parent's checks and put (FileDeltaStore: fsync, link), scripted replies.
        for round_ in ("earlier", "new"):
            sequence, data = await fake.receive_store()
            if round_ == "new" and crash == "sealed_not_stored":
                enclave_scope.cancel()  # the enclave dies before the parent writes
                return
            reply = await parent.store_delta(sequence, data)
            if round_ == "new" and crash == "stored_not_acked":
                enclave_scope.cancel()  # durable, but the enclave dies before the answer
                return
            await fake.send(reply)
            await fake.messages.receive()  # delta_loaded

    async def enclave_side() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.writer.converse, MessageStream(enclave_end))
            await node.writer.store(records_of(earlier), "create", "dkg-early")
            reported.append("early-0")
            if crash != "before_seal":  # there the DKG's secrets die before any seal
                await node.writer.store(records_of(new), "create", "dkg-new")
                reported.append("new-0")
            nursery.cancel_scope.cancel()  # the crash (for "acked": after the answer)

    async with trio.open_nursery() as outer:
        outer.start_soon(parent_side)
        with trio.CancelScope() as enclave_scope:
            await enclave_side()
        outer.cancel_scope.cancel()
    node.store.close()  # the process is gone

    stored = files.list().sequences
    rebooted, chain = await world.reboot()
    with rebooted:
        base = set(world.accounts)
        present = set(rebooted._index) - base
        assert set(reported) <= present  # every reported account survives
        expected = {"early-0"} | ({"new-0"} if crash in ("stored_not_acked", "acked") else set())
        assert present == expected  # and no other
        assert len(stored) == len(expected)
        if "new-0" in expected:
            assert chain.find_dkg("dkg-new") == (2, chain.head)  # a retried DkgRound3's answer
            assert chain.dkg_accounts("dkg-new") == ("new-0",)
        else:
            assert chain.find_dkg("dkg-new") is None  # NOT_FOUND: no account


# -- frames ------------------------------------------------------------------------------------


def test_store_frames_cut_a_delta_into_chunks_of_at_most_256_kib(world: World) -> None:
    node = world.node()
    sealed = node.writer._seal(records_of(fresh_accounts("c", 2)), "create", "d")
    big = dataclasses.replace(sealed, data=sealed.data * 700)
    frames = store_frames(big)
    assert frames[0] == DeltaStoreMessage(sequence=1, total_bytes=len(big.data))
    chunks = [f for f in frames if isinstance(f, DeltaChunkMessage)]
    assert all(0 < len(c.data) <= 256 * 1024 for c in chunks)
    assert b"".join(c.data for c in chunks) == big.data
    assert isinstance(frames[-1], DeltaEndMessage)
    assert isinstance(DeltaLoadedMessage(sequence=1, head="ab" * 32, accounts=1), ChannelMessage)


# -- boot time ---------------------------------------------------------------------------------


def _clones(prefix: str, n: int, template: ShareRecord) -> list[ShareRecord]:
    """``n`` records named ``prefix-i`` that share one valid key share (the loaders do not
    care, and dealing a million keys would take minutes)."""
    return [dataclasses.replace(template, account_id=f"{prefix}-{i:07d}") for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("base_accounts", [100_000, 1_000_000])
def test_boot_time_base_alone_and_with_1000_deltas(world: World, base_accounts: int) -> None:
    """A base alone vs. the same base plus 1,000 deltas of 100 accounts each, through the
    boot's code (the base fed in 1 MiB pieces to a SealedLoader, then each delta verified and
    applied lazily, as the preload does). The issue's target is 1M + 100k in 1,000 deltas
    <= 2x the base alone; with a 100k base the deltas double the accounts, so the records
    alone make it 2x (both are printed; docs/enclave.md has the numbers)."""
    from trio_sign.shares import SealedLoader
    from trio_sign.shares._deltas import apply_delta

    from .share_helpers import make_record

    template = make_record("template")
    key = world.key
    base = encode_bundle(_clones("base", base_accounts, template), key)
    with ShareStore.load_sealed(io.BytesIO(base), key) as probe:
        assert probe.fingerprint is not None
        fingerprint = probe.fingerprint
    chain = DeltaChain(fingerprint)
    deltas: list[bytes] = []
    with world.ident.delta_key_wrap() as wrap:
        for d in range(1000):
            sealed = seal_delta(
                _clones(f"delta-{d:04d}", 100, template),
                sequence=chain.next_sequence,
                previous=chain.next_previous,
                operation="create",
                dkg_id=f"dkg-{d}",
                provider=wrap,
                signer=world.ident,
            )
            header = {
                "kind": "delta",
                "sequence": sealed.sequence,
                "previous": sealed.previous,
                "operation": "create",
                "dkg_id": sealed.dkg_id,
            }
            chain.advance(header, sealed.fingerprint)
            deltas.append(sealed.data)
        trust = BundleTrust.pinned([world.ident.public_key], kind="delta")

        def boot(with_deltas: bool) -> ShareStore:
            loader = SealedLoader(key, total_bytes=len(base))
            for at in range(0, len(base), 1 << 20):
                loader.feed(base[at : at + (1 << 20)])
            store = loader.finish()
            if with_deltas:
                assert store.fingerprint is not None
                boot_chain = DeltaChain(store.fingerprint)
                for data in deltas:
                    apply_delta(store, boot_chain, data, provider=wrap, trust=trust, verify="lazy")
            return store

        times: dict[bool, float] = {}
        for with_deltas in (False, True, False, True):
            t0 = time.perf_counter()
            store = boot(with_deltas)
            elapsed = time.perf_counter() - t0
            times[with_deltas] = min(times.get(with_deltas, elapsed), elapsed)
            assert len(store) == base_accounts + (100_000 if with_deltas else 0)
            store.close()
    ratio = times[True] / times[False]
    print(
        f"\nboot: base {base_accounts:,} accounts {times[False]:.3f} s; plus 1,000 deltas x 100 "
        f"accounts {times[True]:.3f} s; ratio {ratio:.2f}"
    )
    assert ratio <= (2.0 if base_accounts >= 1_000_000 else 4.0)


# -- the production tree -----------------------------------------------------------------------


async def test_serve_enclave_boots_the_deltas_shows_them_and_hot_adds(
    tmp_path: Path, nsm_dir: Path
) -> None:
    """serve_enclave against the real parent code over UNIX sockets: the boot loads the base
    and the stored deltas; GetStatus and each attestation show the head at that moment; a
    delta another replica stores is pushed and becomes signable without a restart; the
    enclave's own store() goes through the deltas channel."""
    import functools
    import hashlib

    from proto_min import sign_service_pb2 as pb
    from trio_sign.enclave import EnclaveConfig, serve_enclave
    from trio_sign.enclave._measured import development_config
    from trio_sign.nitro import LocalNsm, verify_attestation
    from trio_sign.nitro._binding import decode_binding
    from trio_sign.parent import DevRecipientKms, serve_log_connection, serve_status_connection
    from trio_sign.parent._deltas import serve_deltas
    from trio_sign.parent._preload import serve_preload
    from trio_sign.rpc import open_grpc_channel
    from trio_sign.transport import connect, open_listeners

    d = tmp_path / "sock"
    d.mkdir()
    _, base_accounts = make_accounts(3)
    _.close()
    key = DevKeyFile.create(d / "dev.key")
    bundle = d / "bundle.enc"
    bundle.write_bytes(encode_bundle(records_of(base_accounts), key, chunk_size=1024))
    fingerprint = hashlib.sha256(bundle.read_bytes()).hexdigest()
    seed = 31
    world = World(bundle.read_bytes(), key, _identity(seed), base_accounts, tmp_path)
    maker = world.node()  # another replica: it seals the deltas the store holds
    files = world.file_store()
    for i in range(2):
        sealed = maker.writer._seal(records_of(fresh_accounts(f"boot{i}", 1)), "create", f"b{i}")
        maker.deltas.apply(sealed.data)
        files.put(i + 1, sealed.data)
    boot_head = maker.deltas.chain.head
    hub = Deltas(files, poll_interval_s=0.5)
    nsm = LocalNsm.from_dir(nsm_dir)
    kms = DevRecipientKms(key, root_pem=(nsm_dir / "local-nsm-root.pem").read_bytes())

    async def boot(stream: trio.SocketStream) -> None:
        try:
            hub.new_run()
            result = await serve_preload(MessageStream(stream), bundle, kms, deltas=hub)
            hub.mark_booted(result)
        finally:
            await stream.aclose()

    config = EnclaveConfig(
        grpc_listen=f"unix://{d}/grpc.sock",
        nsm="local",
        measured=dataclasses.replace(
            development_config(), delta_identity_key=world.ident.public_key
        ),
        preload_address=f"unix://{d}/boot.sock",
        status_address=f"unix://{d}/status.sock",
        log_address=f"unix://{d}/logs.sock",
        deltas_address=f"unix://{d}/deltas.sock",
        preload_timeout_s=20.0,
        drain_grace_s=1.0,
    )
    S = "/trio_sign.v1.SignService/"
    async with trio.open_nursery() as nursery:
        for name, handler in (
            ("boot", boot),
            ("status", functools.partial(serve_status_connection, on=lambda m: None)),
            ("logs", functools.partial(serve_log_connection, on=lambda m: None)),
        ):
            listeners = await open_listeners(f"unix://{d}/{name}.sock")
            await nursery.start(trio.serve_listeners, handler, listeners)
        await nursery.start(serve_deltas, await open_listeners(f"unix://{d}/deltas.sock"), hub)
        handle = await nursery.start(
            functools.partial(serve_enclave, config, nsm=nsm, identity_key=_identity(seed))
        )
        assert handle.deltas is not None
        assert handle.delta_writer is not None

        async def status_and_binding(ch: Any) -> tuple[Any, Any]:
            status = pb.GetStatusResponse.FromString(await ch.unary_unary(S + "GetStatus", b""))
            doc = pb.GetAttestationResponse.FromString(
                await ch.unary_unary(
                    S + "GetAttestation", pb.GetAttestationRequest().SerializeToString()
                )
            ).document
            bound = decode_binding(verify_attestation(doc, root_pem=nsm.root_pem).user_data)
            return status, bound

        async with open_grpc_channel(await connect(handle.addresses[0])) as ch:
            status, bound = await status_and_binding(ch)
            assert (status.deltas, status.deltas_head) == (2, boot_head)
            assert status.shares_sha256 == fingerprint
            assert status.accounts == 5
            assert bound.deltas == bytes.fromhex(boot_head)
            assert bound.shares == bytes.fromhex(fingerprint)
            # another replica stores delta 3: pushed, loaded, signable, shown
            hot = fresh_accounts("hot", 1)
            third = maker.writer._seal(records_of(hot), "create", "b-hot")
            maker.deltas.apply(third.data)
            files.put(3, third.data)
            with trio.fail_after(10):
                await handle.deltas.wait_for(3)
            sign_with(handle.service.pool, hot["hot-0"], "hot-session", b"hot add")
            status, bound = await status_and_binding(ch)
            assert (status.deltas, status.deltas_head) == (3, third.fingerprint)
            assert bound.deltas == bytes.fromhex(third.fingerprint)
            # the enclave's own delta goes through the parent's store
            mine = fresh_accounts("mine", 1)
            with trio.fail_after(10):
                sequence, head = await handle.delta_writer.store(records_of(mine), "create", "m")
            assert sequence == 4
            assert files.list().sequences == (1, 2, 3, 4)
            sign_with(handle.service.pool, mine["mine-0"], "mine-session", b"own delta")
            status, bound = await status_and_binding(ch)
            assert (status.deltas, status.deltas_head) == (4, head)
        await handle.drain()
        nursery.cancel_scope.cancel()
    world.ident.close()


async def test_a_cancelled_store_drops_the_connection_and_applies_nothing(
    world: World, autojump_clock: trio.abc.Clock
) -> None:
    node = world.node()
    async with fake_connection(node) as (parent, _):
        received = trio.Event()
        late: list[int] = []

        async def answer_late() -> None:
            sequence, _data = await parent.receive_store()
            late.append(sequence)
            received.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_late)
            with trio.move_on_after(3):
                await node.writer.store(records_of(fresh_accounts("c", 1)), "create", "dkg-c")
        assert received.is_set()
        await trio.testing.wait_all_tasks_blocked()
        assert not node.writer.connected  # dropped: the answer can never land
        assert node.deltas.chain.count == 0
        assert "c-0" not in node.store
        assert node.writer._pending is None


def test_a_chunked_body_holds_no_more_than_it_was_told() -> None:
    """The one parser of a delta's or a base's chunks (both ends of the deltas channel):
    exactly ``total_bytes``, refused as soon as a chunk goes over, never another message."""
    body = ChunkedBody("delta 1", 5)
    assert body.feed(DeltaChunkMessage(data=b"abc")) is None
    assert body.feed(DeltaChunkMessage(data=b"de")) is None
    assert body.feed(DeltaEndMessage()) == b"abcde"
    cases: list[tuple[list[ChannelMessage], str]] = [
        ([DeltaChunkMessage(data=b"abc"), DeltaChunkMessage(data=b"def")], "bad_length"),
        ([DeltaChunkMessage(data=b"abc"), DeltaEndMessage()], "bad_length"),
        (
            [DeltaChunkMessage(data=b"abc"), DeltaStoreMessage(sequence=2, total_bytes=1)],
            "unexpected_message",
        ),
    ]
    for messages, reason in cases:
        body = ChunkedBody("delta 1", 5)
        *first, last = messages
        for message in first:
            assert body.feed(message) is None
        with pytest.raises(ChannelProtocolError, match="delta 1") as info:
            body.feed(last)
        assert info.value.reason == reason
