"""ZF FROST's distributed key generation for the three ciphersuites (ZF ``keys::dkg``).

The FROST paper's Pedersen DKG with proofs of knowledge (Komlo and Goldberg, Figure 1), exactly
as ZF's ``frost-core`` ``keys::dkg::part1``/``part2``/``part3``, so our participant and ZF's
interoperate (``tests/test_frost_rs_interop.py``) and ZF's ``vectors_dkg.json`` reproduce:

* :func:`part1`: a random secret polynomial ``f_i`` of degree ``min_signers - 1``, its VSS
  commitment ``(phi_i0, ..., phi_i(t-1))`` and a Schnorr proof of knowledge of ``a_i0``,
  ``R = k*G``, ``mu = k + a_i0 * c`` with ``c = HDKG(id_i || phi_i0 || R)``; ``HDKG`` hashes with
  ``contextString || "dkg"`` in each suite (SHA-512 for Ed25519, ``hash_to_field`` for
  secp256k1). The Taproot suite draws ``k`` so that ``R`` has even Y and writes the proof as
  ``x(R) || mu`` (ZF's ``generate_nonce`` and signature encoding for that suite).
* :func:`part2`: checks every received round-1 package (count, commitment length, every element,
  the proof of knowledge) and evaluates ``f_i(l)`` for each other participant ``l``.
* :func:`part3`: checks each received share against its sender's commitment, sums the signing
  share ``s_i = sum_l f_l(i)``, and derives the group key and every participant's verifying
  share from the commitments. For ``FROST-secp256k1-SHA256-TR-v1`` the output is then tweaked
  once (ZF ``post_dkg``: the BIP-341 tweak with an empty merkle root) and stored tweaked; sign it
  with ``merkle_root=None``.

Round-1 packages must reach every participant over a broadcast channel and round-2 packages
over a confidential, authenticated one; neither is this module's business (DESIGN.md §13).

What is secret, and what is zeroed: the polynomial coefficients and the proof nonce
(:class:`Round1Secret`), the share a participant keeps for itself (:class:`Round2Secret`), the
shares sent and received (:class:`Round2Package`) and the resulting signing share
(:class:`KeyPackage`) live in ``bytearray`` buffers. Each of these objects has ``zero()`` and a
``repr`` without secrets. :func:`part2` consumes the round-1 secret and :func:`part3` the
round-2 secret and the received round-2 packages: they are zeroed when the call returns, whether
it succeeded or not, so a DKG that fails leaves no secret behind. Scratch buffers are zeroed in
``finally`` blocks. The caller zeroes the outgoing round-2 packages once sent (or encrypted) and
the key package once stored.

What CPython cannot guarantee: that no copy of a secret exists outside these buffers. A secret
passed in as ``bytes`` (a test vector's coefficients) is immutable and cannot be zeroed; memory
that the allocator reuses is not wiped by it (our buffers never grow, so they are never moved);
and a received share is checked for canonical encoding in place (not through the suite's
``deserialize_scalar``, which would copy it into a Python int). libsecp256k1's ``seckey``
functions refuse zero, so the secp256k1 adapter branches on a secret being exactly zero (see
:mod:`._group`). Public values (identifiers, challenges, elements) are Python ints and
``bytes``, and the proof-of-knowledge challenge hashes only public values.

Error handling: every refusal is a :class:`DkgError` (a :class:`~trio_sign.FrostError`) whose
``culprit`` is the serialized identifier of the participant whose package was wrong, or
``None`` when the fault is the caller's (wrong counts, reused secrets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .._errors import FrostError, InternalError
from . import _secp256k1_tr
from ._group import Group, group_for
from ._sodium import Buffer
from ._suite import Ciphersuite

__all__ = [
    "DkgError",
    "KeyPackage",
    "PublicKeyPackage",
    "Round1Package",
    "Round1Secret",
    "Round2Package",
    "Round2Secret",
    "compute_proof_of_knowledge",
    "evaluate_shares",
    "part1",
    "part2",
    "part3",
    "verify_proof_of_knowledge",
    "verifying_shares_from_commitment",
]


class DkgError(FrostError):
    """A DKG (or share repair) step refused its input.

    Attributes:
        culprit: the serialized identifier of the participant whose package was at fault, or
            ``None`` when no single participant can be blamed.
    """

    def __init__(self, message: str, *, culprit: bytes | None = None) -> None:
        super().__init__(message)
        self.culprit = culprit


def _check_counts(min_signers: int, max_signers: int) -> None:
    """ZF ``validate_num_of_signers``."""
    if min_signers < 2:
        raise DkgError(f"min_signers must be at least 2, got {min_signers}")
    if max_signers < 2:
        raise DkgError(f"max_signers must be at least 2, got {max_signers}")
    if min_signers > max_signers:
        raise DkgError(f"min_signers ({min_signers}) must not exceed max_signers ({max_signers})")
    if max_signers > 0xFFFF:
        raise DkgError(f"max_signers must fit in 16 bits, got {max_signers}")


# -- round one ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Round1Package:
    """What a participant broadcasts after :func:`part1` (ZF ``round1::Package``).

    ``commitment`` is the VSS commitment (serialized elements, ``phi_0`` first);
    ``proof_of_knowledge`` the serialized Schnorr proof (``R || mu``; ``x(R) || mu`` for the
    Taproot suite).
    """

    commitment: tuple[bytes, ...]
    proof_of_knowledge: bytes

    @property
    def verifying_key(self) -> bytes:
        """``phi_0 = a_0 * G``, this participant's contribution to the group key."""
        return self.commitment[0]


class Round1Secret:
    """A participant's secret state between :func:`part1` and :func:`part2`.

    Holds the polynomial coefficients (secret); :func:`part2` consumes it.
    """

    __slots__ = (
        "_coefficients",
        "commitment",
        "group",
        "identifier",
        "max_signers",
        "min_signers",
        "used",
    )

    def __init__(
        self,
        group: Group,
        identifier: bytes,
        coefficients: list[bytearray],
        commitment: tuple[bytes, ...],
        min_signers: int,
        max_signers: int,
    ) -> None:
        self.group = group
        self.identifier = identifier
        self._coefficients = coefficients
        self.commitment = commitment
        self.min_signers = min_signers
        self.max_signers = max_signers
        self.used = False

    def zero(self) -> None:
        """Zero every coefficient and mark the secret used (idempotent)."""
        for co in self._coefficients:
            co[:] = bytes(len(co))
        self.used = True

    def __repr__(self) -> str:
        state = "used" if self.used else "fresh"
        return (
            f"<Round1Secret {self.group.name} {state} identifier={self.identifier.hex()} "
            f"min_signers={self.min_signers} max_signers={self.max_signers}>"
        )


def compute_proof_of_knowledge(
    group: Group, identifier: bytes, secret: Buffer, verifying_key: bytes
) -> bytes:
    """ZF ``compute_proof_of_knowledge``: a Schnorr proof that we know ``secret`` (``a_0``).

    ``R = k*G`` for a fresh random ``k`` (even Y for Taproot), ``c = HDKG(id || phi_0 || R)``,
    ``mu = k + a_0 * c``; ``k`` and ``mu``'s scratch buffer are zeroed before returning.
    """
    k = group.new_scalar()
    mu = group.new_scalar()
    try:
        r = group.pok_nonce(k)
        c = group.hdkg(identifier + verifying_key + r)
        mu[:] = secret
        group.mul(mu, group.scalar_bytes(c))
        group.add(mu, k)
        return group.encode_signature(r, mu)
    finally:
        k[:] = bytes(len(k))
        mu[:] = bytes(len(mu))


def verify_proof_of_knowledge(
    group: Group, identifier: bytes, commitment: Sequence[bytes], proof: bytes
) -> None:
    """ZF ``verify_proof_of_knowledge``: ``R == mu*G - c*phi_0``; :class:`DkgError` naming
    ``identifier`` otherwise. ``commitment`` must already be validated."""
    who = group.describe_identifier(identifier)
    try:
        r, mu = group.decode_signature(proof, f"proof of knowledge of participant {who}")
    except FrostError as exc:
        raise DkgError(str(exc), culprit=identifier) from None
    phi0 = commitment[0]
    c = group.hdkg(identifier + phi0 + r)
    # mu*G == R + c*phi_0, all public
    terms = [r]
    c_phi = group.mul_point(phi0, c)
    if c_phi is not None:  # pragma: no branch - c == 0 has negligible probability
        terms.append(c_phi)
    try:
        rhs = group.sum_points(terms, "R + c*phi_0")
    except FrostError:
        rhs = b""
    lhs = group.base_mult(group.scalar_bytes(mu)) if mu != 0 else b""
    if lhs != rhs or not lhs:
        raise DkgError(f"proof of knowledge of participant {who} is invalid", culprit=identifier)


def part1(
    identifier: bytes,
    max_signers: int,
    min_signers: int,
    *,
    suite: Ciphersuite | str,
    coefficients: Sequence[Buffer] | None = None,
) -> tuple[Round1Secret, Round1Package]:
    """DKG part 1 (ZF ``part1``): a secret polynomial, its commitment and the proof of knowledge.

    ``coefficients`` (``a_0`` first, exactly ``min_signers`` of them) exist for the test
    vectors; production callers leave them unset so every coefficient is drawn from the OS
    CSPRNG. Returns the secret state to keep for :func:`part2` and the package to broadcast.
    """
    group = group_for(suite)
    _check_counts(min_signers, max_signers)
    try:
        group.identifier_from_bytes(identifier)
    except FrostError as exc:
        raise DkgError(f"own identifier: {exc}") from None
    coeffs = [group.new_scalar() for _ in range(min_signers)]
    try:
        if coefficients is None:
            for co in coeffs:
                group.random_scalar(co)
        else:
            if len(coefficients) != min_signers:
                raise DkgError(f"need {min_signers} coefficients, got {len(coefficients)}")
            for dst, src in zip(coeffs, coefficients, strict=True):
                group.check_secret_scalar(src, "polynomial coefficient")
                dst[:] = src
        if any(group.is_zero(co) for co in coeffs):
            # Its commitment would be the identity, which has no encoding (ZF refuses it too).
            raise DkgError("a polynomial coefficient is zero")
        commitment = tuple(group.base_mult(co) for co in coeffs)
        proof = compute_proof_of_knowledge(group, identifier, coeffs[0], commitment[0])
    except BaseException:
        for co in coeffs:
            co[:] = bytes(len(co))
        raise
    secret = Round1Secret(group, identifier, coeffs, commitment, min_signers, max_signers)
    return secret, Round1Package(commitment, proof)


# -- round two ----------------------------------------------------------------------------------


class Round2Package:
    """One secret share ``f_i(l)`` for one recipient (ZF ``round2::Package``).

    Secret: send it only over a confidential, authenticated channel, then :meth:`zero` it.
    """

    __slots__ = ("signing_share",)

    def __init__(self, signing_share: bytearray) -> None:
        self.signing_share = signing_share

    def zero(self) -> None:
        self.signing_share[:] = bytes(len(self.signing_share))

    def __repr__(self) -> str:
        return "<Round2Package>"


class Round2Secret:
    """A participant's secret state between :func:`part2` and :func:`part3`: its own share
    ``f_i(i)`` (secret) and its commitment."""

    __slots__ = (
        "commitment",
        "group",
        "identifier",
        "max_signers",
        "min_signers",
        "secret_share",
        "used",
    )

    def __init__(
        self,
        group: Group,
        identifier: bytes,
        commitment: tuple[bytes, ...],
        secret_share: bytearray,
        min_signers: int,
        max_signers: int,
    ) -> None:
        self.group = group
        self.identifier = identifier
        self.commitment = commitment
        self.secret_share = secret_share
        self.min_signers = min_signers
        self.max_signers = max_signers
        self.used = False

    def zero(self) -> None:
        self.secret_share[:] = bytes(len(self.secret_share))
        self.used = True

    def __repr__(self) -> str:
        state = "used" if self.used else "fresh"
        return (
            f"<Round2Secret {self.group.name} {state} identifier={self.identifier.hex()} "
            f"min_signers={self.min_signers} max_signers={self.max_signers}>"
        )


@dataclass(frozen=True, slots=True)
class _Sender:
    identifier: bytes
    value: int
    commitment: tuple[bytes, ...]


def _check_round1(
    group: Group,
    own: bytes,
    min_signers: int,
    max_signers: int,
    round1_packages: Mapping[bytes, Round1Package],
    *,
    verify_proofs: bool,
    refresh: bool = False,
) -> list[_Sender]:
    """Validate the other participants' round-1 packages; sorted by identifier. The count is
    checked before any element is decoded. A ``refresh`` commitment leaves ``phi_0`` out: it
    has ``min_signers - 1`` elements, numbered from 1 (:mod:`._refresh`)."""
    if len(round1_packages) != max_signers - 1:
        raise DkgError(
            f"expected {max_signers - 1} round-1 packages from the other participants, "
            f"got {len(round1_packages)}"
        )
    first = 1 if refresh else 0
    length = min_signers - first
    own_value = group.identifier_from_bytes(own)
    senders: list[_Sender] = []
    seen: set[int] = set()
    for ident, package in round1_packages.items():
        ident = bytes(ident)
        try:
            value = group.identifier_from_bytes(ident)
        except FrostError as exc:
            raise DkgError(f"round-1 package identifier: {exc}", culprit=ident) from None
        who = group.describe(value)
        if value == own_value:
            raise DkgError(
                f"round-1 packages include this participant's own identifier {who}",
                culprit=ident,
            )
        if value in seen:  # pragma: no cover - canonical encodings make map keys unique
            raise DkgError(f"duplicate identifier {who}", culprit=ident)
        seen.add(value)
        if len(package.commitment) != length:
            raise DkgError(
                f"{'refresh ' if refresh else ''}commitment of participant {who} has "
                f"{len(package.commitment)} elements, expected {length}",
                culprit=ident,
            )
        try:
            commitment = tuple(
                group.element(phi, f"commitment element {k} of participant {who}")
                for k, phi in enumerate(package.commitment, start=first)
            )
        except FrostError as exc:
            raise DkgError(str(exc), culprit=ident) from None
        senders.append(_Sender(ident, value, commitment))
    senders.sort(key=lambda s: s.value)
    if verify_proofs:
        for s in senders:
            verify_proof_of_knowledge(
                group, s.identifier, s.commitment, round1_packages[s.identifier].proof_of_knowledge
            )
    return senders


def part2(
    secret: Round1Secret, round1_packages: Mapping[bytes, Round1Package]
) -> tuple[Round2Secret, dict[bytes, Round2Package]]:
    """DKG part 2 (ZF ``part2``): verify every other participant's round-1 package and proof of
    knowledge, then compute the share ``f_i(l)`` for each of them and ``f_i(i)`` to keep.

    ``round1_packages`` maps each *other* participant's identifier to its package, as received
    over the broadcast channel. ``secret`` is consumed (zeroed) whatever happens.

    Error handling: :class:`DkgError` naming the culprit for a wrong package or proof, without
    a culprit for a wrong number of packages or a used secret.
    """
    if secret.used:
        raise DkgError("round-1 secret was already used; start a new DKG")
    group = secret.group
    try:
        senders = _check_round1(
            group,
            secret.identifier,
            secret.min_signers,
            secret.max_signers,
            round1_packages,
            verify_proofs=True,
        )
        return evaluate_shares(secret, [s.identifier for s in senders])
    finally:
        secret.zero()


def evaluate_shares(
    secret: Round1Secret, recipients: Sequence[bytes]
) -> tuple[Round2Secret, dict[bytes, Round2Package]]:
    """``f_i(l)`` for each recipient ``l`` and ``f_i(i)`` to keep, in zeroable buffers (part 2
    of a DKG and of a refresh, once the packages are checked). The caller zeroes ``secret``;
    on failure every share made so far is zeroed."""
    group = secret.group
    coeffs = secret._coefficients
    out: dict[bytes, Round2Package] = {}
    try:
        for ident in recipients:
            share = group.new_scalar()
            out[ident] = Round2Package(share)
            group.evaluate(share, coeffs, ident)
        own = group.new_scalar()
        group.evaluate(own, coeffs, secret.identifier)
    except BaseException:
        for package in out.values():
            package.zero()
        raise
    return (
        Round2Secret(
            group,
            secret.identifier,
            secret.commitment,
            own,
            secret.min_signers,
            secret.max_signers,
        ),
        out,
    )


# -- round three --------------------------------------------------------------------------------


class KeyPackage:
    """A participant's long-lived DKG output (ZF ``KeyPackage``).

    ``signing_share`` is secret (a buffer; :meth:`zero` it once stored); ``verifying_share`` is
    ``signing_share * G``; ``verifying_key`` the group public key. For the Taproot suite all
    three are stored tweaked (ZF ``post_dkg``).
    """

    __slots__ = (
        "identifier",
        "min_signers",
        "signing_share",
        "suite",
        "verifying_key",
        "verifying_share",
    )

    def __init__(
        self,
        suite: str,
        identifier: bytes,
        signing_share: bytearray,
        verifying_share: bytes,
        verifying_key: bytes,
        min_signers: int,
    ) -> None:
        self.suite = suite
        self.identifier = identifier
        self.signing_share = signing_share
        self.verifying_share = verifying_share
        self.verifying_key = verifying_key
        self.min_signers = min_signers

    def zero(self) -> None:
        self.signing_share[:] = bytes(len(self.signing_share))

    def __repr__(self) -> str:
        return (
            f"<KeyPackage {self.suite} identifier={self.identifier.hex()} "
            f"verifying_key={self.verifying_key.hex()} min_signers={self.min_signers}>"
        )


@dataclass(frozen=True, slots=True)
class PublicKeyPackage:
    """The public DKG output every participant agrees on (ZF ``PublicKeyPackage``)."""

    suite: str
    verifying_shares: Mapping[bytes, bytes] = field(repr=False)
    verifying_key: bytes
    min_signers: int


def part3(
    secret: Round2Secret,
    round1_packages: Mapping[bytes, Round1Package],
    round2_packages: Mapping[bytes, Round2Package],
) -> tuple[KeyPackage, PublicKeyPackage]:
    """DKG part 3 (ZF ``part3``): verify each received share against its sender's commitment
    (``f_l(i)*G == sum_k phi_lk * i^k``), sum the signing share, derive the public key package.

    ``round1_packages`` must be the ones given to :func:`part2`; ``round2_packages`` maps each
    other participant to the share it sent us. ``secret`` and the received ``round2_packages``
    are consumed (zeroed) whatever happens. For the Taproot suite the output is tweaked as ZF's
    ``post_dkg`` does before it is returned.

    Error handling: :class:`DkgError`, naming the sender of a share that does not match its
    commitment (or is not a canonical scalar).
    """
    try:
        if secret.used:
            raise DkgError("round-2 secret was already used; start a new DKG")
        group = secret.group
        senders = _check_round1(
            group,
            secret.identifier,
            secret.min_signers,
            secret.max_signers,
            round1_packages,
            verify_proofs=False,
        )
        expected = {s.identifier for s in senders}
        received = {bytes(i) for i in round2_packages}
        if len(received) != len(round2_packages) or received != expected:
            missing = sorted(expected - received)
            extra = sorted(received - expected)
            blamed = missing or extra
            culprit = blamed[0] if blamed else None
            raise DkgError(
                f"round-2 packages must come from exactly the round-1 senders "
                f"({len(missing)} missing, {len(extra)} unexpected)",
                culprit=culprit,
            )
        own_value = group.identifier_from_bytes(secret.identifier)
        signing_share = group.new_scalar()
        try:
            signing_share[:] = secret.secret_share
            for s in senders:
                share = round2_packages[s.identifier].signing_share
                who = group.describe(s.value)
                try:
                    group.check_secret_scalar(share, f"share from participant {who}")
                except FrostError as exc:
                    raise DkgError(str(exc), culprit=s.identifier) from None
                image = group.evaluate_commitment(
                    s.commitment, own_value, f"commitment of participant {who} at our identifier"
                )
                if group.is_zero(share) or group.base_mult(share) != image:
                    raise DkgError(
                        f"share from participant {who} does not match its commitment",
                        culprit=s.identifier,
                    )
                group.add(signing_share, share)
            if group.is_zero(signing_share):  # pragma: no cover - negligible probability
                raise DkgError("signing share is zero; start a new DKG")
            commitments = [secret.commitment, *(s.commitment for s in senders)]
            public = _public_key_package(
                group, commitments, [secret.identifier, *expected], secret.min_signers
            )
            verifying_share = group.base_mult(signing_share)
            if public.verifying_shares[secret.identifier] != verifying_share:
                raise InternalError("own verifying share differs from the commitments' image")
            if group.taproot:
                new_key, new_shares = _secp256k1_tr.post_dkg_tweak(
                    signing_share, public.verifying_key, public.verifying_shares
                )
                public = PublicKeyPackage(group.name, new_shares, new_key, public.min_signers)
                verifying_share = new_shares[secret.identifier]
        except BaseException:
            signing_share[:] = bytes(len(signing_share))
            raise
        key = KeyPackage(
            group.name,
            secret.identifier,
            signing_share,
            verifying_share,
            public.verifying_key,
            secret.min_signers,
        )
        return key, public
    finally:
        secret.zero()
        for package in round2_packages.values():
            package.zero()


def _public_key_package(
    group: Group,
    commitments: Sequence[Sequence[bytes]],
    identifiers: Sequence[bytes],
    min_signers: int,
) -> PublicKeyPackage:
    """ZF ``PublicKeyPackage::from_dkg_commitments``: sum the commitments coefficient-wise,
    then the group key is the constant term and each verifying share its image at the id."""
    summed = [
        group.sum_points([c[k] for c in commitments], f"summed commitment element {k}")
        for k in range(min_signers)
    ]
    shares: dict[bytes, bytes] = {}
    for ident in sorted(identifiers, key=group.identifier_from_bytes):
        value = group.identifier_from_bytes(ident)
        shares[ident] = group.evaluate_commitment(
            summed, value, f"verifying share of participant {group.describe(value)}"
        )
    return PublicKeyPackage(group.name, shares, summed[0], min_signers)


def verifying_shares_from_commitment(
    commitment: Sequence[bytes], identifiers: Sequence[bytes], *, suite: Ciphersuite | str
) -> dict[bytes, bytes]:
    """Each identifier's verifying share from one (summed or dealer's) VSS commitment."""
    group = group_for(suite)
    checked = [group.element(phi, f"commitment element {k}") for k, phi in enumerate(commitment)]
    return {
        ident: group.evaluate_commitment(
            checked, group.identifier_from_bytes(ident), "verifying share"
        )
        for ident in identifiers
    }
