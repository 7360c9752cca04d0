"""TLS helpers shared by every side that serves or dials TLS."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path


def load_cert_chain(context: ssl.SSLContext, cert_pem: bytes | str, key_pem: bytes | str) -> None:
    """Load a certificate chain and private key from memory into ``context``.

    On Linux the PEMs go through anonymous memory files (``memfd_create``), so the key never
    touches a file system; elsewhere through a private temporary directory removed at once.
    """
    cert = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    key = key_pem.encode() if isinstance(key_pem, str) else key_pem
    if not hasattr(os, "memfd_create"):  # not Linux: a private directory, removed at once
        with tempfile.TemporaryDirectory(prefix="trio-sign-tls-") as directory:
            cert_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
            cert_path.write_bytes(cert)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key)
            context.load_cert_chain(cert_path, key_path)
        return
    cert_fd = os.memfd_create("tls-cert", 0)
    key_fd = os.memfd_create("tls-key", 0)
    try:
        os.write(cert_fd, cert)
        os.write(key_fd, key)
        context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
    finally:
        os.close(cert_fd)
        os.close(key_fd)
