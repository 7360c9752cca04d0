"""The coordinator with remote participants (issue 17 part 2, DESIGN §15): the gateway holds
no share. A development enclave holds identifier 1; two participants (the real library under
Trio, on loopback to the real hub) hold identifiers 2 and 3; the gateway knows only the
public account registry. Every signature is checked by libsodium."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import nacl.signing
import pytest
import trio

from tests.participant_helpers import Shares, participant_keys
from trio_sign.enclave import EnclaveConfig, EnclaveHandle, serve_dev_enclave
from trio_sign.gateway import CoordinatorSettings, EnclaveNode, GatewayError
from trio_sign.gateway._accounts import (
    AccountRegistry,
    AccountRegistryError,
    RegisteredAccount,
    RemoteHolder,
)
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._coordinator import Coordinator
from trio_sign.gateway._participants import HubSettings, ParticipantHub, ParticipantKey
from trio_sign.participant import AutoPolicy, CallbackPolicy, ClientSettings, ParticipantClient
from trio_sign.participant import _messages as m
from trio_sign.participant import _session as s
from trio_sign.shares import ShareRecord, read_plaintext
from trio_sign.testing import generate_share_files

N_ACCOUNTS = 3
PIDS = ("ops-2", "ops-3")  # identifiers 2 and 3


@dataclasses.dataclass
class Dealt:
    service: Path
    records: dict[str, list[ShareRecord]]  # participant id -> its records

    def registry(self, path: Path) -> AccountRegistry:
        reg = AccountRegistry(path).open()
        first = self.records[PIDS[0]]
        for i, rec in enumerate(first):
            holders = tuple(
                RemoteHolder(
                    pid, self.records[pid][i].identifier, self.records[pid][i].verifying_share
                )
                for pid in PIDS
            )
            reg.add(
                RegisteredAccount(
                    rec.account_id,
                    rec.ciphersuite,
                    rec.group_public_key,
                    rec.min_signers,
                    rec.max_signers,
                    holders,
                    source="import",
                )
            )
        return reg


@pytest.fixture(scope="module")
def dealt(tmp_path_factory: pytest.TempPathFactory) -> Dealt:
    report = generate_share_files(tmp_path_factory.mktemp("shares"), N_ACCOUNTS)
    records: dict[str, list[ShareRecord]] = {}
    for pid, ident in zip(PIDS, (2, 3), strict=True):
        with report.participant_files[ident].open("rb") as f:
            records[pid] = list(read_plaintext(f))
    return Dealt(report.service_file, records)


class Misbehaving(s.ParticipantSession):
    """The library's session, with a bad signature share for the participants named."""

    bad_share: ClassVar[set[str]] = set()

    def frames_to_send(self) -> list[str]:
        out = []
        for frame in super().frames_to_send():
            msg = m.parse_message(frame)
            if isinstance(msg, m.SignatureShare) and self.participant_id in self.bad_share:
                frame = m.encode_message(
                    dataclasses.replace(msg, signature_share=b"\x01" + bytes(31))
                )
            out.append(frame)
        return out


@dataclasses.dataclass
class Stack:
    coordinator: Coordinator
    hub: ParticipantHub
    nursery: trio.Nursery
    clients: dict[str, trio.CancelScope]
    start_client: Callable[..., Any]

    async def connect(self, pid: str, policy: Any = None) -> None:
        await self.start_client(pid, policy)
        with trio.fail_after(10):
            await self.hub.wait_connected(pid)

    async def disconnect(self, pid: str) -> None:
        self.clients.pop(pid).cancel()
        with trio.fail_after(10):
            await self.hub.wait_disconnected(pid)


@asynccontextmanager
async def stack(
    dealt: Dealt, tmp_path: Path, settings: CoordinatorSettings | None = None
) -> AsyncIterator[Stack]:
    keys: dict[str, tuple[ApproverSigningKey, ParticipantKey]] = {
        pid: participant_keys(pid) for pid in PIDS
    }
    approvers = {pid: ApproverSigningKey.generate() for pid in PIDS}
    hub = ParticipantHub({pid: k for pid, (_, k) in keys.items()}, HubSettings(gateway_id="gw"))
    registry = dealt.registry(tmp_path / "accounts.jsonl")
    cfg = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0", dev=True, dev_plaintext_shares=dealt.service
    )
    try:
        async with trio.open_nursery() as nursery:
            enclave: EnclaveHandle = await nursery.start(serve_dev_enclave, cfg)
            port = await nursery.start(functools.partial(hub.serve, "127.0.0.1", 0))
            node = EnclaveNode("node-1", enclave.addresses[0])
            await nursery.start(node.run)
            clients: dict[str, trio.CancelScope] = {}

            async def start_client(pid: str, policy: Any = None) -> None:
                auth, key = keys[pid]
                client = ParticipantClient(
                    ClientSettings(f"ws://127.0.0.1:{port}/v1/participants"),
                    participant_id=pid,
                    key_id=key.key_id,
                    auth_key=auth,
                    approver=approvers[pid],
                    approver_key_id=f"{pid}-approver",
                    shares=Shares(dealt.records[pid]),
                    policy=policy or AutoPolicy(),
                )
                scope = trio.CancelScope()
                clients[pid] = scope

                async def run() -> None:
                    with scope:
                        await client.run()

                nursery.start_soon(run)

            coordinator = Coordinator(
                [node],
                [],
                settings=settings or CoordinatorSettings(),
                participants=hub,
                registry=registry,
            )
            yield Stack(coordinator, hub, nursery, clients, start_client)
            nursery.cancel_scope.cancel()
    finally:
        registry.close()
        for auth, _ in keys.values():
            auth.close()
        for a in approvers.values():
            a.close()
        Misbehaving.bad_share = set()


def verify(dealt: Dealt, account_id: str, message: bytes, signature: bytes) -> None:
    rec = next(r for r in dealt.records[PIDS[0]] if r.account_id == account_id)
    nacl.signing.VerifyKey(rec.group_public_key).verify(message, signature)


def account(dealt: Dealt, i: int = 0) -> str:
    return dealt.records[PIDS[0]][i].account_id


async def test_signs_with_a_remote_participant_and_forwards_its_approval(
    dealt: Dealt, tmp_path: Path
) -> None:
    async with stack(dealt, tmp_path) as st:
        await st.connect("ops-2")
        for i in range(N_ACCOUNTS):
            signed = await st.coordinator.sign(account(dealt, i), b"remote %d" % i)
            verify(dealt, account(dealt, i), b"remote %d" % i, signed.signature)
        assert st.coordinator.approvals_sent == {"ops-2-approver": N_ACCOUNTS}
        assert st.coordinator.counterparts == []  # the gateway holds no share


async def test_picks_the_responsive_participant_when_one_is_slow(
    dealt: Dealt, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    never = trio.Event()

    async def slow(request: m.SignRequest) -> bool:
        await never.wait()
        return True

    settings = CoordinatorSettings(participant_timeout_s=5.0)
    async with stack(dealt, tmp_path, settings) as st:
        await st.connect("ops-2", CallbackPolicy(slow))
        await st.connect("ops-3")
        start = trio.current_time()
        for i in range(4):
            signed = await st.coordinator.sign(account(dealt), b"m%d" % i)
            verify(dealt, account(dealt), b"m%d" % i, signed.signature)
        assert trio.current_time() - start < 1.0  # never waited for the slow one
        assert st.coordinator.approvals_sent == {"ops-3-approver": 4}
        assert st.hub.in_flight("ops-2") == 0  # its requests were cancelled

        # Alone, the slow one fails its session, named, within the deadline.
        await st.disconnect("ops-3")
        start = trio.current_time()
        with pytest.raises(GatewayError) as info:
            await st.coordinator.sign(account(dealt), b"alone")
        assert info.value.reason == "participant_failed"
        assert info.value.participant_id == "ops-2"
        assert "'ops-2'" in str(info.value)
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
        assert st.coordinator.aborted_sessions >= 1


async def test_a_bad_share_is_named_and_the_enclave_never_signs(
    dealt: Dealt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s, "ParticipantSession", Misbehaving)
    Misbehaving.bad_share = {"ops-3"}
    async with stack(dealt, tmp_path) as st:
        await st.connect("ops-3")
        with pytest.raises(GatewayError) as info:
            await st.coordinator.sign(account(dealt), b"bad")
        assert info.value.reason == "bad_share"
        assert info.value.participant_id == "ops-3"
        assert info.value.identifier == dealt.records["ops-3"][0].identifier
        assert "'ops-3'" in str(info.value)
        assert st.coordinator.approvals_sent == {}
        assert st.coordinator.aborted_sessions == 1
        # The honest one signs the same account at once.
        await st.connect("ops-2")
        await st.disconnect("ops-3")
        signed = await st.coordinator.sign(account(dealt), b"good")
        verify(dealt, account(dealt), b"good", signed.signature)


async def test_a_participant_that_vanishes_mid_session_fails_only_its_session(
    dealt: Dealt, tmp_path: Path
) -> None:
    gate = trio.Event()
    asked = trio.Event()

    async def hold(request: m.SignRequest) -> bool:
        asked.set()
        await gate.wait()
        return True

    async with stack(dealt, tmp_path) as st:
        await st.connect("ops-2", CallbackPolicy(hold))
        result: list[BaseException] = []

        async def sign() -> None:
            try:
                await st.coordinator.sign(account(dealt), b"vanish")
            except GatewayError as exc:
                result.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(sign)
            await asked.wait()
            await st.disconnect("ops-2")
        (err,) = result
        assert isinstance(err, GatewayError)
        assert err.reason == "participant_failed"
        assert err.participant_id == "ops-2"
        await st.connect("ops-3")
        signed = await st.coordinator.sign(account(dealt, 1), b"after")
        verify(dealt, account(dealt, 1), b"after", signed.signature)


async def test_no_participant_connected(dealt: Dealt, tmp_path: Path) -> None:
    async with stack(dealt, tmp_path) as st:
        with pytest.raises(GatewayError) as info:
            await st.coordinator.sign(account(dealt), b"x")
        assert info.value.reason == "participant_failed"
        assert "ops-2" in str(info.value)
        assert "ops-3" in str(info.value)


def test_registry_is_durable_and_checked(dealt: Dealt, tmp_path: Path) -> None:
    path = tmp_path / "accounts.jsonl"
    reg = dealt.registry(path)
    reg.close()
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "signing_share" not in text
    for rec in dealt.records[PIDS[0]]:
        assert rec.signing_share.hex() not in text
    # a cut last line (a crash mid-append) is dropped
    path.write_text(text + '{"v": 1, "account_id": "cut')
    again = AccountRegistry(path).open()
    assert len(again) == N_ACCOUNTS
    again.close()
    assert path.read_text() == text
    path.write_text(text + '{"v": 1}\n')
    with pytest.raises(AccountRegistryError, match="line 4"):
        AccountRegistry(path).open()


# -- the gateway process's configuration path ------------------------------------------------

_WATCHED: set[str] = set()
_OPENED: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    path = args[0] if event == "open" and _WATCHED and args else None
    if isinstance(path, (str, Path)) and str(path) in _WATCHED:
        _OPENED.append(str(path))


sys.addaudithook(_audit)


def _gateway_toml(tmp_path: Path, address: str, keys: dict[str, ParticipantKey]) -> str:
    participants = "".join(
        f'[participants.{pid}]\nkey_id = "{k.key_id}"\npublic_key = "{k.public_key.hex()}"\n'
        for pid, k in keys.items()
    )
    return f"""
[api]
listen = "tcp://127.0.0.1:0"
token = "gateway-api-token-0123456789abcdef"
[events]
listen = "tcp://127.0.0.1:0"
[participant_endpoint]
listen = "tcp://127.0.0.1:0"
gateway_id = "gw"
timeout_s = 5
[accounts]
registry = "accounts.jsonl"
{participants}
[dev]
skip_attestation = true
[[node]]
id = "node-1"
address = "{address}"
events_token = "node-1-events-token-0123456789abcdef"
"""


async def test_the_gateway_process_opens_no_share_file_and_signs_with_a_participant(
    dealt: Dealt, tmp_path: Path
) -> None:
    """serve_gateway from a gateway.toml without [shares]: the participant endpoint is served,
    the registry read, and no share file is ever opened (audited), yet it signs."""
    from trio_sign.gateway import parse_gateway_config, serve_gateway
    from trio_sign.gateway._service import GatewayHandle

    keys = {pid: participant_keys(pid) for pid in PIDS}
    dealt.registry(tmp_path / "accounts.jsonl").close()
    report_dir = dealt.service.parent
    cfg = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0", dev=True, dev_plaintext_shares=dealt.service
    )
    approver = ApproverSigningKey.generate()
    try:
        async with trio.open_nursery() as nursery:
            enclave: EnclaveHandle = await nursery.start(serve_dev_enclave, cfg)
            text = _gateway_toml(
                tmp_path, enclave.addresses[0], {pid: k for pid, (_, k) in keys.items()}
            )
            config = parse_gateway_config(text, base=tmp_path)
            assert config.participant_files == ()
            _WATCHED.update(str(p) for p in report_dir.iterdir() if p != dealt.service)
            _OPENED.clear()
            handle: GatewayHandle = await nursery.start(serve_gateway, config)
            assert handle.participant_url is not None
            assert handle.coordinator.counterparts == []
            auth, key = keys["ops-2"]
            client = ParticipantClient(
                ClientSettings(handle.participant_url),
                participant_id="ops-2",
                key_id=key.key_id,
                auth_key=auth,
                approver=approver,
                approver_key_id="ops-2-approver",
                shares=Shares(dealt.records["ops-2"]),
                policy=AutoPolicy(),
                gateway_id="gw",
            )
            nursery.start_soon(client.run)
            assert handle.participants is not None
            with trio.fail_after(10):
                await handle.participants.wait_connected("ops-2")
            signed = await handle.coordinator.sign(account(dealt), b"production path")
            verify(dealt, account(dealt), b"production path", signed.signature)
            assert _OPENED == []
            nursery.cancel_scope.cancel()
    finally:
        _WATCHED.clear()
        approver.close()
        for auth, _ in keys.values():
            auth.close()


def test_share_files_are_a_development_flag() -> None:
    from trio_sign.gateway import GatewayConfigError, parse_gateway_config

    base = """
[api]
token = "gateway-api-token-0123456789abcdef"
[tls]
cert = "g.pem"
key = "g.key"
[attestation]
pcrs = {{ PCR0 = "{}", PCR1 = "{}", PCR2 = "{}" }}
[[node]]
id = "node-1"
address = "tcp://127.0.0.1:1"
events_token = "node-1-events-token-0123456789abcdef"
shares_sha256 = "{}"
""".format("11" * 48, "22" * 48, "33" * 48, "ab" * 32)
    shares = '[shares]\nparticipant_files = ["p.json"]\n'
    with pytest.raises(GatewayConfigError, match=r"development only.*\[dev\] share_files"):
        parse_gateway_config(shares + base)
    assert parse_gateway_config(shares + base + "[dev]\nshare_files = true\n").participant_files
    with pytest.raises(GatewayConfigError, match=r"\[participant_endpoint\] is required"):
        parse_gateway_config(base)
    with pytest.raises(GatewayConfigError, match="at least one remote"):
        parse_gateway_config('[participant_endpoint]\nlisten = "tcp://127.0.0.1:0"\n' + base)
    remote = (
        '[participant_endpoint]\nlisten = "tcp://127.0.0.1:0"\n'
        '[participants.ops-2]\nkey_id = "k"\npublic_key = "%s"\n' % ("cd" * 32)
    )
    config = parse_gateway_config(remote + base)
    assert config.participant_files == ()
    assert config.participant_listen == "tcp://127.0.0.1:0"
    assert sorted(config.remote_participants) == ["ops-2"]


async def test_post_accounts_and_sign_over_http_with_a_remote_participant(tmp_path: Path) -> None:
    """The gateway process with [participant_endpoint] and no share file: POST /v1/accounts
    runs the DKG with the enclave and the remote participant (the account in the registry,
    the share in the participant's sealed store), POST /v1/sign signs with it; with the
    participant gone, signing is 503 participant_failed naming it."""
    from trio_sign.crypto import scheme_by_name
    from trio_sign.gateway import parse_gateway_config, serve_gateway
    from trio_sign.gateway._service import GatewayHandle
    from trio_sign.participant import PassphraseKey, SealedShareStore
    from trio_sign.participant import _store as store_module

    from .test_enclave_dkg import APPROVERS, PARTICIPANT_KEYS, SUITES
    from .test_gateway_dkg import API_TOKEN, create, dev_enclave, signing_key, write_key
    from .test_gateway_service import request

    auth = signing_key(PARTICIPANT_KEYS["p2"])
    keys = tmp_path / "keys"
    keys.mkdir()
    approvers = ", ".join(
        f'{n} = "{write_key(keys / f"{n}.key", APPROVERS[n], n)}"' for n in ("ops-1", "ops-2")
    )
    toml = f"""
[api]
listen = "tcp://127.0.0.1:0"
token = "{API_TOKEN}"
[events]
listen = "tcp://127.0.0.1:0"
[participant_endpoint]
listen = "tcp://127.0.0.1:0"
timeout_s = 10
[accounts]
registry = "accounts.jsonl"
[participants.p2]
key_id = "p2"
public_key = "{auth.public_key.hex()}"
[approvers]
keys = {{ {approvers} }}
[dkg]
journal = "dkg.jsonl"
[dev]
skip_attestation = true
[[node]]
id = "node-1"
address = "ADDRESS"
events_token = "node-1-events-token-0123456789abcdef"
"""
    cheap = PassphraseKey(
        "pw", opslimit=store_module.MIN_OPSLIMIT, memlimit=store_module.MIN_MEMLIMIT
    )
    store = SealedShareStore.create(tmp_path / "p2.store", "p2", [], cheap)
    try:
        async with dev_enclave() as enclave, trio.open_nursery() as nursery:
            config = parse_gateway_config(toml.replace("ADDRESS", enclave.address), base=tmp_path)
            assert config.participant_files == ()
            handle: GatewayHandle = await nursery.start(serve_gateway, config)
            assert handle.dkg is not None
            assert handle.participants is not None
            assert handle.participant_url is not None
            client = ParticipantClient(
                ClientSettings(handle.participant_url),
                participant_id="p2",
                key_id="p2",
                auth_key=auth,
                approver=auth,
                approver_key_id="p2",
                shares=store,
                policy=AutoPolicy(),
            )
            scope = trio.CancelScope()

            async def run_client() -> None:
                with scope:
                    await client.run()

            nursery.start_soon(run_client)
            with trio.fail_after(10):
                await handle.participants.wait_connected("p2")
            api = handle.api_urls[0]
            status, body = await create(
                api, {"account_id": "acct-remote", "ciphersuite": SUITES[1]}
            )
            assert status == 201, body
            assert body["participants"] == ["p2"]
            assert (body["min_signers"], body["max_signers"]) == (2, 2)
            assert store.share("acct-remote") is not None
            message = b"the gateway holds no share".hex()
            status, signed = await request(
                api,
                "POST",
                "/v1/sign",
                {"account_id": "acct-remote", "message_hex": message},
                token=API_TOKEN,
            )
            assert status == 200, signed
            assert scheme_by_name(SUITES[1]).verify(
                bytes.fromhex(body["group_public_key_hex"]),
                bytes.fromhex(message),
                bytes.fromhex(signed["signature_hex"]),
                None,
            )
            scope.cancel()
            with trio.fail_after(10):
                await handle.participants.wait_disconnected("p2")
            status, refused = await request(
                api,
                "POST",
                "/v1/sign",
                {"account_id": "acct-remote", "message_hex": message},
                token=API_TOKEN,
            )
            assert (status, refused["reason"]) == (503, "participant_failed"), refused
            assert "p2" in refused["error"]
            nursery.cancel_scope.cancel()
    finally:
        store.close()
        auth.close()
    assert "acct-remote" in (tmp_path / "accounts.jsonl").read_text()
