"""FROST(Ed25519, SHA-512) per RFC 9591, on libsodium.

What is secret and what is public decides the arithmetic used:

* Secret scalars (signing shares, nonces, and every product involving them) live in
  ``bytearray`` buffers and are combined only with libsodium's constant-time scalar functions.
  Scratch buffers are zeroed in ``finally`` blocks.
* Public values (identifiers, binding factors, Lagrange coefficients, the challenge, signature
  shares once sent) are handled as Python ints, which is faster and needs no zeroing.

Every element received from another party is deserialized with the prime-order subgroup check
(``crypto_core_ed25519_is_valid_point``, or implicitly by ``crypto_scalarmult_ed25519_noclamp``
which applies the same checks); every received scalar must be below L.

The numbered comments refer to RFC 9591 sections.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from .._errors import FrostError, InternalError, InvalidSignatureShareError
from . import _sodium as na
from ._sodium import Buffer, L

CIPHERSUITE = "FROST-ED25519-SHA512-v1"
CONTEXT = CIPHERSUITE.encode()

#: Encoding of the identity element; SerializeElement must refuse it (RFC 9591 §6.5).
_IDENTITY = (1).to_bytes(32, "little")


# -- encodings ------------------------------------------------------------------------------


def identifier_to_bytes(value: int) -> bytes:
    """Serialize an identifier (a non-zero scalar) as 32 little-endian bytes."""
    if not 0 < value < L:
        raise FrostError(f"identifier must be a non-zero scalar below L, got {value}")
    return value.to_bytes(32, "little")


def identifier_from_bytes(data: bytes) -> int:
    """Deserialize and validate a 32-byte identifier (non-zero, canonical)."""
    if len(data) != 32:
        raise FrostError(f"identifier must be 32 bytes, got {len(data)}")
    value = int.from_bytes(data, "little")
    if value == 0:
        raise FrostError("identifier must not be zero")
    if value >= L:
        raise FrostError("identifier is not a canonical scalar (>= L)")
    return value


def _describe_identifier(value: int) -> str:
    return str(value) if value < 2**32 else "0x" + value.to_bytes(32, "little").hex()


def _check_element(data: bytes, what: str) -> None:
    if len(data) != 32:
        raise FrostError(f"{what} must be 32 bytes, got {len(data)}")
    if not na.is_valid_point(data):
        raise FrostError(f"{what} is not a valid element of the prime-order group")


def _scalar_int(data: bytes, what: str) -> int:
    if len(data) != 32:
        raise FrostError(f"{what} must be 32 bytes, got {len(data)}")
    value = int.from_bytes(data, "little")
    if value >= L:
        raise FrostError(f"{what} is not a canonical scalar (>= L)")
    return value


def _le(value: int) -> bytes:
    return value.to_bytes(32, "little")


# -- hash functions (RFC 9591 §6.5) ---------------------------------------------------------


def _h_int(*parts: bytes) -> int:
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little") % L


def h1(m: bytes) -> int:
    """H1: binding factor hash."""
    return _h_int(CONTEXT, b"rho", m)


def h2(m: bytes) -> int:
    """H2: the challenge. No context prefix, so the result is ordinary Ed25519."""
    return _h_int(m)


def h4(m: bytes) -> bytes:
    """H4: message hash."""
    return hashlib.sha512(CONTEXT + b"msg" + m).digest()


def h5(m: bytes) -> bytes:
    """H5: commitment list hash."""
    return hashlib.sha512(CONTEXT + b"com" + m).digest()


def nonce_generate(out: bytearray | memoryview, secret: Buffer, randomness: Buffer) -> None:
    """``out = H3(randomness || secret)`` (RFC 9591 §4.1), computed in zeroable buffers.

    ``randomness`` is 32 fresh random bytes; mixing in the secret hedges against a bad RNG.
    """
    if len(randomness) != 32 or len(secret) != 32:
        raise InternalError("nonce_generate needs 32 bytes of randomness and a 32-byte secret")
    prefix = CONTEXT + b"nonce"
    buf = bytearray(len(prefix) + 64)
    digest = bytearray(64)
    try:
        buf[: len(prefix)] = prefix
        buf[len(prefix) : len(prefix) + 32] = randomness
        buf[len(prefix) + 32 :] = secret
        na.sha512(digest, buf)
        na.scalar_reduce(out, digest)
    finally:
        na.memzero(buf)
        na.memzero(digest)


# -- commitments ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SigningCommitment:
    """A participant's public round-one output: identifier, hiding (D) and binding (E)."""

    identifier: bytes
    hiding: bytes
    binding: bytes


class SigningNonces:
    """A participant's secret round-one state: the hiding and binding nonces.

    Single use by construction: :func:`sign` consumes them (zeroing the buffer) whether it
    succeeds or fails after the commitment list was checked; :meth:`zero` drops them
    (abort, expiry). Neither nonce is ever shown by ``repr``.
    """

    __slots__ = ("_buf", "commitment", "used")

    def __init__(self, buf: bytearray, commitment: SigningCommitment) -> None:
        self._buf = buf
        self.commitment = commitment
        self.used = False

    @property
    def hiding(self) -> memoryview:
        return memoryview(self._buf)[:32]

    @property
    def binding(self) -> memoryview:
        return memoryview(self._buf)[32:]

    def zero(self) -> None:
        """Zero both nonces and mark them used (idempotent)."""
        na.memzero(self._buf)
        self.used = True

    def __repr__(self) -> str:
        state = "used" if self.used else "fresh"
        return f"<SigningNonces {state} identifier={self.commitment.identifier.hex()}>"


def commit(
    identifier: bytes,
    signing_share: Buffer,
    *,
    hiding_randomness: Buffer | None = None,
    binding_randomness: Buffer | None = None,
) -> SigningNonces:
    """FROST round one (RFC 9591 §5.1): fresh nonces and their commitments.

    The randomness arguments exist for the RFC test vectors only; production callers leave
    them unset so that 32 bytes come from the OS CSPRNG for each nonce.
    """
    identifier_from_bytes(identifier)
    buf = bytearray(64)
    rand = bytearray(32)
    commitments = bytearray(64)
    try:
        for offset, given in ((0, hiding_randomness), (32, binding_randomness)):
            if given is None:
                na.random_bytes(rand)
                nonce_generate(memoryview(buf)[offset : offset + 32], signing_share, rand)
            else:
                nonce_generate(memoryview(buf)[offset : offset + 32], signing_share, given)
            if na.scalar_is_zero(memoryview(buf)[offset : offset + 32]):  # pragma: no cover
                raise InternalError("nonce reduced to zero")
            if not na.base_mult(
                memoryview(commitments)[offset : offset + 32],
                memoryview(buf)[offset : offset + 32],
            ):  # pragma: no cover - only the zero scalar fails, excluded above
                raise InternalError("nonce commitment is the identity")
    except BaseException:
        na.memzero(buf)
        raise
    finally:
        na.memzero(rand)
    return SigningNonces(
        buf, SigningCommitment(identifier, bytes(commitments[:32]), bytes(commitments[32:]))
    )


# -- the commitment list --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A validated commitment list with the derived public values signers need."""

    ids: list[int]
    commitments: list[SigningCommitment]
    prefix: bytes  # group_public_key || H4(msg) || H5(encoded list)
    rhos: list[int]


def encode_group_commitment_list(commitments: Sequence[SigningCommitment]) -> bytes:
    """RFC 9591 §4.3 ``encode_group_commitment_list``."""
    return b"".join(c.identifier + c.hiding + c.binding for c in commitments)


def binding_factor_input_prefix(
    group_public_key: bytes, commitments: Sequence[SigningCommitment], message: bytes
) -> bytes:
    """``SerializeElement(PK) || H4(msg) || H5(encode_group_commitment_list(list))``."""
    return group_public_key + h4(message) + h5(encode_group_commitment_list(commitments))


def _parse_commitment_list(
    commitments: Iterable[SigningCommitment],
    group_public_key: bytes,
    message: bytes,
    *,
    min_signers: int | None,
    max_signers: int | None,
) -> _Parsed:
    commitments = list(commitments)
    n = len(commitments)
    if min_signers is not None and n < min_signers:
        raise FrostError(f"too few signers: {n} commitments, at least {min_signers} required")
    if max_signers is not None and n > max_signers:
        raise FrostError(f"too many signers: {n} commitments, at most {max_signers} allowed")
    if n < 2:
        raise FrostError(f"too few signers: {n} commitments, at least 2 required")
    ids: list[int] = []
    for c in commitments:
        if len(c.hiding) != 32 or len(c.binding) != 32:
            raise FrostError("each commitment must have 32-byte hiding and binding elements")
        value = identifier_from_bytes(c.identifier)
        if ids and value <= ids[-1]:
            if value == ids[-1]:
                raise FrostError(f"duplicate identifier {_describe_identifier(value)}")
            raise FrostError("commitments must be sorted by identifier in ascending order")
        ids.append(value)
    prefix = binding_factor_input_prefix(group_public_key, commitments, message)
    rhos = [h1(prefix + c.identifier) for c in commitments]
    return _Parsed(ids, commitments, prefix, rhos)


def lagrange_coefficient(ids: Sequence[int], x_i: int) -> int:
    """RFC 9591 §4.2 ``derive_interpolating_value`` on public identifiers."""
    num = 1
    den = 1
    found = False
    for x_j in ids:
        if x_j == x_i:
            found = True
            continue
        num = num * x_j % L
        den = den * (x_j - x_i) % L
    if not found:
        raise InternalError("identifier not in participant list")
    return num * pow(den, -1, L) % L


def _commitment_share(c: SigningCommitment, rho: int, *, validate_hiding: bool) -> bytes:
    """``D + rho * E`` with both elements validated (E by the noclamp multiply)."""
    if validate_hiding and not na.is_valid_point(c.hiding):
        raise FrostError(
            f"hiding commitment of identifier "
            f"{_describe_identifier(int.from_bytes(c.identifier, 'little'))} "
            "is not a valid element of the prime-order group"
        )
    rho_e = bytearray(32)
    if not na.scalar_mult(rho_e, _le(rho), c.binding):
        raise FrostError(
            f"binding commitment of identifier "
            f"{_describe_identifier(int.from_bytes(c.identifier, 'little'))} "
            "is not a valid element of the prime-order group"
        )
    out = bytearray(32)
    if not na.point_add(out, c.hiding, rho_e):  # pragma: no cover - inputs validated above
        raise InternalError("point addition failed on validated elements")
    return bytes(out)


def _sum_points(points: Iterable[Buffer]) -> bytes:
    acc: bytearray | None = None
    for p in points:
        if acc is None:
            acc = bytearray(p)
            continue
        if not na.point_add(acc, acc, p):  # pragma: no cover - inputs validated
            raise InternalError("point addition failed on validated elements")
    if acc is None:  # pragma: no cover
        raise InternalError("empty point sum")
    if bytes(acc) == _IDENTITY:
        raise FrostError("group commitment is the identity element")
    return bytes(acc)


def _challenge(group_commitment: bytes, group_public_key: bytes, message: bytes) -> int:
    return h2(group_commitment + group_public_key + message)


# -- round two ------------------------------------------------------------------------------


def sign(
    nonces: SigningNonces,
    *,
    signing_share: Buffer,
    group_public_key: bytes,
    message: bytes,
    commitments: Iterable[SigningCommitment],
    min_signers: int | None = None,
    max_signers: int | None = None,
) -> bytes:
    """FROST round two (RFC 9591 §5.2): this participant's signature share.

    Checks, in order: the nonces are unused; the list size is within the threshold; every
    identifier is a canonical non-zero scalar, sorted ascending and unique; this participant's
    own commitment is present and byte-equal to the one it produced; every other participant's
    hiding and binding commitments are valid prime-order elements. Nonces are consumed (zeroed)
    once the list passed these checks, so a share is never computed twice from the same nonces.

    Error handling:
        Raises :class:`FrostError` naming what was wrong. Input validation failures before the
        nonces are consumed leave them usable, so a caller may retry with a corrected list.
    """
    if nonces.used:
        raise FrostError("signing nonces were already used; commit again for a new session")
    own = nonces.commitment
    parsed = _parse_commitment_list(
        commitments, group_public_key, message, min_signers=min_signers, max_signers=max_signers
    )
    own_id = int.from_bytes(own.identifier, "little")
    try:
        index = parsed.ids.index(own_id)
    except ValueError:
        raise FrostError("this signer's commitment is missing from the commitment list") from None
    mine = parsed.commitments[index]
    if mine.hiding != own.hiding or mine.binding != own.binding:
        raise FrostError("this signer's commitment in the list differs from the one it produced")
    # Peers' commitment shares: validates every element they sent.
    peer_shares = [
        _commitment_share(c, rho, validate_hiding=True)
        for j, (c, rho) in enumerate(zip(parsed.commitments, parsed.rhos, strict=True))
        if j != index
    ]
    rho = _le(parsed.rhos[index])
    lam = lagrange_coefficient(parsed.ids, own_id)

    # From here on, the nonces are consumed whatever happens.
    nonces.used = True
    own_r = bytearray(32)  # d + e*rho: the secret behind our commitment share
    tmp = bytearray(32)
    try:
        na.scalar_mul(tmp, nonces.binding, rho)
        na.scalar_add(own_r, nonces.hiding, tmp)
        own_point = bytearray(32)
        if not na.base_mult(own_point, own_r):  # pragma: no cover - negligible probability
            raise FrostError("degenerate nonce combination; commit again")
        group_commitment = _sum_points([own_point, *peer_shares])
        c = _challenge(group_commitment, group_public_key, message)
        # z = (d + e*rho) + (lambda * c) * s
        na.scalar_mul(tmp, signing_share, _le(lam * c % L))
        z = bytearray(32)
        na.scalar_add(z, own_r, tmp)
        return bytes(z)
    finally:
        na.memzero(tmp)
        na.memzero(own_r)
        nonces.zero()


# -- coordinator side -----------------------------------------------------------------------


def group_commitment(
    commitments: Iterable[SigningCommitment], group_public_key: bytes, message: bytes
) -> bytes:
    """RFC 9591 §4.5 ``compute_group_commitment`` with every element validated."""
    parsed = _parse_commitment_list(
        commitments, group_public_key, message, min_signers=None, max_signers=None
    )
    return _sum_points(
        _commitment_share(c, rho, validate_hiding=True)
        for c, rho in zip(parsed.commitments, parsed.rhos, strict=True)
    )


def verify_signature_share(
    *,
    identifier: bytes,
    verifying_share: bytes,
    signature_share: bytes,
    commitments: Iterable[SigningCommitment],
    group_public_key: bytes,
    message: bytes,
) -> bool:
    """RFC 9591 §5.4: check ``z_i * G == D_i + rho_i * E_i + (c * lambda_i) * PK_i``."""
    parsed = _parse_commitment_list(
        commitments, group_public_key, message, min_signers=None, max_signers=None
    )
    return _verify_share(
        parsed, identifier, verifying_share, signature_share, group_public_key, message
    )


def _verify_share(
    parsed: _Parsed,
    identifier: bytes,
    verifying_share: bytes,
    signature_share: bytes,
    group_public_key: bytes,
    message: bytes,
) -> bool:
    x_i = identifier_from_bytes(identifier)
    _check_element(verifying_share, "verifying share")
    _scalar_int(signature_share, "signature share")
    try:
        index = parsed.ids.index(x_i)
    except ValueError:
        raise FrostError("identifier has no commitment in the commitment list") from None
    shares = [
        _commitment_share(c, rho, validate_hiding=True)
        for c, rho in zip(parsed.commitments, parsed.rhos, strict=True)
    ]
    r = _sum_points(shares)
    c = _challenge(r, group_public_key, message)
    lam = lagrange_coefficient(parsed.ids, x_i)
    lhs = bytearray(32)
    if not na.base_mult(lhs, signature_share):
        return False  # z == 0: cannot match a valid commitment share
    rhs = bytearray(32)
    if not na.scalar_mult(rhs, _le(c * lam % L), verifying_share):  # pragma: no cover
        return False
    if not na.point_add(rhs, shares[index], rhs):  # pragma: no cover
        raise InternalError("point addition failed on validated elements")
    return bytes(lhs) == bytes(rhs)


def aggregate(
    *,
    commitments: Iterable[SigningCommitment],
    message: bytes,
    group_public_key: bytes,
    signature_shares: Mapping[bytes, bytes],
    verifying_shares: Mapping[bytes, bytes] | None = None,
) -> bytes:
    """RFC 9591 §5.3: combine the shares into a 64-byte Ed25519 signature ``R || z``.

    The aggregate is verified with libsodium's Ed25519 verification. If it does not verify and
    ``verifying_shares`` is given, every share is checked (§5.4) and the first faulty signer is
    named.

    Error handling:
        Raises :class:`InvalidSignatureShareError` (with ``.identifier``) when a share is
        faulty, and :class:`FrostError` for malformed input or a signature that fails without
        a faulty share to blame (for example a wrong group public key).
    """
    parsed = _parse_commitment_list(
        commitments, group_public_key, message, min_signers=None, max_signers=None
    )
    _check_element(group_public_key, "group public key")
    if set(signature_shares) != {c.identifier for c in parsed.commitments}:
        raise FrostError("signature shares must come from exactly the committed signers")
    z = 0
    for ident, share in signature_shares.items():
        z += _scalar_int(share, f"signature share of identifier {ident.hex()}")
    r = _sum_points(
        _commitment_share(c, rho, validate_hiding=True)
        for c, rho in zip(parsed.commitments, parsed.rhos, strict=True)
    )
    signature = r + _le(z % L)
    if verify(group_public_key, message, signature):
        return signature
    if verifying_shares is not None:
        for c in parsed.commitments:
            ident = c.identifier
            if ident not in verifying_shares:
                raise FrostError(f"no verifying share for identifier {ident.hex()}")
            if not _verify_share(
                parsed,
                ident,
                verifying_shares[ident],
                signature_shares[ident],
                group_public_key,
                message,
            ):
                who = _describe_identifier(int.from_bytes(ident, "little"))
                raise InvalidSignatureShareError(
                    f"signature share of identifier {who} is invalid", identifier=ident
                )
    raise FrostError("aggregate signature does not verify under the group public key")


def verify(group_public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Standard RFC 8032 Ed25519 verification with libsodium."""
    if len(signature) != 64 or len(group_public_key) != 32:
        return False
    try:
        crypto_sign_open(signature + message, group_public_key)
    except BadSignatureError:
        return False
    return True


# -- trusted dealer (RFC 9591 Appendix C) ---------------------------------------------------


class DealerShare:
    """One participant's output of :func:`trusted_dealer_keygen`. ``signing_share`` is secret."""

    __slots__ = ("identifier", "signing_share", "verifying_share")

    def __init__(self, identifier: bytes, signing_share: bytearray, verifying_share: bytes):
        self.identifier = identifier
        self.signing_share = signing_share
        self.verifying_share = verifying_share

    def zero(self) -> None:
        na.memzero(self.signing_share)

    def __repr__(self) -> str:
        return f"<DealerShare identifier={self.identifier.hex()}>"


@dataclass(frozen=True, slots=True)
class DealerOutput:
    group_public_key: bytes
    shares: list[DealerShare]
    vss_commitment: list[bytes]


def random_scalar(out: bytearray | memoryview) -> None:
    """A uniformly random non-zero scalar, written into ``out``."""
    wide = bytearray(64)
    try:
        while True:
            na.random_bytes(wide)
            na.scalar_reduce(out, wide)
            if not na.scalar_is_zero(out):
                return
    finally:
        na.memzero(wide)


def trusted_dealer_keygen(
    min_signers: int,
    max_signers: int,
    *,
    identifiers: Sequence[int] | None = None,
    secret: Buffer | None = None,
    coefficients: Sequence[Buffer] | None = None,
) -> DealerOutput:
    """Split a (random, or given) group secret into ``max_signers`` Shamir shares.

    For tests, demos and the ``shares generate`` tool; production keys come from a key
    ceremony. ``identifiers`` default to 1..max_signers. ``secret`` and ``coefficients`` exist
    for the RFC vectors. All secret polynomial arithmetic runs in libsodium and the secret and
    coefficients are zeroed before returning.
    """
    if not 2 <= min_signers <= max_signers:
        raise FrostError(
            f"need 2 <= min_signers <= max_signers, got {min_signers} and {max_signers}"
        )
    ids = list(identifiers) if identifiers is not None else list(range(1, max_signers + 1))
    if len(ids) != max_signers or len(set(ids)) != len(ids):
        raise FrostError("need exactly max_signers distinct identifiers")
    id_bytes = [identifier_to_bytes(i) for i in ids]
    coeffs = [bytearray(32) for _ in range(min_signers)]
    try:
        if secret is None:
            random_scalar(coeffs[0])
        else:
            if not na.scalar_is_canonical(secret) or na.scalar_is_zero(secret):
                raise FrostError("group secret must be a canonical non-zero scalar")
            coeffs[0][:] = secret
        if coefficients is not None:
            if len(coefficients) != min_signers - 1:
                raise FrostError(f"need {min_signers - 1} polynomial coefficients")
            for dst, src in zip(coeffs[1:], coefficients, strict=True):
                if not na.scalar_is_canonical(src):
                    raise FrostError("polynomial coefficients must be canonical scalars")
                dst[:] = src
        else:
            for dst in coeffs[1:]:
                random_scalar(dst)
        group_public_key = bytearray(32)
        na.base_mult(group_public_key, coeffs[0])
        vss = []
        for co in coeffs[1:]:
            point = bytearray(32)
            na.base_mult(point, co)
            vss.append(bytes(point))
        shares = []
        for ident in id_bytes:
            value = bytearray(32)
            # Horner: value = (...(a_{t-1} x + a_{t-2}) x + ...) x + a_0
            for co in reversed(coeffs):
                na.scalar_mul(value, value, ident)
                na.scalar_add(value, value, co)
            verifying = bytearray(32)
            if not na.base_mult(verifying, value):  # pragma: no cover - negligible
                raise FrostError("degenerate share; run key generation again")
            shares.append(DealerShare(ident, value, bytes(verifying)))
        return DealerOutput(bytes(group_public_key), shares, vss)
    finally:
        for co in coeffs:
            na.memzero(co)
