"""One object per ciphersuite with every FROST operation the service needs (DESIGN §14).

The suite modules (:mod:`._frost`, :mod:`._secp256k1`, :mod:`._secp256k1_tr`) differ in their
encodings, their commitment classes and, for Taproot, an optional BIP-341 merkle root. The
share store, the session pool, the gRPC handlers, the gateway and the demo do not care: they
look up an account's :class:`Scheme` by the name its share record carries
(:func:`scheme_by_name`) or by the one-byte code a sealed record carries
(:func:`scheme_by_code`) and call the same methods whatever the suite.

``merkle_root`` is only meaningful for ``FROST-secp256k1-SHA256-TR-v1`` (``None``: sign with
the key as it is; ``b""`` or 32 bytes: the BIP-341 tweak, exactly as ZF's
``sign_with_tweak``); any other suite refuses a merkle root with
:class:`~trio_sign.FrostError`.

``verify`` is the *independent* verifier of each suite's final signature: libsodium's
RFC 8032 verification for Ed25519, libsecp256k1's BIP-340 verification against the (tweaked)
x-only output key for Taproot, and RFC 9591 verification (``z·G == R + c·PK``) for plain
secp256k1, which no standard verifier covers.

The share checks return ``(message, reason)`` or ``None`` instead of raising, so that the
share-file readers can attach their line or record number; ``reason`` is one of the share
file's reason codes (``zero_identifier``, ``non_canonical_scalar``, ``zero_signing_share``,
``invalid_point``, ``share_mismatch``, ``bad_length``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from .._errors import FrostError
from . import _frost, _secp256k1, _secp256k1_tr, _sodium
from ._secp256k1 import N as _N

__all__ = [
    "ED25519",
    "SCHEMES",
    "SECP256K1",
    "SECP256K1_TR",
    "Commitment",
    "DealerOutput",
    "DealerShare",
    "Nonces",
    "Scheme",
    "scheme_by_code",
    "scheme_by_name",
]

Buffer = bytes | bytearray | memoryview
Problem = tuple[str, str] | None

DealerShare = _frost.DealerShare
DealerOutput = _frost.DealerOutput


class Commitment(Protocol):
    """A round-one commitment of any suite."""

    @property
    def identifier(self) -> bytes: ...
    @property
    def hiding(self) -> bytes: ...
    @property
    def binding(self) -> bytes: ...


class Nonces(Protocol):
    """A round-one secret of any suite (single use; :meth:`zero` drops it)."""

    used: bool

    @property
    def commitment(self) -> Any: ...
    def zero(self) -> None: ...


_INVALID_POINT = (
    "is not a valid group element "
    "(non-canonical, identity, small order or outside the prime-order subgroup)"
)


class Scheme:
    """The FROST operations of one ciphersuite; the three instances are module constants.

    The rounds are written once, here, over the suite's module (``_mod``: the same function
    names and keywords in :mod:`._frost`, :mod:`._secp256k1` and :mod:`._secp256k1_tr`); a
    suite only says how a merkle root reaches its module (:meth:`_root`) and provides its
    encodings, share checks, dealer and independent verifier.
    """

    name: str
    #: The byte a sealed ``binary-v3`` record stores for this suite.
    code: int
    element_size: int
    scalar_size: int
    signature_size: int
    #: Whether signing takes a BIP-341 merkle root.
    taproot: bool = False
    #: The suite's module (commit, sign, verify_signature_share, aggregate, SigningCommitment).
    _mod: Any

    def __repr__(self) -> str:
        return f"<Scheme {self.name}>"

    def _root(self, merkle_root: bytes | None) -> dict[str, bytes | None]:
        """The keywords that pass ``merkle_root`` to the suite's module: none, and a merkle
        root refused, except for Taproot."""
        if merkle_root is not None:
            raise FrostError(
                f"a taproot merkle root applies only to {SECP256K1_TR.name}, not to {self.name}"
            )
        return {}

    # identifiers and commitments
    def identifier_to_bytes(self, value: int) -> bytes:
        raise NotImplementedError

    def identifier_from_bytes(self, data: bytes) -> int:
        raise NotImplementedError

    def commitment(self, identifier: bytes, hiding: bytes, binding: bytes) -> Any:
        """This suite's commitment object (what :meth:`sign` and :meth:`aggregate` take)."""
        return self._mod.SigningCommitment(identifier, hiding, binding)

    # rounds
    def commit(self, identifier: bytes, signing_share: Buffer) -> Any:
        return self._mod.commit(identifier, signing_share)

    def sign(
        self,
        nonces: Any,
        *,
        signing_share: Buffer,
        group_public_key: bytes,
        message: bytes,
        commitments: Iterable[Any],
        min_signers: int | None = None,
        max_signers: int | None = None,
        merkle_root: bytes | None = None,
    ) -> bytes:
        share: bytes = self._mod.sign(
            nonces,
            signing_share=signing_share,
            group_public_key=group_public_key,
            message=message,
            commitments=commitments,
            min_signers=min_signers,
            max_signers=max_signers,
            **self._root(merkle_root),
        )
        return share

    def verify_signature_share(
        self,
        *,
        identifier: bytes,
        verifying_share: bytes,
        signature_share: bytes,
        commitments: Iterable[Any],
        group_public_key: bytes,
        message: bytes,
        merkle_root: bytes | None = None,
    ) -> bool:
        return bool(
            self._mod.verify_signature_share(
                identifier=identifier,
                verifying_share=verifying_share,
                signature_share=signature_share,
                commitments=commitments,
                group_public_key=group_public_key,
                message=message,
                **self._root(merkle_root),
            )
        )

    def aggregate(
        self,
        *,
        commitments: Iterable[Any],
        message: bytes,
        group_public_key: bytes,
        signature_shares: Mapping[bytes, bytes],
        verifying_shares: Mapping[bytes, bytes] | None = None,
        merkle_root: bytes | None = None,
    ) -> bytes:
        signature: bytes = self._mod.aggregate(
            commitments=commitments,
            message=message,
            group_public_key=group_public_key,
            signature_shares=signature_shares,
            verifying_shares=verifying_shares,
            **self._root(merkle_root),
        )
        return signature

    def verifying_key(self, group_public_key: bytes, merkle_root: bytes | None = None) -> bytes:
        """The key a final signature verifies under (Taproot: the x-only output key)."""
        self._root(merkle_root)
        return group_public_key

    def verify(
        self,
        group_public_key: bytes,
        message: bytes,
        signature: bytes,
        merkle_root: bytes | None = None,
    ) -> bool:
        """The suite's independent verifier of a final signature; never raises."""
        if merkle_root is not None:
            return False
        return bool(self._mod.verify(group_public_key, message, signature))

    def trusted_dealer_keygen(
        self, min_signers: int, max_signers: int, *, identifiers: Sequence[int] | None = None
    ) -> DealerOutput:
        """Shamir shares of a fresh random key (tests, demos and imports; RFC 9591 App. C)."""
        raise NotImplementedError

    # share-file checks
    def scalar_problem(self, identifier: Buffer, signing_share: Buffer) -> Problem:
        """Identifier and signing share are canonical non-zero scalars of the right length."""
        raise NotImplementedError

    def point_problem(
        self, signing_share: Buffer, verifying_share: Buffer, group_public_key: Buffer
    ) -> Problem:
        """Both elements are valid and ``signing_share·G == verifying_share``."""
        raise NotImplementedError


class _Ed25519(Scheme):
    name = _frost.CIPHERSUITE
    code = 0
    element_size = 32
    scalar_size = 32
    signature_size = 64
    _mod = _frost

    def identifier_to_bytes(self, value: int) -> bytes:
        return _frost.identifier_to_bytes(value)

    def identifier_from_bytes(self, data: bytes) -> int:
        return _frost.identifier_from_bytes(data)

    def trusted_dealer_keygen(
        self, min_signers: int, max_signers: int, *, identifiers: Sequence[int] | None = None
    ) -> DealerOutput:
        return _frost.trusted_dealer_keygen(min_signers, max_signers, identifiers=identifiers)

    def scalar_problem(self, identifier: Buffer, signing_share: Buffer) -> Problem:
        if len(identifier) != 32 or len(signing_share) != 32:
            return ("identifier and signing_share must be 32 bytes", "bad_length")
        # The identifier is public, so a Python int is fine (and faster than two FFI calls).
        ident = int.from_bytes(identifier, "little")
        if ident == 0:
            return ("identifier is zero", "zero_identifier")
        if ident >= _sodium.L:
            return ("identifier is not a canonical scalar (>= L)", "non_canonical_scalar")
        if not _sodium.scalar_is_canonical(signing_share):
            return ("signing_share is not a canonical scalar (>= L)", "non_canonical_scalar")
        if _sodium.scalar_is_zero(signing_share):
            return ("signing_share is zero", "zero_signing_share")
        return None

    def point_problem(
        self, signing_share: Buffer, verifying_share: Buffer, group_public_key: Buffer
    ) -> Problem:
        # About 45 µs: one subgroup check (~31 µs) and one base multiplication (~12 µs).
        if len(verifying_share) != 32 or len(group_public_key) != 32:
            return ("verifying_share and group_public_key must be 32 bytes", "bad_length")
        if not _sodium.is_valid_point(group_public_key):
            return (f"group_public_key {_INVALID_POINT}", "invalid_point")
        expected = bytearray(32)
        try:
            ok = _sodium.base_mult(expected, signing_share)
            if ok and _sodium.ct_equal(expected, verifying_share):
                # verifying_share is byte for byte the canonical encoding of s·G with s in
                # 1..L-1, so it is a valid non-identity subgroup element: its own (expensive)
                # subgroup check would be redundant.
                return None
        finally:
            _sodium.memzero(expected)
        if not _sodium.is_valid_point(verifying_share):
            return (f"verifying_share {_INVALID_POINT}", "invalid_point")
        return _MISMATCH


_MISMATCH: Final = (
    "verifying_share does not match signing_share (signing_share·G differs)",
    "share_mismatch",
)


class _Secp256k1(Scheme):
    name = _secp256k1.SUITE.name
    code = 1
    element_size = _secp256k1.ELEMENT_SIZE
    scalar_size = _secp256k1.SCALAR_SIZE
    signature_size = _secp256k1.ELEMENT_SIZE + _secp256k1.SCALAR_SIZE
    _mod = _secp256k1
    _suite: _secp256k1.Secp256k1Suite = _secp256k1.SUITE

    def identifier_to_bytes(self, value: int) -> bytes:
        return self._suite.identifier_to_bytes(value)

    def identifier_from_bytes(self, data: bytes) -> int:
        return self._suite.identifier_from_bytes(data)

    def trusted_dealer_keygen(
        self, min_signers: int, max_signers: int, *, identifiers: Sequence[int] | None = None
    ) -> DealerOutput:
        return _secp256k1_dealer(self, min_signers, max_signers, identifiers)

    def scalar_problem(self, identifier: Buffer, signing_share: Buffer) -> Problem:
        if len(identifier) != 32 or len(signing_share) != 32:
            return ("identifier and signing_share must be 32 bytes", "bad_length")
        ident = int.from_bytes(identifier, "big")
        if ident == 0:
            return ("identifier is zero", "zero_identifier")
        if ident >= _N:
            return ("identifier is not a canonical scalar (>= n)", "non_canonical_scalar")
        # libsecp256k1's seckey_verify is constant time: 1 for 0 < s < n.
        if not _secp256k1.seckey_is_valid(signing_share):
            if not any(signing_share):
                return ("signing_share is zero", "zero_signing_share")
            return ("signing_share is not a canonical scalar (>= n)", "non_canonical_scalar")
        return None

    def point_problem(
        self, signing_share: Buffer, verifying_share: Buffer, group_public_key: Buffer
    ) -> Problem:
        n = self.element_size
        if len(verifying_share) != n or len(group_public_key) != n:
            return (f"verifying_share and group_public_key must be {n} bytes", "bad_length")
        for what, value in (
            ("group_public_key", group_public_key),
            ("verifying_share", verifying_share),
        ):
            try:
                self._suite.deserialize_element(bytes(value), what)
            except FrostError:
                return (f"{what} {_INVALID_POINT}", "invalid_point")
        if _secp256k1.base_mult(signing_share) != bytes(verifying_share):
            return _MISMATCH
        return None


class _Secp256k1Tr(_Secp256k1):
    name = _secp256k1_tr.SUITE.name
    code = 2
    signature_size = 64
    taproot = True
    _mod = _secp256k1_tr
    _suite = _secp256k1_tr.SUITE

    def _root(self, merkle_root: bytes | None) -> dict[str, bytes | None]:
        return {"merkle_root": merkle_root}

    def verifying_key(self, group_public_key: bytes, merkle_root: bytes | None = None) -> bytes:
        return _secp256k1_tr.output_key(group_public_key, merkle_root)

    def verify(
        self,
        group_public_key: bytes,
        message: bytes,
        signature: bytes,
        merkle_root: bytes | None = None,
    ) -> bool:
        """BIP-340 verification by libsecp256k1 against the (tweaked) x-only output key."""
        try:
            key = _secp256k1_tr.output_key(group_public_key, merkle_root)
        except FrostError:
            return False
        return _secp256k1_tr.verify(key, message, signature)


def _secp256k1_dealer(
    scheme: _Secp256k1, min_signers: int, max_signers: int, identifiers: Sequence[int] | None
) -> DealerOutput:
    """RFC 9591 Appendix C on secp256k1: coefficients and shares in zeroable buffers, the
    polynomial evaluated with libsecp256k1's constant-time scalar functions. Both secp256k1
    suites store dealt keys as dealt (the Taproot suite normalises Y only when signing)."""
    if not 2 <= min_signers <= max_signers:
        raise FrostError(
            f"need 2 <= min_signers <= max_signers, got {min_signers} and {max_signers}"
        )
    ids = list(identifiers) if identifiers is not None else list(range(1, max_signers + 1))
    if len(ids) != max_signers or len(set(ids)) != len(ids):
        raise FrostError("need exactly max_signers distinct identifiers")
    id_bytes = [scheme.identifier_to_bytes(i) for i in ids]
    coeffs = [bytearray(32) for _ in range(min_signers)]
    tmp = bytearray(32)
    try:
        for co in coeffs:
            _secp256k1.random_scalar(co)
        group_public_key = _secp256k1.base_mult(coeffs[0])
        vss = [_secp256k1.base_mult(co) for co in coeffs[1:]]
        shares = []
        for ident, x in zip(id_bytes, ids, strict=True):
            value = bytearray(coeffs[0])
            power = 1
            for co in coeffs[1:]:
                power = power * x % _N
                tmp[:] = co
                _secp256k1.scalar_mul_into(tmp, power.to_bytes(32, "big"))
                _secp256k1.scalar_add_into(value, tmp)
            shares.append(DealerShare(ident, value, _secp256k1.base_mult(value)))
        return DealerOutput(group_public_key, shares, vss)
    finally:
        for co in coeffs:
            _sodium.memzero(co)
        _sodium.memzero(tmp)


ED25519: Final[Scheme] = _Ed25519()
SECP256K1: Final[Scheme] = _Secp256k1()
SECP256K1_TR: Final[Scheme] = _Secp256k1Tr()
#: Every suite, in code order.
SCHEMES: Final[tuple[Scheme, ...]] = (ED25519, SECP256K1, SECP256K1_TR)
_BY_NAME: Final = {s.name: s for s in SCHEMES}


def scheme_by_name(name: str) -> Scheme:
    """The suite with this contextString; :class:`~trio_sign.FrostError` names the known ones."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise FrostError(f"unknown ciphersuite {name!r}; known: {', '.join(_BY_NAME)}") from None


def scheme_by_code(code: int) -> Scheme:
    """The suite a sealed record's code byte names."""
    if 0 <= code < len(SCHEMES):
        return SCHEMES[code]
    raise FrostError(f"unknown ciphersuite code {code}")
