"""Share refresh by DKG (``trio_sign/crypto/_refresh.py``) against ZF's ``keys::refresh``.

ZF publishes no refresh vectors, so ZF's behaviour is checked piece by piece: the package's
shape (``min_signers - 1`` elements, the identity left out; a proof with ``mu = k`` over
``phi_1``, even-Y ``R`` for Taproot), the shares as the polynomial with a zero constant term
evaluated by hand, the refreshed public key package built as ``refresh_dkg_shares`` builds it
(old verifying share plus the commitments' image), and then what a refresh is for: the same
group key, new shares that sign, and old and new shares that do not sign together.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from trio_sign._errors import FrostError
from trio_sign.crypto import _dkg
from trio_sign.crypto._refresh import refresh_part1, refresh_part2, refresh_part3
from trio_sign.crypto._sodium import Buffer

from .dkg_helpers import SUITES, TAPROOT, DkgRun, run_dkg, sign, verify


def refresh_all(
    run: DkgRun, *, tamper: Any = None
) -> tuple[dict[bytes, _dkg.KeyPackage], dict[bytes, _dkg.PublicKeyPackage]]:
    """Every participant's refresh_part1..3, in memory (``tamper(r2)`` may change shares)."""
    suite = run.group.name
    idents = run.identifiers
    n = len(idents)
    t = run.keys[idents[0]].min_signers
    r1 = {i: refresh_part1(i, n, t, suite=suite) for i in idents}
    r2 = {i: refresh_part2(r1[i][0], {j: r1[j][1] for j in idents if j != i}) for i in idents}
    if tamper is not None:
        tamper(r2)
    keys: dict[bytes, _dkg.KeyPackage] = {}
    public: dict[bytes, _dkg.PublicKeyPackage] = {}
    for i in idents:
        old = run.keys[i]
        key, pub = refresh_part3(
            r2[i][0],
            {j: r1[j][1] for j in idents if j != i},
            {j: r2[j][1][i] for j in idents if j != i},
            signing_share=old.signing_share,
            verifying_share=old.verifying_share,
            group_public_key=old.verifying_key,
            verifying_shares=run.verifying_shares,
        )
        assert pub is not None
        keys[i], public[i] = key, pub
    return keys, public


def signs(suite: str, shares: dict[bytes, Buffer], key: bytes, vs: dict[bytes, bytes]) -> bool:
    message = secrets.token_bytes(32)
    try:
        signature = sign(suite, {i: bytearray(s) for i, s in shares.items()}, key, vs, message)
    except FrostError:
        return False
    return verify(suite, key, message, signature)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize(("t", "n"), [(2, 3), (3, 5)])
def test_refresh_keeps_the_group_key_and_changes_every_share(suite: str, t: int, n: int) -> None:
    run = run_dkg(suite, t, n)
    old = {i: bytes(k.signing_share) for i, k in run.keys.items()}
    keys, public = refresh_all(run)
    group = run.group
    first = public[run.identifiers[0]]
    for i in run.identifiers:
        assert keys[i].verifying_key == run.verifying_key
        assert bytes(keys[i].signing_share) != old[i]
        assert keys[i].verifying_share == group.base_mult(keys[i].signing_share)
        assert keys[i].verifying_share != run.verifying_shares[i]
        # every participant derives the same public key package (ZF refresh_dkg_shares)
        assert public[i] == first
        assert first.verifying_shares[i] == keys[i].verifying_share
    assert first.verifying_key == run.verifying_key
    new_vs = dict(first.verifying_shares)
    quorum = run.identifiers[:t]
    assert signs(suite, {i: keys[i].signing_share for i in quorum}, run.verifying_key, new_vs)
    other = run.identifiers[n - t :]
    assert signs(suite, {i: keys[i].signing_share for i in other}, run.verifying_key, new_vs)
    # an old share with new ones: no valid signature, under either set of verifying shares
    mixed: dict[bytes, Buffer] = {i: keys[i].signing_share for i in quorum}
    mixed[quorum[0]] = old[quorum[0]]
    assert not signs(suite, mixed, run.verifying_key, new_vs)
    assert not signs(suite, mixed, run.verifying_key, run.verifying_shares)


@pytest.mark.parametrize("suite", SUITES)
def test_the_round1_package_is_zfs(suite: str) -> None:
    run = run_dkg(suite, 3, 4)
    group = run.group
    ident = run.identifiers[1]
    a1, a2 = bytearray(32), bytearray(32)
    group.random_scalar(a1)
    group.random_scalar(a2)
    secret, package = refresh_part1(ident, 4, 3, suite=suite, coefficients=[a1, a2])
    # the identity phi_0 is left out: min_signers - 1 elements, phi_1 first
    assert package.commitment == (group.base_mult(a1), group.base_mult(a2))
    # ZF's compute_proof_of_knowledge over a_0 = 0: mu = k, so mu*G == R
    if suite == TAPROOT:
        assert len(package.proof_of_knowledge) == 64
    r, mu = group.decode_signature(package.proof_of_knowledge, "proof")
    assert group.base_mult(group.scalar_bytes(mu)) == r
    # and it is not a valid proof of knowledge in the DKG's sense (nobody checks it)
    with pytest.raises(_dkg.DkgError):
        _dkg.verify_proof_of_knowledge(group, ident, package.commitment, package.proof_of_knowledge)
    # the shares are f(x) = a1*x + a2*x^2 (no constant term), as ZF evaluates them
    others = {j: refresh_part1(j, 4, 3, suite=suite)[1] for j in run.identifiers if j != ident}
    r2_secret, shares = refresh_part2(secret, others)
    order = group.order
    c1, c2 = int.from_bytes(a1, group_byteorder(suite)), int.from_bytes(a2, group_byteorder(suite))
    for j, share in shares.items():
        x = group.identifier_from_bytes(j)
        assert bytes(share.signing_share) == group.scalar_bytes(c1 * x + c2 * x * x)
    x = group.identifier_from_bytes(ident)
    assert bytes(r2_secret.secret_share) == group.scalar_bytes((c1 * x + c2 * x * x) % order)
    assert secret.used
    assert not any(a for co in secret._coefficients for a in co)


def group_byteorder(suite: str) -> Any:
    return "little" if suite == SUITES[0] else "big"


@pytest.mark.parametrize("suite", SUITES)
def test_a_share_off_its_commitment_names_the_sender(suite: str) -> None:
    run = run_dkg(suite, 2, 3)
    victim, culprit = run.identifiers[0], run.identifiers[2]

    def tamper(r2: Any) -> None:
        share = r2[culprit][1][victim].signing_share
        run.group.add(share, run.group.scalar_bytes(1))

    with pytest.raises(_dkg.DkgError) as info:
        refresh_all(run, tamper=tamper)
    assert info.value.culprit == culprit
    assert "does not match its commitment" in str(info.value)


@pytest.mark.parametrize("suite", SUITES)
def test_packages_are_checked_like_zf(suite: str) -> None:
    run = run_dkg(suite, 2, 3)
    a, b, c = run.identifiers
    secret, _ = refresh_part1(a, 3, 2, suite=suite)
    create_package = _dkg.part1(b, 3, 2, suite=suite)[1]  # t elements: not a refresh package
    good = refresh_part1(c, 3, 2, suite=suite)[1]
    with pytest.raises(_dkg.DkgError) as info:
        refresh_part2(secret, {b: create_package, c: good})
    assert info.value.culprit == b
    assert secret.used  # consumed whatever happens
    secret, _ = refresh_part1(a, 3, 2, suite=suite)
    with pytest.raises(_dkg.DkgError, match="expected 2 round-1 packages"):
        refresh_part2(secret, {c: good})
    with pytest.raises(_dkg.DkgError, match="already used"):
        refresh_part2(secret, {b: good, c: good})
    with pytest.raises(_dkg.DkgError, match="need 1 coefficients"):
        refresh_part1(a, 3, 2, suite=suite, coefficients=[])


@pytest.mark.parametrize("suite", SUITES)
def test_a_wrong_current_share_is_refused_and_zeroed(suite: str) -> None:
    run = run_dkg(suite, 2, 3)
    idents = run.identifiers
    r1 = {i: refresh_part1(i, 3, 2, suite=suite) for i in idents}
    r2 = {i: refresh_part2(r1[i][0], {j: r1[j][1] for j in idents if j != i}) for i in idents}
    me, other = idents[0], idents[1]
    received = {j: r2[j][1][me] for j in idents if j != me}
    with pytest.raises(_dkg.DkgError, match="does not match its verifying share"):
        refresh_part3(
            r2[me][0],
            {j: r1[j][1] for j in idents if j != me},
            received,
            signing_share=run.keys[other].signing_share,
            verifying_share=run.keys[me].verifying_share,
            group_public_key=run.verifying_key,
        )
    assert r2[me][0].used
    assert all(not any(p.signing_share) for p in received.values())
