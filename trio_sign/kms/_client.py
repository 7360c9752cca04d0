"""The boto3 side: AWS KMS (or the local KMS) as a data-key provider and as the parent's
``RecipientKms``.

boto3 and botocore ship no type information, so they are imported here only and handled as
``Any``; what leaves this module is typed.

Error handling: every ``botocore`` failure (a ``ClientError`` with a KMS error code, an endpoint
that cannot be reached, a timeout) is mapped to :class:`~trio_sign._errors.KeyWrapError` (for
:class:`KmsDataKeyProvider`) or :class:`KmsRecipientError` (for :class:`KmsRecipientKms`), whose
one-line message names the KMS error code; the original exception is chained.
"""

from __future__ import annotations

import base64
import importlib
import logging
from collections.abc import Mapping
from typing import Any, Final

import trio

from .._errors import KeyWrapError, TrioSignError
from ..crypto import _sodium

log = logging.getLogger("trio_sign.kms.client")

#: The provider kind recorded in a sealed header for bundles wrapped by KMS.
KMS_PROVIDER: Final = "aws-kms"
RECIPIENT_ALGORITHM: Final = "RSAES_OAEP_SHA_256"
#: A bundle signing key in KMS, and how it signs (DESIGN §12).
ED25519_KEY_SPEC: Final = "ECC_NIST_EDWARDS25519"
ED25519_SIGNING_ALGORITHM: Final = "ED25519_SHA_512"
#: Defaults of :func:`make_kms_client` (seconds, attempts).
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
DEFAULT_READ_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_ATTEMPTS: Final = 3


class KmsRecipientError(TrioSignError):
    """KMS did not give the enclave its envelope (refused, unreachable, or a bad answer)."""


def _botocore_errors() -> tuple[type[BaseException], type[BaseException]]:
    exceptions: Any = importlib.import_module("botocore.exceptions")
    client_error: type[BaseException] = exceptions.ClientError
    boto_error: type[BaseException] = exceptions.BotoCoreError
    return client_error, boto_error


def _describe(exc: BaseException) -> str:
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code, message = error.get("Code", "?"), error.get("Message", "")
        return f"{code}: {message}" if message else str(code)
    return f"{type(exc).__name__}: {exc}"


def make_kms_client(
    endpoint_url: str | None = None,
    *,
    region: str = "us-east-1",
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    **session_kwargs: Any,
) -> Any:
    """A boto3 KMS client with short timeouts and bounded ("standard" mode) retries.

    Args:
        endpoint_url: the local KMS (``http://127.0.0.1:PORT``); None for AWS's regional one.
        region: the region to sign for.
        session_kwargs: passed to ``boto3.session.Session`` (``aws_access_key_id``, ... for
            tests; normally credentials come from the usual chain: instance role, env, files).
    """
    boto3: Any = importlib.import_module("boto3")
    config_mod: Any = importlib.import_module("botocore.config")
    config = config_mod.Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
    )
    session = boto3.session.Session(region_name=region, **session_kwargs)
    return session.client("kms", endpoint_url=endpoint_url, config=config)


def is_alias(key_ref: str) -> bool:
    """Whether a KMS key reference is an alias (``alias/NAME`` or an alias ARN)."""
    return key_ref.startswith("alias/") or (key_ref.startswith("arn:") and ":alias/" in key_ref)


def _is_key_arn(key_ref: str) -> bool:
    return key_ref.startswith("arn:") and ":key/" in key_ref


def same_key(a: str, b: str) -> bool:
    """Whether two KMS key references name the same key: ids and key ARNs compare by the id
    (``arn:aws:kms:REGION:ACCOUNT:key/ID`` vs ``ID``); two ARNs must be equal."""
    if a == b:
        return True
    if a.startswith("arn:") and b.startswith("arn:"):
        return False

    def key_id(ref: str) -> str:
        return ref.rsplit(":key/", 1)[1] if ref.startswith("arn:") and ":key/" in ref else ref

    return key_id(a) == key_id(b)


class KmsDataKeyProvider:
    """A :class:`~trio_sign.shares.DataKeyProvider` backed by KMS (``GenerateDataKey`` with
    ``KeySpec=AES_256`` and the bundle's encryption context; ``Decrypt``).

    For tools that run with a role allowed to use the key directly (``shares seal``,
    ``shares reencrypt``); the parent uses :class:`KmsRecipientKms` instead, which never gets
    a plaintext key.

    Args:
        kms_client: a boto3 KMS client (see :func:`make_kms_client`).
        key_id: the KMS key: an id, key ARN, alias name (``alias/...``) or alias ARN. After
            ``GenerateDataKey`` it becomes the **key ARN** KMS answered with, which is what
            the bundle header records: an alias is resolved once, at sealing, and the parent's
            check of KMS's answer compares key ARNs.
    """

    provider: str = KMS_PROVIDER

    def __init__(self, kms_client: Any, key_id: str) -> None:
        self._kms = kms_client
        self.key_id = key_id

    def names_key(self, key_ref: str) -> bool:
        """Whether a header's ``kms_key_id`` may be this provider's key: the same key id or
        ARN, or, when this provider was given an alias, any key (KMS ``Decrypt`` refuses a
        ciphertext of another key than the alias names)."""
        return same_key(key_ref, self.key_id) or is_alias(self.key_id)

    def __repr__(self) -> str:
        return f"KmsDataKeyProvider(key_id={self.key_id!r})"

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytearray, bytes]:
        client_error, boto_error = _botocore_errors()
        try:
            response = self._kms.generate_data_key(
                KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=dict(context)
            )
        except (client_error, boto_error) as exc:
            raise KeyWrapError(
                f"KMS GenerateDataKey with key {self.key_id} failed: {_describe(exc)}"
            ) from exc
        plaintext, blob = response.get("Plaintext"), response.get("CiphertextBlob")
        if not isinstance(plaintext, bytes) or len(plaintext) != 32 or not blob:
            raise KeyWrapError("KMS GenerateDataKey returned no 32-byte data key")
        arn = response.get("KeyId")
        if not isinstance(arn, str) or not _is_key_arn(arn):
            raise KeyWrapError("KMS GenerateDataKey did not say which key (no key ARN in KeyId)")
        if not (is_alias(self.key_id) or same_key(arn, self.key_id)):
            raise KeyWrapError(f"KMS GenerateDataKey answered for key {arn}, not {self.key_id}")
        if arn != self.key_id:
            log.info("sealing under the key ARN KMS answered with", extra={"kms_key_id": arn})
            self.key_id = arn
        # boto3 returns immutable bytes we cannot zero; keep our copy mutable and zeroable.
        return bytearray(plaintext), bytes(blob)

    def decrypt_data_key(self, blob: bytes, context: Mapping[str, str]) -> bytearray:
        client_error, boto_error = _botocore_errors()
        try:
            response = self._kms.decrypt(
                CiphertextBlob=bytes(blob), KeyId=self.key_id, EncryptionContext=dict(context)
            )
        except (client_error, boto_error) as exc:
            raise KeyWrapError(
                f"KMS Decrypt of the data key with key {self.key_id} failed: {_describe(exc)}"
            ) from exc
        plaintext = response.get("Plaintext")
        if not isinstance(plaintext, bytes) or len(plaintext) != 32:
            raise KeyWrapError("KMS Decrypt did not return a 32-byte data key")
        return bytearray(plaintext)


class KmsRecipientKms:
    """The parent's ``RecipientKms`` over boto3: KMS ``Decrypt`` with ``Recipient``.

    Sends the sealed header's ``encrypted_data_key``, ``kms_key_id`` and
    ``encryption_context`` with the enclave's attestation document, and returns the
    ``CiphertextForRecipient`` that only the enclave can open.

    The parent must never hold the data key, so a response that carries a non-empty
    ``Plaintext`` (a KMS that ignored ``Recipient``, or a policy mistake that let the parent's
    role decrypt unconditionally and a proxy that dropped the field) is refused, and the
    plaintext is dropped without being logged.

    Cancellation: the boto3 call runs in a worker thread; cancelling abandons it (bounded by
    the client's own timeouts).
    """

    def __init__(self, kms_client: Any) -> None:
        self._kms = kms_client

    async def __call__(self, document: bytes, header: dict[str, Any]) -> bytes:
        key_id = header.get("kms_key_id")
        if header.get("key_provider") != KMS_PROVIDER or not isinstance(key_id, str):
            raise KmsRecipientError(
                f"bundle is wrapped by {header.get('key_provider')!r}, not {KMS_PROVIDER!r}; "
                "seal it with shares seal --kms-key-id"
            )
        blob = base64.b64decode(header["encrypted_data_key"], validate=True)
        context = dict(header["encryption_context"])
        client_error, boto_error = _botocore_errors()

        def call() -> Any:
            return self._kms.decrypt(
                CiphertextBlob=blob,
                KeyId=key_id,
                EncryptionContext=context,
                Recipient={
                    "AttestationDocument": bytes(document),
                    "KeyEncryptionAlgorithm": RECIPIENT_ALGORITHM,
                },
            )

        try:
            response = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        except (client_error, boto_error) as exc:
            raise KmsRecipientError(
                f"KMS Decrypt with Recipient for key {key_id} failed: {_describe(exc)}"
            ) from exc
        return self._check(response, key_id)

    @staticmethod
    def _check(response: Any, key_id: str) -> bytes:
        if not isinstance(response, dict):
            raise KmsRecipientError("KMS Decrypt returned something other than a response")
        plaintext = response.pop("Plaintext", None)
        if plaintext:
            if isinstance(plaintext, bytearray):
                _sodium.memzero(plaintext)
            del plaintext
            raise KmsRecipientError(
                "KMS Decrypt returned a Plaintext data key to the parent; refusing it "
                "(the parent must never hold the data key: check that the request reached KMS "
                "with Recipient and that the key policy only allows Decrypt with attestation)"
            )
        envelope = response.get("CiphertextForRecipient")
        if not isinstance(envelope, bytes) or not envelope:
            raise KmsRecipientError("KMS Decrypt returned no CiphertextForRecipient")
        got = response.get("KeyId")
        if not isinstance(got, str) or not same_key(got, key_id):
            raise KmsRecipientError(
                f"KMS Decrypt answered for key {got!r}, but the bundle names {key_id!r}"
            )
        log.info("kms envelope received for the enclave", extra={"kms_key_id": got})
        return envelope


class KmsBundleSigner:
    """A :class:`~trio_sign.shares.BundleSigner` backed by a KMS Ed25519 key (``shares seal
    --signing-kms-key-id``): ``Sign`` with ``SigningAlgorithm=ED25519_SHA_512`` and
    ``MessageType=RAW`` over the bundle's 32-byte fingerprint (pure Ed25519, RFC 8032), so the
    signature verifies with the key's public half as any Ed25519 signature does.

    The public key is read once with ``GetPublicKey`` (a DER SubjectPublicKeyInfo), which also
    checks that the key is ``ECC_NIST_EDWARDS25519`` with usage ``SIGN_VERIFY``.

    Args:
        kms_client: a boto3 KMS client (see :func:`make_kms_client`).
        key_id: the KMS key: an id, key ARN, alias name or alias ARN.

    Error handling:
        :class:`~trio_sign.shares.SigningError` naming the KMS error code or what was wrong
        with the answer.
    """

    def __init__(self, kms_client: Any, key_id: str) -> None:
        from ..shares import SigningError
        from ..shares._signature import ed25519_from_spki

        self._kms = kms_client
        self.key_id = key_id
        client_error, boto_error = _botocore_errors()
        try:
            response = kms_client.get_public_key(KeyId=key_id)
        except (client_error, boto_error) as exc:
            raise SigningError(
                f"KMS GetPublicKey for signing key {key_id} failed: {_describe(exc)}"
            ) from exc
        if response.get("KeySpec") != ED25519_KEY_SPEC or response.get("KeyUsage") != "SIGN_VERIFY":
            raise SigningError(
                f"KMS key {key_id} is {response.get('KeySpec')} {response.get('KeyUsage')}; a "
                f"bundle signing key must be {ED25519_KEY_SPEC} SIGN_VERIFY"
            )
        if ED25519_SIGNING_ALGORITHM not in (response.get("SigningAlgorithms") or []):
            raise SigningError(f"KMS key {key_id} does not offer {ED25519_SIGNING_ALGORITHM}")
        self._public_key = ed25519_from_spki(bytes(response.get("PublicKey") or b""))
        arn = response.get("KeyId")
        if isinstance(arn, str) and _is_key_arn(arn):
            self.key_id = arn  # what later answers are checked against

    def __repr__(self) -> str:
        return f"KmsBundleSigner(key_id={self.key_id!r}, public_key={self._public_key.hex()})"

    @property
    def public_key(self) -> bytes:
        return self._public_key

    def sign_digest(self, digest: bytes) -> bytes:
        from ..shares import SigningError

        client_error, boto_error = _botocore_errors()
        try:
            response = self._kms.sign(
                KeyId=self.key_id,
                Message=bytes(digest),
                MessageType="RAW",
                SigningAlgorithm=ED25519_SIGNING_ALGORITHM,
            )
        except (client_error, boto_error) as exc:
            raise SigningError(f"KMS Sign with key {self.key_id} failed: {_describe(exc)}") from exc
        got = response.get("KeyId")
        if not isinstance(got, str) or not same_key(got, self.key_id):
            raise SigningError(f"KMS Sign answered for key {got!r}, not {self.key_id!r}")
        signature = response.get("Signature")
        if not isinstance(signature, bytes) or len(signature) != 64:
            raise SigningError("KMS Sign returned no 64-byte Ed25519 signature")
        return signature


class KmsRecipientDataKey:
    """KMS ``GenerateDataKey`` with ``Recipient``: a fresh data key that only the attested
    enclave can open (``CiphertextForRecipient``), and its KMS-wrapped form
    (``CiphertextBlob``) for the enclave to keep. The delta identity key's genesis
    (:mod:`trio_sign.enclave._identity`) seals under it.

    The parent relays and never holds the key: an answer with a ``Plaintext`` is refused.

    Cancellation: the boto3 call runs in a worker thread; cancelling abandons it.
    """

    def __init__(self, kms_client: Any, key_id: str) -> None:
        self._kms = kms_client
        self.key_id = key_id

    async def __call__(
        self, document: bytes, context: Mapping[str, str]
    ) -> tuple[str, bytes, bytes]:
        """``(key_arn, ciphertext_blob, ciphertext_for_recipient)`` for ``document``."""
        client_error, boto_error = _botocore_errors()

        def call() -> Any:
            return self._kms.generate_data_key(
                KeyId=self.key_id,
                KeySpec="AES_256",
                EncryptionContext=dict(context),
                Recipient={
                    "AttestationDocument": bytes(document),
                    "KeyEncryptionAlgorithm": RECIPIENT_ALGORITHM,
                },
            )

        try:
            response = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        except (client_error, boto_error) as exc:
            raise KmsRecipientError(
                f"KMS GenerateDataKey with Recipient for key {self.key_id} failed: {_describe(exc)}"
            ) from exc
        if response.pop("Plaintext", None):
            raise KmsRecipientError(
                "KMS GenerateDataKey returned a Plaintext data key to the parent; refusing it"
            )
        arn, blob = response.get("KeyId"), response.get("CiphertextBlob")
        envelope = response.get("CiphertextForRecipient")
        if not isinstance(arn, str) or not _is_key_arn(arn):
            raise KmsRecipientError("KMS GenerateDataKey did not say which key (no key ARN)")
        if not (is_alias(self.key_id) or same_key(arn, self.key_id)):
            raise KmsRecipientError(f"KMS answered for key {arn}, not {self.key_id}")
        if not isinstance(blob, bytes) or not blob:
            raise KmsRecipientError("KMS GenerateDataKey returned no CiphertextBlob")
        if not isinstance(envelope, bytes) or not envelope:
            raise KmsRecipientError("KMS GenerateDataKey returned no CiphertextForRecipient")
        return arn, blob, envelope
