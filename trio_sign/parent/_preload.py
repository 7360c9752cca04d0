"""Scheme A preload, the parent's side: answer the enclave's attestation with a KMS envelope,
then stream the sealed bundle, then every stored delta.

The parent is not trusted with secrets and never holds one here: it forwards the enclave's
attestation document to KMS (``Decrypt`` with ``Recipient``) and passes back the
``CiphertextForRecipient`` that only the enclave can open, then sends the sealed file's bytes
unchanged. See :mod:`trio_sign.enclave._preload` for the exchange.

With a delta store (``[deltas]``, docs/key-lifecycle.md §4), the base is followed on the same
channel by every delta the store lists at that moment, in sequence order from 1 (a gap ends
the list). The exact frames, which the doc leaves partly open::

    enclave                                   parent
    hello, attestation                  ->
                                        <-    events (optional), recipient_ciphertext
                                        <-    bundle_chunk {data} ... (the base's bytes)
                                        <-    bundle_end {total_bytes, deltas: N}
                                        <-    delta_push {sequence: 1, total_bytes}
                                        <-    delta_chunk {data} ... (at most 256 KiB each)
                                        <-    delta_end {}
                                              ... the same for sequences 2 .. N
    preload_result {ok, accounts, sha256,
                    deltas, deltas_head} ->

- ``bundle_end.deltas`` announces N, the number of deltas that follow (0, or absent from an
  older parent, when there are none), so the enclave knows when the boot stream ends: no
  other terminator is sent.
- Each delta is announced by ``delta_push`` (the same frame the deltas channel uses), its
  sequence is its position (1, 2, ... N) and ``total_bytes`` its length; the chunks add up to
  exactly that.
- ``preload_result`` comes once, after the last delta: ``sha256`` is still the base's
  fingerprint (what the attestation gate and the gateways pin); ``deltas`` and
  ``deltas_head`` say how many deltas the enclave loaded and its head. An enclave that omits
  them is taken to have loaded all N. The deltas channel's watcher starts from there.
- The list is read once, just before ``bundle_end``; a delta stored later reaches the enclave
  on the deltas channel. If the store cannot be listed or a listed delta cannot be read, the
  preload fails (a boot without the deltas would hide accounts the gateway was told exist).

The delta identity key (``[identity] sealed_file``, docs/runbook.md §7): every boot, right
after the bundle's ``recipient_ciphertext`` and before the bundle, the parent sends the sealed
identity file (``identity``, public data); the enclave answers with a second ``attestation``
and the parent with KMS ``Decrypt`` with ``Recipient`` for the file's data key (the same
``RecipientKms``, given :meth:`~trio_sign.enclave._identity.SealedIdentity.kms_header`). An
enclave that refuses the key answers ``preload_result {ok: false, reason}`` instead
(``identity_key_mismatch``, ``identity_sealed_bad``, ...): :class:`PreloadRefused`. A KMS
refusal raises here, as for the bundle.

Genesis (:func:`serve_genesis`, ``trio-sign parent --genesis``): instead of the bundle, the
parent answers the enclave's first attestation with ``identity_genesis``, relays the
enclave's ``genesis_attestation`` to KMS ``GenerateDataKey`` with ``Recipient`` and the
encryption context naming the new public key, returns ``genesis_data_key``, stores the
``identity_sealed`` file it gets back durably and says ``identity_stored``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from .._errors import TrioSignError
from ..enclave._identity import (
    IdentityKeyError,
    RecipientDataKey,
    SealedIdentity,
    identity_context,
)
from ..nitro import (
    AttestationMessage,
    BundleChunkMessage,
    BundleEndMessage,
    ChannelMessage,
    EventsConfigMessage,
    HelloMessage,
    MessageStream,
    PreloadResultMessage,
    RecipientCiphertextMessage,
)
from ..nitro._channel import (
    MAX_DELTA_CHUNK_BYTES,
    MAX_FRAME_BYTES,
    GenesisAttestationMessage,
    GenesisDataKeyMessage,
    IdentityGenesisMessage,
    IdentityMessage,
    IdentitySealedMessage,
    IdentityStoredMessage,
)
from ..shares import read_sealed_header
from ._deltas import Deltas, DeltaStoreError, delta_frames

log = logging.getLogger("trio_sign.parent.preload")

#: ``(attestation_document, sealed_header) -> CiphertextForRecipient`` (KMS Decrypt with
#: Recipient, for the header's encrypted data key and encryption context).
RecipientKms = Callable[[bytes, dict[str, Any]], Awaitable[bytes]]

#: Bundle bytes per frame: the frame limit less room for the CBOR map around the data.
CHUNK_BYTES = MAX_FRAME_BYTES - 64
#: Deltas read ahead of the one being sent at boot (each at most ``[deltas]
#: max_delta_bytes`` in memory).
BOOT_PREFETCH = 8


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
    deltas: Deltas | None = None,
    identity: bytes | None = None,
) -> PreloadResultMessage:
    """Run the parent side of the boot exchange for one enclave boot.

    Returns the enclave's successful ``preload_result``.

    ``events``, if given, is sent just before the KMS envelope: where the enclave subscribes to
    the gateway's events (``[enclave] gateway_url`` and ``node_id``), so that the image, and
    its PCR0, need not name the node.

    ``deltas``, if given, is the delta store: its deltas follow the base (module docstring);
    ``deltas.boot_streamed`` says how many were sent.

    ``identity``, if given, is the sealed identity file's bytes (``[identity] sealed_file``):
    sent after the bundle's envelope, and its data key released to a second attestation
    (module docstring).

    Error handling:
        :class:`PreloadRefused` if the enclave reports failure; ``ChannelProtocolError`` and
        transport errors if it breaks the exchange; whatever ``kms`` raises (for example an
        attestation the key policy refuses); :class:`~trio_sign.parent._deltas.DeltaStoreError`
        if the delta store cannot be listed or read.
    """
    hello = await channel.receive_expected(HelloMessage)
    if hello.channel != "preload":
        raise TrioSignError(f"boot channel opened with hello for {hello.channel!r}")
    with bundle.open("rb") as f:
        header, sha256 = await trio.to_thread.run_sync(read_sealed_header, f)
    sealed = None if identity is None else SealedIdentity.from_json(identity)
    attestation = await channel.receive_expected(AttestationMessage)
    envelope = await kms(attestation.document, header)
    if events is not None:
        await channel.send(events)
    await channel.send(RecipientCiphertextMessage(ciphertext=envelope))
    if sealed is not None:
        assert identity is not None
        await _serve_identity(channel, kms, sealed, identity)
    total = 0
    if deltas is not None:
        deltas.boot_streamed = 0
    try:
        with bundle.open("rb") as f:
            while data := await trio.to_thread.run_sync(f.read, chunk_bytes):
                await channel.send(BundleChunkMessage(data=data))
                total += len(data)
        sequences = () if deltas is None else (await deltas.listing()).sequences
        await channel.send(BundleEndMessage(total_bytes=total, deltas=len(sequences)))
        log.info("bundle sent", extra={"bytes": total, "sha256": sha256})
        if deltas is not None and sequences:
            await _send_deltas(channel, deltas, sequences, min(chunk_bytes, MAX_DELTA_CHUNK_BYTES))
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


async def _serve_identity(
    channel: MessageStream, kms: RecipientKms, sealed: SealedIdentity, data: bytes
) -> None:
    """Send the sealed identity file and answer the enclave's second attestation with KMS's
    envelope for the file's data key (module docstring)."""
    await channel.send(IdentityMessage(sealed=data))
    answer = await channel.receive()
    if isinstance(answer, PreloadResultMessage) and not answer.ok:
        raise PreloadRefused(
            f"enclave refused the delta identity key: {answer.reason}",
            reason=answer.reason or "unknown",
        )
    if not isinstance(answer, AttestationMessage):
        raise TrioSignError(
            f"expected the enclave's attestation for its identity key, got {answer.TYPE!r}"
        )
    envelope = await kms(answer.document, sealed.kms_header())
    await channel.send(RecipientCiphertextMessage(ciphertext=envelope))
    log.info("delta identity key sent", extra={"public_key": sealed.public_key.hex()})


#: Store the sealed identity file's bytes durably (``[identity] sealed_file``).
SealedStore = Callable[[bytes], Awaitable[None]]


async def serve_genesis(
    channel: MessageStream, kms: RecipientDataKey, store: SealedStore
) -> SealedIdentity:
    """Run the parent side of a genesis boot (module docstring) and return the sealed identity
    (public data) once ``store`` has written it durably and the enclave was told.

    Error handling:
        :class:`PreloadRefused` if the enclave reports failure; ``TrioSignError`` if it breaks
        the exchange or hands back a file for another key (``IdentityKeyError``,
        ``identity_sealed_bad``, for a malformed one); whatever ``kms`` (for example
        ``AccessDeniedException``) or ``store`` raise. Nothing is stored unless the whole
        exchange succeeded.
    """
    hello = await channel.receive_expected(HelloMessage)
    if hello.channel != "preload":
        raise TrioSignError(f"boot channel opened with hello for {hello.channel!r}")
    await channel.receive_expected(AttestationMessage)  # the bundle's: no bundle at genesis
    await channel.send(IdentityGenesisMessage())
    request = await _expect(channel, GenesisAttestationMessage)
    key_id, blob, envelope = await kms(request.document, identity_context(request.public_key))
    await channel.send(
        GenesisDataKeyMessage(key_id=key_id, ciphertext_blob=blob, ciphertext=envelope)
    )
    sealed_message = await _expect(channel, IdentitySealedMessage)
    sealed = SealedIdentity.from_json(sealed_message.sealed)
    if sealed.public_key != request.public_key or sealed.encrypted_data_key != blob:
        raise IdentityKeyError(
            "the enclave's sealed identity file is not for the key KMS sealed",
            reason="identity_sealed_bad",
        )
    await store(sealed.to_json())
    await channel.send(IdentityStoredMessage(public_key=sealed.public_key.hex()))
    log.info(
        "delta identity key created and its sealed file stored",
        extra={"public_key": sealed.public_key.hex(), "kms_key_id": sealed.kms_key_id},
    )
    return sealed


_T = TypeVar("_T", bound=ChannelMessage)


async def _expect(channel: MessageStream, kind: type[_T]) -> _T:
    """The next message, which must be a ``kind``; an enclave's failure report is raised."""
    message = await channel.receive()
    if isinstance(message, PreloadResultMessage) and not message.ok:
        raise PreloadRefused(
            f"enclave genesis failed: {message.reason}", reason=message.reason or "unknown"
        )
    if not isinstance(message, kind):
        raise TrioSignError(f"expected {kind.TYPE!r} from the enclave, got {message.TYPE!r}")
    return message


async def _send_deltas(
    channel: MessageStream,
    deltas: Deltas,
    sequences: tuple[int, ...],
    chunk_bytes: int,
    *,
    prefetch: int = BOOT_PREFETCH,
) -> None:
    """Every listed delta, in order: ``delta_push``, its chunks, ``delta_end``. Up to
    ``prefetch`` deltas are read ahead, concurrently (an S3 round trip each), while earlier ones
    are sent; at most that many are held in memory.

    Error handling: the first store failure (``DeltaStoreError``) ends the stream and is raised.
    """
    results: dict[int, bytes] = {}
    ready = {sequence: trio.Event() for sequence in sequences}
    window = trio.Semaphore(prefetch)  # released when a fetched delta has been sent

    async def fetch_all() -> None:
        async with trio.open_nursery() as fetches:
            for sequence in sequences:
                await window.acquire()
                fetches.start_soon(fetch_one, sequence)

    async def fetch_one(sequence: int) -> None:
        results[sequence] = await deltas.fetch(sequence)
        ready[sequence].set()

    sent_bytes = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_all)
            for sequence in sequences:
                await ready[sequence].wait()
                data = results.pop(sequence)
                for message in delta_frames(sequence, data, chunk_bytes):
                    await channel.send(message)
                window.release()
                deltas.boot_streamed = sequence
                sent_bytes += len(data)
    except BaseExceptionGroup as group:
        # The nursery wraps what ended it; callers handle the bare failure (a store error, or
        # the enclave hanging up on a refused delta). Cancellation stays in its group.
        failure = _first_failure(group)
        if failure is None:
            raise
        raise failure from None
    log.info("deltas sent", extra={"deltas": len(sequences), "bytes": sent_bytes})


def _first_failure(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    _cancelled, rest = group.split(trio.Cancelled)
    if rest is None:
        return None
    leaves: list[BaseException] = []
    pending: list[BaseException] = [rest]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    for kind in (DeltaStoreError, trio.BrokenResourceError, trio.ClosedResourceError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return None
