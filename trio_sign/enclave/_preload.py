"""Scheme A preload, the enclave's side: attested key release, then stream the sealed bundle.

The exchange on the boot channel (framing and messages: :mod:`trio_sign.nitro._channel`)::

    enclave                                   parent
    hello {channel: "preload"}          ->
    attestation {document}              ->    KMS Decrypt(CiphertextBlob = the bundle header's
                                              encrypted data key, Recipient = {document,
                                              RSAES_OAEP_SHA_256})
                                        <-    events {gateway_url, node_id}   (optional)
                                        <-    recipient_ciphertext {CiphertextForRecipient}
                                        <-    bundle_chunk {data} ... (the sealed file's bytes)
                                        <-    bundle_end {total_bytes}
    preload_result {ok, accounts, ...}  ->

The attestation document carries a fresh RSA-2048 public key; only this process can open the
CMS envelope KMS returns, so the parent never sees the data key. The parent is untrusted: a
wrong data key, a swapped or truncated bundle or a changed header all fail authentication in
the sealed format, and a bad envelope fails here. The data key, the RSA key and every
decrypted chunk are dropped or zeroed before this function returns, whatever happens.

Authentication is not authorship: anyone can encrypt to the RSA key in the attestation
document, so a hostile parent can skip KMS, wrap a data key of its own and stream a bundle it
sealed itself, and it would decrypt. What stops it is the bundle's signature (DESIGN §12,
:mod:`trio_sign.shares._signature`): the bundle must be signed by one of the keys pinned in the
measured configuration (``[bundles] signing_keys``), which the parent does not hold. The
signature record follows the FINAL chunk; it is checked when the bundle ends, before the
store leaves the loader, and a refusal zeroes everything decrypted. Reasons:
``bundle_unsigned``, ``bundle_signer_unknown``, ``bundle_signature_invalid``, ``bundle_kind``.
An older bundle signed by a pinned key still loads here: rollback is stopped by the gateway,
which pins each shard's fingerprint (DESIGN §10, §12).

Deltas (docs/key-lifecycle.md §1, §4): ``bundle_end {deltas: N}`` announces N stored deltas,
which follow on the same channel, each as ``delta_push {sequence, total_bytes}``, its
``delta_chunk`` frames and ``delta_end``. Each is verified (the identity key's signature, the
chain on the base, every record) and applied, all of it or nothing, before the next one and
before anything is served; ``preload_result`` then says how many were loaded (``deltas``) and
the head (``deltas_head``). A delta that is refused (``delta_chain``, a bad signature, no
identity key to open it, ...) stops the chain there: it and the deltas after it (which could
only chain on it) are read and dropped, the refusal is logged, and the node serves the deltas
before it (a parent can always withhold deltas; the head in GetStatus and the attestation shows
what was loaded, and the deltas channel pushes the rest again). A broken frame sequence fails
the preload (``protocol``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .._errors import KeyWrapError, ShareFileError, TrioSignError
from ..crypto import _sodium
from ..nitro import (
    AsyncNsm,
    AttestationMessage,
    BundleChunkMessage,
    BundleEndMessage,
    ChannelMessage,
    ChannelProtocolError,
    CmsError,
    EphemeralRecipientKey,
    EventsConfigMessage,
    HelloMessage,
    MessageStream,
    PreloadResultMessage,
    RecipientCiphertextMessage,
)
from ..nitro._channel import DeltaPushMessage
from ..shares import BundleTrust, DataKeyProvider, SealedLoader, ShareStore
from ..shares._deltas import NO_DELTAS_HEX, DeltaChain, DeltaCheck, apply_delta
from ..shares._signature import KIND_DELTA
from ._deltas import receive_delta, refusal_reason
from ._measured import DEVELOPMENT_CONFIG
from ._memory import MemoryLimitError

if TYPE_CHECKING:
    from ._config import EnclaveConfig

log = logging.getLogger("trio_sign.preload")


class PreloadError(TrioSignError):
    """Preload failed; nothing will be served.

    Attributes:
        reason: a stable code for the status channel: the underlying ``ShareFileError`` reason
            (``tampered``, ``truncated``, ``duplicate_account``, ...; for the signature
            ``bundle_unsigned``, ``bundle_signer_unknown``, ``bundle_signature_invalid``,
            ``bundle_kind``, ``bad_signature_record``), ``key_unwrap`` (the CMS envelope or the
            data key was refused), ``memory`` (the bundle does not fit), ``protocol`` (the
            parent broke the boot exchange) or ``timeout``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PreloadReport:
    accounts: int
    sha256: str
    preload_ms: int
    bundle_bytes: int
    attestation_document: bytes = field(repr=False)
    #: Where the parent says the gateway's events are (None: it did not say).
    events: EventsConfigMessage | None = None
    #: The Ed25519 public key that signed the bundle (None: unsigned, development only).
    signer: bytes | None = None
    #: Deltas loaded after the base, and the head (hex; 64 zeros for none).
    deltas: int = 0
    deltas_head: str = NO_DELTAS_HEX
    #: The chain as loaded (the deltas channel continues it); None only if the base failed.
    chain: DeltaChain | None = field(default=None, repr=False)
    #: Deltas the parent announced (a refusal leaves ``deltas`` below it).
    deltas_announced: int = 0


#: Called with the header's account count before the store is allocated; raises to refuse.
MemoryCheck = Callable[[int], None]

_DEVELOPMENT_CONFIG_SHA256 = hashlib.sha256(DEVELOPMENT_CONFIG).digest()


def bundle_signing_keys(config: EnclaveConfig) -> tuple[bytes, ...] | None:
    """The keys a base bundle must be signed by for ``config``, or None (development).

    The pinned ``[bundles] signing_keys`` of the measured configuration when it has any. A
    configuration that pins none is development only where the NSM is the local stand-in
    (whose attestations no real KMS accepts) or it is the built-in development
    configuration: there an unsigned bundle loads, with a warning. On the Nitro NSM device a
    configuration without keys accepts no bundle at all (``()``): production never falls
    back to unsigned.
    """
    measured = config.measured
    if measured.signing_keys:
        return tuple(measured.signing_keys)
    development = measured.development or measured.sha256 == _DEVELOPMENT_CONFIG_SHA256
    if development or config.nsm != "device":
        return None
    return ()


def delta_signing_keys(config: EnclaveConfig) -> tuple[bytes, ...] | None:
    """The keys a delta must be signed by: the pinned ``[bundles] delta_identity_key``; as
    for the base (:func:`bundle_signing_keys`), None (development) where no key is pinned and
    the configuration is a development one or the NSM the local stand-in, else ``()``."""
    measured = config.measured
    if measured.delta_identity_key is not None:
        return (measured.delta_identity_key,)
    development = measured.development or measured.sha256 == _DEVELOPMENT_CONFIG_SHA256
    if development or config.nsm != "device":
        return None
    return ()


async def preload_shares(
    channel: MessageStream,
    nsm: AsyncNsm,
    *,
    verify: str = "lazy",
    memory_check: MemoryCheck | None = None,
    progress: Callable[[int, int], None] | None = None,
    signing_keys: Sequence[bytes] | None = None,
    delta_provider: DataKeyProvider | None = None,
    delta_keys: Sequence[bytes] | None = None,
    delta_check: DeltaCheck | None = None,
) -> tuple[ShareStore, PreloadReport]:
    """Run the enclave side of the boot exchange and return the loaded store.

    Args:
        signing_keys: the Ed25519 public keys a base bundle must be signed by (the measured
            configuration's ``[bundles] signing_keys``: :func:`bundle_signing_keys`); None is
            development: an unsigned bundle is accepted with a warning (a signed one must
            still verify). The signature is checked when the bundle ends, before the store
            is returned; a refusal zeroes everything decrypted.
        delta_provider: the identity key's data-key wrap, which opens the deltas that follow
            the base (None: no identity key; announced deltas are refused, module docstring).
        delta_keys: the keys a delta must be signed by (``[bundles] delta_identity_key``);
            None is development.
        delta_check: called with each verified delta's records before it is applied; raises
            to refuse it (the serving enclave's policy check).

    Cancellation:
        Safe at every await (the caller's preload timeout lands here): the RSA key is closed,
        the data key and the partial store are zeroed.

    Error handling:
        :class:`PreloadError` with a stable ``reason``. A ``preload_result`` with ``ok=false``
        is sent to the parent on a best-effort basis before raising.
    """
    started = time.monotonic()
    data_key = bytearray(32)
    loader: SealedLoader | None = None
    events: EventsConfigMessage | None = None
    try:
        await channel.send(HelloMessage(channel="preload"))
        key = await trio.to_thread.run_sync(EphemeralRecipientKey.generate)
        try:
            document = await nsm.attestation(public_key=key.public_key_der)
            await channel.send(AttestationMessage(document=document))
            first = await channel.receive()
            if isinstance(first, EventsConfigMessage):
                events = first
                envelope = await channel.receive_expected(RecipientCiphertextMessage)
            elif isinstance(first, RecipientCiphertextMessage):
                envelope = first
            else:
                raise ChannelProtocolError(
                    "expected a RecipientCiphertextMessage (or EventsConfigMessage) message, "
                    f"got {type(first).__name__}",
                    reason="unexpected_message",
                )
            unwrapped = key.decrypt_recipient_ciphertext(envelope.ciphertext)
        finally:
            key.close()
        try:
            if len(unwrapped) != 32:
                raise PreloadError(
                    f"the KMS envelope holds {len(unwrapped)} bytes, not a 32-byte data key",
                    reason="key_unwrap",
                )
            data_key[:] = unwrapped
        finally:
            _sodium.memzero(unwrapped)

        def unwrap(header: dict[str, Any]) -> bytearray:
            if memory_check is not None:
                memory_check(int(header["accounts"]))
            return bytearray(data_key)  # the loader zeroes its copy

        loader = SealedLoader(
            unwrap=unwrap,
            verify=verify,  # type: ignore[arg-type]
            progress=progress,
            trust=BundleTrust.pinned(signing_keys),
        )
        received = 0
        announced = 0
        while True:
            message = await channel.receive()
            if isinstance(message, BundleChunkMessage):
                loader.feed(message.data)
                received += len(message.data)
                await trio.lowlevel.checkpoint()  # stay responsive: status and logs run too
            elif isinstance(message, BundleEndMessage):
                if message.total_bytes != received:
                    raise PreloadError(
                        f"parent says it sent {message.total_bytes} bundle bytes, "
                        f"{received} arrived",
                        reason="truncated",
                    )
                announced = message.deltas
                break
            else:
                raise PreloadError(
                    f"unexpected {type(message).__name__} during the bundle stream",
                    reason="protocol",
                )
        store = loader.finish()
        loader = None
        try:
            assert store.fingerprint is not None
            chain = DeltaChain(store.fingerprint)
            await _load_boot_deltas(
                channel,
                store,
                chain,
                announced,
                provider=delta_provider,
                trust=BundleTrust.pinned(delta_keys, kind=KIND_DELTA),
                verify=verify,
                check=delta_check,
            )
        except BaseException:
            store.close()
            raise
    except BaseException as exc:
        if loader is not None:
            loader.abort()
        error = _as_preload_error(exc)
        if error is not None:
            with (
                trio.move_on_after(1.0, shield=True),
                contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, TrioSignError
                ),
            ):
                await channel.send(PreloadResultMessage(ok=False, reason=error.reason))
            raise error from (None if error is exc else exc)
        raise
    finally:
        _sodium.memzero(data_key)

    assert store.fingerprint is not None
    report = PreloadReport(
        accounts=store.accounts,
        sha256=store.fingerprint,
        preload_ms=round((time.monotonic() - started) * 1000),
        bundle_bytes=received,
        attestation_document=document,
        events=events,
        signer=store.signer,
        deltas=chain.count,
        deltas_head=chain.head,
        chain=chain,
        deltas_announced=announced,
    )
    try:
        await channel.send(
            PreloadResultMessage(
                ok=True,
                accounts=report.accounts,
                sha256=report.sha256,
                preload_ms=report.preload_ms,
                deltas=report.deltas,
                deltas_head=report.deltas_head,
            )
        )
    except BaseException:
        store.close()
        raise
    log.info(
        "preload complete",
        extra={
            "accounts": report.accounts,
            "sha256": report.sha256,
            "preload_ms": report.preload_ms,
            "bundle_bytes": report.bundle_bytes,
            "signer": "unsigned" if report.signer is None else report.signer.hex(),
            "deltas": report.deltas,
            "deltas_head": report.deltas_head,
        },
    )
    return store, report


async def _load_boot_deltas(
    channel: MessageStream,
    store: ShareStore,
    chain: DeltaChain,
    announced: int,
    *,
    provider: DataKeyProvider | None,
    trust: BundleTrust,
    verify: str,
    check: DeltaCheck | None,
) -> None:
    """Read the ``announced`` deltas after the base and apply each in order (module
    docstring); the first refusal stops the chain, the rest are read and dropped."""
    refused: str | None = None
    for position in range(1, announced + 1):
        message: ChannelMessage = await channel.receive()
        if not isinstance(message, DeltaPushMessage):
            raise PreloadError(
                f"expected delta {position} of {announced} (delta_push), got {message.TYPE!r}",
                reason="protocol",
            )
        data = await receive_delta(channel, message)
        if refused is not None:
            continue
        if provider is None:
            refused = "delta_no_identity"
            log.error(
                "the parent sent %d deltas, but this enclave holds no delta identity key "
                "([bundles] delta_identity_key): none is loaded",
                announced,
                extra={"reason": refused},
            )
        else:
            try:
                apply_delta(
                    store,
                    chain,
                    data,
                    provider=provider,
                    trust=trust,
                    verify="full" if verify == "full" else "lazy",
                    check=check,
                )
            except (ShareFileError, KeyWrapError) as exc:
                refused = refusal_reason(exc)
                log.error(
                    "boot delta refused; the deltas after it are not loaded",
                    extra={"sequence": message.sequence, "reason": refused, "error": str(exc)},
                )
        await trio.lowlevel.checkpoint()  # stay responsive: status and logs run too


def _as_preload_error(exc: BaseException) -> PreloadError | None:
    """Map what preload can raise onto one error with a stable reason (None: not ours)."""
    if isinstance(exc, PreloadError):
        return exc
    if isinstance(exc, ShareFileError):
        return PreloadError(f"sealed bundle refused: {exc}", reason=exc.reason)
    if isinstance(exc, (CmsError, KeyWrapError)):
        return PreloadError(f"data key refused: {exc}", reason="key_unwrap")
    if isinstance(exc, ChannelProtocolError):
        return PreloadError(f"boot channel: {exc}", reason="protocol")
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        return PreloadError("the parent closed the boot channel", reason="protocol")
    if isinstance(exc, MemoryLimitError):
        return PreloadError(str(exc), reason="memory")
    if isinstance(exc, TrioSignError) and hasattr(exc, "reason"):
        return PreloadError(str(exc), reason=str(exc.reason))
    return None
