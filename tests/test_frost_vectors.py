"""RFC 9591 and ZF FROST vectors: every intermediate value, for FROST(Ed25519, SHA-512)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from trio_sign import FrostError
from trio_sign.crypto import (
    SigningCommitment,
    _frost,
    aggregate,
    commit,
    identifier_to_bytes,
    sign,
    trusted_dealer_keygen,
    verify,
    verify_signature_share,
)
from trio_sign.crypto import _sodium as na

VECTOR_FILES = [
    "frost/rfc9591/frost-ed25519-sha512.json",
    "frost/zcash_frost/frost-ed25519/vectors.json",
    "frost/zcash_frost/frost-ed25519/vectors-big-identifier.json",
]


def _load(vectors_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((vectors_dir / name).read_text())
    return data


def _group_public_key(inputs: dict[str, Any]) -> bytes:
    key = inputs.get("group_public_key") or inputs["verifying_key_key"]
    return bytes.fromhex(key)


@pytest.fixture(params=VECTOR_FILES, ids=["rfc9591", "zf", "zf-big-identifier"])
def vector(request: pytest.FixtureRequest, vectors_dir: Path) -> dict[str, Any]:
    return _load(vectors_dir, request.param)


def test_config_is_ed25519(vector: dict[str, Any]) -> None:
    assert vector["config"]["name"] == "FROST(Ed25519, SHA-512)"


def test_dealer_reproduces_shares_and_group_key(vector: dict[str, Any]) -> None:
    inputs = vector["inputs"]
    cfg = vector["config"]
    shares = inputs["participant_shares"]
    out = trusted_dealer_keygen(
        int(cfg["MIN_PARTICIPANTS"]),
        int(cfg["MAX_PARTICIPANTS"]),
        identifiers=[s["identifier"] for s in shares],
        secret=bytes.fromhex(inputs["group_secret_key"]),
        coefficients=[bytes.fromhex(c) for c in inputs["share_polynomial_coefficients"]],
    )
    assert out.group_public_key == _group_public_key(inputs)
    assert len(out.shares) == len(shares)
    for got, want in zip(out.shares, shares, strict=True):
        assert got.identifier == identifier_to_bytes(want["identifier"])
        assert bytes(got.signing_share) == bytes.fromhex(want["participant_share"])
        # the verifying share is the share times G
        assert len(got.verifying_share) == 32


def test_every_intermediate_value(vector: dict[str, Any]) -> None:
    inputs = vector["inputs"]
    cfg = vector["config"]
    gpk = _group_public_key(inputs)
    message = bytes.fromhex(inputs["message"])
    share_of = {
        s["identifier"]: bytes.fromhex(s["participant_share"]) for s in inputs["participant_shares"]
    }
    r1 = vector["round_one_outputs"]["outputs"]
    r2 = {o["identifier"]: o["sig_share"] for o in vector["round_two_outputs"]["outputs"]}
    assert [o["identifier"] for o in r1] == inputs["participant_list"]

    nonces = {}
    for o in r1:
        ident = o["identifier"]
        n = commit(
            identifier_to_bytes(ident),
            share_of[ident],
            hiding_randomness=bytes.fromhex(o["hiding_nonce_randomness"]),
            binding_randomness=bytes.fromhex(o["binding_nonce_randomness"]),
        )
        assert bytes(n.hiding).hex() == o["hiding_nonce"]
        assert bytes(n.binding).hex() == o["binding_nonce"]
        assert n.commitment.hiding.hex() == o["hiding_nonce_commitment"]
        assert n.commitment.binding.hex() == o["binding_nonce_commitment"]
        nonces[ident] = n
    commitments = [nonces[i].commitment for i in inputs["participant_list"]]

    prefix = _frost.binding_factor_input_prefix(gpk, commitments, message)
    for o in r1:
        bfi = prefix + identifier_to_bytes(o["identifier"])
        assert bfi.hex() == o["binding_factor_input"]
        assert _frost.h1(bfi).to_bytes(32, "little").hex() == o["binding_factor"]

    shares = {}
    for o in r1:
        ident = o["identifier"]
        z = sign(
            nonces[ident],
            signing_share=share_of[ident],
            group_public_key=gpk,
            message=message,
            commitments=commitments,
            min_signers=int(cfg["MIN_PARTICIPANTS"]),
            max_signers=int(cfg["MAX_PARTICIPANTS"]),
        )
        assert z.hex() == r2[ident]
        assert nonces[ident].used
        assert bytes(nonces[ident].hiding) == bytes(32)  # consumed and zeroed
        shares[identifier_to_bytes(ident)] = z

    dealer = trusted_dealer_keygen(
        int(cfg["MIN_PARTICIPANTS"]),
        int(cfg["MAX_PARTICIPANTS"]),
        identifiers=[s["identifier"] for s in inputs["participant_shares"]],
        secret=bytes.fromhex(inputs["group_secret_key"]),
        coefficients=[bytes.fromhex(c) for c in inputs["share_polynomial_coefficients"]],
    )
    verifying = {d.identifier: d.verifying_share for d in dealer.shares}
    for ident, z in shares.items():
        assert verify_signature_share(
            identifier=ident,
            verifying_share=verifying[ident],
            signature_share=z,
            commitments=commitments,
            group_public_key=gpk,
            message=message,
        )

    sig = aggregate(
        commitments=commitments,
        message=message,
        group_public_key=gpk,
        signature_shares=shares,
        verifying_shares=verifying,
    )
    assert sig.hex() == vector["final_output"]["sig"]
    assert verify(gpk, message, sig)
    nacl.signing.VerifyKey(gpk).verify(message, sig)


def test_zf_invalid_element_is_rejected_as_commitment(vectors_dir: Path) -> None:
    bad = bytes.fromhex(
        _load(vectors_dir, "frost/zcash_frost/frost-ed25519/elements.json")["elements"][
            "invalid_element"
        ]
    )
    assert not na.is_valid_point(bad)
    out = trusted_dealer_keygen(2, 3)
    s1, s2 = out.shares[0], out.shares[1]
    n1 = commit(s1.identifier, s1.signing_share)
    n2 = commit(s2.identifier, s2.signing_share)
    for field in ("hiding", "binding"):
        peer = n2.commitment
        forged = SigningCommitment(
            peer.identifier,
            bad if field == "hiding" else peer.hiding,
            bad if field == "binding" else peer.binding,
        )
        with pytest.raises(FrostError, match=f"{field} commitment .* not a valid element"):
            sign(
                n1,
                signing_share=s1.signing_share,
                group_public_key=out.group_public_key,
                message=b"m",
                commitments=[n1.commitment, forged],
            )
        assert not n1.used  # validation failures leave the nonces usable
