"""Compaction and re-encryption inside the enclave (docs/compaction.md; issue 16, DESIGN §13).

An authorized ``Compact`` makes the enclave write a **new base**: every account it holds (the
base and every delta loaded on it), sealed under a fresh data key from KMS ``GenerateDataKey``
with ``Recipient`` = a fresh attestation of this enclave (the parent relays; KMS encrypts the
data key to the attestation's RSA key, so the parent never sees it) under a KMS key that the
measured configuration lists in ``[bundles] compaction_kms_keys``, signed by the delta identity
key, with a header that records what it compacts::

    "compacts": {"base": <hex: the base this node loaded>,
                 "head": <hex: the previous of delta deltas + 1>,
                 "deltas": <deltas loaded on it>}

so the delta chain continues across it (:class:`~trio_sign.shares._deltas.DeltaChain`
``compacts=``).

**The data key is bound to the identity key.** KMS's answer reaches the enclave through the
parent, and ``CiphertextForRecipient`` is encrypted to the RSA key in the attestation
document, which anyone can read: a hostile parent could answer with a data key of its own,
encrypted to that RSA key, and read every share of the base it is then asked to store. So the
base is not sealed under the KMS data key itself but under::

    K = HKDF-SHA256(ikm = K_kms ‖ B, info = "trio-sign/compacted-base/v1" ‖ SHA-256(blob))
    B = HKDF-SHA256(ikm = identity KEK, info = "trio-sign/compacted-base-binding/v1")

(:func:`bind_data_key`; the identity KEK is the delta KEK of docs/key-lifecycle.md §2), so
reading it takes both the KMS key's release to an attested enclave **and** the pinned identity
key, which exists only inside enclaves. Every base with ``compacts`` is read this way
(:func:`open_compacted_key`, for the boot).

The new base goes to the parent over the deltas channel::

    enclave                                        parent
    compaction_key_request {document, kms_key_id} ->   KMS GenerateDataKey, Recipient
                                             <-    compaction_key {key_id, ciphertext_blob,
                                                   ciphertext} | compaction_key_failed {reason}
    base_store {sha256, total_bytes}         ->
    delta_chunk {data} ... delta_end {}      ->    put-if-absent base-<sha256>.enc, fsync
                                             <-    base_stored {sha256, object}
                                                   | base_store_failed {sha256, reason}

and :meth:`Compactor.compact` returns only after ``base_stored``: a fingerprint the caller is
given is durable.

The replies share the connection with the delta replies and pushes that
:meth:`~trio_sign.enclave._deltas.DeltaWriter.converse` reads, so :meth:`Compactor.converse`
runs the writer's loop over a stream that hands the compaction replies to the compactor and
everything else to the writer; frames are written under the writer's send lock (a base's
chunks never interleave with a delta's).

Consistency: sealing reads the store in slices (a checkpoint every
:data:`RECORDS_PER_SLICE` accounts, so signing goes on) and starts over if a delta was
applied meanwhile (at most ``attempts`` times, then ``busy``); the writer's store lock is held
throughout, so this enclave stores no delta of its own meanwhile. Every record passes the
store's point checks before it is sealed, and the sealed base is loaded back (framing,
authentication, every record's structure, the identity signature, the count) before it is
sent: a base that would not load is never stored.

Secrets: the data key is opened inside the enclave and zeroed when the base is sealed; each
record's signing share is copied into a buffer zeroed right after it is packed. Logs carry
counts, fingerprints and key ARNs, never key material.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

from .._errors import KeyWrapError, ShareFileError, TrioSignError
from ..authz import COMPACT_POLICY
from ..crypto import _kdf, _sodium
from ..nitro import AsyncNsm, ChannelMessage, CmsError, EphemeralRecipientKey, MessageStream
from ..nitro._channel import (
    BaseStoredMessage,
    BaseStoreFailedMessage,
    BaseStoreMessage,
    CompactionKeyFailedMessage,
    CompactionKeyMessage,
    CompactionKeyRequestMessage,
    chunked_frames,
)
from ..shares import BundleSigner, BundleTrust, ShareRecord, ShareStore
from ..shares._deltas import DeltaChain
from ..shares._sealed import (
    DEFAULT_CHUNK_SIZE,
    SEALED_FORMAT,
    ChunkPlanner,
    SealedEncoder,
    build_header,
    encryption_context_for,
    record_format_for,
)
from ..shares._signature import sign_bundle_digest
from ..shares._store import SealedLoader
from ._deltas import DeltaWriter
from ._identity import DeltaKeyWrap

log = logging.getLogger("trio_sign.enclave.compact")

#: The reserved policy that authorizes a compaction (docs/compaction.md).
#: The key provider a compacted base records (the KMS provider of a ceremony's base).
KMS_PROVIDER: Final = "aws-kms"
#: The KMS encryption context of a compacted base's data key (a ceremony's default).
COMPACTION_CONTEXT: Final = {"format": SEALED_FORMAT}
#: HKDF info of the identity binding and of a compacted base's data key (module docstring).
BINDING_INFO: Final = b"trio-sign/compacted-base-binding/v1"
BASE_KEY_INFO: Final = b"trio-sign/compacted-base/v1"
#: Accounts sealed between two checkpoints.
RECORDS_PER_SLICE: Final = 2048
#: How often sealing starts over after a delta arrived mid-way before giving up (``busy``).
DEFAULT_ATTEMPTS: Final = 3
#: How long a compaction waits for the parent's KMS answer and for ``base_stored``.
DEFAULT_COMPACT_TIMEOUT_S: Final = 300.0


def bind_data_key(kms_key: bytes | bytearray, wrap: DeltaKeyWrap, blob: bytes) -> bytearray:
    """The data key a compacted base is sealed under, from the KMS data key ``kms_key``, the
    identity key's ``wrap`` and the KMS ``blob`` (module docstring). The caller zeroes it.

    Error handling: ``KeyWrapError`` if ``wrap`` is closed or ``kms_key`` is not 32 bytes.
    """
    wrap._check_open()
    if len(kms_key) != 32:
        raise KeyWrapError("a KMS data key is 32 bytes")
    binding = bytearray(32)
    ikm = bytearray(64)
    out = bytearray(32)
    try:
        _kdf.hkdf_sha256_into(binding, wrap._kek, info=BINDING_INFO)
        ikm[:32] = kms_key
        ikm[32:] = binding
        _kdf.hkdf_sha256_into(out, ikm, info=BASE_KEY_INFO + hashlib.sha256(blob).digest())
    finally:
        _sodium.memzero(binding)
        _sodium.memzero(ikm)
    return out


def open_compacted_key(
    header: Mapping[str, Any], kms_key: bytes | bytearray, wrap: DeltaKeyWrap
) -> bytearray:
    """At boot: the data key of a base whose header has ``compacts`` (KMS released
    ``kms_key`` to this enclave; ``wrap`` is the unsealed identity key's). The caller zeroes it.

    Error handling: ``KeyWrapError``.
    """
    import base64

    if "compacts" not in header:
        raise KeyWrapError("not a compacted base: its data key is KMS's own")
    blob = base64.b64decode(header["encrypted_data_key"], validate=True)
    return bind_data_key(kms_key, wrap, blob)


class CompactionError(TrioSignError):
    """A compaction did not produce a stored base; nothing was changed.

    ``reason``: ``kms_key_not_allowed`` (not in ``[bundles] compaction_kms_keys``),
    ``no_identity`` (no delta identity key: nothing could sign the base), ``kms_refused``
    (the parent or KMS gave no data key), ``key_unwrap`` (the KMS envelope did not open),
    ``busy`` (deltas kept arriving while sealing), ``store_failed``, ``timeout``,
    ``disconnected`` (no deltas connection, or it ended before the answer), ``protocol``
    (the parent acknowledged other bytes), ``in_progress`` (another compaction runs), or
    ``bad_base`` (the sealed base did not load back; a bug).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CompactedBase:
    """A sealed, signed compacted base (public data: ciphertext and header facts)."""

    data: bytes
    fingerprint: str
    accounts: int
    compacts: Mapping[str, Any]
    kms_key_id: str

    def __repr__(self) -> str:
        return (
            f"CompactedBase(accounts={self.accounts}, deltas={self.compacts['deltas']}, "
            f"fingerprint={self.fingerprint}, kms_key_id={self.kms_key_id!r}, "
            f"bytes={len(self.data)})"
        )


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What ``Compact`` answers: the new base's fingerprint, accounts, the deltas it holds,
    and where the parent stored it."""

    sha256: str
    accounts: int
    deltas: int
    object: str


class _Snapshot:
    """The chain position a seal started from; :meth:`changed` once a delta was applied."""

    def __init__(self, chain: DeltaChain) -> None:
        self.chain = chain
        self.count = chain.count
        self.head = chain.head

    def changed(self) -> bool:
        return self.chain.count != self.count or self.chain.head != self.head


def compacts_of(chain: DeltaChain) -> dict[str, Any]:
    """The ``compacts`` header field for a node at ``chain``'s position."""
    return {"base": chain.base_fingerprint, "head": chain.next_previous, "deltas": chain.count}


def _record(store: ShareStore, account_id: str) -> ShareRecord:
    """The account as a record (its signing share copied: the caller zeroes it). Runs the
    store's point checks on an unverified slot (``ShareFileError``)."""
    share = store[account_id]
    return ShareRecord(
        account_id=share.account_id,
        identifier=share.identifier,
        signing_share=bytearray(share.signing_share),
        verifying_share=share.verifying_share,
        group_public_key=share.group_public_key,
        min_signers=share.min_signers,
        max_signers=share.max_signers,
        policy=share.policy,
        ciphersuite=share.ciphersuite,
    )


def _plan(store: ShareStore, account_ids: list[str], chunk_size: int) -> tuple[str, ChunkPlanner]:
    """Pass 1 (public fields only): the record layout and the chunk plan."""
    suites = store.ciphersuites()
    policies = any(p != "default" for p in store.policies())
    record_format = record_format_for([s for s, n in suites.items() if n], policies)
    planner = ChunkPlanner(chunk_size)
    for account_id in account_ids:
        share = store[account_id]
        sized = ShareRecord(
            account_id=account_id,
            identifier=share.identifier,
            signing_share=bytearray(32),  # the size only: no secret is read here
            verifying_share=share.verifying_share,
            group_public_key=share.group_public_key,
            min_signers=share.min_signers,
            max_signers=share.max_signers,
            policy=share.policy,
            ciphersuite=share.ciphersuite,
        )
        planner.add(sized.binary_size(record_format))
    return record_format, planner


async def seal_compacted(
    store: ShareStore,
    chain: DeltaChain,
    *,
    data_key: bytearray,
    kms_key_id: str,
    encrypted_data_key: bytes,
    signer: BundleSigner,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    attempts: int = DEFAULT_ATTEMPTS,
) -> CompactedBase:
    """Seal every account of ``store`` into a base on ``chain``'s position, signed by
    ``signer``, its data key ``data_key`` (only read here) wrapped by KMS as
    ``encrypted_data_key`` under ``kms_key_id``.

    Cancellation: safe; nothing is kept (the partial ciphertext is dropped).

    Error handling: :class:`CompactionError` ``busy`` (deltas kept arriving), ``bad_base``;
    ``ShareFileError`` if a record fails the store's point checks.
    """
    for _ in range(attempts):
        snapshot = _Snapshot(chain)
        account_ids = list(store._index)
        record_format, planner = _plan(store, account_ids, chunk_size)
        suites = {s: n for s, n in store.ciphersuites().items() if n}
        compacts = compacts_of(chain)
        header = build_header(
            provider=_KmsKey(kms_key_id),
            encrypted_data_key=encrypted_data_key,
            encryption_context=encryption_context_for(COMPACTION_CONTEXT),
            chunk_size=chunk_size,
            accounts=planner.records,
            chunks=planner.chunks,
            record_format=record_format,
            ciphersuites=suites,
            ciphersuite=next(iter(suites)) if suites else "FROST-ED25519-SHA512-v1",
            compacts=compacts,
        )
        body = await _encode(store, account_ids, header, data_key, snapshot)
        if body is None:
            log.info("a delta arrived while sealing the compacted base; starting over")
            continue
        digest = hashlib.sha256(body).digest()
        data = body + sign_bundle_digest(signer, digest).encode()
        return CompactedBase(data, digest.hex(), len(account_ids), compacts, kms_key_id)
    raise CompactionError(
        f"deltas kept arriving while sealing ({attempts} attempts); retry the compaction",
        reason="busy",
    )


async def _encode(
    store: ShareStore,
    account_ids: list[str],
    header: dict[str, Any],
    data_key: bytearray,
    snapshot: _Snapshot,
) -> bytes | None:
    """Pass 2: the sealed body, or None if a delta was applied meanwhile."""
    encoder = SealedEncoder(header, data_key)
    try:
        parts = [encoder.start()]
        for n, account_id in enumerate(account_ids, 1):
            rec = _record(store, account_id)
            try:
                parts.append(encoder.add_record(rec))
            finally:
                rec.zero()
            if n % RECORDS_PER_SLICE == 0:
                await trio.lowlevel.checkpoint()
                if snapshot.changed():
                    return None
        parts.append(encoder.finish())
    finally:
        encoder.close()
    if snapshot.changed():
        return None
    return b"".join(parts)


class _KmsKey:
    """The header's provider fields of a KMS-sealed base; it wraps nothing (the data key
    came from KMS through the parent, already wrapped)."""

    provider = KMS_PROVIDER

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id

    def names_key(self, key_id: str) -> bool:
        return key_id == self.key_id

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytearray, bytes]:
        raise KeyWrapError("a compacted base's data key comes from KMS through the parent")

    def decrypt_data_key(self, blob: bytes, context: Mapping[str, str]) -> bytearray:
        raise KeyWrapError("a compacted base's data key is opened by KMS for an attestation")


def check_loads(base: CompactedBase, data_key: bytearray, *, identity: bytes) -> None:
    """Load ``base`` back (every chunk, every record's structure, the signature by
    ``identity`` as a compacted base, the count): ``bad_base`` unless it loads."""
    loader = SealedLoader(
        unwrap=lambda header: bytearray(data_key),
        verify="lazy",
        total_bytes=len(base.data),
        trust=BundleTrust.pinned((), compaction_keys=(identity,)),
    )
    try:
        loader.feed(base.data)
        loaded = loader.finish()
    except (ShareFileError, KeyWrapError) as exc:
        loader.abort()
        raise CompactionError(
            f"the compacted base does not load back: {exc}", reason="bad_base"
        ) from exc
    try:
        if len(loaded) != base.accounts or loaded.fingerprint != base.fingerprint:
            raise CompactionError(
                "the compacted base loads back different accounts", reason="bad_base"
            )
    finally:
        loaded.close()


# -- the enclave's end of the exchange ---------------------------------------------------------

_Reply = (
    CompactionKeyMessage | CompactionKeyFailedMessage | BaseStoredMessage | BaseStoreFailedMessage
)
_REPLIES: Final = (
    CompactionKeyMessage,
    CompactionKeyFailedMessage,
    BaseStoredMessage,
    BaseStoreFailedMessage,
)


class _Intercepting(MessageStream):
    """The deltas connection as the writer sees it: compaction replies go to ``deliver``."""

    def __init__(self, inner: MessageStream, deliver: Callable[[_Reply], None]) -> None:
        # Not MessageStream.__init__: every call is delegated to ``inner``.
        self.stream = inner.stream
        self._inner = inner
        self._deliver = deliver

    async def send(self, message: ChannelMessage) -> None:
        await self._inner.send(message)

    async def receive(self) -> ChannelMessage:
        while True:
            message = await self._inner.receive()
            if isinstance(message, _REPLIES):
                self._deliver(message)
                continue
            return message

    async def aclose(self) -> None:
        await self._inner.aclose()


class Compactor:
    """Runs ``Compact`` for one enclave (docs/compaction.md).

    Args:
        writer: the node's :class:`DeltaWriter` (its deltas, identity key, connection and
            locks).
        nsm: makes the attestation KMS encrypts the data key to.
        allowed_kms_keys: ``[bundles] compaction_kms_keys`` (the measured configuration).
        timeout_s: how long each exchange with the parent may take (the KMS answer; the
            durable store).

    Run the deltas connection with :meth:`converse` instead of ``writer.converse``.
    """

    def __init__(
        self,
        writer: DeltaWriter,
        *,
        nsm: AsyncNsm,
        allowed_kms_keys: tuple[str, ...],
        timeout_s: float = DEFAULT_COMPACT_TIMEOUT_S,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.writer = writer
        self.nsm = nsm
        self.allowed_kms_keys = tuple(allowed_kms_keys)
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size
        self._lock = trio.Lock()
        self._waiting: tuple[type[ChannelMessage], ...] | None = None
        self._reply: _Reply | None = None
        self._replied = trio.Event()

    async def converse(self, messages: MessageStream) -> str:
        """One deltas connection: the writer's loop, with the compaction replies taken out."""
        return await self.writer.converse(_Intercepting(messages, self._on_reply))

    def _on_reply(self, reply: _Reply) -> None:
        if self._waiting is None or not isinstance(reply, self._waiting) or self._replied.is_set():
            log.warning("a compaction answer nobody waits for", extra={"type": reply.TYPE})
            return
        self._reply = reply
        self._replied.set()

    async def _exchange(
        self, frames: list[ChannelMessage], expect: tuple[type[ChannelMessage], ...]
    ) -> _Reply:
        """Send ``frames`` as one unit and wait (bounded) for one of ``expect``."""
        writer = self.writer
        self._waiting, self._reply, self._replied = expect, None, trio.Event()
        try:
            with trio.move_on_after(self.timeout_s) as scope:
                messages = writer._messages
                if messages is None:
                    raise CompactionError(
                        "no deltas connection to the parent", reason="disconnected"
                    )
                try:
                    async with writer._send_lock:
                        for frame in frames:
                            await messages.send(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise CompactionError(
                        "the deltas connection broke while compacting", reason="disconnected"
                    ) from exc
                while self._reply is None:
                    if writer._messages is not messages:
                        raise CompactionError(
                            "the deltas connection ended before the parent answered",
                            reason="disconnected",
                        )
                    with trio.move_on_after(1.0):
                        await self._replied.wait()
            if scope.cancelled_caught:
                writer._drop()
                raise CompactionError(
                    f"no answer from the parent within {self.timeout_s:g} s", reason="timeout"
                )
            assert self._reply is not None
            return self._reply
        except BaseException:
            # Cancelled (or failed) with the answer outstanding, maybe mid-way through a base's
            # frames: drop the connection, so the parent never reads a cut base as something
            # else and no late answer is taken for another exchange.
            if self._reply is None:
                writer._drop()
            raise
        finally:
            self._waiting = None

    async def _data_key(self, kms_key_id: str) -> tuple[bytearray, str, bytes]:
        """A fresh data key under ``kms_key_id`` through the parent (``GenerateDataKey`` with
        ``Recipient``): ``(data_key, key_arn, ciphertext_blob)``; the caller zeroes the key."""
        rsa_key = await trio.to_thread.run_sync(EphemeralRecipientKey.generate)
        try:
            document = await self.nsm.attestation(public_key=rsa_key.public_key_der)
            reply = await self._exchange(
                [CompactionKeyRequestMessage(document=document, kms_key_id=kms_key_id)],
                (CompactionKeyMessage, CompactionKeyFailedMessage),
            )
            if isinstance(reply, CompactionKeyFailedMessage):
                raise CompactionError(
                    f"the parent got no data key from KMS: {reply.reason}", reason="kms_refused"
                )
            assert isinstance(reply, CompactionKeyMessage)
            if reply.key_id != kms_key_id:
                raise CompactionError(
                    f"KMS answered for key {reply.key_id}, not {kms_key_id}", reason="kms_refused"
                )
            try:
                data_key = rsa_key.decrypt_recipient_ciphertext(reply.ciphertext)
            except CmsError as exc:
                raise CompactionError(
                    f"the KMS envelope did not open: {exc}", reason="key_unwrap"
                ) from exc
        finally:
            rsa_key.close()
        if len(data_key) != 32:
            _sodium.memzero(data_key)
            raise CompactionError("the KMS envelope holds no 32-byte data key", reason="key_unwrap")
        return data_key, reply.key_id, bytes(reply.ciphertext_blob)

    async def compact(self, kms_key_id: str) -> CompactionResult:
        """Seal everything this node holds into a new base under ``kms_key_id`` and have the
        parent store it durably; returns once ``base_stored`` arrived.

        The caller authorizes (the ``compact`` policy). One compaction at a time
        (``in_progress`` otherwise); the writer's store lock is held throughout.

        Cancellation: safe; a base already sent may still be stored (an unreferenced object
        under its own fingerprint: harmless, docs/compaction.md).

        Error handling: :class:`CompactionError` (its ``reason``); ``ShareFileError`` if an
        account fails its point checks.
        """
        if kms_key_id not in self.allowed_kms_keys:
            raise CompactionError(
                f"KMS key {kms_key_id!r} is not in [bundles] compaction_kms_keys of the measured "
                "configuration (pinning it is an EIF upgrade)",
                reason="kms_key_not_allowed",
            )
        deltas = self.writer.deltas
        signer = deltas.signer
        wrap = deltas.provider
        if signer is None or not isinstance(wrap, DeltaKeyWrap):
            raise CompactionError(
                "this enclave holds no delta identity key: nothing can sign a compacted base",
                reason="no_identity",
            )
        if self._lock.locked():
            raise CompactionError("a compaction is already running", reason="in_progress")
        async with self._lock, self.writer._store_lock:
            kms_key, arn, blob = await self._data_key(kms_key_id)
            try:
                data_key = bind_data_key(kms_key, wrap, blob)
            finally:
                _sodium.memzero(kms_key)
            try:
                base = await seal_compacted(
                    deltas.store,
                    deltas.chain,
                    data_key=data_key,
                    kms_key_id=arn,
                    encrypted_data_key=blob,
                    signer=signer,
                    chunk_size=self.chunk_size,
                )
                check_loads(base, data_key, identity=bytes(signer.public_key))
            finally:
                _sodium.memzero(data_key)
            log.info(
                "compacted base sealed",
                extra={
                    "sha256": base.fingerprint,
                    "accounts": base.accounts,
                    "deltas": base.compacts["deltas"],
                    "kms_key_id": arn,
                    "bytes": len(base.data),
                },
            )
            stored = await self._store(base)
        return CompactionResult(
            base.fingerprint, base.accounts, int(base.compacts["deltas"]), stored
        )

    async def _store(self, base: CompactedBase) -> str:
        reply = await self._exchange(base_frames(base), (BaseStoredMessage, BaseStoreFailedMessage))
        if isinstance(reply, BaseStoreFailedMessage):
            raise CompactionError(
                f"the parent could not store the compacted base: {reply.reason}",
                reason="store_failed",
            )
        assert isinstance(reply, BaseStoredMessage)
        if reply.sha256 != base.fingerprint:
            self.writer._drop()
            raise CompactionError(
                f"the parent acknowledged base {reply.sha256}, not {base.fingerprint}",
                reason="protocol",
            )
        log.info(
            "compacted base stored", extra={"sha256": base.fingerprint, "object": reply.object}
        )
        return reply.object


def base_frames(base: CompactedBase) -> list[ChannelMessage]:
    """``base_store``, the ``delta_chunk`` frames, ``delta_end``: one base to store."""
    head = BaseStoreMessage(sha256=base.fingerprint, total_bytes=len(base.data))
    return list(chunked_frames(head, base.data))


def compaction_approval_message(kms_key_id: str) -> bytes:
    """The ``message`` an approval of a compaction signs over (its SHA-256 is in the
    payload): the target KMS key ARN's UTF-8 bytes."""
    return kms_key_id.encode("utf-8")


__all__ = [
    "COMPACT_POLICY",
    "CompactedBase",
    "CompactionError",
    "CompactionResult",
    "Compactor",
    "base_frames",
    "bind_data_key",
    "check_loads",
    "compaction_approval_message",
    "compacts_of",
    "open_compacted_key",
    "seal_compacted",
]
