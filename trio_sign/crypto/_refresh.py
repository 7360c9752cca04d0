"""Share refresh by DKG (ZF ``keys::refresh``: ``refresh_dkg_part_1``/``part2``/``shares``).

Every participant of an existing key runs a DKG whose secret polynomial has a **zero constant
term**; each adds the shares it receives (and its own) to its current signing share. The
secret, and so the group key, is unchanged; every share changes, and shares from before and
after the refresh do not combine. Exactly ZF's ``refresh_dkg_*`` functions for the three
suites:

* :func:`refresh_part1` (ZF ``refresh_dkg_part_1``): coefficients ``(0, a_1, ..., a_{t-1})``
  with the ``a_k`` random; the commitment **leaves the identity ``phi_0`` out**, so it has
  ``min_signers - 1`` elements. The package still carries a proof of knowledge, computed as
  ZF computes it: ``compute_proof_of_knowledge`` over the zero constant term and the first
  element sent (``phi_1``), so ``mu = k``: it proves nothing, and nobody verifies it.
* :func:`refresh_part2` (ZF ``refresh_dkg_part2``): checks the number of packages and of
  commitment elements and every element (no proof of knowledge: ZF skips it), and evaluates
  ``f_i(l)`` for each other participant.
* :func:`refresh_part3` (ZF ``refresh_dkg_shares``): checks each received share against its
  sender's commitment with the identity put back in front (``f_l(i)*G == sum_{k>=1} phi_lk *
  i^k``), sums them with our own ``f_i(i)`` and the current signing share. Where ZF takes the
  old public key package, :func:`refresh_part3` takes the current share and its verifying share
  and, optionally, every participant's old verifying share (then it returns the new public key
  package as ZF does: each old verifying share plus the refreshing commitments' image).

The Taproot suite needs nothing more: stored shares are tweaked (ZF ``post_dkg``) and adding a
zero-secret polynomial keeps them on a polynomial with the tweaked key as its constant term;
ZF's refresh calls no ``post_dkg`` either.

Secrets, zeroing and CPython's limits are those of :mod:`._dkg`: :func:`refresh_part2` consumes
the round-1 secret, :func:`refresh_part3` the round-2 secret and the received shares (zeroed
whatever happens); the current share is only read. The new key package is the caller's to zero.

Error handling: :class:`~._dkg.DkgError` naming the culprit, as in :mod:`._dkg`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .._errors import FrostError
from ._dkg import (
    DkgError,
    KeyPackage,
    PublicKeyPackage,
    Round1Package,
    Round1Secret,
    Round2Package,
    Round2Secret,
    _check_counts,
    _check_round1,
    _Sender,
    compute_proof_of_knowledge,
    evaluate_shares,
)
from ._group import Group, group_for
from ._sodium import Buffer
from ._suite import Ciphersuite

__all__ = ["refresh_part1", "refresh_part2", "refresh_part3", "refreshing_image"]


def refresh_part1(
    identifier: bytes,
    max_signers: int,
    min_signers: int,
    *,
    suite: Ciphersuite | str,
    coefficients: Sequence[Buffer] | None = None,
) -> tuple[Round1Secret, Round1Package]:
    """Refresh part 1 (ZF ``refresh_dkg_part_1``): a zero-secret polynomial and its
    commitment without the identity (``min_signers - 1`` elements, ``phi_1`` first).

    ``coefficients`` (``a_1`` first, ``min_signers - 1`` of them) exist for tests; production
    callers leave them unset. ``min_signers`` must be the key's (a refresh cannot change it).
    """
    group = group_for(suite)
    _check_counts(min_signers, max_signers)
    try:
        group.identifier_from_bytes(identifier)
    except FrostError as exc:
        raise DkgError(f"own identifier: {exc}") from None
    coeffs = [group.new_scalar() for _ in range(min_signers)]  # coeffs[0] stays zero
    try:
        if coefficients is None:
            for co in coeffs[1:]:
                group.random_scalar(co)
        else:
            if len(coefficients) != min_signers - 1:
                raise DkgError(f"need {min_signers - 1} coefficients, got {len(coefficients)}")
            for dst, src in zip(coeffs[1:], coefficients, strict=True):
                group.check_secret_scalar(src, "polynomial coefficient")
                dst[:] = src
        if any(group.is_zero(co) for co in coeffs[1:]):
            raise DkgError("a polynomial coefficient is zero")
        commitment = tuple(group.base_mult(co) for co in coeffs[1:])
        # ZF: compute_proof_of_knowledge(identifier, coefficients, commitment without the
        # identity): the challenge hashes phi_1 and a_0 = 0, so mu = k.
        proof = compute_proof_of_knowledge(group, identifier, coeffs[0], commitment[0])
    except BaseException:
        for co in coeffs:
            co[:] = bytes(len(co))
        raise
    secret = Round1Secret(group, identifier, coeffs, commitment, min_signers, max_signers)
    return secret, Round1Package(commitment, proof)


def _senders(
    secret: Round1Secret | Round2Secret, round1_packages: Mapping[bytes, Round1Package]
) -> list[_Sender]:
    """The other participants' refresh packages, checked (``min_signers - 1`` commitment
    elements each, no proof of knowledge: ZF skips it), sorted by identifier."""
    return _check_round1(
        secret.group,
        secret.identifier,
        secret.min_signers,
        secret.max_signers,
        round1_packages,
        verify_proofs=False,
        refresh=True,
    )


def refresh_part2(
    secret: Round1Secret, round1_packages: Mapping[bytes, Round1Package]
) -> tuple[Round2Secret, dict[bytes, Round2Package]]:
    """Refresh part 2 (ZF ``refresh_dkg_part2``): ``f_i(l)`` for each other participant and
    ``f_i(i)`` to keep. No proof of knowledge is verified (ZF: "we don't need to"). ``secret``
    is consumed (zeroed) whatever happens."""
    if secret.used:
        raise DkgError("round-1 secret was already used; start a new refresh")
    try:
        senders = _senders(secret, round1_packages)
        return evaluate_shares(secret, [s.identifier for s in senders])
    finally:
        secret.zero()


def refreshing_image(group: Group, commitment: Sequence[bytes], x: int, what: str) -> bytes | None:
    """``sum_{k>=1} phi_k * x^k`` for a refresh commitment (``phi_1`` first, the identity
    ``phi_0`` left out); None for the identity (negligible for honest commitments)."""
    terms: list[bytes] = []
    power = x % group.order
    for phi in commitment:
        term = group.mul_point(phi, power)
        if term is not None:  # pragma: no branch - x is a non-zero identifier
            terms.append(term)
        power = power * x % group.order
    if not terms:  # pragma: no cover - negligible
        return None
    try:
        return group.sum_points(terms, what)
    except FrostError:  # pragma: no cover - the identity, negligible
        return None


def _add_points(group: Group, points: Sequence[bytes | None], what: str) -> bytes:
    present = [p for p in points if p is not None]
    return group.sum_points(present, what)


def refresh_part3(
    secret: Round2Secret,
    round1_packages: Mapping[bytes, Round1Package],
    round2_packages: Mapping[bytes, Round2Package],
    *,
    signing_share: Buffer,
    verifying_share: bytes,
    group_public_key: bytes,
    verifying_shares: Mapping[bytes, bytes] | None = None,
) -> tuple[KeyPackage, PublicKeyPackage | None]:
    """Refresh part 3 (ZF ``refresh_dkg_shares``): the refreshed key package.

    ``signing_share``/``verifying_share``/``group_public_key`` are the participant's current
    key (only read). Each received share is checked against its sender's commitment (a bad
    one names the sender); the current share must match ``verifying_share`` and the new share
    ``verifying_share`` plus every commitment's image at our identifier, or
    :class:`DkgError` (no culprit: our own key is wrong). With ``verifying_shares`` (every
    participant's current one) the new public key package is returned too, as ZF builds it;
    otherwise None. ``secret`` and ``round2_packages`` are consumed (zeroed) whatever happens.
    """
    try:
        if secret.used:
            raise DkgError("round-2 secret was already used; start a new refresh")
        group = secret.group
        senders = _senders(secret, round1_packages)
        sent = {s.identifier for s in senders}
        received = {bytes(i) for i in round2_packages}
        if len(received) != len(round2_packages) or received != sent:
            missing = sorted(sent - received)
            extra = sorted(received - sent)
            blamed = missing or extra
            raise DkgError(
                f"round-2 packages must come from exactly the round-1 senders "
                f"({len(missing)} missing, {len(extra)} unexpected)",
                culprit=blamed[0] if blamed else None,
            )
        try:
            old_image = group.element(verifying_share, "current verifying share")
        except FrostError as exc:
            raise DkgError(str(exc)) from None
        try:
            group.check_secret_scalar(signing_share, "current signing share")
        except FrostError as exc:
            raise DkgError(str(exc)) from None
        if group.is_zero(signing_share) or group.base_mult(signing_share) != old_image:
            raise DkgError("the current signing share does not match its verifying share")
        own_value = group.identifier_from_bytes(secret.identifier)
        new = group.new_scalar()
        try:
            new[:] = secret.secret_share
            images: list[bytes | None] = [
                refreshing_image(group, secret.commitment, own_value, "own refresh image")
            ]
            for sender in senders:
                ident, commitment = sender.identifier, sender.commitment
                who = group.describe(sender.value)
                share = round2_packages[ident].signing_share
                try:
                    group.check_secret_scalar(share, f"share from participant {who}")
                except FrostError as exc:
                    raise DkgError(str(exc), culprit=ident) from None
                image = refreshing_image(
                    group, commitment, own_value, f"commitment of participant {who}"
                )
                ok = (
                    group.is_zero(share)
                    if image is None
                    else not group.is_zero(share) and group.base_mult(share) == image
                )
                if not ok:
                    raise DkgError(
                        f"share from participant {who} does not match its commitment",
                        culprit=ident,
                    )
                images.append(image)
                group.add(new, share)
            group.add(new, signing_share)
            if group.is_zero(new):  # pragma: no cover - negligible probability
                raise DkgError("refreshed signing share is zero; start a new refresh")
            new_verifying = group.base_mult(new)
            expected = _add_points(group, [old_image, *images], "refreshed verifying share")
            if new_verifying != expected:  # pragma: no cover - the checks above imply it
                raise DkgError("refreshed share does not match the commitments")
            public: PublicKeyPackage | None = None
            if verifying_shares is not None:
                public = _public(group, secret, senders, verifying_shares, group_public_key)
                if public.verifying_shares.get(secret.identifier) != new_verifying:
                    raise DkgError("own verifying share in verifying_shares is not ours")
        except BaseException:
            new[:] = bytes(len(new))
            raise
        key = KeyPackage(
            group.name,
            secret.identifier,
            new,
            new_verifying,
            group_public_key,
            secret.min_signers,
        )
        return key, public
    finally:
        secret.zero()
        for package in round2_packages.values():
            package.zero()


def _public(
    group: Group,
    secret: Round2Secret,
    senders: Sequence[_Sender],
    old: Mapping[bytes, bytes],
    group_public_key: bytes,
) -> PublicKeyPackage:
    """ZF: ``from_dkg_commitments`` of the refreshing commitments (identity first), each
    verifying share added to the old one."""
    commitments = [secret.commitment, *(s.commitment for s in senders)]
    idents = [secret.identifier, *(s.identifier for s in senders)]
    if {bytes(i) for i in old} != set(idents):
        raise DkgError("verifying_shares must name exactly the refresh's participants")
    shares: dict[bytes, bytes] = {}
    for ident in sorted(idents, key=group.identifier_from_bytes):
        value = group.identifier_from_bytes(ident)
        who = group.describe(value)
        images = [
            refreshing_image(group, c, value, f"refresh image of participant {who}")
            for c in commitments
        ]
        try:
            before = group.element(old[ident], f"verifying share of participant {who}")
        except FrostError as exc:
            raise DkgError(str(exc), culprit=ident) from None
        shares[ident] = _add_points(group, [before, *images], f"verifying share of {who}")
    return PublicKeyPackage(group.name, shares, group_public_key, secret.min_signers)
