"""FROST(secp256k1, SHA-256)-TR as ZF FROST: every value of ZF's frost-secp256k1-tr vectors,
BIP-340 verification by libsecp256k1, odd-Y group keys and group commitments, the BIP-341
tweak (with, without and with an empty merkle root) and ZF's post-DKG tweak."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from coincurve import PublicKey, PublicKeyXOnly
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trio_sign import FrostError
from trio_sign._errors import InvalidSignatureShareError
from trio_sign.crypto import _secp256k1 as k1
from trio_sign.crypto import _secp256k1_tr as tr
from trio_sign.crypto._suite import Ciphersuite

N = k1.N
SUITE = tr.SUITE

VECTOR_FILES = [
    "frost/zcash_frost/frost-secp256k1-tr/vectors.json",
    "frost/zcash_frost/frost-secp256k1-tr/vectors-big-identifier.json",
]


def _load(vectors_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((vectors_dir / name).read_text())
    return data


@pytest.fixture(params=VECTOR_FILES, ids=["zf", "zf-big-identifier"])
def vector(request: pytest.FixtureRequest, vectors_dir: Path) -> dict[str, Any]:
    return _load(vectors_dir, request.param)


def _ident(value: int) -> bytes:
    return SUITE.identifier_to_bytes(value)


def _tagged(tag: str, data: bytes) -> bytes:
    t = hashlib.sha256(tag.encode()).digest()
    return hashlib.sha256(t + t + data).digest()


# -- a trusted dealer, for the tests only -------------------------------------------------------


@dataclass(frozen=True)
class Dealt:
    secret: int
    group_public_key: bytes
    shares: dict[bytes, bytes]
    verifying: dict[bytes, bytes]


def _poly(secret: int, coefficients: list[int], x: int) -> int:
    y = 0
    for a in reversed([secret, *coefficients]):
        y = (y * x + a) % N
    return y


def _deal(secret: int, coefficients: list[int], identifiers: list[int]) -> Dealt:
    shares = {_ident(x): _poly(secret, coefficients, x).to_bytes(32, "big") for x in identifiers}
    return Dealt(
        secret,
        k1.base_mult(secret.to_bytes(32, "big")),
        shares,
        {i: k1.base_mult(s) for i, s in shares.items()},
    )


def _deal_with_parity(odd: bool, t: int = 2, n: int = 3, seed: int = 1) -> Dealt:
    secret = seed
    while True:
        dealt = _deal(secret, [secret * 7 + 3 for _ in range(t - 1)], list(range(1, n + 1)))
        if (dealt.group_public_key[0] == 3) == odd:
            return dealt
        secret += 1


@dataclass
class Session:
    commitments: list[k1.SigningCommitment]
    shares: dict[bytes, bytes]
    signature: bytes


def _run(
    dealt: Dealt,
    signers: list[bytes],
    message: bytes,
    *,
    merkle_root: bytes | None = None,
    want_odd_r: bool | None = None,
) -> Session:
    while True:
        nonces = {i: tr.commit(i, dealt.shares[i]) for i in sorted(signers)}
        commitments = [nonces[i].commitment for i in sorted(signers)]
        if want_odd_r is None:
            break
        plan = tr.tweak_key(dealt.group_public_key, merkle_root)
        r = k1._parse(commitments, plan.group_public_key, message, suite=SUITE).group_commitment
        if (r[0] == 3) == want_odd_r:
            break
    z = {
        i: tr.sign(
            nonces[i],
            signing_share=dealt.shares[i],
            group_public_key=dealt.group_public_key,
            message=message,
            commitments=commitments,
            merkle_root=merkle_root,
        )
        for i in sorted(signers)
    }
    sig = tr.aggregate(
        commitments=commitments,
        message=message,
        group_public_key=dealt.group_public_key,
        signature_shares=z,
        verifying_shares={i: dealt.verifying[i] for i in signers},
        merkle_root=merkle_root,
    )
    return Session(commitments, z, sig)


def _bip340_ok(x_only: bytes, message: bytes, sig: bytes) -> bool:
    return bool(PublicKeyXOnly(x_only).verify(sig, message))


# -- the suite ----------------------------------------------------------------------------------


def test_suite() -> None:
    assert isinstance(SUITE, Ciphersuite)
    assert SUITE.name == "FROST-secp256k1-SHA256-TR-v1"
    m = b"some bytes"
    assert SUITE.h2(m) == int.from_bytes(_tagged("BIP0340/challenge", m), "big") % N
    # H1, H3, H4, H5 are the RFC ones under this suite's context string
    plain = k1.Secp256k1Suite("FROST-secp256k1-SHA256-TR-v1")
    assert (SUITE.h1(m), SUITE.h3(m), SUITE.h4(m), SUITE.h5(m)) == (
        plain.h1(m),
        plain.h3(m),
        plain.h4(m),
        plain.h5(m),
    )


# -- the vectors --------------------------------------------------------------------------------


def test_every_intermediate_value(vector: dict[str, Any]) -> None:
    inputs = vector["inputs"]
    gpk = bytes.fromhex(inputs["verifying_key_key"])
    message = bytes.fromhex(inputs["message"])
    dealt = _deal(
        int(inputs["group_secret_key"], 16),
        [int(c, 16) for c in inputs["share_polynomial_coefficients"]],
        [s["identifier"] for s in inputs["participant_shares"]],
    )
    assert dealt.group_public_key == gpk
    for s in inputs["participant_shares"]:
        assert dealt.shares[_ident(s["identifier"])].hex() == s["participant_share"]
    r1 = vector["round_one_outputs"]["outputs"]
    r2 = {o["identifier"]: o["sig_share"] for o in vector["round_two_outputs"]["outputs"]}

    nonces = {}
    for o in r1:
        ident = _ident(o["identifier"])
        n = tr.commit(
            ident,
            dealt.shares[ident],
            hiding_randomness=bytes.fromhex(o["hiding_nonce_randomness"]),
            binding_randomness=bytes.fromhex(o["binding_nonce_randomness"]),
        )
        assert bytes(n.hiding).hex() == o["hiding_nonce"]
        assert bytes(n.binding).hex() == o["binding_nonce"]
        assert n.commitment.hiding.hex() == o["hiding_nonce_commitment"]
        assert n.commitment.binding.hex() == o["binding_nonce_commitment"]
        nonces[ident] = n
    commitments = [nonces[_ident(i)].commitment for i in inputs["participant_list"]]

    prefix = k1.binding_factor_input_prefix(gpk, commitments, message, suite=SUITE)
    for o in r1:
        bfi = prefix + _ident(o["identifier"])
        assert bfi.hex() == o["binding_factor_input"]
        assert SUITE.serialize_scalar(SUITE.h1(bfi)).hex() == o["binding_factor"]

    z = {}
    for o in r1:
        ident = _ident(o["identifier"])
        z[ident] = tr.sign(
            nonces[ident],
            signing_share=dealt.shares[ident],
            group_public_key=gpk,
            message=message,
            commitments=commitments,
        )
        assert z[ident].hex() == r2[o["identifier"]]
        assert tr.verify_signature_share(
            identifier=ident,
            verifying_share=dealt.verifying[ident],
            signature_share=z[ident],
            commitments=commitments,
            group_public_key=gpk,
            message=message,
        )
    sig = tr.aggregate(
        commitments=commitments,
        message=message,
        group_public_key=gpk,
        signature_shares=z,
        verifying_shares=dealt.verifying,
    )
    assert sig.hex() == vector["final_output"]["sig"]
    assert tr.output_key(gpk) == gpk[1:]
    assert tr.verify(gpk[1:], message, sig)
    assert _bip340_ok(gpk[1:], message, sig)
    assert not tr.verify(gpk[1:], message + b"x", sig)


def test_zf_invalid_element_is_refused(vectors_dir: Path) -> None:
    bad = bytes.fromhex(
        _load(vectors_dir, "frost/zcash_frost/frost-secp256k1-tr/elements.json")["elements"][
            "invalid_element"
        ]
    )
    with pytest.raises(FrostError):
        SUITE.deserialize_element(bad)
    dealt = _deal_with_parity(odd=False)
    i1, i2 = _ident(1), _ident(2)
    n1 = tr.commit(i1, dealt.shares[i1])
    n2 = tr.commit(i2, dealt.shares[i2])
    forged = k1.SigningCommitment(i2, n2.commitment.hiding, bad)
    with pytest.raises(FrostError, match="binding commitment of identifier 2"):
        tr.sign(
            n1,
            signing_share=dealt.shares[i1],
            group_public_key=dealt.group_public_key,
            message=b"m",
            commitments=[n1.commitment, forged],
        )
    assert not n1.used
    with pytest.raises(FrostError):
        tr.tweak_key(bad, None)


# -- the traps the vectors do not catch ---------------------------------------------------------


@pytest.mark.parametrize("odd_key", [False, True], ids=["even-key", "odd-key"])
@pytest.mark.parametrize("odd_r", [False, True], ids=["even-R", "odd-R"])
def test_odd_y_keys_and_group_commitments(odd_key: bool, odd_r: bool) -> None:
    dealt = _deal_with_parity(odd=odd_key)
    assert (dealt.group_public_key[0] == 3) is odd_key
    s = _run(dealt, [_ident(1), _ident(3)], b"odd and even", want_odd_r=odd_r)
    assert tr.verify(dealt.group_public_key[1:], b"odd and even", s.signature)
    assert _bip340_ok(dealt.group_public_key[1:], b"odd and even", s.signature)


def test_dealt_key_is_stored_as_dealt() -> None:
    """Odd-Y dealer output is not normalised in storage: signing normalises it each time."""
    dealt = _deal_with_parity(odd=True)
    share = bytearray(dealt.shares[_ident(1)])
    nonces = tr.commit(_ident(1), share)
    other = tr.commit(_ident(2), dealt.shares[_ident(2)])
    tr.sign(
        nonces,
        signing_share=share,
        group_public_key=dealt.group_public_key,
        message=b"m",
        commitments=[nonces.commitment, other.commitment],
    )
    assert bytes(share) == dealt.shares[_ident(1)]  # the caller's share is untouched


def test_a_signer_that_skips_even_y_is_caught() -> None:
    """With an odd-Y key, the share of a signer that does not negate fails share verification."""
    dealt = _deal_with_parity(odd=True)
    i1, i2 = _ident(1), _ident(2)
    n1 = tr.commit(i1, dealt.shares[i1])
    n2 = tr.commit(i2, dealt.shares[i2])
    commitments = [n1.commitment, n2.commitment]
    # A naive signer: the even-Y key in the binding factors and challenge, the share as dealt.
    even_pk = b"\x02" + dealt.group_public_key[1:]
    parsed = k1._parse(commitments, even_pk, b"m", suite=SUITE)
    lam = k1.lagrange_coefficient(parsed.ids, 1)
    sign_r = -1 if parsed.group_commitment[0] == 3 else 1
    d = int.from_bytes(n1.hiding, "big")
    e = int.from_bytes(n1.binding, "big")
    s = int.from_bytes(dealt.shares[i1], "big")
    naive = (sign_r * (d + e * parsed.rhos[0]) + lam * parsed.challenge * s) % N
    honest = tr.sign(
        n1,
        signing_share=dealt.shares[i1],
        group_public_key=dealt.group_public_key,
        message=b"m",
        commitments=commitments,
    )
    assert honest != naive.to_bytes(32, "big")
    for z, ok in ((honest, True), (naive.to_bytes(32, "big"), False)):
        assert (
            tr.verify_signature_share(
                identifier=i1,
                verifying_share=dealt.verifying[i1],
                signature_share=z,
                commitments=commitments,
                group_public_key=dealt.group_public_key,
                message=b"m",
            )
            is ok
        )
    z2 = tr.sign(
        n2,
        signing_share=dealt.shares[i2],
        group_public_key=dealt.group_public_key,
        message=b"m",
        commitments=commitments,
    )
    with pytest.raises(InvalidSignatureShareError) as info:
        tr.aggregate(
            commitments=commitments,
            message=b"m",
            group_public_key=dealt.group_public_key,
            signature_shares={i1: naive.to_bytes(32, "big"), i2: z2},
            verifying_shares=dealt.verifying,
        )
    assert info.value.identifier == i1


# -- the BIP-341 tweak --------------------------------------------------------------------------


def _independent_output_key(internal: bytes, merkle_root: bytes) -> bytes:
    """BIP-341 ``taproot_tweak_pubkey`` by libsecp256k1's x-only tweak."""
    key = PublicKeyXOnly(internal[1:])
    t = _tagged("TapTweak", internal[1:] + merkle_root)
    key.tweak_add(t)
    return bytes(key.format())


@pytest.mark.parametrize("odd_key", [False, True], ids=["even-key", "odd-key"])
@pytest.mark.parametrize("merkle_root", [b"", bytes(range(32))], ids=["empty-root", "32-byte-root"])
def test_tweaked_signatures_verify_against_the_output_key(
    odd_key: bool, merkle_root: bytes
) -> None:
    dealt = _deal_with_parity(odd=odd_key)
    out = _independent_output_key(dealt.group_public_key, merkle_root)
    assert tr.output_key(dealt.group_public_key, merkle_root) == out
    for odd_r in (False, True):
        s = _run(
            dealt, [_ident(2), _ident(3)], b"tweaked", merkle_root=merkle_root, want_odd_r=odd_r
        )
        assert _bip340_ok(out, b"tweaked", s.signature)
        assert not _bip340_ok(dealt.group_public_key[1:], b"tweaked", s.signature)


def test_empty_merkle_root_is_not_no_tweak() -> None:
    dealt = _deal_with_parity(odd=False)
    untweaked = _run(dealt, [_ident(1), _ident(2)], b"m", merkle_root=None).signature
    empty = _run(dealt, [_ident(1), _ident(2)], b"m", merkle_root=b"").signature
    internal = dealt.group_public_key[1:]
    out = _independent_output_key(dealt.group_public_key, b"")
    assert out != internal
    assert _bip340_ok(internal, b"m", untweaked)
    assert not _bip340_ok(out, b"m", untweaked)
    assert _bip340_ok(out, b"m", empty)
    assert not _bip340_ok(internal, b"m", empty)


def test_post_dkg_tweak_then_sign_without_a_further_tweak() -> None:
    for odd in (False, True):
        dealt = _deal_with_parity(odd=odd, seed=11)
        ids = [_ident(1), _ident(2), _ident(3)]
        new_shares: dict[bytes, bytes] = {}
        new_pk = b""
        new_vs: dict[bytes, bytes] = {}
        for i in ids:
            buf = bytearray(dealt.shares[i])
            new_pk, new_vs = tr.post_dkg_tweak(buf, dealt.group_public_key, dealt.verifying)
            new_shares[i] = bytes(buf)
            assert k1.base_mult(buf) == new_vs[i]
        out = _independent_output_key(dealt.group_public_key, b"")
        assert new_pk[1:] == out
        tweaked = Dealt(0, new_pk, new_shares, new_vs)
        s = _run(tweaked, [_ident(1), _ident(3)], b"after dkg", merkle_root=None)
        assert _bip340_ok(out, b"after dkg", s.signature)
        # the same as signing the untweaked key with the empty merkle root
        assert tr.output_key(dealt.group_public_key, b"") == tr.output_key(new_pk)


def test_signature_validation() -> None:
    dealt = _deal_with_parity(odd=True)
    s = _run(dealt, [_ident(1), _ident(2)], b"m")
    x = dealt.group_public_key[1:]
    assert tr.verify(x, b"m", s.signature)
    assert not tr.verify(x, b"m", s.signature[:32] + N.to_bytes(32, "big"))
    assert not tr.verify(x, b"m", s.signature[:-1])
    assert not tr.verify(x[:31], b"m", s.signature)
    assert not tr.verify((k1.P).to_bytes(32, "big"), b"m", s.signature)
    assert len(PublicKey(dealt.group_public_key).format()) == 33


# -- random quorums -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(2, 3), (3, 5)]),
    data=st.data(),
    message=st.binary(max_size=64),
    merkle_root=st.one_of(st.none(), st.just(b""), st.binary(min_size=32, max_size=32)),
)
def test_random_quorums_verify_as_bip340(
    shape: tuple[int, int], data: st.DataObject, message: bytes, merkle_root: bytes | None
) -> None:
    t, n = shape
    scalars = st.integers(min_value=1, max_value=N - 1)
    identifiers = sorted(data.draw(st.sets(scalars, min_size=n, max_size=n)))
    secret = data.draw(scalars)
    coefficients = data.draw(st.lists(scalars, min_size=t - 1, max_size=t - 1))
    assume(all(_poly(secret, coefficients, x) != 0 for x in identifiers))
    dealt = _deal(secret, coefficients, identifiers)
    quorum = data.draw(st.lists(st.sampled_from(identifiers), min_size=t, max_size=n, unique=True))
    s = _run(dealt, [_ident(i) for i in quorum], message, merkle_root=merkle_root)
    key = tr.output_key(dealt.group_public_key, merkle_root)
    if merkle_root is not None:
        assert key == _independent_output_key(dealt.group_public_key, merkle_root)
    assert _bip340_ok(key, message, s.signature)
