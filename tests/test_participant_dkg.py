"""Remote participants in DKG (issue 17 part 2): the participant library, under asyncio AND
Trio, takes part in account creation through the real hub with contract version 2; the
gateway's DkgDriver drives it as a :class:`RemoteDkgParticipant` beside the DKG tests'
enclave (real SignService + DkgRegistry on loopback gRPC); the participant's new share is
sealed in its store (on disk) before the gateway hears ``dkg_done``; the account lands in
the gateway's public registry, and the coordinator then signs with it (enclave + the
participant's share and approval), every signature checked by the suite's own verifier."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trio

from tests.participant_helpers import GatewayThread
from trio_sign.crypto import scheme_by_name
from trio_sign.gateway._accounts import AccountRegistry
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._coordinator import Coordinator
from trio_sign.gateway._dkg import DkgDriver, DkgFailed, DkgSettings, DkgShares
from trio_sign.gateway._node import EnclaveNode
from trio_sign.gateway._participants import HubSettings, ParticipantHub, ParticipantKey
from trio_sign.gateway._remote_dkg import RemoteDkgParticipant
from trio_sign.participant import (
    AutoPolicy,
    CallbackPolicy,
    ClientSettings,
    ParticipantClient,
    PassphraseKey,
    SealedShareStore,
    _store,
)
from trio_sign.participant import _session as s

from .test_enclave_dkg import PARTICIPANT_KEYS, SUITES
from .test_gateway_dkg import approver, dev_enclave, signing_key

pytest_plugins = ["tests.participant_anyio"]
pytestmark = pytest.mark.anyio

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def cheap_key() -> PassphraseKey:
    return PassphraseKey(PASSPHRASE, opslimit=_store.MIN_OPSLIMIT, memlimit=_store.MIN_MEMLIMIT)


def on_disk(path: Path) -> list[str]:
    """The accounts the store file on disk holds (opened afresh)."""
    with SealedShareStore.open(path, cheap_key()) as store:
        return sorted(store.accounts())


@dataclass
class Remote:
    hub: ParticipantHub
    gw: GatewayThread
    client: ParticipantClient
    #: cancelling it ends the participant's run() (its process going away)
    client_scope: anyio.CancelScope
    tg: anyio.abc.TaskGroup


@asynccontextmanager
async def remote_p2(shares: Any, policy: Any, **client_kw: Any) -> AsyncIterator[Remote]:
    """Participant p2 (its keys made and closed here, ``shares`` the caller's) connected to a
    hub in a gateway thread, authenticated; the task group is cancelled at the end."""
    auth = signing_key(PARTICIPANT_KEYS["p2"])
    approver_key = ApproverSigningKey.generate()
    hub = ParticipantHub(
        {"p2": ParticipantKey("p2", "p2", auth.public_key)}, HubSettings(gateway_id="gw")
    )
    gw = GatewayThread(hub)
    gw.start()
    try:
        client = ParticipantClient(
            ClientSettings(gw.url),
            participant_id="p2",
            key_id="p2",
            auth_key=auth,
            approver=approver_key,
            approver_key_id="p2-approver",
            shares=shares,
            policy=policy,
            **client_kw,
        )
        async with anyio.create_task_group() as tg:
            client_scope = anyio.CancelScope()

            async def run_client() -> None:
                with client_scope:
                    await client.run()

            tg.start_soon(run_client)
            with anyio.fail_after(10):
                await client.wait_authenticated()
            yield Remote(hub, gw, client, client_scope, tg)
            tg.cancel_scope.cancel()
    finally:
        gw.stop()
        auth.close()
        approver_key.close()


async def new_store(store_path: Path) -> SealedShareStore:
    return await anyio.to_thread.run_sync(
        lambda: SealedShareStore.create(store_path, "p2", [], cheap_key())
    )


async def gateway_side(hub: ParticipantHub, tmp: Path, store_path: Path) -> dict[str, Any]:
    """Runs in the gateway's Trio loop: the enclave, the DKG driver with the remote
    participant, then the coordinator signing with each new account."""
    out: dict[str, Any] = {"created": [], "on_disk_at_done": [], "signed": 0}
    original = hub.dkg_round3

    async def watched(*args: Any, **kw: Any) -> Any:
        done = await original(*args, **kw)
        # the participant said done: its share must already be sealed on disk
        out["on_disk_at_done"].append(await trio.to_thread.run_sync(on_disk, store_path))
        return done

    hub.dkg_round3 = watched  # type: ignore[method-assign]
    registry = AccountRegistry(tmp / "accounts.jsonl").open()
    shares = DkgShares(tmp / "journal.jsonl", [])
    shares.open()
    gate = approver("ops-1", "ops-2")
    try:
        async with dev_enclave() as enclave, trio.open_nursery() as nursery:
            node = EnclaveNode("node-1", enclave.address)
            await nursery.start(node.run)
            remote = RemoteDkgParticipant(hub, "p2", "p2", timeout_s=10.0)
            driver = DkgDriver(
                [node],
                [remote],
                shares,
                approver=gate,
                enclave_identity_key=enclave.identity.public_key,
                settings=DkgSettings(round_timeout_s=20.0),
                registry=registry,
            )
            coordinator = Coordinator(
                [node], [], approver=gate, participants=hub, registry=registry
            )
            driver._on_created = coordinator.learned
            for i, suite in enumerate(SUITES):
                account_id = f"remote-dkg-{i}"
                created = await driver.create_account(account_id, suite)
                assert created.participants == ("p2",)
                assert (created.min_signers, created.max_signers) == (2, 2)
                out["created"].append(account_id)
                entry = registry.get(account_id)
                assert entry is not None
                assert [h.participant_id for h in entry.holders] == ["p2"]
                assert entry.group_public_key == created.group_public_key
                message = f"signed by the enclave and p2 ({suite})".encode()
                signed = await coordinator.sign(account_id, message)
                assert scheme_by_name(suite).verify(
                    signed.group_public_key, message, signed.signature, None
                )
                out["signed"] += 1
            out["approvals"] = dict(coordinator.approvals_sent)
            # the same account again: refused before any round (the registry knows it)
            with pytest.raises(DkgFailed) as info:
                await driver.create_account("remote-dkg-0", SUITES[0])
            assert info.value.reason == "account_exists"
            nursery.cancel_scope.cancel()
    finally:
        registry.close()
        shares.close()
        gate.close()
    # the registry is durable: a fresh open sees the accounts, and holds no secret
    again = AccountRegistry(tmp / "accounts.jsonl").open()
    out["registry"] = sorted(again)
    again.close()
    return out


async def test_remote_participant_dkg_then_signing(tmp_path: Path) -> None:
    store_path = tmp_path / "p2.store"
    store = await new_store(store_path)
    policy = AutoPolicy(accounts=["remote-dkg-*"])
    async with remote_p2(store, policy, gateway_id="gw") as r:
        client, hub = r.client, r.hub
        assert client.session is not None
        assert client.session.version == 2
        result = await r.gw.call(gateway_side, hub, tmp_path, store_path)
    names = [f"remote-dkg-{i}" for i in range(len(SUITES))]
    assert result["created"] == names
    assert result["signed"] == len(SUITES)
    assert result["approvals"]["p2-approver"] == len(SUITES)
    assert result["registry"] == names
    # at each dkg_done, the participant's store on disk already held that account's share
    for i, seen in enumerate(result["on_disk_at_done"]):
        assert f"remote-dkg-{i}" in seen
    assert await anyio.to_thread.run_sync(on_disk, store_path) == names
    assert client.counts["dkg_stored"] == len(SUITES)
    assert "signing_share" not in (tmp_path / "accounts.jsonl").read_text()
    store.close()


class NoSave:
    """A share source that cannot keep new shares (its save always fails)."""

    def __init__(self) -> None:
        self.put_records: list[Any] = []

    def share(self, account_id: str) -> Any:
        return None

    def put(self, record: Any) -> None:
        self.put_records.append(record)

    def save(self) -> None:
        raise OSError(28, "No space left on device")


async def failing_gateway_side(hub: ParticipantHub, tmp: Path, account_id: str) -> DkgFailed:
    registry = AccountRegistry(tmp / "accounts.jsonl").open()
    shares = DkgShares(tmp / "journal.jsonl", [])
    shares.open()
    gate = approver("ops-1", "ops-2")
    try:
        async with dev_enclave() as enclave, trio.open_nursery() as nursery:
            node = EnclaveNode("node-1", enclave.address)
            await nursery.start(node.run)
            driver = DkgDriver(
                [node],
                [RemoteDkgParticipant(hub, "p2", "p2", timeout_s=10.0)],
                shares,
                approver=gate,
                settings=DkgSettings(round_timeout_s=20.0),
                registry=registry,
            )
            with pytest.raises(DkgFailed) as info:
                await driver.create_account(account_id, SUITES[0])
            assert account_id not in registry
            assert shares.pending == {}  # failed before anything was journalled
            assert enclave.store.get(account_id) is None  # DkgRound3 never sent
            assert hub.in_flight("p2") == 0
            nursery.cancel_scope.cancel()
    finally:
        registry.close()
        shares.close()
        gate.close()
    return info.value


@pytest.mark.parametrize("case", ["declined", "store_fails"])
async def test_a_dkg_the_participant_refuses_or_cannot_store_is_named(
    tmp_path: Path, case: str
) -> None:
    source = NoSave()
    async with remote_p2(source, AutoPolicy(accounts=["ok-*"])) as r:
        client = r.client
        account = "not-covered" if case == "declined" else "ok-1"
        failed = await r.gw.call(failing_gateway_side, r.hub, tmp_path, account)
        assert client.session is not None
        assert client.session.in_flight == 0
    assert failed.reason == "participant_failed"
    assert "'p2'" in str(failed)
    if case == "declined":
        assert "declined (policy" in str(failed)
        assert source.put_records == []
    else:
        assert "declined (internal: the share could not be stored)" in str(failed)
        assert client.counts["dkg_stored"] == 0


class Twice(s.ParticipantSession):
    """Sends every DKG answer twice (the hub must take the first, count the second)."""

    def frames_to_send(self) -> list[str]:
        out: list[str] = []
        for frame in super().frames_to_send():
            out.append(frame)
            if '"type":"dkg_' in frame:
                out.append(frame)
        return out


@pytest.mark.parametrize("case", ["twice", "disconnects"])
async def test_dkg_answers_twice_or_a_participant_that_vanishes_mid_dkg(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_path = tmp_path / "p2.store"
    store = await new_store(store_path)
    asked = anyio.Event()

    async def ask(request: Any) -> bool:
        asked.set()
        await anyio.sleep_forever()
        return True  # pragma: no cover

    if case == "twice":
        monkeypatch.setattr(s, "ParticipantSession", Twice)
        policy: Any = AutoPolicy(accounts=["remote-dkg-*"])
    else:
        policy = CallbackPolicy(ask, dkg_callback=ask)
    result: dict[str, Any] = {}
    try:
        async with remote_p2(store, policy) as r:
            hub, gw = r.hub, r.gw
            if case == "twice":
                result.update(await gw.call(gateway_side, hub, tmp_path, store_path))
            else:
                finished = anyio.Event()

                async def gateway() -> None:
                    result["failed"] = await gw.call(
                        failing_gateway_side, hub, tmp_path, "ok-vanish"
                    )
                    finished.set()

                r.tg.start_soon(gateway)
                with anyio.fail_after(10):
                    await asked.wait()
                r.client_scope.cancel()  # the participant's process goes away mid-DKG
                with anyio.fail_after(20):
                    await finished.wait()
    finally:
        store.close()
    if case == "twice":
        assert result["created"] == [f"remote-dkg-{i}" for i in range(len(SUITES))]
        assert hub.counts["late_answers"] >= 3 * len(SUITES)  # every second answer ignored
    else:
        failed = result["failed"]
        assert failed.reason == "participant_failed"
        assert "'p2'" in str(failed)
        assert "disconnected" in str(failed) or "connection closed" in str(failed)


async def concurrent_gateway_side(hub: ParticipantHub, tmp: Path, n: int) -> list[str]:
    registry = AccountRegistry(tmp / "accounts.jsonl").open()
    shares = DkgShares(tmp / "journal.jsonl", [])
    shares.open()
    gate = approver("ops-1", "ops-2")
    created: list[str] = []
    try:
        async with dev_enclave() as enclave, trio.open_nursery() as nursery:
            node = EnclaveNode("node-1", enclave.address)
            await nursery.start(node.run)
            driver = DkgDriver(
                [node],
                [RemoteDkgParticipant(hub, "p2", "p2", timeout_s=20.0)],
                shares,
                approver=gate,
                settings=DkgSettings(round_timeout_s=20.0, max_concurrent=n),
                registry=registry,
            )

            async def one(i: int) -> None:
                account = await driver.create_account(f"remote-dkg-c{i}", SUITES[i % 3])
                created.append(account.account_id)

            async with trio.open_nursery() as creators:
                for i in range(n):
                    creators.start_soon(one, i)
            nursery.cancel_scope.cancel()
    finally:
        registry.close()
        shares.close()
        gate.close()
    return sorted(created)


async def test_concurrent_dkgs_share_the_store_saves(tmp_path: Path) -> None:
    """Six DKGs at once through one participant connection: every share sealed before its
    dkg_done, the saves group-committed (fewer saves than DKGs is allowed, never a lost
    share), the store on disk holding all six."""
    n = 6
    store_path = tmp_path / "p2.store"
    store = await new_store(store_path)
    try:
        async with remote_p2(store, AutoPolicy()) as r:
            client = r.client
            created = await r.gw.call(concurrent_gateway_side, r.hub, tmp_path, n)
    finally:
        store.close()
    names = sorted(f"remote-dkg-c{i}" for i in range(n))
    assert created == names
    assert client.counts["dkg_stored"] == n
    assert 1 <= client.counts["store_saves"] <= n
    assert await anyio.to_thread.run_sync(on_disk, store_path) == names
