"""The gateway signs every account in its own ciphersuite (DESIGN §14), against a real
development enclave holding a mixed bundle: the suite comes from ``GetAccount`` and is checked
against the counterpart shares', every share is checked, a Taproot merkle root reaches the
enclave only when given and the final signature is checked by the suite's own verifier
(Taproot: BIP-340 by libsecp256k1 under the output key). Then the sign API over HTTP, with and
without a merkle root."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio
from google.protobuf.message import Message

from trio_sign.crypto import ED25519, SCHEMES, SECP256K1, SECP256K1_TR, Scheme, _secp256k1_tr
from trio_sign.enclave import EnclaveConfig, EnclaveHandle, serve_dev_enclave
from trio_sign.gateway import (
    Coordinator,
    EnclaveNode,
    GatewayError,
    load_participant_files,
    parse_gateway_config,
    serve_gateway,
)
from trio_sign.shares import ShareStore, read_plaintext
from trio_sign.testing import generate_share_files

from .test_gateway_service import API_TOKEN, gateway_toml, request, sign

ROOT = hashlib.sha256(b"a tapscript tree").digest()
N_ACCOUNTS = 6  # round-robin: two accounts of each suite


class Mixed:
    def __init__(self, directory: Path) -> None:
        self.gen = generate_share_files(
            directory, N_ACCOUNTS, ciphersuites=[s.name for s in SCHEMES]
        )
        with self.gen.service_file.open("rb") as f:
            records = list(read_plaintext(f))
        self.suite = {r.account_id: r.ciphersuite for r in records}
        self.group_key = {r.account_id: r.group_public_key for r in records}
        for r in records:
            r.zero()

    def account(self, scheme: Scheme, index: int = 0) -> str:
        return [a for a, s in sorted(self.suite.items()) if s == scheme.name][index]

    def stores(self) -> list[ShareStore]:
        return load_participant_files([self.gen.participant_files[2]])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Mixed:
    return Mixed(tmp_path_factory.mktemp("mixed"))


class RecordingNode(EnclaveNode):
    """The real calls, with every request and the faults a test asks for."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.requests: list[tuple[str, Message]] = []
        self.claim_suite: str | None = None  # GetAccount answers this suite instead
        self.flip_share = False  # the enclave's signature share is corrupted

    async def _call(
        self, method: str, request: Message, response_type: type[Any], timeout_s: float
    ) -> Any:
        self.requests.append((method, request))
        reply = await super()._call(method, request, response_type, timeout_s)
        if method == "GetAccount" and self.claim_suite is not None:
            reply.ciphersuite = self.claim_suite
        if method == "Sign" and self.flip_share:
            share = bytearray(reply.signature_share)
            share[-1] ^= 1  # the low byte: still a canonical scalar in every suite
            reply.signature_share = bytes(share)
        return reply

    def calls(self, method: str) -> list[Any]:
        return [r for m, r in self.requests if m == method]


@asynccontextmanager
async def coordinated(mixed: Mixed) -> AsyncIterator[tuple[Coordinator, RecordingNode]]:
    config = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0", dev=True, dev_plaintext_shares=mixed.gen.service_file
    )
    stores = mixed.stores()
    try:
        async with trio.open_nursery() as nursery:
            handle: EnclaveHandle = await nursery.start(serve_dev_enclave, config)
            node = RecordingNode("enclave-0", handle.addresses[0])
            await nursery.start(node.run)
            yield Coordinator([node], stores), node
            await handle.drain()
            nursery.cancel_scope.cancel()
    finally:
        for store in stores:
            store.close()


def bip340_verifies(group_key: bytes, root: bytes | None, message: bytes, sig: bytes) -> bool:
    """libsecp256k1's BIP-340 verification under the output key, as a wallet checks it."""
    return _secp256k1_tr.verify(SECP256K1_TR.verifying_key(group_key, root), message, sig)


async def test_every_suite_signs_through_the_enclave(mixed: Mixed) -> None:
    async with coordinated(mixed) as (coordinator, node):
        for scheme in SCHEMES:
            account = mixed.account(scheme)
            gk = mixed.group_key[account]
            signed = await coordinator.sign(account, b"pay 1")
            assert signed.ciphersuite == scheme.name
            assert signed.group_public_key == gk
            assert len(signed.signature) == scheme.signature_size
            assert scheme.verify(gk, b"pay 1", signed.signature)
            if scheme is ED25519:
                nacl.signing.VerifyKey(gk).verify(b"pay 1", signed.signature)
                assert signed.verifying_key == gk
            if scheme is SECP256K1:
                assert not ED25519.verify(gk[1:], b"pay 1", signed.signature[:64])
                assert signed.verifying_key == gk
            if scheme is SECP256K1_TR:
                assert signed.verifying_key == gk[1:]  # no root: the x-only group key
                assert bip340_verifies(gk, None, b"pay 1", signed.signature)
        # No merkle root was sent for any of them: the field is absent, not empty.
        assert not any(r.HasField("taproot_merkle_root") for r in node.calls("Sign"))
        assert coordinator.signatures == 3


@pytest.mark.parametrize("root", [ROOT, b""], ids=["root", "empty-root"])
async def test_taproot_with_a_merkle_root_verifies_under_the_output_key(
    mixed: Mixed, root: bytes
) -> None:
    account = mixed.account(SECP256K1_TR, 1)
    gk = mixed.group_key[account]
    async with coordinated(mixed) as (coordinator, node):
        signed = await coordinator.sign(account, b"spend", taproot_merkle_root=root)
        (request_sent,) = node.calls("Sign")
        assert request_sent.HasField("taproot_merkle_root")
        assert request_sent.taproot_merkle_root == root
        assert signed.taproot_merkle_root == root
        assert signed.verifying_key == SECP256K1_TR.verifying_key(gk, root)
        assert bip340_verifies(gk, root, b"spend", signed.signature)
        # The tweak matters: not valid under the untweaked key, nor under another root (the
        # empty root tweaks too).
        assert not bip340_verifies(gk, None, b"spend", signed.signature)
        other = b"" if root else ROOT
        assert not bip340_verifies(gk, other, b"spend", signed.signature)
        # and the byte-identical sign_message path
        sig = await coordinator.sign_message(account, b"spend 2", taproot_merkle_root=root)
        assert bip340_verifies(gk, root, b"spend 2", sig)


async def test_a_merkle_root_for_another_suite_is_refused_before_any_call(mixed: Mixed) -> None:
    async with coordinated(mixed) as (coordinator, node):
        for scheme in (ED25519, SECP256K1):
            with pytest.raises(GatewayError) as info:
                await coordinator.sign(mixed.account(scheme), b"m", taproot_merkle_root=ROOT)
            assert info.value.reason == "bad_merkle_root"
            assert scheme.name in str(info.value)
        with pytest.raises(GatewayError) as info:
            await coordinator.sign(mixed.account(SECP256K1_TR), b"m", taproot_merkle_root=bytes(31))
        assert info.value.reason == "bad_merkle_root"
        assert "32 bytes, not 31" in str(info.value)
        assert node.requests == []


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
async def test_an_enclave_of_another_suite_is_refused(mixed: Mixed, scheme: Scheme) -> None:
    account = mixed.account(scheme)
    claimed = next(s for s in SCHEMES if s is not scheme).name
    async with coordinated(mixed) as (coordinator, node):
        node.claim_suite = claimed
        with pytest.raises(GatewayError) as info:
            await coordinator.sign(account, b"m")
        assert info.value.reason == "ciphersuite_mismatch"
        assert claimed in str(info.value)
        assert scheme.name in str(info.value)
        assert node.calls("Commit") == []  # refused before a session was opened
        # The refused answer is not cached: once the node names the right suite, it signs.
        node.claim_suite = None
        signed = await coordinator.sign(account, b"m", taproot_merkle_root=None)
        assert signed.ciphersuite == scheme.name
        assert len(node.calls("GetAccount")) == 2


async def test_participant_files_that_disagree_on_the_suite(tmp_path: Path) -> None:
    a = generate_share_files(tmp_path / "a", 1, ciphersuites=[ED25519.name])
    b = generate_share_files(
        tmp_path / "b", 1, ciphersuites=[SECP256K1_TR.name], service_identifier=3
    )
    stores = load_participant_files([a.participant_files[2], b.participant_files[2]])
    try:
        coordinator = Coordinator([EnclaveNode("n", "tcp://127.0.0.1:1")], stores)
        with pytest.raises(GatewayError) as info:
            await coordinator.sign("acct-00000000", b"m")
        assert info.value.reason == "ciphersuite_mismatch"
        assert "disagree on the ciphersuite" in str(info.value)
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
async def test_a_bad_enclave_share_is_named_in_every_suite(mixed: Mixed, scheme: Scheme) -> None:
    account = mixed.account(scheme)
    async with coordinated(mixed) as (coordinator, node):
        info_account = await node.get_account(account)
        node.flip_share = True
        root = ROOT if scheme.taproot else None
        with pytest.raises(GatewayError) as info:
            await coordinator.sign(account, b"m", taproot_merkle_root=root)
        assert info.value.reason == "bad_share"
        assert info.value.identifier == info_account.identifier
        assert "enclave node enclave-0" in str(info.value)


async def test_the_final_signature_is_checked_by_the_suites_verifier(
    mixed: Mixed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shares that pass their checks but an aggregate the independent verifier refuses (a bug
    in the aggregation, say) is never returned."""
    seen: list[tuple[bytes, bytes | None]] = []

    def refuse(gk: bytes, message: bytes, sig: bytes, merkle_root: bytes | None = None) -> bool:
        seen.append((gk, merkle_root))
        return False

    account = mixed.account(SECP256K1_TR)
    async with coordinated(mixed) as (coordinator, _node):
        monkeypatch.setattr(SECP256K1_TR, "verify", refuse)
        with pytest.raises(GatewayError) as info:
            await coordinator.sign(account, b"m", taproot_merkle_root=ROOT)
        assert info.value.reason == "verify_failed"
        assert seen == [(mixed.group_key[account], ROOT)]


async def test_the_sign_api_with_and_without_a_merkle_root(mixed: Mixed, tmp_path: Path) -> None:
    grpc_url = f"unix://{tmp_path}/enclave.sock"
    config = parse_gateway_config(
        gateway_toml(mixed.gen.participant_files[2], grpc_url, api=f'token = "{API_TOKEN}"')
    )
    tr = mixed.account(SECP256K1_TR)
    gk = mixed.group_key[tr]
    message = hashlib.sha256(b"a sighash").digest()
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(serve_gateway, config)
        api = gateway.api_urls[0]
        await nursery.start(
            serve_dev_enclave,
            EnclaveConfig(
                grpc_listen=grpc_url, dev=True, dev_plaintext_shares=mixed.gen.service_file
            ),
        )
        # Taproot without a root: the x-only key, BIP-340.
        status, body = await sign(api, tr, message.hex())
        assert status == 200, body
        assert body["ciphersuite"] == SECP256K1_TR.name
        assert "taproot_merkle_root" not in body
        assert bytes.fromhex(body["output_key_hex"]) == SECP256K1_TR.verifying_key(gk, None)
        assert bip340_verifies(gk, None, message, bytes.fromhex(body["signature_hex"]))
        # With a root: the tweaked output key.
        for root in (ROOT, b""):
            status, body = await request(
                api,
                "POST",
                "/v1/sign",
                {"account_id": tr, "message_hex": message.hex(), "taproot_merkle_root": root.hex()},
            )
            assert status == 200, body
            key = bytes.fromhex(body["output_key_hex"])
            assert key == SECP256K1_TR.verifying_key(gk, root)
            assert body["taproot_merkle_root"] == root.hex()
            sig = bytes.fromhex(body["signature_hex"])
            assert _secp256k1_tr.verify(key, message, sig)  # BIP-340, libsecp256k1
            assert not bip340_verifies(gk, None, message, sig)
        # The other suites name theirs and carry no output key.
        for scheme in (ED25519, SECP256K1):
            account = mixed.account(scheme)
            status, body = await sign(api, account, message.hex())
            assert status == 200, body
            assert body["ciphersuite"] == scheme.name
            assert "output_key_hex" not in body
            sig = bytes.fromhex(body["signature_hex"])
            assert scheme.verify(mixed.group_key[account], message, sig)
            # A root for them is refused.
            status, body = await request(
                api,
                "POST",
                "/v1/sign",
                {"account_id": account, "message_hex": "00", "taproot_merkle_root": ROOT.hex()},
            )
            assert (status, body["reason"]) == (400, "bad_merkle_root")
        # Malformed roots never reach the coordinator.
        for bad in ("zz" * 32, "00" * 31, "00" * 33, 7, ["00"]):
            status, body = await request(
                api,
                "POST",
                "/v1/sign",
                {"account_id": tr, "message_hex": "00", "taproot_merkle_root": bad},
            )
            assert (status, body["reason"]) == (400, "bad_merkle_root"), bad
        nursery.cancel_scope.cancel()


def test_the_bundle_is_mixed(mixed: Mixed) -> None:
    """The tests above sign with a bundle that holds every suite (round-robin)."""
    assert sorted(set(mixed.suite.values())) == sorted(s.name for s in SCHEMES)
