"""Throwaway certificates for development stacks and tests: a CA, server certificates (with
DNS/IP subject alternative names) and client certificates. Never production."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(cn: str, *, days: int = 7) -> CertificateAuthority:
    """A self-signed P-256 CA (pathLen 0, keyCertSign/cRLSign)."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, cert)


def make_leaf(
    ca: CertificateAuthority,
    cn: str,
    *,
    server: bool,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 7,
) -> tuple[bytes, bytes]:
    """``(certificate PEM, key PEM)`` issued by ``ca``: a server certificate (with ``hosts``
    as DNS or IP subject alternative names) or a client certificate."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


@dataclass(frozen=True)
class DevPki:
    """Paths of the PEM files :func:`make_dev_pki` wrote (keys are mode 0600)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_dev_pki(directory: Path, *, days: int = 7) -> DevPki:
    """Write a CA, an ingress server certificate and a gateway client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("trio-sign development CA", days=days)
    server_cert, server_key = make_leaf(ca, "trio-sign parent ingress", server=True, days=days)
    client_cert, client_key = make_leaf(ca, "trio-sign gateway", server=False, days=days)
    pki = DevPki(
        ca=directory / "ca.pem",
        server_cert=directory / "ingress.pem",
        server_key=directory / "ingress.key",
        client_cert=directory / "gateway.pem",
        client_key=directory / "gateway.key",
    )
    _write(pki.ca, ca.pem, 0o644)
    _write(pki.server_cert, server_cert, 0o644)
    _write(pki.server_key, server_key, 0o600)
    _write(pki.client_cert, client_cert, 0o644)
    _write(pki.client_key, client_key, 0o600)
    return pki
