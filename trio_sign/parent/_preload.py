"""Scheme A preload, the parent's side: answer the enclave's attestation with a KMS envelope,
then stream the sealed bundle.

The parent is not trusted with secrets and never holds one here: it forwards the enclave's
attestation document to KMS (``Decrypt`` with ``Recipient``) and passes back the
``CiphertextForRecipient`` that only the enclave can open, then sends the sealed file's bytes
unchanged. See :mod:`trio_sign.enclave._preload` for the exchange.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .._errors import TrioSignError
from ..nitro import (
    AttestationMessage,
    BundleChunkMessage,
    BundleEndMessage,
    EventsConfigMessage,
    HelloMessage,
    MessageStream,
    PreloadResultMessage,
    RecipientCiphertextMessage,
)
from ..nitro._channel import MAX_FRAME_BYTES
from ..shares import read_sealed_header

log = logging.getLogger("trio_sign.parent.preload")

#: ``(attestation_document, sealed_header) -> CiphertextForRecipient`` (KMS Decrypt with
#: Recipient, for the header's encrypted data key and encryption context).
RecipientKms = Callable[[bytes, dict[str, Any]], Awaitable[bytes]]

#: Bundle bytes per frame: the frame limit less room for the CBOR map around the data.
CHUNK_BYTES = MAX_FRAME_BYTES - 64


class PreloadRefused(TrioSignError):
    """The enclave reported that preload failed (``reason`` is its stable code)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


async def serve_preload(
    channel: MessageStream,
    bundle: Path,
    kms: RecipientKms,
    *,
    events: EventsConfigMessage | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> PreloadResultMessage:
    """Run the parent side of the boot exchange for one enclave boot.

    Returns the enclave's successful ``preload_result``.

    ``events``, if given, is sent just before the KMS envelope: where the enclave subscribes to
    the gateway's events (``[enclave] gateway_url`` and ``node_id``), so that the image, and
    its PCR0, need not name the node.

    Error handling:
        :class:`PreloadRefused` if the enclave reports failure; ``ChannelProtocolError`` and
        transport errors if it breaks the exchange; whatever ``kms`` raises (for example an
        attestation the key policy refuses).
    """
    hello = await channel.receive_expected(HelloMessage)
    if hello.channel != "preload":
        raise TrioSignError(f"boot channel opened with hello for {hello.channel!r}")
    with bundle.open("rb") as f:
        header, sha256 = await trio.to_thread.run_sync(read_sealed_header, f)
    attestation = await channel.receive_expected(AttestationMessage)
    envelope = await kms(attestation.document, header)
    if events is not None:
        await channel.send(events)
    await channel.send(RecipientCiphertextMessage(ciphertext=envelope))
    total = 0
    try:
        with bundle.open("rb") as f:
            while data := await trio.to_thread.run_sync(f.read, chunk_bytes):
                await channel.send(BundleChunkMessage(data=data))
                total += len(data)
        await channel.send(BundleEndMessage(total_bytes=total))
        log.info("bundle sent", extra={"bytes": total, "sha256": sha256})
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # The enclave stopped reading: it refused the bundle. Its verdict may be waiting.
        log.warning("enclave closed the boot channel mid-bundle", extra={"bytes_sent": total})
    result = await channel.receive_expected(PreloadResultMessage)
    if not result.ok:
        raise PreloadRefused(
            f"enclave preload failed: {result.reason}", reason=result.reason or "unknown"
        )
    if result.sha256 != sha256:
        raise TrioSignError(
            f"enclave loaded a bundle with fingerprint {result.sha256}, but {sha256} was sent"
        )
    return result
