"""AWS Nitro Enclaves: attestation documents, the NSM, and the local stand-ins used off AWS."""

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
]
