"""ZF's repairable threshold scheme (``trio_sign.crypto._repair``) for the three suites: every
value of ZF's ``repair-share.json``, ZF's step-1 property, whole repairs of DKG output (and
signing with the repaired share), and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign.crypto import _repair
from trio_sign.crypto._dkg import DkgError
from trio_sign.crypto._group import group_for, lagrange_at

from .dkg_helpers import ED25519, SECP256K1, SUITES, TAPROOT, run_dkg, sign_with_run

VECTOR_DIRS = {
    ED25519: "frost-ed25519",
    SECP256K1: "frost-secp256k1",
    TAPROOT: "frost-secp256k1-tr",
}


@pytest.fixture(params=SUITES)
def suite(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _load(vectors_dir: Path, suite: str) -> dict[str, Any]:
    path = vectors_dir / "frost" / "zcash_frost" / VECTOR_DIRS[suite] / "repair-share.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _keyed(suite: str, values: list[str]) -> dict[bytes, bytearray]:
    """Values keyed by helper identifiers 1..n (ZF's steps take a plain list)."""
    group = group_for(suite)
    return {group.identifier_to_bytes(k + 1): bytearray.fromhex(v) for k, v in enumerate(values)}


def test_vector_layout(vectors_dir: Path, suite: str) -> None:
    vector = _load(vectors_dir, suite)
    assert set(vector) == {"scalar_generation", "sigma_generation"}
    assert set(vector["scalar_generation"]) == {
        "random_scalar_1",
        "random_scalar_2",
        "random_scalar_3",
        "random_scalar_sum",
    }
    assert set(vector["sigma_generation"]) == {f"sigma_{k}" for k in (1, 2, 3, 4)} | {"sigma_sum"}


def test_vector_step_2(vectors_dir: Path, suite: str) -> None:
    """ZF ``check_repair_share_step_2``: sigma of the three random scalars is their sum."""
    values = _load(vectors_dir, suite)["scalar_generation"]
    deltas = _keyed(suite, [values[f"random_scalar_{k}"] for k in (1, 2, 3)])
    sigma = _repair.repair_share_step_2(deltas, suite=suite)
    assert sigma.hex() == values["random_scalar_sum"]


def test_vector_step_3(vectors_dir: Path, suite: str) -> None:
    """ZF ``check_repair_share_step_3``: the repaired share is the sum of the four sigmas."""
    values = _load(vectors_dir, suite)["sigma_generation"]
    sigmas = _keyed(suite, [values[f"sigma_{k}"] for k in (1, 2, 3, 4)])
    group = group_for(suite)
    share = _repair.repair_share_step_3(sigmas, group.identifier_to_bytes(2), suite=suite)
    assert share.hex() == values["sigma_sum"]
    # with the verifying share of that sum, the check passes; with another, it refuses
    expected = group.base_mult(share)
    again = _repair.repair_share_step_3(
        sigmas, group.identifier_to_bytes(2), suite=suite, verifying_share=expected
    )
    assert again == share
    with pytest.raises(DkgError, match="does not match"):
        _repair.repair_share_step_3(
            sigmas,
            group.identifier_to_bytes(2),
            suite=suite,
            verifying_share=group.base_mult(group.scalar_bytes(7)),
        )


def test_step_1_deltas_sum_to_zeta_times_share(suite: str) -> None:
    """ZF ``check_repair_share_step_1``: for helper 4 of {1, 4, 5} repairing 2 (3-of-5), the
    deltas add up to zeta_4 * s_4; the first helpers (by identifier) get the random values."""
    run = run_dkg(suite, 3, 5)
    group = run.group
    ids = run.identifiers
    helpers = [ids[0], ids[3], ids[4]]
    randoms = [group.scalar_bytes(11), group.scalar_bytes(22)]
    deltas = _repair.repair_share_step_1(
        helpers, ids[3], run.keys[ids[3]].signing_share, ids[1], suite=suite, random_values=randoms
    )
    assert list(deltas) == helpers
    assert bytes(deltas[ids[0]]) == randoms[0]
    assert bytes(deltas[ids[3]]) == randoms[1]
    total = group.new_scalar()
    for d in deltas.values():
        group.add(total, d)
    zeta = lagrange_at([1, 4, 5], 4, 2, group.order)
    expected = bytearray(run.keys[ids[3]].signing_share)
    group.mul(expected, group.scalar_bytes(zeta))
    assert total == expected


@pytest.mark.parametrize(
    ("min_signers", "max_signers", "lost", "helpers"),
    [
        (3, 5, 1, [0, 3, 4]),
        (2, 3, 2, [0, 1]),
        (3, 5, 4, [0, 1, 2, 3]),
    ],
)
def test_repair_dkg_output_then_sign(
    suite: str, min_signers: int, max_signers: int, lost: int, helpers: list[int]
) -> None:
    """ZF ``check_rts`` on DKG output (for Taproot: the stored, tweaked shares): the repaired
    share equals the lost one, matches its verifying share and signs."""
    run = run_dkg(suite, min_signers, max_signers)
    ids = run.identifiers
    participant = ids[lost]
    helper_ids = [ids[k] for k in helpers]
    deltas = {
        h: _repair.repair_share_step_1(
            helper_ids, h, run.keys[h].signing_share, participant, suite=suite
        )
        for h in helper_ids
    }
    sigmas = {
        j: _repair.repair_share_step_2({h: deltas[h][j] for h in helper_ids}, suite=suite)
        for j in helper_ids
    }
    repaired = _repair.repair_share_step_3(
        sigmas, participant, suite=suite, verifying_share=run.verifying_shares[participant]
    )
    assert repaired == run.keys[participant].signing_share
    run.keys[participant].zero()  # lost ...
    run.keys[participant].signing_share[:] = repaired  # ... and repaired
    others = [i for i in ids if i != participant][: min_signers - 1]
    assert sign_with_run(run, [participant, *others])


def test_step_1_refusals(suite: str) -> None:
    run = run_dkg(suite, 2, 3)
    one, two, three = run.identifiers
    share = run.keys[one].signing_share
    with pytest.raises(DkgError, match="at least 2 helpers"):
        _repair.repair_share_step_1([one], one, share, two, suite=suite)
    with pytest.raises(DkgError, match="duplicate helper identifier 1") as info:
        _repair.repair_share_step_1([one, one], one, share, two, suite=suite)
    assert info.value.culprit == one
    with pytest.raises(DkgError, match="not in the helper list"):
        _repair.repair_share_step_1([two, three], one, share, two, suite=suite)
    with pytest.raises(DkgError, match="cannot be one of its helpers"):
        _repair.repair_share_step_1([one, two], one, share, two, suite=suite)
    with pytest.raises(DkgError, match="helper identifier") as info:
        _repair.repair_share_step_1([one, bytes(32)], one, share, three, suite=suite)
    assert info.value.culprit == bytes(32)
    with pytest.raises(DkgError, match="signing share is not a canonical scalar"):
        _repair.repair_share_step_1([one, three], one, bytearray(b"\xff" * 32), two, suite=suite)
    with pytest.raises(DkgError, match="random value must be 32 bytes"):
        _repair.repair_share_step_1(
            [one, three], one, share, two, suite=suite, random_values=[bytes(31)]
        )
    with pytest.raises(DkgError, match="need 1 random values"):
        _repair.repair_share_step_1([one, three], one, share, two, suite=suite, random_values=[])


def test_step_3_refuses_an_invalid_verifying_share(suite: str) -> None:
    group = group_for(suite)
    sigmas = {group.identifier_to_bytes(1): bytearray(group.scalar_bytes(5))}
    with pytest.raises(DkgError, match="verifying share"):
        _repair.repair_share_step_3(
            sigmas, group.identifier_to_bytes(2), suite=suite, verifying_share=b"\x05" * 7
        )


def test_malformed_delta_or_sigma_names_the_helper(suite: str) -> None:
    group = group_for(suite)
    one, two = group.identifier_to_bytes(1), group.identifier_to_bytes(2)
    good = bytearray(group.scalar_bytes(3))
    bad = {one: good, two: bytearray(b"\xff" * 32)}
    with pytest.raises(DkgError, match="delta from helper 2") as info:
        _repair.repair_share_step_2(bad, suite=suite)
    assert info.value.culprit == two
    with pytest.raises(DkgError, match="sigma from helper 2") as info:
        _repair.repair_share_step_3(bad, group.identifier_to_bytes(3), suite=suite)
    assert info.value.culprit == two
    with pytest.raises(DkgError, match="must be 32 bytes") as info:
        _repair.repair_share_step_2({one: good, two: bytearray(31)}, suite=suite)
    assert info.value.culprit == two


@st.composite
def _repairs(draw: st.DrawFn) -> tuple[int, int, int, list[int]]:
    min_signers = draw(st.integers(2, 4))
    max_signers = draw(st.integers(min_signers + 1, 6))
    lost = draw(st.integers(0, max_signers - 1))
    others = [k for k in range(max_signers) if k != lost]
    count = draw(st.integers(min_signers, len(others)))
    helpers = draw(st.permutations(others))[:count]
    return min_signers, max_signers, lost, helpers


@pytest.mark.parametrize("name", SUITES)
@settings(max_examples=5, deadline=None)
@given(shape=_repairs())
def test_random_repairs(name: str, shape: tuple[int, int, int, list[int]]) -> None:
    """Any lost participant, any helper set of at least min_signers (in any order)."""
    min_signers, max_signers, lost, helpers = shape
    run = run_dkg(name, min_signers, max_signers)
    ids = run.identifiers
    helper_ids = [ids[k] for k in helpers]
    deltas = {
        h: _repair.repair_share_step_1(
            helper_ids, h, run.keys[h].signing_share, ids[lost], suite=name
        )
        for h in helper_ids
    }
    sigmas = {
        j: _repair.repair_share_step_2({h: deltas[h][j] for h in helper_ids}, suite=name)
        for j in helper_ids
    }
    repaired = _repair.repair_share_step_3(
        sigmas, ids[lost], suite=name, verifying_share=run.verifying_shares[ids[lost]]
    )
    assert repaired == run.keys[ids[lost]].signing_share
