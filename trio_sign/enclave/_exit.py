"""What the enclave process's exit status means (documented for operators and the parent).

======  ===================  =========================================================
code    name                 meaning
======  ===================  =========================================================
0       OK                   drained and stopped after SIGTERM/SIGINT (or a ``drain``)
1       INTERNAL             a bug: an unexpected exception (or an illegal lifecycle
                             move); the log has the traceback
2       USAGE                bad command line or configuration (enclave.toml's policies:
                             ``unknown_approver``, ``impossible_threshold``,
                             ``unknown_key_type``, ``bad_approver``, ``bad_policy``)
3       PRELOAD_FAILED       the bundle, its key or the boot exchange was refused (with
                             ``--dev``: the plaintext share file cannot be read or is
                             refused; ``unknown_policy``: an account names a policy
                             enclave.toml does not define)
4       PRELOAD_TIMEOUT      preload did not finish within ``preload_timeout_s``
5       MEMORY               the bundle does not fit the enclave's memory
6       NSM                  the Nitro Security Module could not be opened or used
7       SERVICE_FAILED       a long-lived service failed: the gRPC address cannot be
                             bound (reason ``listen``), a listener or channel failed
======  ===================  =========================================================

Reasons of ``PRELOAD_FAILED`` that say who made the bundle (DESIGN §12; outside development,
:func:`trio_sign.enclave._preload.bundle_signing_keys`):

============================  ================================================================
reason                        meaning
============================  ================================================================
``bundle_unsigned``           the bundle carries no signature record, and signing keys are
                              pinned (``[bundles] signing_keys``), or this is the Nitro NSM
``bundle_signer_unknown``     signed by a key that is not pinned: a bundle someone else made
                              (a hostile parent encrypting to the attestation's RSA key)
``bundle_signature_invalid``  the record names a pinned key but its signature does not verify
                              over the bundle's fingerprint (a tampered signature)
``bundle_kind``               a ``delta`` bundle offered as the base
``bad_signature_record``      bytes after the FINAL chunk that are not one whole record
``identity_key_mismatch``     the delta identity key KMS released is not the public key
                              pinned in ``[bundles] delta_identity_key``
============================  ================================================================

Each refusal is decided before anything decrypted is used: the store is zeroed and nothing is
served.

In every non-zero case the status channel's last state is ``failed`` with a stable reason,
followed by ``exit`` with the code and the last log lines (the enclave's
:class:`~trio_sign.enclave.ParentLink` gives these last words); then the process exits (in an
EIF, the AWS init reboots the enclave, which the parent sees as the enclave going away). The
command prints one line, ``trio-sign: enclave failed (REASON): MESSAGE``, never a traceback
for these.
"""

from __future__ import annotations

import enum

from .._errors import TrioSignError


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    PRELOAD_FAILED = 3
    PRELOAD_TIMEOUT = 4
    MEMORY = 5
    NSM = 6
    SERVICE_FAILED = 7


class EnclaveExit(TrioSignError):
    """The enclave stops with ``code``; ``reason`` is the stable code sent on the status channel."""

    def __init__(self, message: str, *, code: ExitCode, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
