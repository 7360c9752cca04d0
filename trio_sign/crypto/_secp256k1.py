"""FROST(secp256k1, SHA-256) per RFC 9591 (``FROST-secp256k1-SHA256-v1``), on libsecp256k1.

libsecp256k1 is reached through coincurve. What is secret and what is public decides the
arithmetic used, as in the Ed25519 suite (``_frost.py``):

* Secret scalars (signing shares, nonces, and every product involving them) live in
  ``bytearray`` buffers and are combined in place with libsecp256k1's constant-time
  ``secp256k1_ec_seckey_tweak_add``/``_tweak_mul`` and ``secp256k1_ec_pubkey_create``, called
  through coincurve's cffi module on our buffers (``ffi.from_buffer``). Scratch buffers are
  zeroed in ``finally`` blocks.
* Public values (identifiers, binding factors, Lagrange coefficients, the challenge, signature
  shares once sent, every element) are handled as Python ints and coincurve ``PublicKey``s.

What coincurve does not allow, and what we accept instead:

* coincurve's ``PrivateKey`` keeps its secret as immutable ``bytes`` (and derives two public
  keys on every construction), so we never build one; we call libsecp256k1 directly instead.
* libsecp256k1 exposes no wide reduction, so H3 (RFC 9591 §6.5: ``hash_to_field`` over 48 bytes
  of ``expand_message_xmd``) reduces the nonce mod n with Python ints, and ``hashlib`` returns
  its digests as ``bytes``: the intermediate digests and ints of nonce derivation cannot be
  zeroed and the reduction is not constant time. The nonce itself is written into a buffer.
* coincurve binds no random-bytes function: the 32 bytes of nonce randomness come from
  ``secrets.token_bytes`` as immutable ``bytes`` (copied into a buffer we zero), where the
  Ed25519 suite has libsodium write them straight into one.
* libsecp256k1 has no scalar type for zero: a secret sum that reduces to zero makes
  ``tweak_add`` fail. That happens with negligible probability for honest inputs and is
  reported as :class:`~trio_sign.InternalError`.
* The identity element has no ``secp256k1_pubkey`` encoding: a point sum that is the identity
  fails in ``secp256k1_ec_pubkey_combine``, which we map to :class:`~trio_sign.FrostError`.

Elements are 33-byte compressed SEC1 points; ``deserialize_element`` refuses the identity (the
one-byte ``00`` SEC1 form or anything shorter), uncompressed and hybrid forms, x not below p and
x with no point on the curve. Scalars (and identifiers) are 32 bytes big-endian, below n.

The numbered comments refer to RFC 9591 sections.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coincurve import PublicKey
from coincurve._libsecp256k1 import ffi, lib  # type: ignore[import-not-found]
from coincurve.context import GLOBAL_CONTEXT

from .._errors import FrostError, InternalError, InvalidSignatureShareError

Buffer = bytes | bytearray | memoryview

#: The secp256k1 group order n.
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
#: The field prime p.
P = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFFC2F

ELEMENT_SIZE = 33
SCALAR_SIZE = 32

__all__ = [
    "N",
    "SUITE",
    "Secp256k1Suite",
    "SigningCommitment",
    "SigningNonces",
    "aggregate",
    "commit",
    "lagrange_coefficient",
    "sign",
    "verify",
    "verify_signature_share",
]


# -- hash_to_field (RFC 9380 §5.2, §5.3.1) ----------------------------------------------------


def _expand_message_xmd(msg: Buffer, dst: bytes, length: int) -> bytes:
    """``expand_message_xmd`` with SHA-256 (b_in_bytes 32, s_in_bytes 64)."""
    ell = (length + 31) // 32
    if ell > 255 or len(dst) > 255 or length > 65535:  # pragma: no cover - fixed inputs
        raise InternalError("expand_message_xmd: length or DST too long")
    dst_prime = dst + bytes([len(dst)])
    h = hashlib.sha256(bytes(64))
    h.update(msg)
    h.update(length.to_bytes(2, "big") + b"\x00" + dst_prime)
    b0 = h.digest()
    b = [hashlib.sha256(b0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        mixed = bytes(x ^ y for x, y in zip(b0, b[-1], strict=True))
        b.append(hashlib.sha256(mixed + bytes([i]) + dst_prime).digest())
    return b"".join(b)[:length]


def _hash_to_scalar(msg: Buffer, dst: bytes) -> int:
    """``hash_to_field(msg, 1)`` into Z/nZ: 48 bytes (L = ceil((256 + 128) / 8)), big-endian."""
    return int.from_bytes(_expand_message_xmd(msg, dst, 48), "big") % N


# -- the ciphersuite ----------------------------------------------------------------------------


class Secp256k1Suite:
    """The group encodings and H1..H5 of a secp256k1 FROST suite (RFC 9591 §6.5).

    ``name`` is the contextString; the Taproot variant reuses this class with its own name and
    overrides what differs.
    """

    element_size = ELEMENT_SIZE
    scalar_size = SCALAR_SIZE
    order = N

    def __init__(self, name: str = "FROST-secp256k1-SHA256-v1") -> None:
        self.name = name
        self._context = name.encode()

    def __repr__(self) -> str:
        return f"<Secp256k1Suite {self.name}>"

    # elements

    def serialize_element(self, element: bytes) -> bytes:
        return self.deserialize_element(element)

    def deserialize_element(self, data: bytes, what: str = "element") -> bytes:
        if len(data) != ELEMENT_SIZE:
            if len(data) == 1 and data == b"\x00":
                raise FrostError(f"{what} is the identity element")
            raise FrostError(f"{what} must be {ELEMENT_SIZE} bytes, got {len(data)}")
        if data[0] not in (2, 3):
            raise FrostError(f"{what} is not a compressed SEC1 point (prefix 0x{data[0]:02x})")
        if int.from_bytes(data[1:], "big") >= P:
            raise FrostError(f"{what} is not canonical (x >= p)")
        try:
            PublicKey(bytes(data))
        except ValueError:
            raise FrostError(f"{what} is not a point on secp256k1") from None
        return bytes(data)

    # scalars

    def serialize_scalar(self, value: int) -> bytes:
        if not 0 <= value < N:
            raise InternalError("scalar out of range")
        return value.to_bytes(SCALAR_SIZE, "big")

    def deserialize_scalar(self, data: bytes, what: str = "scalar") -> int:
        if len(data) != SCALAR_SIZE:
            raise FrostError(f"{what} must be {SCALAR_SIZE} bytes, got {len(data)}")
        value = int.from_bytes(data, "big")
        if value >= N:
            raise FrostError(f"{what} is not a canonical scalar (>= n)")
        return value

    # hashes

    def h1(self, m: bytes) -> int:
        return _hash_to_scalar(m, self._context + b"rho")

    def h2(self, m: bytes) -> int:
        return _hash_to_scalar(m, self._context + b"chal")

    def challenge(self, group_commitment: bytes, group_public_key: bytes, message: bytes) -> int:
        """RFC 9591 §4.6 ``compute_challenge``: ``H2(SerializeElement(R) || PK || msg)``."""
        return self.h2(group_commitment + group_public_key + message)

    def h3(self, m: bytes) -> int:
        return _hash_to_scalar(m, self._context + b"nonce")

    def h4(self, m: bytes) -> bytes:
        return hashlib.sha256(self._context + b"msg" + m).digest()

    def h5(self, m: bytes) -> bytes:
        return hashlib.sha256(self._context + b"com" + m).digest()

    def nonce_generate(
        self, out: bytearray | memoryview, secret: Buffer, randomness: Buffer
    ) -> None:
        """``out = H3(randomness || SerializeScalar(secret))`` (RFC 9591 §4.1).

        ``randomness`` is 32 fresh random bytes; mixing in the secret hedges against a bad RNG.
        See the module docstring for what of this cannot be zeroed.
        """
        if len(randomness) != 32 or len(secret) != 32 or len(out) != 32:
            raise InternalError("nonce_generate needs 32-byte randomness, secret and output")
        buf = bytearray(64)
        try:
            buf[:32] = randomness
            buf[32:] = secret
            out[:] = self.h3(buf).to_bytes(32, "big")  # type: ignore[arg-type]
        finally:
            _zero(buf)

    # identifiers

    def identifier_to_bytes(self, value: int) -> bytes:
        """Serialize an identifier (a non-zero scalar) as 32 big-endian bytes."""
        if not 0 < value < N:
            raise FrostError("identifier must be a non-zero scalar below n")
        return value.to_bytes(SCALAR_SIZE, "big")

    def identifier_from_bytes(self, data: bytes) -> int:
        value = self.deserialize_scalar(data, "identifier")
        if value == 0:
            raise FrostError("identifier must not be zero")
        return value


#: ``FROST-secp256k1-SHA256-v1``.
SUITE = Secp256k1Suite()


# -- secret scalar arithmetic in caller-owned buffers ------------------------------------------


def _zero(buf: bytearray | memoryview) -> None:
    buf[:] = bytes(len(buf))


def _wbuf(buf: bytearray | memoryview) -> Any:
    return ffi.from_buffer("unsigned char[]", buf, require_writable=True)


def _tweak_add(acc: bytearray, tweak: Buffer) -> None:
    """``acc = acc + tweak mod n`` in place, constant time; fails if the result is zero."""
    if not lib.secp256k1_ec_seckey_tweak_add(
        GLOBAL_CONTEXT.ctx, _wbuf(acc), ffi.from_buffer(tweak)
    ):
        raise InternalError("secret scalar sum reduced to zero")


def _tweak_mul(acc: bytearray, tweak: Buffer) -> None:
    """``acc = acc * tweak mod n`` in place, constant time; acc and tweak must be non-zero."""
    if not lib.secp256k1_ec_seckey_tweak_mul(
        GLOBAL_CONTEXT.ctx, _wbuf(acc), ffi.from_buffer(tweak)
    ):
        raise InternalError("secret scalar product with a zero or out-of-range factor")


def _negate(acc: bytearray) -> None:
    """``acc = -acc mod n`` in place (zero stays zero: libsecp256k1 refuses a zero key and
    leaves the buffer unspecified, so zero is answered before the call)."""
    if not any(acc):
        return
    if not lib.secp256k1_ec_seckey_negate(GLOBAL_CONTEXT.ctx, _wbuf(acc)):  # pragma: no cover
        raise InternalError("secret scalar out of range")


#: Public names for the other modules (dealer, DKG) doing secret arithmetic in buffers.
scalar_add_into = _tweak_add
scalar_mul_into = _tweak_mul
scalar_negate = _negate


def seckey_is_valid(secret: Buffer) -> bool:
    """``0 < secret < n`` for 32 bytes, in constant time (``secp256k1_ec_seckey_verify``)."""
    if len(secret) != 32:
        return False
    return bool(lib.secp256k1_ec_seckey_verify(GLOBAL_CONTEXT.ctx, ffi.from_buffer(secret)))


def random_scalar(out: bytearray | memoryview) -> None:
    """A uniformly random scalar in ``1..n-1`` written into ``out`` (rejection sampling on 32
    bytes from the OS CSPRNG; the rejected bytes are overwritten by the next draw)."""
    while True:
        out[:] = secrets.token_bytes(32)
        if seckey_is_valid(out):
            return


def base_mult(secret: Buffer) -> bytes:
    """``SerializeElement(secret * G)``; the scalar must be non-zero and below n."""
    pub = ffi.new("secp256k1_pubkey *")
    if not lib.secp256k1_ec_pubkey_create(GLOBAL_CONTEXT.ctx, pub, ffi.from_buffer(secret)):
        raise InternalError("base multiplication of a zero or out-of-range scalar")
    return PublicKey(pub).format(compressed=True)


def _point(data: bytes) -> PublicKey:
    return PublicKey(data)


def _sum_points(points: Sequence[PublicKey], what: str) -> bytes:
    try:
        return PublicKey.combine_keys(list(points)).format(compressed=True)
    except ValueError:
        raise FrostError(f"{what} is the identity element") from None


def _mul_public(point: bytes, scalar: int) -> PublicKey | None:
    """``scalar * point`` for public values; ``None`` for the identity (scalar 0)."""
    scalar %= N
    if scalar == 0:
        return None
    return _point(point).multiply(scalar.to_bytes(32, "big"))


# -- round one (RFC 9591 §5.1) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SigningCommitment:
    """A participant's public round-one output: identifier, hiding (D) and binding (E)."""

    identifier: bytes
    hiding: bytes
    binding: bytes


class SigningNonces:
    """A participant's secret round-one state: the hiding and binding nonces.

    Single use by construction: :func:`sign` consumes them (zeroing the buffer) once the
    commitment list was checked; :meth:`zero` drops them. Neither nonce is shown by ``repr``.
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
        _zero(self._buf)
        self.used = True

    def __repr__(self) -> str:
        state = "used" if self.used else "fresh"
        return f"<SigningNonces {state} identifier={self.commitment.identifier.hex()}>"


def commit(
    identifier: bytes,
    signing_share: Buffer,
    *,
    suite: Secp256k1Suite = SUITE,
    hiding_randomness: Buffer | None = None,
    binding_randomness: Buffer | None = None,
) -> SigningNonces:
    """FROST round one: fresh nonces and their commitments.

    The randomness arguments exist for the test vectors only; production callers leave them
    unset so that 32 bytes come from the OS CSPRNG for each nonce.
    """
    suite.identifier_from_bytes(identifier)
    buf = bytearray(64)
    rand = bytearray(32)
    elements: list[bytes] = []
    try:
        for offset, given in ((0, hiding_randomness), (32, binding_randomness)):
            view = memoryview(buf)[offset : offset + 32]
            if given is None:
                rand[:] = secrets.token_bytes(32)
                suite.nonce_generate(view, signing_share, rand)
            else:
                suite.nonce_generate(view, signing_share, given)
            elements.append(base_mult(view))  # raises on a zero nonce (negligible)
    except BaseException:
        _zero(buf)
        raise
    finally:
        _zero(rand)
    return SigningNonces(buf, SigningCommitment(identifier, elements[0], elements[1]))


# -- the commitment list (RFC 9591 §4.3, §4.4, §4.5) -------------------------------------------


def encode_group_commitment_list(commitments: Sequence[SigningCommitment]) -> bytes:
    """RFC 9591 §4.3 ``encode_group_commitment_list``."""
    return b"".join(c.identifier + c.hiding + c.binding for c in commitments)


def binding_factor_input_prefix(
    group_public_key: bytes,
    commitments: Sequence[SigningCommitment],
    message: bytes,
    *,
    suite: Secp256k1Suite = SUITE,
) -> bytes:
    """``SerializeElement(PK) || H4(msg) || H5(encode_group_commitment_list(list))``."""
    return (
        group_public_key + suite.h4(message) + suite.h5(encode_group_commitment_list(commitments))
    )


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A validated commitment list with the derived public values signers need."""

    ids: list[int]
    commitments: list[SigningCommitment]
    rhos: list[int]
    group_commitment: bytes
    challenge: int


def _describe(value: int) -> str:
    return str(value) if value < 2**32 else "0x" + value.to_bytes(32, "big").hex()


def _parse(
    commitments: Iterable[SigningCommitment],
    group_public_key: bytes,
    message: bytes,
    *,
    suite: Secp256k1Suite,
    min_signers: int | None = None,
    max_signers: int | None = None,
) -> _Parsed:
    """Validate the list (sizes, sorted unique identifiers, every element) and derive rho, R, c."""
    commitments = list(commitments)
    n = len(commitments)
    if min_signers is not None and n < min_signers:
        raise FrostError(f"too few signers: {n} commitments, at least {min_signers} required")
    if max_signers is not None and n > max_signers:
        raise FrostError(f"too many signers: {n} commitments, at most {max_signers} allowed")
    if n < 2:
        raise FrostError(f"too few signers: {n} commitments, at least 2 required")
    suite.deserialize_element(group_public_key, "group public key")
    ids: list[int] = []
    for c in commitments:
        value = suite.identifier_from_bytes(c.identifier)
        if ids and value <= ids[-1]:
            if value == ids[-1]:
                raise FrostError(f"duplicate identifier {_describe(value)}")
            raise FrostError("commitments must be sorted by identifier in ascending order")
        ids.append(value)
        suite.deserialize_element(c.hiding, f"hiding commitment of identifier {_describe(value)}")
        suite.deserialize_element(c.binding, f"binding commitment of identifier {_describe(value)}")
    prefix = binding_factor_input_prefix(group_public_key, commitments, message, suite=suite)
    rhos = [suite.h1(prefix + c.identifier) for c in commitments]
    # §4.5 compute_group_commitment: R = sum(D_i + rho_i * E_i)
    terms: list[PublicKey] = []
    for c, rho in zip(commitments, rhos, strict=True):
        terms.append(_point(c.hiding))
        rho_e = _mul_public(c.binding, rho)
        if rho_e is not None:  # pragma: no branch - rho == 0 has negligible probability
            terms.append(rho_e)
    group_commitment = _sum_points(terms, "group commitment")
    challenge = suite.challenge(group_commitment, group_public_key, message)
    return _Parsed(ids, commitments, rhos, group_commitment, challenge)


def lagrange_coefficient(ids: Sequence[int], x_i: int) -> int:
    """RFC 9591 §4.2 ``derive_interpolating_value`` on public identifiers."""
    num = 1
    den = 1
    found = False
    for x_j in ids:
        if x_j == x_i:
            found = True
            continue
        num = num * x_j % N
        den = den * (x_j - x_i) % N
    if not found:
        raise InternalError("identifier not in participant list")
    return num * pow(den, -1, N) % N


def group_commitment(
    commitments: Iterable[SigningCommitment],
    group_public_key: bytes,
    message: bytes,
    *,
    suite: Secp256k1Suite = SUITE,
) -> bytes:
    """The serialized group commitment R for a validated commitment list."""
    return _parse(commitments, group_public_key, message, suite=suite).group_commitment


# -- round two (RFC 9591 §5.2) ------------------------------------------------------------------


def sign(
    nonces: SigningNonces,
    *,
    signing_share: Buffer,
    group_public_key: bytes,
    message: bytes,
    commitments: Iterable[SigningCommitment],
    min_signers: int | None = None,
    max_signers: int | None = None,
    suite: Secp256k1Suite = SUITE,
) -> bytes:
    """FROST round two: this participant's signature share ``z_i`` (32 bytes, big-endian).

    ``z_i = d_i + e_i * rho_i + lambda_i * s_i * c``, computed in zeroable buffers with
    libsecp256k1's constant-time scalar functions.

    Error handling: a malformed commitment list, a missing or altered own commitment, or used
    nonces raise :class:`~trio_sign.FrostError` and leave fresh nonces usable; once the list
    is accepted the nonces are consumed (zeroed) whatever happens next.
    """
    if nonces.used:
        raise FrostError("signing nonces were already used")
    if len(signing_share) != 32:
        raise FrostError(f"signing share must be 32 bytes, got {len(signing_share)}")
    parsed = _parse(
        commitments,
        group_public_key,
        message,
        suite=suite,
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
    lam = lagrange_coefficient(parsed.ids, parsed.ids[index])
    factor = (lam * parsed.challenge) % N
    acc = bytearray(signing_share)
    tmp = bytearray(nonces.binding)
    try:
        _tweak_mul(acc, factor.to_bytes(32, "big"))  # lambda_i * s_i * c
        _tweak_mul(tmp, parsed.rhos[index].to_bytes(32, "big"))  # e_i * rho_i
        _tweak_add(acc, tmp)
        _tweak_add(acc, nonces.hiding)  # + d_i
        return bytes(acc)
    finally:
        _zero(acc)
        _zero(tmp)
        nonces.zero()


def _verify_share(
    parsed: _Parsed,
    index: int,
    verifying_share: bytes,
    signature_share: int,
    group_public_key: bytes,
    suite: Secp256k1Suite,
) -> bool:
    """§5.4: ``z_i * G == D_i + rho_i * E_i + (c * lambda_i) * PK_i``."""
    c = parsed.commitments[index]
    lam = lagrange_coefficient(parsed.ids, parsed.ids[index])
    terms = [_point(c.hiding)]
    for point, scalar in (
        (c.binding, parsed.rhos[index]),
        (verifying_share, parsed.challenge * lam),
    ):
        term = _mul_public(point, scalar)
        if term is not None:
            terms.append(term)
    try:
        rhs = PublicKey.combine_keys(terms).format(compressed=True)
    except ValueError:
        return signature_share == 0
    if signature_share == 0:
        return False
    return base_mult(signature_share.to_bytes(32, "big")) == rhs


def verify_signature_share(
    *,
    identifier: bytes,
    verifying_share: bytes,
    signature_share: bytes,
    commitments: Iterable[SigningCommitment],
    group_public_key: bytes,
    message: bytes,
    suite: Secp256k1Suite = SUITE,
) -> bool:
    """RFC 9591 §5.4 ``verify_signature_share``; malformed inputs raise FrostError."""
    parsed = _parse(commitments, group_public_key, message, suite=suite)
    suite.deserialize_element(verifying_share, "verifying share")
    z = suite.deserialize_scalar(signature_share, "signature share")
    try:
        index = [c.identifier for c in parsed.commitments].index(identifier)
    except ValueError:
        raise FrostError("identifier is not in the commitment list") from None
    return _verify_share(parsed, index, verifying_share, z, group_public_key, suite)


def aggregate(
    *,
    commitments: Iterable[SigningCommitment],
    message: bytes,
    group_public_key: bytes,
    signature_shares: Mapping[bytes, bytes],
    verifying_shares: Mapping[bytes, bytes] | None = None,
    suite: Secp256k1Suite = SUITE,
) -> bytes:
    """RFC 9591 §5.3: ``SerializeElement(R) || SerializeScalar(sum z_i)`` (65 bytes).

    With ``verifying_shares`` every share is checked first (§5.4) and the first bad one raises
    :class:`~trio_sign.InvalidSignatureShareError` naming its identifier.
    """
    parsed = _parse(commitments, group_public_key, message, suite=suite)
    z = sum_signature_shares(
        parsed,
        signature_shares,
        verifying_shares,
        lambda index, vs, z_i: _verify_share(parsed, index, vs, z_i, group_public_key, suite),
        suite,
    )
    return parsed.group_commitment + z.to_bytes(32, "big")


def sum_signature_shares(
    parsed: _Parsed,
    signature_shares: Mapping[bytes, bytes],
    verifying_shares: Mapping[bytes, bytes] | None,
    share_is_valid: Callable[[int, bytes, int], bool],
    suite: Secp256k1Suite,
) -> int:
    """``sum z_i mod n`` over the commitment list's signers (RFC 9591 §5.3); with
    ``verifying_shares`` each share is first checked by ``share_is_valid(index, verifying
    share, z_i)`` and the first bad one raises :class:`~trio_sign.InvalidSignatureShareError`
    naming its identifier. Shared by both secp256k1 suites."""
    ids = [c.identifier for c in parsed.commitments]
    if set(signature_shares) != set(ids):
        raise FrostError("signature shares do not match the commitment list")
    z = 0
    for index, ident in enumerate(ids):
        z_i = suite.deserialize_scalar(signature_shares[ident], "signature share")
        if verifying_shares is not None:
            vs = verifying_shares.get(ident)
            if vs is None:
                raise FrostError(
                    f"no verifying share for identifier {_describe(parsed.ids[index])}"
                )
            suite.deserialize_element(vs, "verifying share")
            if not share_is_valid(index, vs, z_i):
                raise InvalidSignatureShareError(
                    f"signature share of identifier {_describe(parsed.ids[index])} is invalid",
                    identifier=ident,
                )
        z = (z + z_i) % N
    return z


def verify(
    group_public_key: bytes, message: bytes, signature: bytes, *, suite: Secp256k1Suite = SUITE
) -> bool:
    """RFC 9591 §6.5/Appendix B verification: ``z * G == R + c * PK`` (never raises)."""
    if len(signature) != ELEMENT_SIZE + SCALAR_SIZE:
        return False
    try:
        pk = suite.deserialize_element(group_public_key, "group public key")
        r = suite.deserialize_element(signature[:ELEMENT_SIZE], "R")
        z = suite.deserialize_scalar(signature[ELEMENT_SIZE:], "z")
    except FrostError:
        return False
    c = suite.challenge(r, pk, message)
    terms = [_point(r)]
    c_pk = _mul_public(pk, c)
    if c_pk is not None:
        terms.append(c_pk)
    try:
        rhs = PublicKey.combine_keys(terms).format(compressed=True)
    except ValueError:
        return False
    if z == 0:
        return False
    return base_mult(z.to_bytes(32, "big")) == rhs
