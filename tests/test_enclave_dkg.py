"""DKG with the enclave as one participant (issue 16; DESIGN §13, docs/key-lifecycle.md §5-6).

A full DKG per suite through a real gRPC server on loopback and a stock grpcio client: the
enclave is one participant, the others run ``trio_sign.crypto._dkg`` here, sign their round-1
packages with Ed25519 keys pinned in the test's ``enclave.toml`` and encrypt their round-2
shares as the contract says; the new account is stored by a fake delta writer (which applies
the record to the ShareStore, as the real one loads its delta, and remembers what it stored),
then signs through Commit/Sign and the signature is checked by the suite's own verifier
(Taproot: BIP-340 under the post-DKG key, merkle root None).

Then the relaying gateway's tricks (substituted packages and ciphertexts), a share off its
commitment, approvals, the pool and ``max_open`` bounds, a failing delta writer, idempotent
retries, a retried round 3 after the DKG's state is gone, and TTL expiry that zeroes every
secret (``autojump_clock``, the service's handlers called directly).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio
import trio.testing
from coincurve import PublicKeyXOnly

from proto_min import sign_service_pb2 as pb
from trio_sign.authz import Authorizer, approval_payload
from trio_sign.crypto import _dkg, _kdf, scheme_by_name
from trio_sign.crypto._group import Group, group_for
from trio_sign.enclave import SessionPool, SignService
from trio_sign.enclave._deltas import DeltaWriter, EnclaveDeltas
from trio_sign.enclave._dkg import (
    CreatedAccount,
    DkgRegistry,
    DkgSession,
    DkgState,
    PoolSlots,
    decrypt_share_into,
    deltas_finder,
    dkg_params,
    encrypt_share,
    round1_payload,
    share_key_into,
    verify_ed25519,
)
from trio_sign.enclave._identity import IdentityKey
from trio_sign.enclave._measured import MeasuredConfig, parse_measured_config
from trio_sign.enclave._status import one_connection
from trio_sign.parent._deltas import (
    Deltas,
    FileDeltaStore,
    delta_fingerprint,
    serve_deltas_connection,
)
from trio_sign.rpc import CallContext, RpcError, serve_grpc
from trio_sign.shares import ShareRecord, ShareStore, write_plaintext
from trio_sign.shares._deltas import DeltaChain
from trio_sign.shares._signature import CeremonyKey
from trio_sign.transport import open_listeners

grpc: Any = pytest.importorskip("grpc", reason="grpcio is a test dependency")

S = "/trio_sign.v1.SignService/"
ED25519 = "FROST-ED25519-SHA512-v1"
SECP256K1 = "FROST-secp256k1-SHA256-v1"
TAPROOT = "FROST-secp256k1-SHA256-TR-v1"
SUITES = [ED25519, SECP256K1, TAPROOT]
RESPONSES: dict[str, Any] = {
    "DkgRound1": pb.DkgRound1Response,
    "DkgRound2": pb.DkgRound2Response,
    "DkgRound3": pb.DkgRound3Response,
    "GetAccount": pb.GetAccountResponse,
    "Commit": pb.CommitResponse,
    "Sign": pb.SignResponse,
}

# Fixed keys, so enclave.toml is one constant text per test run.
APPROVERS = {
    name: nacl.signing.SigningKey(bytes([i]) * 32) for i, name in ((1, "ops-1"), (2, "ops-2"))
}
PARTICIPANT_KEYS = {f"p{i}": nacl.signing.SigningKey(bytes([0x40 + i]) * 32) for i in range(2, 6)}
UNPINNED = nacl.signing.SigningKey(bytes([0x7F]) * 32)
IDENTITY_SEED = bytes([0x33]) * 32


def enclave_toml(*, ttl_s: float = 300.0, max_open: int = 8) -> bytes:
    lines = ["[approvers.ops-1]", 'type = "ed25519"']
    lines.append(f'public_key = "{APPROVERS["ops-1"].verify_key.encode().hex()}"')
    lines += ["[approvers.ops-2]", 'type = "ed25519"']
    lines.append(f'public_key = "{APPROVERS["ops-2"].verify_key.encode().hex()}"')
    lines += ["[policies.default]", "approvers = []", "threshold = 0"]
    lines += ["[policies.create]", 'approvers = ["ops-1", "ops-2"]', "threshold = 2"]
    lines += ["[dkg]", f"ttl_s = {ttl_s}", f"max_open = {max_open}", "[dkg.participants]"]
    lines += [f'{k} = "{v.verify_key.encode().hex()}"' for k, v in PARTICIPANT_KEYS.items()]
    return ("\n".join(lines) + "\n").encode()


def config(**kwargs: Any) -> MeasuredConfig:
    return parse_measured_config(enclave_toml(**kwargs))


# -- the other participants ----------------------------------------------------------------------


@dataclass
class Ceremony:
    """One DKG's public parameters, as every participant and the approvers see them."""

    suite: str
    dkg_id: str
    account_id: str
    min_signers: int
    max_signers: int
    participants: list[tuple[bytes, str]]
    enclave_identifier: bytes
    policy: str = "default"

    @property
    def group(self) -> Group:
        return group_for(self.suite)

    @property
    def params(self) -> bytes:
        return dkg_params(
            self.suite, self.min_signers, self.max_signers, self.policy, self.participants
        )

    @property
    def params_sha256(self) -> bytes:
        return hashlib.sha256(self.params).digest()

    def approvals(self, *names: str, dkg_id: str | None = None) -> list[Any]:
        expires = int(time.time() * 1000) + 60_000
        payload = approval_payload(self.account_id, dkg_id or self.dkg_id, self.params, expires)
        return [
            pb.Approval(
                key_id=name,
                signature=APPROVERS[name].sign(payload).signature,
                expires_at_unix_ms=expires,
            )
            for name in names
        ]

    def round1_request(self, approvers: Sequence[str] = ("ops-1", "ops-2")) -> Any:
        return pb.DkgRound1Request(
            dkg_id=self.dkg_id,
            account_id=self.account_id,
            ciphersuite=self.suite,
            min_signers=self.min_signers,
            max_signers=self.max_signers,
            participants=[pb.DkgParticipant(identifier=i, key_id=k) for i, k in self.participants],
            identifier=self.enclave_identifier,
            policy=self.policy,
            approvals=self.approvals(*approvers),
        )


def ceremony(
    suite: str, *, t: int = 2, n: int = 3, enclave_at: int = 1, dkg_id: str = "dkg-1"
) -> Ceremony:
    group = group_for(suite)
    participants: list[tuple[bytes, str]] = []
    keys = iter(PARTICIPANT_KEYS)
    for value in range(1, n + 1):
        key_id = "enclave" if value == enclave_at else next(keys)
        participants.append((group.identifier_to_bytes(value), key_id))
    return Ceremony(
        suite, dkg_id, f"acct-{dkg_id}", t, n, participants, group.identifier_to_bytes(enclave_at)
    )


class Envelopes:
    """The contract's share envelopes (:func:`share_key_into` and :func:`encrypt_share`) as a
    participant other than the enclave uses them: its identifier, X25519 key pair and the
    others' X25519 keys (``keys``, from their round-1 packages)."""

    identifier: bytes
    x_secret: bytearray
    x_public: bytes
    keys: dict[bytes, bytes]

    def seal(self, recipient: bytes, share: Any, dkg_id: str) -> bytes:
        key = bytearray(32)
        share_key_into(
            key,
            dkg_id=dkg_id,
            sender=self.identifier,
            recipient=recipient,
            own_secret=self.x_secret,
            sender_public=self.x_public,
            recipient_public=self.keys[recipient],
            peer_public=self.keys[recipient],
        )
        return encrypt_share(key, share, dkg_id=dkg_id, sender=self.identifier, recipient=recipient)

    def open_shares(self, shares: Sequence[Any], dkg_id: str) -> dict[bytes, Any]:
        """The shares addressed to this participant, opened (each must authenticate)."""
        opened = {}
        for s in shares:
            if s.recipient != self.identifier:
                continue
            sender = bytes(s.sender)
            key = bytearray(32)
            share_key_into(
                key,
                dkg_id=dkg_id,
                sender=sender,
                recipient=self.identifier,
                own_secret=self.x_secret,
                sender_public=self.keys[sender],
                recipient_public=self.x_public,
                peer_public=self.keys[sender],
            )
            plain = bytearray(32)
            assert decrypt_share_into(
                plain,
                key,
                bytes(s.ciphertext),
                dkg_id=dkg_id,
                sender=sender,
                recipient=self.identifier,
            )
            opened[sender] = _dkg.Round2Package(plain)
        return opened


@dataclass
class Local(Envelopes):
    """A participant other than the enclave, with ZF's DKG and the contract's envelopes."""

    c: Ceremony
    identifier: bytes
    key_id: str
    signing_key: nacl.signing.SigningKey = field(repr=False)
    x_secret: bytearray = field(default_factory=lambda: bytearray(32), repr=False)
    x_public: bytes = b""
    r1_secret: Any = None
    r2_secret: Any = None
    package: Any = None
    received: dict[bytes, Any] = field(default_factory=dict)
    keys: dict[bytes, bytes] = field(default_factory=dict)
    key: Any = None
    public: Any = None

    def round1(self) -> Any:
        c = self.c
        self.r1_secret, r1 = _dkg.part1(
            self.identifier, c.max_signers, c.min_signers, suite=c.suite
        )
        self.x_public = _kdf.x25519_keypair(self.x_secret)
        self.package = self.signed(
            list(r1.commitment), r1.proof_of_knowledge, self.x_public, self.signing_key
        )
        return self.package

    def signed(
        self,
        commitment: list[bytes],
        pok: bytes,
        encryption_key: bytes,
        signing_key: nacl.signing.SigningKey,
        *,
        dkg_id: str | None = None,
    ) -> Any:
        c = self.c
        payload = round1_payload(
            dkg_id or c.dkg_id,
            c.account_id,
            c.params_sha256,
            self.identifier,
            commitment,
            pok,
            encryption_key,
        )
        return pb.DkgRound1Package(
            identifier=self.identifier,
            commitment=commitment,
            proof_of_knowledge=pok,
            encryption_key=encryption_key,
            key_id=self.key_id,
            signature=signing_key.sign(payload).signature,
        )

    def round2(self, packages: Sequence[Any], identity: bytes) -> list[Any]:
        """Check every other package's signature (the enclave's under its identity key), run
        part2 and encrypt a share to each other participant."""
        c = self.c
        r1 = {}
        for p in packages:
            if p.identifier == self.identifier:
                continue
            key = (
                identity
                if p.key_id == "enclave"
                else PARTICIPANT_KEYS[p.key_id].verify_key.encode()
            )
            payload = round1_payload(
                c.dkg_id,
                c.account_id,
                c.params_sha256,
                p.identifier,
                list(p.commitment),
                p.proof_of_knowledge,
                p.encryption_key,
            )
            assert verify_ed25519(key, payload, p.signature), p.key_id
            r1[bytes(p.identifier)] = _dkg.Round1Package(tuple(p.commitment), p.proof_of_knowledge)
            self.keys[bytes(p.identifier)] = bytes(p.encryption_key)
        self.received = r1
        self.r2_secret, shares = _dkg.part2(self.r1_secret, r1)
        return [
            pb.DkgEncryptedShare(
                sender=self.identifier,
                recipient=ident,
                ciphertext=self.encrypt(ident, share.signing_share),
            )
            for ident, share in shares.items()
        ]

    def encrypt(
        self, recipient: bytes, share: bytes | bytearray, *, dkg_id: str | None = None
    ) -> bytes:
        return self.seal(recipient, share, dkg_id or self.c.dkg_id)

    def round3(self, shares: Sequence[Any]) -> None:
        opened = self.open_shares(shares, self.c.dkg_id)
        self.key, self.public = _dkg.part3(self.r2_secret, self.received, opened)


def locals_of(c: Ceremony) -> list[Local]:
    return [
        Local(c, ident, key_id, PARTICIPANT_KEYS[key_id])
        for ident, key_id in c.participants
        if key_id != "enclave"
    ]


# -- the fake delta writer ------------------------------------------------------------------------


class FakeWriter:
    """Applies the records to the ShareStore (as the real writer loads its delta) and keeps
    what it stored, by dkg_id; ``fail`` makes the next stores raise, ``gate`` holds them."""

    def __init__(self, store: ShareStore) -> None:
        self.share_store = store
        self.created: dict[str, CreatedAccount] = {}
        self.operations: list[str] = []
        self.fail: Exception | None = None
        self.gate: trio.Event | None = None
        self.calls = 0
        self.seen_shares: list[bytearray] = []

    async def store(
        self, records: Sequence[ShareRecord], operation: str, dkg_id: str
    ) -> tuple[int, str]:
        self.calls += 1
        self.seen_shares += [r.signing_share for r in records]  # the caller's buffers
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        sequence = len(self.created) + 1
        head = hashlib.sha256(f"delta {sequence} {dkg_id}".encode()).hexdigest()
        for r in records:
            self.share_store._add_record(
                ShareRecord(
                    r.account_id,
                    r.identifier,
                    bytearray(r.signing_share),
                    r.verifying_share,
                    r.group_public_key,
                    r.min_signers,
                    r.max_signers,
                    policy=r.policy,
                    ciphersuite=r.ciphersuite,
                )
            )
        self.created[dkg_id] = CreatedAccount(records[0].account_id, sequence, head)
        self.operations.append(operation)
        return sequence, head

    def find(self, dkg_id: str) -> CreatedAccount | None:
        return self.created.get(dkg_id)


def empty_store() -> ShareStore:
    buf = io.BytesIO()
    write_plaintext(buf, [])
    buf.seek(0)
    return ShareStore.load_plaintext(buf)


# -- the enclave and its callers ------------------------------------------------------------------


@dataclass
class Node:
    store: ShareStore
    pool: SessionPool
    registry: DkgRegistry
    service: SignService
    writer: Any  # FakeWriter, or the real DeltaWriter
    identity: IdentityKey
    client: Any

    async def call(self, method: str, request: Any) -> Any:
        return await self.client.call(method, request)

    async def refused(self, code: str, method: str, request: Any) -> str:
        details: str = await self.client.refused(code, method, request)
        return details

    def nothing_left(self) -> None:
        """No DKG holds a slot or secrets."""
        assert self.registry.open_count == 0
        assert self.pool.open_sessions == 0


class GrpcClient:
    """grpcio's synchronous stubs, each call run in a worker thread."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    async def call(self, method: str, request: Any) -> Any:
        stub = self._channel.unary_unary(
            S + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=RESPONSES[method].FromString,
        )
        return await trio.to_thread.run_sync(functools.partial(stub, request, timeout=20))

    async def refused(self, code: str, method: str, request: Any) -> str:
        with pytest.raises(grpc.RpcError) as info:
            await self.call(method, request)
        assert info.value.code() == getattr(grpc.StatusCode, code), info.value.details()
        details: str = info.value.details()
        return details


class DirectClient:
    """The service's handler table called in-process (for the virtual clock)."""

    def __init__(self, service: SignService) -> None:
        self._handlers = service.handlers()

    async def call(self, method: str, request: Any) -> Any:
        ctx = CallContext(method=S + method, metadata=(), authority="test", deadline=math.inf)
        data = await self._handlers[S + method](request.SerializeToString(), ctx)
        return RESPONSES[method].FromString(data)

    async def refused(self, code: str, method: str, request: Any) -> str:
        with pytest.raises(RpcError) as info:
            await self.call(method, request)
        assert info.value.status.name == code, info.value.details
        return info.value.details


@asynccontextmanager
async def enclave(
    *,
    over_grpc: bool = True,
    max_sessions: int = 100,
    overloaded: Any = lambda: None,
    measured: MeasuredConfig | None = None,
    writer_factory: Callable[[ShareStore], FakeWriter] | None = None,
    **toml: Any,
) -> AsyncIterator[Node]:
    """An enclave with the DKG service: ``measured`` (default: :func:`config` of ``toml``) and
    a writer made by ``writer_factory`` (default :class:`FakeWriter`)."""
    if measured is None:
        measured = config(**toml)
    assert measured.dkg is not None
    store = empty_store()
    pool = SessionPool(store.get, max_sessions=max_sessions, overloaded=overloaded)
    writer = (writer_factory or FakeWriter)(store)
    identity = IdentityKey(CeremonyKey.from_seed(IDENTITY_SEED))
    authorizer = Authorizer(measured.policies)
    registry = DkgRegistry(
        settings=measured.dkg,
        identity=identity,
        writer=writer,
        authorizer=authorizer,
        lookup=store.get,
        slots=PoolSlots(pool),
        find_created=writer.find,
    )
    service = SignService(store, pool, authorizer=authorizer, dkg=registry)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run_reaper)
            await nursery.start(registry.run)
            node = Node(store, pool, registry, service, writer, identity, DirectClient(service))
            if over_grpc:
                async with grpc_client(nursery, service) as node.client:
                    yield node
            else:
                yield node
            nursery.cancel_scope.cancel()
    finally:
        identity.close()
        store.close()


@asynccontextmanager
async def grpc_client(nursery: trio.Nursery, service: SignService) -> AsyncIterator[GrpcClient]:
    """``service`` on a loopback gRPC server (its per-method receive caps on) in ``nursery``,
    and a grpcio client of it."""
    listeners = await open_listeners("tcp://127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    server = await nursery.start(
        functools.partial(
            serve_grpc, listeners, service.handlers(), method_limits=service.receive_limits()
        )
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield GrpcClient(channel)
    finally:
        await trio.to_thread.run_sync(channel.close)
        await server.aclose()


#: The base bundle's digest the real writer's delta chain starts from.
BASE = hashlib.sha256(b"the base bundle").hexdigest()


@dataclass
class RealWriter:
    """An enclave with the real ``DeltaWriter``, and what its tests look at."""

    node: Node
    authorizer: Authorizer
    chain: DeltaChain
    deltas: EnclaveDeltas
    wrap: Any  # the identity's delta key wrap (a reboot's EnclaveDeltas unseals with it)


@asynccontextmanager
async def real_writer_enclave(
    tmp_path: Path, measured: MeasuredConfig | None = None, *, over_grpc: bool = False
) -> AsyncIterator[RealWriter]:
    """The enclave with the real ``DeltaWriter`` (sealed, identity-signed delta on the chain
    from :data:`BASE`) talking to the parent's real deltas channel and ``FileDeltaStore``
    (``tmp_path / "deltas"``) over a memory stream; called directly, or over loopback gRPC."""
    if measured is None:
        measured = config()
    assert measured.dkg is not None
    store = empty_store()
    identity = IdentityKey(CeremonyKey.from_seed(IDENTITY_SEED))
    wrap = identity.delta_key_wrap()
    chain = DeltaChain(BASE)
    deltas = EnclaveDeltas(
        store, chain, provider=wrap, signer=identity, signing_keys=(identity.public_key,)
    )
    writer = DeltaWriter(deltas, store_timeout_s=20.0)
    files = FileDeltaStore(tmp_path / "deltas")
    files.recover()
    pool = SessionPool(store.get)
    authorizer = Authorizer(measured.policies)
    registry = DkgRegistry(
        settings=measured.dkg,
        identity=identity,
        writer=writer,
        authorizer=authorizer,
        lookup=store.get,
        slots=PoolSlots(pool),
        find_created=deltas_finder(deltas),
    )
    service = SignService(store, pool, authorizer=authorizer, dkg=registry)
    enclave_end, parent_end = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return enclave_end

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_deltas_connection, parent_end, Deltas(files))
            nursery.start_soon(
                functools.partial(
                    one_connection,
                    "deltas",
                    connect,
                    writer.converse,
                    connect_timeout_s=5.0,
                    read=False,
                )
            )
            await nursery.start(pool.run_reaper)
            await nursery.start(registry.run)
            node = Node(store, pool, registry, service, writer, identity, DirectClient(service))
            real = RealWriter(node, authorizer, chain, deltas, wrap)
            if over_grpc:
                async with grpc_client(nursery, service) as node.client:
                    yield real
            else:
                yield real
            nursery.cancel_scope.cancel()
    finally:
        wrap.close()
        identity.close()
        store.close()


# -- a whole DKG ----------------------------------------------------------------------------------


@dataclass
class Run:
    c: Ceremony
    locals: list[Local]
    enclave_package: Any = None
    enclave_shares: list[Any] = field(default_factory=list)
    local_shares: list[Any] = field(default_factory=list)
    answer: Any = None

    def packages_for_enclave(self) -> list[Any]:
        return [p.package for p in self.locals]

    def shares_for_enclave(self) -> list[Any]:
        return [s for s in self.local_shares if s.recipient == self.c.enclave_identifier]


async def round1(node: Node, c: Ceremony) -> Run:
    run = Run(c, locals_of(c))
    got = await node.call("DkgRound1", c.round1_request())
    run.enclave_package = got.package
    for local in run.locals:
        local.round1()
    return run


async def round2(node: Node, run: Run) -> None:
    got = await node.call(
        "DkgRound2", pb.DkgRound2Request(dkg_id=run.c.dkg_id, packages=run.packages_for_enclave())
    )
    run.enclave_shares = list(got.shares)
    every = [run.enclave_package, *run.packages_for_enclave()]
    for local in run.locals:
        run.local_shares += local.round2(every, node.identity.public_key)


async def round3(node: Node, run: Run) -> Any:
    for local in run.locals:
        local.round3(run.enclave_shares + run.local_shares)
    run.answer = await node.call(
        "DkgRound3", pb.DkgRound3Request(dkg_id=run.c.dkg_id, shares=run.shares_for_enclave())
    )
    return run.answer


async def full_dkg(node: Node, c: Ceremony) -> Run:
    run = await round1(node, c)
    await round2(node, run)
    await round3(node, run)
    return run


def check_answer(run: Run) -> None:
    """The enclave's answer agrees with every local participant's own DKG output."""
    a, c = run.answer, run.c
    public = run.locals[0].public
    assert a.account_id == c.account_id
    assert a.ciphersuite == c.suite
    assert a.group_public_key == public.verifying_key
    assert a.identifier == c.enclave_identifier
    assert a.verifying_share == public.verifying_shares[c.enclave_identifier]
    assert [(v.identifier, v.verifying_share) for v in a.verifying_shares] == sorted(
        public.verifying_shares.items(), key=lambda kv: c.group.identifier_from_bytes(kv[0])
    )
    for local in run.locals:
        assert local.public.verifying_key == public.verifying_key


async def sign_with(node: Node, run: Run, message: bytes, session_id: str) -> bytes:
    """Commit/Sign with the new account, the enclave and ``min_signers - 1`` locals; the
    aggregate checked by the suite's verifier (Taproot also BIP-340, merkle root None)."""
    c = run.c
    scheme = scheme_by_name(c.suite)
    got = await node.call(
        "Commit", pb.CommitRequest(account_id=c.account_id, session_id=session_id)
    )
    own = scheme.commitment(got.identifier, got.hiding, got.binding)
    signers = run.locals[: c.min_signers - 1]
    nonces = {s.identifier: scheme.commit(s.identifier, s.key.signing_share) for s in signers}
    order = c.group.identifier_from_bytes
    commitments = sorted(
        [own, *(n.commitment for n in nonces.values())], key=lambda x: order(x.identifier)
    )
    signed = await node.call(
        "Sign",
        pb.SignRequest(
            session_id=session_id,
            message=message,
            commitments=[
                pb.SigningCommitment(identifier=x.identifier, hiding=x.hiding, binding=x.binding)
                for x in commitments
            ],
        ),
    )
    gpk = run.answer.group_public_key
    shares = {bytes(signed.identifier): bytes(signed.signature_share)}
    for s in signers:
        shares[s.identifier] = scheme.sign(
            nonces[s.identifier],
            signing_share=s.key.signing_share,
            group_public_key=gpk,
            message=message,
            commitments=commitments,
            merkle_root=None,
        )
    verifying = {v.identifier: v.verifying_share for v in run.answer.verifying_shares}
    signature: bytes = scheme.aggregate(
        commitments=commitments,
        message=message,
        group_public_key=gpk,
        signature_shares=shares,
        verifying_shares={i: verifying[i] for i in shares},
        merkle_root=None,
    )
    assert scheme.verify(gpk, message, signature, None)
    if c.suite == ED25519:
        nacl.signing.VerifyKey(gpk).verify(message, signature)
    if c.suite == TAPROOT:
        assert PublicKeyXOnly(scheme.verifying_key(gpk, None)).verify(signature, message)
    return signature


# -- the tests: end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
async def test_full_dkg_with_the_enclave_then_sign(suite: str) -> None:
    async with enclave() as node:
        c = ceremony(suite, t=2, n=3, enclave_at=2)
        run = await full_dkg(node, c)
        check_answer(run)
        assert run.answer.delta_sequence == 1
        assert run.answer.deltas_head == node.writer.created[c.dkg_id].deltas_head
        assert node.writer.operations == ["create"]
        # the writer's record buffer was zeroed once it returned
        assert all(not any(b) for b in node.writer.seen_shares)
        node.nothing_left()
        assert node.registry.sessions[c.dkg_id].state is DkgState.DONE
        account = await node.call("GetAccount", pb.GetAccountRequest(account_id=c.account_id))
        assert account.ciphersuite == suite
        assert account.group_public_key == run.answer.group_public_key
        assert (account.min_signers, account.max_signers) == (2, 3)
        await sign_with(node, run, b"first message from a DKG account", "s-1")


async def test_three_of_five_taproot_with_the_enclave_last() -> None:
    async with enclave() as node:
        c = ceremony(TAPROOT, t=3, n=5, enclave_at=5, dkg_id="dkg-35")
        run = await full_dkg(node, c)
        check_answer(run)
        await sign_with(node, run, b"three of five", "s-35")


async def test_without_a_registry_the_dkg_rpcs_are_refused() -> None:
    store = empty_store()
    pool = SessionPool(store.get)
    client = DirectClient(SignService(store, pool))
    c = ceremony(ED25519)
    details = await client.refused("FAILED_PRECONDITION", "DkgRound1", c.round1_request())
    assert "no DKG" in details


# -- a relaying gateway ---------------------------------------------------------------------------


def substitutions(run: Run, target: Local) -> dict[str, Any]:
    """Packages a relaying gateway could pass off as ``target``'s."""
    p = target.package
    other = run.locals[1] if run.locals[0] is target else run.locals[0]
    commitment = list(p.commitment)
    commitment[0] = other.package.commitment[0]
    changed_commitment = pb.DkgRound1Package()
    changed_commitment.CopyFrom(p)
    del changed_commitment.commitment[:]
    changed_commitment.commitment.extend(commitment)
    changed_key = pb.DkgRound1Package()
    changed_key.CopyFrom(p)
    changed_key.encryption_key = _kdf.x25519_keypair(bytearray(32))
    unpinned = target.signed(
        list(p.commitment), p.proof_of_knowledge, bytes(p.encryption_key), UNPINNED
    )
    other_key_id = pb.DkgRound1Package()
    other_key_id.CopyFrom(p)
    other_key_id.key_id = other.key_id
    other_dkg = target.signed(
        list(p.commitment),
        p.proof_of_knowledge,
        bytes(p.encryption_key),
        target.signing_key,
        dkg_id="another-dkg",
    )
    return {
        "changed commitment": changed_commitment,
        "changed encryption key": changed_key,
        "signed by an unpinned key": unpinned,
        "another participant's key id": other_key_id,
        "signed for another DKG": other_dkg,
    }


@pytest.mark.parametrize("suite", SUITES)
async def test_a_substituted_round1_package_is_named_and_creates_nothing(suite: str) -> None:
    async with enclave() as node:
        c = ceremony(suite, t=2, n=3, enclave_at=1)
        run = await round1(node, c)
        target = run.locals[1]
        who = c.group.describe_identifier(target.identifier)
        for name, forged in substitutions(run, target).items():
            packages = [forged if p is target.package else p for p in run.packages_for_enclave()]
            details = await node.refused(
                "INVALID_ARGUMENT",
                "DkgRound2",
                pb.DkgRound2Request(dkg_id=c.dkg_id, packages=packages),
            )
            assert f"participant {who}" in details, name
            assert c.account_id not in node.store
            # the DKG is as it was: the right packages can still be relayed
            assert node.registry.sessions[c.dkg_id].state is DkgState.ROUND1_SENT, name
        await round2(node, run)
        await round3(node, run)
        check_answer(run)


@pytest.mark.parametrize("suite", SUITES)
async def test_a_substituted_ciphertext_is_named_and_creates_nothing(suite: str) -> None:
    async with enclave() as node:
        c = ceremony(suite, t=2, n=3, enclave_at=1)
        run = await round1(node, c)
        await round2(node, run)
        for local in run.locals:
            local.round3(run.enclave_shares + run.local_shares)
        good = run.shares_for_enclave()
        sender = good[0]
        a, b = run.locals
        who = c.group.describe_identifier(sender.sender)
        # a share from a to b, relabelled as addressed to the enclave
        moved = next(
            s for s in run.local_shares if s.sender == a.identifier and s.recipient == b.identifier
        )
        flipped = bytearray(sender.ciphertext)
        flipped[30] ^= 1
        # a share a made for the enclave under another dkg_id (same keys otherwise)
        elsewhere = a.encrypt(c.enclave_identifier, bytes(32), dkg_id="another-dkg")
        forged = {
            "moved from another recipient": pb.DkgEncryptedShare(
                sender=moved.sender, recipient=c.enclave_identifier, ciphertext=moved.ciphertext
            ),
            "bit flip": pb.DkgEncryptedShare(
                sender=sender.sender, recipient=sender.recipient, ciphertext=bytes(flipped)
            ),
            "another dkg_id": pb.DkgEncryptedShare(
                sender=a.identifier, recipient=c.enclave_identifier, ciphertext=elsewhere
            ),
            "addressed elsewhere": pb.DkgEncryptedShare(
                sender=sender.sender, recipient=b.identifier, ciphertext=sender.ciphertext
            ),
        }
        for name, share in forged.items():
            named = c.group.describe_identifier(share.sender)
            shares = [share if s.sender == share.sender else s for s in good]
            details = await node.refused(
                "INVALID_ARGUMENT", "DkgRound3", pb.DkgRound3Request(dkg_id=c.dkg_id, shares=shares)
            )
            assert f"participant {named}" in details, (name, details)
            assert c.account_id not in node.store, name
            assert node.writer.calls == 0
            assert node.registry.sessions[c.dkg_id].state is DkgState.ROUND2_SENT, name
        assert who
        answer = await node.call("DkgRound3", pb.DkgRound3Request(dkg_id=c.dkg_id, shares=good))
        run.answer = answer
        check_answer(run)


async def test_a_share_off_its_commitment_names_its_sender_and_fails_the_dkg() -> None:
    async with enclave() as node:
        c = ceremony(SECP256K1, t=2, n=3, enclave_at=1)
        run = await round1(node, c)
        await round2(node, run)
        cheat = run.locals[1]
        session = node.registry.sessions[c.dkg_id]
        shares = []
        for s in run.shares_for_enclave():
            if s.sender == cheat.identifier:
                wrong = bytearray(31) + b"\x07"  # a valid scalar, not f(enclave)
                s = pb.DkgEncryptedShare(
                    sender=s.sender,
                    recipient=s.recipient,
                    ciphertext=cheat.encrypt(c.enclave_identifier, wrong),
                )
            shares.append(s)
        details = await node.refused(
            "INVALID_ARGUMENT", "DkgRound3", pb.DkgRound3Request(dkg_id=c.dkg_id, shares=shares)
        )
        who = c.group.describe_identifier(cheat.identifier)
        assert f"participant {who}" in details
        assert "does not match its commitment" in details
        assert session.state is DkgState.FAILED
        assert_zeroed(session)
        node.nothing_left()
        assert c.account_id not in node.store
        assert node.writer.calls == 0
        details = await node.refused(
            "NOT_FOUND",
            "DkgRound3",
            pb.DkgRound3Request(dkg_id=c.dkg_id, shares=run.shares_for_enclave()),
        )
        assert "no account" in details


async def test_a_bad_proof_of_knowledge_in_a_signed_package_fails_the_dkg() -> None:
    async with enclave() as node:
        c = ceremony(ED25519, t=2, n=3, enclave_at=1)
        run = await round1(node, c)
        cheat = run.locals[0]
        p = cheat.package
        pok = bytearray(p.proof_of_knowledge)
        pok[40] ^= 1  # z changes: still canonical, no longer a proof
        cheat.package = cheat.signed(
            list(p.commitment), bytes(pok), bytes(p.encryption_key), cheat.signing_key
        )
        session = node.registry.sessions[c.dkg_id]
        details = await node.refused(
            "INVALID_ARGUMENT",
            "DkgRound2",
            pb.DkgRound2Request(dkg_id=c.dkg_id, packages=run.packages_for_enclave()),
        )
        assert f"participant {c.group.describe_identifier(cheat.identifier)}" in details
        assert "proof of knowledge" in details
        assert session.state is DkgState.FAILED
        assert_zeroed(session)
        node.nothing_left()


# -- authorization, parameters, bounds ------------------------------------------------------------


async def test_missing_or_insufficient_approvals_open_nothing() -> None:
    async with enclave() as node:
        c = ceremony(ED25519)
        for approvers, reason in (((), "no_approvals"), (("ops-1",), "too_few_approvals")):
            details = await node.refused(
                "PERMISSION_DENIED", "DkgRound1", c.round1_request(approvers)
            )
            assert reason in details
        # approvals for another dkg_id (the same account and parameters) do not count
        request = c.round1_request()
        del request.approvals[:]
        request.approvals.extend(c.approvals("ops-1", "ops-2", dkg_id="dkg-other"))
        assert "bad_signature" in await node.refused("PERMISSION_DENIED", "DkgRound1", request)
        # nor do approvals of other parameters (another threshold than approved)
        request = c.round1_request()
        request.min_signers = 3
        details = await node.refused("PERMISSION_DENIED", "DkgRound1", request)
        assert "bad_signature" in details
        assert node.registry.sessions == {}
        node.nothing_left()


def _reverse(participants: Any) -> None:
    copies = [pb.DkgParticipant(identifier=p.identifier, key_id=p.key_id) for p in participants]
    del participants[:]
    participants.extend(reversed(copies))


def _stranger_enclave(request: Any) -> None:
    request.identifier = bytes(31) + b"\x09"
    request.participants[0].key_id = "p5"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: setattr(r, "ciphersuite", "FROST-P256-SHA256-v1"), "is not one of"),
        (lambda r: setattr(r, "min_signers", 1), "need 2 <= min_signers"),
        (lambda r: setattr(r, "max_signers", 65), "max_signers <= 64"),
        (lambda r: setattr(r, "dkg_id", ""), "dkg_id must be 1..128 bytes"),
        (lambda r: setattr(r, "account_id", "a" * 256), "account_id must be 1..255 bytes"),
        (lambda r: setattr(r, "policy", "create"), "is not a signing policy"),
        (lambda r: setattr(r, "policy", "nope"), "is not a signing policy"),
        (lambda r: setattr(r.participants[1], "key_id", "stranger"), "is not pinned"),
        (lambda r: setattr(r.participants[0], "key_id", "p2"), "its key_id must be 'enclave'"),
        (lambda r: setattr(r.participants[2], "key_id", "p2"), "is used twice"),
        (lambda r: _reverse(r.participants), "ascending"),
        (lambda r: setattr(r, "identifier", bytes(31) + b"\x09"), "has key_id 'enclave', but"),
        (_stranger_enclave, "not in the participant list"),
        (lambda r: setattr(r.participants[2], "identifier", bytes(32)), "participant 2"),
        (lambda r: r.participants.pop(), "must list all 3 participants"),
        # a list over its bound is refused before any approval is read
        (lambda r: r.approvals.extend([r.approvals[0]] * 256), "at most 256 approvals"),
    ],
)
async def test_bad_parameters_are_invalid_argument(change: Any, message: str) -> None:
    async with enclave(over_grpc=False) as node:
        request = ceremony(ED25519).round1_request()
        change(request)
        details = await node.refused("INVALID_ARGUMENT", "DkgRound1", request)
        assert message in details
        node.nothing_left()


async def test_an_existing_account_or_one_being_created_is_already_exists() -> None:
    async with enclave(over_grpc=False) as node:
        c = ceremony(ED25519, dkg_id="first")
        await full_dkg(node, c)
        again = ceremony(ED25519, dkg_id="second")
        again.account_id = c.account_id
        assert "exists" in await node.refused("ALREADY_EXISTS", "DkgRound1", again.round1_request())
        d = ceremony(ED25519, dkg_id="third")
        await node.call("DkgRound1", d.round1_request())
        rival = ceremony(ED25519, dkg_id="fourth")
        rival.account_id = d.account_id
        details = await node.refused("ALREADY_EXISTS", "DkgRound1", rival.round1_request())
        assert "being created by DKG 'third'" in details


async def test_max_open_and_the_pool_bound_are_resource_exhausted() -> None:
    async with enclave(over_grpc=False, max_open=2, max_sessions=3) as node:
        for i in range(2):
            await node.call("DkgRound1", ceremony(ED25519, dkg_id=f"d{i}").round1_request())
        assert node.pool.open_sessions == 2  # each open DKG holds a pool slot
        details = await node.refused(
            "RESOURCE_EXHAUSTED", "DkgRound1", ceremony(ED25519, dkg_id="d2").round1_request()
        )
        assert "max_open" in details
        assert "d2" not in node.registry.sessions
        # a signing session takes the last slot: the pool is full for DKGs too
        c = ceremony(ED25519, dkg_id="d0")
        node.registry.settings = type(node.registry.settings)(
            participants=node.registry.settings.participants, ttl_s=300.0, max_open=5
        )
        run = await full_dkg(node, ceremony(ED25519, dkg_id="d9"))
        assert node.pool.open_sessions == 2
        await node.call("Commit", pb.CommitRequest(account_id=run.c.account_id, session_id="s"))
        assert node.pool.open_sessions == 3
        details = await node.refused(
            "RESOURCE_EXHAUSTED", "DkgRound1", ceremony(ED25519, dkg_id="d3").round1_request()
        )
        assert "session pool full" in details
        assert "d3" not in node.registry.sessions
        assert c.dkg_id in node.registry.sessions


# -- the delta writer -----------------------------------------------------------------------------


async def test_a_failing_delta_writer_is_unavailable_and_creates_nothing() -> None:
    async with enclave() as node:
        c = ceremony(TAPROOT)
        run = await round1(node, c)
        await round2(node, run)
        session = node.registry.sessions[c.dkg_id]
        node.writer.fail = OSError("parent said delta_store_failed: disk full")
        for local in run.locals:
            local.round3(run.enclave_shares + run.local_shares)
        request = pb.DkgRound3Request(dkg_id=c.dkg_id, shares=run.shares_for_enclave())
        details = await node.refused("UNAVAILABLE", "DkgRound3", request)
        assert "nothing was created" in details
        assert "disk full" in details
        assert session.state is DkgState.FAILED
        assert_zeroed(session)
        assert all(not any(b) for b in node.writer.seen_shares)
        assert c.account_id not in node.store
        node.nothing_left()
        # the gateway's rule (key-lifecycle §6): retry until an answer or NOT_FOUND
        assert "no account" in await node.refused("NOT_FOUND", "DkgRound3", request)


# -- retries --------------------------------------------------------------------------------------


async def test_every_round_is_idempotent() -> None:
    async with enclave() as node:
        c = ceremony(SECP256K1)
        run = await round1(node, c)
        again = await node.call("DkgRound1", c.round1_request())  # fresh approvals, same DKG
        assert again.package == run.enclave_package
        assert node.pool.open_sessions == 1
        other = c.round1_request()
        other.policy = ""  # "default" by another spelling is the same parameters
        assert (await node.call("DkgRound1", other)).package == run.enclave_package
        changed = ceremony(SECP256K1, t=3)
        assert "other parameters" in await node.refused(
            "ALREADY_EXISTS", "DkgRound1", changed.round1_request()
        )
        request = pb.DkgRound2Request(dkg_id=c.dkg_id, packages=run.packages_for_enclave())
        await round2(node, run)
        assert list((await node.call("DkgRound2", request)).shares) == run.enclave_shares
        reordered = pb.DkgRound2Request(
            dkg_id=c.dkg_id, packages=list(reversed(run.packages_for_enclave()))
        )
        assert "already ran round 2" in await node.refused(
            "FAILED_PRECONDITION", "DkgRound2", reordered
        )
        answer = await round3(node, run)
        check_answer(run)
        retry = pb.DkgRound3Request(dkg_id=c.dkg_id, shares=run.shares_for_enclave())
        assert await node.call("DkgRound3", retry) == answer
        assert (await node.call("DkgRound1", c.round1_request())).package == run.enclave_package
        assert node.writer.calls == 1


async def test_round3_before_round2_is_failed_precondition() -> None:
    async with enclave(over_grpc=False) as node:
        c = ceremony(ED25519)
        await node.call("DkgRound1", c.round1_request())
        details = await node.refused(
            "FAILED_PRECONDITION", "DkgRound3", pb.DkgRound3Request(dkg_id=c.dkg_id)
        )
        assert "has not run round 2" in details
        assert "unknown" in await node.refused(
            "NOT_FOUND", "DkgRound2", pb.DkgRound2Request(dkg_id="never")
        )


async def test_a_retried_round3_after_the_state_is_gone_answers_from_the_delta(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with enclave(over_grpc=False, ttl_s=300.0) as node:
        c = ceremony(ED25519)
        run = await full_dkg(node, c)
        await trio.sleep(301)  # the done DKG is forgotten at its deadline
        assert c.dkg_id not in node.registry.sessions
        retry = pb.DkgRound3Request(dkg_id=c.dkg_id, shares=run.shares_for_enclave())
        got = await node.call("DkgRound3", retry)
        assert got.account_id == c.account_id
        assert got.group_public_key == run.answer.group_public_key
        assert got.verifying_share == run.answer.verifying_share
        assert got.identifier == run.answer.identifier
        assert (got.delta_sequence, got.deltas_head) == (1, run.answer.deltas_head)
        # a reboot: a new registry that knows only the stored deltas answers the same
        rebooted = DkgRegistry(
            settings=node.registry.settings,
            identity=node.identity,
            writer=node.writer,
            authorizer=node.service.authorizer,
            lookup=node.store.get,
            slots=PoolSlots(node.pool),
            find_created=node.writer.find,
        )
        assert await rebooted.round3(retry) == got
        # and a Round1 reusing that dkg_id is refused, naming the account
        assert "already created account" in await node.refused(
            "ALREADY_EXISTS", "DkgRound1", c.round1_request()
        )


async def test_a_retry_while_storing_waits_for_the_same_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with enclave(over_grpc=False) as node:
        c = ceremony(ED25519)
        run = await round1(node, c)
        await round2(node, run)
        for local in run.locals:
            local.round3(run.enclave_shares + run.local_shares)
        node.writer.gate = trio.Event()
        request = pb.DkgRound3Request(dkg_id=c.dkg_id, shares=run.shares_for_enclave())
        answers: list[Any] = []
        async with trio.open_nursery() as nursery:
            # the first caller gives up (its deadline); the store goes on
            with trio.move_on_after(0.01) as cancelled:
                await node.call("DkgRound3", request)
            assert cancelled.cancelled_caught
            assert node.registry.sessions[c.dkg_id].state is DkgState.STORING

            async def retry() -> None:
                answers.append(await node.call("DkgRound3", request))

            nursery.start_soon(retry)
            nursery.start_soon(retry)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []
            node.writer.gate.set()
        assert len(answers) == 2
        assert answers[0] == answers[1]
        assert node.writer.calls == 1
        assert answers[0].account_id == c.account_id


# -- expiry ---------------------------------------------------------------------------------------


def assert_zeroed(session: DkgSession) -> None:
    """Every secret the DKG held is zero."""
    assert not any(session.x25519_secret)
    if session.r1_secret is not None:
        assert session.r1_secret.used
        assert all(not any(co) for co in session.r1_secret._coefficients)
    if session.r2_secret is not None:
        assert session.r2_secret.used
        assert not any(session.r2_secret.secret_share)


async def test_expiry_zeroes_every_secret(autojump_clock: trio.testing.MockClock) -> None:
    async with enclave(over_grpc=False, ttl_s=60.0) as node:
        a = ceremony(ED25519, dkg_id="after-round1")
        b = ceremony(TAPROOT, dkg_id="after-round2")
        await node.call("DkgRound1", a.round1_request())
        first = node.registry.sessions[a.dkg_id]
        assert first.r1_secret is not None
        assert any(any(co) for co in first.r1_secret._coefficients)
        assert any(first.x25519_secret)
        await trio.sleep(30)
        run = await round1(node, b)
        await round2(node, run)
        second = node.registry.sessions[b.dkg_id]
        assert second.r2_secret is not None
        assert any(second.r2_secret.secret_share)
        assert node.pool.open_sessions == 2
        start = trio.current_time()
        await trio.sleep(30)  # the first one's deadline
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() - start == 30
        assert first.state is DkgState.EXPIRED
        assert_zeroed(first)
        assert a.dkg_id not in node.registry.sessions
        assert node.pool.open_sessions == 1
        assert second.state.value == "round2_sent"
        await trio.sleep(30)
        await trio.testing.wait_all_tasks_blocked()
        assert second.state is DkgState.EXPIRED
        assert_zeroed(second)
        node.nothing_left()
        assert "expired" in await node.refused(
            "NOT_FOUND",
            "DkgRound3",
            pb.DkgRound3Request(dkg_id=b.dkg_id, shares=run.shares_for_enclave()),
        )


async def test_shutdown_zeroes_open_dkgs() -> None:
    async with enclave(over_grpc=False) as node:
        await node.call("DkgRound1", ceremony(ED25519).round1_request())
        session = next(iter(node.registry.sessions.values()))
    assert_zeroed(session)
    assert session.state is DkgState.EXPIRED
    assert node.registry.sessions == {}


def test_repr_names_no_secret() -> None:
    c = ceremony(ED25519)
    session = DkgSession(
        dkg_id=c.dkg_id,
        account_id=c.account_id,
        group=c.group,
        min_signers=2,
        max_signers=3,
        policy="default",
        participants=c.participants,
        identifier=c.enclave_identifier,
        params_sha256=c.params_sha256,
        request_key=b"",
        deadline=0.0,
        expires_at_unix_ms=0,
    )
    session.x25519_secret[:] = b"\x5a" * 32
    assert "5a5a" not in repr(session)
    assert repr(session) == f"<DkgSession 'dkg-1' open account='acct-dkg-1' {ED25519} 2-of-3>"


async def test_request_size_caps_are_enforced_by_the_server() -> None:
    async with enclave() as node:
        limits = node.service.receive_limits()
        cap = limits[S + "DkgRound3"]
        huge = pb.DkgRound3Request(dkg_id="x", shares=[pb.DkgEncryptedShare(ciphertext=bytes(cap))])
        await node.refused("RESOURCE_EXHAUSTED", "DkgRound3", huge)
        assert limits[S + "DkgRound2"] >= 63 * (64 * 33)


async def test_a_small_order_encryption_key_in_a_signed_package_fails_the_dkg() -> None:
    async with enclave(over_grpc=False) as node:
        c = ceremony(ED25519)
        run = await round1(node, c)
        cheat = run.locals[1]
        p = cheat.package
        # the all-zero X25519 key: every shared secret with it is zero
        cheat.package = cheat.signed(
            list(p.commitment), p.proof_of_knowledge, bytes(32), cheat.signing_key
        )
        session = node.registry.sessions[c.dkg_id]
        details = await node.refused(
            "INVALID_ARGUMENT",
            "DkgRound2",
            pb.DkgRound2Request(dkg_id=c.dkg_id, packages=run.packages_for_enclave()),
        )
        assert f"participant {c.group.describe_identifier(cheat.identifier)}" in details
        assert "encryption_key refused" in details
        assert session.state is DkgState.FAILED
        assert_zeroed(session)
        node.nothing_left()


async def test_without_a_create_policy_no_dkg_opens() -> None:
    measured = parse_measured_config(enclave_toml().replace(b"[policies.create]", b"[policies.x]"))
    assert measured.dkg is not None
    store = empty_store()
    pool = SessionPool(store.get)
    authorizer = Authorizer(measured.policies)
    with IdentityKey(CeremonyKey.from_seed(IDENTITY_SEED)) as identity:
        registry = DkgRegistry(
            settings=measured.dkg,
            identity=identity,
            writer=FakeWriter(store),
            authorizer=authorizer,
            lookup=store.get,
            slots=PoolSlots(pool),
        )
        client = DirectClient(SignService(store, pool, authorizer=authorizer, dkg=registry))
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.run)
            details = await client.refused(
                "PERMISSION_DENIED", "DkgRound1", ceremony(ED25519).round1_request()
            )
            assert "unknown_policy" in details
            assert registry.sessions == {}
            assert pool.open_sessions == 0
            nursery.cancel_scope.cancel()


async def test_draining_and_memory_pressure_refuse_new_dkgs_and_a_drain_waits_for_open_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pressure: list[str] = []
    async with enclave(
        over_grpc=False, overloaded=lambda: pressure[0] if pressure else None, ttl_s=60.0
    ) as node:
        pressure.append("memory above the hard watermark")
        details = await node.refused(
            "RESOURCE_EXHAUSTED", "DkgRound1", ceremony(ED25519).round1_request()
        )
        assert "memory above the hard watermark" in details
        assert node.pool.stats.refused_memory == 1
        pressure.clear()
        await node.call("DkgRound1", ceremony(ED25519).round1_request())
        node.service.start_draining()
        details = await node.refused(
            "UNAVAILABLE", "DkgRound1", ceremony(ED25519, dkg_id="late").round1_request()
        )
        assert "draining" in details
        # a drain waits for the open DKG's slot (it ends by its TTL here)
        start = trio.current_time()
        await node.pool.wait_idle()
        assert trio.current_time() - start == 60
        node.nothing_left()


async def test_full_dkg_through_the_real_delta_writer_and_the_parents_file_store(
    tmp_path: Path,
) -> None:
    """The real ``DeltaWriter`` (sealed, identity-signed delta on the chain) talking to the
    parent's real deltas channel and ``FileDeltaStore`` over a memory stream: the answer
    leaves only once the file is durable, the account signs, and a retried round 3 after the
    DKG is forgotten is answered from the loaded delta."""
    measured = config()
    assert measured.dkg is not None
    async with real_writer_enclave(tmp_path, measured) as real:
        node, chain, deltas = real.node, real.chain, real.deltas
        registry, store, pool = node.registry, node.store, node.pool
        c = ceremony(TAPROOT)
        run = await full_dkg(node, c)
        check_answer(run)
        assert run.answer.delta_sequence == 1
        assert run.answer.deltas_head == chain.head
        assert deltas.find_dkg(c.dkg_id) == (1, chain.head)
        stored = (tmp_path / "deltas" / "delta-00000001.enc").read_bytes()
        # durable before the answer, and the very delta the answer names
        assert delta_fingerprint(stored, 1) == run.answer.deltas_head
        await sign_with(node, run, b"signed with a DKG account stored as a delta", "s-r")
        registry.expire(trio.current_time() + 10_000)  # the DKG is forgotten
        assert c.dkg_id not in registry.sessions
        retry = pb.DkgRound3Request(dkg_id=c.dkg_id, shares=run.shares_for_enclave())
        got = await node.call("DkgRound3", retry)
        assert (got.account_id, got.delta_sequence, got.deltas_head) == (
            c.account_id,
            1,
            run.answer.deltas_head,
        )
        assert got.group_public_key == run.answer.group_public_key
        # a reboot: a new registry over the loaded chain alone (deltas_finder reads the
        # account the chain recorded for the DKG) answers the same, not UNAVAILABLE
        rebooted = DkgRegistry(
            settings=measured.dkg,
            identity=node.identity,
            writer=node.writer,
            authorizer=real.authorizer,
            lookup=store.get,
            slots=PoolSlots(pool),
            find_created=deltas_finder(deltas),
        )
        again = await rebooted.round3(retry)
        assert (again.account_id, again.delta_sequence, again.deltas_head) == (
            c.account_id,
            1,
            run.answer.deltas_head,
        )
        assert again.verifying_share == run.answer.verifying_share
