"""The enclave's end of the deltas channel (docs/key-lifecycle.md §1-4, §6).

Two jobs, one connection (``hello {channel: "deltas"}`` to the parent's ``deltas_port``)::

    enclave                                     parent
    delta_store {sequence, total_bytes}   ->
    delta_chunk {data} ... delta_end {}   ->    put-if-absent, fsync
                                          <-    delta_stored {sequence, sha256}
                                                | delta_conflict {sequence} (winner pushed next)
                                                | delta_store_failed {sequence, reason}
    delta_loaded {sequence, head, accounts} ->  (our own delta, once applied)
                                          <-    delta_push {sequence, total_bytes}
                                          <-    delta_chunk {data} ... delta_end {}
    delta_loaded {...} | delta_refused {sequence, reason} ->

* :class:`EnclaveDeltas` is the node's delta state: the share store, the
  :class:`~trio_sign.shares._deltas.DeltaChain`, the identity key's data-key wrap and signer,
  and the pinned identity key the deltas must be signed by. :meth:`EnclaveDeltas.apply`
  verifies a delta (signature, chain, every record) and applies it all or nothing; it is
  synchronous, so a ``get()`` sees none of a delta or all of it.
* :class:`DeltaWriter` stores the enclave's own deltas: :meth:`DeltaWriter.store` seals the
  records on the current head, sends ``delta_store`` and waits (at most ``store_timeout_s``
  per attempt) for ``delta_stored``; only then applies the delta and returns ``(sequence,
  head)``. On ``delta_conflict`` (another replica's delta took the sequence) it waits for the
  winner to be pushed and loaded, seals the records again on the new head and retries (at
  most ``store_retries`` times), so the chain never forks. :meth:`DeltaWriter.converse` runs
  one connection: it is the only reader (pushes and replies arrive in any order), and every
  unit it writes (a store's frames, an answer) goes out whole under one lock.

What the caller learns and what survives (§6): ``store()`` returns only after the parent
acknowledged the durable write, so an account it reports survives any crash. When it raises
(``timeout``, ``disconnected``: the answer was lost) the delta may still be stored; the
connection is dropped, and on the next one the parent pushes whatever is stored above this
node's position, so the node converges on the store (and a retried ``DkgRound3`` finds the
account with :meth:`EnclaveDeltas.find_dkg`). A delta is applied locally only once it is
durable.

Secrets: the records given to :meth:`DeltaWriter.store` are only read (the caller zeroes
them); each sealed delta holds ciphertext only; what :meth:`EnclaveDeltas.apply` decrypts
lands in the store or is zeroed. Logs carry sequences, counts and fingerprints, never
account data.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

import trio

from .._errors import KeyWrapError, ShareFileError, TrioSignError
from ..nitro import ChannelMessage, ChannelProtocolError, MessageStream
from ..nitro._channel import (
    MAX_REASON_CHARS,
    ChunkedBody,
    DeltaConflictMessage,
    DeltaLoadedMessage,
    DeltaPushMessage,
    DeltaRefusedMessage,
    DeltaStoredMessage,
    DeltaStoreFailedMessage,
    DeltaStoreMessage,
    chunked_frames,
)
from ..shares import BundleSigner, BundleTrust, DataKeyProvider, ShareRecord, ShareStore
from ..shares._deltas import (
    AppliedDelta,
    DeltaChain,
    DeltaCheck,
    SealedDelta,
    apply_delta,
    load_delta,
    seal_delta,
)
from ..shares._signature import KIND_DELTA

log = logging.getLogger("trio_sign.enclave.deltas")

#: ``store()`` waits this long per attempt for the parent's answer (and a connection).
DEFAULT_STORE_TIMEOUT_S: Final = 30.0
#: Re-seals after conflicts before ``store()`` gives up (``[dkg] store_retries``).
DEFAULT_STORE_RETRIES: Final = 5
#: Largest delta the enclave accepts from the parent (the parent's default limit).
MAX_DELTA_BYTES: Final = 16 * 1024 * 1024


#: Test only (tests/test_crash_dkg.py, docs/testing-crashes.md): the steps of a store at which
#: the process dies with ``os._exit(137)``, named in this environment variable (comma-separated,
#: ``enclave:before_seal``, ``enclave:after_seal``, ``enclave:after_store_sent``,
#: ``enclave:after_ack``). Read only in a development enclave (``--dev`` or ``--nsm local:DIR``
#: on its command line, and no ``/dev/nsm``): a production enclave's command line is the EIF's,
#: measured, so its parent can never make it crash this way.
CRASH_AT_ENV: Final = "TRIO_SIGN_TEST_CRASH_AT"


@functools.cache
def _development_process() -> bool:
    argv = sys.argv[1:]
    local_nsm = any(
        arg.startswith("--nsm=local:") or (arg == "--nsm" and nxt.startswith("local:"))
        for arg, nxt in zip(argv, [*argv[1:], ""], strict=True)
    )
    return ("--dev" in argv or local_nsm) and not os.path.exists("/dev/nsm")


def crash_point(step: str) -> None:
    """Test only: die here, like SIGKILL (no cleanup, exit 137), if :data:`CRASH_AT_ENV` names
    ``enclave:<step>`` and this is a development enclave; otherwise do nothing."""
    wanted = os.environ.get(CRASH_AT_ENV)
    if not wanted or f"enclave:{step}" not in wanted.split(","):
        return
    if not _development_process():
        log.warning("%s ignored: not a development enclave", CRASH_AT_ENV)
        return
    log.warning("test crash at enclave:%s", step)
    os._exit(137)


class DeltaStoreError(TrioSignError):
    """A delta was not stored (``DkgRound3`` answers ``UNAVAILABLE``; nothing was applied).

    ``reason``: ``no_identity`` (this enclave holds no delta identity key), ``timeout`` (no
    answer within ``store_timeout_s``; the connection is dropped), ``disconnected`` (the
    connection ended before the answer), ``store_failed`` (the parent could not store it),
    ``conflicts`` (still losing after ``store_retries`` re-seals), ``protocol`` (the parent
    acknowledged other bytes), or a refusal code of the delta itself
    (``delta_account_exists``, ...), found before anything was sent.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DeltaStatus:
    """What GetStatus and the attestation binding show: deltas loaded and the head (hex)."""

    count: int
    head: str


class EnclaveDeltas:
    """The node's deltas: its share store, the chain on its base, and the identity key.

    Args:
        store: the share store deltas are applied to.
        chain: the chain as loaded at boot (``DeltaChain(store.fingerprint)`` and the boot's
            deltas).
        provider: the identity key's :class:`~trio_sign.enclave.DeltaKeyWrap` (opens and seals
            deltas); None: this enclave holds no identity key and refuses every delta.
        signer: the identity key (signs the deltas this enclave seals); None: it stores none.
        signing_keys: the public keys a delta must be signed by (``[bundles]
            delta_identity_key``); None is development (an unsigned delta loads, with a
            warning).
        check: called with each verified delta's own store before it is applied; raises to
            refuse it (the serving enclave: every policy must be configured).
        on_change: called after each applied delta (GetStatus's fields are set from it).
    """

    def __init__(
        self,
        store: ShareStore,
        chain: DeltaChain,
        *,
        provider: DataKeyProvider | None,
        signer: BundleSigner | None = None,
        signing_keys: tuple[bytes, ...] | None = None,
        check: DeltaCheck | None = None,
        on_change: Callable[[DeltaStatus], None] | None = None,
    ) -> None:
        self.store = store
        self.chain = chain
        self.provider = provider
        self.signer = signer
        self.trust = BundleTrust.pinned(signing_keys, kind=KIND_DELTA)
        self.check = check
        self.on_change = on_change
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<EnclaveDeltas {self.chain!r} identity={self.provider is not None}>"

    @property
    def status(self) -> DeltaStatus:
        return DeltaStatus(self.chain.count, self.chain.head)

    def find_dkg(self, dkg_id: str) -> tuple[int, str] | None:
        """``(sequence, fingerprint)`` of the loaded delta the DKG ``dkg_id`` made, if any."""
        return self.chain.find_dkg(dkg_id)

    def dkg_accounts(self, dkg_id: str) -> tuple[str, ...]:
        """The accounts of the loaded delta the DKG ``dkg_id`` made (empty: none), so a
        retried ``DkgRound3`` after a reboot can name its account."""
        return self.chain.dkg_accounts(dkg_id)

    def verify(self, data: bytes) -> None:
        """Check ``data`` as the next delta here, without applying it (the writer's dry run:
        a delta the chain would refuse is never stored)."""
        provider = self._provider()
        loaded = load_delta(data, provider=provider, trust=self.trust, chain=self.chain)
        try:
            if self.check is not None:
                self.check(loaded.store)
            self.store.check_delta(loaded.store, loaded.operation)
        finally:
            loaded.close()

    def apply(self, data: bytes, *, verify: Literal["lazy", "full"] = "full") -> AppliedDelta:
        """Verify ``data`` and apply it as the next delta, all or nothing.

        Error handling: ``ShareFileError`` (its ``reason``: ``delta_chain``,
        ``delta_account_exists``, ``bundle_signer_unknown``, ...) or ``KeyWrapError``;
        ``ShareFileError`` ``delta_no_identity`` without an identity key. Nothing changed then.
        """
        applied = apply_delta(
            self.store,
            self.chain,
            data,
            provider=self._provider(),
            trust=self.trust,
            verify=verify,
            check=self.check,
        )
        log.info(
            "delta loaded",
            extra={
                "sequence": applied.sequence,
                "operation": applied.operation,
                "delta_accounts": len(applied.accounts),
                "head": applied.fingerprint,
                "accounts": len(self.store),
            },
        )
        self._changed.set()
        self._changed = trio.Event()
        if self.on_change is not None:
            self.on_change(self.status)
        return applied

    async def wait_for(self, sequence: int) -> None:
        """Return once delta ``sequence`` (or a later one) is loaded."""
        while self.chain.count < sequence:
            await self._changed.wait()

    def _provider(self) -> DataKeyProvider:
        if self.provider is None:
            raise ShareFileError(
                "this enclave holds no delta identity key ([bundles] delta_identity_key and "
                "its sealed file), so it cannot open deltas",
                reason="delta_no_identity",
            )
        return self.provider


def refusal_reason(exc: BaseException) -> str:
    """The stable code a refused delta is reported with."""
    if isinstance(exc, ShareFileError):
        return exc.reason
    if isinstance(exc, KeyWrapError):
        return "key_unwrap"
    return "refused"


async def receive_delta(messages: MessageStream, push: DeltaPushMessage) -> bytes:
    """The bytes of a delta announced by ``push``: its ``delta_chunk`` frames up to
    ``delta_end``, adding up to exactly ``total_bytes`` (at most :data:`MAX_DELTA_BYTES`).

    Error handling: ``ChannelProtocolError`` for anything else (the channel is unusable).
    """
    if push.total_bytes > MAX_DELTA_BYTES:
        raise ChannelProtocolError(
            f"delta {push.sequence} of {push.total_bytes} bytes is over {MAX_DELTA_BYTES}",
            reason="oversized",
        )
    body = ChunkedBody(f"delta {push.sequence}", push.total_bytes)
    while (data := body.feed(await messages.receive())) is None:
        pass
    return data


def store_frames(sealed: SealedDelta) -> list[ChannelMessage]:
    """``delta_store``, the ``delta_chunk`` frames, ``delta_end``: one delta to store."""
    head = DeltaStoreMessage(sequence=sealed.sequence, total_bytes=len(sealed.data))
    return list(chunked_frames(head, sealed.data))


Reply = DeltaStoredMessage | DeltaConflictMessage | DeltaStoreFailedMessage


class _Pending:
    """One ``delta_store`` waiting for its answer."""

    def __init__(self, sequence: int) -> None:
        self.sequence = sequence
        self.reply: Reply | None = None
        self.lost: str | None = None
        self.done = trio.Event()


class DeltaWriter:
    """Stores this enclave's deltas through the parent, and loads the parent's pushes.

    Args:
        deltas: the node's :class:`EnclaveDeltas` (with ``provider`` and ``signer``).
        store_timeout_s: how long one attempt waits for a connection and for the parent's
            answer.
        store_retries: how many times a delta is sealed again after a conflict.

    Run :meth:`converse` for each deltas connection (``run_reconnecting_channel`` with
    ``read=False``); :meth:`store` waits for one.
    """

    def __init__(
        self,
        deltas: EnclaveDeltas,
        *,
        store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S,
        store_retries: int = DEFAULT_STORE_RETRIES,
    ) -> None:
        if store_timeout_s <= 0 or store_retries < 0:
            raise ValueError("need store_timeout_s > 0 and store_retries >= 0")
        self.deltas = deltas
        self.store_timeout_s = store_timeout_s
        self.store_retries = store_retries
        self._store_lock = trio.Lock()
        self._send_lock = trio.Lock()
        self._messages: MessageStream | None = None
        self._connected = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._pending: _Pending | None = None

    @property
    def connected(self) -> bool:
        return self._messages is not None

    # -- storing -------------------------------------------------------------------------------

    async def store(
        self, records: Iterable[ShareRecord], operation: str, dkg_id: str
    ) -> tuple[int, str]:
        """Seal ``records`` into the next delta, have the parent store it durably, apply it.

        Returns ``(sequence, head)`` once the parent said ``delta_stored`` and the delta is
        applied here (its accounts are signable). One store at a time (a lock); the records
        are only read (the caller zeroes them).

        Cancellation: safe; a delta already sent may still be stored (and is then pushed
        back on a later connection, §6). The connection is dropped so that no answer for it
        is mistaken for another's.

        Error handling: :class:`DeltaStoreError` (its ``reason``); nothing was applied.
        """
        deltas = self.deltas
        if deltas.provider is None or deltas.signer is None:
            raise DeltaStoreError(
                "this enclave holds no delta identity key: it cannot store deltas",
                reason="no_identity",
            )
        recs = list(records)
        async with self._store_lock:
            for attempt in range(self.store_retries + 1):
                crash_point("before_seal")
                sealed = self._seal(recs, operation, dkg_id)
                crash_point("after_seal")
                reply = await self._attempt(sealed)
                if isinstance(reply, DeltaStoredMessage):
                    stored = await self._stored(sealed, reply)
                    crash_point("after_ack")
                    return stored
                if isinstance(reply, DeltaStoreFailedMessage):
                    raise DeltaStoreError(
                        f"the parent could not store delta {sealed.sequence}: {reply.reason}",
                        reason="store_failed",
                    )
                log.info(
                    "delta sequence taken by another replica; waiting for its delta",
                    extra={"sequence": sealed.sequence, "attempt": attempt + 1},
                )
                await self._bounded(
                    functools.partial(deltas.wait_for, sealed.sequence), sealed.sequence
                )
            raise DeltaStoreError(
                f"delta still conflicting after {self.store_retries} re-seals ([dkg] "
                "store_retries)",
                reason="conflicts",
            )

    def _seal(self, records: list[ShareRecord], operation: str, dkg_id: str) -> SealedDelta:
        deltas = self.deltas
        assert deltas.provider is not None
        assert deltas.signer is not None
        try:
            sealed = seal_delta(
                records,
                sequence=deltas.chain.next_sequence,
                previous=deltas.chain.next_previous,
                operation=operation,
                dkg_id=dkg_id,
                provider=deltas.provider,
                signer=deltas.signer,
            )
            deltas.verify(sealed.data)
        except (ShareFileError, KeyWrapError) as exc:
            raise DeltaStoreError(
                f"the delta was refused before it was stored: {exc}", reason=refusal_reason(exc)
            ) from exc
        except ValueError as exc:
            raise DeltaStoreError(f"bad delta: {exc}", reason="bad_delta") from exc
        return sealed

    async def _bounded(self, wait: Callable[[], Awaitable[None]], sequence: int) -> None:
        """Run ``wait()`` within ``store_timeout_s``; on timeout drop the connection and raise
        ``timeout``."""
        with trio.move_on_after(self.store_timeout_s) as scope:
            await wait()
        if scope.cancelled_caught:
            self._drop()
            raise DeltaStoreError(
                f"no answer for delta {sequence} within {self.store_timeout_s:g} s",
                reason="timeout",
            )

    async def _attempt(self, sealed: SealedDelta) -> Reply:
        """Send one ``delta_store`` and wait for its answer (bounded)."""
        pending = _Pending(sealed.sequence)

        async def send_and_wait() -> None:
            while self._messages is None:
                await self._connected.wait()
            messages = self._messages
            self._pending = pending
            try:
                async with self._send_lock:
                    for frame in store_frames(sealed):
                        await messages.send(frame)
                crash_point("after_store_sent")
                await pending.done.wait()
            finally:
                if self._pending is pending:
                    self._pending = None

        try:
            await self._bounded(send_and_wait, sealed.sequence)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._drop()
            raise DeltaStoreError(
                f"the deltas connection broke while storing delta {sealed.sequence}",
                reason="disconnected",
            ) from exc
        except BaseException:
            # Cancelled (the caller gave up) with the answer outstanding: drop the connection,
            # so the parent's view of what we hold restarts from what we said we loaded.
            if pending.reply is None:
                self._drop()
            raise
        if pending.reply is None:
            raise DeltaStoreError(
                f"the deltas connection ended before delta {sealed.sequence} was answered "
                f"({pending.lost})",
                reason="disconnected",
            )
        return pending.reply

    async def _stored(self, sealed: SealedDelta, reply: DeltaStoredMessage) -> tuple[int, str]:
        if reply.sha256 != sealed.fingerprint:
            self._drop()
            raise DeltaStoreError(
                f"the parent acknowledged delta {sealed.sequence} with fingerprint "
                f"{reply.sha256}, not {sealed.fingerprint}",
                reason="protocol",
            )
        deltas = self.deltas
        if deltas.chain.head != sealed.fingerprint:  # else it was pushed back first
            try:
                deltas.apply(sealed.data)
            except (ShareFileError, KeyWrapError) as exc:  # pragma: no cover - verified before
                raise DeltaStoreError(
                    f"delta {sealed.sequence} is stored but could not be applied: {exc}",
                    reason=refusal_reason(exc),
                ) from exc
        await self._send_quietly(
            DeltaLoadedMessage(
                sequence=sealed.sequence, head=deltas.chain.head, accounts=len(deltas.store)
            )
        )
        log.info(
            "delta stored",
            extra={"sequence": sealed.sequence, "head": sealed.fingerprint},
        )
        return sealed.sequence, sealed.fingerprint

    # -- the connection ------------------------------------------------------------------------

    def _drop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _send(self, message: ChannelMessage) -> None:
        messages = self._messages
        if messages is None:
            return
        async with self._send_lock:
            await messages.send(message)

    async def _send_quietly(self, message: ChannelMessage) -> None:
        """An answer the parent only reads for its position: a lost one is recovered by the
        next connection."""
        try:
            await self._send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ChannelProtocolError):
            log.info("could not tell the parent a delta was loaded (connection lost)")

    async def converse(self, messages: MessageStream) -> str:
        """Run one deltas connection (after its ``hello``): read replies and pushes until it
        ends; returns why. A store waiting on it fails with ``disconnected``.

        Error handling: ``ChannelProtocolError`` and transport errors propagate (the
        reconnecting loop logs them and reconnects).
        """
        with trio.CancelScope() as scope:
            self._scope = scope
            self._messages = messages
            self._connected.set()
            why = "closed"
            try:
                while True:
                    message = await messages.receive()
                    if isinstance(message, DeltaPushMessage):
                        data = await receive_delta(messages, message)
                        await self._on_push(message.sequence, data)
                    elif isinstance(
                        message, (DeltaStoredMessage, DeltaConflictMessage, DeltaStoreFailedMessage)
                    ):
                        self._on_reply(message)
                    else:
                        raise ChannelProtocolError(
                            f"unexpected {message.TYPE!r} on the deltas channel",
                            reason="unexpected_message",
                        )
            except BaseException as exc:
                why = str(exc) or type(exc).__name__
                raise
            finally:
                self._messages = None
                self._scope = None
                self._connected = trio.Event()
                pending = self._pending
                if pending is not None and not pending.done.is_set():
                    pending.lost = why
                    pending.done.set()
        return "dropped after a store was not answered in time"

    def _on_reply(self, reply: Reply) -> None:
        pending = self._pending
        if pending is None or pending.sequence != reply.sequence or pending.done.is_set():
            log.warning(
                "an answer for a delta that is not being stored",
                extra={"sequence": reply.sequence, "type": reply.TYPE},
            )
            return
        pending.reply = reply
        pending.done.set()

    async def _on_push(self, sequence: int, data: bytes) -> None:
        deltas = self.deltas
        if sequence <= deltas.chain.count:
            # Already here: our own delta, pushed before the parent noted that we hold it.
            await self._send(
                DeltaLoadedMessage(
                    sequence=sequence, head=deltas.chain.head, accounts=len(deltas.store)
                )
            )
            return
        try:
            deltas.apply(data)
        except (ShareFileError, KeyWrapError) as exc:
            reason = refusal_reason(exc)
            log.error(
                "pushed delta refused",
                extra={"sequence": sequence, "reason": reason, "error": str(exc)},
            )
            await self._send(
                DeltaRefusedMessage(sequence=sequence, reason=reason[:MAX_REASON_CHARS])
            )
            return
        await self._send(
            DeltaLoadedMessage(
                sequence=deltas.chain.count, head=deltas.chain.head, accounts=len(deltas.store)
            )
        )


__all__ = [
    "DEFAULT_STORE_RETRIES",
    "DEFAULT_STORE_TIMEOUT_S",
    "DeltaStatus",
    "DeltaStoreError",
    "DeltaWriter",
    "EnclaveDeltas",
    "receive_delta",
    "refusal_reason",
    "store_frames",
]
