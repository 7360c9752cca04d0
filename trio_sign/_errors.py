"""The exception tree of trio_sign.

One root, a shallow tree, precise meanings. Every message is one line that says what was wrong
and, where it helps, which setting or input to change. No message ever contains key material.
"""

from __future__ import annotations


class TrioSignError(Exception):
    """Root of every error trio_sign raises on purpose."""


class FrostError(TrioSignError):
    """A FROST operation refused its input (bad element, scalar, commitment list, ...)."""


class InvalidSignatureShareError(FrostError):
    """Aggregation found a signature share that does not verify.

    Attributes:
        identifier: the 32-byte serialized identifier of the faulty signer.
    """

    def __init__(self, message: str, *, identifier: bytes) -> None:
        super().__init__(message)
        self.identifier = identifier


class ShareFileError(TrioSignError):
    """A key-share file (plaintext or sealed) was refused.

    Attributes:
        reason: a stable, machine-readable code (``"truncated"``, ``"tampered"``,
            ``"duplicate_account"``, ...); the status channel and the tests use it.
        line: 1-based line (plaintext) or record number (sealed) where the problem is, if known.
        unit: what ``line`` counts: ``"line"`` or ``"record"``.
    """

    def __init__(
        self, message: str, *, reason: str, line: int | None = None, unit: str = "line"
    ) -> None:
        if line is not None:
            message = f"{unit} {line}: {message}"
        super().__init__(message)
        self.reason = reason
        self.line = line
        self.unit = unit


class KeyWrapError(TrioSignError):
    """A data key could not be wrapped or unwrapped (wrong key, wrong context, bad blob)."""


class InternalError(TrioSignError):
    """A bug in trio_sign: an invariant did not hold. Please report it."""
