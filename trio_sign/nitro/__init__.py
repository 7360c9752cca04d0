"""AWS Nitro Enclaves: attestation documents, the NSM, and the local stand-ins used off AWS."""

from ._attestation import AWS_NITRO_ROOT_PEM as AWS_NITRO_ROOT_PEM
from ._attestation import AWS_NITRO_ROOT_SHA256 as AWS_NITRO_ROOT_SHA256
from ._attestation import MAX_DOCUMENT_BYTES as MAX_DOCUMENT_BYTES
from ._attestation import MAX_USER_FIELD_BYTES as MAX_USER_FIELD_BYTES
from ._attestation import REASONS as REASONS
from ._attestation import AttestationDocument as AttestationDocument
from ._attestation import AttestationError as AttestationError
from ._attestation import CertificateInfo as CertificateInfo
from ._attestation import VerifiedAttestation as VerifiedAttestation
from ._attestation import decode_attestation as decode_attestation
from ._attestation import verify_attestation as verify_attestation
from ._cms import MAX_RECIPIENT_CIPHERTEXT_BYTES as MAX_RECIPIENT_CIPHERTEXT_BYTES
from ._cms import CmsError as CmsError
from ._cms import EphemeralRecipientKey as EphemeralRecipientKey
from ._cms import decrypt_recipient_ciphertext as decrypt_recipient_ciphertext
from ._cms import encrypt_for_recipient as encrypt_for_recipient
from ._cms import subject_key_identifier as subject_key_identifier

__all__ = [
    "CmsError",
    "EphemeralRecipientKey",
    "MAX_RECIPIENT_CIPHERTEXT_BYTES",
    "decrypt_recipient_ciphertext",
    "encrypt_for_recipient",
    "subject_key_identifier",
    "AWS_NITRO_ROOT_PEM",
    "AWS_NITRO_ROOT_SHA256",
    "MAX_DOCUMENT_BYTES",
    "MAX_USER_FIELD_BYTES",
    "REASONS",
    "AttestationDocument",
    "AttestationError",
    "CertificateInfo",
    "VerifiedAttestation",
    "decode_attestation",
    "verify_attestation",
]
