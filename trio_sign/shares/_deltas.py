"""Delta bundles and their chain (docs/key-lifecycle.md §1, §2): sealing one, checking where it
goes, and applying it to a :class:`~trio_sign.shares.ShareStore`, all or nothing.

A delta is a sealed bundle of kind ``delta`` whose header also names its ``sequence`` (1 for
the first delta on a base), ``previous`` (the fingerprint of the delta before it, or of the
base for sequence 1), its ``operation`` (``create``, ``refresh``, ``repair``) and the
``dkg_id`` that made it. Its data key is wrapped by the enclave's
:class:`~trio_sign.enclave.DeltaKeyWrap` and it is signed by the delta identity key; the
signature covers the fingerprint, which covers the header, so none of those fields can change
without the bundle being refused.

:class:`DeltaChain` is what a node has loaded: the base's fingerprint, the head (the last
delta's fingerprint, or 32 zero bytes before any) and the count. A delta loads only as the next
link (``sequence == count + 1`` and ``previous`` the current head, the base for the first):
a missing, reordered, duplicated or foreign delta is refused with ``delta_chain`` before its
data key is unwrapped.

:func:`load_delta` verifies a delta into a store of its own (the framing, chunk
authentication, every record's structure, the identity signature, the chain); :func:`apply_delta`
then checks it against the node's store (``delta_account_exists``,
``delta_account_mismatch``) and applies it; until every check passed nothing is visible, and a
refusal zeroes what was decrypted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from .._errors import ShareFileError
from ._keywrap import DataKeyProvider
from ._records import (
    ShareRecord,
    check_account_id,
    check_points,
    check_policy,
    check_scalars,
    check_threshold,
    record_error,
    scheme_named,
)
from ._sealed import (
    COMPACTS_FIELD,
    DEFAULT_CHUNK_SIZE,
    MAX_DELTA_SEQUENCE,
    MAX_DKG_ID_CHARS,
    OPERATION_CREATE,
    OPERATIONS,
    check_compacts,
    check_delta_header,
    encode_bundle,
    unwrap_data_key,
)
from ._signature import KIND_DELTA, SIGNATURE_RECORD_BYTES, BundleSigner, BundleTrust
from ._store import SealedLoader, ShareStore

#: The head before any delta was loaded (hex).
NO_DELTAS_HEX: Final = "0" * 64


def _chain_error(message: str) -> ShareFileError:
    return ShareFileError(message, reason="delta_chain")


@dataclass(frozen=True, slots=True)
class SealedDelta:
    """A sealed, signed delta bundle and what its header says (public data only)."""

    data: bytes
    sequence: int
    previous: str
    fingerprint: str
    operation: str
    dkg_id: str
    accounts: int

    def __repr__(self) -> str:
        return (
            f"SealedDelta(sequence={self.sequence}, operation={self.operation!r}, "
            f"accounts={self.accounts}, fingerprint={self.fingerprint}, bytes={len(self.data)})"
        )


def seal_delta(
    records: Iterable[ShareRecord],
    *,
    sequence: int,
    previous: str,
    operation: str,
    dkg_id: str,
    provider: DataKeyProvider,
    signer: BundleSigner,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SealedDelta:
    """Seal ``records`` into delta ``sequence`` on ``previous`` (hex), signed by ``signer``.

    Every record is validated first (as a sealed load would: account id, policy, scalars,
    thresholds, both points and ``s·G``, no duplicates), so a delta that the chain would
    carry forever is never written with a bad record in it. The records are only read (the
    caller zeroes them).

    Error handling:
        ``ValueError`` for arguments out of range (no records, an unknown operation, a bad
        sequence, ``previous`` or ``dkg_id``); ``ShareFileError`` with the record-level codes
        (records numbered from 1); ``KeyWrapError``/``SigningError`` from the provider and
        signer.
    """
    recs = list(records)
    if not recs:
        raise ValueError("a delta holds at least one record")
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}")
    if isinstance(sequence, bool) or not 1 <= sequence <= MAX_DELTA_SEQUENCE:
        raise ValueError(f"sequence must be in 1..{MAX_DELTA_SEQUENCE}")
    if len(previous) != 64 or previous != previous.lower() or not _is_hex(previous):
        raise ValueError("previous must be 64 lowercase hex digits")
    if len(dkg_id) > MAX_DKG_ID_CHARS or (operation == OPERATION_CREATE and not dkg_id):
        raise ValueError(f"dkg_id must be 1..{MAX_DKG_ID_CHARS} characters for a create")
    seen: set[str] = set()
    for number, rec in enumerate(recs, 1):
        check_account_id(rec.account_id, record=number)
        check_policy(rec.policy, record=number)
        scheme = scheme_named(rec.ciphersuite)
        check_scalars(rec.identifier, rec.signing_share, record=number, scheme=scheme)
        check_threshold(rec.min_signers, rec.max_signers, record=number)
        check_points(
            rec.signing_share,
            rec.verifying_share,
            rec.group_public_key,
            record=number,
            scheme=scheme,
        )
        if rec.account_id in seen:
            raise record_error("duplicate account_id", reason="duplicate_account", record=number)
        seen.add(rec.account_id)
    fields = {"sequence": sequence, "previous": previous, "operation": operation, "dkg_id": dkg_id}
    data = encode_bundle(
        recs, provider, chunk_size=chunk_size, signer=signer, kind=KIND_DELTA, delta=fields
    )
    fingerprint = hashlib.sha256(memoryview(data)[:-SIGNATURE_RECORD_BYTES]).hexdigest()
    return SealedDelta(data, sequence, previous, fingerprint, operation, dkg_id, len(recs))


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


class DeltaChain:
    """The deltas a node has loaded on its base: count, head, and which DKG made which.

    Args:
        base_fingerprint: the base bundle's fingerprint (hex), the ``previous`` of delta 1.
        compacts: a compacted base's header field (``{"base", "head", "deltas"}``,
            docs/compaction.md): the chain then continues the compacted one. It starts at
            ``count = deltas`` with that head, so the next delta is ``deltas + 1`` on the
            recorded head, and a delta ``1..deltas`` is refused (``delta_compacted``: its
            accounts are already in the base).
    """

    __slots__ = (
        "_dkg_accounts",
        "_dkgs",
        "_head",
        "_start",
        "base_fingerprint",
        "compacted",
        "count",
    )

    def __init__(self, base_fingerprint: str, *, compacts: Mapping[str, Any] | None = None) -> None:
        if len(base_fingerprint) != 64 or not _is_hex(base_fingerprint):
            raise ValueError("the base fingerprint is 64 hex digits")
        self.base_fingerprint = base_fingerprint.lower()
        self.count = 0
        self.compacted = 0
        self._head: str | None = None
        self._dkgs: dict[str, tuple[int, str]] = {}
        self._dkg_accounts: dict[str, tuple[str, ...]] = {}
        #: What the first delta loaded here must name as ``previous``.
        self._start = self.base_fingerprint
        if compacts is not None:
            check_compacts(compacts)
            self.compacted = self.count = int(compacts["deltas"])
            self._start = str(compacts["head"])
            if self.compacted:
                self._head = self._start

    @classmethod
    def for_base(cls, header: Mapping[str, Any], fingerprint: str) -> DeltaChain:
        """The chain on a loaded base: its ``compacts`` continued, or a fresh chain."""
        compacts = header.get(COMPACTS_FIELD)
        return cls(fingerprint, compacts=compacts)

    def __repr__(self) -> str:
        return f"DeltaChain(count={self.count}, head={self.head}, compacted={self.compacted})"

    @property
    def head(self) -> str:
        """The last delta's fingerprint (hex), or 64 zeros before any delta."""
        return NO_DELTAS_HEX if self._head is None else self._head

    @property
    def head_bytes(self) -> bytes:
        return bytes.fromhex(self.head)

    @property
    def next_sequence(self) -> int:
        return self.count + 1

    @property
    def next_previous(self) -> str:
        """What the next delta's ``previous`` must be: the head, or for the first the base
        (of a compacted base: ``compacts.head``, what the compacted chain's next delta names)."""
        return self._start if self._head is None else self._head

    def check_next(self, header: Mapping[str, Any], fingerprint: str | None = None) -> None:
        """Refuse (``delta_chain``) a delta header that is not the next link.

        ``fingerprint`` (the delta's own, when known) is also refused if it is a link
        already loaded.

        Error handling: ``ShareFileError`` ``delta_chain``; ``bad_header`` if the header
        is not a delta's or lacks a delta field.
        """
        check_delta_header(header)
        sequence, previous = header["sequence"], header["previous"]
        if sequence <= self.compacted:
            raise ShareFileError(
                f"delta {sequence} is already contained in this node's compacted base (which "
                f"holds deltas 1..{self.compacted})",
                reason="delta_compacted",
            )
        if fingerprint is not None and fingerprint in (self._head, self.base_fingerprint):
            raise _chain_error(f"delta {sequence} is a bundle already loaded (a duplicate)")
        expected = self.next_sequence
        if sequence != expected:
            what = "already loaded (a duplicate)" if sequence < expected else "out of order"
            raise _chain_error(
                f"delta {sequence} is {what}: the next delta on this node is {expected}"
            )
        if previous != self.next_previous:
            on = "the base" if self._head is None and not self.compacted else f"delta {self.count}"
            raise _chain_error(
                f"delta {sequence} follows {previous[:16]}..., not {on} ({self.next_previous[:16]}"
                "...): it belongs to another base or chain"
            )

    def advance(
        self, header: Mapping[str, Any], fingerprint: str, accounts: tuple[str, ...] = ()
    ) -> None:
        """Record that the delta with ``header`` and ``fingerprint`` (holding ``accounts``)
        was applied."""
        self.check_next(header, fingerprint)
        self.count += 1
        self._head = fingerprint
        dkg_id = header.get("dkg_id")
        if isinstance(dkg_id, str) and dkg_id and dkg_id not in self._dkgs:
            self._dkgs[dkg_id] = (self.count, fingerprint)
            if accounts:
                self._dkg_accounts[dkg_id] = accounts

    def find_dkg(self, dkg_id: str) -> tuple[int, str] | None:
        """``(sequence, fingerprint)`` of the delta a DKG made, if it is loaded (a retried
        ``DkgRound3`` after a lost answer or a reboot answers from it)."""
        return self._dkgs.get(dkg_id)

    def dkg_accounts(self, dkg_id: str) -> tuple[str, ...]:
        """The accounts of the loaded delta the DKG ``dkg_id`` made (empty: none loaded)."""
        return self._dkg_accounts.get(dkg_id, ())


@dataclass(slots=True, eq=False)
class LoadedDelta:
    """A delta verified into a store of its own (not yet applied). :meth:`close` zeroes it."""

    store: ShareStore
    header: dict[str, Any]
    fingerprint: str

    def __repr__(self) -> str:
        return (
            f"LoadedDelta(sequence={self.sequence}, operation={self.operation!r}, "
            f"accounts={len(self.store)}, fingerprint={self.fingerprint})"
        )

    @property
    def sequence(self) -> int:
        return int(self.header["sequence"])

    @property
    def operation(self) -> str:
        return str(self.header["operation"])

    @property
    def dkg_id(self) -> str:
        return str(self.header["dkg_id"])

    def close(self) -> None:
        self.store.close()


def load_delta(
    data: bytes,
    *,
    provider: DataKeyProvider,
    trust: BundleTrust,
    chain: DeltaChain,
    verify: Literal["lazy", "full"] = "full",
) -> LoadedDelta:
    """Verify ``data`` as the next delta of ``chain`` into a store of its own.

    The header must be a delta's, with every delta field, and the next link of ``chain``
    (checked before the data key is unwrapped); every chunk authenticates, every record is
    structurally valid (and, with ``verify="full"``, its points); the signature is by a key
    ``trust`` accepts (of kind ``delta``). Nothing outside the returned store is touched.

    Error handling:
        ``ShareFileError`` (``delta_chain``, ``bad_header``, the sealed format's and the
        records' codes, ``bundle_unsigned``, ``bundle_signer_unknown``,
        ``bundle_signature_invalid``, ``bundle_kind``) or ``KeyWrapError``; what was
        decrypted is zeroed.
    """
    if trust.kind != KIND_DELTA:
        raise ValueError("a delta is loaded with a BundleTrust of kind 'delta'")

    def unwrap(header: dict[str, Any]) -> bytearray:
        chain.check_next(header)
        return unwrap_data_key(header, provider)

    loader = SealedLoader(unwrap=unwrap, verify=verify, total_bytes=len(data), trust=trust)
    try:
        loader.feed(data)
        store = loader.finish()
    except BaseException:
        loader.abort()
        raise
    header = loader.header
    assert header is not None
    assert store.fingerprint is not None
    try:
        chain.check_next(header, store.fingerprint)
    except BaseException:
        store.close()
        raise
    return LoadedDelta(store, header, store.fingerprint)


#: Called with a verified delta's store before it is applied; raises to refuse it (the
#: enclave: every policy its accounts name must be configured).
DeltaCheck = Callable[[ShareStore], None]


@dataclass(frozen=True, slots=True)
class AppliedDelta:
    """What :func:`apply_delta` applied (public data)."""

    sequence: int
    fingerprint: str
    operation: str
    dkg_id: str
    accounts: tuple[str, ...]


def apply_delta(
    store: ShareStore,
    chain: DeltaChain,
    data: bytes,
    *,
    provider: DataKeyProvider,
    trust: BundleTrust,
    verify: Literal["lazy", "full"] = "full",
    check: DeltaCheck | None = None,
) -> AppliedDelta:
    """Verify ``data`` (:func:`load_delta`) and apply it to ``store``, advancing ``chain``:
    all of it, or nothing.

    Synchronous: nothing else runs between the checks and the change, so :meth:`ShareStore.get`
    sees either none of the delta or all of it.

    Error handling:
        What :func:`load_delta`, ``check`` and :meth:`ShareStore.check_delta` raise
        (``delta_account_exists``, ``delta_account_mismatch``, ...). The store and the chain
        are then unchanged and the delta's decrypted records are zeroed.
    """
    loaded = load_delta(data, provider=provider, trust=trust, chain=chain, verify=verify)
    try:
        if check is not None:
            check(loaded.store)
        accounts = tuple(loaded.store._index)
        store.apply_delta(loaded.store, loaded.operation)
        chain.advance(loaded.header, loaded.fingerprint, accounts)
        return AppliedDelta(
            loaded.sequence, loaded.fingerprint, loaded.operation, loaded.dkg_id, accounts
        )
    finally:
        loaded.close()


__all__ = [
    "NO_DELTAS_HEX",
    "AppliedDelta",
    "DeltaChain",
    "LoadedDelta",
    "SealedDelta",
    "apply_delta",
    "load_delta",
    "seal_delta",
]
