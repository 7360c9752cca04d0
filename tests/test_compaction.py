"""Compaction and re-encryption inside the enclave (docs/compaction.md; issue 16 deliverable 5):
base + deltas of every suite sealed into a new base under a KMS key pinned in
``[bundles] compaction_kms_keys`` (a data key from the local KMS's ``GenerateDataKey`` with
``Recipient``, relayed by the real parent code), signed by the identity key, stored by the
parent put-if-absent before the answer; the chain continuing across it; a fresh boot reading
it through the real preload and ``Decrypt`` with ``Recipient``; the ``Compact`` rpc's
authorization; the store failing, the parent not answering, and a KMS key not pinned."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proto_min import sign_service_pb2 as pb
from trio_sign import ShareFileError
from trio_sign.authz import Authorizer, approval_payload
from trio_sign.crypto import SCHEMES, _sodium
from trio_sign.enclave import SessionPool
from trio_sign.enclave._compact import (
    COMPACT_POLICY,
    CompactionError,
    Compactor,
    compaction_approval_message,
    open_compacted_key,
)
from trio_sign.enclave._deltas import DeltaWriter, EnclaveDeltas
from trio_sign.enclave._identity import seal_identity
from trio_sign.enclave._measured import MeasuredConfigError, parse_measured_config
from trio_sign.enclave._preload import PreloadError, preload_shares
from trio_sign.enclave._service import SignService
from trio_sign.kms import (
    KeyPolicy,
    KeyStore,
    KmsRecipientKms,
    LocalKms,
    make_kms_client,
    serve_kms_local,
)
from trio_sign.nitro import (
    AsyncNsm,
    EphemeralRecipientKey,
    HelloMessage,
    LocalNsm,
    MessageStream,
    encrypt_for_recipient,
    verify_attestation,
)
from trio_sign.nitro._channel import (
    BaseStoredMessage,
    BaseStoreMessage,
    CompactionKeyMessage,
    CompactionKeyRequestMessage,
    DeltaChunkMessage,
    DeltaEndMessage,
)
from trio_sign.parent import serve_preload
from trio_sign.parent._deltas import (
    Deltas,
    DeltaStoreError,
    FileDeltaStore,
    PutOutcome,
    kms_compaction_relay,
    serve_deltas_connection,
)
from trio_sign.rpc import RpcError, StatusCode, serve_grpc
from trio_sign.shares import (
    BundleTrust,
    SealedLoader,
    ShareRecord,
    ShareStore,
    encode_bundle,
    inspect_sealed,
)
from trio_sign.shares._deltas import DeltaChain
from trio_sign.shares._signature import CeremonyKey

from .test_enclave_deltas import (
    TAG,
    World,
    booted,
    fresh_accounts,
    records_of,
    sign_with,
    world,  # noqa: F401 - the fixture
)
from .test_identity_boot import run_both
from .test_identity_key import _no_aws_config, _policy  # noqa: F401 - autouse fixture
from .test_share_ciphersuites import dealt

ED, K1, TR = (s.name for s in SCHEMES)
APPROVERS = {n: nacl.signing.SigningKey(bytes([i]) * 32) for i, n in ((7, "ops-1"), (8, "ops-2"))}


# -- the world: a node on the real parent, the local KMS and NSM ---------------------------------


@dataclass
class Kms:
    client: Any
    target: str  # pinned in compaction_kms_keys
    other: str  # a key of the same KMS, not pinned


@asynccontextmanager
async def local_kms(tmp_path: Path, nsm: LocalNsm) -> AsyncIterator[Kms]:
    store = KeyStore(tmp_path / "kms-keys.json")
    target, other = store.create(description="compaction"), store.create(description="other")
    kms = LocalKms(store, root_pem=nsm.root_pem, policy=KeyPolicy(_policy()))
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_kms_local, kms, "tcp://127.0.0.1:0")
            client = make_kms_client(url, region="us-east-1")
            yield Kms(client, store.arn_for(target.key_id), store.arn_for(other.key_id))
            nursery.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture
def nsm(nsm_dir: Path) -> LocalNsm:
    return LocalNsm.from_dir(nsm_dir)


@dataclass
class Node:
    store: ShareStore
    deltas: EnclaveDeltas
    writer: DeltaWriter
    compactor: Compactor


def node_of(
    w: World, store: ShareStore, chain: DeltaChain, nsm: LocalNsm, allowed: tuple[str, ...]
) -> Node:
    deltas = EnclaveDeltas(
        store,
        chain,
        provider=w.ident.delta_key_wrap(),
        signer=w.ident,
        signing_keys=(w.ident.public_key,),
    )
    writer = DeltaWriter(deltas)
    compactor = Compactor(writer, nsm=AsyncNsm(nsm), allowed_kms_keys=allowed, chunk_size=1024)
    return Node(store, deltas, writer, compactor)


def old_node(w: World, nsm: LocalNsm, allowed: tuple[str, ...]) -> Node:
    store = w.load_base()
    assert store.fingerprint is not None
    return node_of(w, store, DeltaChain(store.fingerprint), nsm, allowed)


async def connect(nursery: trio.Nursery, node: Node, parent: Deltas) -> trio.CancelScope:
    """The real parent's deltas connection to ``node`` (its compactor's converse)."""
    parent_end, enclave_end = trio.testing.memory_stream_pair()
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(serve_deltas_connection, parent_end, parent)
                messages = MessageStream(enclave_end)
                await messages.send(HelloMessage(channel="deltas"))
                await node.compactor.converse(messages)

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    booted(parent, node)  # type: ignore[arg-type]  # the fields booted() reads
    return scope


def suite_records(prefix: str) -> list[ShareRecord]:
    """One account of each suite (the service's share of a dealt 2-of-3 key)."""
    return [dealt(scheme, f"{prefix}-{i}") for i, scheme in enumerate(SCHEMES)]


def same_accounts(old: ShareStore, new: ShareStore) -> None:
    """Every account of ``new`` is in ``old`` with the same public data and the same share."""
    for account_id in new._index:
        x, y = old[account_id], new[account_id]
        assert (x.ciphersuite, x.identifier, x.verifying_share, x.group_public_key) == (
            y.ciphersuite,
            y.identifier,
            y.verifying_share,
            y.group_public_key,
        )
        assert (x.min_signers, x.max_signers, x.policy) == (y.min_signers, y.max_signers, y.policy)
        assert _sodium.ct_equal(x.signing_share, y.signing_share)


async def boot_from(path: Path, kms: Kms, nsm: LocalNsm, world: World) -> ShareStore:  # noqa: F811
    """A fresh enclave boot on ``path``: the parent's real KMS ``Decrypt`` with ``Recipient``
    (``KmsRecipientKms``) for a fresh attestation, the envelope opened with the enclave's RSA
    key, the data key bound to the identity key (``open_compacted_key``), the base loaded
    under compaction trust. The KMS data key alone (all a relaying parent could ever be
    handed) does not open it."""
    data = await trio.Path(path).read_bytes()
    header, _ = inspect_sealed(io.BytesIO(data))
    rsa_key = await trio.to_thread.run_sync(EphemeralRecipientKey.generate)
    try:
        document = await AsyncNsm(nsm).attestation(public_key=rsa_key.public_key_der)
        envelope = await KmsRecipientKms(kms.client)(document, header)
        kms_key = rsa_key.decrypt_recipient_ciphertext(envelope)
    finally:
        rsa_key.close()
    trust = BundleTrust.pinned([], compaction_keys=[world.ident.public_key])

    def load(key: bytearray) -> ShareStore:
        loader = SealedLoader(unwrap=lambda h: bytearray(key), total_bytes=len(data), trust=trust)
        loader.feed(data)
        return loader.finish()

    with pytest.raises(ShareFileError):
        load(kms_key)
    with world.ident.delta_key_wrap() as wrap:
        key = open_compacted_key(header, kms_key, wrap)
    return load(key)


# -- the round trip ------------------------------------------------------------------------------


async def test_compaction_holds_every_account_and_the_chain_continues(
    world: World,  # noqa: F811 - the fixture
    nsm: LocalNsm,
    tmp_path: Path,
) -> None:
    """Base (4 Ed25519) + three deltas (Ed25519, one account of each suite, a policy) compact
    into a base under the pinned KMS key that a fresh boot reads through KMS; it holds the same
    accounts (public data and shares; signing works), is signed by the identity key and
    accepted only as a compacted base; delta 4 made after it loads on the new node, delta 2
    is refused as already contained, and the new node's own delta is sequence 5."""
    async with local_kms(tmp_path, nsm) as kms:
        node = old_node(world, nsm, (kms.target,))
        parent = world.parent(compaction_kms=kms_compaction_relay(kms.client))
        ed = fresh_accounts("ed", 2)
        vip = fresh_accounts("vip", 1)
        vip_records = [dataclasses.replace(r, policy="vip") for r in records_of(vip)]
        async with trio.open_nursery() as nursery:
            await connect(nursery, node, parent)
            await node.writer.store(records_of(ed), "create", "dkg-1")
            await node.writer.store(suite_records("mixed"), "create", "dkg-2")
            await node.writer.store(vip_records, "create", "dkg-3")
            assert node.deltas.chain.count == 3
            head3 = node.deltas.chain.head

            result = await node.compactor.compact(kms.target)

            assert (result.accounts, result.deltas) == (4 + 2 + 3 + 1, 3)
            path = world.dir / "deltas" / f"base-{result.sha256}.enc"
            assert result.object == f"file://{path}"
            data = path.read_bytes()  # durable before the answer
            header, end = inspect_sealed(io.BytesIO(data))
            assert end.sha256_hex == result.sha256
            assert header["kind"] == "base"
            assert header["key_provider"] == "aws-kms"
            assert header["kms_key_id"] == kms.target
            assert header["compacts"] == {
                "base": world.load_base().fingerprint,
                "head": head3,
                "deltas": 3,
            }
            assert header["ciphersuites"] == {ED: 4 + 2 + 1 + 1, K1: 1, TR: 1}
            assert end.signature is not None
            assert end.signature.public_key == world.ident.public_key
            assert not [p for p in (world.dir / "deltas").iterdir() if p.name.endswith(".tmp")]
            # The old node keeps creating accounts on the same chain meanwhile.
            late = fresh_accounts("late", 1)
            assert (await node.writer.store(records_of(late), "create", "dkg-4"))[0] == 4
            nursery.cancel_scope.cancel()

        # A fresh enclave boots the new base: the parent's KMS Decrypt with Recipient under
        # the new key, the envelope opened by the enclave's attestation key.
        fresh = await boot_from(path, kms, nsm, world)
        assert fresh.fingerprint == result.sha256
        assert fresh.signer == world.ident.public_key
        assert len(fresh) == len(node.store) - 1
        assert "late-0" not in fresh
        same_accounts(node.store, fresh)
        assert fresh.policies() == {"default", "vip"}
        pool = SessionPool(fresh.get)
        for account in {**world.accounts, **ed, **vip}.values():
            sign_with(pool, account, f"s-{account.account_id}", b"after compaction")

        # The chain continues across the compaction.
        chain = DeltaChain.for_base(header, result.sha256)
        assert (chain.count, chain.head, chain.next_sequence) == (3, head3, 4)
        new = node_of(world, fresh, chain, nsm, (kms.target,))
        files = FileDeltaStore(world.dir / "deltas", host_tag=TAG)
        with pytest.raises(ShareFileError) as refused:
            new.deltas.apply(files.get(2))
        assert refused.value.reason == "delta_compacted"
        applied = new.deltas.apply(files.get(4))
        assert applied.accounts == ("late-0",)
        sign_with(pool, late["late-0"], "s-late", b"made after the compaction")
        async with trio.open_nursery() as nursery:
            await connect(nursery, new, world.parent())
            mine = fresh_accounts("mine", 1)
            assert (await new.writer.store(records_of(mine), "create", "dkg-5"))[0] == 5
            nursery.cancel_scope.cancel()
        assert files.list().sequences == (1, 2, 3, 4, 5)  # the base is not a delta


def test_identity_key_signs_only_a_compacted_base(world: World) -> None:  # noqa: F811
    """Base trust: the pinned identity key is accepted for a base with ``compacts`` (beside the
    ceremony keys), never for a base without it; other keys never."""
    ident = world.ident
    ceremony = CeremonyKey.from_seed(bytes([9]) * 32)
    records = [a.service for a in world.accounts.values()]
    compacts = {"base": "ab" * 32, "head": "cd" * 32, "deltas": 7}
    trust = BundleTrust.pinned([ceremony.public_key], compaction_keys=[ident.public_key])

    def load(data: bytes, trust: BundleTrust = trust) -> ShareStore:
        loader = SealedLoader(provider=world.key, total_bytes=len(data), trust=trust)
        loader.feed(data)
        return loader.finish()

    def refused(data: bytes, trust: BundleTrust = trust) -> str:
        with pytest.raises(ShareFileError) as info:
            load(data, trust)
        return info.value.reason

    compacted = encode_bundle(records, world.key, signer=ident, compacts=compacts)
    assert len(load(compacted)) == 4
    assert len(load(encode_bundle(records, world.key, signer=ceremony))) == 4
    assert refused(encode_bundle(records, world.key, signer=ident)) == "bundle_signer_unknown"
    assert refused(compacted, BundleTrust.pinned([ceremony.public_key])) == "bundle_signer_unknown"
    other = CeremonyKey.from_seed(bytes([10]) * 32)
    assert refused(encode_bundle(records, world.key, signer=other, compacts=compacts)) == (
        "bundle_signer_unknown"
    )
    # compacts belongs in a base only, and is checked strictly
    with pytest.raises(ShareFileError, match=r"compacts\.deltas"):
        encode_bundle(records, world.key, compacts={**compacts, "deltas": -1})
    with pytest.raises(ShareFileError, match=r"compacts\.head"):
        encode_bundle(records, world.key, compacts={**compacts, "head": "CD" * 32})
    with pytest.raises(ShareFileError, match="exactly base, head and deltas"):
        encode_bundle(records, world.key, compacts={**compacts, "sequence": 1})
    with pytest.raises(ShareFileError, match="only allowed in a base"):
        encode_bundle(records, world.key, kind="delta", compacts=compacts)


def test_the_chain_on_a_compacted_base() -> None:
    """``count``/``head`` continue the compacted chain; deltas 1..n are ``delta_compacted``
    (before any key is used), n+1 must name ``compacts.head``; with n = 0 (a pure
    re-encryption) delta 1 names what it named on the old base."""
    old, head, new = "aa" * 32, "bb" * 32, "cc" * 32

    def header(sequence: int, previous: str) -> dict[str, Any]:
        return {"kind": "delta", "sequence": sequence, "previous": previous}

    def reason(chain: DeltaChain, h: dict[str, Any]) -> str:
        with pytest.raises(ShareFileError) as info:
            chain.check_next({**h, "operation": "create", "dkg_id": "d"})
        return info.value.reason

    chain = DeltaChain(new, compacts={"base": old, "head": head, "deltas": 3})
    assert (chain.count, chain.head, chain.next_sequence, chain.next_previous) == (3, head, 4, head)
    assert reason(chain, header(2, old)) == "delta_compacted"
    assert reason(chain, header(3, old)) == "delta_compacted"
    assert reason(chain, header(4, new)) == "delta_chain"
    assert reason(chain, header(5, head)) == "delta_chain"
    chain.check_next({**header(4, head), "operation": "create", "dkg_id": "d"})

    again = DeltaChain(new, compacts={"base": old, "head": old, "deltas": 0})
    assert (again.count, again.head, again.next_previous) == (0, "0" * 64, old)
    assert reason(again, header(1, new)) == "delta_chain"
    again.check_next({**header(1, old), "operation": "create", "dkg_id": "d"})
    header_of_base = {"kind": "base", "compacts": {"base": old, "head": head, "deltas": 3}}
    assert DeltaChain.for_base(header_of_base, new).count == 3
    assert DeltaChain.for_base({"kind": "base"}, new).next_previous == new


# -- refusals --------------------------------------------------------------------------------------


async def test_a_kms_key_not_pinned_is_refused_before_anything_is_asked(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    autojump_clock: trio.abc.Clock,
) -> None:
    node = old_node(world, nsm, ("arn:aws:kms:us-east-1:111122223333:key/pinned",))
    with pytest.raises(CompactionError) as info:
        await node.compactor.compact("arn:aws:kms:us-east-1:111122223333:key/parents-own")
    assert info.value.reason == "kms_key_not_allowed"
    assert trio.current_time() == 0


def test_compaction_kms_keys_in_the_measured_config() -> None:
    arn = "arn:aws:kms:us-east-1:111122223333:key/0b6f6a52-1c1e-4c55-9a37-5f2e8a0c0002"
    config = parse_measured_config(f'[bundles]\ncompaction_kms_keys = ["{arn}"]\n'.encode())
    assert config.compaction_kms_keys == (arn,)
    assert parse_measured_config(b"").compaction_kms_keys == ()
    for bad in ('"alias/trio-sign"', '"arn:aws:kms:us-east-1:111122223333:alias/x"', "1"):
        with pytest.raises(MeasuredConfigError, match="compaction_kms_keys"):
            parse_measured_config(f"[bundles]\ncompaction_kms_keys = [{bad}]\n".encode())
    with pytest.raises(MeasuredConfigError, match="repeats"):
        parse_measured_config(f'[bundles]\ncompaction_kms_keys = ["{arn}", "{arn}"]\n'.encode())


class FailingBaseStore(FileDeltaStore):
    def put_base(self, sha256: str, data: bytes) -> tuple[PutOutcome, str]:
        raise DeltaStoreError("disk full")


class FakeKmsParent:
    """A parent that answers the data key request from a key it made (as KMS would, encrypted
    to the attestation's RSA key), then does what ``store`` says with the base."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.requests = 0
        self.base_seen = trio.Event()
        self.base = b""
        self.data_key = bytes(32 * [5])  # a key of its own, not KMS's

    async def run(self, stream: trio.abc.Stream) -> None:
        from trio_sign.nitro import decode_attestation, encrypt_for_recipient

        messages = MessageStream(stream)
        await messages.receive_expected(HelloMessage)
        while True:
            message = await messages.receive()
            if isinstance(message, CompactionKeyRequestMessage):
                self.requests += 1
                der = decode_attestation(message.document).public_key or b""
                public = serialization.load_der_public_key(der)
                assert isinstance(public, rsa.RSAPublicKey)
                envelope = encrypt_for_recipient(public, self.data_key)
                await messages.send(
                    CompactionKeyMessage(
                        key_id=message.kms_key_id, ciphertext_blob=b"blob", ciphertext=envelope
                    )
                )
            elif isinstance(message, BaseStoreMessage):
                data = bytearray()
                while not isinstance(chunk := await messages.receive(), DeltaEndMessage):
                    assert isinstance(chunk, DeltaChunkMessage)
                    data += chunk.data
                self.base = bytes(data)
                self.base_seen.set()
                if self.store == "ok":
                    await messages.send(
                        BaseStoredMessage(sha256=message.sha256, object="file:///b")
                    )
                # "silent": never answers
            elif isinstance(message, DeltaChunkMessage):
                raise AssertionError("a chunk outside a store")


ARN = "arn:aws:kms:us-east-1:111122223333:key/pinned"
TOKEN = "compaction-test-token-0123456789"


async def _with_fake(node: Node, parent: FakeKmsParent, nursery: trio.Nursery) -> None:
    parent_end, enclave_end = trio.testing.memory_stream_pair()

    async def enclave() -> None:
        messages = MessageStream(enclave_end)
        await messages.send(HelloMessage(channel="deltas"))
        await node.compactor.converse(messages)

    nursery.start_soon(parent.run, parent_end)
    nursery.start_soon(enclave)
    await trio.testing.wait_all_tasks_blocked()


async def test_no_answer_until_stored_and_a_silent_parent_times_out(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    autojump_clock: trio.abc.Clock,
) -> None:
    node = old_node(world, nsm, (ARN,))
    node.compactor.timeout_s = 40.0
    async with trio.open_nursery() as nursery:
        await _with_fake(node, FakeKmsParent("silent"), nursery)
        start = trio.current_time()
        with pytest.raises(CompactionError) as info:
            await node.compactor.compact(ARN)
        assert info.value.reason == "timeout"
        assert trio.current_time() - start == pytest.approx(40.0)
        await trio.testing.wait_all_tasks_blocked()
        assert not node.writer.connected  # dropped: no late answer is taken for another
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        await _with_fake(node, FakeKmsParent("ok"), nursery)
        result = await node.compactor.compact(ARN)
        assert (result.accounts, result.deltas, result.object) == (4, 0, "file:///b")
        nursery.cancel_scope.cancel()


async def test_a_failing_store_is_unavailable_and_leaves_nothing(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    tmp_path: Path,
) -> None:
    async with local_kms(tmp_path, nsm) as kms:
        node = old_node(world, nsm, (kms.target,))
        files = FailingBaseStore(world.dir / "deltas", host_tag=TAG)
        files.recover()
        parent = Deltas(files, compaction_kms=kms_compaction_relay(kms.client))
        service = compact_service(node)
        async with trio.open_nursery() as nursery:
            await connect(nursery, node, parent)
            with pytest.raises(RpcError) as info:
                await service.compact(compact_request(kms.target, "ops-1", "ops-2"), None)  # type: ignore[arg-type]
            assert info.value.status == StatusCode.UNAVAILABLE
            assert "store_failed" in str(info.value)
            assert list((world.dir / "deltas").iterdir()) == []
            nursery.cancel_scope.cancel()


# -- the rpc: authorization ----------------------------------------------------------------------


def compact_service(node: Node) -> SignService:
    lines = []
    for name, key in APPROVERS.items():
        lines += [f"[approvers.{name}]", 'type = "ed25519"']
        lines.append(f'public_key = "{key.verify_key.encode().hex()}"')
    lines += ["[policies.default]", "approvers = []", "threshold = 0"]
    lines += [f"[policies.{COMPACT_POLICY}]", 'approvers = ["ops-1", "ops-2"]', "threshold = 2"]
    measured = parse_measured_config(("\n".join(lines) + "\n").encode())
    return SignService(
        node.store,
        SessionPool(node.store.get),
        authorizer=Authorizer(measured.policies),
        compactor=node.compactor,
    )


def compact_request(kms_key_id: str, *approvers: str, request_id: str = "rotate-1") -> Any:
    expires = int(time.time() * 1000) + 60_000
    payload = approval_payload("", request_id, compaction_approval_message(kms_key_id), expires)
    return pb.CompactRequest(
        kms_key_id=kms_key_id,
        request_id=request_id,
        approvals=[
            pb.Approval(
                key_id=n, signature=APPROVERS[n].sign(payload).signature, expires_at_unix_ms=expires
            )
            for n in approvers
        ],
    )


async def test_compact_needs_the_compact_policys_approvals(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    autojump_clock: trio.abc.Clock,
) -> None:
    node = old_node(world, nsm, (ARN,))
    service = compact_service(node)
    parent = FakeKmsParent("ok")
    async with trio.open_nursery() as nursery:
        await _with_fake(node, parent, nursery)
        for request, code in [
            (compact_request(ARN, "ops-1"), StatusCode.PERMISSION_DENIED),  # 1 of 2
            (pb.CompactRequest(kms_key_id=ARN, request_id="r"), StatusCode.PERMISSION_DENIED),
            (compact_request(ARN + "x", "ops-1", "ops-2"), StatusCode.PERMISSION_DENIED),
            (compact_request(ARN, "ops-1", "ops-2", request_id=""), StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(RpcError) as info:
                await service.compact(request, None)  # type: ignore[arg-type]
            assert info.value.status == code
        # approvals for another request id do not carry over
        moved = compact_request(ARN, "ops-1", "ops-2", request_id="a")
        moved.request_id = "b"
        with pytest.raises(RpcError) as info:
            await service.compact(moved, None)  # type: ignore[arg-type]
        assert info.value.status == StatusCode.PERMISSION_DENIED
        assert parent.requests == 0  # nothing was asked of KMS before authorization
        answer = await service.compact(compact_request(ARN, "ops-1", "ops-2"), None)  # type: ignore[arg-type]
        assert (answer.accounts, answer.deltas, answer.object) == (4, 0, "file:///b")
        assert len(answer.sha256) == 64
        assert hashlib.sha256(b"").hexdigest() != answer.sha256
        nursery.cancel_scope.cancel()


async def test_the_cli_request_is_approved_by_its_key_files(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
) -> None:
    """``trio-sign compact`` builds its approvals from approver key files (a = "", s = the
    request id, message = the key ARN); the enclave's compact policy accepts them."""
    from trio_sign.cli._compact import compact_request as cli_request
    from trio_sign.gateway._approvals import ApproverSigningKey

    lines = []
    files = []
    for name in ("ops-1", "ops-2"):
        with ApproverSigningKey.generate("ed25519") as key:
            key.save(tmp_path / f"{name}.key", key_id=name)
            lines.append(key.enclave_toml(name))
        files.append(tmp_path / f"{name}.key")
    lines += ["[policies.default]\napprovers = []\nthreshold = 0\n"]
    lines += ['[policies.compact]\napprovers = ["ops-1", "ops-2"]\nthreshold = 2\n']
    measured = parse_measured_config("".join(lines).encode())
    node = old_node(world, nsm, (ARN,))
    service = SignService(
        node.store,
        SessionPool(node.store.get),
        authorizer=Authorizer(measured.policies),
        compactor=node.compactor,
    )
    async with trio.open_nursery() as nursery:
        await _with_fake(node, FakeKmsParent("ok"), nursery)
        one = cli_request(ARN, "req-1", files[:1], expires_in_ms=60_000)
        with pytest.raises(RpcError) as info:
            await service.compact(one, None)  # type: ignore[arg-type]
        assert info.value.status == StatusCode.PERMISSION_DENIED
        both = cli_request(ARN, "req-2", files, expires_in_ms=60_000)
        answer = await service.compact(both, None)  # type: ignore[arg-type]
        assert answer.accounts == 4
        nursery.cancel_scope.cancel()


# -- the parent's end ------------------------------------------------------------------------------


async def test_the_parent_stores_only_a_compacted_base_under_its_fingerprint(
    world: World,  # noqa: F811
    autojump_clock: trio.abc.Clock,
) -> None:
    from trio_sign.nitro._channel import BaseStoreFailedMessage, CompactionKeyFailedMessage

    records = [a.service for a in world.accounts.values()]
    compacts = {"base": "ab" * 32, "head": "cd" * 32, "deltas": 2}
    base = encode_bundle(records, world.key, signer=world.ident, compacts=compacts)
    sha = hashlib.sha256(base[:-104]).hexdigest()
    parent = world.parent()
    stored = await parent.store_base(sha, base)
    assert stored == BaseStoredMessage(
        sha256=sha, object=f"file://{world.dir}/deltas/base-{sha}.enc"
    )
    assert await parent.store_base(sha, base) == stored  # the same bytes again: stored
    ordinary = encode_bundle(records, world.key)
    for data, claimed in ((ordinary, hashlib.sha256(ordinary).hexdigest()), (base, "0" * 64)):
        answer = await parent.store_base(claimed, data)
        assert isinstance(answer, BaseStoreFailedMessage)
        assert answer.reason.startswith("not_a_base")
    assert sorted(p.name for p in (world.dir / "deltas").iterdir()) == [f"base-{sha}.enc"]
    assert parent.store.list().sequences == ()  # a base is never a delta
    # A different object under the name is a conflict, not overwritten.
    files = FileDeltaStore(world.dir / "deltas", host_tag=TAG)
    assert files.put_base(sha, b"other bytes")[0] is PutOutcome.CONFLICT
    # No KMS client: the compaction's data key is refused, not invented.
    request = CompactionKeyRequestMessage(document=b"doc", kms_key_id=ARN)
    assert isinstance(await parent.compaction_key(request), CompactionKeyFailedMessage)


def test_a_crashed_base_write_leaves_no_visible_object(world: World) -> None:  # noqa: F811
    """A temporary base file of a crashed parent is never an object, and the next start
    removes it."""
    deltas_dir = world.dir / "deltas"
    deltas_dir.mkdir()
    leftover = deltas_dir / f".base-{'ab' * 32}.enc.{TAG}.{'0' * 16}.tmp"
    leftover.write_bytes(b"half a base")
    files = FileDeltaStore(deltas_dir, host_tag=TAG)
    assert files.recover() == 1
    assert list(deltas_dir.iterdir()) == []


async def test_a_kms_answer_for_another_key_is_refused(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    autojump_clock: trio.abc.Clock,
) -> None:
    class OtherKey(FakeKmsParent):
        async def run(self, stream: trio.abc.Stream) -> None:
            messages = MessageStream(stream)
            await messages.receive_expected(HelloMessage)
            await messages.receive_expected(CompactionKeyRequestMessage)
            await messages.send(
                CompactionKeyMessage(key_id=ARN + "-parents", ciphertext_blob=b"b", ciphertext=b"c")
            )
            await trio.sleep_forever()

    node = old_node(world, nsm, (ARN,))
    async with trio.open_nursery() as nursery:
        await _with_fake(node, OtherKey("ok"), nursery)
        with pytest.raises(CompactionError) as info:
            await node.compactor.compact(ARN)
        assert info.value.reason == "kms_refused"
        nursery.cancel_scope.cancel()


# -- concurrency and cancellation ------------------------------------------------------------------


async def test_a_delta_applied_while_sealing_starts_the_seal_over(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.abc.Clock,
) -> None:
    """Sealing yields between slices (signing goes on); a delta pushed meanwhile makes it start
    over, so the base and its ``compacts`` always describe one chain position."""
    import trio_sign.enclave._compact as compact_module
    from trio_sign.shares._deltas import seal_delta

    monkeypatch.setattr(compact_module, "RECORDS_PER_SLICE", 1)
    node = old_node(world, nsm, (ARN,))
    chain = node.deltas.chain
    with world.ident.delta_key_wrap() as wrap:
        pushed = seal_delta(
            records_of(fresh_accounts("pushed", 1)),
            sequence=1,
            previous=chain.next_previous,
            operation="create",
            dkg_id="elsewhere",
            provider=wrap,
            signer=world.ident,
        )
    passes = 0
    real_plan = compact_module._plan

    def counting_plan(*args: Any) -> Any:
        nonlocal passes
        passes += 1
        return real_plan(*args)

    monkeypatch.setattr(compact_module, "_plan", counting_plan)

    async def push_once() -> None:
        await trio.lowlevel.checkpoint()
        node.deltas.apply(pushed.data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(push_once)
        base = await compact_module.seal_compacted(
            node.store,
            chain,
            data_key=bytearray(32),
            kms_key_id=ARN,
            encrypted_data_key=b"blob",
            signer=world.ident,
            chunk_size=1024,
        )
    assert passes == 2
    assert base.accounts == 5
    assert base.compacts == {
        "base": chain.base_fingerprint,
        "head": pushed.fingerprint,
        "deltas": 1,
    }


async def test_a_cancelled_compaction_releases_everything(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    autojump_clock: trio.abc.Clock,
) -> None:
    """Cancelled while the parent has not answered: the locks are released (a DKG's store and
    the next compaction go ahead) and nothing of it remains."""
    node = old_node(world, nsm, (ARN,))
    async with trio.open_nursery() as nursery:
        silent = FakeKmsParent("silent")
        await _with_fake(node, silent, nursery)
        scope = trio.CancelScope()

        async def compact() -> None:
            with scope:
                await node.compactor.compact(ARN)

        nursery.start_soon(compact)
        await silent.base_seen.wait()  # the base was sent, its answer outstanding
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert scope.cancelled_caught
        assert not node.writer.connected  # dropped: no late answer is taken for another
        assert not node.writer._store_lock.locked()
        assert not node.compactor._lock.locked()
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        await _with_fake(node, FakeKmsParent("ok"), nursery)
        assert (await node.compactor.compact(ARN)).accounts == 4
        nursery.cancel_scope.cancel()


async def test_trio_sign_compact_end_to_end(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    tmp_path: Path,
) -> None:
    """The command: approvals from key files, ``Compact`` on the node a (development)
    gateway.toml names, the answer printed as JSON; exit 1 with one line when refused."""
    import json
    import sys

    from trio_sign.gateway._approvals import ApproverSigningKey
    from trio_sign.transport import open_listeners

    lines, files = [], []
    for name in ("ops-1", "ops-2"):
        with ApproverSigningKey.generate("ed25519") as key:
            key.save(tmp_path / f"{name}.key", key_id=name)
            lines.append(key.enclave_toml(name))
        files.append(str(tmp_path / f"{name}.key"))
    lines += ['[policies.compact]\napprovers = ["ops-1", "ops-2"]\nthreshold = 2\n']
    measured = parse_measured_config("".join(lines).encode())
    node = old_node(world, nsm, (ARN,))
    service = SignService(
        node.store,
        SessionPool(node.store.get),
        authorizer=Authorizer(measured.policies),
        compactor=node.compactor,
    )
    async with trio.open_nursery() as nursery:
        await _with_fake(node, FakeKmsParent("ok"), nursery)
        listeners = await open_listeners("tcp://127.0.0.1:0")
        port = listeners[0].socket.getsockname()[1]
        await nursery.start(
            functools.partial(
                serve_grpc, listeners, service.handlers(), method_limits=service.receive_limits()
            )
        )
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[api]\nlisten = "tcp://127.0.0.1:0"\ntoken = "{TOKEN}"\n[events]\n'
            'listen = "tcp://127.0.0.1:0"\n[shares]\nparticipant_files = ["unused.json"]\n'
            "[dev]\nskip_attestation = true\nshare_files = true\n[[node]]\n"
            f'id = "node-1"\naddress = "tcp://127.0.0.1:{port}"\nevents_token = "{TOKEN}"\n'
        )
        argv = [sys.executable, "-m", "trio_sign.cli", "compact", "--gateway-config", str(config)]
        argv += ["--node", "node-1", "--kms-key-id", ARN, "--request-id", "r-1"]
        one = await trio.run_process(
            [*argv, "--approver-key", files[0]],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert one.returncode == 1
        assert "PERMISSION_DENIED" in one.stderr.decode()
        both = await trio.run_process(
            [*argv, "--approver-key", files[0], "--approver-key", files[1]],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert both.returncode == 0, both.stderr.decode()[-2000:]
        answer = json.loads(both.stdout)
        assert answer["accounts"] == 4
        assert answer["deltas"] == 0
        assert answer["request_id"] == "r-1"
        assert answer["object"] == "file:///b"
        nursery.cancel_scope.cancel()


async def test_a_parent_that_substitutes_the_data_key_cannot_read_the_base(
    world: World,  # noqa: F811
    nsm: LocalNsm,
    autojump_clock: trio.abc.Clock,
) -> None:
    """The parent answers the KMS request itself, with a data key it knows, encrypted to the
    RSA key in the attestation (anyone can): the base it then stores does not open under that
    key; it opens only with the identity key's binding."""
    node = old_node(world, nsm, (ARN,))
    parent = FakeKmsParent("ok")
    async with trio.open_nursery() as nursery:
        await _with_fake(node, parent, nursery)
        await node.compactor.compact(ARN)
        nursery.cancel_scope.cancel()
    data = parent.base
    header, _ = inspect_sealed(io.BytesIO(data))

    def load(key: bytes | bytearray) -> ShareStore:
        loader = SealedLoader(unwrap=lambda h: bytearray(key), total_bytes=len(data))
        loader.feed(data)
        return loader.finish()

    with pytest.raises(ShareFileError):
        load(parent.data_key)
    with world.ident.delta_key_wrap() as wrap:
        assert len(load(open_compacted_key(header, parent.data_key, wrap))) == 4
    other = CeremonyKey.from_seed(bytes([0x55]) * 32)
    from trio_sign.enclave._identity import IdentityKey

    with (
        IdentityKey(other) as stranger,
        stranger.delta_key_wrap() as wrap,
        pytest.raises(ShareFileError),
    ):
        load(open_compacted_key(header, parent.data_key, wrap))


async def test_compacting_a_compacted_base_keeps_the_chain_position(
    world: World,  # noqa: F811
) -> None:
    """A node booted from a compacted base (3 deltas) and nothing since compacts to
    ``{base: that base, head: the same head, deltas: 3}``: the chain still continues at 4."""
    from trio_sign.enclave._compact import seal_compacted

    store = world.load_base()
    assert store.fingerprint is not None
    head = "bb" * 32
    chain = DeltaChain(store.fingerprint, compacts={"base": "aa" * 32, "head": head, "deltas": 3})
    base = await seal_compacted(
        store,
        chain,
        data_key=bytearray(32),
        kms_key_id=ARN,
        encrypted_data_key=b"blob",
        signer=world.ident,
        chunk_size=1024,
    )
    assert base.compacts == {"base": store.fingerprint, "head": head, "deltas": 3}
    header, _ = inspect_sealed(io.BytesIO(base.data))
    assert DeltaChain.for_base(header, base.fingerprint).next_previous == head


# -- the boot: the real preload on both sides of the boot channel -------------------------------


class IdentityAndKms:
    """The parent's ``RecipientKms`` for a boot: the identity file's data key (a test key,
    encrypted to the attestation's RSA key as KMS does) and the base's through the local KMS
    (``KmsRecipientKms``, Decrypt with Recipient)."""

    KEY_ID = "test-identity-key"

    def __init__(self, client: Any, root_pem: bytes, data_key: bytes) -> None:
        self.kms = KmsRecipientKms(client)
        self.root_pem = root_pem
        self.data_key = data_key

    async def __call__(self, document: bytes, header: dict[str, Any]) -> bytes:
        if header["kms_key_id"] != self.KEY_ID:
            return await self.kms(document, header)
        verified = verify_attestation(document, root_pem=self.root_pem)
        assert verified.public_key is not None
        public = serialization.load_der_public_key(verified.public_key)
        assert isinstance(public, rsa.RSAPublicKey)
        return encrypt_for_recipient(public, self.data_key)


def sealed_identity(world: World) -> tuple[bytes, bytes]:  # noqa: F811
    """The sealed file of ``world``'s identity key (seed 21, test_enclave_deltas), and the
    data key it is sealed under."""
    data_key = bytes(range(32))
    key, sealed = seal_identity(
        bytes([21]) * 32,
        data_key,
        kms_key_id=IdentityAndKms.KEY_ID,
        encrypted_data_key=b"sealed-by-a-test",
    )
    with key:
        assert key.public_key == world.ident.public_key
    return sealed.to_json(), data_key


async def test_the_boot_reads_a_compacted_base_and_skips_the_deltas_it_contains(
    world: World,  # noqa: F811 - the fixture
    nsm: LocalNsm,
    tmp_path: Path,
) -> None:
    """docs/compaction.md §5 through the real preload (``serve_preload`` on the parent's side,
    ``preload_shares`` on the enclave's): the identity key unsealed first opens the compacted
    base (its data key bound to it), whose signer is the identity key (no ceremony key is
    pinned here), the chain starts at ``compacts``; the parent streams every stored delta:
    1 and 2 (in the base) are skipped, 3 (made after the compaction) is loaded. Without the
    identity key the base is refused before any share is decrypted."""
    async with local_kms(tmp_path, nsm) as kms:
        node = old_node(world, nsm, (kms.target,))
        parent = world.parent(compaction_kms=kms_compaction_relay(kms.client))
        first, second, late = (fresh_accounts(p, 1) for p in ("one", "two", "late"))
        async with trio.open_nursery() as nursery:
            await connect(nursery, node, parent)
            await node.writer.store(records_of(first), "create", "dkg-1")
            await node.writer.store(records_of(second), "create", "dkg-2")
            result = await node.compactor.compact(kms.target)
            await node.writer.store(records_of(late), "create", "dkg-3")
            nursery.cancel_scope.cancel()
        base = world.dir / "deltas" / f"base-{result.sha256}.enc"
        sealed, identity_key = sealed_identity(world)
        parent_kms = IdentityAndKms(kms.client, nsm.root_pem, identity_key)
        pinned = (world.ident.public_key,)

        def boot(**kw: Any) -> Any:
            return lambda channel: preload_shares(
                channel,
                AsyncNsm(nsm),
                signing_keys=[],  # the ceremony's keys: none here
                delta_keys=pinned,
                identity_keys=pinned,
                **kw,
            )

        booted, answer = await run_both(
            boot(),
            lambda channel: serve_preload(
                channel, base, parent_kms, deltas=world.parent(), identity=sealed
            ),
        )
        assert not isinstance(booted, Exception), booted
        store, report = booted
        try:
            assert answer.ok
            assert report.sha256 == result.sha256
            assert report.signer == world.ident.public_key
            assert report.deltas_announced == 3
            assert (report.deltas, report.deltas_head) == (3, node.deltas.chain.head)
            assert len(store) == len(node.store) == 4 + 3
            same_accounts(node.store, store)
            pool = SessionPool(store.get)
            for account in {**world.accounts, **first, **second, **late}.values():
                sign_with(pool, account, f"s-{account.account_id}", b"booted compacted")
        finally:
            store.close()
            assert report.identity_key is not None
            assert report.delta_wrap is not None
            report.delta_wrap.close()
            report.identity_key.close()

        refused, _ = await run_both(
            boot(), lambda channel: serve_preload(channel, base, parent_kms, deltas=world.parent())
        )
        assert isinstance(refused, PreloadError)
        assert refused.reason == "identity_required"


async def test_the_parents_delta_store_relays_compaction_through_its_kms(
    world: World,  # noqa: F811 - the fixture
    nsm: LocalNsm,
    tmp_path: Path,
) -> None:
    """``trio-sign parent`` (the supervisor's ``[deltas]``) answers a ``Compact``'s key request
    through its ``[kms]`` (here the local KMS, by endpoint): the enclave's base is sealed under
    the pinned key. With ``mode = "dev-key"`` (no KMS) there is no relay."""
    from trio_sign.parent import parse_parent_config
    from trio_sign.parent._supervisor import ParentSupervisor, compaction_kms

    async with local_kms(tmp_path, nsm) as kms:
        config = parse_parent_config(
            f"""
[bundle]
source = "{tmp_path / "bundle.enc"}"
work_dir = "{tmp_path / "run"}"
[kms]
mode = "local"
endpoint_url = "{kms.client.meta.endpoint_url}"
[enclave]
backend = "local"
nsm_dir = "{tmp_path}"
[deltas]
location = "file://{world.dir / "deltas"}"
"""
        )
        parent = await ParentSupervisor(config)._open_deltas()
        assert parent.compaction_kms is not None
        node = old_node(world, nsm, (kms.target,))
        async with trio.open_nursery() as nursery:
            await connect(nursery, node, parent)
            result = await node.compactor.compact(kms.target)
            nursery.cancel_scope.cancel()
        assert result.object == f"file://{world.dir / 'deltas' / f'base-{result.sha256}.enc'}"
        dev = dataclasses.replace(config, kms=dataclasses.replace(config.kms, mode="dev-key"))
        assert compaction_kms(dev) is None
