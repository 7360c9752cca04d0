"""FROST(secp256k1, SHA-256) for BIP-340/Taproot, ``FROST-secp256k1-SHA256-TR-v1`` as ZF FROST.

Everything not said here is as in :mod:`._secp256k1` (same group, same validation, same
H1/H3/H4/H5 with this suite's contextString, same secret-buffer discipline and the same
limits of what coincurve lets us zero). What ZF's ``frost-secp256k1-tr`` changes:

* H2 is the BIP-340 tagged hash ``SHA256(SHA256("BIP0340/challenge")*2 || m)`` reduced mod n,
  and the challenge hashes only the x coordinates: ``H2(x(R) || x(PK) || msg)``.
* Even Y of the group key: before signing, aggregating or verifying a share, a group key with
  odd Y is negated together with the signing share and every verifying share (ZF
  ``into_even_y``), so the binding factors hash the even-Y key (``02 || x``).
* Even Y of the group commitment: when R has odd Y, each signer negates its two nonces and the
  coordinator negates each commitment share when it verifies a share.
* The signature is 64 bytes, ``x(R) || z``, a BIP-340 signature under the x-only group key.
* The BIP-341 tweak (``sign_with_tweak``/``aggregate_with_tweak``): with a merkle root (even an
  empty one, which is *not* the same as no tweak), ``t = H_TapTweak(x(P) || root)``; the key is
  made even-Y, then ``t`` is added to the signing share and ``t*G`` to the group key and every
  verifying share; signing then makes that tweaked key even-Y again. ``merkle_root=None`` means
  no tweak at all.
* Dealer output is stored as dealt (normalised only when signing); DKG output is tweaked once
  with the empty merkle root (ZF ``post_dkg``, :func:`post_dkg_tweak`) and then signed with
  ``merkle_root=None``.

Negating or tweaking a secret share happens in a ``bytearray`` with libsecp256k1's
``secp256k1_ec_seckey_negate``/``_tweak_add``; the tweak itself is public.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coincurve import PublicKey, PublicKeyXOnly

from .._errors import FrostError
from . import _secp256k1 as k1
from ._secp256k1 import (
    Buffer,
    N,
    Secp256k1Suite,
    SigningCommitment,
    SigningNonces,
    _negate,
    _tweak_add,
    _tweak_mul,
    _zero,
)

__all__ = [
    "SUITE",
    "TaprootSuite",
    "TweakedKey",
    "aggregate",
    "commit",
    "output_key",
    "post_dkg_tweak",
    "sign",
    "tapleaf_tweak",
    "tweak_key",
    "verify",
    "verify_signature_share",
]


def _tagged(tag: str, *parts: bytes) -> bytes:
    tag_hash = hashlib.sha256(tag.encode()).digest()
    return hashlib.sha256(tag_hash + tag_hash + b"".join(parts)).digest()


class TaprootSuite(Secp256k1Suite):
    """``FROST-secp256k1-SHA256-TR-v1``: the secp256k1 suite with BIP-340's challenge."""

    def __init__(self) -> None:
        super().__init__("FROST-secp256k1-SHA256-TR-v1")

    def h2(self, m: bytes) -> int:
        return int.from_bytes(_tagged("BIP0340/challenge", m), "big") % N

    def challenge(self, group_commitment: bytes, group_public_key: bytes, message: bytes) -> int:
        return self.h2(group_commitment[1:] + group_public_key[1:] + message)


SUITE = TaprootSuite()


# -- even Y and the BIP-341 tweak (public side) -------------------------------------------------


def _odd(element: bytes) -> bool:
    return element[0] == 3


def _neg_point(element: bytes) -> bytes:
    return bytes([element[0] ^ 1]) + element[1:]


def _add_tg(element: bytes, t: int) -> bytes:
    if t == 0:
        return element
    try:
        return PublicKey(element).add(t.to_bytes(32, "big")).format(compressed=True)
    except ValueError:  # pragma: no cover - needs a discrete log
        raise FrostError("tweaked key is the identity element") from None


def tapleaf_tweak(group_public_key: bytes, merkle_root: bytes) -> int:
    """BIP-341 ``t = int(H_TapTweak(x(P) || merkle_root)) mod n`` (ZF reduces, as here)."""
    return int.from_bytes(_tagged("TapTweak", group_public_key[1:], merkle_root), "big") % N


@dataclass(frozen=True, slots=True)
class TweakedKey:
    """How to turn dealt key material into what signs: ``s' = f * (e * s + t)``.

    ``e`` and ``f`` are +1 or -1 (the even-Y negations before and after the tweak), ``t`` the
    BIP-341 tweak (0 without one), ``group_public_key`` the even-Y key that signs and whose x
    is the BIP-340 output key.
    """

    first_sign: int
    tweak: int
    second_sign: int
    group_public_key: bytes

    @property
    def x_only(self) -> bytes:
        return self.group_public_key[1:]

    def verifying_share(self, verifying_share: bytes) -> bytes:
        """The same transformation on a (public) verifying share."""
        vs = _neg_point(verifying_share) if self.first_sign < 0 else verifying_share
        vs = _add_tg(vs, self.tweak)
        return _neg_point(vs) if self.second_sign < 0 else vs

    def apply_secret(self, share: bytearray) -> None:
        """The same transformation on a secret share, in place."""
        if self.first_sign < 0:
            _negate(share)
        if self.tweak:
            _tweak_add(share, self.tweak.to_bytes(32, "big"))
        if self.second_sign < 0:
            _negate(share)


def tweak_key(group_public_key: bytes, merkle_root: bytes | None) -> TweakedKey:
    """ZF ``pre_sign`` after an optional ``tweak(merkle_root)``: even Y, tweak, even Y again."""
    pk = SUITE.deserialize_element(group_public_key, "group public key")
    first = -1 if _odd(pk) else 1
    t = 0
    if merkle_root is not None:
        t = tapleaf_tweak(pk, merkle_root)
        pk = _add_tg(_neg_point(pk) if first < 0 else pk, t)
    elif first < 0:
        pk = _neg_point(pk)
    second = -1 if _odd(pk) else 1
    if second < 0:
        pk = _neg_point(pk)
    return TweakedKey(first, t, second, pk)


def post_dkg_tweak(
    signing_share: bytearray, group_public_key: bytes, verifying_shares: Mapping[bytes, bytes]
) -> tuple[bytes, dict[bytes, bytes]]:
    """ZF ``post_dkg``: tweak DKG output once with the empty merkle root, in place.

    Returns the new group key and verifying shares (as ZF stores them: even-Y normalised
    before the tweak, the tweaked key kept with whatever Y it has); sign them afterwards with
    ``merkle_root=None``.
    """
    pk = SUITE.deserialize_element(group_public_key, "group public key")
    t = tapleaf_tweak(pk, b"")
    plan = TweakedKey(-1 if _odd(pk) else 1, t, 1, b"")
    plan.apply_secret(signing_share)
    new_pk = _add_tg(_neg_point(pk) if plan.first_sign < 0 else pk, t)
    return new_pk, {i: plan.verifying_share(vs) for i, vs in verifying_shares.items()}


# -- the rounds ---------------------------------------------------------------------------------


def commit(
    identifier: bytes,
    signing_share: Buffer,
    *,
    hiding_randomness: Buffer | None = None,
    binding_randomness: Buffer | None = None,
) -> SigningNonces:
    """Round one, as RFC 9591 with this suite's H3 (over the share as stored)."""
    return k1.commit(
        identifier,
        signing_share,
        suite=SUITE,
        hiding_randomness=hiding_randomness,
        binding_randomness=binding_randomness,
    )


def sign(
    nonces: SigningNonces,
    *,
    signing_share: Buffer,
    group_public_key: bytes,
    message: bytes,
    commitments: Iterable[SigningCommitment],
    merkle_root: bytes | None = None,
    min_signers: int | None = None,
    max_signers: int | None = None,
) -> bytes:
    """Round two: ``z_i = r * (d_i + e_i * rho_i) + lambda_i * c * s'_i``.

    ``r`` is -1 when the group commitment has odd Y; ``s'_i`` is the share after
    :func:`tweak_key` (even Y, the optional BIP-341 tweak, even Y again). Errors and nonce
    consumption are as in :func:`._secp256k1.sign`.
    """
    if nonces.used:
        raise FrostError("signing nonces were already used")
    if len(signing_share) != 32:
        raise FrostError(f"signing share must be 32 bytes, got {len(signing_share)}")
    plan = tweak_key(group_public_key, merkle_root)
    parsed = k1._parse(
        commitments,
        plan.group_public_key,
        message,
        suite=SUITE,
        min_signers=min_signers,
        max_signers=max_signers,
    )
    own = nonces.commitment
    try:
        index = [c.identifier for c in parsed.commitments].index(own.identifier)
    except ValueError:
        raise FrostError("own commitment is not in the commitment list") from None
    if parsed.commitments[index] != own:
        raise FrostError("own commitment in the list differs from the one this signer made")
    lam = k1.lagrange_coefficient(parsed.ids, parsed.ids[index])
    factor = (lam * parsed.challenge) % N
    acc = bytearray(signing_share)
    tmp = bytearray(nonces.binding)
    try:
        plan.apply_secret(acc)
        _tweak_mul(acc, factor.to_bytes(32, "big"))  # lambda_i * c * s'_i
        _tweak_mul(tmp, parsed.rhos[index].to_bytes(32, "big"))  # e_i * rho_i
        _tweak_add(tmp, nonces.hiding)  # + d_i
        if _odd(parsed.group_commitment):
            _negate(tmp)
        _tweak_add(acc, tmp)
        return bytes(acc)
    finally:
        _zero(acc)
        _zero(tmp)
        nonces.zero()


def _verify_share(
    parsed: k1._Parsed, index: int, verifying_share: bytes, z: int, plan: TweakedKey
) -> bool:
    c = parsed.commitments[index]
    terms = [PublicKey(c.hiding)]
    rho_e = k1._mul_public(c.binding, parsed.rhos[index])
    if rho_e is not None:  # pragma: no branch
        terms.append(rho_e)
    try:
        share = PublicKey.combine_keys(terms).format(compressed=True)
    except ValueError:
        return False
    if _odd(parsed.group_commitment):
        share = _neg_point(share)
    lam = k1.lagrange_coefficient(parsed.ids, parsed.ids[index])
    rhs_terms = [PublicKey(share)]
    vs_term = k1._mul_public(plan.verifying_share(verifying_share), parsed.challenge * lam)
    if vs_term is not None:  # pragma: no branch
        rhs_terms.append(vs_term)
    try:
        rhs = PublicKey.combine_keys(rhs_terms).format(compressed=True)
    except ValueError:
        return z == 0
    return z != 0 and k1.base_mult(z.to_bytes(32, "big")) == rhs


def verify_signature_share(
    *,
    identifier: bytes,
    verifying_share: bytes,
    signature_share: bytes,
    commitments: Iterable[SigningCommitment],
    group_public_key: bytes,
    message: bytes,
    merkle_root: bytes | None = None,
) -> bool:
    """Share verification with the even-Y and tweak adjustments; malformed inputs raise."""
    plan = tweak_key(group_public_key, merkle_root)
    parsed = k1._parse(commitments, plan.group_public_key, message, suite=SUITE)
    SUITE.deserialize_element(verifying_share, "verifying share")
    z = SUITE.deserialize_scalar(signature_share, "signature share")
    try:
        index = [c.identifier for c in parsed.commitments].index(identifier)
    except ValueError:
        raise FrostError("identifier is not in the commitment list") from None
    return _verify_share(parsed, index, verifying_share, z, plan)


def aggregate(
    *,
    commitments: Iterable[SigningCommitment],
    message: bytes,
    group_public_key: bytes,
    signature_shares: Mapping[bytes, bytes],
    verifying_shares: Mapping[bytes, bytes] | None = None,
    merkle_root: bytes | None = None,
) -> bytes:
    """The 64-byte BIP-340 signature ``x(R) || sum z_i`` (ZF ``aggregate_with_tweak``).

    Valid under :func:`output_key` ``(group_public_key, merkle_root)``. With
    ``verifying_shares`` every share is checked first, as in :func:`._secp256k1.aggregate`.
    """
    plan = tweak_key(group_public_key, merkle_root)
    parsed = k1._parse(commitments, plan.group_public_key, message, suite=SUITE)
    z = k1.sum_signature_shares(
        parsed,
        signature_shares,
        verifying_shares,
        lambda index, vs, z_i: _verify_share(parsed, index, vs, z_i, plan),
        SUITE,
    )
    return parsed.group_commitment[1:] + z.to_bytes(32, "big")


def output_key(group_public_key: bytes, merkle_root: bytes | None = None) -> bytes:
    """The 32-byte x-only key the signatures verify under (the Taproot output key)."""
    return tweak_key(group_public_key, merkle_root).x_only


def verify(x_only_key: bytes, message: bytes, signature: bytes) -> bool:
    """BIP-340 verification by libsecp256k1 (``secp256k1_schnorrsig_verify``); never raises."""
    if len(x_only_key) != 32 or len(signature) != 64:
        return False
    try:
        key = PublicKeyXOnly(bytes(x_only_key))
    except ValueError:
        return False
    return bool(key.verify(bytes(signature), bytes(message)))
