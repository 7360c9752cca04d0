"""Shared by the DKG, repair and frost-rs interop tests: run a whole DKG in one process, and
sign with its output through each suite's own signing functions."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from trio_sign.crypto import _dkg, _frost
from trio_sign.crypto import _secp256k1 as k1
from trio_sign.crypto import _secp256k1_tr as tr
from trio_sign.crypto._group import Group, group_for

ED25519 = "FROST-ED25519-SHA512-v1"
SECP256K1 = "FROST-secp256k1-SHA256-v1"
TAPROOT = "FROST-secp256k1-SHA256-TR-v1"
SUITES = [ED25519, SECP256K1, TAPROOT]


@dataclass
class DkgRun:
    group: Group
    identifiers: list[bytes]
    keys: dict[bytes, _dkg.KeyPackage]
    public: dict[bytes, _dkg.PublicKeyPackage]

    @property
    def verifying_key(self) -> bytes:
        return next(iter(self.public.values())).verifying_key

    @property
    def verifying_shares(self) -> dict[bytes, bytes]:
        return dict(next(iter(self.public.values())).verifying_shares)


def run_dkg(
    suite: str, min_signers: int, max_signers: int, ids: Sequence[int] | None = None
) -> DkgRun:
    """Every participant's part1, part2 and part3, messages passed in memory."""
    group = group_for(suite)
    values = list(ids) if ids is not None else list(range(1, max_signers + 1))
    idents = [group.identifier_to_bytes(v) for v in values]
    r1 = {i: _dkg.part1(i, max_signers, min_signers, suite=suite) for i in idents}
    r2 = {i: _dkg.part2(r1[i][0], {j: r1[j][1] for j in idents if j != i}) for i in idents}
    keys: dict[bytes, _dkg.KeyPackage] = {}
    public: dict[bytes, _dkg.PublicKeyPackage] = {}
    for i in idents:
        keys[i], public[i] = _dkg.part3(
            r2[i][0],
            {j: r1[j][1] for j in idents if j != i},
            {j: r2[j][1][i] for j in idents if j != i},
        )
    return DkgRun(group, idents, keys, public)


def sort_ids(group: Group, idents: Sequence[bytes]) -> list[bytes]:
    return sorted(idents, key=group.identifier_from_bytes)


def sign(
    suite: str,
    signers: dict[bytes, bytearray],
    verifying_key: bytes,
    verifying_shares: dict[bytes, bytes],
    message: bytes,
) -> bytes:
    """A whole FROST session (commit, sign, aggregate with every share checked) with the
    suite's own functions; returns the aggregate signature."""
    group = group_for(suite)
    order = sort_ids(group, list(signers))
    shares: dict[bytes, bytes] = {}
    if suite == ED25519:
        ed_nonces = {i: _frost.commit(i, signers[i]) for i in order}
        ed_list = [ed_nonces[i].commitment for i in order]
        for i in order:
            shares[i] = _frost.sign(
                ed_nonces[i],
                signing_share=signers[i],
                group_public_key=verifying_key,
                message=message,
                commitments=ed_list,
            )
        return _frost.aggregate(
            commitments=ed_list,
            message=message,
            group_public_key=verifying_key,
            signature_shares=shares,
            verifying_shares=verifying_shares,
        )
    if suite == SECP256K1:
        nonces = {i: k1.commit(i, signers[i]) for i in order}
        clist = [nonces[i].commitment for i in order]
        for i in order:
            shares[i] = k1.sign(
                nonces[i],
                signing_share=signers[i],
                group_public_key=verifying_key,
                message=message,
                commitments=clist,
            )
        return k1.aggregate(
            commitments=clist,
            message=message,
            group_public_key=verifying_key,
            signature_shares=shares,
            verifying_shares=verifying_shares,
        )
    nonces = {i: tr.commit(i, signers[i]) for i in order}
    clist = [nonces[i].commitment for i in order]
    for i in order:
        shares[i] = tr.sign(
            nonces[i],
            signing_share=signers[i],
            group_public_key=verifying_key,
            message=message,
            commitments=clist,
            merkle_root=None,
        )
    return tr.aggregate(
        commitments=clist,
        message=message,
        group_public_key=verifying_key,
        signature_shares=shares,
        verifying_shares=verifying_shares,
        merkle_root=None,
    )


def verify(suite: str, verifying_key: bytes, message: bytes, signature: bytes) -> bool:
    """The suite's independent verifier: libsodium Ed25519, RFC 9591 secp256k1, and BIP-340
    (libsecp256k1) under the x-only key for Taproot DKG output (stored tweaked, so no further
    tweak: ``merkle_root=None``)."""
    if suite == ED25519:
        return _frost.verify(verifying_key, message, signature)
    if suite == SECP256K1:
        return k1.verify(verifying_key, message, signature)
    return tr.verify(verifying_key[1:], message, signature)


def sign_with_run(run: DkgRun, signer_ids: Sequence[bytes], message: bytes | None = None) -> bool:
    """Sign a random (or given) message with these signers of a DKG run and verify it."""
    msg = message if message is not None else secrets.token_bytes(32)
    signers = {i: run.keys[i].signing_share for i in signer_ids}
    signature = sign(run.group.name, signers, run.verifying_key, run.verifying_shares, msg)
    return verify(run.group.name, run.verifying_key, msg, signature)
