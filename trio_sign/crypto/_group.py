"""Per-suite group arithmetic for key generation (DKG and share repair), on the suites' primitives.

The signing modules (``_frost``, ``_secp256k1``, ``_secp256k1_tr``) each do their arithmetic in
their own way; key generation needs a little more of it (secret polynomial evaluation, sums of
received shares, sums and multiples of public commitments, the proof of knowledge), written
once against this adapter. :func:`group_for` returns the one for a suite.

Secret scalars are ``bytearray`` buffers in the suite's scalar encoding (little-endian for
Ed25519, big-endian for secp256k1) and are combined in place: libsodium's constant-time scalar
functions for Ed25519, libsecp256k1's ``seckey`` tweaks for secp256k1. Public scalars
(identifiers, Lagrange coefficients, challenges) are Python ints; elements are their canonical
serializations (``bytes``).

What libsecp256k1 does not allow, and what we do instead: it has no secret scalar for zero
(``seckey_tweak_add`` fails when a sum reduces to zero, ``seckey_tweak_mul`` refuses a zero
factor and ``seckey_negate`` a zero key), so :meth:`Group.add`, :meth:`Group.mul` and
:meth:`Group.negate` test their operands and the result for zero
(with a constant-time comparison) and handle it themselves. Which branch ran is therefore
visible in timing, but only when a secret is exactly zero, which happens with negligible
probability for honest inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from coincurve import PublicKey
from coincurve._libsecp256k1 import ffi, lib  # type: ignore[import-not-found]
from coincurve.context import GLOBAL_CONTEXT

from .._errors import FrostError, InternalError
from . import _frost, _secp256k1, _secp256k1_tr
from . import _sodium as na
from ._sodium import Buffer
from ._suite import Ciphersuite, Ed25519Suite

__all__ = ["Group", "group_for", "lagrange_at"]


def lagrange_at(ids: Iterable[int], x_i: int, x: int, order: int) -> int:
    """``prod_{j != i} (x - x_j) / (x_i - x_j)`` over public identifiers (ZF
    ``compute_lagrange_coefficient`` with ``Some(x)``): the weight of ``x_i``'s share when
    interpolating the polynomial at ``x``."""
    num = 1
    den = 1
    found = False
    for x_j in ids:
        if x_j == x_i:
            found = True
            continue
        num = num * (x - x_j) % order
        den = den * (x_i - x_j) % order
    if not found:
        raise InternalError("identifier not in the interpolation set")
    return num * pow(den, -1, order) % order


class Group:
    """The operations key generation needs from one suite (see the module docstring)."""

    suite: Ciphersuite
    order: int
    scalar_size: int
    element_size: int
    #: True for ``FROST-secp256k1-SHA256-TR-v1`` (x-only proof-of-knowledge R, post-DKG tweak).
    taproot = False

    @property
    def name(self) -> str:
        return self.suite.name

    def __repr__(self) -> str:
        return f"<Group {self.name}>"

    # -- identifiers and public encodings ------------------------------------------------------

    def identifier_from_bytes(self, data: bytes) -> int:
        raise NotImplementedError

    def identifier_to_bytes(self, value: int) -> bytes:
        raise NotImplementedError

    def describe(self, value: int) -> str:
        """An identifier in an error line: small ones as numbers, derived ones as their hex."""
        return str(value) if value < 2**32 else "0x" + self.identifier_to_bytes(value).hex()

    def describe_identifier(self, ident: bytes) -> str:
        """A serialized identifier in an error line; one of the wrong length (from a request,
        as long as the request) is described by its size, neither decoded nor quoted."""
        if len(ident) != self.scalar_size:
            return f"of {len(ident)} bytes"
        try:
            return self.describe(self.identifier_from_bytes(ident))
        except FrostError:
            return "0x" + bytes(ident).hex()

    def scalar_bytes(self, value: int) -> bytes:
        """Serialize a public scalar (reduced mod the order first)."""
        return self.suite.serialize_scalar(value % self.order)

    def element(self, data: bytes, what: str) -> bytes:
        """``DeserializeElement`` with the suite's validation (refuses the identity)."""
        return self.suite.deserialize_element(bytes(data), what)

    # -- secret scalars in buffers -------------------------------------------------------------

    def new_scalar(self) -> bytearray:
        return bytearray(self.scalar_size)

    def is_zero(self, buf: Buffer) -> bool:
        return na.ct_equal(buf, bytes(len(buf)))

    def check_secret_scalar(self, buf: Buffer, what: str) -> None:
        """Refuse a received secret scalar of the wrong length or not below the order, without
        turning it into a Python int."""
        raise NotImplementedError

    def random_scalar(self, out: bytearray) -> None:
        """A uniformly random non-zero scalar from the OS CSPRNG, written into ``out``."""
        raise NotImplementedError

    def add(self, acc: bytearray, b: Buffer) -> None:
        """``acc = acc + b`` in place."""
        raise NotImplementedError

    def mul(self, acc: bytearray, b: Buffer) -> None:
        """``acc = acc * b`` in place."""
        raise NotImplementedError

    def negate(self, acc: bytearray) -> None:
        """``acc = -acc`` in place."""
        raise NotImplementedError

    def base_mult(self, secret: Buffer) -> bytes:
        """``SerializeElement(secret * G)``; :class:`InternalError` for the zero scalar."""
        raise NotImplementedError

    def evaluate(self, out: bytearray, coefficients: Sequence[Buffer], x: bytes) -> None:
        """``out = f(x)`` for the secret polynomial ``f`` (Horner, highest coefficient first)."""
        out[:] = coefficients[-1]
        for co in reversed(coefficients[:-1]):
            self.mul(out, x)
            self.add(out, co)

    # -- public elements -----------------------------------------------------------------------

    def mul_point(self, point: bytes, scalar: int) -> bytes | None:
        """``scalar * point`` for public values; ``None`` for the identity."""
        raise NotImplementedError

    def sum_points(self, points: Sequence[bytes], what: str) -> bytes:
        """The sum of validated elements; :class:`FrostError` naming ``what`` for the identity."""
        raise NotImplementedError

    def evaluate_commitment(self, commitment: Sequence[bytes], x: int, what: str) -> bytes:
        """``sum_k phi_k * x^k``: the public image of a VSS polynomial at ``x``."""
        terms: list[bytes] = []
        power = 1
        for phi in commitment:
            term = phi if power == 1 else self.mul_point(phi, power)
            if term is not None:  # pragma: no branch - x is a non-zero identifier
                terms.append(term)
            power = power * x % self.order
        return self.sum_points(terms, what)

    # -- the DKG's proof of knowledge ----------------------------------------------------------

    def hdkg(self, m: bytes) -> int:
        """ZF's ``HDKG``: the proof-of-knowledge challenge hash (``contextString || "dkg"``)."""
        raise NotImplementedError

    def pok_nonce(self, out: bytearray) -> bytes:
        """A random nonce ``k`` into ``out``; returns ``R = k * G`` (ZF ``generate_nonce``)."""
        self.random_scalar(out)
        return self.base_mult(out)

    def encode_signature(self, r: bytes, z: Buffer) -> bytes:
        """ZF ``serialize_signature``: ``R || z``."""
        return r + bytes(z)

    def decode_signature(self, data: bytes, what: str) -> tuple[bytes, int]:
        """ZF ``deserialize_signature`` with validation: ``(R, z)``."""
        size = self.element_size + self.scalar_size
        if len(data) != size:
            raise FrostError(f"{what} must be {size} bytes, got {len(data)}")
        r = self.element(data[: self.element_size], f"{what} (R)")
        z = self.suite.deserialize_scalar(bytes(data[self.element_size :]), f"{what} (z)")
        return r, z


class _Ed25519Group(Group):
    def __init__(self) -> None:
        self.suite = Ed25519Suite()
        self.order = na.L
        self.scalar_size = 32
        self.element_size = 32
        self._minus_one = (na.L - 1).to_bytes(32, "little")

    def identifier_from_bytes(self, data: bytes) -> int:
        return _frost.identifier_from_bytes(bytes(data))

    def identifier_to_bytes(self, value: int) -> bytes:
        return _frost.identifier_to_bytes(value)

    def element(self, data: bytes, what: str) -> bytes:
        if bytes(data) == _frost._IDENTITY:  # say so; libsodium only says "not valid"
            raise FrostError(f"{what} is the identity element")
        return super().element(data, what)

    def check_secret_scalar(self, buf: Buffer, what: str) -> None:
        if len(buf) != 32:
            raise FrostError(f"{what} must be 32 bytes, got {len(buf)}")
        if not na.scalar_is_canonical(buf):
            raise FrostError(f"{what} is not a canonical scalar (>= L)")

    def random_scalar(self, out: bytearray) -> None:
        _frost.random_scalar(out)

    def add(self, acc: bytearray, b: Buffer) -> None:
        na.scalar_add(acc, acc, b)

    def mul(self, acc: bytearray, b: Buffer) -> None:
        na.scalar_mul(acc, acc, b)

    def negate(self, acc: bytearray) -> None:
        na.scalar_mul(acc, acc, self._minus_one)

    def base_mult(self, secret: Buffer) -> bytes:
        out = bytearray(32)
        if not na.base_mult(out, secret):
            raise InternalError("base multiplication of the zero scalar")
        return bytes(out)

    def mul_point(self, point: bytes, scalar: int) -> bytes | None:
        scalar %= na.L
        if scalar == 0:
            return None
        out = bytearray(32)
        if not na.scalar_mult(out, scalar.to_bytes(32, "little"), point):  # pragma: no cover
            raise InternalError("multiplication of a validated element failed")
        return bytes(out)

    def sum_points(self, points: Sequence[bytes], what: str) -> bytes:
        if not points:
            raise FrostError(f"{what} is the identity element")
        acc = bytearray(points[0])
        for p in points[1:]:
            if not na.point_add(acc, acc, p):  # pragma: no cover - inputs validated
                raise InternalError("point addition failed on validated elements")
        if bytes(acc) == _frost._IDENTITY:
            raise FrostError(f"{what} is the identity element")
        return bytes(acc)

    def hdkg(self, m: bytes) -> int:
        return _frost._h_int(_frost.CONTEXT, b"dkg", m)


def _wbuf(buf: bytearray) -> Any:
    return ffi.from_buffer("unsigned char[]", buf, require_writable=True)


class _Secp256k1Group(Group):
    def __init__(self, suite: _secp256k1.Secp256k1Suite) -> None:
        self.suite = suite
        self._suite = suite
        self.order = _secp256k1.N
        self.scalar_size = _secp256k1.SCALAR_SIZE
        self.element_size = _secp256k1.ELEMENT_SIZE
        self._dkg_dst = suite.name.encode() + b"dkg"

    def identifier_from_bytes(self, data: bytes) -> int:
        return self._suite.identifier_from_bytes(bytes(data))

    def identifier_to_bytes(self, value: int) -> bytes:
        return self._suite.identifier_to_bytes(value)

    def element(self, data: bytes, what: str) -> bytes:
        if bytes(data) == bytes(_secp256k1.ELEMENT_SIZE):
            # ZF pads the identity's one-byte SEC1 encoding with zeros to 33 bytes.
            raise FrostError(f"{what} is the identity element")
        return super().element(data, what)

    def _valid_nonzero(self, buf: Buffer) -> bool:
        return bool(lib.secp256k1_ec_seckey_verify(GLOBAL_CONTEXT.ctx, ffi.from_buffer(buf)))

    def check_secret_scalar(self, buf: Buffer, what: str) -> None:
        if len(buf) != 32:
            raise FrostError(f"{what} must be 32 bytes, got {len(buf)}")
        if not (self._valid_nonzero(buf) or self.is_zero(buf)):
            raise FrostError(f"{what} is not a canonical scalar (>= n)")

    def random_scalar(self, out: bytearray) -> None:
        # libsodium's randombytes writes straight into the buffer (coincurve binds no RNG);
        # rejection sampling below n is uniform and ends after one draw but with prob. ~2^-128.
        while True:
            na.random_bytes(out)
            if self._valid_nonzero(out):
                return

    def add(self, acc: bytearray, b: Buffer) -> None:
        if self.is_zero(b):
            return
        if self.is_zero(acc):
            acc[:] = b
            return
        ok = lib.secp256k1_ec_seckey_tweak_add(GLOBAL_CONTEXT.ctx, _wbuf(acc), ffi.from_buffer(b))
        if not ok:  # the sum is zero (inputs are validated scalars)
            _secp256k1._zero(acc)

    def mul(self, acc: bytearray, b: Buffer) -> None:
        if self.is_zero(acc) or self.is_zero(b):
            _secp256k1._zero(acc)
            return
        _secp256k1._tweak_mul(acc, b)

    def negate(self, acc: bytearray) -> None:
        if self.is_zero(acc):  # seckey_negate refuses zero (returns 0)
            return
        _secp256k1._negate(acc)

    def base_mult(self, secret: Buffer) -> bytes:
        return _secp256k1.base_mult(secret)

    def mul_point(self, point: bytes, scalar: int) -> bytes | None:
        product = _secp256k1._mul_public(point, scalar)
        return None if product is None else product.format(compressed=True)

    def sum_points(self, points: Sequence[bytes], what: str) -> bytes:
        if not points:
            raise FrostError(f"{what} is the identity element")
        if len(points) == 1:
            return points[0]
        return _secp256k1._sum_points([PublicKey(p) for p in points], what)

    def hdkg(self, m: bytes) -> int:
        return _secp256k1._hash_to_scalar(m, self._dkg_dst)


class _TaprootGroup(_Secp256k1Group):
    """``FROST-secp256k1-SHA256-TR-v1``: even-Y proof nonces and 64-byte ``x(R) || z`` proofs."""

    taproot = True

    def __init__(self) -> None:
        super().__init__(_secp256k1_tr.SUITE)

    def pok_nonce(self, out: bytearray) -> bytes:
        # ZF's Taproot ``generate_nonce``: negate k when k*G has odd Y, so R is even.
        r = super().pok_nonce(out)
        if r[0] == 3:
            self.negate(out)
            r = b"\x02" + r[1:]
        return r

    def encode_signature(self, r: bytes, z: Buffer) -> bytes:
        return r[1:] + bytes(z)

    def decode_signature(self, data: bytes, what: str) -> tuple[bytes, int]:
        if len(data) != 64:
            raise FrostError(f"{what} must be 64 bytes, got {len(data)}")
        r = self.element(b"\x02" + bytes(data[:32]), f"{what} (R)")
        z = self.suite.deserialize_scalar(bytes(data[32:]), f"{what} (z)")
        return r, z


_GROUPS: dict[str, Group] = {}


def group_for(suite: Ciphersuite | str) -> Group:
    """The adapter for a suite (or its contextString); :class:`FrostError` for an unknown one."""
    name = suite if isinstance(suite, str) else suite.name
    if not _GROUPS:
        for group in (_Ed25519Group(), _Secp256k1Group(_secp256k1.SUITE), _TaprootGroup()):
            _GROUPS[group.name] = group
    try:
        return _GROUPS[name]
    except KeyError:
        known = ", ".join(_GROUPS)
        raise FrostError(f"unknown ciphersuite {name!r}; known: {known}") from None
