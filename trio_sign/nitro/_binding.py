"""What an attestation document binds (DESIGN §4 and §10): the channel and the loaded state.

``GetAttestation`` answers a document whose ``public_key`` is the DER SubjectPublicKeyInfo of
the enclave's current TLS key and whose ``user_data`` is the canonical CBOR map::

    {"shares": <32-byte SHA-256 of the base bundle>,
     "deltas": <32-byte head of the delta chain, or 32 zero bytes>,
     "config": <32-byte SHA-256 of the measured configuration file>}

Canonical CBOR (RFC 8949 §4.2.1): definite lengths, the shortest encodings, map keys sorted
by their encoded bytes; for these three text keys of different lengths that is ``shares``,
``config``, ``deltas`` sorted bytewise ("config" < "deltas" < "shares"). The encoder here is
the one reference: both the enclave (which binds) and every verifier (which compares) use
:func:`encode_binding` / :func:`decode_binding`, and the decoder refuses anything that is not
exactly what the encoder makes, so no two byte strings mean the same binding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import cbor2

from .._errors import TrioSignError

#: Bytes of each bound digest.
DIGEST_BYTES: Final = 32
#: The delta head before any delta was loaded.
NO_DELTAS: Final = bytes(DIGEST_BYTES)
_KEYS: Final = ("config", "deltas", "shares")


class BindingError(TrioSignError):
    """An attestation ``user_data`` is not a canonical binding map."""


@dataclass(frozen=True, slots=True)
class Binding:
    """The three digests a document binds (raw 32-byte values; ``.hex()`` for display)."""

    shares: bytes
    deltas: bytes
    config: bytes

    def __post_init__(self) -> None:
        for name in _KEYS:
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
                raise BindingError(f"binding {name} must be {DIGEST_BYTES} bytes")


def encode_binding(binding: Binding) -> bytes:
    """The canonical CBOR map of ``binding`` (the document's ``user_data``)."""
    return cbor2.dumps(
        {"shares": binding.shares, "deltas": binding.deltas, "config": binding.config},
        canonical=True,
    )


def decode_binding(user_data: bytes | None) -> Binding:
    """Parse a document's ``user_data``; refuses anything but the canonical map of exactly the
    three keys with 32-byte values (:class:`BindingError` naming what is wrong)."""
    if not user_data:
        raise BindingError("the document binds no user_data (expected the binding map)")
    if len(user_data) > 256:
        raise BindingError("user_data is too long for a binding map")
    try:
        value = cbor2.loads(user_data)
    except (cbor2.CBORDecodeError, ValueError, TypeError) as exc:
        raise BindingError(f"user_data is not CBOR: {exc}") from None
    if not isinstance(value, dict) or set(value) != set(_KEYS):
        raise BindingError(f"user_data must be a map with exactly the keys {', '.join(_KEYS)}")
    try:
        binding = Binding(shares=value["shares"], deltas=value["deltas"], config=value["config"])
    except BindingError:
        raise
    if encode_binding(binding) != user_data:
        raise BindingError("user_data is not in canonical CBOR form")
    return binding
