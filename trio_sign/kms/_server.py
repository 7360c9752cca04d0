"""The local KMS: AWS KMS's JSON 1.1 protocol for development and tests (NOT for production).

It speaks the wire protocol boto3 speaks to KMS (``POST /`` with
``X-Amz-Target: TrentService.<Operation>`` and ``Content-Type: application/x-amz-json-1.1``,
JSON bodies with base64 blobs, errors as HTTP 4xx with ``{"__type": ..., "message": ...}``), so
the parent uses the same boto3 client with ``endpoint_url``. Operations: ``CreateKey``,
``DescribeKey``, ``GenerateDataKey``, ``Encrypt`` and ``Decrypt``; ``GenerateDataKey`` and
``Decrypt`` take ``Recipient`` as KMS does for Nitro enclaves. Asymmetric signing with Ed25519
keys, for bundle signatures (DESIGN §12): ``CreateKey`` with ``KeySpec=ECC_NIST_EDWARDS25519``
and ``KeyUsage=SIGN_VERIFY``, ``GetPublicKey`` (the DER SubjectPublicKeyInfo) and ``Sign``
with ``SigningAlgorithm=ED25519_SHA_512`` and ``MessageType=RAW`` (pure Ed25519, RFC 8032, over
the message as given; KMS's ``ED25519_PH_SHA_512`` pre-hash variant is not implemented). A key
is used only as its usage says: ``Sign`` with a symmetric key, or ``Encrypt``,
``GenerateDataKey`` and ``Decrypt`` with a signing key, is ``InvalidKeyUsageException``.

What it does like KMS:

- ``EncryptionContext`` is authenticated: a blob only decrypts with the same context
  (``InvalidCiphertextException`` otherwise), and the key id travels inside the blob, so
  ``Decrypt`` works without ``KeyId`` (and ``IncorrectKeyException`` if a given one differs).
- ``Recipient``: the attestation document is verified against the pinned root (the local NSM's
  root; :func:`~trio_sign.nitro.verify_attestation`, at most :data:`MAX_ATTESTATION_AGE` old),
  the key policy is evaluated with the ``kms:RecipientAttestation:ImageSha384`` (PCR0) and
  ``kms:RecipientAttestation:PCR<n>`` condition keys taken from the document, and the answer is
  ``CiphertextForRecipient`` (the CMS envelope for the document's RSA ``public_key``) with no
  ``Plaintext``.
- The key policy (``--policy``, the same JSON document shape as a KMS key policy) is evaluated
  as IAM does for the subset it supports: an explicit ``Deny`` wins, otherwise some ``Allow``
  must match; a condition on a key the request does not carry is false (so a ``Decrypt``
  statement conditioned on PCRs never allows a ``Decrypt`` without ``Recipient``). See
  :class:`KeyPolicy` for the supported subset. Without a policy every request is allowed.

What it does NOT do: SigV4 signatures are not checked (an ``Authorization`` header must be
present, as KMS requires one, but anything is accepted), principals in the policy are ignored,
and the policy governs only ``Encrypt``, ``GenerateDataKey``, ``Decrypt`` and ``Sign``
(``CreateKey``, ``CreateAlias``, ``DescribeKey`` and ``GetPublicKey`` are always allowed);
there are no grants, key rotation or deletion. Aliases (``CreateAlias``) work wherever a
``KeyId`` is taken, as in KMS. The key file holds keys in clear.

Ciphertext blob (our own format, opaque to callers as KMS's is)::

    b"TSLKMS1" ‖ u8 len ‖ key_id (ASCII) ‖ nonce (24) ‖ XChaCha20-Poly1305(plaintext) ‖ tag (16)

with associated data ``canonical_json({"encryption_context": ctx, "key_id": key_id})``.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Final

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .._errors import TrioSignError
from ..crypto import _sodium, _stream
from ..nitro import AttestationError, encrypt_for_recipient, verify_attestation
from ..shares._keywrap import canonical_json
from ..shares._signature import CeremonyKey, ed25519_spki
from ..transport import hypercorn_bind, serve_asgi
from ..transport._asgi import Receive, Scope, Send, asgi_lifespan, respond
from ._store import ED25519_SPEC, KeyStore, LocalKey

log = logging.getLogger("trio_sign.kms")

#: Largest request body accepted (an ``AttestationDocument`` may be 256 KiB, base64-encoded).
MAX_REQUEST_BYTES: Final = 512 * 1024
#: KMS limits: ``Encrypt`` plaintext, ``GenerateDataKey`` ``NumberOfBytes``, ciphertext blob.
MAX_PLAINTEXT_BYTES: Final = 4096
MAX_DATA_KEY_BYTES: Final = 1024
MAX_CIPHERTEXT_BYTES: Final = 6144
#: Oldest attestation document accepted with ``Recipient``.
MAX_ATTESTATION_AGE: Final = timedelta(minutes=5)
#: Requests handled at once in worker threads (attestation checks are CPU work).
DEFAULT_CONCURRENCY: Final = 4
RECIPIENT_ALGORITHM: Final = "RSAES_OAEP_SHA_256"
SYMMETRIC_DEFAULT: Final = "SYMMETRIC_DEFAULT"
#: The signing algorithm of an ``ECC_NIST_EDWARDS25519`` key that the local KMS implements.
ED25519_ALGORITHM: Final = "ED25519_SHA_512"
#: KMS's ``Sign`` message limit (``MessageType=RAW``).
MAX_SIGN_MESSAGE_BYTES: Final = 4096
JSON_CONTENT_TYPE: Final = "application/x-amz-json-1.1"
TARGET_PREFIX: Final = "TrentService."

_BLOB_MAGIC: Final = b"TSLKMS1"
_DATA_KEY_SPECS: Final = {"AES_256": 32, "AES_128": 16}
#: Condition operators and keys :class:`KeyPolicy` understands.
_OPERATORS: Final = frozenset({"StringEquals", "StringEqualsIgnoreCase"})
_CONDITION_KEY = re.compile(
    r"kms:RecipientAttestation:(ImageSha384|PCR([0-9]|[12][0-9]|3[01]))|kms:EncryptionContext:.+",
    re.IGNORECASE,
)


class KmsError(TrioSignError):
    """A request the local KMS refuses, with the KMS error type (``__type``) to answer."""

    def __init__(self, code: str, message: str, *, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class PolicyError(TrioSignError):
    """A key policy document is malformed or uses something the local KMS does not support."""


# ---------------------------------------------------------------------------------------------
# Key policy


class KeyPolicy:
    """The subset of a KMS key policy the local KMS evaluates.

    ``{"Version": "2012-10-17", "Statement": [{"Sid": ..., "Effect": "Allow"|"Deny",
    "Principal": ... (ignored), "Action": "kms:Decrypt" | [...] (``*`` wildcards allowed),
    "Resource": ... (ignored), "Condition": {"StringEquals"|"StringEqualsIgnoreCase":
    {"kms:RecipientAttestation:ImageSha384" | "kms:RecipientAttestation:PCR<n>" |
    "kms:EncryptionContext:<key>": value | [values]}}}]}``. A condition holds when the request
    carries the key and its value equals one of the values; every condition of a statement must
    hold. ``NotAction``, other operators and other condition keys are refused at load, so a
    policy never silently means less than it says.
    """

    def __init__(self, document: Any) -> None:
        if not isinstance(document, dict) or "Statement" not in document:
            raise PolicyError("key policy must be a JSON object with a Statement list")
        statements = document["Statement"]
        if isinstance(statements, dict):
            statements = [statements]
        if not isinstance(statements, list) or not statements:
            raise PolicyError("key policy Statement must be a non-empty list")
        self._statements = [self._parse(i, s) for i, s in enumerate(statements)]

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyPolicy:
        try:
            return cls(json.loads(text))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PolicyError(f"key policy is not valid JSON: {exc}") from None

    @staticmethod
    def _parse(i: int, st: Any) -> tuple[bool, list[str], list[tuple[bool, str, list[str]]]]:
        where = f"Statement[{i}]"
        if not isinstance(st, dict):
            raise PolicyError(f"{where} is not an object")
        unknown = set(st) - {"Sid", "Effect", "Principal", "Action", "Resource", "Condition"}
        if unknown:
            raise PolicyError(f"{where}: unsupported element {sorted(unknown)[0]!r}")
        if st.get("Effect") not in ("Allow", "Deny"):
            raise PolicyError(f"{where}: Effect must be Allow or Deny")
        actions = st.get("Action")
        if isinstance(actions, str):
            actions = [actions]
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            raise PolicyError(f"{where}: Action must be a string or a list of strings")
        conditions: list[tuple[bool, str, list[str]]] = []
        cond = st.get("Condition", {})
        if not isinstance(cond, dict):
            raise PolicyError(f"{where}: Condition must be an object")
        for op, pairs in cond.items():
            if op not in _OPERATORS:
                raise PolicyError(f"{where}: unsupported condition operator {op!r}")
            if not isinstance(pairs, dict):
                raise PolicyError(f"{where}: Condition.{op} must be an object")
            for key, values in pairs.items():
                if _CONDITION_KEY.fullmatch(key) is None:
                    raise PolicyError(f"{where}: unsupported condition key {key!r}")
                vals = [values] if isinstance(values, str) else values
                if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
                    raise PolicyError(f"{where}: values of {key!r} must be strings")
                conditions.append((op == "StringEqualsIgnoreCase", key.lower(), vals))
        return st["Effect"] == "Allow", [a.lower() for a in actions], conditions

    def allows(self, action: str, context: Mapping[str, str]) -> bool:
        """Whether ``action`` (``"kms:Decrypt"``) is allowed with these condition values.

        ``context`` maps lowercase condition keys to the request's values.
        """
        allowed = False
        for allow, actions, conditions in self._statements:
            if not any(fnmatch.fnmatchcase(action.lower(), a) for a in actions):
                continue
            if not all(_holds(ic, key, vals, context) for ic, key, vals in conditions):
                continue
            if not allow:
                return False
            allowed = True
        return allowed


def _holds(ignore_case: bool, key: str, values: list[str], context: Mapping[str, str]) -> bool:
    got = context.get(key)
    if got is None:
        return False
    if ignore_case:
        return got.lower() in (v.lower() for v in values)
    return got in values


# ---------------------------------------------------------------------------------------------
# Request field readers (type errors are SerializationException, value errors Validation)


def _field(body: Mapping[str, Any], name: str, kind: type, required: bool) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise KmsError("ValidationException", f"1 validation error detected: {name} is null")
        return None
    ok = type(value) is int if kind is int else isinstance(value, kind)
    if not ok:
        raise KmsError("SerializationException", f"{name}: expected a {kind.__name__}")
    return value


def _blob(body: Mapping[str, Any], name: str, *, required: bool, limit: int) -> bytes | None:
    text = _field(body, name, str, required)
    if text is None:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KmsError("SerializationException", f"{name} is not valid base64") from None
    if not 1 <= len(raw) <= limit:
        raise KmsError("ValidationException", f"{name} must be 1..{limit} bytes")
    return raw


def _context(body: Mapping[str, Any]) -> dict[str, str]:
    ctx = _field(body, "EncryptionContext", dict, False) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()):
        raise KmsError("SerializationException", "EncryptionContext must map strings to strings")
    return dict(ctx)


def _release(
    response: dict[str, Any], recipient: rsa.RSAPublicKey | None, secret: bytearray
) -> None:
    """Put ``secret`` into ``response`` as KMS does: enveloped (``CiphertextForRecipient``)
    for an attested ``Recipient``, else in clear (``Plaintext``)."""
    if recipient is not None:
        response["CiphertextForRecipient"] = _b64(encrypt_for_recipient(recipient, secret))
    else:
        response["Plaintext"] = _b64(secret)


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------
# The protocol core (synchronous: bytes in, status and bytes out)


class LocalKms:
    """The local KMS's operations over a :class:`KeyStore`. Synchronous and thread-safe.

    Args:
        store: the keys.
        root_pem: the attestation root to pin for ``Recipient`` requests (PEM).
        policy: the key policy for every key, or None to allow everything.

    :meth:`handle` is the whole wire protocol minus HTTP: an operation name and a JSON body in,
    an HTTP status and a JSON body out. The ASGI app (:class:`KmsApp`) only moves bytes.
    """

    def __init__(
        self, store: KeyStore, *, root_pem: bytes | str, policy: KeyPolicy | None = None
    ) -> None:
        self.store = store
        self._root_pem = root_pem
        self._policy = policy
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "CreateKey": self.create_key,
            "DescribeKey": self.describe_key,
            "CreateAlias": self.create_alias,
            "GenerateDataKey": self.generate_data_key,
            "Encrypt": self.encrypt,
            "Decrypt": self.decrypt,
            "GetPublicKey": self.get_public_key,
            "Sign": self.sign,
        }

    def handle(self, operation: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Run one request; returns ``(http_status, response_object)`` (errors included)."""
        try:
            op = self._ops.get(operation)
            if op is None:
                raise KmsError("UnknownOperationException", f"unsupported operation {operation}")
            try:
                request = json.loads(body) if body else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise KmsError("SerializationException", "request body is not JSON") from None
            if not isinstance(request, dict):
                raise KmsError("SerializationException", "request body is not a JSON object")
            response = op(request)
        except KmsError as exc:
            log.info("kms %s refused: %s", operation, exc.code)
            return exc.status, {"__type": exc.code, "message": exc.message}
        except Exception:
            # A bug or a failing key file: answer as KMS does (500, retryable), keep serving.
            log.exception("kms %s failed", operation)
            return 500, {"__type": "KMSInternalException", "message": "internal error"}
        return 200, response

    # -- helpers ---------------------------------------------------------------------------------

    def _key(self, key_ref: Any, *, for_use: bool = True) -> LocalKey:
        if not isinstance(key_ref, str) or not 1 <= len(key_ref) <= 2048:
            raise KmsError("ValidationException", "KeyId must be a string of 1..2048 characters")
        key = self.store.resolve(key_ref)
        if key is None:
            raise KmsError("NotFoundException", f"Key '{key_ref}' does not exist")
        if for_use and not key.enabled:
            raise KmsError("DisabledException", f"{key.arn} is disabled.")
        return key

    def _metadata(self, key: LocalKey) -> dict[str, Any]:
        if key.signing:
            return {
                "AWSAccountId": self.store.account,
                "KeyId": key.key_id,
                "Arn": key.arn,
                "CreationDate": key.created,
                "Enabled": key.enabled,
                "Description": key.description,
                "KeyUsage": "SIGN_VERIFY",
                "KeyState": "Enabled" if key.enabled else "Disabled",
                "Origin": "AWS_KMS",
                "KeyManager": "CUSTOMER",
                "KeySpec": key.key_spec,
                "SigningAlgorithms": [ED25519_ALGORITHM],
                "MultiRegion": False,
            }
        return {
            "AWSAccountId": self.store.account,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": key.created,
            "Enabled": key.enabled,
            "Description": key.description,
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeyState": "Enabled" if key.enabled else "Disabled",
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": SYMMETRIC_DEFAULT,
            "KeySpec": SYMMETRIC_DEFAULT,
            "EncryptionAlgorithms": [SYMMETRIC_DEFAULT],
            "MultiRegion": False,
        }

    def _encryption_key(self, key_ref: Any) -> LocalKey:
        key = self._key(key_ref)
        if key.signing:
            raise KmsError(
                "InvalidKeyUsageException",
                f"{key.arn} key usage is SIGN_VERIFY, not ENCRYPT_DECRYPT",
            )
        return key

    def _authorize(
        self, action: str, ctx: Mapping[str, str], attestation: Mapping[str, str] | None
    ) -> None:
        if self._policy is None:
            return
        values = {f"kms:encryptioncontext:{k.lower()}": v for k, v in ctx.items()}
        values.update(attestation or {})
        if not self._policy.allows(action, values):
            raise KmsError(
                "AccessDeniedException",
                f"The key policy does not allow {action} for this request"
                + (" (attestation conditions not met)" if attestation is not None else ""),
            )

    def _recipient(self, request: Mapping[str, Any]) -> tuple[rsa.RSAPublicKey, dict[str, str]]:
        """Verify ``Recipient``; returns the RSA key to envelope for and the condition values."""
        recipient = _field(request, "Recipient", dict, True)
        algorithm = _field(recipient, "KeyEncryptionAlgorithm", str, False)
        if algorithm != RECIPIENT_ALGORITHM:
            raise KmsError(
                "ValidationException",
                f"Recipient.KeyEncryptionAlgorithm must be {RECIPIENT_ALGORITHM}",
            )
        document = _blob(recipient, "AttestationDocument", required=True, limit=262144)
        assert document is not None
        try:
            verified = verify_attestation(
                document, root_pem=self._root_pem, max_age=MAX_ATTESTATION_AGE
            )
        except AttestationError as exc:
            log.info("kms recipient attestation refused: %s", exc.reason)
            raise KmsError(
                "ValidationException", f"Invalid attestation document: {exc.reason}"
            ) from None
        if verified.public_key is None:
            raise KmsError("ValidationException", "The attestation document has no public_key")
        try:
            public = serialization.load_der_public_key(verified.public_key)
        except ValueError:
            public = None
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size < 2048:
            raise KmsError(
                "ValidationException",
                "The attestation document public_key must be an RSA key of at least 2048 bits",
            )
        values = {
            f"kms:recipientattestation:pcr{i}": value.hex() for i, value in verified.pcrs.items()
        }
        if 0 in verified.pcrs:
            values["kms:recipientattestation:imagesha384"] = verified.pcrs[0].hex()
        return public, values

    def _seal(self, key: LocalKey, plaintext: bytes | bytearray, ctx: Mapping[str, str]) -> bytes:
        nonce = bytearray(_stream.AEAD_NONCE_BYTES)
        _sodium.random_bytes(nonce)
        kid = key.key_id.encode("ascii")
        ct = _stream.aead_encrypt(plaintext, ad=_ad(key.key_id, ctx), nonce=nonce, key=key.material)
        return _BLOB_MAGIC + bytes([len(kid)]) + kid + bytes(nonce) + ct

    def _open(
        self, blob: bytes, ctx: Mapping[str, str], key_ref: str | None
    ) -> tuple[LocalKey, bytearray]:
        invalid = KmsError("InvalidCiphertextException", "")
        head = len(_BLOB_MAGIC) + 1
        if not blob.startswith(_BLOB_MAGIC) or len(blob) < head:
            raise invalid
        n = blob[len(_BLOB_MAGIC)]
        rest = len(blob) - head - n - _stream.AEAD_NONCE_BYTES - _stream.AEAD_ABYTES
        if rest < 0:
            raise invalid
        key_id = blob[head : head + n].decode("ascii", errors="replace")
        key = self.store.resolve(key_id)
        if key is None:
            # Like KMS: a blob for a key we do not hold is just an invalid ciphertext.
            raise invalid
        if not key.enabled:
            raise KmsError("DisabledException", f"{key.arn} is disabled.")
        if key.signing:
            raise invalid
        if key_ref is not None and self._key(key_ref, for_use=False) is not key:
            raise KmsError(
                "IncorrectKeyException",
                "The key ID in the request does not identify a KMS key that can perform "
                "this operation.",
            )
        nonce = blob[head + n : head + n + _stream.AEAD_NONCE_BYTES]
        out = bytearray(rest)
        if not _stream.aead_decrypt_into(
            out,
            blob[head + n + _stream.AEAD_NONCE_BYTES :],
            ad=_ad(key.key_id, ctx),
            nonce=nonce,
            key=key.material,
        ):
            raise invalid
        return key, out

    # -- operations ------------------------------------------------------------------------------

    def create_key(self, request: dict[str, Any]) -> dict[str, Any]:
        if _field(request, "Policy", str, False) is not None:
            raise KmsError(
                "UnsupportedOperationException",
                "the local KMS takes its key policy from --policy, not CreateKey",
            )
        spec = (
            _field(request, "KeySpec", str, False)
            or _field(request, "CustomerMasterKeySpec", str, False)
            or SYMMETRIC_DEFAULT
        )
        usage = _field(request, "KeyUsage", str, False) or (
            "SIGN_VERIFY" if spec == ED25519_SPEC else "ENCRYPT_DECRYPT"
        )
        if (spec, usage) not in (
            (SYMMETRIC_DEFAULT, "ENCRYPT_DECRYPT"),
            (ED25519_SPEC, "SIGN_VERIFY"),
        ):
            if spec in (SYMMETRIC_DEFAULT, ED25519_SPEC):
                raise KmsError(
                    "ValidationException", f"KeyUsage {usage} is not compatible with KeySpec {spec}"
                )
            raise KmsError(
                "UnsupportedOperationException",
                "the local KMS only makes SYMMETRIC_DEFAULT ENCRYPT_DECRYPT and "
                "ECC_NIST_EDWARDS25519 SIGN_VERIFY keys",
            )
        description = _field(request, "Description", str, False) or ""
        if len(description) > 8192:
            raise KmsError("ValidationException", "Description is longer than 8192 characters")
        key = self.store.create(description=description, key_spec=spec)
        log.info("kms created key %s (%s)", key.key_id, spec)
        return {"KeyMetadata": self._metadata(key)}

    def create_alias(self, request: dict[str, Any]) -> dict[str, Any]:
        name = _field(request, "AliasName", str, True)
        target = self._key(_field(request, "TargetKeyId", str, True), for_use=False)
        try:
            self.store.create_alias(name, target.key_id)
        except ValueError as exc:
            raise KmsError("ValidationException", str(exc)) from None
        except KeyError:
            raise KmsError(
                "AlreadyExistsException",
                f"An alias with the name arn:aws:kms:{self.store.region}:{self.store.account}:"
                f"{name} already exists",
            ) from None
        log.info("kms created alias %s for key %s", name, target.key_id)
        return {}

    def describe_key(self, request: dict[str, Any]) -> dict[str, Any]:
        key = self._key(_field(request, "KeyId", str, True), for_use=False)
        return {"KeyMetadata": self._metadata(key)}

    def encrypt(self, request: dict[str, Any]) -> dict[str, Any]:
        key = self._encryption_key(_field(request, "KeyId", str, True))
        algorithm = _field(request, "EncryptionAlgorithm", str, False) or SYMMETRIC_DEFAULT
        if algorithm != SYMMETRIC_DEFAULT:
            raise KmsError("InvalidKeyUsageException", f"{algorithm} is not valid for {key.arn}")
        plaintext = _blob(request, "Plaintext", required=True, limit=MAX_PLAINTEXT_BYTES)
        assert plaintext is not None
        ctx = _context(request)
        self._authorize("kms:Encrypt", ctx, None)
        return {
            "CiphertextBlob": _b64(self._seal(key, plaintext, ctx)),
            "KeyId": key.arn,
            "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }

    def generate_data_key(self, request: dict[str, Any]) -> dict[str, Any]:
        key = self._encryption_key(_field(request, "KeyId", str, True))
        spec = _field(request, "KeySpec", str, False)
        count = _field(request, "NumberOfBytes", int, False)
        if (spec is None) == (count is None):
            raise KmsError("ValidationException", "Please specify either KeySpec or NumberOfBytes")
        if spec is not None:
            if spec not in _DATA_KEY_SPECS:
                raise KmsError("ValidationException", "KeySpec must be AES_256 or AES_128")
            count = _DATA_KEY_SPECS[spec]
        assert count is not None
        if not 1 <= count <= MAX_DATA_KEY_BYTES:
            raise KmsError("ValidationException", f"NumberOfBytes must be 1..{MAX_DATA_KEY_BYTES}")
        ctx = _context(request)
        recipient = None
        attestation = None
        if request.get("Recipient") is not None:
            recipient, attestation = self._recipient(request)
        self._authorize("kms:GenerateDataKey", ctx, attestation)
        data_key = bytearray(count)
        try:
            _sodium.random_bytes(data_key)
            response = {"CiphertextBlob": _b64(self._seal(key, data_key, ctx)), "KeyId": key.arn}
            _release(response, recipient, data_key)
        finally:
            _sodium.memzero(data_key)
        log.info("kms generated a data key under %s (recipient=%s)", key.key_id, bool(recipient))
        return response

    def decrypt(self, request: dict[str, Any]) -> dict[str, Any]:
        blob = _blob(request, "CiphertextBlob", required=True, limit=MAX_CIPHERTEXT_BYTES)
        assert blob is not None
        key_ref = _field(request, "KeyId", str, False)
        algorithm = _field(request, "EncryptionAlgorithm", str, False) or SYMMETRIC_DEFAULT
        if algorithm != SYMMETRIC_DEFAULT:
            raise KmsError("InvalidCiphertextException", f"unsupported algorithm {algorithm}")
        ctx = _context(request)
        recipient = None
        attestation = None
        if request.get("Recipient") is not None:
            recipient, attestation = self._recipient(request)
        key, plaintext = self._open(blob, ctx, key_ref)
        try:
            self._authorize("kms:Decrypt", ctx, attestation)
            response = {"KeyId": key.arn, "EncryptionAlgorithm": SYMMETRIC_DEFAULT}
            _release(response, recipient, plaintext)
        finally:
            _sodium.memzero(plaintext)
        log.info("kms decrypted under %s (recipient=%s)", key.key_id, bool(recipient))
        return response

    def get_public_key(self, request: dict[str, Any]) -> dict[str, Any]:
        key = self._key(_field(request, "KeyId", str, True), for_use=False)
        if not key.signing:
            raise KmsError(
                "UnsupportedOperationException",
                f"{key.arn} is a symmetric key; GetPublicKey needs an asymmetric key",
            )
        with CeremonyKey.from_seed(key.material) as pair:
            public = pair.public_key
        return {
            "KeyId": key.arn,
            "PublicKey": _b64(ed25519_spki(public)),
            "KeySpec": key.key_spec,
            "KeyUsage": "SIGN_VERIFY",
            "SigningAlgorithms": [ED25519_ALGORITHM],
        }

    def sign(self, request: dict[str, Any]) -> dict[str, Any]:
        key = self._key(_field(request, "KeyId", str, True))
        message = _blob(request, "Message", required=True, limit=MAX_SIGN_MESSAGE_BYTES)
        assert message is not None
        algorithm = _field(request, "SigningAlgorithm", str, True)
        message_type = _field(request, "MessageType", str, False) or "RAW"
        if message_type not in ("RAW", "DIGEST", "EXTERNAL_MU"):
            raise KmsError("ValidationException", "MessageType must be RAW, DIGEST or EXTERNAL_MU")
        if _field(request, "DryRun", bool, False):
            raise KmsError("DryRunOperationException", "the local KMS does not do dry runs")
        if not key.signing:
            raise KmsError(
                "InvalidKeyUsageException",
                f"{key.arn} key usage is ENCRYPT_DECRYPT, not SIGN_VERIFY",
            )
        if algorithm != ED25519_ALGORITHM:
            raise KmsError(
                "InvalidKeyUsageException",
                f"{algorithm} is not valid for {key.arn} (the local KMS signs {ED25519_ALGORITHM})",
            )
        if message_type != "RAW":
            raise KmsError("ValidationException", f"{ED25519_ALGORITHM} signs MessageType RAW only")
        self._authorize("kms:Sign", {}, None)
        with CeremonyKey.from_seed(key.material) as pair:
            signature = pair.sign_digest(message)  # pure Ed25519 over the message as given
        log.info("kms signed %d bytes with %s", len(message), key.key_id)
        return {
            "KeyId": key.arn,
            "Signature": _b64(signature),
            "SigningAlgorithm": ED25519_ALGORITHM,
        }


def _ad(key_id: str, ctx: Mapping[str, str]) -> bytes:
    return canonical_json({"encryption_context": dict(ctx), "key_id": key_id})


# ---------------------------------------------------------------------------------------------
# HTTP: a minimal ASGI app served by hypercorn's Trio worker


class KmsApp:
    """ASGI app: checks the HTTP envelope, bounds the body, runs :meth:`LocalKms.handle` in a
    worker thread (at most ``concurrency`` at once).

    Cancellation: a cancelled request waits for its worker thread (milliseconds of work; the
    thread is not abandoned, so a key file write is never left half done).
    """

    def __init__(
        self,
        kms: LocalKms,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.kms = kms
        self.max_request_bytes = max_request_bytes
        self._limiter = trio.CapacityLimiter(concurrency)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await asgi_lifespan(receive, send)
        if scope["type"] != "http":
            return
        status, response = await self._http(scope, receive)
        headers = [(b"x-amzn-requestid", str(uuid.uuid4()).encode())]
        if status != 200:
            headers.append((b"x-amzn-errortype", str(response.get("__type", "")).encode()))
        body = json.dumps(response).encode("utf-8")
        await respond(send, status, JSON_CONTENT_TYPE.encode(), body, headers)

    async def _http(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] != "POST" or scope["path"] != "/":
            return 404, {"__type": "UnknownOperationException", "message": "POST / only"}
        if "authorization" not in headers:
            # KMS refuses unsigned requests; we require the header but do not verify SigV4.
            return 400, {
                "__type": "MissingAuthenticationTokenException",
                "message": "Missing Authentication Token",
            }
        target = headers.get("x-amz-target", "")
        if not target.startswith(TARGET_PREFIX):
            return 400, {
                "__type": "UnknownOperationException",
                "message": "X-Amz-Target must be TrentService.<Operation>",
            }
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return 413, self._too_large()
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, {"__type": "SerializationException", "message": "client went away"}
            body += message.get("body", b"")
            if len(body) > self.max_request_bytes:
                return 413, self._too_large()
            if not message.get("more_body", False):
                break
        operation = target[len(TARGET_PREFIX) :]
        return await trio.to_thread.run_sync(
            self.kms.handle, operation, bytes(body), limiter=self._limiter
        )

    def _too_large(self) -> dict[str, Any]:
        return {
            "__type": "ValidationException",
            "message": f"request body is larger than {self.max_request_bytes} bytes",
        }


async def serve_kms_local(
    kms: LocalKms,
    listen: str,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local KMS on ``listen`` (``tcp://host:port``, port 0 for any, or
    ``unix:///path``) until cancelled.

    ``task_status.started(url)`` gets the endpoint URL to give boto3 (``http://host:port``).

    Cancellation: cancelling stops the server (hypercorn's own graceful period applies to
    requests in flight).
    """
    hypercorn_bind(listen)  # a bad URL raises here, not wrapped by the nursery below
    app = KmsApp(kms, max_request_bytes=max_request_bytes)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(
                serve_asgi, app, listen, logger=logging.getLogger("trio_sign.kms.http")
            )
        )
        url = binds[0] if binds else listen
        log.info("local KMS listening on %s (%d keys)", url, len(kms.store))
        task_status.started(url)
