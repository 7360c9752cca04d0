"""The reference gateway creates accounts by DKG (issue 16 deliverable 6; docs/gateway.md).

Against the enclave the DKG tests use (tests/test_enclave_dkg.py: the real SignService and
DkgRegistry behind a real gRPC server on loopback, its delta store a fake that applies the
record and remembers it), the gateway's :class:`DkgDriver` runs the three rounds with its own
local participants (Ed25519 keys pinned in that enclave.toml), journals their shares, and the
coordinator then signs with the new account; every signature is checked again by the suite's
own verifier. Then the HTTP API (201, 400, 403, 409) through ``serve_gateway`` with a
gateway.toml that names the participants' key files, the journal's crash rules, and a gateway
killed between ``DkgRound3`` sent and answered: on restart the crash rule recovers the account
from the enclave's stored delta, and the gateway's shares were durable before anything was
reported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio
import trio.testing

from trio_sign.authz import Authorizer, approval_payload
from trio_sign.crypto import scheme_by_name
from trio_sign.crypto._group import group_for
from trio_sign.enclave import SessionPool, SignService
from trio_sign.enclave._deltas import DeltaWriter, EnclaveDeltas
from trio_sign.enclave._dkg import DkgRegistry, PoolSlots, deltas_finder, dkg_params
from trio_sign.enclave._identity import IdentityKey
from trio_sign.enclave._status import one_connection
from trio_sign.gateway import (
    ApproverSigningKey,
    Coordinator,
    EnclaveNode,
    GatewayApprover,
    GatewayConfigError,
    GatewayError,
    GatewayHandle,
    parse_gateway_config,
    serve_gateway,
)
from trio_sign.gateway._dkg import (
    DkgDriver,
    DkgFailed,
    DkgSettings,
    DkgShares,
    LocalParticipant,
)
from trio_sign.parent._deltas import (
    Deltas,
    FileDeltaStore,
    delta_fingerprint,
    serve_deltas_connection,
)
from trio_sign.rpc import CallContext, RpcError, StatusCode, serve_grpc
from trio_sign.shares import ShareRecord, ShareStore
from trio_sign.shares._deltas import DeltaChain
from trio_sign.shares._signature import CeremonyKey
from trio_sign.transport import open_listeners

from .test_enclave_dkg import (
    APPROVERS,
    IDENTITY_SEED,
    PARTICIPANT_KEYS,
    SUITES,
    FakeWriter,
    config,
    empty_store,
)
from .test_gateway_service import request

API_TOKEN = "api-token-for-the-dkg-tests-0123456789"


def signing_key(seed_key: nacl.signing.SigningKey) -> ApproverSigningKey:
    """The same Ed25519 key as an :class:`ApproverSigningKey` (the gateway's key class)."""
    return ApproverSigningKey._from_ed25519_seed(bytearray(bytes(seed_key)))


def approver(*names: str) -> GatewayApprover:
    return GatewayApprover({n: signing_key(APPROVERS[n]) for n in names})


def participants(*key_ids: str) -> list[LocalParticipant]:
    return [LocalParticipant(k, k, signing_key(PARTICIPANT_KEYS[k])) for k in key_ids]


class SignalWriter(FakeWriter):
    """The fake delta store, telling when a store began (DkgRound3 reached the enclave) and
    when it ended."""

    def __init__(self, store: ShareStore) -> None:
        super().__init__(store)
        self.entered = trio.Event()
        self.done = trio.Event()

    async def store(
        self, records: Sequence[ShareRecord], operation: str, dkg_id: str
    ) -> tuple[int, str]:
        self.entered.set()
        try:
            return await super().store(records, operation, dkg_id)
        finally:
            self.done.set()


class Watch:
    """The real delta writer, watched like :class:`SignalWriter` (reset the events to watch
    the next store)."""

    def __init__(self, inner: DeltaWriter) -> None:
        self.inner = inner
        self.entered = trio.Event()
        self.done = trio.Event()

    async def store(
        self, records: Sequence[ShareRecord], operation: str, dkg_id: str
    ) -> tuple[int, str]:
        self.entered.set()
        try:
            return await self.inner.store(records, operation, dkg_id)
        finally:
            self.done.set()


@dataclass
class Enclave:
    address: str
    store: ShareStore
    registry: DkgRegistry
    writer: Any  # SignalWriter, or Watch around the real DeltaWriter
    identity: IdentityKey
    service: SignService


@asynccontextmanager
async def dev_enclave(
    durable: Path | None = None, *, over_tcp: bool = True
) -> AsyncIterator[Enclave]:
    """The DKG tests' enclave (SignService + DkgRegistry) on loopback. Its delta store is the
    fake one, or with ``durable`` the real ``DeltaWriter`` (sealed, identity-signed deltas on
    the chain) talking to the parent's real deltas channel and ``FileDeltaStore`` in that
    directory (put-if-absent with fsync; ``writer`` then only watches)."""
    measured = config()
    assert measured.dkg is not None
    store = empty_store()
    pool = SessionPool(store.get, max_sessions=100)
    watcher = SignalWriter(store)
    identity = IdentityKey(CeremonyKey.from_seed(IDENTITY_SEED))
    wrap = identity.delta_key_wrap()
    authorizer = Authorizer(measured.policies)
    writer: Any = watcher
    find: Any = watcher.find
    real: DeltaWriter | None = None
    if durable is not None:
        chain = DeltaChain(hashlib.sha256(b"the base bundle").hexdigest())
        deltas = EnclaveDeltas(
            store, chain, provider=wrap, signer=identity, signing_keys=(identity.public_key,)
        )
        real = DeltaWriter(deltas, store_timeout_s=20.0)
        writer = Watch(real)
        find = deltas_finder(deltas)
    registry = DkgRegistry(
        settings=measured.dkg,
        identity=identity,
        writer=writer,
        authorizer=authorizer,
        lookup=store.get,
        slots=PoolSlots(pool),
        find_created=find,
    )
    service = SignService(store, pool, authorizer=authorizer, dkg=registry)
    try:
        async with trio.open_nursery() as nursery:
            if durable is not None and real is not None:
                files = FileDeltaStore(durable)
                files.recover()
                enclave_end, parent_end = trio.testing.memory_stream_pair()

                async def connect() -> trio.abc.Stream:
                    return enclave_end

                nursery.start_soon(serve_deltas_connection, parent_end, Deltas(files))
                nursery.start_soon(
                    functools.partial(
                        one_connection,
                        "deltas",
                        connect,
                        real.converse,
                        connect_timeout_s=5.0,
                        read=False,
                    )
                )
            await nursery.start(pool.run_reaper)
            await nursery.start(registry.run)
            if not over_tcp:  # called in-process (DirectNode): for the virtual clock
                yield Enclave("", store, registry, writer, identity, service)
                nursery.cancel_scope.cancel()
                return
            listeners = await open_listeners("tcp://127.0.0.1:0")
            port = listeners[0].socket.getsockname()[1]
            server = await nursery.start(
                functools.partial(
                    serve_grpc,
                    listeners,
                    service.handlers(),
                    method_limits=service.receive_limits(),
                )
            )
            try:
                yield Enclave(f"tcp://127.0.0.1:{port}", store, registry, writer, identity, service)
            finally:
                await server.aclose()
                nursery.cancel_scope.cancel()
    finally:
        wrap.close()
        identity.close()
        store.close()


async def inline(fn: Any, *args: Any) -> Any:
    """Blocking file I/O on the event loop: with the virtual clock a worker thread would
    let time jump to the enclave's next deadline."""
    return fn(*args)


class DirectNode(EnclaveNode):
    """A node whose calls go straight to the enclave's handlers (no sockets: the virtual
    clock holds); ``unavailable_round3`` DkgRound3 calls fail UNAVAILABLE first."""

    def __init__(self, node_id: str, service: SignService) -> None:
        super().__init__(node_id, "direct://")
        self._handlers = service.handlers()
        self.unavailable_round3 = 0
        self.round3_calls = 0

    async def _call(self, method: str, request: Any, response_type: Any, timeout_s: float) -> Any:
        if method == "DkgRound3":
            self.round3_calls += 1
            if self.unavailable_round3 > 0:
                self.unavailable_round3 -= 1
                raise RpcError(StatusCode.UNAVAILABLE, "the parent's ingress is down")
        path = "/trio_sign.v1.SignService/" + method
        ctx = CallContext(method=path, metadata=(), authority="test", deadline=math.inf)
        data = await self._handlers[path](request.SerializeToString(), ctx)
        return response_type.FromString(data)


@dataclass
class Gateway:
    node: EnclaveNode
    shares: DkgShares
    driver: DkgDriver
    coordinator: Coordinator


@asynccontextmanager
async def gateway(
    enclave: Enclave,
    journal: Path,
    *,
    approvers: tuple[str, ...] = ("ops-1", "ops-2"),
    keys: tuple[str, ...] = ("p2", "p3"),
    pin_identity: bool = True,
    node: EnclaveNode | None = None,
    settings: DkgSettings | None = None,
) -> AsyncIterator[Gateway]:
    """A gateway's DKG side: one node, local participants, the journal, a coordinator."""
    locals_ = participants(*keys)
    shares = DkgShares(journal, keys)
    shares.open()
    gate = approver(*approvers)
    if node is None:
        node = EnclaveNode("node-1", enclave.address)
    coordinator = Coordinator([node], list(shares.stores.values()), approver=gate)
    driver = DkgDriver(
        [node],
        locals_,
        shares,
        approver=gate,
        enclave_identity_key=enclave.identity.public_key if pin_identity else None,
        settings=settings or DkgSettings(round_timeout_s=20.0),
        blocking=inline if isinstance(node, DirectNode) else trio.to_thread.run_sync,
        on_created=coordinator.learned,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            yield Gateway(node, shares, driver, coordinator)
            nursery.cancel_scope.cancel()
    finally:
        for p in locals_:
            p.close()
        gate.close()
        shares.close()


async def sign_and_verify(gw: Gateway, account_id: str, suite: str) -> None:
    message = f"a transfer from {account_id}".encode()
    signed = await gw.coordinator.sign(account_id, message)
    assert signed.ciphersuite == suite
    scheme = scheme_by_name(suite)
    assert scheme.verify(signed.group_public_key, message, signed.signature, None)


def journal_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# -- the driver against the enclave, each suite --------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
async def test_the_driver_creates_an_account_the_coordinator_signs_with(
    tmp_path: Path, suite: str
) -> None:
    journal = tmp_path / "dkg-journal.jsonl"
    async with dev_enclave() as enclave:
        async with gateway(enclave, journal) as gw:
            created = await gw.driver.create_account("acct-dkg", suite)
            # The enclave holds the account it reported, with the same group key.
            held = enclave.store.get("acct-dkg")
            assert held is not None
            assert held.group_public_key == created.group_public_key
            assert held.ciphersuite == suite
            assert created.enclave_verifying_share == held.verifying_share
            assert created.delta_sequence == 1
            assert enclave.writer.operations == ["create"]
            assert created.participants == ("p2", "p3")
            assert (created.min_signers, created.max_signers) == (2, 3)
            # Each local participant holds its share of the same account.
            for pid in ("p2", "p3"):
                share = gw.shares.stores[pid].get("acct-dkg")
                assert share is not None
                assert share.group_public_key == created.group_public_key
            await sign_and_verify(gw, "acct-dkg", suite)
            assert enclave.registry.open_count == 0
            assert all(p.open_dkgs == 0 for p in gw.driver.participants)  # type: ignore[attr-defined]
        # Durable: the journal has the shares, then the outcome; 0600.
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
        assert [e["event"] for e in journal_lines(journal)] == ["pending", "created"]
        # A restarted gateway signs with it straight from the journal.
        async with gateway(enclave, journal) as again:
            assert again.shares.created == 1
            assert not again.shares.pending
            await sign_and_verify(again, "acct-dkg", suite)


async def test_through_the_real_delta_writer_and_the_parents_file_store(tmp_path: Path) -> None:
    """The enclave's real durable path: each answer names a delta file that is on disk (its
    fingerprint is the answer's head); a gateway killed between round 3 sent and answered is
    answered, after the enclave forgot the DKG, from the loaded delta that names it."""
    deltas = tmp_path / "deltas"
    journal = tmp_path / "j.jsonl"
    async with dev_enclave(durable=deltas) as enclave:
        async with gateway(enclave, journal) as gw:
            for i, suite in enumerate(SUITES, 1):
                created = await gw.driver.create_account(f"acct-durable-{i}", suite)
                assert created.delta_sequence == i
                stored = (deltas / f"delta-{i:08d}.enc").read_bytes()
                assert delta_fingerprint(stored, i) == created.deltas_head
                await sign_and_verify(gw, f"acct-durable-{i}", suite)
            enclave.writer.entered, enclave.writer.done = trio.Event(), trio.Event()
            with trio.CancelScope() as crash:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(gw.driver.create_account, "acct-durable-crash", SUITES[0])
                    await enclave.writer.entered.wait()  # round 3 is at the enclave: die
                    crash.cancel()
        await enclave.writer.done.wait()  # the enclave's store finishes regardless
        assert "acct-durable-crash" in enclave.store
        enclave.registry.expire(math.inf)
        async with gateway(enclave, journal) as restarted:
            [outcome] = await restarted.driver.recover()
            assert not isinstance(outcome, DkgFailed)
            assert outcome.account_id == "acct-durable-crash"
            assert outcome.delta_sequence == 4
            await sign_and_verify(restarted, "acct-durable-crash", SUITES[0])
            assert restarted.shares.created == 4


async def test_a_three_of_four_account_and_many_accounts_at_once(tmp_path: Path) -> None:
    async with (
        dev_enclave() as enclave,
        gateway(enclave, tmp_path / "j.jsonl", keys=("p2", "p3", "p4")) as gw,
    ):
        created = await gw.driver.create_account(
            "acct-3of4", SUITES[0], min_signers=3, max_signers=4
        )
        assert (created.min_signers, created.max_signers) == (3, 4)
        assert len(created.verifying_shares) == 4
        await sign_and_verify(gw, "acct-3of4", SUITES[0])
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(gw.driver.create_account, f"acct-many-{i}", SUITES[i % 3])
        assert gw.driver.created == 7
        for i in range(6):
            await sign_and_verify(gw, f"acct-many-{i}", SUITES[i % 3])


async def test_refusals_are_typed_and_leave_no_shares(tmp_path: Path) -> None:
    async with dev_enclave() as enclave:
        async with gateway(enclave, tmp_path / "j.jsonl", approvers=("ops-1",)) as gw:
            with pytest.raises(DkgFailed) as info:
                await gw.driver.create_account("acct-refused", SUITES[0])
            assert info.value.reason == "not_authorized"
            assert info.value.status == StatusCode.PERMISSION_DENIED
            assert not gw.shares.holds("acct-refused")
            for bad in (
                {"suite": "FROST-P256-SHA256-v1"},
                {"max_signers": 4},
                {"min_signers": 1},
                {"policy": "create"},
            ):
                with pytest.raises(DkgFailed) as info:
                    await gw.driver.create_account(
                        "acct-bad",
                        bad.pop("suite", SUITES[0]),  # type: ignore[arg-type]
                        **bad,
                    )
                assert info.value.reason == "bad_request"
        async with gateway(enclave, tmp_path / "j2.jsonl") as gw:
            await gw.driver.create_account("acct-once", SUITES[1])
            with pytest.raises(DkgFailed) as info:  # held here already: refused before a call
                await gw.driver.create_account("acct-once", SUITES[1])
            assert info.value.reason == "account_exists"
        # Another gateway (its own journal) asks the enclave for an account that exists.
        async with gateway(enclave, tmp_path / "j3.jsonl") as other:
            with pytest.raises(DkgFailed) as info:
                await other.driver.create_account("acct-once", SUITES[1])
            assert info.value.reason == "account_exists"
            assert info.value.status == StatusCode.ALREADY_EXISTS
            assert not other.shares.holds("acct-once")


async def test_an_enclave_package_not_signed_by_the_pinned_identity_key_is_refused(
    tmp_path: Path,
) -> None:
    async with dev_enclave() as enclave, gateway(enclave, tmp_path / "j.jsonl") as gw:
        gw.driver.enclave_identity_key = bytes(nacl.signing.SigningKey(bytes([9]) * 32).verify_key)
        with pytest.raises(DkgFailed) as info:
            await gw.driver.create_account("acct-x", SUITES[2])
        assert info.value.reason == "bad_package"
        assert "delta identity key" in str(info.value)
        assert enclave.writer.calls == 0
        assert not gw.shares.holds("acct-x")


# -- the crash rule ------------------------------------------------------------------------------


async def test_a_gateway_killed_between_round3_sent_and_answered_recovers_the_account(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "dkg-journal.jsonl"
    async with dev_enclave() as enclave:
        enclave.writer.gate = trio.Event()  # the enclave's delta store waits: no answer yet
        async with gateway(enclave, journal) as gw:
            with trio.CancelScope() as crash:

                async def create() -> None:
                    await gw.driver.create_account("acct-crash", SUITES[2])
                    raise AssertionError("answered before the store finished")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(create)
                    await enclave.writer.entered.wait()  # DkgRound3 reached the enclave
                    # The gateway's own shares are durable before any answer: on disk now.
                    entries = journal_lines(journal)
                    assert [e["event"] for e in entries] == ["pending"]
                    assert {s["participant"] for s in entries[0]["shares"]} == {"p2", "p3"}
                    assert len(entries[0]["round3"]) == 2
                    crash.cancel()  # the gateway dies here
            assert crash.cancelled_caught
            assert gw.driver.created == 0
            with pytest.raises(GatewayError) as refused:  # nothing reported, nothing signable
                await gw.coordinator.sign("acct-crash", b"m")
            assert refused.value.reason == "unknown_account"
        # The enclave finishes its durable store, then forgets the DKG (its TTL): a retried
        # DkgRound3 is answered from the stored delta that names the dkg_id.
        enclave.writer.gate.set()
        await enclave.writer.done.wait()
        assert "acct-crash" in enclave.store
        assert enclave.registry.expire(math.inf) == 1
        async with gateway(enclave, journal) as restarted:
            assert list(restarted.shares.pending) == [entries[0]["dkg_id"]]
            [outcome] = await restarted.driver.recover()
            assert not isinstance(outcome, DkgFailed)
            assert outcome.recovered
            assert outcome.account_id == "acct-crash"
            assert outcome.delta_sequence == 1
            assert not restarted.shares.pending
            await sign_and_verify(restarted, "acct-crash", SUITES[2])
        assert [e["event"] for e in journal_lines(journal)] == ["pending", "created"]


async def test_a_pending_dkg_the_enclave_never_stored_is_dropped_on_recovery(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "dkg-journal.jsonl"
    async with dev_enclave() as enclave:
        enclave.writer.gate = trio.Event()
        enclave.writer.fail = RuntimeError("the parent is gone")  # the store will fail
        async with gateway(enclave, journal) as gw:
            with trio.CancelScope() as crash:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(gw.driver.create_account, "acct-lost", SUITES[0])
                    await enclave.writer.entered.wait()
                    crash.cancel()
        enclave.writer.gate.set()  # the store fails: the enclave created nothing
        await enclave.writer.done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert enclave.registry.open_count == 0
        async with gateway(enclave, journal) as restarted:
            [outcome] = await restarted.driver.recover()
            assert isinstance(outcome, DkgFailed)
            assert outcome.reason == "not_created"
            assert not restarted.shares.pending
            assert not restarted.shares.holds("acct-lost")
        assert [e["event"] for e in journal_lines(journal)] == ["pending", "failed"]
        async with gateway(enclave, journal) as third:  # nothing left to settle
            assert not third.shares.pending
            assert third.shares.created == 0
        assert "acct-lost" not in enclave.store


class FlakyNode(EnclaveNode):
    """DkgRound3 fails UNAVAILABLE ``failures`` times before it reaches the enclave."""

    failures = 2
    round3_calls = 0

    async def _call(self, method: str, request: Any, response_type: Any, timeout_s: float) -> Any:
        if method == "DkgRound3":
            self.round3_calls += 1
            if self.round3_calls <= self.failures:
                raise RpcError(StatusCode.UNAVAILABLE, "connection reset")
        return await super()._call(method, request, response_type, timeout_s)


async def test_round3_is_retried_with_the_same_dkg_id_until_answered(tmp_path: Path) -> None:
    async with dev_enclave() as enclave, gateway(enclave, tmp_path / "j.jsonl") as gw:
        flaky = FlakyNode("node-1", enclave.address)
        async with trio.open_nursery() as nursery:
            await nursery.start(flaky.run)
            gw.driver.nodes = [flaky]
            gw.coordinator.nodes = [flaky]
            created = await gw.driver.create_account("acct-flaky", SUITES[1])
            assert created.recovered
            assert flaky.round3_calls == 3
            assert enclave.writer.calls == 1  # stored once
            await sign_and_verify(gw, "acct-flaky", SUITES[1])
            nursery.cancel_scope.cancel()


async def test_the_crash_rule_backs_off_gives_up_and_run_settles_it_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Round 3 retried with full-jitter back-off (virtual time) until answered; one that
    stays unanswered past ``round3_give_up_s`` is ``no_healthy_node`` and stays pending; the
    driver's ``run`` settles it at its next round once the node answers, no restart."""
    settings = DkgSettings(
        round3_retry_base_s=1.0,
        round3_retry_max_s=4.0,
        round3_give_up_s=30.0,
        recover_interval_s=60.0,
    )
    async with dev_enclave(over_tcp=False) as enclave:
        node = DirectNode("node-1", enclave.service)
        async with gateway(enclave, tmp_path / "j.jsonl", node=node, settings=settings) as gw:
            node.unavailable_round3 = 3
            t0 = trio.current_time()
            created = await gw.driver.create_account("acct-backoff", SUITES[0])
            waited = trio.current_time() - t0
            assert created.recovered
            assert node.round3_calls == 4
            assert 0 < waited <= 2.0 + 4.0 + 4.0  # uniform(0, min(4, 1 * 2**k)), k = 1, 2, 3
            await sign_and_verify(gw, "acct-backoff", SUITES[0])

            async with trio.open_nursery() as nursery:
                await nursery.start(gw.driver.run)  # its first round finds nothing pending
                node.unavailable_round3 = 10**6
                t0 = trio.current_time()
                with pytest.raises(DkgFailed) as info:
                    await gw.driver.create_account("acct-later", SUITES[1])
                assert info.value.reason == "no_healthy_node"
                assert trio.current_time() - t0 >= settings.round3_give_up_s
                assert list(gw.shares.pending) == [info.value.dkg_id]
                with pytest.raises(GatewayError):
                    await gw.coordinator.sign("acct-later", b"not yet")
                node.unavailable_round3 = 0  # the node answers again
                await trio.sleep(settings.recover_interval_s)  # run's next round
                assert not gw.shares.pending
                assert gw.shares.stores["p2"].get("acct-later") is not None
                await sign_and_verify(gw, "acct-later", SUITES[1])
                nursery.cancel_scope.cancel()


# -- the journal ---------------------------------------------------------------------------------


async def test_a_line_cut_by_a_crash_is_dropped_and_a_bad_entry_named(tmp_path: Path) -> None:
    journal = tmp_path / "j.jsonl"
    async with dev_enclave() as enclave, gateway(enclave, journal) as gw:
        await gw.driver.create_account("acct-kept", SUITES[0])
    whole = journal.read_bytes()
    with journal.open("ab") as f:
        f.write(b'{"v":1,"event":"pending","dkg_id":"dkg-cut","shares":[{"partic')
    shares = DkgShares(journal, ["p2", "p3"])
    shares.open()
    try:
        assert shares.created == 1
        assert not shares.pending
        assert journal.read_bytes() == whole  # the cut tail is gone, the rest kept
        assert shares.stores["p2"].get("acct-kept") is not None
    finally:
        shares.close()
    with journal.open("ab") as f:
        f.write(b'{"v":1,"event":"created","dkg_id":"dkg-unknown"}\n')
    bad = DkgShares(journal, ["p2", "p3"])
    with pytest.raises(Exception, match="unknown DKG") as info:
        bad.open()
    assert getattr(info.value, "line", None) == 3
    bad.close()
    # A journal naming a participant this gateway no longer has is refused, naming it.
    journal.write_bytes(whole)
    alone = DkgShares(journal, ["p2"])
    with pytest.raises(Exception, match="'p3'"):
        alone.open()
    alone.close()


def test_reprs_show_no_secrets(tmp_path: Path) -> None:
    [p] = participants("p2")
    try:
        text = repr(p)
        assert bytes(PARTICIPANT_KEYS["p2"]).hex() not in text
        assert "p2" in text
    finally:
        p.close()


# -- the HTTP API ------------------------------------------------------------------------------


def write_key(path: Path, key: nacl.signing.SigningKey, key_id: str) -> Path:
    with signing_key(key) as k:
        k.save(path, key_id=key_id)
    return path


def dkg_gateway_toml(tmp_path: Path, address: str, *, approvers: tuple[str, ...]) -> str:
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    approver_keys = ", ".join(
        f'{n} = "{write_key(keys / f"{n}.key", APPROVERS[n], n)}"' for n in approvers
    )
    tables = ""
    for pid in ("p2", "p3"):
        path = keys / f"{pid}.key"
        if not path.exists():
            write_key(path, PARTICIPANT_KEYS[pid], pid)
        tables += f'[participants.{pid}]\nkey_id = "{pid}"\nkey_file = "{path}"\n'
    return f"""
[api]
listen = "tcp://127.0.0.1:0"
token = "{API_TOKEN}"
[events]
listen = "tcp://127.0.0.1:0"
[approvers]
keys = {{ {approver_keys} }}
{tables}
[dkg]
journal = "{tmp_path / "gateway-dkg.jsonl"}"
[dev]
skip_attestation = true
[[node]]
id = "node-1"
address = "{address}"
events_token = "node-1-events-token-0123456789abcdef"
"""


async def create(api: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await request(api, "POST", "/v1/accounts", body, token=API_TOKEN)


async def test_post_accounts_201_then_sign_400_403_409(tmp_path: Path) -> None:
    async with dev_enclave() as enclave, trio.open_nursery() as nursery:
        config = parse_gateway_config(
            dkg_gateway_toml(tmp_path, enclave.address, approvers=("ops-1", "ops-2"))
        )
        assert config.participant_files == ()
        assert set(config.local_participants) == {"p2", "p3"}
        handle: GatewayHandle = await nursery.start(serve_gateway, config)
        api = handle.api_urls[0]
        status, body = await create(api, {"account_id": "acct-http", "ciphersuite": SUITES[2]})
        assert status == 201, body
        assert body["account_id"] == "acct-http"
        assert body["ciphersuite"] == SUITES[2]
        assert body["participants"] == ["p2", "p3"]
        assert body["delta_sequence"] == 1
        assert len(bytes.fromhex(body["output_key_hex"])) == 32
        assert enclave.store.get("acct-http") is not None
        message = b"sign with the new account".hex()
        status, signed = await request(
            api,
            "POST",
            "/v1/sign",
            {"account_id": "acct-http", "message_hex": message},
            token=API_TOKEN,
        )
        assert status == 200, signed
        assert scheme_by_name(SUITES[2]).verify(
            bytes.fromhex(body["group_public_key_hex"]),
            bytes.fromhex(message),
            bytes.fromhex(signed["signature_hex"]),
            None,
        )
        status, again = await create(api, {"account_id": "acct-http", "ciphersuite": SUITES[2]})
        assert (status, again["reason"]) == (409, "account_exists")
        for bad in (
            {"account_id": "a"},
            {"account_id": "", "ciphersuite": SUITES[0]},
            {"account_id": "a", "ciphersuite": "nope"},
            {"account_id": "a", "ciphersuite": SUITES[0], "max_signers": 9},
            {"account_id": "a", "ciphersuite": SUITES[0], "min_signers": "2"},
            {"account_id": "a", "ciphersuite": SUITES[0], "policy": "create"},
        ):
            status, answer = await create(api, bad)
            assert (status, answer["reason"]) == (400, "bad_request"), (bad, answer)
        assert (await request(api, "POST", "/v1/accounts", {}, token=None))[0] == 401
        nursery.cancel_scope.cancel()
    # One approver short of the create policy: 403 with the enclave's reason; nothing kept.
    async with dev_enclave() as enclave, trio.open_nursery() as nursery:
        (tmp_path / "two").mkdir()
        config = parse_gateway_config(
            dkg_gateway_toml(tmp_path / "two", enclave.address, approvers=("ops-1",))
        )
        handle = await nursery.start(serve_gateway, config)
        status, body = await create(
            handle.api_urls[0], {"account_id": "acct-403", "ciphersuite": SUITES[0]}
        )
        assert (status, body["reason"]) == (403, "not_authorized"), body
        assert "acct-403" not in enclave.store
        assert enclave.writer.calls == 0
        # The caller brings the missing approval: over the DKG parameters as docs/gateway.md
        # spells them (the enclave at identifier 1, the participants 2, 3 in file order).
        group = group_for(SUITES[0])
        params = dkg_params(
            SUITES[0],
            2,
            3,
            "default",
            [(group.identifier_to_bytes(1), "enclave")]
            + [(group.identifier_to_bytes(i), f"p{i}") for i in (2, 3)],
        )
        expires = int(time.time() * 1000) + 60_000
        payload = approval_payload("acct-403", "dkg-by-caller", params, expires)
        brought = {
            "key_id": "ops-2",
            "signature_hex": APPROVERS["ops-2"].sign(payload).signature.hex(),
            "expires_at_unix_ms": expires,
        }
        body = {"account_id": "acct-403", "ciphersuite": SUITES[0], "approvals": [brought]}
        status, answer = await create(handle.api_urls[0], body)
        assert (status, answer["reason"]) == (400, "bad_request")  # no dkg_id to approve
        body["dkg_id"] = "dkg-by-caller"
        status, answer = await create(handle.api_urls[0], body)
        assert status == 201, answer
        assert answer["dkg_id"] == "dkg-by-caller"
        assert "acct-403" in enclave.store
        nursery.cancel_scope.cancel()


async def test_a_gateway_without_dkg_keys_answers_501(tmp_path: Path) -> None:
    from trio_sign.testing import generate_share_files

    from .test_gateway_service import gateway_toml

    gen = generate_share_files(tmp_path / "shares", 1)
    config = parse_gateway_config(
        gateway_toml(
            gen.participant_files[2], f"unix://{tmp_path}/none.sock", api=f'token = "{API_TOKEN}"'
        )
    )
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve_gateway, config)
        status, body = await create(
            handle.api_urls[0], {"account_id": "a", "ciphersuite": SUITES[0]}
        )
        assert (status, body["reason"]) == (501, "not_configured")
        nursery.cancel_scope.cancel()


P2 = '[participants.p2]\nkey_id = "p2"\nkey_file = "k"\n'


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[participants.p2]\nkey_file = "k"\n', "key_id"),
        ('[participants.p2]\nkey_id = "enclave"\nkey_file = "k"\n', "not 'enclave'"),
        ('[participants.p2]\nkey_id = "p2"\nkey_file = "k"\ncolour = 1\n', "colour"),
        ('[participants.p2]\nkey_id = "p2"\nkey_file = "k"\npublic_key = "00"\n', "64 hex"),
        (
            '[participants.p2]\nkey_id = "p2"\nkey_file = "k"\n'
            '[participants.p3]\nkey_id = "p2"\nkey_file = "j"\n',
            "same key_id",
        ),
        ('[participants.phone]\nkey_id = "phone"\n', "key_id and public_key"),
        (P2 + '[dkg]\nenclave_identity_key = "zz"\n', "enclave_identity_key"),
        (P2 + "[dkg]\nbogus = 1\n", "bogus"),
    ],
)
def test_participants_and_dkg_config_errors(table: str, message: str) -> None:
    text = f"""
{table}
[dev]
skip_attestation = true
[[node]]
id = "node-1"
address = "tcp://127.0.0.1:1"
events_token = "node-1-events-token-0123456789abcdef"
"""
    with pytest.raises(GatewayConfigError, match=message):
        parse_gateway_config(text)


def test_local_and_remote_participants_share_one_table() -> None:
    text = """
[participants.p2]
key_id = "p2"
key_file = "keys/p2.key"
[participants.phone]
key_id = "phone-1"
public_key = "{pk}"
[dev]
skip_attestation = true
[[node]]
id = "node-1"
address = "tcp://127.0.0.1:1"
events_token = "node-1-events-token-0123456789abcdef"
""".replace("{pk}", "ab" * 32)
    config = parse_gateway_config(text, base=Path("/etc/gw"))
    assert config.local_participants == {"p2": ("p2", Path("/etc/gw/keys/p2.key"))}
    assert set(config.remote_participants) == {"phone"}
    assert config.remote_participants["phone"].key_id == "phone-1"
    assert config.dkg_journal == Path("/etc/gw/dkg-journal.jsonl")
    assert os.fspath(config.dkg_journal).endswith("dkg-journal.jsonl")
