"""The FROST ciphersuite interface (RFC 9591 §6): what every suite module provides.

A ciphersuite fixes the prime-order group (its element and scalar encodings, with the
validation that ``DeserializeElement`` and ``DeserializeScalar`` must do) and the hash functions
H1..H5. The FROST rounds in each suite module are written against these operations; a suite's
``name`` is its RFC 9591 ``contextString`` (ZF's for the Taproot variant), which is also what a
share file records per account.

Elements cross this interface as their canonical serialization (``bytes``) so that a suite
module can keep whatever internal representation its library wants. Scalars that are public
(identifiers, binding factors, challenges, signature shares) cross it as Python ints; secret
scalars never do: the suite modules keep them in ``bytearray`` buffers.

Error handling: every ``deserialize_*`` raises :class:`~trio_sign.FrostError` with a one-line
reason (wrong length, not on the curve, the identity, non-canonical encoding, scalar not below
the order); the ``h*`` functions never raise.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .._errors import FrostError, InternalError
from . import _frost, _sodium

__all__ = ["Ciphersuite", "Ed25519Suite", "suite_by_name"]


@runtime_checkable
class Ciphersuite(Protocol):
    """One FROST ciphersuite: group encodings with validation, and H1..H5."""

    #: The RFC 9591 contextString, e.g. ``"FROST-secp256k1-SHA256-v1"``.
    name: str
    #: ``Ne``: bytes in a serialized element.
    element_size: int
    #: ``Ns``: bytes in a serialized scalar.
    scalar_size: int
    #: The group order.
    order: int

    def serialize_element(self, element: bytes) -> bytes:
        """Canonical encoding of a validated element; refuses the identity."""
        ...

    def deserialize_element(self, data: bytes, what: str = "element") -> bytes:
        """Validate a received element (length, canonical, on the curve, not the identity)."""
        ...

    def serialize_scalar(self, value: int) -> bytes:
        """Canonical encoding of a scalar below the order."""
        ...

    def deserialize_scalar(self, data: bytes, what: str = "scalar") -> int:
        """Validate a received scalar (length, below the order)."""
        ...

    def h1(self, m: bytes) -> int:
        """H1: the binding factor (``rho``)."""
        ...

    def h2(self, m: bytes) -> int:
        """H2: the challenge (``chal``)."""
        ...

    def h3(self, m: bytes) -> int:
        """H3: nonce derivation (``nonce``). Callers hashing secrets use the suite's buffer API."""
        ...

    def h4(self, m: bytes) -> bytes:
        """H4: the message hash (``msg``)."""
        ...

    def h5(self, m: bytes) -> bytes:
        """H5: the commitment list hash (``com``)."""
        ...


class Ed25519Suite:
    """``FROST-ED25519-SHA512-v1`` seen through :class:`Ciphersuite`.

    A view of ``_frost`` (whose functions and numbers are unchanged): the same validation
    (``crypto_core_ed25519_is_valid_point``, scalars below L, little-endian) and hashes.
    """

    name = _frost.CIPHERSUITE
    element_size = 32
    scalar_size = 32
    order = _sodium.L

    def __repr__(self) -> str:
        return f"<Ed25519Suite {self.name}>"

    def serialize_element(self, element: bytes) -> bytes:
        return self.deserialize_element(element)

    def deserialize_element(self, data: bytes, what: str = "element") -> bytes:
        _frost._check_element(bytes(data), what)
        return bytes(data)

    def serialize_scalar(self, value: int) -> bytes:
        if not 0 <= value < _sodium.L:
            raise InternalError("scalar out of range")
        return value.to_bytes(32, "little")

    def deserialize_scalar(self, data: bytes, what: str = "scalar") -> int:
        return _frost._scalar_int(bytes(data), what)

    def h1(self, m: bytes) -> int:
        return _frost.h1(m)

    def h2(self, m: bytes) -> int:
        return _frost.h2(m)

    def h3(self, m: bytes) -> int:
        return _frost._h_int(_frost.CONTEXT, b"nonce", m)

    def h4(self, m: bytes) -> bytes:
        return _frost.h4(m)

    def h5(self, m: bytes) -> bytes:
        return _frost.h5(m)


def suite_by_name(name: str) -> Ciphersuite:
    """The suite with this contextString; :class:`~trio_sign.FrostError` for an unknown one."""
    from . import _secp256k1, _secp256k1_tr

    suites: dict[str, Ciphersuite] = {
        Ed25519Suite.name: Ed25519Suite(),
        _secp256k1.SUITE.name: _secp256k1.SUITE,
        _secp256k1_tr.SUITE.name: _secp256k1_tr.SUITE,
    }
    try:
        return suites[name]
    except KeyError:
        raise FrostError(f"unknown ciphersuite {name!r}; known: {', '.join(suites)}") from None
