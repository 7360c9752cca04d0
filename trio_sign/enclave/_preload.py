"""Scheme A preload, the enclave's side: attested key release, then stream the sealed bundle.

The exchange on the boot channel (framing and messages: :mod:`trio_sign.nitro._channel`)::

    enclave                                   parent
    hello {channel: "preload"}          ->
    attestation {document}              ->    KMS Decrypt(CiphertextBlob = the bundle header's
                                              encrypted data key, Recipient = {document,
                                              RSAES_OAEP_SHA_256})
                                        <-    events {gateway_url, node_id}   (optional)
                                        <-    recipient_ciphertext {CiphertextForRecipient}
                                        <-    identity {sealed}     (optional: the delta
                                              identity key's sealed file, every boot)
    attestation {document}              ->    KMS Decrypt(CiphertextBlob = the sealed file's
                                              encrypted data key, Recipient = {document})
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

A compacted base (docs/compaction.md §5; its header has ``compacts``) is read with the identity
key unsealed before it (below): its data key is KMS's bound to the identity key
(:func:`~trio_sign.enclave._compact.open_compacted_key`; no ``identity``:
``identity_required``), its signer may be the identity key, and the chain continues where the
compacted one was (``DeltaChain.for_base``). The parent streams every stored delta; those the
base already contains (``delta_compacted``) are skipped, not the end of the chain.

The delta identity key (DESIGN §12, docs/runbook.md §7): the parent sends the sealed identity
file (``identity``) right after the bundle's envelope and before the bundle, so that a wrong
key fails the boot before any share is decrypted and the boot's deltas can be opened. The
enclave unseals it with :func:`~trio_sign.enclave._identity.unseal` (a second attestation
document with a fresh RSA key; KMS ``Decrypt`` with ``Recipient`` through the parent) and
checks it against ``[bundles] delta_identity_key``: a refusal fails the preload
(``identity_key_mismatch``, ``identity_sealed_bad``, ``identity_key_unpinned``,
``key_unwrap``) and nothing is served. A parent that sends no ``identity`` gets an enclave
without the key (deltas refused, no DKG), as it could withhold the deltas anyway.

Genesis (the parent was asked for it: ``trio-sign parent --genesis``): the parent answers the
first attestation with ``identity_genesis`` instead of the bundle's envelope::

    enclave                                   parent
    hello, attestation                  ->
                                        <-    identity_genesis {}
    genesis_attestation {document,      ->    KMS GenerateDataKey(Recipient = {document},
                         public_key}          EncryptionContext names public_key)
                                        <-    genesis_data_key {key_id, ciphertext_blob,
                                                                ciphertext}
    identity_sealed {sealed}            ->    written durably to [identity] sealed_file
                                        <-    identity_stored {public_key}

and the enclave exits 0 with reason ``genesis``: it loads no bundle and serves nothing (its
configuration cannot pin a key that did not exist when it was measured). Pin the public key
and boot again (docs/runbook.md §7).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

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
from ..nitro._channel import (
    DeltaPushMessage,
    GenesisAttestationMessage,
    GenesisDataKeyMessage,
    IdentityGenesisMessage,
    IdentityMessage,
    IdentitySealedMessage,
    IdentityStoredMessage,
)
from ..shares import BundleTrust, DataKeyProvider, SealedLoader, ShareStore
from ..shares._deltas import NO_DELTAS_HEX, DeltaChain, DeltaCheck, apply_delta
from ..shares._sealed import COMPACTS_FIELD
from ..shares._signature import KIND_DELTA
from ._compact import open_compacted_key
from ._deltas import receive_delta, refusal_reason
from ._exit import EnclaveExit, ExitCode
from ._identity import DeltaKeyWrap, IdentityKey, IdentityKeyError, SealedIdentity, genesis, unseal
from ._measured import DEVELOPMENT_CONFIG
from ._memory import MemoryLimitError
from ._preload_error import PreloadError as PreloadError

if TYPE_CHECKING:
    from ._config import EnclaveConfig

log = logging.getLogger("trio_sign.preload")


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
    #: The delta identity key the parent's ``identity`` unsealed, and its data-key wrap (the
    #: deltas' provider); the caller owns both and closes them. None: no ``identity``.
    identity_key: IdentityKey | None = field(default=None, repr=False)
    delta_wrap: DeltaKeyWrap | None = field(default=None, repr=False)


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
    identity_keys: Sequence[bytes] | None = None,
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
        identity_keys: the identity key an ``identity`` from the parent must unseal to
            (:func:`delta_signing_keys`: ``(pinned,)``; ``()`` refuses any,
            ``identity_key_unpinned``; None is development: any key, with a warning). The
            unsealed key replaces ``delta_provider`` and is returned in the report.

    Cancellation:
        Safe at every await (the caller's preload timeout lands here): the RSA key is closed,
        the data key and the partial store are zeroed.

    Error handling:
        :class:`PreloadError` with a stable ``reason``. A ``preload_result`` with ``ok=false``
        is sent to the parent on a best-effort basis before raising. A genesis boot ends
        with :class:`~trio_sign.enclave._exit.EnclaveExit` (code 0, reason ``genesis``) once
        the parent stored the sealed file.
    """
    started = time.monotonic()
    data_key = bytearray(32)
    loader: SealedLoader | None = None
    events: EventsConfigMessage | None = None
    identity: IdentityKey | None = None
    wrap: DeltaKeyWrap | None = None
    try:
        await channel.send(HelloMessage(channel="preload"))
        key = await trio.to_thread.run_sync(EphemeralRecipientKey.generate)
        try:
            document = await nsm.attestation(public_key=key.public_key_der)
            await channel.send(AttestationMessage(document=document))
            first = await channel.receive()
            if isinstance(first, IdentityGenesisMessage):
                await _genesis(channel, nsm)
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
        message = await channel.receive()
        if isinstance(message, IdentityMessage):
            identity = await _unseal_identity(channel, nsm, message, identity_keys)
            wrap = identity.delta_key_wrap()
            delta_provider = wrap
            message = await channel.receive()

        def unwrap(header: dict[str, Any]) -> bytearray:
            if memory_check is not None:
                memory_check(int(header["accounts"]))
            if COMPACTS_FIELD in header:
                # A compacted base's key is bound to the identity key (docs/compaction.md
                # §1a), which was unsealed above, before any share is decrypted.
                if wrap is None:
                    raise PreloadError(
                        "the base is a compacted one, which only the delta identity key "
                        "opens, and the parent sent no identity ([identity] sealed_file)",
                        reason="identity_required",
                    )
                return open_compacted_key(header, data_key, wrap)  # the loader zeroes it
            return bytearray(data_key)  # the loader zeroes its copy

        # A compacted base is signed by the identity key this boot unsealed (checked against
        # the pin), accepted only with ``compacts`` in its header (docs/compaction.md §1).
        compaction_keys = () if identity is None else (identity.public_key,)
        loader = SealedLoader(
            unwrap=unwrap,
            verify=verify,  # type: ignore[arg-type]
            progress=progress,
            trust=BundleTrust.pinned(signing_keys, compaction_keys=compaction_keys),
        )
        received = 0
        announced = 0
        while True:
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
            message = await channel.receive()
        store = loader.finish()
        header = loader.header
        loader = None
        try:
            assert store.fingerprint is not None
            assert header is not None
            # On a compacted base the chain continues where the compacted one was (§2).
            chain = DeltaChain.for_base(header, store.fingerprint)
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
        if wrap is not None:
            wrap.close()
        if identity is not None:
            identity.close()
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
        identity_key=identity,
        delta_wrap=wrap,
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
        if wrap is not None:
            wrap.close()
        if identity is not None:
            identity.close()
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
            "identity_key": None if identity is None else identity.public_key.hex(),
        },
    )
    return store, report


async def _unseal_identity(
    channel: MessageStream,
    nsm: AsyncNsm,
    message: IdentityMessage,
    identity_keys: Sequence[bytes] | None,
) -> IdentityKey:
    """Unseal the parent's sealed identity file through a second attested KMS answer and
    check it against the pin (module docstring)."""
    sealed = SealedIdentity.from_json(message.sealed)
    if identity_keys is not None and not identity_keys:
        raise IdentityKeyError(
            "the parent sent a delta identity key, but enclave.toml pins none "
            "([bundles] delta_identity_key)",
            reason="identity_key_unpinned",
        )
    pinned = None if identity_keys is None else identity_keys[0]

    async def kms(document: bytes, header: dict[str, Any]) -> bytes:
        del header  # the parent holds the file: it reads the header there
        await channel.send(AttestationMessage(document=document))
        answer = await channel.receive_expected(RecipientCiphertextMessage)
        return answer.ciphertext

    return await unseal(nsm, kms, sealed, pinned=pinned)


async def _genesis(channel: MessageStream, nsm: AsyncNsm) -> NoReturn:
    """A genesis boot (module docstring): create the identity key, hand the parent its sealed
    file, wait until it is stored, and end the boot (``EnclaveExit``, code 0)."""

    async def kms(document: bytes, context: Mapping[str, str]) -> tuple[str, bytes, bytes]:
        public_key = bytes.fromhex(context["public_key"])
        await channel.send(GenesisAttestationMessage(document=document, public_key=public_key))
        answer = await channel.receive_expected(GenesisDataKeyMessage)
        return answer.key_id, answer.ciphertext_blob, answer.ciphertext

    key, sealed = await genesis(nsm, kms)
    with key:
        await channel.send(IdentitySealedMessage(sealed=sealed.to_json()))
        stored = await channel.receive_expected(IdentityStoredMessage)
        if stored.public_key != key.public_key.hex():
            raise PreloadError(
                f"the parent stored identity key {stored.public_key}, not {key.public_key.hex()}",
                reason="protocol",
            )
    log.info(
        "genesis complete: the sealed delta identity key is stored; pin it in enclave.toml "
        "([bundles] delta_identity_key) and boot again",
        extra={"public_key": sealed.public_key.hex()},
    )
    raise EnclaveExit(
        f"genesis complete: delta identity key {sealed.public_key.hex()}",
        code=ExitCode.OK,
        reason="genesis",
    )


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
                if isinstance(exc, ShareFileError) and exc.reason == "delta_compacted":
                    # Already in the compacted base (the parent's store still holds the
                    # deltas it contains, docs/compaction.md §2, §5): skipped, not the end.
                    log.info(
                        "boot delta already in the compacted base; skipped",
                        extra={"sequence": message.sequence},
                    )
                else:
                    refused = refusal_reason(exc)
                    log.error(
                        "boot delta refused; the deltas after it are not loaded",
                        extra={
                            "sequence": message.sequence,
                            "reason": refused,
                            "error": str(exc),
                        },
                    )
        await trio.lowlevel.checkpoint()  # stay responsive: status and logs run too


def _as_preload_error(exc: BaseException) -> PreloadError | None:
    """Map what preload can raise onto one error with a stable reason (None: not ours)."""
    if isinstance(exc, EnclaveExit):
        return None  # a genesis boot's end: not a failure
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
