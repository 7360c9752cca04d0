"""ZF FROST's repairable threshold scheme (ZF ``keys::repairable``) for the three suites.

A participant who lost its signing share gets it back from ``helpers``, at least two other
participants (at least ``min_signers`` of them for the result to be right), without any of them
learning it or each other's shares (Laing and Stinson, "A Survey and Refinement of Repairable
Threshold Schemes", https://eprint.iacr.org/2017/1155):

1. :func:`repair_share_step_1`, by each helper ``i``: split ``zeta_i * s_i`` (``zeta_i`` the
   Lagrange coefficient of ``i`` among the helpers, evaluated at the lost participant's
   identifier) into one random ``delta`` per helper; send ``delta_j`` to helper ``j``.
2. :func:`repair_share_step_2`, by each helper ``j``: ``sigma_j = sum_i delta_j`` over what it
   received (and its own); send ``sigma_j`` to the participant.
3. :func:`repair_share_step_3`, by the participant: ``s = sum_j sigma_j``, checked against its
   verifying share when the caller passes it (ZF leaves that check to the caller).

Every ``delta`` and ``sigma`` is secret (each one alone is uniformly random, but enough of them
reveal shares) and travels only over confidential, authenticated channels.

What is secret, and what is zeroed: the helper's share is read, never copied out of a buffer;
the deltas, sigmas and the repaired share are returned in fresh ``bytearray`` buffers that the
caller zeroes once sent or stored; scratch buffers are zeroed in ``finally`` blocks. Inputs
(received deltas and sigmas) belong to the caller, who zeroes them after the call. The
identifiers and Lagrange coefficients are public and handled as Python ints. CPython's limits
are those of :mod:`._dkg`: a ``bytes`` secret passed in cannot be zeroed, and the secp256k1
adapter branches on a secret being exactly zero.

For ``FROST-secp256k1-SHA256-TR-v1`` DKG output, repair works on the shares as stored (tweaked):
the tweaked shares still lie on a polynomial of the same degree, so the repaired share is the
stored, tweaked one.

Error handling: :class:`~._dkg.DkgError` (a :class:`~trio_sign.FrostError`), naming the helper
whose value was malformed where the inputs say who sent what.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .._errors import FrostError
from ._dkg import DkgError
from ._group import Group, group_for, lagrange_at
from ._sodium import Buffer
from ._suite import Ciphersuite

__all__ = ["repair_share_step_1", "repair_share_step_2", "repair_share_step_3"]


def _ids(group: Group, identifiers: Sequence[bytes], what: str) -> list[int]:
    values: list[int] = []
    for ident in identifiers:
        try:
            values.append(group.identifier_from_bytes(bytes(ident)))
        except FrostError as exc:
            raise DkgError(f"{what}: {exc}", culprit=bytes(ident)) from None
    return values


def repair_share_step_1(
    helpers: Sequence[bytes],
    identifier: bytes,
    signing_share: Buffer,
    participant: bytes,
    *,
    suite: Ciphersuite | str,
    random_values: Sequence[Buffer] | None = None,
) -> dict[bytes, bytearray]:
    """RTS step 1, run by helper ``identifier`` with its ``signing_share``: the deltas.

    Returns one secret ``delta`` per helper (including this one, which keeps its own), keyed by
    helper identifier: the first ``len(helpers) - 1`` helpers in identifier order get random
    values and the last gets ``zeta_i * s_i`` minus their sum, as ZF does. ``random_values``
    exist for tests only.

    Error handling: :class:`DkgError` for fewer than two helpers, a duplicate helper, a helper
    list without this helper or with the participant, or a malformed share.
    """
    group = group_for(suite)
    if len(helpers) < 2:
        raise DkgError(f"need at least 2 helpers, got {len(helpers)}")
    values = _ids(group, helpers, "helper identifier")
    if len(set(values)) != len(values):
        dup = next(h for h, v in zip(helpers, values, strict=True) if values.count(v) > 1)
        raise DkgError(f"duplicate helper identifier {group.describe_identifier(dup)}", culprit=dup)
    own = _ids(group, [identifier], "own identifier")[0]
    lost = _ids(group, [participant], "participant identifier")[0]
    if own not in values:
        raise DkgError("this helper is not in the helper list")
    if lost in values:
        raise DkgError("the participant being repaired cannot be one of its helpers")
    try:
        group.check_secret_scalar(signing_share, "signing share")
    except FrostError as exc:
        raise DkgError(str(exc)) from None
    order = sorted(zip(values, helpers, strict=True))
    count = len(order) - 1
    if random_values is not None and len(random_values) != count:
        raise DkgError(f"need {count} random values, got {len(random_values)}")
    zeta = lagrange_at(values, own, lost, group.order)
    out: dict[bytes, bytearray] = {}
    total = group.new_scalar()
    try:
        for k, (_, helper) in enumerate(order[:-1]):
            delta = group.new_scalar()
            out[bytes(helper)] = delta
            if random_values is None:
                group.random_scalar(delta)
            else:
                try:
                    group.check_secret_scalar(random_values[k], "random value")
                except FrostError as exc:
                    raise DkgError(str(exc)) from None
                delta[:] = random_values[k]
            group.add(total, delta)
        last = group.new_scalar()
        out[bytes(order[-1][1])] = last
        last[:] = signing_share
        group.mul(last, group.scalar_bytes(zeta))
        group.negate(total)
        group.add(last, total)  # zeta_i * s_i - sum(deltas)
    except BaseException:
        for delta in out.values():
            delta[:] = bytes(len(delta))
        raise
    finally:
        total[:] = bytes(len(total))
    return out


def _sum(group: Group, values: Mapping[bytes, Buffer], what: str) -> bytearray:
    if not values:
        raise DkgError(f"no {what}s to sum")
    acc = group.new_scalar()
    try:
        for sender, value in values.items():
            who = group.describe_identifier(bytes(sender))
            try:
                group.check_secret_scalar(value, f"{what} from helper {who}")
            except FrostError as exc:
                raise DkgError(str(exc), culprit=bytes(sender)) from None
            group.add(acc, value)
    except BaseException:
        acc[:] = bytes(len(acc))
        raise
    return acc


def repair_share_step_2(deltas: Mapping[bytes, Buffer], *, suite: Ciphersuite | str) -> bytearray:
    """RTS step 2, run by each helper: ``sigma = sum(deltas)`` over the deltas it received,
    keyed by the helper that sent each (its own included). The result is secret."""
    return _sum(group_for(suite), deltas, "delta")


def repair_share_step_3(
    sigmas: Mapping[bytes, Buffer],
    identifier: bytes,
    *,
    suite: Ciphersuite | str,
    verifying_share: bytes | None = None,
) -> bytearray:
    """RTS step 3, run by the participant ``identifier``: its signing share ``sum(sigmas)``.

    With ``verifying_share`` (from the public key package every participant keeps) the result
    is checked: ``share * G`` must equal it, or :class:`DkgError` (no culprit: a wrong sigma
    cannot be traced to one helper) and the result is zeroed.
    """
    group = group_for(suite)
    _ids(group, [identifier], "participant identifier")
    share = _sum(group, sigmas, "sigma")
    if verifying_share is None:
        return share
    try:
        try:
            expected = group.element(verifying_share, "verifying share")
        except FrostError as exc:
            raise DkgError(str(exc)) from None
        if group.is_zero(share) or group.base_mult(share) != expected:
            raise DkgError("repaired share does not match the participant's verifying share")
    except BaseException:
        share[:] = bytes(len(share))
        raise
    return share
