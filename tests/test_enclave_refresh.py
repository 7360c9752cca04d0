"""Refresh inside the enclave (issue 16 deliverable 4; docs/refresh-repair.md).

An account made by a DKG with the enclave (``tests/test_enclave_dkg.py``'s machinery) is
refreshed through ``DkgRound1/2/3`` with ``operation = "refresh"``, over a real gRPC server on
loopback and a stock grpcio client, the other participants running ZF's refresh
(``trio_sign.crypto._refresh``) here: the group key is unchanged, every share changes, the
refreshed quorum signs and a mix of old and new shares does not, the old share is gone from
the store's memory, and the writer got a ``refresh`` delta. A refresh that fails at any step
(approvals, a substituted package or ciphertext, a share off its commitment, the delta store,
the TTL) leaves the old share in place and signable.

The writer here applies each delta as the real one does (``ShareStore.apply_delta``: a
refresh writes over the slot, the old share zeroed first).
"""

from __future__ import annotations

import hashlib
import io
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from proto_min import sign_service_pb2 as pb
from trio_sign._errors import FrostError
from trio_sign.authz import approval_payload
from trio_sign.crypto import _dkg, _kdf, scheme_by_name
from trio_sign.crypto._group import Group, group_for
from trio_sign.crypto._refresh import refresh_part1, refresh_part2, refresh_part3
from trio_sign.enclave._deltas import EnclaveDeltas
from trio_sign.enclave._dkg import (
    CreatedAccount,
    DkgState,
    dkg_params,
    round1_payload,
    verify_ed25519,
)
from trio_sign.enclave._measured import parse_measured_config
from trio_sign.parent._deltas import (
    delta_fingerprint,
)
from trio_sign.shares import ShareRecord, ShareStore, write_plaintext
from trio_sign.shares._deltas import DeltaChain

from .test_enclave_dkg import (
    APPROVERS,
    BASE,
    ED25519,
    PARTICIPANT_KEYS,
    RESPONSES,
    SUITES,
    TAPROOT,
    UNPINNED,
    Envelopes,
    FakeWriter,
    Node,
    Run,
    ceremony,
    empty_store,
    enclave,
    enclave_toml,
    full_dkg,
    real_writer_enclave,
)

grpc: Any = pytest.importorskip("grpc", reason="grpcio is a test dependency")

RESPONSES.update({"RepairStep1": pb.RepairStep1Response, "RepairStep2": pb.RepairStep2Response})


def lifecycle_toml(*, refresh: bool = True, repair: bool = True, **kwargs: Any) -> bytes:
    """test_enclave_dkg's enclave.toml plus the ``refresh`` and ``repair`` policies (both
    approvers, 2 of 2)."""
    extra = []
    if refresh:
        extra += ["[policies.refresh]", 'approvers = ["ops-1", "ops-2"]', "threshold = 2"]
    if repair:
        extra += ["[policies.repair]", 'approvers = ["ops-1", "ops-2"]', "threshold = 2"]
    return enclave_toml(**kwargs) + ("\n".join(extra) + "\n").encode()


class ApplyingWriter(FakeWriter):
    """FakeWriter whose deltas are applied by ``ShareStore.apply_delta`` (create appends,
    refresh and repair write over the slot, zeroing the old share), as the real writer's."""

    async def store(
        self, records: Sequence[ShareRecord], operation: str, dkg_id: str
    ) -> tuple[int, str]:
        self.calls += 1
        self.seen_shares += [r.signing_share for r in records]
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        buf = io.BytesIO()
        write_plaintext(buf, records, ciphersuite=records[0].ciphersuite)
        buf.seek(0)
        delta = ShareStore.load_plaintext(buf)
        try:
            self.share_store.apply_delta(delta, operation)
        finally:
            delta.close()
        sequence = len(self.operations) + 1
        head = hashlib.sha256(f"delta {sequence} {dkg_id}".encode()).hexdigest()
        self.created[dkg_id] = CreatedAccount(records[0].account_id, sequence, head)
        self.operations.append(operation)
        return sequence, head


@asynccontextmanager
async def lifecycle_enclave(
    *, over_grpc: bool = True, toml: bytes | None = None, **kwargs: Any
) -> AsyncIterator[Node]:
    """test_enclave_dkg's ``enclave()`` with :func:`lifecycle_toml` and the applying writer."""
    measured = parse_measured_config(toml if toml is not None else lifecycle_toml(**kwargs))
    async with enclave(
        over_grpc=over_grpc, measured=measured, writer_factory=ApplyingWriter
    ) as node:
        yield node


# -- an account, and the other participants' keys ---------------------------------------------


@dataclass
class Account:
    """An account made by a DKG with the enclave: the public key package and the others'
    current key packages (the enclave's share is in its store)."""

    suite: str
    account_id: str
    min_signers: int
    participants: list[tuple[bytes, str]]
    enclave_identifier: bytes
    group_public_key: bytes
    verifying_shares: dict[bytes, bytes]
    keys: dict[bytes, bytearray] = field(repr=False)  # the others' signing shares

    @property
    def group(self) -> Group:
        return group_for(self.suite)

    @property
    def max_signers(self) -> int:
        return len(self.participants)


async def create_account(node: Node, suite: str, *, t: int = 2, n: int = 3) -> Account:
    c = ceremony(suite, t=t, n=n, enclave_at=2, dkg_id=f"create-{suite}")
    run: Run = await full_dkg(node, c)
    public = run.locals[0].public
    return Account(
        suite,
        c.account_id,
        t,
        c.participants,
        c.enclave_identifier,
        public.verifying_key,
        dict(public.verifying_shares),
        {local.identifier: bytearray(local.key.signing_share) for local in run.locals},
    )


async def sign_via(
    node: Node,
    a: Account,
    signers: dict[bytes, Any],
    verifying_shares: dict[bytes, bytes],
    *,
    session_id: str | None = None,
) -> bool:
    """Commit/Sign on the enclave with ``signers`` (local identifier -> signing share) for
    the others; True when the aggregate verifies under the group key (the suite's verifier,
    Taproot BIP-340 with merkle root None), False when aggregation or verification fails."""
    scheme = scheme_by_name(a.suite)
    sid = session_id or secrets.token_hex(8)
    message = secrets.token_bytes(32)
    got = await node.call("Commit", pb.CommitRequest(account_id=a.account_id, session_id=sid))
    own = scheme.commitment(got.identifier, got.hiding, got.binding)
    nonces = {i: scheme.commit(i, bytearray(s)) for i, s in signers.items()}
    order = a.group.identifier_from_bytes
    commitments = sorted(
        [own, *(x.commitment for x in nonces.values())], key=lambda x: order(x.identifier)
    )
    signed = await node.call(
        "Sign",
        pb.SignRequest(
            session_id=sid,
            message=message,
            commitments=[
                pb.SigningCommitment(identifier=x.identifier, hiding=x.hiding, binding=x.binding)
                for x in commitments
            ],
        ),
    )
    shares = {bytes(signed.identifier): bytes(signed.signature_share)}
    for i, s in signers.items():
        shares[i] = scheme.sign(
            nonces[i],
            signing_share=bytearray(s),
            group_public_key=a.group_public_key,
            message=message,
            commitments=commitments,
            merkle_root=None,
        )
    try:
        signature = scheme.aggregate(
            commitments=commitments,
            message=message,
            group_public_key=a.group_public_key,
            signature_shares=shares,
            verifying_shares={i: verifying_shares[i] for i in shares},
            merkle_root=None,
        )
    except FrostError:
        return False
    return bool(scheme.verify(a.group_public_key, message, signature, None))


async def signs_as_before(node: Node, a: Account) -> bool:
    """The enclave and one other participant, with the account's current keys."""
    first = next(iter(a.keys))
    return await sign_via(node, a, {first: a.keys[first]}, a.verifying_shares)


# -- the refresh ceremony ------------------------------------------------------------------------


@dataclass
class Refresh:
    """One refresh's public parameters, as every participant and the approvers see them."""

    a: Account
    dkg_id: str

    @property
    def params(self) -> bytes:
        a = self.a
        return dkg_params(
            a.suite, a.min_signers, a.max_signers, "default", a.participants, "refresh"
        )

    @property
    def params_sha256(self) -> bytes:
        return hashlib.sha256(self.params).digest()

    def approvals(self, *names: str, params: bytes | None = None) -> list[Any]:
        expires = int(time.time() * 1000) + 60_000
        payload = approval_payload(self.a.account_id, self.dkg_id, params or self.params, expires)
        return [
            pb.Approval(
                key_id=name,
                signature=APPROVERS[name].sign(payload).signature,
                expires_at_unix_ms=expires,
            )
            for name in names
        ]

    def round1_request(self, approvers: Sequence[str] = ("ops-1", "ops-2"), **kw: Any) -> Any:
        a = self.a
        fields: dict[str, Any] = {
            "dkg_id": self.dkg_id,
            "account_id": a.account_id,
            "ciphersuite": a.suite,
            "min_signers": a.min_signers,
            "max_signers": a.max_signers,
            "participants": [pb.DkgParticipant(identifier=i, key_id=k) for i, k in a.participants],
            "identifier": a.enclave_identifier,
            "approvals": self.approvals(*approvers),
            "operation": "refresh",
        }
        fields.update(kw)
        return pb.DkgRound1Request(**fields)


@dataclass
class Refresher(Envelopes):
    """A participant other than the enclave running ZF's refresh with the contract's
    envelopes (the operation in the signed payload)."""

    r: Refresh
    identifier: bytes
    key_id: str
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
        a = self.r.a
        self.r1_secret, r1 = refresh_part1(
            self.identifier, a.max_signers, a.min_signers, suite=a.suite
        )
        self.x_public = _kdf.x25519_keypair(self.x_secret)
        self.package = self.signed(list(r1.commitment), r1.proof_of_knowledge, self.x_public)
        return self.package

    def signed(
        self,
        commitment: list[bytes],
        pok: bytes,
        encryption_key: bytes,
        *,
        operation: str = "refresh",
        signing_key: Any = None,
    ) -> Any:
        r = self.r
        params = (
            r.params
            if operation == "refresh"
            else dkg_params(
                r.a.suite, r.a.min_signers, r.a.max_signers, "default", r.a.participants
            )
        )
        payload = round1_payload(
            r.dkg_id,
            r.a.account_id,
            hashlib.sha256(params).digest(),
            self.identifier,
            commitment,
            pok,
            encryption_key,
            operation,
        )
        key = signing_key or PARTICIPANT_KEYS[self.key_id]
        return pb.DkgRound1Package(
            identifier=self.identifier,
            commitment=commitment,
            proof_of_knowledge=pok,
            encryption_key=encryption_key,
            key_id=self.key_id,
            signature=key.sign(payload).signature,
        )

    def round2(self, packages: Sequence[Any], identity: bytes) -> list[Any]:
        r = self.r
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
                r.dkg_id,
                r.a.account_id,
                r.params_sha256,
                p.identifier,
                list(p.commitment),
                p.proof_of_knowledge,
                p.encryption_key,
                "refresh",
            )
            assert verify_ed25519(key, payload, p.signature), p.key_id
            r1[bytes(p.identifier)] = _dkg.Round1Package(tuple(p.commitment), p.proof_of_knowledge)
            self.keys[bytes(p.identifier)] = bytes(p.encryption_key)
        self.received = r1
        self.r2_secret, shares = refresh_part2(self.r1_secret, r1)
        return [
            pb.DkgEncryptedShare(
                sender=self.identifier,
                recipient=ident,
                ciphertext=self.encrypt(ident, share.signing_share),
            )
            for ident, share in shares.items()
        ]

    def encrypt(self, recipient: bytes, share: Any, *, dkg_id: str | None = None) -> bytes:
        return self.seal(recipient, share, dkg_id or self.r.dkg_id)

    def round3(self, shares: Sequence[Any]) -> None:
        a = self.r.a
        opened = self.open_shares(shares, self.r.dkg_id)
        self.key, self.public = refresh_part3(
            self.r2_secret,
            self.received,
            opened,
            signing_share=a.keys[self.identifier],
            verifying_share=a.verifying_shares[self.identifier],
            group_public_key=a.group_public_key,
            verifying_shares=a.verifying_shares,
        )


@dataclass
class RefreshRun:
    r: Refresh
    locals: list[Refresher]
    enclave_package: Any = None
    enclave_shares: list[Any] = field(default_factory=list)
    local_shares: list[Any] = field(default_factory=list)
    answer: Any = None

    def packages(self) -> list[Any]:
        return [p.package for p in self.locals]

    def shares_for_enclave(self) -> list[Any]:
        return [s for s in self.local_shares if s.recipient == self.r.a.enclave_identifier]

    def refreshed(self) -> Account:
        """The account after the refresh, as the local participants see it."""
        a = self.r.a
        public = self.locals[0].public
        return Account(
            a.suite,
            a.account_id,
            a.min_signers,
            a.participants,
            a.enclave_identifier,
            public.verifying_key,
            dict(public.verifying_shares),
            {x.identifier: bytearray(x.key.signing_share) for x in self.locals},
        )


async def refresh_round1(node: Node, a: Account, dkg_id: str = "refresh-1") -> RefreshRun:
    r = Refresh(a, dkg_id)
    run = RefreshRun(
        r, [Refresher(r, i, k) for i, k in a.participants if i != a.enclave_identifier]
    )
    got = await node.call("DkgRound1", r.round1_request())
    run.enclave_package = got.package
    for local in run.locals:
        local.round1()
    return run


async def refresh_round2(node: Node, run: RefreshRun) -> None:
    got = await node.call(
        "DkgRound2", pb.DkgRound2Request(dkg_id=run.r.dkg_id, packages=run.packages())
    )
    run.enclave_shares = list(got.shares)
    every = [run.enclave_package, *run.packages()]
    for local in run.locals:
        run.local_shares += local.round2(every, node.identity.public_key)


async def refresh_round3(node: Node, run: RefreshRun) -> Any:
    for local in run.locals:
        local.round3(run.enclave_shares + run.local_shares)
    run.answer = await node.call(
        "DkgRound3", pb.DkgRound3Request(dkg_id=run.r.dkg_id, shares=run.shares_for_enclave())
    )
    return run.answer


async def full_refresh(node: Node, a: Account, dkg_id: str = "refresh-1") -> RefreshRun:
    run = await refresh_round1(node, a, dkg_id)
    await refresh_round2(node, run)
    await refresh_round3(node, run)
    return run


def arenas(store: ShareStore) -> bytes:
    return bytes(store._arena) + bytes(store._wide.arena)


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
async def test_refresh_over_grpc_keeps_the_group_key_and_replaces_the_share(suite: str) -> None:
    async with lifecycle_enclave() as node:
        a = await create_account(node, suite)
        before = node.store.get(a.account_id)
        assert before is not None
        old_share = bytes(before.signing_share)  # the test's copy, to look for it afterwards
        assert await signs_as_before(node, a)
        run = await full_refresh(node, a)
        new = run.refreshed()
        answer = run.answer
        # the group key is unchanged; the enclave's share and verifying share are new
        assert new.group_public_key == a.group_public_key
        assert answer.group_public_key == a.group_public_key
        assert answer.account_id == a.account_id
        assert answer.ciphersuite == suite
        assert answer.identifier == a.enclave_identifier
        assert answer.verifying_share == new.verifying_shares[a.enclave_identifier]
        assert answer.verifying_share != a.verifying_shares[a.enclave_identifier]
        assert list(answer.verifying_shares) == []  # the others derive theirs (docs)
        after = node.store.get(a.account_id)
        assert after is not None
        assert after.group_public_key == a.group_public_key
        assert after.verifying_share == answer.verifying_share
        assert (after.min_signers, after.max_signers, after.ciphersuite) == (2, 3, suite)
        assert bytes(after.signing_share) != old_share
        # the old share is nowhere in the store's memory (zeroed, then written over)
        assert old_share not in arenas(node.store)
        # persisted as a refresh delta, whose record buffer was zeroed once stored
        assert node.writer.operations == ["create", "refresh"]
        assert answer.delta_sequence == 2
        assert all(not any(b) for b in node.writer.seen_shares)
        node.nothing_left()
        assert node.registry.sessions[run.r.dkg_id].state is DkgState.DONE
        # every local share changed too
        for i in new.keys:
            assert new.keys[i] != a.keys[i]
        # the refreshed quorum signs (each other participant with the enclave)
        for i in new.keys:
            assert await sign_via(node, new, {i: new.keys[i]}, new.verifying_shares)
        # an old share with the enclave's new one does not, whichever verifying shares
        first = next(iter(a.keys))
        assert not await sign_via(node, new, {first: a.keys[first]}, new.verifying_shares)
        assert not await sign_via(node, new, {first: a.keys[first]}, a.verifying_shares)


async def test_three_of_five_taproot_refresh_with_the_enclave_signing() -> None:
    async with lifecycle_enclave() as node:
        a = await create_account(node, TAPROOT, t=3, n=5)
        run = await full_refresh(node, a)
        new = run.refreshed()
        assert new.group_public_key == a.group_public_key
        others = list(new.keys)[:2]
        assert await sign_via(node, new, {i: new.keys[i] for i in others}, new.verifying_shares)
        mixed = {others[0]: new.keys[others[0]], others[1]: a.keys[others[1]]}
        assert not await sign_via(node, new, mixed, new.verifying_shares)


async def test_a_second_refresh_works_on_the_refreshed_share() -> None:
    async with lifecycle_enclave() as node:
        a = await create_account(node, ED25519)
        first = (await full_refresh(node, a, "refresh-1")).refreshed()
        second = (await full_refresh(node, first, "refresh-2")).refreshed()
        assert second.group_public_key == a.group_public_key
        assert node.writer.operations == ["create", "refresh", "refresh"]
        assert await signs_as_before(node, second)
        assert not await signs_as_before(node, first)


# -- approvals and parameters ---------------------------------------------------------------------


async def test_refresh_needs_approvals_under_the_refresh_policy() -> None:
    async with lifecycle_enclave() as node:
        a = await create_account(node, ED25519)
        r = Refresh(a, "refresh-auth")
        one = await node.refused("PERMISSION_DENIED", "DkgRound1", r.round1_request(("ops-1",)))
        assert "not authorized" in one
        # approvals of the parameters without the operation (a create's) do not count
        create_params = dkg_params(ED25519, 2, 3, "default", a.participants)
        stale = r.round1_request(approvals=r.approvals("ops-1", "ops-2", params=create_params))
        await node.refused("PERMISSION_DENIED", "DkgRound1", stale)
        node.nothing_left()
        assert r.dkg_id not in node.registry.sessions
        assert await signs_as_before(node, a)
        await full_refresh(node, a, "refresh-ok")


async def test_without_a_refresh_policy_nothing_opens() -> None:
    async with lifecycle_enclave(refresh=False) as node:
        a = await create_account(node, SUITES[1])
        details = await node.refused(
            "PERMISSION_DENIED", "DkgRound1", Refresh(a, "r").round1_request()
        )
        assert "unknown_policy" in details
        node.nothing_left()


async def test_refresh_parameters_must_match_the_account() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519)
        r = Refresh(a, "refresh-params")
        cases: dict[str, dict[str, Any]] = {
            "ciphersuite": {"ciphersuite": SUITES[1]},
            "min_signers": {"min_signers": 3},
            "identifier": {"identifier": a.participants[0][0]},
            "policy": {"policy": "other"},
        }
        for word, change in cases.items():
            details = await node.refused(
                "INVALID_ARGUMENT", "DkgRound1", r.round1_request(**change)
            )
            assert word in details
        assert "does not exist" in await node.refused(
            "NOT_FOUND", "DkgRound1", r.round1_request(account_id="nobody")
        )
        assert "operation" in await node.refused(
            "INVALID_ARGUMENT", "DkgRound1", r.round1_request(operation="rotate")
        )
        # the reserved policies are no account's policy
        c = ceremony(ED25519, dkg_id="reserved")
        for reserved in ("refresh", "repair", "create"):
            c.policy = reserved
            assert "not a signing policy" in await node.refused(
                "INVALID_ARGUMENT", "DkgRound1", c.round1_request()
            )
        node.nothing_left()


async def test_one_refresh_at_a_time_and_idempotent_rounds() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519)
        run = await refresh_round1(node, a, "refresh-a")
        again = await node.call("DkgRound1", run.r.round1_request())
        assert again.package == run.enclave_package
        details = await node.refused(
            "ALREADY_EXISTS", "DkgRound1", Refresh(a, "refresh-b").round1_request()
        )
        assert "refresh-a" in details
        await refresh_round2(node, run)
        retried = await node.call(
            "DkgRound2", pb.DkgRound2Request(dkg_id=run.r.dkg_id, packages=run.packages())
        )
        assert list(retried.shares) == run.enclave_shares
        answer = await refresh_round3(node, run)
        assert (
            await node.call(
                "DkgRound3",
                pb.DkgRound3Request(dkg_id=run.r.dkg_id, shares=run.shares_for_enclave()),
            )
            == answer
        )
        assert node.writer.operations == ["create", "refresh"]


# -- a relaying gateway, and failures at every step -----------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
async def test_substituted_packages_and_ciphertexts_are_named(suite: str) -> None:
    async with lifecycle_enclave() as node:
        a = await create_account(node, suite)
        run = await refresh_round1(node, a)
        target = run.locals[1]
        other = run.locals[0]
        who = a.group.describe_identifier(target.identifier)
        p = target.package
        forged = {
            "changed commitment": target.signed(
                list(other.package.commitment),
                p.proof_of_knowledge,
                p.encryption_key,
                signing_key=UNPINNED,
            ),
            "signed as a create": target.signed(
                list(p.commitment), p.proof_of_knowledge, p.encryption_key, operation="create"
            ),
            "changed encryption key": pb.DkgRound1Package(
                identifier=p.identifier,
                commitment=list(p.commitment),
                proof_of_knowledge=p.proof_of_knowledge,
                encryption_key=_kdf.x25519_keypair(bytearray(32)),
                key_id=p.key_id,
                signature=p.signature,
            ),
            "a create package (t elements)": target.signed(
                [*p.commitment, other.package.commitment[0]],
                p.proof_of_knowledge,
                p.encryption_key,
            ),
        }
        for name, package in forged.items():
            packages = [package if x is p else x for x in run.packages()]
            details = await node.refused(
                "INVALID_ARGUMENT",
                "DkgRound2",
                pb.DkgRound2Request(dkg_id=run.r.dkg_id, packages=packages),
            )
            assert f"participant {who}" in details, name
            assert node.registry.sessions[run.r.dkg_id].state is DkgState.ROUND1_SENT, name
        await refresh_round2(node, run)
        for local in run.locals:
            local.round3(run.enclave_shares + run.local_shares)
        good = run.shares_for_enclave()
        flipped = bytearray(good[0].ciphertext)
        flipped[30] ^= 1
        moved = next(
            s
            for s in run.local_shares
            if s.sender == other.identifier and s.recipient == target.identifier
        )
        for name, bad in {
            "bit flip": pb.DkgEncryptedShare(
                sender=good[0].sender, recipient=good[0].recipient, ciphertext=bytes(flipped)
            ),
            "moved": pb.DkgEncryptedShare(
                sender=moved.sender, recipient=a.enclave_identifier, ciphertext=moved.ciphertext
            ),
        }.items():
            shares = [bad if s.sender == bad.sender else s for s in good]
            details = await node.refused(
                "INVALID_ARGUMENT",
                "DkgRound3",
                pb.DkgRound3Request(dkg_id=run.r.dkg_id, shares=shares),
            )
            assert "fails authentication" in details, name
            assert node.registry.sessions[run.r.dkg_id].state is DkgState.ROUND2_SENT
        assert await signs_as_before(node, a)  # nothing changed yet
        answer = await node.call("DkgRound3", pb.DkgRound3Request(dkg_id=run.r.dkg_id, shares=good))
        run.answer = answer
        assert await sign_via(
            node,
            run.refreshed(),
            {other.identifier: other.key.signing_share},
            run.refreshed().verifying_shares,
        )


FAILURES = ["share off its commitment", "delta store", "expiry", "shutdown"]


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_failed_refresh_keeps_the_old_share_signable(
    failure: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with lifecycle_enclave(over_grpc=False, ttl_s=60.0) as node:
        a = await create_account(node, SUITES[1])
        before = node.store.get(a.account_id)
        assert before is not None
        old = (bytes(before.signing_share), before.verifying_share)
        run = await refresh_round1(node, a)
        session = node.registry.sessions[run.r.dkg_id]
        await refresh_round2(node, run)
        for local in run.locals:
            local.round3(run.enclave_shares + run.local_shares)
        shares = run.shares_for_enclave()
        request = pb.DkgRound3Request(dkg_id=run.r.dkg_id, shares=shares)
        if failure == "share off its commitment":
            sender = run.locals[0]
            off = bytearray(32)
            a.group.random_scalar(off)
            bad = pb.DkgEncryptedShare(
                sender=sender.identifier,
                recipient=a.enclave_identifier,
                ciphertext=sender.encrypt(a.enclave_identifier, off),
            )
            request = pb.DkgRound3Request(
                dkg_id=run.r.dkg_id,
                shares=[bad if s.sender == sender.identifier else s for s in shares],
            )
            details = await node.refused("INVALID_ARGUMENT", "DkgRound3", request)
            assert a.group.describe_identifier(sender.identifier) in details
        elif failure == "delta store":
            node.writer.fail = OSError("disk full")
            details = await node.refused("UNAVAILABLE", "DkgRound3", request)
            assert "keeps its old share" in details
        elif failure == "expiry":
            await trio.sleep(60)
            await trio.testing.wait_all_tasks_blocked()
            assert session.state is DkgState.EXPIRED
            await node.refused("NOT_FOUND", "DkgRound3", request)
        else:
            assert node.registry.close() == 1
        assert session.state in (DkgState.FAILED, DkgState.EXPIRED)
        assert session.r2_secret is not None
        assert not any(session.r2_secret.secret_share)
        assert not any(session.x25519_secret)
        node.nothing_left()
        now = node.store.get(a.account_id)
        assert now is not None
        assert (bytes(now.signing_share), now.verifying_share) == old
        assert node.writer.operations == ["create"]
        assert await signs_as_before(node, a)


async def test_a_refresh_under_an_account_changed_since_round1_is_refused() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519)
        run = await refresh_round1(node, a, "refresh-late")
        await refresh_round2(node, run)
        # a replica's refresh of the same account lands in between (another delta)
        other_run = run  # the locals' shares for our run stay as they are
        rec = node.store.get(a.account_id)
        assert rec is not None
        scalar = bytearray(32)
        a.group.random_scalar(scalar)
        replaced = ShareRecord(
            a.account_id,
            a.enclave_identifier,
            scalar,
            a.group.base_mult(scalar),
            a.group_public_key,
            2,
            3,
            ciphersuite=ED25519,
        )
        await ApplyingWriter.store(node.writer, [replaced], "refresh", "elsewhere")
        for local in other_run.locals:
            local.round3(run.enclave_shares + run.local_shares)
        details = await node.refused(
            "FAILED_PRECONDITION",
            "DkgRound3",
            pb.DkgRound3Request(dkg_id=run.r.dkg_id, shares=run.shares_for_enclave()),
        )
        assert "changed since round 1" in details
        node.nothing_left()


def test_refresh_params_bytes_are_documented() -> None:
    """The bytes of docs/refresh-repair.md §2: create's are today's; a refresh's carry
    0x01 ‖ u16be(7) ‖ "refresh" after the tag."""
    ident = bytes(31) + b"\x01"
    create = dkg_params(ED25519, 2, 3, "default", [(ident, "enclave")])
    refresh = dkg_params(ED25519, 2, 3, "default", [(ident, "enclave")], "refresh")
    tag = b"trio-sign/dkg-params/v1"
    assert create.startswith(tag + b"\x00" + len(ED25519).to_bytes(2, "big"))
    assert refresh == tag + b"\x01\x00\x07refresh" + create[len(tag) + 1 :]
    payload = round1_payload("d", "a", bytes(32), ident, [b"e" * 32], b"p", bytes(32), "refresh")
    assert payload.startswith(b"trio-sign/dkg-round1/v1\x01\x00\x07refresh\x00\x01d\x00\x01a")


async def test_refresh_through_the_real_delta_writer_and_the_parents_file_store(
    tmp_path: Path,
) -> None:
    """The real ``DeltaWriter`` and the parent's ``FileDeltaStore``: a DKG's ``create`` delta,
    then the refresh's ``refresh`` delta, both durable before their answers; after a "reboot"
    (a fresh store on the same base, the stored deltas applied in order) the account holds the
    refreshed share."""
    rebooted = empty_store()
    try:
        async with real_writer_enclave(tmp_path, parse_measured_config(lifecycle_toml())) as real:
            node, chain, deltas, store = real.node, real.chain, real.deltas, real.node.store
            a = await create_account(node, TAPROOT)
            old = store.get(a.account_id)
            assert old is not None
            old_share = bytes(old.signing_share)
            run = await full_refresh(node, a)
            new = run.refreshed()
            assert run.answer.delta_sequence == 2
            assert run.answer.deltas_head == chain.head
            assert deltas.find_dkg(run.r.dkg_id) == (2, chain.head)
            stored = (tmp_path / "deltas" / "delta-00000002.enc").read_bytes()
            assert delta_fingerprint(stored, 2) == run.answer.deltas_head
            assert await signs_as_before(node, new)
            assert not await signs_as_before(node, a)
            assert old_share not in arenas(store)
            # the "reboot": the stored chain on the same base gives the refreshed share
            again = EnclaveDeltas(
                rebooted,
                DeltaChain(BASE),
                provider=real.wrap,
                signing_keys=(node.identity.public_key,),
            )
            ops = [
                again.apply((tmp_path / "deltas" / f"delta-0000000{k}.enc").read_bytes()).operation
                for k in (1, 2)
            ]
            assert ops == ["create", "refresh"]
            loaded = rebooted.get(a.account_id)
            current = store.get(a.account_id)
            assert loaded is not None
            assert current is not None
            assert bytes(loaded.signing_share) == bytes(current.signing_share)
            assert loaded.verifying_share == run.answer.verifying_share
            assert loaded.group_public_key == a.group_public_key
    finally:
        rebooted.close()
