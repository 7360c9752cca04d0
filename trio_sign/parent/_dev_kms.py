"""A development stand-in for KMS ``Decrypt`` with ``Recipient``, in process.

It does what KMS does for a Nitro enclave, with the development key file as the KMS key: check
the attestation document against a root and a PCR policy (like ``kms:RecipientAttestation:*``
conditions), unwrap the data key, and wrap it for the document's RSA ``public_key`` as a CMS
envelope in exactly the ``CiphertextForRecipient`` format. Because it holds the key, it belongs
to the KMS side, not to the parent: the parent only passes bytes through. For AWS, the parent
calls KMS through boto3 instead.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .._errors import KeyWrapError
from ..crypto import _sodium
from ..nitro import encrypt_for_recipient, verify_attestation
from ..shares import DevKeyFile


class DevRecipientKms:
    """``RecipientKms`` over a :class:`DevKeyFile`, enforcing a PCR policy.

    Args:
        key: the development key the bundle was sealed under.
        root_pem: the attestation root to trust (the local NSM's root in development).
        expected_pcrs: PCR index -> value the document must carry (the key policy).
        production: refuse debug-mode documents (zero PCRs).
    """

    def __init__(
        self,
        key: DevKeyFile,
        *,
        root_pem: bytes | str,
        expected_pcrs: Mapping[int, bytes] | None = None,
        production: bool = False,
    ) -> None:
        self._key = key
        self._root_pem = root_pem
        self._pcrs = dict(expected_pcrs or {})
        self._production = production

    async def __call__(self, document: bytes, header: dict[str, Any]) -> bytes:
        return await trio.to_thread.run_sync(self._decrypt_for_recipient, document, header)

    def _decrypt_for_recipient(self, document: bytes, header: dict[str, Any]) -> bytes:
        verified = verify_attestation(
            document,
            root_pem=self._root_pem,
            expected_pcrs=self._pcrs,
            production=self._production,
        )
        if verified.public_key is None:
            raise KeyWrapError("attestation document has no public_key to encrypt for")
        public = serialization.load_der_public_key(verified.public_key)
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size < 2048:
            raise KeyWrapError("attestation public_key must be an RSA key of >= 2048 bits")
        if header.get("kms_key_id") != self._key.key_id:
            raise KeyWrapError(
                f"bundle was sealed under key {header.get('kms_key_id')}, "
                f"but this KMS holds {self._key.key_id}"
            )
        blob = base64.b64decode(header["encrypted_data_key"], validate=True)
        data_key = self._key.decrypt_data_key(blob, header["encryption_context"])
        try:
            return encrypt_for_recipient(public, data_key)
        finally:
            _sodium.memzero(data_key)
