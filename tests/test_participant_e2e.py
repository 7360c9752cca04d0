"""The participant library against the real gateway endpoint on loopback, under asyncio AND
under Trio (anyio's pytest plugin; see tests/participant_anyio.py for how it coexists with
pytest-trio's trio_mode).

The gateway side (trio-websocket) runs in its own thread with its own ``trio.run``, so the very
same test body drives it from either backend; the test plays the coordinator through the hub
API and the enclave's part with a local share, then aggregates and verifies.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import pytest
import trio

from tests.participant_helpers import (
    SUITES,
    Account,
    GatewayThread,
    Shares,
    deal,
    deal_all,
    participant_keys,
    sign_with_hub,
)
from trio_sign.authz import ApproverKey, approval_payload
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import (
    HubSettings,
    ParticipantError,
    ParticipantHub,
    ParticipantKey,
)
from trio_sign.participant import (
    AutoPolicy,
    CallbackPolicy,
    ClientSettings,
    ParticipantClient,
    ParticipantConnectionError,
)
from trio_sign.participant import _messages as m

pytest_plugins = ["tests.participant_anyio"]
pytestmark = pytest.mark.anyio

T = TypeVar("T")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextmanager
def gateway(keys: dict[str, ParticipantKey], **settings: Any) -> Iterator[GatewayThread]:
    gw = GatewayThread(ParticipantHub(keys, HubSettings(gateway_id="gw-test", **settings)))
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def make_client(
    url: str,
    auth: ApproverSigningKey,
    key: ParticipantKey,
    approver: ApproverSigningKey,
    accounts: list[Account],
    *,
    policy: Any = None,
    index: int = 1,
    **settings: Any,
) -> ParticipantClient:
    return ParticipantClient(
        ClientSettings(url, reconnect_initial_s=0.05, reconnect_max_s=0.2, **settings),
        participant_id=key.participant_id,
        key_id=key.key_id,
        auth_key=auth,
        approver=approver,
        approver_key_id="approver-ops-1",
        shares=Shares(a.records[index] for a in accounts),
        policy=policy or AutoPolicy(),
        gateway_id="gw-test",
    )


async def wait_connected(gw: GatewayThread, pid: str) -> None:
    async def wait() -> None:
        with trio.fail_after(10):
            await gw.hub.wait_connected(pid)

    await gw.call(wait)


def check_approval(
    approver: ApproverSigningKey, share: Any, account: Account, message: bytes, session_id: str
) -> None:
    verifier = ApproverKey.create("approver-ops-1", "ed25519", approver.public_key)
    payload = approval_payload(
        account.account_id, session_id, message, share.approval.expires_at_unix_ms
    )
    assert share.approval.key_id == "approver-ops-1"
    assert verifier.check_signature(share.approval.signature, payload) is None


@pytest.fixture
def keys() -> Iterator[tuple[ApproverSigningKey, ParticipantKey, ApproverSigningKey]]:
    auth, key = participant_keys("ops-1")
    approver = ApproverSigningKey.generate("ed25519")
    yield auth, key, approver
    auth.close()
    approver.close()


async def test_full_round_every_suite(keys: Any) -> None:
    auth, key, approver = keys
    accounts = deal_all()
    tr = deal("acct-taproot-root", "FROST-secp256k1-SHA256-TR-v1")
    with gateway({key.participant_id: key}) as gw:
        client = make_client(gw.url, auth, key, approver, [*accounts, tr])
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await wait_connected(gw, "ops-1")
            for account in accounts:
                message = f"pay 1 to {account.account_id}".encode()
                sig, share = await gw.call(sign_with_hub, gw.hub, "ops-1", account, message)
                assert len(sig) == account.scheme.signature_size
                check_approval(approver, share, account, message, "session-1")
            for root in (b"", bytes(range(32))):
                sig, _ = await gw.call(
                    sign_with_hub, gw.hub, "ops-1", tr, b"taproot", merkle_root=root
                )
                assert tr.scheme.verify(tr.group_public_key, b"taproot", sig, root)
            assert client.session is not None
            assert client.session.in_flight == 0
            assert client.session.counts["signed"] == len(accounts) + 2
            tg.cancel_scope.cancel()
    assert client.counts["welcomed"] == 1


async def test_wrong_key_is_refused(keys: Any) -> None:
    _, key, approver = keys
    other, _ = participant_keys("ops-1")
    with gateway({key.participant_id: key}) as gw:
        client = make_client(gw.url, other, key, approver, [])
        with pytest.raises(ParticipantConnectionError) as info:
            await client.run_once()
        assert info.value.close_code == m.CLOSE_AUTH_FAILED
        assert gw.hub.connected() == []
        assert gw.hub.counts["auth_failed"] == 1
    other.close()


async def test_unknown_account_and_policy_decline(keys: Any) -> None:
    auth, key, approver = keys
    ok, refused = deal("acct-ok", SUITES[0]), deal("acct-refused", SUITES[0])
    with gateway({key.participant_id: key}) as gw:
        policy = AutoPolicy(accounts=["acct-ok"])
        client = make_client(gw.url, auth, key, approver, [ok, refused], policy=policy)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await wait_connected(gw, "ops-1")
            with pytest.raises(ParticipantError) as info:
                await gw.call(sign_with_hub, gw.hub, "ops-1", refused, b"m")
            assert info.value.reason == "declined"
            assert info.value.decline_reason == "policy"
            assert info.value.participant_id == "ops-1"
            assert "'ops-1'" in str(info.value)
            unknown = deal("acct-unknown", SUITES[0])
            with pytest.raises(ParticipantError) as info:
                await gw.call(sign_with_hub, gw.hub, "ops-1", unknown, b"m")
            assert info.value.decline_reason == "unknown_account"
            await gw.call(sign_with_hub, gw.hub, "ops-1", ok, b"m")
            tg.cancel_scope.cancel()


async def test_a_slow_decision_blocks_no_other_request(keys: Any) -> None:
    auth, key, approver = keys
    slow, fast = deal("acct-slow", SUITES[0]), deal("acct-fast", SUITES[1])
    release, asked, slow_done = anyio.Event(), anyio.Event(), anyio.Event()

    async def ask_a_person(request: m.SignRequest) -> bool:
        if request.account_id == "acct-slow":
            asked.set()
            await release.wait()
            return False
        return True

    with gateway({key.participant_id: key}) as gw:
        client = make_client(
            gw.url, auth, key, approver, [slow, fast], policy=CallbackPolicy(ask_a_person)
        )
        results: dict[str, Any] = {}

        async def sign_slow() -> None:
            try:
                await gw.call(sign_with_hub, gw.hub, "ops-1", slow, b"slow")
            except ParticipantError as exc:
                results["slow"] = exc
            slow_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await wait_connected(gw, "ops-1")
            tg.start_soon(sign_slow)
            await asked.wait()
            for i in range(5):
                await gw.call(sign_with_hub, gw.hub, "ops-1", fast, b"fast %d" % i)
            assert "slow" not in results  # still waiting for its person
            release.set()
            await slow_done.wait()
            assert results["slow"].decline_reason == "rejected"
            tg.cancel_scope.cancel()


async def test_disconnect_mid_session_and_reconnect(keys: Any) -> None:
    auth, key, approver = keys
    account = deal("acct-1", SUITES[0])
    with gateway({key.participant_id: key}) as gw:
        client = make_client(gw.url, auth, key, approver, [account])

        async def round_one() -> Any:
            return await gw.hub.sign(
                "ops-1",
                account_id="acct-1",
                session_id="s-1",
                ciphersuite=SUITES[0],
                message=b"m",
                timeout_s=10,
            )

        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as client_scope:
                tg.start_soon(client.run)
                await wait_connected(gw, "ops-1")
                commitment = await gw.call(round_one)
                assert client.session is not None
                assert client.session.in_flight == 1
                held = client.session
                client_scope.cancel()
            # the client's task is cancelled: its connection closes, its nonces are zeroed
            tg.cancel_scope.cancel()
        assert held.in_flight == 0

        async def round_two() -> None:
            with trio.fail_after(10):
                await gw.hub.wait_disconnected("ops-1")
            entries = [
                commitment.commitment,
                m.CommitmentEntry(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32),
            ]
            await gw.hub.round2(commitment, entries, b"\x01" * 32, timeout_s=5)

        with pytest.raises(ParticipantError) as info:
            await gw.call(round_two)
        assert info.value.reason == "disconnected"
        assert info.value.participant_id == "ops-1"
        # a new connection signs again
        client2 = make_client(gw.url, auth, key, approver, [account])
        async with anyio.create_task_group() as tg:
            tg.start_soon(client2.run)
            await wait_connected(gw, "ops-1")
            await gw.call(sign_with_hub, gw.hub, "ops-1", account, b"again")
            tg.cancel_scope.cancel()


SESSIONS = 1000


async def test_1000_concurrent_sessions_through_one_connection(
    keys: Any, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    auth, key, approver = keys
    accounts = [deal(f"acct-{i}", SUITES[i % 3]) for i in range(30)]
    with gateway({key.participant_id: key}, max_in_flight=SESSIONS) as gw:
        client = make_client(gw.url, auth, key, approver, accounts, max_in_flight=SESSIONS)

        async def many() -> float:
            start = trio.current_time()
            done = 0

            async def one(i: int) -> None:
                nonlocal done
                account = accounts[i % len(accounts)]
                await sign_with_hub(
                    gw.hub, "ops-1", account, b"msg %d" % i, session_id=f"s-{i}", timeout_s=120
                )
                done += 1

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for i in range(SESSIONS):
                        nursery.start_soon(one, i)
            assert done == SESSIONS
            return trio.current_time() - start

        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await wait_connected(gw, "ops-1")
            wall = time.monotonic()
            elapsed = await gw.call(many)
            wall = time.monotonic() - wall
            assert client.session is not None
            assert client.session.counts["signed"] == SESSIONS
            assert client.session.in_flight == 0
            tg.cancel_scope.cancel()
    with capsys.disabled():
        print(
            f"\n[{anyio_backend}] {SESSIONS} concurrent sessions through one participant "
            f"connection: {elapsed:.2f} s ({SESSIONS / elapsed:.0f} sessions/s)"
        )
    assert wall < 120


async def test_reconnects_after_the_gateway_drops_it(keys: Any) -> None:
    auth, key, approver = keys
    account = deal("acct-1", SUITES[2])
    with gateway({key.participant_id: key}) as gw:
        client = make_client(gw.url, auth, key, approver, [account])
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await wait_connected(gw, "ops-1")
            first = client.session

            async def kick() -> None:
                assert gw.hub.disconnect("ops-1")
                with trio.fail_after(10):
                    await gw.hub.wait_disconnected("ops-1")

            await gw.call(kick)
            await wait_connected(gw, "ops-1")
            await gw.call(sign_with_hub, gw.hub, "ops-1", account, b"after a reconnect")
            assert client.session is not first
            assert client.counts["welcomed"] == 2
            tg.cancel_scope.cancel()


async def test_over_tls(keys: Any, tmp_path: Any) -> None:
    """wss://: the participant checks the gateway's certificate (anyio TLS), then signs."""
    from trio_sign.testing._pki import make_ca, make_leaf
    from trio_sign.transport._tls import load_cert_chain

    auth, key, approver = keys
    ca = make_ca("participants test CA")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_cert_chain(server_ctx, *make_leaf(ca, "gateway", server=True))
    client_ctx = ssl.create_default_context(cadata=ca.pem.decode())
    account = deal("acct-tls", SUITES[0])
    gw = GatewayThread(ParticipantHub({key.participant_id: key}, HubSettings(gateway_id="gw-test")))
    gw.ssl_context = server_ctx
    gw.start()
    try:
        url = gw.url.replace("ws://", "wss://")
        client = make_client(url, auth, key, approver, [account], ssl_context=client_ctx)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await wait_connected(gw, "ops-1")
            await gw.call(sign_with_hub, gw.hub, "ops-1", account, b"over tls")
            tg.cancel_scope.cancel()
        # a participant that does not trust the gateway's CA never connects
        stranger = make_client(
            url, auth, key, approver, [account], ssl_context=ssl.create_default_context()
        )
        with pytest.raises(ParticipantConnectionError):
            await stranger.run_once()
    finally:
        gw.stop()
