"""DKG between the enclave and ZF FROST (the ``frost-rs`` 1.0.0 binding), then signing (issue 16).

The enclave is the real ``SignService`` behind a real gRPC server on loopback, called with a
stock grpcio client, exactly as in ``tests/test_enclave_dkg.py`` (its fake delta writer applies
the new record to the share store); every other participant is frost-rs running ZF's
``part1``/``part2``/``part3``. The test is the relaying gateway between two wire formats:

* round 1: each frost-rs package (VSS commitment and proof of knowledge, ZF's serialization)
  becomes a ``DkgRound1Package`` signed by that participant's key pinned in ``enclave.toml``,
  with an X25519 key the harness holds for it; the enclave's package (its signature checked
  under the identity key) goes to frost-rs in ZF's serialization;
* round 2: frost-rs encrypts its shares with its own scheme (AES-GCM under a key from
  ``a_i0 * phi_l0``, see :mod:`trio_sign.testing._frost_rs`); the harness reads ``a_i0`` from
  the frost-rs participant's round-1 secret, opens the share meant for the enclave and
  re-encrypts it per the contract (X25519, HKDF-SHA256, XChaCha20-Poly1305); the enclave's
  shares for a frost-rs participant are opened with the harness's X25519 key and re-encrypted
  in frost-rs's scheme; frost-rs-to-frost-rs ciphertexts pass through untouched;
* round 3: frost-rs's ``part3`` and the enclave's ``DkgRound3`` must agree on the group key and
  every verifying share.

Then the enclave's ``Commit``/``Sign`` and frost-rs signers sign one message; frost-rs and our
``Scheme.aggregate`` must produce the same signature, which the suite's independent verifier
(libsodium for Ed25519, RFC 9591 for plain secp256k1) and frost-rs's ``verify`` accept.

frost-rs has no Taproot suite (``tests/test_frost_rs_interop.py`` pins its exports), so the
Taproot DKG is covered against ZF's vectors and our own participants only.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from proto_min import sign_service_pb2 as pb
from trio_sign.cli._demo import verify_independently
from trio_sign.crypto import _dkg, _kdf, scheme_by_name
from trio_sign.crypto._group import group_for
from trio_sign.enclave._dkg import (
    DkgState,
    decrypt_share_into,
    encrypt_share,
    round1_payload,
    share_key_into,
    verify_ed25519,
)
from trio_sign.parent._deltas import delta_fingerprint
from trio_sign.testing import _frost_rs as zf

from .test_enclave_dkg import (
    PARTICIPANT_KEYS,
    Ceremony,
    Node,
    ceremony,
    enclave,
    real_writer_enclave,
)

frost_rs = pytest.importorskip("frost_rs", reason="the frost-rs wheel (test extra) is missing")

ED25519 = "FROST-ED25519-SHA512-v1"
SECP256K1 = "FROST-secp256k1-SHA256-v1"
UTILITY = {ED25519: "utility_ed25519", SECP256K1: "utility_secp256k1"}


def _zero(*buffers: bytearray) -> None:
    for b in buffers:
        b[:] = bytes(len(b))


@dataclass
class ZfParticipant:
    """One participant run by frost-rs; the harness holds its pinned signing key and its
    X25519 key for the contract's envelopes (a real deployment's participant holds both)."""

    suite: str
    identifier: bytes
    key_id: str
    signing_key: nacl.signing.SigningKey = field(repr=False)
    x_secret: bytearray = field(default_factory=lambda: bytearray(32), repr=False)
    x_public: bytes = b""
    r1_secret: str = field(default="", repr=False)
    r1_text: str = ""
    a0: bytearray = field(default_factory=bytearray, repr=False)
    r2_secret: str = field(default="", repr=False)
    r2_out: dict[str, str] = field(default_factory=dict, repr=False)
    key_package: str = field(default="", repr=False)
    public_package: str = ""

    @property
    def m(self) -> Any:
        return getattr(frost_rs, UTILITY[self.suite])

    @property
    def b64(self) -> str:
        return zf.b64encode(self.identifier)

    def close(self) -> None:
        _zero(self.x_secret, self.a0)


@dataclass
class Relay:
    """The relaying gateway between the enclave's contract and frost-rs's packages."""

    c: Ceremony
    node: Node
    zfs: list[ZfParticipant]
    enclave_package: Any = None
    enclave_text: str = ""
    answer: Any = None

    @property
    def m(self) -> Any:
        return getattr(frost_rs, UTILITY[self.c.suite])

    @property
    def enclave_b64(self) -> str:
        return zf.b64encode(self.c.enclave_identifier)

    @property
    def enclave_phi0(self) -> bytes:
        return bytes(self.enclave_package.commitment[0])

    def sign_round1(self, p: ZfParticipant, package: _dkg.Round1Package) -> Any:
        """``package`` as a contract round-1 package, signed by ``p``'s pinned key."""
        c = self.c
        commitment = list(package.commitment)
        payload = round1_payload(
            c.dkg_id,
            c.account_id,
            c.params_sha256,
            p.identifier,
            commitment,
            package.proof_of_knowledge,
            p.x_public,
        )
        return pb.DkgRound1Package(
            identifier=p.identifier,
            commitment=commitment,
            proof_of_knowledge=package.proof_of_knowledge,
            encryption_key=p.x_public,
            key_id=p.key_id,
            signature=p.signing_key.sign(payload).signature,
        )

    async def round1(self) -> list[Any]:
        """The enclave's round 1 and frost-rs's ``part1`` for every other participant; returns
        the frost-rs packages converted for the enclave."""
        c = self.c
        got = await self.node.call("DkgRound1", c.round1_request())
        self.enclave_package = p = got.package
        payload = round1_payload(
            c.dkg_id,
            c.account_id,
            c.params_sha256,
            bytes(p.identifier),
            list(p.commitment),
            p.proof_of_knowledge,
            p.encryption_key,
        )
        assert p.key_id == "enclave"
        assert verify_ed25519(self.node.identity.public_key, payload, p.signature)
        self.enclave_text = zf.encode_round1_package(
            c.suite, _dkg.Round1Package(tuple(p.commitment), p.proof_of_knowledge)
        )
        converted = []
        for z in self.zfs:
            z.x_public = _kdf.x25519_keypair(z.x_secret)
            z.r1_secret, z.r1_text = self.m.round1(z.b64, c.min_signers, c.max_signers)
            z.a0 = zf.round1_secret_coefficient(c.suite, z.r1_secret)
            package = zf.decode_round1_package(c.suite, z.r1_text)
            assert zf.encode_round1_package(c.suite, package) == z.r1_text
            converted.append(self.sign_round1(z, package))
        return converted

    def round1_for(self, z: ZfParticipant) -> dict[str, str]:
        """Every other participant's round-1 package, in frost-rs's form, for ``z``."""
        packages = {o.b64: o.r1_text for o in self.zfs if o is not z}
        packages[self.enclave_b64] = self.enclave_text
        return packages

    async def round2(self, packages: list[Any]) -> list[Any]:
        """The enclave's round 2 with ``packages``, frost-rs's ``part2`` for each other
        participant; returns the enclave's encrypted shares."""
        c = self.c
        got = await self.node.call(
            "DkgRound2", pb.DkgRound2Request(dkg_id=c.dkg_id, packages=packages)
        )
        # frost-rs checks every proof of knowledge here, the enclave's included (it panics
        # through pyo3 on one that fails)
        for z in self.zfs:
            z.r2_secret, z.r2_out = self.m.round2(z.r1_secret, self.round1_for(z))
            assert set(z.r2_out) == set(self.round1_for(z))
        return list(got.shares)

    def to_enclave(self, z: ZfParticipant) -> Any:
        """frost-rs's share from ``z`` to the enclave, opened and sealed per the contract."""
        c = self.c
        key = zf.transport_key(c.suite, z.a0, self.enclave_phi0)
        share = zf.decrypt_round2(key, z.r2_out[self.enclave_b64])
        x_key = bytearray(32)
        try:
            share_key_into(
                x_key,
                dkg_id=c.dkg_id,
                sender=z.identifier,
                recipient=c.enclave_identifier,
                own_secret=z.x_secret,
                sender_public=z.x_public,
                recipient_public=bytes(self.enclave_package.encryption_key),
                peer_public=bytes(self.enclave_package.encryption_key),
            )
            ciphertext = encrypt_share(
                x_key,
                share.signing_share,
                dkg_id=c.dkg_id,
                sender=z.identifier,
                recipient=c.enclave_identifier,
            )
        finally:
            _zero(key, x_key)
            share.zero()
        return pb.DkgEncryptedShare(
            sender=z.identifier, recipient=c.enclave_identifier, ciphertext=ciphertext
        )

    def from_enclave(self, z: ZfParticipant, shares: list[Any]) -> str:
        """The enclave's share for ``z``, opened with ``z``'s X25519 key and sealed in
        frost-rs's scheme."""
        c = self.c
        (mine,) = [s for s in shares if bytes(s.recipient) == z.identifier]
        assert bytes(mine.sender) == c.enclave_identifier
        x_key = bytearray(32)
        plain = bytearray(c.group.scalar_size)
        key = zf.transport_key(c.suite, z.a0, self.enclave_phi0)
        try:
            share_key_into(
                x_key,
                dkg_id=c.dkg_id,
                sender=c.enclave_identifier,
                recipient=z.identifier,
                own_secret=z.x_secret,
                sender_public=bytes(self.enclave_package.encryption_key),
                recipient_public=z.x_public,
                peer_public=bytes(self.enclave_package.encryption_key),
            )
            assert decrypt_share_into(
                plain,
                x_key,
                bytes(mine.ciphertext),
                dkg_id=c.dkg_id,
                sender=c.enclave_identifier,
                recipient=z.identifier,
            )
            return zf.encrypt_round2(key, _dkg.Round2Package(plain))
        finally:
            _zero(key, x_key, plain)

    async def round3(self, enclave_shares: list[Any]) -> Any:
        """frost-rs's ``part3`` for each participant, then the enclave's round 3."""
        c = self.c
        for z in self.zfs:
            received = {o.b64: o.r2_out[z.b64] for o in self.zfs if o is not z}
            received[self.enclave_b64] = self.from_enclave(z, enclave_shares)
            z.key_package, z.public_package = self.m.round3(
                z.r2_secret, self.round1_for(z), received
            )
        self.answer = await self.node.call(
            "DkgRound3",
            pb.DkgRound3Request(dkg_id=c.dkg_id, shares=[self.to_enclave(z) for z in self.zfs]),
        )
        return self.answer

    async def run(self) -> Any:
        packages = await self.round1()
        shares = await self.round2(packages)
        return await self.round3(shares)

    def close(self) -> None:
        for z in self.zfs:
            z.close()


def relay(node: Node, c: Ceremony) -> Relay:
    zfs = [
        ZfParticipant(c.suite, ident, key_id, PARTICIPANT_KEYS[key_id])
        for ident, key_id in c.participants
        if key_id != "enclave"
    ]
    return Relay(c, node, zfs)


def check_agreement(r: Relay) -> None:
    """frost-rs's part3 outputs and the enclave's DkgRound3 name one group key and the same
    verifying share for every participant."""
    c, a = r.c, r.answer
    order = c.group.identifier_from_bytes
    assert (a.account_id, a.ciphersuite, a.identifier) == (
        c.account_id,
        c.suite,
        c.enclave_identifier,
    )
    answered = [(bytes(v.identifier), bytes(v.verifying_share)) for v in a.verifying_shares]
    assert [i for i, _ in answered] == sorted((i for i, _ in c.participants), key=order)
    assert dict(answered)[c.enclave_identifier] == a.verifying_share
    for z in r.zfs:
        key = zf.decode_key_package(c.suite, z.key_package)
        try:
            assert key.identifier == z.identifier
            assert key.verifying_key == a.group_public_key
            assert key.verifying_share == dict(answered)[z.identifier]
            assert key.min_signers == c.min_signers
        finally:
            key.zero()
        public = zf.decode_public_key_package(c.suite, z.public_package, c.min_signers)
        assert public.verifying_key == a.group_public_key
        assert dict(public.verifying_shares) == dict(answered)


async def sign(r: Relay, signers: list[ZfParticipant], session_id: str) -> bytes:
    """The enclave's Commit/Sign beside frost-rs signers; aggregated by frost-rs and by us (the
    same bytes), verified by the suite's independent verifier and by frost-rs."""
    c, a, m = r.c, r.answer, r.m
    scheme = scheme_by_name(c.suite)
    message = secrets.token_bytes(48)
    got = await r.node.call(
        "Commit", pb.CommitRequest(account_id=c.account_id, session_id=session_id)
    )
    commitments = {
        bytes(got.identifier): scheme.commitment(got.identifier, got.hiding, got.binding)
    }
    zf_comms = {r.enclave_b64: zf.encode_commitments(c.suite, got.hiding, got.binding)}
    zf_nonces = {}
    for z in signers:
        zf_nonces[z.b64], zf_comms[z.b64] = m.preprocess(z.key_package)
        hiding, binding = zf.decode_commitments(c.suite, zf_comms[z.b64])
        commitments[z.identifier] = scheme.commitment(z.identifier, hiding, binding)
    order = c.group.identifier_from_bytes
    ordered = [commitments[i] for i in sorted(commitments, key=order)]
    signed = await r.node.call(
        "Sign",
        pb.SignRequest(
            session_id=session_id,
            message=message,
            commitments=[
                pb.SigningCommitment(identifier=x.identifier, hiding=x.hiding, binding=x.binding)
                for x in ordered
            ],
        ),
    )
    shares = {bytes(signed.identifier): bytes(signed.signature_share)}
    for z in signers:
        shares[z.identifier] = zf.b64decode(
            m.sign(message, zf_comms, zf_nonces[z.b64], z.key_package)
        )
    public_text = r.zfs[0].public_package
    theirs = zf.b64decode(
        m.aggregate(
            message,
            zf_comms,
            {zf.b64encode(i): zf.b64encode(s) for i, s in shares.items()},
            public_text,
        )
    )
    verifying = {bytes(v.identifier): bytes(v.verifying_share) for v in a.verifying_shares}
    ours: bytes = scheme.aggregate(
        commitments=ordered,
        message=message,
        group_public_key=a.group_public_key,
        signature_shares=shares,
        verifying_shares={i: verifying[i] for i in shares},
        merkle_root=None,
    )
    assert theirs == ours
    assert verify_independently(scheme, a.group_public_key, message, ours, None)
    assert m.verify(message, public_text, zf.b64encode(ours))
    assert not verify_independently(scheme, a.group_public_key, message + b"!", ours, None)
    return ours


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", [ED25519, SECP256K1])
@pytest.mark.parametrize(("t", "n", "enclave_at"), [(2, 3, 2), (3, 4, 4)])
async def test_dkg_with_the_enclave_and_frost_rs_participants_then_sign(
    suite: str, t: int, n: int, enclave_at: int
) -> None:
    async with enclave() as node:
        c = ceremony(suite, t=t, n=n, enclave_at=enclave_at, dkg_id=f"zf-{t}-{n}")
        r = relay(node, c)
        try:
            await r.run()
            check_agreement(r)
            assert r.answer.delta_sequence == 1
            assert node.writer.operations == ["create"]
            assert node.registry.sessions[c.dkg_id].state is DkgState.DONE
            node.nothing_left()
            account = await node.call("GetAccount", pb.GetAccountRequest(account_id=c.account_id))
            assert account.group_public_key == r.answer.group_public_key
            assert (account.min_signers, account.max_signers) == (t, n)
            # two different quorums, each the enclave beside t - 1 frost-rs signers
            first = await sign(r, r.zfs[: t - 1], "s-zf-1")
            second = await sign(r, r.zfs[-(t - 1) :], "s-zf-2")
            assert first != second
        finally:
            r.close()


@pytest.mark.parametrize("suite", [ED25519, SECP256K1])
async def test_frost_rs_package_with_an_altered_proof_is_refused_naming_its_sender(
    suite: str,
) -> None:
    """The harness changes z in one frost-rs participant's proof of knowledge (still a
    canonical scalar) and signs the package with that participant's pinned key, so only the
    proof is wrong: the enclave refuses round 2 naming that participant, and the DKG leaves
    nothing behind."""
    async with enclave() as node:
        c = ceremony(suite, t=2, n=3, enclave_at=1, dkg_id="zf-bad-pok")
        r = relay(node, c)
        try:
            packages = await r.round1()
            cheat = r.zfs[1]
            honest = zf.decode_round1_package(suite, cheat.r1_text)
            proof = bytearray(honest.proof_of_knowledge)
            proof[-1 if suite == SECP256K1 else 32] ^= 1  # z's low byte
            packages[1] = r.sign_round1(cheat, _dkg.Round1Package(honest.commitment, bytes(proof)))
            session = node.registry.sessions[c.dkg_id]
            details = await node.refused(
                "INVALID_ARGUMENT",
                "DkgRound2",
                pb.DkgRound2Request(dkg_id=c.dkg_id, packages=packages),
            )
            assert f"participant {c.group.describe_identifier(cheat.identifier)}" in details
            assert "proof of knowledge" in details
            assert f"participant {c.group.describe_identifier(r.zfs[0].identifier)}" not in details
            assert session.state is DkgState.FAILED
            assert node.writer.calls == 0
            node.nothing_left()
            await node.refused(
                "NOT_FOUND", "GetAccount", pb.GetAccountRequest(account_id=c.account_id)
            )
        finally:
            r.close()


@pytest.mark.parametrize("suite", [ED25519, SECP256K1])
def test_the_harness_reads_frost_rs_transport_as_frost_rs_does(suite: str) -> None:
    """The helpers the relay relies on, checked against frost-rs alone: ``a_i0`` read from a
    round-1 secret is the discrete log of that participant's ``phi_0``; both ends derive one
    transport key; and the share opened from a frost-rs ciphertext lies on its sender's
    commitment (``share * G == sum phi_k * x^k``)."""
    m = getattr(frost_rs, UTILITY[suite])
    group = group_for(suite)
    ids = [group.identifier_to_bytes(v) for v in (1, 2, 3)]
    r1 = {i: m.round1(zf.b64encode(i), 2, 3) for i in ids}
    a0 = {i: zf.round1_secret_coefficient(suite, r1[i][0]) for i in ids}
    packages = {i: zf.decode_round1_package(suite, r1[i][1]) for i in ids}
    try:
        for i in ids:
            assert group.base_mult(a0[i]) == packages[i].verifying_key
        a, b, _ = ids
        r2 = m.round2(r1[a][0], {zf.b64encode(j): r1[j][1] for j in ids if j != a})[1]
        key = zf.transport_key(suite, a0[a], packages[b].verifying_key)
        other_end = zf.transport_key(suite, a0[b], packages[a].verifying_key)
        assert key == other_end
        share = zf.decrypt_round2(key, r2[zf.b64encode(b)])
        expected = group.evaluate_commitment(
            packages[a].commitment, group.identifier_from_bytes(b), "commitment"
        )
        assert group.base_mult(share.signing_share) == expected
        share.zero()
        _zero(key, other_end)
        with pytest.raises(ValueError, match="frost-rs"):
            zf.round1_secret_coefficient(suite, zf.b64encode(b'{"id": "x"}'))
    finally:
        _zero(*a0.values())


@pytest.mark.parametrize("suite", [ED25519, SECP256K1])
async def test_dkg_with_frost_rs_stored_by_the_real_delta_writer_then_sign(
    suite: str, tmp_path: Path
) -> None:
    """The same DKG with the new share sealed into a real delta that the parent's file store
    holds durably before DkgRound3 answers; the account signs with frost-rs signers."""
    async with real_writer_enclave(tmp_path, over_grpc=True) as real:
        node = real.node
        c = ceremony(suite, t=2, n=3, enclave_at=3, dkg_id="zf-real")
        r = relay(node, c)
        try:
            await r.run()
            check_agreement(r)
            assert r.answer.delta_sequence == 1
            stored = (tmp_path / "deltas" / "delta-00000001.enc").read_bytes()
            assert delta_fingerprint(stored, 1) == r.answer.deltas_head
            node.nothing_left()
            await sign(r, r.zfs[:1], "s-zf-real-1")
            await sign(r, r.zfs[1:], "s-zf-real-2")
        finally:
            r.close()
