"""ZF FROST's DKG (``trio_sign.crypto._dkg``) for the three suites: every value of ZF's
``vectors_dkg.json``, whole DKGs with 3 and 5 participants then signing with the result,
refusals that name the culprit, zeroing, and Hypothesis over small (min, max)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign import FrostError
from trio_sign.crypto import _dkg
from trio_sign.crypto import _secp256k1_tr as tr
from trio_sign.crypto._dkg import DkgError, Round1Package, Round2Package
from trio_sign.crypto._group import Group, group_for, lagrange_at

from .dkg_helpers import ED25519, SECP256K1, SUITES, TAPROOT, run_dkg, sign_with_run
from .share_helpers import ORDER_8

VECTOR_DIRS = {
    ED25519: "frost-ed25519",
    SECP256K1: "frost-secp256k1",
    TAPROOT: "frost-secp256k1-tr",
}

#: The keys of a participant in ``vectors_dkg.json`` that ZF's ``check_dkg_keygen`` reads, all of
#: which the vector tests below check.
PARTICIPANT_KEYS = {
    "identifier",
    "signing_key",
    "coefficient",
    "vss_commitments",
    "proof_of_knowledge",
    "signing_shares",
    "verifying_share",
    "signing_share",
}


@pytest.fixture(params=SUITES)
def suite(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _load(vectors_dir: Path, suite: str) -> dict[str, Any]:
    path = vectors_dir / "frost" / "zcash_frost" / VECTOR_DIRS[suite] / "vectors_dkg.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _participants(vector: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in vector["inputs"].items() if k.isdigit()}


# -- ZF's vectors_dkg.json ----------------------------------------------------------------------


def test_vector_layout_is_what_zf_checks(vectors_dir: Path, suite: str) -> None:
    """Every participant value is one ZF's check reads, except the Ed25519 file's ``secret``
    (and its top-level ``secret``): ZF's ``check_dkg_keygen`` never reads them, and they are
    not the group secret or any participant's share of this DKG (their images are not the
    verifying key or any commitment), so there is nothing to reproduce."""
    vector = _load(vectors_dir, suite)
    group = group_for(suite)
    assert vector["config"]["MIN_PARTICIPANTS"] == 2
    assert vector["config"]["MAX_PARTICIPANTS"] == 3
    for p in _participants(vector).values():
        extra = set(p) - PARTICIPANT_KEYS
        assert extra == ({"secret"} if suite == ED25519 else set())
        if extra:
            image = group.base_mult(bytes.fromhex(p["secret"]))
            assert image not in {*map(bytes.fromhex, p["vss_commitments"])}
    top = set(vector["inputs"]) - set(_participants(vector))
    assert top == ({"verifying_key", "secret"} if suite == ED25519 else {"verifying_key"})


def _round1_from_vector(
    group: Group, vector: dict[str, Any]
) -> dict[bytes, tuple[_dkg.Round1Secret, Round1Package, dict[str, Any]]]:
    out = {}
    cfg = vector["config"]
    for p in _participants(vector).values():
        ident = group.identifier_to_bytes(p["identifier"])
        secret, package = _dkg.part1(
            ident,
            cfg["MAX_PARTICIPANTS"],
            cfg["MIN_PARTICIPANTS"],
            suite=group.name,
            coefficients=[bytes.fromhex(p["signing_key"]), bytes.fromhex(p["coefficient"])],
        )
        out[ident] = (secret, package, p)
    return out


def test_vector_commitments_and_proofs(vectors_dir: Path, suite: str) -> None:
    group = group_for(suite)
    vector = _load(vectors_dir, suite)
    for ident, (secret, package, p) in _round1_from_vector(group, vector).items():
        # The VSS commitment of (signing_key, coefficient) is vss_commitments.
        assert [c.hex() for c in package.commitment] == p["vss_commitments"]
        assert package.verifying_key == bytes.fromhex(p["vss_commitments"][0])
        # ZF's proof verifies under our check; ours (fresh nonce) does too, and has ZF's size.
        zf_proof = bytes.fromhex(p["proof_of_knowledge"])
        _dkg.verify_proof_of_knowledge(group, ident, package.commitment, zf_proof)
        _dkg.verify_proof_of_knowledge(group, ident, package.commitment, package.proof_of_knowledge)
        assert len(package.proof_of_knowledge) == len(zf_proof)
        # The proof is bound to the identifier.
        other = group.identifier_to_bytes(p["identifier"] % 3 + 1)
        with pytest.raises(DkgError) as info:
            _dkg.verify_proof_of_knowledge(group, other, package.commitment, zf_proof)
        assert info.value.culprit == other
        secret.zero()


def test_vector_round2_shares(vectors_dir: Path, suite: str) -> None:
    """part2's share for participant j is what j's ``signing_shares`` says it received."""
    group = group_for(suite)
    vector = _load(vectors_dir, suite)
    r1 = _round1_from_vector(group, vector)
    for ident, (secret, _, p) in r1.items():
        others = {j: r1[j][1] for j in r1 if j != ident}
        r2_secret, outgoing = _dkg.part2(secret, others)
        assert secret.used
        for j, package in outgoing.items():
            sender = str(p["identifier"])
            assert package.signing_share.hex() == r1[j][2]["signing_shares"][sender]
        r2_secret.zero()


def test_vector_round3_outputs(vectors_dir: Path, suite: str) -> None:
    """part3 with ZF's received shares and proofs gives ZF's signing share, verifying share,
    group key and every verifying share (for Taproot: after ZF's post-DKG tweak)."""
    group = group_for(suite)
    vector = _load(vectors_dir, suite)
    r1 = _round1_from_vector(group, vector)
    zf_packages = {
        i: Round1Package(package.commitment, bytes.fromhex(p["proof_of_knowledge"]))
        for i, (_, package, p) in r1.items()
    }
    by_id = {group.identifier_to_bytes(p["identifier"]): p for _, _, p in r1.values()}
    for ident, (secret, _, p) in r1.items():
        others = {j: zf_packages[j] for j in r1 if j != ident}
        r2_secret, _ = _dkg.part2(secret, others)
        received = {
            j: Round2Package(bytearray.fromhex(p["signing_shares"][str(by_id[j]["identifier"])]))
            for j in others
        }
        key, public = _dkg.part3(r2_secret, others, received)
        assert key.signing_share.hex() == p["signing_share"]
        assert key.verifying_share.hex() == p["verifying_share"]
        assert key.verifying_key.hex() == vector["inputs"]["verifying_key"]
        assert key.identifier == ident
        assert key.min_signers == public.min_signers == 2
        assert public.verifying_key == key.verifying_key
        assert {j: v.hex() for j, v in public.verifying_shares.items()} == {
            j: q["verifying_share"] for j, q in by_id.items()
        }
        # consumed: the round-2 secret and what was received are zeroed
        assert r2_secret.used
        assert not any(r2_secret.secret_share)
        assert all(not any(r.signing_share) for r in received.values())
        key.zero()


def test_vector_taproot_key_is_the_bip341_output_of_the_untweaked_key(vectors_dir: Path) -> None:
    """ZF's post-DKG step: the stored key is P + H_TapTweak(x(P))*G (P the plain DKG key)."""
    vector = _load(vectors_dir, TAPROOT)
    commitments = [bytes.fromhex(p["vss_commitments"][0]) for p in _participants(vector).values()]
    internal = group_for(TAPROOT).sum_points(commitments, "group key")
    stored = bytes.fromhex(vector["inputs"]["verifying_key"])
    assert stored != internal
    assert tr.output_key(internal, b"") == stored[1:]


# -- whole DKGs, then signing -------------------------------------------------------------------


@pytest.mark.parametrize(("min_signers", "max_signers"), [(2, 3), (3, 5)])
def test_dkg_then_sign(suite: str, min_signers: int, max_signers: int) -> None:
    run = run_dkg(suite, min_signers, max_signers)
    group = run.group
    # every participant agrees on the public output
    assert (
        len(
            {
                (p.verifying_key, tuple(sorted(p.verifying_shares.items())))
                for p in run.public.values()
            }
        )
        == 1
    )
    for ident, key in run.keys.items():
        assert key.verifying_key == run.verifying_key
        assert key.verifying_share == run.verifying_shares[ident]
        if suite != TAPROOT:
            assert group.base_mult(key.signing_share) == key.verifying_share
    # two different quorums sign and verify with the suite's independent verifier
    assert sign_with_run(run, run.identifiers[:min_signers])
    assert sign_with_run(run, run.identifiers[-min_signers:])


def test_taproot_dkg_output_is_tweaked_once() -> None:
    """The Taproot DKG output is P + t*G after even-Y (ZF ``post_dkg``): its verifying shares
    are s_i' * G for the stored shares, and it signs with no further tweak."""
    run = run_dkg(TAPROOT, 2, 3)
    for ident, key in run.keys.items():
        assert run.group.base_mult(key.signing_share) == key.verifying_share
        assert key.verifying_share == run.verifying_shares[ident]
    assert tr.output_key(run.verifying_key, None) == run.verifying_key[1:]
    assert sign_with_run(run, run.identifiers[:2])


def test_repr_and_zero_hide_secrets(suite: str) -> None:
    group = group_for(suite)
    ids = [group.identifier_to_bytes(i) for i in (1, 2, 3)]
    r1 = {i: _dkg.part1(i, 3, 2, suite=suite) for i in ids}
    secret = r1[ids[0]][0]
    coefficient_hex = {bytes(c).hex() for c in secret._coefficients}
    assert not any(h in repr(secret) for h in coefficient_hex)
    r2 = {i: _dkg.part2(r1[i][0], {j: r1[j][1] for j in ids if j != i}) for i in ids}
    assert all(not any(c) for c in secret._coefficients)
    assert "used" in repr(secret)
    share_hex = r2[ids[0]][0].secret_share.hex()
    assert share_hex not in repr(r2[ids[0]][0])
    outgoing = r2[ids[0]][1][ids[1]]
    assert outgoing.signing_share.hex() not in repr(outgoing)
    key, public = _dkg.part3(
        r2[ids[0]][0], {j: r1[j][1] for j in ids[1:]}, {j: r2[j][1][ids[0]] for j in ids[1:]}
    )
    assert key.signing_share.hex() not in repr(key)
    assert key.signing_share.hex() not in repr(public)
    key.zero()
    assert not any(key.signing_share)


# -- refusals -----------------------------------------------------------------------------------


class Started:
    """Three participants after part1, so tests can tamper with what participant 1 receives."""

    def __init__(self, suite: str, min_signers: int = 2, max_signers: int = 3) -> None:
        self.group = group_for(suite)
        self.ids = [self.group.identifier_to_bytes(i) for i in range(1, max_signers + 1)]
        self.r1 = {i: _dkg.part1(i, max_signers, min_signers, suite=suite) for i in self.ids}
        self.me = self.ids[0]

    def received(self, me: bytes | None = None) -> dict[bytes, Round1Package]:
        me = me or self.me
        return {j: self.r1[j][1] for j in self.ids if j != me}

    def round2(
        self,
    ) -> tuple[dict[bytes, _dkg.Round2Secret], dict[bytes, dict[bytes, Round2Package]]]:
        secrets_: dict[bytes, _dkg.Round2Secret] = {}
        packages: dict[bytes, dict[bytes, Round2Package]] = {}
        for i in self.ids:
            secrets_[i], packages[i] = _dkg.part2(self.r1[i][0], self.received(i))
        return secrets_, packages


def _expect_culprit(exc: pytest.ExceptionInfo[DkgError], culprit: bytes | None) -> None:
    assert exc.value.culprit == culprit
    assert isinstance(exc.value, FrostError)


def test_bad_proof_of_knowledge_names_its_sender(suite: str) -> None:
    s = Started(suite)
    bad = s.ids[2]
    got = s.received()
    # participant 2's valid proof, replayed as participant 3's: wrong R and mu for phi_3,0
    got[bad] = Round1Package(got[bad].commitment, got[s.ids[1]].proof_of_knowledge)
    with pytest.raises(DkgError, match="proof of knowledge of participant 3 is invalid") as info:
        _dkg.part2(s.r1[s.me][0], got)
    _expect_culprit(info, bad)
    # the failed DKG left no secret behind
    assert s.r1[s.me][0].used
    assert all(not any(c) for c in s.r1[s.me][0]._coefficients)


def test_proof_with_scalar_not_below_the_order_is_refused(suite: str) -> None:
    s = Started(suite)
    bad = s.ids[1]
    got = s.received()
    proof = got[bad].proof_of_knowledge
    z_size = 32
    big = (s.group.order + 1).to_bytes(32, "little" if suite == ED25519 else "big")
    got[bad] = Round1Package(got[bad].commitment, proof[:-z_size] + big)
    with pytest.raises(DkgError, match="not a canonical scalar") as info:
        _dkg.part2(s.r1[s.me][0], got)
    _expect_culprit(info, bad)


def test_share_that_does_not_match_its_commitment_names_its_sender(suite: str) -> None:
    s = Started(suite)
    secrets_, packages = s.round2()
    bad = s.ids[2]
    received = {j: packages[j][s.me] for j in s.ids[1:]}
    tampered = bytearray(received[bad].signing_share)
    s.group.add(tampered, s.group.scalar_bytes(1))
    received[bad] = Round2Package(tampered)
    with pytest.raises(DkgError, match="share from participant 3 does not match") as info:
        _dkg.part3(secrets_[s.me], s.received(), received)
    _expect_culprit(info, bad)
    assert secrets_[s.me].used
    assert not any(secrets_[s.me].secret_share)
    assert all(not any(r.signing_share) for r in received.values())


def test_share_not_below_the_order_names_its_sender(suite: str) -> None:
    s = Started(suite)
    secrets_, packages = s.round2()
    bad = s.ids[1]
    received = {j: packages[j][s.me] for j in s.ids[1:]}
    received[bad] = Round2Package(bytearray(b"\xff" * 32))
    with pytest.raises(DkgError, match="share from participant 2") as info:
        _dkg.part3(secrets_[s.me], s.received(), received)
    _expect_culprit(info, bad)


def _invalid_elements(suite: str) -> dict[str, bytes]:
    if suite == ED25519:
        return {
            "short": bytes(31),
            "long": bytes(33),
            "small-order": ORDER_8,
            "not-on-curve": (2).to_bytes(32, "little"),
        }
    return {
        "short": b"\x02" + bytes(31),
        "long": b"\x02" + bytes(33),
        "uncompressed-prefix": b"\x04" + bytes(32),
        "not-on-curve": b"\x02" + (5).to_bytes(32, "big"),
        "x-not-below-p": b"\x02" + b"\xff" * 32,
    }


def _identities(suite: str) -> dict[str, bytes]:
    if suite == ED25519:
        return {"identity": (1).to_bytes(32, "little")}
    return {"identity-sec1": b"\x00", "identity-zeros": bytes(33)}


@pytest.mark.parametrize("position", [0, 1])
def test_invalid_or_identity_commitment_names_its_sender(suite: str, position: int) -> None:
    for label, element in {**_invalid_elements(suite), **_identities(suite)}.items():
        s = Started(suite)
        bad = s.ids[1]
        got = s.received()
        commitment = list(got[bad].commitment)
        commitment[position] = element
        got[bad] = Round1Package(tuple(commitment), got[bad].proof_of_knowledge)
        with pytest.raises(DkgError, match="commitment element") as info:
            _dkg.part2(s.r1[s.me][0], got)
        assert info.value.culprit == bad, label
        if label.startswith("identity"):
            assert "identity" in str(info.value), label


def test_wrong_length_proof_names_its_sender(suite: str) -> None:
    s = Started(suite)
    bad = s.ids[2]
    got = s.received()
    got[bad] = Round1Package(got[bad].commitment, got[bad].proof_of_knowledge[:-1])
    with pytest.raises(DkgError, match="proof of knowledge of participant 3 must be") as info:
        _dkg.part2(s.r1[s.me][0], got)
    _expect_culprit(info, bad)


def test_commitment_of_the_wrong_length_names_its_sender(suite: str) -> None:
    s = Started(suite)
    bad = s.ids[1]
    got = s.received()
    got[bad] = Round1Package(got[bad].commitment[:1], got[bad].proof_of_knowledge)
    with pytest.raises(DkgError, match="has 1 elements, expected 2") as info:
        _dkg.part2(s.r1[s.me][0], got)
    _expect_culprit(info, bad)


def test_duplicate_identifier_own_among_received(suite: str) -> None:
    """A relay that presents our own identifier as another participant's is refused."""
    s = Started(suite)
    got = s.received()
    del got[s.ids[2]]
    got[s.me] = s.r1[s.me][1]
    with pytest.raises(DkgError, match="own identifier 1") as info:
        _dkg.part2(s.r1[s.me][0], got)
    _expect_culprit(info, s.me)


def test_duplicate_identifier_in_a_run_is_refused(suite: str) -> None:
    """Two participants with the same identifier: the one whose package collides with ours is
    named, and a second copy of an identifier cannot be smuggled in non-canonical form."""
    group = group_for(suite)
    one = group.identifier_to_bytes(1)
    two = group.identifier_to_bytes(2)
    a = _dkg.part1(one, 3, 2, suite=suite)
    b = _dkg.part1(two, 3, 2, suite=suite)
    c = _dkg.part1(one, 3, 2, suite=suite)  # a second participant claiming identifier 1
    with pytest.raises(DkgError, match="own identifier") as info:
        _dkg.part2(a[0], {two: b[1], one: c[1]})
    _expect_culprit(info, one)
    alias = (group.order + 2).to_bytes(32, "little" if suite == ED25519 else "big")
    with pytest.raises(DkgError, match="identifier") as info:
        _dkg.part2(b[0], {one: a[1], alias: c[1]})
    _expect_culprit(info, alias)


def test_wrong_number_of_packages(suite: str) -> None:
    s = Started(suite)
    got = s.received()
    del got[s.ids[1]]
    with pytest.raises(DkgError, match="expected 2 round-1 packages") as info:
        _dkg.part2(s.r1[s.me][0], got)
    _expect_culprit(info, None)


def test_round2_packages_from_the_wrong_senders(suite: str) -> None:
    s = Started(suite)
    secrets_, packages = s.round2()
    received = {s.ids[1]: packages[s.ids[1]][s.me]}
    with pytest.raises(DkgError, match="1 missing") as info:
        _dkg.part3(secrets_[s.me], s.received(), received)
    _expect_culprit(info, s.ids[2])


def test_secrets_are_single_use(suite: str) -> None:
    s = Started(suite)
    secrets_, packages = s.round2()
    with pytest.raises(DkgError, match="already used"):
        _dkg.part2(s.r1[s.me][0], s.received())
    received = {j: packages[j][s.me] for j in s.ids[1:]}
    _dkg.part3(secrets_[s.me], s.received(), received)
    with pytest.raises(DkgError, match="already used"):
        _dkg.part3(secrets_[s.me], s.received(), received)


def test_bad_parameters(suite: str) -> None:
    group = group_for(suite)
    one = group.identifier_to_bytes(1)
    with pytest.raises(DkgError, match="min_signers must be at least 2"):
        _dkg.part1(one, 3, 1, suite=suite)
    with pytest.raises(DkgError, match="must not exceed"):
        _dkg.part1(one, 2, 3, suite=suite)
    with pytest.raises(DkgError, match="own identifier"):
        _dkg.part1(bytes(32), 3, 2, suite=suite)
    with pytest.raises(DkgError, match="need 2 coefficients"):
        _dkg.part1(one, 3, 2, suite=suite, coefficients=[group.scalar_bytes(5)])
    with pytest.raises(DkgError, match="coefficient is zero"):
        _dkg.part1(one, 3, 2, suite=suite, coefficients=[group.scalar_bytes(5), bytes(32)])
    with pytest.raises(FrostError, match="unknown ciphersuite"):
        _dkg.part1(one, 3, 2, suite="FROST-P256-SHA256-v1")


# -- Hypothesis over small (min, max) -----------------------------------------------------------


@st.composite
def _shapes(draw: st.DrawFn) -> tuple[int, int, list[int], list[int]]:
    min_signers = draw(st.integers(2, 4))
    max_signers = draw(st.integers(min_signers, 5))
    ids = draw(
        st.lists(
            st.one_of(st.integers(1, 1000), st.integers(2**200, 2**240)),
            min_size=max_signers,
            max_size=max_signers,
            unique=True,
        )
    )
    quorum = draw(st.permutations(range(max_signers)))[:min_signers]
    return min_signers, max_signers, ids, quorum


@pytest.mark.parametrize("name", SUITES)
@settings(max_examples=6, deadline=None)
@given(shape=_shapes())
def test_random_shapes(name: str, shape: tuple[int, int, list[int], list[int]]) -> None:
    min_signers, max_signers, ids, quorum = shape
    run = run_dkg(name, min_signers, max_signers, ids)
    group = run.group
    # any min_signers verifying shares interpolate to the group key (public check)
    chosen = [run.identifiers[k] for k in quorum]
    values = [group.identifier_from_bytes(i) for i in chosen]
    terms = []
    for ident, x in zip(chosen, values, strict=True):
        term = group.mul_point(run.verifying_shares[ident], lagrange_at(values, x, 0, group.order))
        assert term is not None
        terms.append(term)
    assert group.sum_points(terms, "interpolated key") == run.verifying_key
    assert sign_with_run(run, chosen)


# -- the group adapter's secret arithmetic against Python ints ----------------------------------


def _scalar_strategy(order: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 2, order - 1, order - 2]), st.integers(0, order - 1))


def _to_int(group: Group, buf: bytes | bytearray) -> int:
    return int.from_bytes(buf, "little" if group.name == ED25519 else "big")


@pytest.mark.parametrize("name", SUITES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_group_arithmetic_matches_integers(name: str, data: st.DataObject) -> None:
    """add/mul/negate/evaluate in buffers, zero operands and zero results included (libsecp256k1
    has no zero secret key, so the secp256k1 adapter handles those itself)."""
    group = group_for(name)
    q = group.order
    a, b = data.draw(_scalar_strategy(q)), data.draw(_scalar_strategy(q))
    acc = bytearray(group.scalar_bytes(a))
    group.add(acc, group.scalar_bytes(b))
    assert _to_int(group, acc) == (a + b) % q
    acc = bytearray(group.scalar_bytes(a))
    group.add(acc, group.scalar_bytes((-a) % q))
    assert _to_int(group, acc) == 0
    acc = bytearray(group.scalar_bytes(a))
    group.mul(acc, group.scalar_bytes(b))
    assert _to_int(group, acc) == a * b % q
    acc = bytearray(group.scalar_bytes(a))
    group.negate(acc)
    assert _to_int(group, acc) == (-a) % q
    coefficients = [data.draw(_scalar_strategy(q)) for _ in range(data.draw(st.integers(1, 4)))]
    x = data.draw(st.integers(1, 2**64))
    out = group.new_scalar()
    group.evaluate(out, [group.scalar_bytes(c) for c in coefficients], group.scalar_bytes(x))
    assert _to_int(group, out) == sum(c * pow(x, k, q) for k, c in enumerate(coefficients)) % q
