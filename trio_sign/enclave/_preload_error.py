"""The preload's one error (its own module: the identity key's exchange raises it too)."""

from __future__ import annotations

from .._errors import TrioSignError


class PreloadError(TrioSignError):
    """Preload failed; nothing will be served.

    Attributes:
        reason: a stable code for the status channel: the underlying ``ShareFileError`` reason
            (``tampered``, ``truncated``, ``duplicate_account``, ...; for the signature
            ``bundle_unsigned``, ``bundle_signer_unknown``, ``bundle_signature_invalid``,
            ``bundle_kind``, ``bad_signature_record``), ``key_unwrap`` (the CMS envelope or the
            data key was refused), ``memory`` (the bundle does not fit), ``protocol`` (the
            parent broke the boot exchange), ``timeout``, or for the delta identity key
            (:class:`~trio_sign.enclave._identity.IdentityKeyError`)
            ``identity_key_mismatch``, ``identity_sealed_bad``, ``identity_key_unpinned``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
