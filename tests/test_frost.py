"""FROST(Ed25519) checks beyond the vectors: every refusal round two must make, and properties."""

from __future__ import annotations

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign import FrostError, InvalidSignatureShareError
from trio_sign.crypto import (
    SigningCommitment,
    SigningNonces,
    aggregate,
    commit,
    identifier_to_bytes,
    sign,
    trusted_dealer_keygen,
    verify,
)
from trio_sign.crypto import _sodium as na
from trio_sign.crypto._frost import DealerOutput, lagrange_coefficient

from .share_helpers import ORDER_8

P = 2**255 - 19
#: (x=0, y=-1), the point of order 2.
ORDER_2 = (P - 1).to_bytes(32, "little")
#: A point of order 8.


def _plus_torsion(point: bytes, torsion: bytes) -> bytes:
    out = bytearray(32)
    assert na.point_add(out, point, torsion)
    return bytes(out)


class Session:
    """A 2-of-3 dealer setup with signers 1 and 2 committed."""

    def __init__(self, min_signers: int = 2, max_signers: int = 3) -> None:
        self.dealer: DealerOutput = trusted_dealer_keygen(min_signers, max_signers)
        self.gpk = self.dealer.group_public_key
        self.nonces: dict[int, SigningNonces] = {}

    def commit(self, *which: int) -> list[SigningCommitment]:
        for i in which:
            s = self.dealer.shares[i - 1]
            self.nonces[i] = commit(s.identifier, s.signing_share)
        return [self.nonces[i].commitment for i in sorted(which)]

    def sign(self, i: int, commitments: list[SigningCommitment], message: bytes = b"m") -> bytes:
        return sign(
            self.nonces[i],
            signing_share=self.dealer.shares[i - 1].signing_share,
            group_public_key=self.gpk,
            message=message,
            commitments=commitments,
            min_signers=2,
            max_signers=3,
        )


def test_poisoned_point_outside_subgroup_is_invalid() -> None:
    """CVE-2025-69277: libsodium before 1.0.20-stable (2025-12-30) accepted such points."""
    g = bytearray(32)
    na.base_mult(g, (9).to_bytes(32, "little"))
    assert na.is_valid_point(g)
    for torsion in (ORDER_2, ORDER_8):
        poisoned = _plus_torsion(bytes(g), torsion)
        assert not na.is_valid_point(poisoned)
        assert not na.scalar_mult(bytearray(32), (3).to_bytes(32, "little"), poisoned)
    assert not na.is_valid_point((1).to_bytes(32, "little"))  # identity
    assert not na.is_valid_point(ORDER_8)


@pytest.mark.parametrize("field", ["hiding", "binding"])
@pytest.mark.parametrize("torsion", [ORDER_2, ORDER_8], ids=["order2", "order8"])
def test_commitment_plus_torsion_is_rejected(field: str, torsion: bytes) -> None:
    s = Session()
    c1, c2 = s.commit(1, 2)
    bad = _plus_torsion(getattr(c2, field), torsion)
    forged = SigningCommitment(
        c2.identifier,
        bad if field == "hiding" else c2.hiding,
        bad if field == "binding" else c2.binding,
    )
    with pytest.raises(FrostError, match=f"{field} commitment of identifier 2 is not a valid"):
        s.sign(1, [c1, forged])
    assert not s.nonces[1].used
    # the honest list still works afterwards
    s.sign(1, [c1, c2])


def test_own_commitment_missing() -> None:
    s = Session()
    _c1, c2 = s.commit(1, 2)
    (c3,) = s.commit(3)
    with pytest.raises(FrostError, match="commitment is missing"):
        s.sign(1, [c2, c3])


def test_own_commitment_different() -> None:
    s = Session()
    c1, c2 = s.commit(1, 2)
    swapped = SigningCommitment(c1.identifier, c1.binding, c1.hiding)
    with pytest.raises(FrostError, match="differs from the one it produced"):
        s.sign(1, [swapped, c2])


def test_unsorted_and_duplicate_identifiers() -> None:
    s = Session()
    c1, c2 = s.commit(1, 2)
    with pytest.raises(FrostError, match="sorted by identifier"):
        s.sign(1, [c2, c1])
    with pytest.raises(FrostError, match="duplicate identifier 1"):
        s.sign(1, [c1, c1])


def test_too_few_and_too_many_signers() -> None:
    s = Session()
    c1, c2, c3 = s.commit(1, 2, 3)
    with pytest.raises(FrostError, match="too few signers: 1"):
        s.sign(1, [c1])
    extra = SigningCommitment(identifier_to_bytes(4), c3.hiding, c3.binding)
    with pytest.raises(FrostError, match="too many signers: 4"):
        s.sign(1, [c1, c2, c3, extra])


@pytest.mark.parametrize(
    ("identifier", "match"),
    [
        (bytes(32), "must not be zero"),
        (na.L.to_bytes(32, "little"), "not a canonical scalar"),
        (b"\x01" * 31, "must be 32 bytes"),
    ],
)
def test_bad_identifiers(identifier: bytes, match: str) -> None:
    s = Session()
    c1, c2 = s.commit(1, 2)
    with pytest.raises(FrostError, match=match):
        s.sign(1, [SigningCommitment(identifier, c2.hiding, c2.binding), c1])


def test_nonces_are_single_use() -> None:
    s = Session()
    commitments = s.commit(1, 2)
    s.sign(1, commitments)
    with pytest.raises(FrostError, match="already used"):
        s.sign(1, commitments)
    assert bytes(s.nonces[1].binding) == bytes(32)


def test_zeroed_nonces_refuse_to_sign() -> None:
    s = Session()
    commitments = s.commit(1, 2)
    s.nonces[1].zero()
    with pytest.raises(FrostError, match="already used"):
        s.sign(1, commitments)


def test_repr_never_shows_nonces() -> None:
    s = Session()
    s.commit(1)
    n = s.nonces[1]
    text = repr(n) + repr(s.dealer.shares[0])
    assert bytes(n.hiding).hex() not in text
    assert bytes(s.dealer.shares[0].signing_share).hex() not in text


def test_fresh_nonces_each_commit() -> None:
    s = Session()
    share = s.dealer.shares[0]
    a = commit(share.identifier, share.signing_share)
    b = commit(share.identifier, share.signing_share)
    assert a.commitment != b.commitment


def test_hedged_nonce_depends_on_secret() -> None:
    rand = bytes(range(32))
    out = trusted_dealer_keygen(2, 3)
    a = commit(
        out.shares[0].identifier,
        out.shares[0].signing_share,
        hiding_randomness=rand,
        binding_randomness=rand,
    )
    b = commit(
        out.shares[1].identifier,
        out.shares[1].signing_share,
        hiding_randomness=rand,
        binding_randomness=rand,
    )
    assert bytes(a.hiding) != bytes(b.hiding)


def test_aggregate_names_the_faulty_signer() -> None:
    s = Session()
    commitments = s.commit(1, 3)
    z1 = s.sign(1, commitments)
    z3 = s.sign(3, commitments)
    verifying = {d.identifier: d.verifying_share for d in s.dealer.shares}
    bad = ((int.from_bytes(z3, "little") + 1) % na.L).to_bytes(32, "little")
    ids = [c.identifier for c in commitments]
    with pytest.raises(InvalidSignatureShareError, match="identifier 3") as info:
        aggregate(
            commitments=commitments,
            message=b"m",
            group_public_key=s.gpk,
            signature_shares={ids[0]: z1, ids[1]: bad},
            verifying_shares=verifying,
        )
    assert info.value.identifier == ids[1]
    # without verifying shares the failure is still refused, just without a culprit
    with pytest.raises(FrostError, match="does not verify"):
        aggregate(
            commitments=commitments,
            message=b"m",
            group_public_key=s.gpk,
            signature_shares={ids[0]: z1, ids[1]: bad},
        )


def test_aggregate_refuses_non_canonical_share_and_missing_shares() -> None:
    s = Session()
    commitments = s.commit(1, 2)
    z1 = s.sign(1, commitments)
    ids = [c.identifier for c in commitments]
    with pytest.raises(FrostError, match="not a canonical scalar"):
        aggregate(
            commitments=commitments,
            message=b"m",
            group_public_key=s.gpk,
            signature_shares={ids[0]: z1, ids[1]: na.L.to_bytes(32, "little")},
        )
    with pytest.raises(FrostError, match="exactly the committed signers"):
        aggregate(
            commitments=commitments,
            message=b"m",
            group_public_key=s.gpk,
            signature_shares={ids[0]: z1},
        )


def test_wrong_message_signature_fails_verification() -> None:
    s = Session()
    commitments = s.commit(1, 2)
    shares = {
        c.identifier: s.sign(i, commitments, b"one")
        for i, c in zip((1, 2), commitments, strict=True)
    }
    sig = aggregate(
        commitments=commitments, message=b"one", group_public_key=s.gpk, signature_shares=shares
    )
    assert verify(s.gpk, b"one", sig)
    assert not verify(s.gpk, b"two", sig)
    assert not verify(s.gpk, b"one", sig[:-1])


def test_lagrange_coefficients_interpolate_at_zero() -> None:
    ids = [3, 17, 2**200 + 5]
    assert sum(lagrange_coefficient(ids, x) for x in ids) % na.L == 1


def test_keygen_refuses_bad_thresholds() -> None:
    with pytest.raises(FrostError, match="min_signers"):
        trusted_dealer_keygen(1, 3)
    with pytest.raises(FrostError, match="min_signers"):
        trusted_dealer_keygen(4, 3)
    with pytest.raises(FrostError, match="distinct identifiers"):
        trusted_dealer_keygen(2, 3, identifiers=[1, 1, 2])


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    max_signers=st.integers(min_value=2, max_value=6),
    message=st.binary(max_size=200),
)
def test_any_quorum_produces_a_valid_ed25519_signature(
    data: st.DataObject, max_signers: int, message: bytes
) -> None:
    min_signers = data.draw(st.integers(min_value=2, max_value=max_signers))
    ids = data.draw(
        st.lists(
            st.integers(min_value=1, max_value=na.L - 1),
            min_size=max_signers,
            max_size=max_signers,
            unique=True,
        )
    )
    dealer = trusted_dealer_keygen(min_signers, max_signers, identifiers=ids)
    quorum = data.draw(
        st.lists(
            st.sampled_from(dealer.shares),
            min_size=min_signers,
            max_size=max_signers,
            unique_by=lambda d: d.identifier,
        )
    )
    quorum.sort(key=lambda d: int.from_bytes(d.identifier, "little"))
    nonces = [commit(d.identifier, d.signing_share) for d in quorum]
    commitments = [n.commitment for n in nonces]
    shares = {
        d.identifier: sign(
            n,
            signing_share=d.signing_share,
            group_public_key=dealer.group_public_key,
            message=message,
            commitments=commitments,
            min_signers=min_signers,
            max_signers=max_signers,
        )
        for d, n in zip(quorum, nonces, strict=True)
    }
    sig = aggregate(
        commitments=commitments,
        message=message,
        group_public_key=dealer.group_public_key,
        signature_shares=shares,
        verifying_shares={d.identifier: d.verifying_share for d in dealer.shares},
    )
    nacl.signing.VerifyKey(dealer.group_public_key).verify(message, sig)
