"""ZF FROST's serialized packages as the ``frost-rs`` 1.0.0 binding exchanges them (tests only).

``frost-rs`` (PyPI) is a third-party pyo3 binding to a vendored ZF ``frost-core`` 1.0; the
interop tests (``tests/test_frost_rs_interop.py``) use it as an independent oracle. Its
functions take and return base64url strings (with padding) of ZF's default serialization:
postcard (serde) with a 5-byte header, version ``0`` then the big-endian CRC-32 of the suite's
contextString, fixed-size elements and scalars inline, sequences and byte strings prefixed with
their length as a LEB128 varint. The packages used here:

========================  ==============================================================
``SecretShare``           header, identifier, signing share, VSS commitment (varint n, n elements)
``KeyPackage``            header, identifier, signing share, verifying share, group key,
                          min_signers (varint)
``PublicKeyPackage``      header, varint n, n x (identifier, verifying share), group key
                          (ZF 1.0 has no min_signers field yet)
``round1::Package``       header, VSS commitment, proof of knowledge (varint length, R || z)
``SigningCommitments``    header, hiding, binding
``SignatureShare``        the bare scalar (no header)
========================  ==============================================================

One thing is ``frost-rs``'s own and not ZF's: its DKG round-2 packages travel encrypted. A
sender ``i`` derives a key for recipient ``l`` from ``a_i0 * phi_l0`` (its own polynomial's
constant term times the recipient's commitment to its constant term: static Diffie-Hellman on
the DKG's secrets), ``HKDF-SHA256(salt="FROST_RS", ikm=SerializeElement(shared), info="")``,
then AES-256-GCM with a random 12-byte nonce and no associated data over the JSON of the share
(a quoted lowercase hex string); the package is ``nonce || ciphertext || tag``.
:func:`transport_keys` derives those keys for our participant (from its round-1 secret, before
:func:`~trio_sign.crypto._dkg.part2` zeroes it) so the tests can take part. When the other end
is a participant whose secret we cannot read (the enclave), a relaying test harness derives the
same key from the frost-rs side instead: :func:`round1_secret_coefficient` reads ``a_i0`` out of
frost-rs's round-1 secret package (base64url of JSON; the Ed25519 build names the list
``coefficient`` and writes each scalar as a JSON list of bytes, the secp256k1 build names it
``coefficent`` and writes a quoted uppercase hex string) and :func:`transport_key` multiplies it
by the other end's ``phi_0``. This is a test-only
oracle format; DESIGN.md §13's transport (X25519, HKDF, XChaCha20-Poly1305) is what the enclave
uses.

Secrets here are test key material: decoded signing shares are ``bytearray`` buffers, but the
base64 strings, the JSON plaintexts and the AES keys' derivation inputs pass through immutable
``bytes``, and the binding itself keeps secrets in JSON strings.
"""

from __future__ import annotations

import base64
import json
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from coincurve import PublicKey
from coincurve._libsecp256k1 import ffi, lib  # type: ignore[import-not-found]
from coincurve.context import GLOBAL_CONTEXT
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..crypto import _sodium as na
from ..crypto._dkg import KeyPackage, PublicKeyPackage, Round1Package, Round1Secret, Round2Package
from ..crypto._frost import CIPHERSUITE as ED25519
from ..crypto._group import Group, group_for
from ..crypto._sodium import Buffer

__all__ = [
    "DealtShare",
    "b64decode",
    "b64encode",
    "decode_commitments",
    "decode_key_package",
    "decode_public_key_package",
    "decode_round1_package",
    "decode_secret_share",
    "decrypt_round2",
    "encode_commitments",
    "encode_key_package",
    "encode_public_key_package",
    "encode_round1_package",
    "encrypt_round2",
    "header",
    "round1_secret_coefficient",
    "transport_key",
    "transport_keys",
]


def b64encode(data: Buffer) -> str:
    return base64.urlsafe_b64encode(bytes(data)).decode()


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def header(suite: str) -> bytes:
    """ZF's serialization header: version 0, then CRC-32 of the contextString (big-endian)."""
    return b"\x00" + zlib.crc32(suite.encode()).to_bytes(4, "big")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Reader:
    def __init__(self, group: Group, data: bytes) -> None:
        self.group = group
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated ZF package")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def header(self) -> None:
        got = self.take(5)
        if got != header(self.group.name):
            raise ValueError(f"not a {self.group.name} package (header {got.hex()})")

    def identifier(self) -> bytes:
        ident = self.take(self.group.scalar_size)
        self.group.identifier_from_bytes(ident)
        return ident

    def element(self, what: str) -> bytes:
        return self.group.element(self.take(self.group.element_size), what)

    def scalar(self) -> bytes:
        return self.take(self.group.scalar_size)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} trailing bytes in ZF package")


@dataclass(frozen=True)
class DealtShare:
    """A decoded ZF ``SecretShare`` (trusted-dealer output); ``signing_share`` is secret."""

    identifier: bytes
    signing_share: bytearray
    commitment: tuple[bytes, ...]


def decode_secret_share(suite: str, text: str) -> DealtShare:
    r = _Reader(group_for(suite), b64decode(text))
    r.header()
    ident = r.identifier()
    share = bytearray(r.scalar())
    commitment = tuple(r.element("commitment") for _ in range(r.varint()))
    r.end()
    return DealtShare(ident, share, commitment)


def encode_key_package(key: KeyPackage) -> str:
    return b64encode(
        header(key.suite)
        + key.identifier
        + bytes(key.signing_share)
        + key.verifying_share
        + key.verifying_key
        + _varint(key.min_signers)
    )


def decode_key_package(suite: str, text: str) -> KeyPackage:
    r = _Reader(group_for(suite), b64decode(text))
    r.header()
    ident = r.identifier()
    share = bytearray(r.scalar())
    verifying_share = r.element("verifying share")
    verifying_key = r.element("verifying key")
    min_signers = r.varint()
    r.end()
    return KeyPackage(suite, ident, share, verifying_share, verifying_key, min_signers)


def encode_public_key_package(public: PublicKeyPackage) -> str:
    group = group_for(public.suite)
    body = bytearray(header(public.suite))
    body += _varint(len(public.verifying_shares))
    for ident in sorted(public.verifying_shares, key=group.identifier_from_bytes):
        body += ident + public.verifying_shares[ident]
    body += public.verifying_key
    return b64encode(body)


def decode_public_key_package(suite: str, text: str, min_signers: int) -> PublicKeyPackage:
    """``min_signers`` is not in ZF 1.0's encoding; the caller knows it."""
    r = _Reader(group_for(suite), b64decode(text))
    r.header()
    shares = {}
    for _ in range(r.varint()):
        ident = r.identifier()
        shares[ident] = r.element("verifying share")
    verifying_key = r.element("verifying key")
    r.end()
    return PublicKeyPackage(suite, shares, verifying_key, min_signers)


def encode_round1_package(suite: str, package: Round1Package) -> str:
    body = bytearray(header(suite))
    body += _varint(len(package.commitment))
    for phi in package.commitment:
        body += phi
    body += _varint(len(package.proof_of_knowledge)) + package.proof_of_knowledge
    return b64encode(body)


def decode_round1_package(suite: str, text: str) -> Round1Package:
    r = _Reader(group_for(suite), b64decode(text))
    r.header()
    commitment = tuple(r.take(r.group.element_size) for _ in range(r.varint()))
    proof = r.take(r.varint())
    r.end()
    return Round1Package(commitment, proof)


def encode_commitments(suite: str, hiding: bytes, binding: bytes) -> str:
    return b64encode(header(suite) + hiding + binding)


def decode_commitments(suite: str, text: str) -> tuple[bytes, bytes]:
    """``(hiding, binding)`` of a ZF ``SigningCommitments``."""
    r = _Reader(group_for(suite), b64decode(text))
    r.header()
    hiding = r.element("hiding commitment")
    binding = r.element("binding commitment")
    r.end()
    return hiding, binding


# -- frost-rs's own round-2 transport -----------------------------------------------------------


def _shared_element(group: Group, secret: Buffer, point: bytes) -> bytes:
    """``secret * point``, the secret kept in its buffer."""
    if group.name == ED25519:
        out = bytearray(32)
        if not na.scalar_mult(out, secret, point):
            raise ValueError("degenerate frost-rs transport key")
        return bytes(out)
    pub = ffi.new("secp256k1_pubkey *")
    ffi.buffer(pub)[:] = ffi.buffer(PublicKey(point).public_key)
    if not lib.secp256k1_ec_pubkey_tweak_mul(GLOBAL_CONTEXT.ctx, pub, ffi.from_buffer(secret)):
        raise ValueError("degenerate frost-rs transport key")
    return bytes(PublicKey(pub).format(compressed=True))


def transport_key(suite: str, secret: Buffer, point: bytes) -> bytearray:
    """frost-rs's AES-256-GCM key between the holder of constant term ``secret`` and the
    participant whose ``phi_0`` is ``point`` (the same key from either end). Secret: zero it."""
    shared = _shared_element(group_for(suite), secret, point)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"FROST_RS", info=b"").derive(shared)
    return bytearray(key)


def transport_keys(
    secret: Round1Secret, round1_packages: Mapping[bytes, Round1Package]
) -> dict[bytes, bytearray]:
    """The AES-256-GCM key frost-rs uses between our participant and each other one; call it
    before ``part2`` consumes ``secret``. The keys are secret: zero them when done."""
    a0 = secret._coefficients[0]  # test oracle only: frost-rs keys its transport on a_0
    return {
        ident: transport_key(secret.group.name, a0, package.verifying_key)
        for ident, package in round1_packages.items()
    }


def round1_secret_coefficient(suite: str, text: str) -> bytearray:
    """``a_i0``, the constant term of a frost-rs participant's polynomial, read from the
    round-1 secret package ``text`` that frost-rs's ``round1`` returned (test oracle only:
    it lets a relaying harness open and make that participant's round-2 ciphertexts)."""
    group = group_for(suite)
    document = json.loads(b64decode(text))
    coefficients = document.get("coefficient", document.get("coefficent"))
    if not isinstance(coefficients, list) or not coefficients:
        raise ValueError("not a frost-rs round-1 secret package")
    value = json.loads(coefficients[0])
    if isinstance(value, str):
        scalar = bytearray.fromhex(value)
    elif isinstance(value, list) and all(isinstance(b, int) for b in value):
        scalar = bytearray(value)
    else:
        raise ValueError("unknown frost-rs coefficient encoding")
    if len(scalar) != group.scalar_size:
        raise ValueError(f"a frost-rs coefficient of {len(scalar)} bytes")
    return scalar


def encrypt_round2(key: Buffer, package: Round2Package) -> str:
    nonce = secrets.token_bytes(12)
    plaintext = b'"' + bytes(package.signing_share).hex().encode() + b'"'
    return b64encode(nonce + AESGCM(bytes(key)).encrypt(nonce, plaintext, None))


def decrypt_round2(key: Buffer, text: str) -> Round2Package:
    data = b64decode(text)
    plaintext = AESGCM(bytes(key)).decrypt(data[:12], data[12:], None)
    if plaintext[:1] != b'"' or plaintext[-1:] != b'"':
        raise ValueError("frost-rs round-2 plaintext is not a JSON string")
    return Round2Package(bytearray.fromhex(plaintext[1:-1].decode()))
