"""Interop with ZF FROST through the ``frost-rs`` 1.0.0 binding (an independent oracle).

(a) Plain FROST(secp256k1, SHA-256) signing both ways: ZF's dealer shares signed by our
``_secp256k1`` commit/sign beside ZF signers in one session, aggregated by ZF and by us; and
our DKG shares (and our Ed25519 dealer's) used by ZF signers. (b) DKG with our ``_dkg`` as one
participant and frost-rs as the others, for secp256k1 and Ed25519, then signing with the result.

``frost-rs`` 1.0.0 exposes secp256k1, Ed25519, Ed448, P-256 and ristretto255 but not ZF's
``FROST-secp256k1-SHA256-TR-v1``: the Taproot suite is checked against ZF's vectors only
(``tests/test_dkg_vectors.py``, ``tests/test_frost_secp256k1_tr.py``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import pytest

from trio_sign.crypto import _dkg, _frost
from trio_sign.crypto import _secp256k1 as k1
from trio_sign.crypto._group import group_for
from trio_sign.testing import _frost_rs as zf

from .dkg_helpers import ED25519, SECP256K1, run_dkg, sort_ids

frost_rs = pytest.importorskip("frost_rs", reason="the frost-rs wheel (test extra) is missing")

UTILITY = {SECP256K1: "utility_secp256k1", ED25519: "utility_ed25519"}


def _module(suite: str) -> Any:
    return getattr(frost_rs, UTILITY[suite])


def test_frost_rs_has_no_taproot_suite() -> None:
    names = set(frost_rs.__all__)
    assert names == {
        "utility_secp256k1",
        "utility_ed448",
        "utility_ed25519",
        "utility_p256",
        "utility_ristretto255",
    }


# -- a mixed signing session --------------------------------------------------------------------


class Session:
    """One message signed by ``ours`` (our commit/sign, secret shares in buffers) and ``theirs``
    (frost-rs key packages), aggregated both by frost-rs and by us."""

    def __init__(
        self,
        suite: str,
        ours: dict[bytes, bytearray],
        theirs: dict[bytes, str],
        verifying_key: bytes,
        public: _dkg.PublicKeyPackage,
    ) -> None:
        self.suite = suite
        self.m = _module(suite)
        self.ours = ours
        self.theirs = theirs
        self.verifying_key = verifying_key
        self.public = public
        self.message = secrets.token_bytes(40)

    def run(self) -> tuple[bytes, bytes]:
        """Returns (frost-rs's aggregate, ours)."""
        suite = self.suite
        group = group_for(suite)
        order = sort_ids(group, [*self.ours, *self.theirs])
        zf_nonces: dict[bytes, str] = {}
        zf_comms: dict[str, str] = {}
        our_nonces: dict[bytes, Any] = {}
        commitments: dict[bytes, Any] = {}
        for ident in order:
            if ident in self.theirs:
                nonce, comm = self.m.preprocess(self.theirs[ident])
                zf_nonces[ident] = nonce
                zf_comms[zf.b64encode(ident)] = comm
                hiding, binding = zf.decode_commitments(suite, comm)
                commitments[ident] = (
                    _frost.SigningCommitment(ident, hiding, binding)
                    if suite == ED25519
                    else k1.SigningCommitment(ident, hiding, binding)
                )
            else:
                if suite == ED25519:
                    nonces: Any = _frost.commit(ident, self.ours[ident])
                else:
                    nonces = k1.commit(ident, self.ours[ident])
                our_nonces[ident] = nonces
                commitments[ident] = nonces.commitment
                zf_comms[zf.b64encode(ident)] = zf.encode_commitments(
                    suite, nonces.commitment.hiding, nonces.commitment.binding
                )
        clist = [commitments[i] for i in order]
        shares: dict[bytes, bytes] = {}
        for ident in order:
            if ident in self.theirs:
                share = self.m.sign(self.message, zf_comms, zf_nonces[ident], self.theirs[ident])
                shares[ident] = zf.b64decode(share)
            elif suite == ED25519:
                shares[ident] = _frost.sign(
                    our_nonces[ident],
                    signing_share=self.ours[ident],
                    group_public_key=self.verifying_key,
                    message=self.message,
                    commitments=clist,
                )
            else:
                shares[ident] = k1.sign(
                    our_nonces[ident],
                    signing_share=self.ours[ident],
                    group_public_key=self.verifying_key,
                    message=self.message,
                    commitments=clist,
                )
        theirs = zf.b64decode(
            self.m.aggregate(
                self.message,
                zf_comms,
                {zf.b64encode(i): zf.b64encode(s) for i, s in shares.items()},
                zf.encode_public_key_package(self.public),
            )
        )
        verifying = dict(self.public.verifying_shares)
        if suite == ED25519:
            mine = _frost.aggregate(
                commitments=clist,
                message=self.message,
                group_public_key=self.verifying_key,
                signature_shares=shares,
                verifying_shares=verifying,
            )
        else:
            mine = k1.aggregate(
                commitments=clist,
                message=self.message,
                group_public_key=self.verifying_key,
                signature_shares=shares,
                verifying_shares=verifying,
            )
        return theirs, mine

    def check(self) -> None:
        theirs, mine = self.run()
        assert theirs == mine
        public = zf.encode_public_key_package(self.public)
        assert self.m.verify(self.message, public, zf.b64encode(mine))
        if self.suite == ED25519:
            assert _frost.verify(self.verifying_key, self.message, mine)
        else:
            assert k1.verify(self.verifying_key, self.message, mine)


# -- (a) plain secp256k1 signing, both directions -----------------------------------------------


def _zf_dealer(
    suite: str, min_signers: int, max_signers: int
) -> tuple[dict[bytes, zf.DealtShare], dict[bytes, str], _dkg.PublicKeyPackage]:
    m = _module(suite)
    raw = m.get_key(min_signers, max_signers)
    dealt = {zf.b64decode(i): zf.decode_secret_share(suite, s) for i, s in raw.items()}
    key_packages = {zf.b64decode(i): m.gen_key_package(s) for i, s in raw.items()}
    commitment = next(iter(dealt.values())).commitment
    shares = _dkg.verifying_shares_from_commitment(commitment, list(dealt), suite=suite)
    public = _dkg.PublicKeyPackage(suite, shares, commitment[0], min_signers)
    # ZF's key packages agree with what we derive from the dealer's commitment
    for ident, text in key_packages.items():
        key = zf.decode_key_package(suite, text)
        assert key.identifier == ident == dealt[ident].identifier
        assert key.signing_share == dealt[ident].signing_share
        assert key.verifying_share == shares[ident]
        assert key.verifying_key == commitment[0]
        assert key.min_signers == min_signers
        assert zf.encode_key_package(key) == text
        key.zero()
    return dealt, key_packages, public


@pytest.mark.parametrize("suite", [SECP256K1, ED25519])
@pytest.mark.parametrize(("min_signers", "max_signers", "ours"), [(2, 3, 1), (3, 5, 2)])
def test_zf_dealer_shares_signed_with_zf_signers(
    suite: str, min_signers: int, max_signers: int, ours: int
) -> None:
    """ZF deals; we sign with ``ours`` of its shares, ZF signers with the rest of a quorum."""
    dealt, key_packages, public = _zf_dealer(suite, min_signers, max_signers)
    quorum = sort_ids(group_for(suite), list(dealt))[:min_signers]
    mine = {i: dealt[i].signing_share for i in quorum[:ours]}
    theirs = {i: key_packages[i] for i in quorum[ours:]}
    Session(suite, mine, theirs, public.verifying_key, public).check()


@pytest.mark.parametrize("suite", [SECP256K1, ED25519])
def test_our_dkg_shares_used_by_zf_signers(suite: str) -> None:
    """Our DKG's key packages, encoded as ZF's, sign with frost-rs (all of a quorum, and
    mixed with ours)."""
    run = run_dkg(suite, 2, 3)
    public = next(iter(run.public.values()))
    encoded = {i: zf.encode_key_package(k) for i, k in run.keys.items()}
    for i, text in encoded.items():
        assert zf.decode_key_package(suite, text).verifying_share == run.verifying_shares[i]
    a, b, c = run.identifiers
    Session(suite, {}, {a: encoded[a], c: encoded[c]}, run.verifying_key, public).check()
    Session(
        suite, {b: run.keys[b].signing_share}, {c: encoded[c]}, run.verifying_key, public
    ).check()


def test_our_ed25519_dealer_shares_used_by_zf_signers() -> None:
    dealt = _frost.trusted_dealer_keygen(2, 3)
    shares = {s.identifier: s.verifying_share for s in dealt.shares}
    public = _dkg.PublicKeyPackage(ED25519, shares, dealt.group_public_key, 2)
    keys = {
        s.identifier: zf.encode_key_package(
            _dkg.KeyPackage(
                ED25519, s.identifier, s.signing_share, s.verifying_share, dealt.group_public_key, 2
            )
        )
        for s in dealt.shares
    }
    one, two, three = (s.identifier for s in dealt.shares)
    Session(
        ED25519, {}, {one: keys[one], three: keys[three]}, dealt.group_public_key, public
    ).check()
    Session(
        ED25519,
        {two: dealt.shares[1].signing_share},
        {three: keys[three]},
        dealt.group_public_key,
        public,
    ).check()


# -- (b) DKG with our participant among frost-rs participants -----------------------------------


def _mixed_dkg(
    suite: str, min_signers: int, max_signers: int
) -> tuple[bytes, _dkg.KeyPackage, _dkg.PublicKeyPackage, dict[bytes, tuple[str, str]]]:
    """Participant 0 is ours, the others frost-rs's; returns our identifier and output, and
    each frost-rs participant's (key package, public key package)."""
    m = _module(suite)
    ids = [zf.b64decode(m.get_id()) for _ in range(max_signers)]
    me, others = ids[0], ids[1:]
    zf_r1 = {i: m.round1(zf.b64encode(i), min_signers, max_signers) for i in others}
    secret, package = _dkg.part1(me, max_signers, min_signers, suite=suite)
    r1_text = {i: zf_r1[i][1] for i in others}
    r1_text[me] = zf.encode_round1_package(suite, package)
    received = {i: zf.decode_round1_package(suite, r1_text[i]) for i in others}
    keys = zf.transport_keys(secret, received)  # before part2 zeroes the secret
    try:
        # frost-rs verifies our proof of knowledge here (and panics if it does not verify)
        zf_r2 = {
            i: m.round2(zf_r1[i][0], {zf.b64encode(j): r1_text[j] for j in ids if j != i})
            for i in others
        }
        r2_secret, outgoing = _dkg.part2(secret, received)
        ours_encrypted = {i: zf.encrypt_round2(keys[i], outgoing[i]) for i in others}
        for p in outgoing.values():
            p.zero()
        zf_out: dict[bytes, tuple[str, str]] = {}
        for i in others:
            to_i = {zf.b64encode(j): zf_r2[j][1][zf.b64encode(i)] for j in others if j != i}
            to_i[zf.b64encode(me)] = ours_encrypted[i]
            r1_for_i = {zf.b64encode(j): r1_text[j] for j in ids if j != i}
            zf_out[i] = m.round3(zf_r2[i][0], r1_for_i, to_i)
        to_me = {j: zf.decrypt_round2(keys[j], zf_r2[j][1][zf.b64encode(me)]) for j in others}
        key, public = _dkg.part3(r2_secret, received, to_me)
    finally:
        for k in keys.values():
            k[:] = bytes(len(k))
    return me, key, public, zf_out


@pytest.mark.parametrize("suite", [SECP256K1, ED25519])
@pytest.mark.parametrize(("min_signers", "max_signers"), [(2, 3), (3, 4)])
def test_dkg_with_zf_participants_then_sign(suite: str, min_signers: int, max_signers: int) -> None:
    me, key, public, zf_out = _mixed_dkg(suite, min_signers, max_signers)
    # everyone agrees on the group key and every verifying share
    for i, (key_text, public_text) in zf_out.items():
        theirs = zf.decode_key_package(suite, key_text)
        assert theirs.verifying_key == key.verifying_key == public.verifying_key
        assert theirs.verifying_share == public.verifying_shares[i]
        assert theirs.min_signers == min_signers
        zf_public = zf.decode_public_key_package(suite, public_text, min_signers)
        assert dict(zf_public.verifying_shares) == dict(public.verifying_shares)
        assert zf_public.verifying_key == public.verifying_key
        theirs.zero()
    assert public.verifying_shares[me] == key.verifying_share
    # sign: our participant with ZF participants, then ZF participants alone
    others = sort_ids(group_for(suite), list(zf_out))
    theirs_keys = {i: zf_out[i][0] for i in others}
    quorum: Sequence[bytes] = others[: min_signers - 1]
    Session(
        suite,
        {me: key.signing_share},
        {i: theirs_keys[i] for i in quorum},
        key.verifying_key,
        public,
    ).check()
    Session(
        suite,
        {},
        {i: theirs_keys[i] for i in others[-min_signers:]},
        key.verifying_key,
        public,
    ).check()
    key.zero()


@pytest.mark.parametrize("suite", [SECP256K1, ED25519])
def test_zf_bad_proof_is_refused_with_culprit(suite: str) -> None:
    """A frost-rs round-1 package whose proof is replaced by another participant's: our part2
    names the sender whose package carries it."""
    m = _module(suite)
    ids = [zf.b64decode(m.get_id()) for _ in range(3)]
    me, a, b = ids
    zf_r1 = {i: m.round1(zf.b64encode(i), 2, 3) for i in (a, b)}
    secret, _ = _dkg.part1(me, 3, 2, suite=suite)
    pa = zf.decode_round1_package(suite, zf_r1[a][1])
    pb = zf.decode_round1_package(suite, zf_r1[b][1])
    forged = _dkg.Round1Package(pb.commitment, pa.proof_of_knowledge)
    with pytest.raises(_dkg.DkgError) as info:
        _dkg.part2(secret, {a: pa, b: forged})
    assert info.value.culprit == b


@pytest.mark.parametrize("suite", [SECP256K1, ED25519])
def test_zf_refuses_our_package_with_a_tampered_proof(suite: str) -> None:
    """The positive DKG test means something: frost-rs does check our proof of knowledge (it
    panics, through pyo3, on the one we spoil here)."""
    m = _module(suite)
    me, other, third = (zf.b64decode(m.get_id()) for _ in range(3))
    secret, package = _dkg.part1(me, 3, 2, suite=suite)
    secret.zero()
    proof = bytearray(package.proof_of_knowledge)
    proof[-1 if suite == SECP256K1 else 32] ^= 1  # z's low byte: still canonical
    spoiled = _dkg.Round1Package(package.commitment, bytes(proof))
    zf_secret, _ = m.round1(zf.b64encode(other), 2, 3)
    _, third_package = m.round1(zf.b64encode(third), 2, 3)
    packages = {
        zf.b64encode(me): zf.encode_round1_package(suite, spoiled),
        zf.b64encode(third): third_package,
    }
    with pytest.raises(BaseException, match="InvalidProofOfKnowledge") as info:
        m.round2(zf_secret, packages)
    assert type(info.value).__name__ == "PanicException"
