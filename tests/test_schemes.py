"""The per-suite facade: every suite signs, aggregates and verifies through the same methods."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign import FrostError, InvalidSignatureShareError
from trio_sign.crypto import _secp256k1, _secp256k1_tr
from trio_sign.crypto._schemes import (
    ED25519,
    SCHEMES,
    SECP256K1,
    SECP256K1_TR,
    Scheme,
    scheme_by_code,
    scheme_by_name,
)

MESSAGE = b"trio_sign facade test"


def _sign(
    scheme: Scheme,
    dealt: object,
    signers: list[int],
    *,
    message: bytes = MESSAGE,
    merkle_root: bytes | None = None,
) -> bytes:
    shares = dealt.shares  # type: ignore[attr-defined]
    gpk = dealt.group_public_key  # type: ignore[attr-defined]
    chosen = [shares[i] for i in signers]
    nonces = [scheme.commit(s.identifier, s.signing_share) for s in chosen]
    commitments = sorted(
        (n.commitment for n in nonces), key=lambda c: scheme.identifier_from_bytes(c.identifier)
    )
    sig_shares = {
        s.identifier: scheme.sign(
            n,
            signing_share=s.signing_share,
            group_public_key=gpk,
            message=message,
            commitments=commitments,
            min_signers=2,
            max_signers=len(shares),
            merkle_root=merkle_root,
        )
        for s, n in zip(chosen, nonces, strict=True)
    }
    for s in chosen:
        assert scheme.verify_signature_share(
            identifier=s.identifier,
            verifying_share=s.verifying_share,
            signature_share=sig_shares[s.identifier],
            commitments=commitments,
            group_public_key=gpk,
            message=message,
            merkle_root=merkle_root,
        )
    return scheme.aggregate(
        commitments=commitments,
        message=message,
        group_public_key=gpk,
        signature_shares=sig_shares,
        verifying_shares={s.identifier: s.verifying_share for s in shares},
        merkle_root=merkle_root,
    )


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_every_suite_signs_and_verifies_independently(scheme: Scheme) -> None:
    dealt = scheme.trusted_dealer_keygen(2, 3)
    sig = _sign(scheme, dealt, [0, 2])
    assert len(sig) == scheme.signature_size
    assert scheme.verify(dealt.group_public_key, MESSAGE, sig)
    assert not scheme.verify(dealt.group_public_key, MESSAGE + b"x", sig)
    for share in dealt.shares:
        assert (
            scheme.point_problem(share.signing_share, share.verifying_share, dealt.group_public_key)
            is None
        )
        assert scheme.scalar_problem(share.identifier, share.signing_share) is None
        share.zero()


@pytest.mark.parametrize("scheme", [ED25519, SECP256K1], ids=lambda s: s.name)
def test_merkle_root_refused_outside_taproot(scheme: Scheme) -> None:
    dealt = scheme.trusted_dealer_keygen(2, 2)
    with pytest.raises(FrostError, match="taproot merkle root applies only"):
        _sign(scheme, dealt, [0, 1], merkle_root=b"")
    assert not scheme.verify(dealt.group_public_key, MESSAGE, bytes(64), merkle_root=b"")


@pytest.mark.parametrize("root", [None, b"", hashlib.sha256(b"leaf").digest()])
def test_taproot_signatures_verify_as_bip340_under_the_output_key(root: bytes | None) -> None:
    dealt = SECP256K1_TR.trusted_dealer_keygen(2, 3)
    sig = _sign(SECP256K1_TR, dealt, [1, 2], merkle_root=root)
    key = SECP256K1_TR.verifying_key(dealt.group_public_key, root)
    assert key == _secp256k1_tr.output_key(dealt.group_public_key, root)
    assert _secp256k1_tr.verify(key, MESSAGE, sig)
    assert SECP256K1_TR.verify(dealt.group_public_key, MESSAGE, sig, root)
    # The empty merkle root still tweaks: it is not the same key as no tweak.
    other = b"" if root is None else None
    assert not SECP256K1_TR.verify(dealt.group_public_key, MESSAGE, sig, other)


def test_taproot_dealt_keys_with_odd_y_sign() -> None:
    for _ in range(64):
        dealt = SECP256K1_TR.trusted_dealer_keygen(2, 3)
        if dealt.group_public_key[0] == 3:
            break
    else:  # pragma: no cover - 2**-64
        pytest.fail("no odd-Y key in 64 tries")
    sig = _sign(SECP256K1_TR, dealt, [0, 1])
    assert SECP256K1_TR.verify(dealt.group_public_key, MESSAGE, sig)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_bad_share_is_named_at_aggregation(scheme: Scheme) -> None:
    dealt = scheme.trusted_dealer_keygen(2, 3)
    a, b = dealt.shares[0], dealt.shares[1]
    na, nb = (
        scheme.commit(a.identifier, a.signing_share),
        scheme.commit(b.identifier, b.signing_share),
    )
    commitments = [na.commitment, nb.commitment]
    kw = dict(group_public_key=dealt.group_public_key, message=MESSAGE, commitments=commitments)
    za = scheme.sign(na, signing_share=a.signing_share, **kw)  # type: ignore[arg-type]
    zb = scheme.sign(nb, signing_share=a.signing_share, **kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidSignatureShareError) as info:
        scheme.aggregate(
            commitments=commitments,
            message=MESSAGE,
            group_public_key=dealt.group_public_key,
            signature_shares={a.identifier: za, b.identifier: zb},
            verifying_shares={s.identifier: s.verifying_share for s in dealt.shares},
        )
    assert info.value.identifier == b.identifier


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_share_checks_name_the_problem(scheme: Scheme) -> None:
    dealt = scheme.trusted_dealer_keygen(2, 2)
    s = dealt.shares[0]
    other = dealt.shares[1]
    assert scheme.scalar_problem(bytes(32), s.signing_share)[1] == "zero_identifier"  # type: ignore[index]
    assert scheme.scalar_problem(s.identifier, bytes(32))[1] == "zero_signing_share"  # type: ignore[index]
    assert scheme.scalar_problem(b"\xff" * 32, s.signing_share)[1] == "non_canonical_scalar"  # type: ignore[index]
    assert scheme.scalar_problem(s.identifier, b"\xff" * 32)[1] == "non_canonical_scalar"  # type: ignore[index]
    assert scheme.scalar_problem(s.identifier[:31], s.signing_share)[1] == "bad_length"  # type: ignore[index]
    problem = scheme.point_problem(s.signing_share, other.verifying_share, dealt.group_public_key)
    assert problem is not None
    assert problem[1] == "share_mismatch"
    bad = b"\x05" + bytes(scheme.element_size - 1)
    problem = scheme.point_problem(s.signing_share, s.verifying_share, bad)
    assert problem is not None
    assert problem[1] == "invalid_point"
    problem = scheme.point_problem(s.signing_share, s.verifying_share[:-1], dealt.group_public_key)
    assert problem is not None
    assert problem[1] == "bad_length"


def test_lookup_by_name_and_code() -> None:
    for scheme in SCHEMES:
        assert scheme_by_name(scheme.name) is scheme
        assert scheme_by_code(scheme.code) is scheme
    with pytest.raises(FrostError, match="unknown ciphersuite 'FROST-P256"):
        scheme_by_name("FROST-P256-SHA256-v1")
    with pytest.raises(FrostError, match="code 7"):
        scheme_by_code(7)
    assert [s.name for s in SCHEMES] == [
        "FROST-ED25519-SHA512-v1",
        "FROST-secp256k1-SHA256-v1",
        "FROST-secp256k1-SHA256-TR-v1",
    ]


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(SCHEMES[1:]), st.data())
def test_secp256k1_dealer_quorums(scheme: Scheme, data: st.DataObject) -> None:
    max_signers = data.draw(st.integers(2, 6))
    min_signers = data.draw(st.integers(2, max_signers))
    dealt = scheme.trusted_dealer_keygen(min_signers, max_signers)
    signers = sorted(
        data.draw(
            st.lists(
                st.integers(0, max_signers - 1),
                min_size=min_signers,
                max_size=max_signers,
                unique=True,
            )
        )
    )
    # Any quorum's Lagrange-weighted verifying shares interpolate the group key.
    ids = [scheme.identifier_from_bytes(dealt.shares[i].identifier) for i in signers]
    terms = [
        _secp256k1._mul_public(
            dealt.shares[i].verifying_share, _secp256k1.lagrange_coefficient(ids, x)
        )
        for i, x in zip(signers, ids, strict=True)
    ]
    from coincurve import PublicKey

    total = PublicKey.combine_keys([t for t in terms if t is not None])
    assert total.format(compressed=True) == dealt.group_public_key
    sig = _sign(scheme, dealt, signers)
    assert scheme.verify(dealt.group_public_key, MESSAGE, sig)


def test_negating_zero_keeps_zero() -> None:
    zero = bytearray(32)
    _secp256k1.scalar_negate(zero)
    assert zero == bytearray(32)
    one = bytearray((1).to_bytes(32, "big"))
    _secp256k1.scalar_negate(one)
    assert int.from_bytes(one, "big") == _secp256k1.N - 1
