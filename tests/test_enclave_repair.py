"""Repair with the enclave as one helper (issue 16 deliverable 4; docs/refresh-repair.md).

A participant of an account made by a DKG with the enclave loses its share; three helpers,
the enclave one of them, restore it with ZF's repairable threshold scheme
(``trio_sign.crypto._repair``, checked against ZF's ``repair-share.json`` in
``tests/test_repair_vectors.py``) through ``RepairStep1``/``RepairStep2`` over a real gRPC
server on loopback and a stock grpcio client, the other helpers and the participant played
here with the contract's signed X25519 keys and encrypted deltas and sigma. The restored share
equals the lost one and signs. Then a relaying gateway's substitutions, the ``repair`` policy,
the parameters, idempotent retries, and expiry that zeroes (``autojump_clock``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from proto_min import sign_service_pb2 as pb
from trio_sign.authz import approval_payload
from trio_sign.crypto import _kdf
from trio_sign.crypto._repair import (
    repair_share_step_1,
    repair_share_step_2,
    repair_share_step_3,
)
from trio_sign.enclave import SessionPool, SignService
from trio_sign.enclave._dkg import (
    REPAIR_DELTA_INFO,
    REPAIR_SIGMA_INFO,
    SHARE_INFO,
    DkgState,
    decrypt_share_into,
    encrypt_share,
    repair_key_payload,
    repair_params,
    share_key_into,
    verify_ed25519,
)
from trio_sign.shares import ShareRecord

from .test_enclave_dkg import (
    APPROVERS,
    ED25519,
    PARTICIPANT_KEYS,
    SUITES,
    UNPINNED,
    DirectClient,
    Node,
    empty_store,
)
from .test_enclave_refresh import (
    Account,
    ApplyingWriter,
    Refresh,
    create_account,
    lifecycle_enclave,
    lifecycle_toml,
    sign_via,
)


@dataclass
class Party:
    """A helper other than the enclave, or the participant being repaired."""

    identifier: bytes
    key_id: str
    x_secret: bytearray = field(default_factory=lambda: bytearray(32), repr=False)
    x_public: bytes = b""
    keys: dict[bytes, bytes] = field(default_factory=dict)  # identifier -> X25519 key
    own_delta: bytearray = field(default_factory=bytearray, repr=False)  # a helper's own

    def __post_init__(self) -> None:
        self.x_public = _kdf.x25519_keypair(self.x_secret)

    def box(self, peer: bytes, *, sending: bool, repair_id: str, label: bytes) -> bytearray:
        key = bytearray(32)
        mine, theirs = self.x_public, self.keys[peer]
        share_key_into(
            key,
            dkg_id=repair_id,
            sender=self.identifier if sending else peer,
            recipient=peer if sending else self.identifier,
            own_secret=self.x_secret,
            sender_public=mine if sending else theirs,
            recipient_public=theirs if sending else mine,
            peer_public=theirs,
            label=label,
        )
        return key

    def seal(self, peer: bytes, value: Any, *, repair_id: str, label: bytes) -> Any:
        key = self.box(peer, sending=True, repair_id=repair_id, label=label)
        return pb.DkgEncryptedShare(
            sender=self.identifier,
            recipient=peer,
            ciphertext=encrypt_share(
                key, value, dkg_id=repair_id, sender=self.identifier, recipient=peer
            ),
        )

    def open(self, sealed: Any, *, repair_id: str, label: bytes) -> bytearray | None:
        sender = bytes(sealed.sender)
        key = self.box(sender, sending=False, repair_id=repair_id, label=label)
        plain = bytearray(32)
        ok = decrypt_share_into(
            plain,
            key,
            bytes(sealed.ciphertext),
            dkg_id=repair_id,
            sender=sender,
            recipient=self.identifier,
        )
        return plain if ok else None


@dataclass
class Repair:
    """One repair's parties and public parameters, as every party and the approvers see
    them."""

    a: Account
    repair_id: str
    helpers: list[tuple[bytes, str]]  # ascending, the enclave included
    participant: tuple[bytes, str]
    parties: dict[bytes, Party] = field(default_factory=dict)  # the others and the participant

    @property
    def params(self) -> bytes:
        return repair_params(self.a.suite, self.helpers, self.participant)

    @property
    def params_sha256(self) -> bytes:
        return hashlib.sha256(self.params).digest()

    def approvals(self, *names: str, params: bytes | None = None) -> list[Any]:
        expires = int(time.time() * 1000) + 60_000
        payload = approval_payload(
            self.a.account_id, self.repair_id, params or self.params, expires
        )
        return [
            pb.Approval(
                key_id=n, signature=APPROVERS[n].sign(payload).signature, expires_at_unix_ms=expires
            )
            for n in names
        ]

    def signed_key(self, party: Party, *, signing_key: Any = None, repair_id: str = "") -> Any:
        payload = repair_key_payload(
            repair_id or self.repair_id,
            self.a.account_id,
            self.params_sha256,
            party.identifier,
            party.x_public,
        )
        key = signing_key or PARTICIPANT_KEYS[party.key_id]
        return pb.RepairKey(
            identifier=party.identifier,
            encryption_key=party.x_public,
            key_id=party.key_id,
            signature=key.sign(payload).signature,
        )

    def signed_keys(self) -> list[Any]:
        return [self.signed_key(p) for p in self.parties.values()]

    def step1_request(self, approvers: Sequence[str] = ("ops-1", "ops-2"), **kw: Any) -> Any:
        fields: dict[str, Any] = {
            "repair_id": self.repair_id,
            "account_id": self.a.account_id,
            "helpers": [pb.DkgParticipant(identifier=i, key_id=k) for i, k in self.helpers],
            "participant": pb.DkgParticipant(
                identifier=self.participant[0], key_id=self.participant[1]
            ),
            "keys": self.signed_keys(),
            "approvals": self.approvals(*approvers),
        }
        fields.update(kw)
        return pb.RepairStep1Request(**fields)

    @property
    def local_helpers(self) -> list[Party]:
        return [self.parties[i] for i, k in self.helpers if k != "enclave"]

    @property
    def lost(self) -> Party:
        return self.parties[self.participant[0]]


def plan(a: Account, *, lost_at: int = -1, repair_id: str = "repair-1") -> Repair:
    """The enclave and every other participant but the lost one help (at least 3 in all)."""
    lost = a.participants[lost_at]
    helpers = [p for p in a.participants if p != lost]
    r = Repair(a, repair_id, helpers, lost)
    for ident, key_id in [*helpers, lost]:
        if key_id != "enclave":
            r.parties[ident] = Party(ident, key_id)
    return r


@dataclass
class Step1:
    r: Repair
    answer: Any
    local_deltas: list[Any]  # every local helper's encrypted deltas


async def step1(node: Node, r: Repair) -> Step1:
    """RepairStep1 on the enclave, then every local helper's step 1 (its deltas encrypted
    to each other helper, the enclave's key checked under the identity key)."""
    answer = await node.call("RepairStep1", r.step1_request())
    ek = answer.key
    enclave_id = bytes(ek.identifier)
    assert ek.key_id == "enclave"
    payload = repair_key_payload(
        r.repair_id, r.a.account_id, r.params_sha256, enclave_id, bytes(ek.encryption_key)
    )
    assert verify_ed25519(node.identity.public_key, payload, bytes(ek.signature))
    for party in r.parties.values():
        party.keys = {p.identifier: p.x_public for p in r.parties.values() if p is not party}
        party.keys[enclave_id] = bytes(ek.encryption_key)
    out: list[Any] = []
    for helper in r.local_helpers:
        deltas = repair_share_step_1(
            [i for i, _k in r.helpers],
            helper.identifier,
            r.a.keys[helper.identifier],
            r.participant[0],
            suite=r.a.suite,
        )
        for ident, delta in deltas.items():
            if ident == helper.identifier:
                continue
            out.append(helper.seal(ident, delta, repair_id=r.repair_id, label=REPAIR_DELTA_INFO))
        helper.own_delta = deltas[helper.identifier]  # it keeps its own delta
    return Step1(r, answer, out)


def to_enclave(s1: Step1) -> list[Any]:
    return [d for d in s1.local_deltas if d.recipient == s1.r.a.enclave_identifier]


def local_sigmas(s1: Step1) -> list[Any]:
    """Each local helper's step 2: its deltas (the enclave's and the others') opened and
    summed, sigma encrypted to the participant."""
    r = s1.r
    out = []
    every = list(s1.answer.deltas) + s1.local_deltas
    for helper in r.local_helpers:
        values = {helper.identifier: helper.own_delta}
        for d in every:
            if d.recipient == helper.identifier:
                plain = helper.open(d, repair_id=r.repair_id, label=REPAIR_DELTA_INFO)
                assert plain is not None
                values[bytes(d.sender)] = plain
        sigma = repair_share_step_2(values, suite=r.a.suite)
        out.append(
            helper.seal(r.participant[0], sigma, repair_id=r.repair_id, label=REPAIR_SIGMA_INFO)
        )
    return out


def restore(r: Repair, sigmas: Sequence[Any]) -> bytearray:
    opened = {}
    for s in sigmas:
        plain = r.lost.open(s, repair_id=r.repair_id, label=REPAIR_SIGMA_INFO)
        assert plain is not None, s.sender
        opened[bytes(s.sender)] = plain
    return repair_share_step_3(
        opened,
        r.participant[0],
        suite=r.a.suite,
        verifying_share=r.a.verifying_shares[r.participant[0]],
    )


async def full_repair(node: Node, r: Repair) -> bytearray:
    s1 = await step1(node, r)
    answer = await node.call(
        "RepairStep2", pb.RepairStep2Request(repair_id=r.repair_id, deltas=to_enclave(s1))
    )
    return restore(r, [answer.sigma, *local_sigmas(s1)])


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize(("t", "n"), [(3, 4), (2, 4)])
async def test_three_helpers_with_the_enclave_restore_the_lost_share(
    suite: str, t: int, n: int
) -> None:
    async with lifecycle_enclave() as node:
        a = await create_account(node, suite, t=t, n=n)
        r = plan(a)
        assert len(r.helpers) == 3
        assert "enclave" in dict(r.helpers).values()
        lost_id = r.participant[0]
        original = bytes(a.keys[lost_id])
        repaired = await full_repair(node, r)
        assert bytes(repaired) == original
        # nothing stored and nothing held on the enclave side
        assert node.writer.operations == ["create"]
        session = node.registry.repairs[r.repair_id]
        assert session.state is DkgState.DONE
        assert not any(session.own_delta)
        assert not any(session.x25519_secret)
        node.nothing_left()
        # the repaired share signs with the enclave (and another helper when t = 3)
        others = [i for i, k in r.helpers if k != "enclave"][: t - 2]
        signers = {lost_id: repaired, **{i: a.keys[i] for i in others}}
        assert await sign_via(node, a, signers, a.verifying_shares)


async def test_retries_are_idempotent_and_a_second_repair_works() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        r = plan(a)
        s1 = await step1(node, r)
        # a retry (fresh approvals, same parameters and keys) returns the same answer
        assert await node.call("RepairStep1", r.step1_request()) == s1.answer
        # the same repair_id with other parameters is refused
        other = plan(a, lost_at=0, repair_id=r.repair_id)
        await node.refused("ALREADY_EXISTS", "RepairStep1", other.step1_request())
        answer = await node.call(
            "RepairStep2", pb.RepairStep2Request(repair_id=r.repair_id, deltas=to_enclave(s1))
        )
        lost = bytes(a.keys[r.participant[0]])
        assert bytes(restore(r, [answer.sigma, *local_sigmas(s1)])) == lost
        # a second repair under another id (new keys, new deltas) restores the same share
        assert bytes(await full_repair(node, plan(a, repair_id="repair-2"))) == lost
        # and another participant's share too
        first = plan(a, lost_at=0, repair_id="repair-3")
        assert bytes(await full_repair(node, first)) == bytes(a.keys[a.participants[0][0]])


async def test_step2_retry_returns_the_same_sigma_and_other_deltas_are_refused() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, SUITES[1], t=2, n=4)
        r = plan(a)
        s1 = await step1(node, r)
        request = pb.RepairStep2Request(repair_id=r.repair_id, deltas=to_enclave(s1))
        answer = await node.call("RepairStep2", request)
        assert await node.call("RepairStep2", request) == answer
        swapped = pb.RepairStep2Request(repair_id=r.repair_id, deltas=to_enclave(s1)[::-1])
        await node.refused("FAILED_PRECONDITION", "RepairStep2", swapped)
        assert bytes(restore(r, [answer.sigma, *local_sigmas(s1)])) == bytes(
            a.keys[r.participant[0]]
        )


# -- a relaying gateway ---------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
async def test_substituted_keys_and_deltas_are_named(suite: str) -> None:
    async with lifecycle_enclave() as node:
        a = await create_account(node, suite, t=2, n=4)
        r = plan(a)
        target = r.local_helpers[0]
        who = a.group.describe_identifier(target.identifier)
        good = r.signed_key(target)
        forged = {
            "changed encryption key": pb.RepairKey(
                identifier=good.identifier,
                encryption_key=_kdf.x25519_keypair(bytearray(32)),
                key_id=good.key_id,
                signature=good.signature,
            ),
            "signed by an unpinned key": r.signed_key(target, signing_key=UNPINNED),
            "signed for another repair": r.signed_key(target, repair_id="another"),
            "another participant's key id": pb.RepairKey(
                identifier=good.identifier,
                encryption_key=good.encryption_key,
                key_id=r.lost.key_id,
                signature=good.signature,
            ),
        }
        for name, key in forged.items():
            keys = [key if k.identifier == target.identifier else k for k in r.signed_keys()]
            details = await node.refused(
                "INVALID_ARGUMENT", "RepairStep1", r.step1_request(keys=keys)
            )
            assert f"participant {who}" in details, name
            assert r.repair_id not in node.registry.repairs, name
        node.nothing_left()
        s1 = await step1(node, r)
        good_deltas = to_enclave(s1)
        sender = good_deltas[0]
        flipped = bytearray(sender.ciphertext)
        flipped[40] ^= 1
        a_, b_ = r.local_helpers
        moved = next(
            d for d in s1.local_deltas if d.sender == a_.identifier and d.recipient == b_.identifier
        )
        enclave_id = a.enclave_identifier
        key = a_.box(enclave_id, sending=True, repair_id=r.repair_id, label=SHARE_INFO)
        dkg_labelled = encrypt_share(
            key, bytes(32), dkg_id=r.repair_id, sender=a_.identifier, recipient=enclave_id
        )
        bad = {
            "bit flip": pb.DkgEncryptedShare(
                sender=sender.sender, recipient=sender.recipient, ciphertext=bytes(flipped)
            ),
            "moved from another recipient": pb.DkgEncryptedShare(
                sender=moved.sender, recipient=enclave_id, ciphertext=moved.ciphertext
            ),
            "a DKG share's key": pb.DkgEncryptedShare(
                sender=a_.identifier, recipient=enclave_id, ciphertext=dkg_labelled
            ),
        }
        for name, delta in bad.items():
            deltas = [delta if d.sender == delta.sender else d for d in good_deltas]
            details = await node.refused(
                "INVALID_ARGUMENT",
                "RepairStep2",
                pb.RepairStep2Request(repair_id=r.repair_id, deltas=deltas),
            )
            assert a.group.describe_identifier(bytes(delta.sender)) in details, name
            assert "fails authentication" in details, name
            assert node.registry.repairs[r.repair_id].state is DkgState.ROUND1_SENT
        # the enclave's deltas are bound to their recipient: relabelled, they do not open
        to_a = next(d for d in s1.answer.deltas if d.recipient == a_.identifier)
        relabelled = pb.DkgEncryptedShare(
            sender=to_a.sender, recipient=b_.identifier, ciphertext=to_a.ciphertext
        )
        assert b_.open(relabelled, repair_id=r.repair_id, label=REPAIR_DELTA_INFO) is None
        answer = await node.call(
            "RepairStep2", pb.RepairStep2Request(repair_id=r.repair_id, deltas=good_deltas)
        )
        # sigma opens only for the participant, only as a sigma
        assert a_.open(answer.sigma, repair_id=r.repair_id, label=REPAIR_SIGMA_INFO) is None
        assert r.lost.open(answer.sigma, repair_id=r.repair_id, label=REPAIR_DELTA_INFO) is None
        restored = restore(r, [answer.sigma, *local_sigmas(s1)])
        assert bytes(restored) == bytes(a.keys[r.participant[0]])


# -- policy, parameters, bounds -------------------------------------------------------------------


async def test_repair_needs_approvals_under_the_repair_policy() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        r = plan(a)
        await node.refused("PERMISSION_DENIED", "RepairStep1", r.step1_request(("ops-1",)))
        refresh_params = Refresh(a, r.repair_id).params
        stale = r.step1_request(approvals=r.approvals("ops-1", "ops-2", params=refresh_params))
        await node.refused("PERMISSION_DENIED", "RepairStep1", stale)
        assert r.repair_id not in node.registry.repairs
        node.nothing_left()
    async with lifecycle_enclave(over_grpc=False, repair=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        details = await node.refused("PERMISSION_DENIED", "RepairStep1", plan(a).step1_request())
        assert "unknown_policy" in details
        node.nothing_left()


async def test_repair_parameters_are_checked() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=3, n=4)
        r = plan(a)
        enclave_entry = next(p for p in a.participants if p[1] == "enclave")
        cases: dict[str, tuple[str, dict[str, Any]]] = {
            "never repaired": (
                "INVALID_ARGUMENT",
                {"participant": pb.DkgParticipant(identifier=enclave_entry[0], key_id="enclave")},
            ),
            "min_signers..max_signers - 1": (
                "INVALID_ARGUMENT",
                {"helpers": [pb.DkgParticipant(identifier=i, key_id=k) for i, k in r.helpers[:2]]},
            ),
            "ascending": (
                "INVALID_ARGUMENT",
                {
                    "helpers": [
                        pb.DkgParticipant(identifier=i, key_id=k) for i, k in r.helpers[::-1]
                    ]
                },
            ),
            "not pinned": (
                "INVALID_ARGUMENT",
                {"participant": pb.DkgParticipant(identifier=r.participant[0], key_id="stranger")},
            ),
            "keys must hold": ("INVALID_ARGUMENT", {"keys": r.signed_keys()[:1]}),
            "does not exist": ("NOT_FOUND", {"account_id": "nobody"}),
        }
        # lists over their bounds are refused before any key or approval is read
        request = r.step1_request()
        for word, change in [
            ("at most 64 helpers", {"helpers": [request.helpers[0]] * 65}),
            ("at most 64 helpers and keys", {"keys": [request.keys[0]] * 65}),
            ("at most 256 approvals", {"approvals": [request.approvals[0]] * 257}),
        ]:
            details = await node.refused(
                "INVALID_ARGUMENT", "RepairStep1", r.step1_request(**change)
            )
            assert word in details, details
        for word, (code, change) in cases.items():
            details = await node.refused(code, "RepairStep1", r.step1_request(**change))
            assert word in details, details
        node.nothing_left()
        assert "unknown or expired" in await node.refused(
            "NOT_FOUND", "RepairStep2", pb.RepairStep2Request(repair_id="nope")
        )


async def test_one_lifecycle_operation_per_account_at_a_time() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        r = plan(a)
        await node.call("RepairStep1", r.step1_request())
        details = await node.refused(
            "ALREADY_EXISTS", "DkgRound1", Refresh(a, "refresh-now").round1_request()
        )
        assert r.repair_id in details
        await node.refused(
            "ALREADY_EXISTS", "RepairStep1", plan(a, repair_id="repair-2").step1_request()
        )


async def test_max_open_counts_repairs_with_dkgs() -> None:
    toml = lifecycle_toml(max_open=1)
    async with lifecycle_enclave(over_grpc=False, toml=toml) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        b = await create_account(node, SUITES[1], t=2, n=4)
        await node.call("RepairStep1", plan(a).step1_request())
        assert node.pool.open_sessions == 1
        details = await node.refused(
            "RESOURCE_EXHAUSTED", "RepairStep1", plan(b, repair_id="r-b").step1_request()
        )
        assert "max_open" in details


async def test_expiry_zeroes_a_repair(autojump_clock: trio.testing.MockClock) -> None:
    async with lifecycle_enclave(over_grpc=False, ttl_s=60.0) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        r = plan(a)
        s1 = await step1(node, r)
        session = node.registry.repairs[r.repair_id]
        assert any(session.own_delta)
        assert any(session.x25519_secret)
        assert node.pool.open_sessions == 1
        start = trio.current_time()
        await trio.sleep(60)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() - start == 60
        assert session.state is DkgState.EXPIRED
        assert not any(session.own_delta)
        assert not any(session.x25519_secret)
        assert r.repair_id not in node.registry.repairs
        node.nothing_left()
        assert "expired" in await node.refused(
            "NOT_FOUND",
            "RepairStep2",
            pb.RepairStep2Request(repair_id=r.repair_id, deltas=to_enclave(s1)),
        )


async def test_a_done_repair_is_forgotten_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with lifecycle_enclave(over_grpc=False, ttl_s=60.0) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        r = plan(a)
        s1 = await step1(node, r)
        await node.call(
            "RepairStep2", pb.RepairStep2Request(repair_id=r.repair_id, deltas=to_enclave(s1))
        )
        node.nothing_left()  # the slot is back at once
        assert node.registry.repairs[r.repair_id].state is DkgState.DONE
        await trio.sleep(60)
        await trio.testing.wait_all_tasks_blocked()
        assert r.repair_id not in node.registry.repairs


async def test_shutdown_zeroes_open_repairs() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        r = plan(a)
        await node.call("RepairStep1", r.step1_request())
        session = node.registry.repairs[r.repair_id]
    assert session.state is DkgState.EXPIRED
    assert not any(session.own_delta)
    assert not any(session.x25519_secret)
    assert repr(session) == (
        f"<RepairSession 'repair-1' expired account={a.account_id!r} {ED25519} helpers=3>"
    )


async def test_a_share_changed_since_step1_fails_the_repair() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        r = plan(a)
        s1 = await step1(node, r)
        session = node.registry.repairs[r.repair_id]
        # another replica's refresh of the account lands in between (a pushed delta)
        scalar = bytearray(32)
        a.group.random_scalar(scalar)
        replaced = ShareRecord(
            a.account_id,
            a.enclave_identifier,
            scalar,
            a.group.base_mult(scalar),
            a.group_public_key,
            2,
            4,
            ciphersuite=ED25519,
        )
        await ApplyingWriter.store(node.writer, [replaced], "refresh", "elsewhere")
        details = await node.refused(
            "FAILED_PRECONDITION",
            "RepairStep2",
            pb.RepairStep2Request(repair_id=r.repair_id, deltas=to_enclave(s1)),
        )
        assert "changed since step 1" in details
        assert session.state is DkgState.FAILED
        assert not any(session.own_delta)
        assert not any(session.x25519_secret)
        node.nothing_left()


async def test_a_draining_enclave_opens_no_repair() -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        node.service.start_draining()
        assert "draining" in await node.refused(
            "UNAVAILABLE", "RepairStep1", plan(a).step1_request()
        )
        node.nothing_left()


async def test_without_a_registry_the_repair_rpcs_are_refused() -> None:
    store = empty_store()
    try:
        client = DirectClient(SignService(store, SessionPool(store.get)))
        details = await client.refused(
            "FAILED_PRECONDITION", "RepairStep2", pb.RepairStep2Request(repair_id="r")
        )
        assert "no DKG" in details
    finally:
        store.close()
