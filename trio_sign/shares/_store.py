"""``ShareStore``: the compact in-memory index of every account's key share (Scheme A).

Accounts live in one of two **lanes** by their suite's element size, so that an Ed25519
account costs exactly what it did before other suites existed: the Ed25519 lane (the
attributes below) and the wide lane (:class:`_Lane`, both secp256k1 suites: 33-byte elements
and one suite-code byte per slot). The index's value says which: ``slot >= 0`` is Ed25519 slot
``slot``, ``slot < 0`` wide slot ``~slot``.

Ed25519 layout (per account, about 300 bytes including the index):

* ``_index``: ``dict[str, int]`` account_id → slot (see above for the wide lane);
* ``_arena``: one ``bytearray(32 * capacity)`` of signing shares (SECRET). It grows with the
  records actually decrypted, never from the (untrusted) header count alone: a forged header
  claiming 2**24 accounts must not cost 2 GB. Growing allocates a bigger arena (doubling, at
  least 1024 slots, never beyond the header's count on a sealed load, so a genuine bundle ends
  with an arena of exactly its size), copies, and zeroes the old one: a ``bytearray`` resize
  could leave copies of secrets in freed memory;
* ``_public``: ``bytearray(96 * n)``, identifier ‖ verifying_share ‖ group_public_key per slot;
* ``_thresholds``: ``array('H')``, min_signers and max_signers per slot;
* ``_flags``: one byte per slot (bit 0 = verified; bit 1 reserved for "frozen");
* ``_policy``: one byte per slot, an index into ``_policy_names`` (the account's policy,
  DESIGN §6 and §11; at most 255 distinct names, index 0 is ``default``).

The wide lane has the same arrays with a public stride of 98 bytes (identifier ‖
verifying_share(33) ‖ group_public_key(33)) plus ``suite``, one code byte per slot (DESIGN
§14: 1 secp256k1, 2 secp256k1-TR): about 270 bytes per account including the index.

What CPython cannot guarantee: account ids are ``str`` (not secret); the signing shares only
ever live in the arena, in decrypted chunk buffers (zeroed right after parsing) and in the
libsodium stream state (zeroed). Views handed out by :meth:`ShareStore.get` point into the
arena, so :meth:`ShareStore.close` wipes what they show too.
"""

from __future__ import annotations

import functools
import struct
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Final, Literal

from .._errors import InternalError, ShareFileError
from ..crypto import _sodium
from ..crypto._schemes import ED25519, SCHEMES, Scheme
from ..crypto._secp256k1 import N as _N
from ._keywrap import DataKeyProvider
from ._plaintext import read_plaintext
from ._records import (
    CIPHERSUITE,
    RECORD_FORMAT_V2,
    RECORD_FORMAT_V3,
    ShareRecord,
    check_account_id,
    check_points,
    check_policy,
    check_scalars,
    check_threshold,
    public_repr,
    record_error,
    scheme_coded,
    scheme_named,
)
from ._sealed import (
    MIN_RECORD_BYTES,
    READ_SIZE,
    ChunkDecrypted,
    EndOfBundle,
    HeaderReceived,
    SealedDecoder,
    check_record_count,
    header_suite_counts,
    input_size,
    unwrap_data_key,
    zero_events,
)
from ._signature import BundleTrust

Progress = Callable[[int, int], None]
#: Called with the header's account count before any key is unwrapped or memory sized from
#: it; raises (e.g. ``MemoryLimitError``) to refuse the bundle.
MemoryCheck = Callable[[int], None]

VERIFIED: Final = 1
FROZEN: Final = 2  # reserved

_PUB = 96
_U16X2 = struct.Struct(">HH")
_L = _sodium.L


@dataclass(frozen=True, slots=True, eq=False)
class AccountShare:
    """A read-only view of one account's key share.

    ``signing_share`` is a read-only ``memoryview`` into the store's arena: do not keep it past
    :meth:`ShareStore.close` (it will read as zeros) and do not copy it into ``bytes``.
    ``ciphersuite`` names the account's suite (DESIGN §14); ``verifying_share`` and
    ``group_public_key`` are that suite's elements (33 bytes for secp256k1).
    """

    account_id: str
    identifier: bytes
    signing_share: memoryview = field(repr=False)
    verifying_share: bytes
    group_public_key: bytes
    min_signers: int
    max_signers: int
    policy: str = "default"
    ciphersuite: str = CIPHERSUITE

    def __repr__(self) -> str:
        return public_repr(self)

    @property
    def scheme(self) -> Scheme:
        """The account's :class:`~trio_sign.crypto.Scheme`."""
        return scheme_named(self.ciphersuite)


class _Lane:
    """The accounts of the suites whose elements are ``element_size`` bytes other than
    Ed25519's: the same arrays as the Ed25519 lane, a wider public stride, and one suite code
    per slot. Grows like the Ed25519 lane (a new arena, the old one zeroed)."""

    __slots__ = (
        "arena",
        "capacity",
        "count",
        "element_size",
        "flags",
        "policy",
        "public",
        "stride",
        "suite",
        "thresholds",
    )

    def __init__(self, element_size: int) -> None:
        self.element_size = element_size
        self.stride = 32 + 2 * element_size
        self.arena = bytearray()
        self.public = bytearray()
        self.thresholds = array("H")
        self.flags = bytearray()
        self.policy = bytearray()
        self.suite = bytearray()
        self.capacity = 0
        self.count = 0

    def grow(self, need: int, limit: int | None = None) -> None:
        """Room for ``need`` slots (doubling, at least 1024, at most ``limit``)."""
        cap = max(need, 2 * self.capacity, 1024)
        if limit is not None:
            cap = max(need, min(cap, limit))
        if cap > self.capacity:
            self.resize(cap)

    def resize(self, cap: int) -> None:
        """Exactly ``cap`` slots (at least ``count``); the old arena is zeroed."""
        cap = max(cap, self.count)
        arena = bytearray(32 * cap)
        keep = 32 * min(cap, self.capacity)
        arena[:keep] = memoryview(self.arena)[:keep]
        _sodium.memzero(self.arena)
        self.arena = arena
        if cap >= self.capacity:
            extra = cap - self.capacity
            self.public += bytes(self.stride * extra)
            self.thresholds.frombytes(bytes(4 * extra))
            self.flags += bytes(extra)
            self.policy += bytes(extra)
            self.suite += bytes(extra)
        else:
            del self.public[self.stride * cap :]
            del self.thresholds[2 * cap :]
            del self.flags[cap:]
            del self.policy[cap:]
            del self.suite[cap:]
        self.capacity = cap

    def buffer_bytes(self) -> int:
        return sum(
            sys.getsizeof(b)
            for b in (self.arena, self.public, self.thresholds, self.flags, self.policy, self.suite)
        )


#: Most distinct policy names one store holds (one byte per account indexes them).
MAX_POLICIES_PER_STORE: Final = 255


class ShareStore:
    """Every account's key share, compactly, with lazy or full point verification.

    Build one with :meth:`load_sealed` (production) or :meth:`load_plaintext` (development).

    Verification trade-off: a sealed bundle is authenticated and was fully validated when it
    was sealed, and the point checks (both points in the prime-order subgroup, and
    ``signing_share·G == verifying_share``) cost about 45 µs per account, i.e. 45 s for a
    million accounts, over the load budget. So a sealed load always does every structural
    check (lengths, account id, canonical non-zero scalars, thresholds, duplicates, counts) and
    does the point checks either for every record (``verify="full"``) or lazily
    (``verify="lazy"``, the default): :meth:`get` checks an unverified slot once before
    returning it and remembers success. A bad record is then found at first use instead of at
    boot. Plaintext loads always verify fully.

    Attributes:
        fingerprint: SHA-256 (hex) of the sealed bundle's body (every byte but the signature
            record; the whole file if unsigned), or None for plaintext loads.
        signer: the Ed25519 public key that signed the bundle, or None (unsigned or plaintext).
        load_seconds: wall time the load took.
    """

    def __init__(self, capacity: int = 0) -> None:
        self._index: dict[str, int] = {}
        self._arena = bytearray(32 * capacity)
        self._public = bytearray(_PUB * capacity)
        self._thresholds = array("H", bytes(4 * capacity))
        self._flags = bytearray(capacity)
        self._policy = bytearray(capacity)
        self._policy_names: list[str] = ["default"]
        self._policy_index: dict[bytes, int] = {b"": 0, b"default": 0}
        self._capacity = capacity
        self._count = 0
        # Both secp256k1 suites (33-byte elements); empty until such an account arrives.
        self._wide = _Lane(33)
        self._closed = False
        self.fingerprint: str | None = None
        self.signer: bytes | None = None
        self.load_seconds = 0.0

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._loaded} accounts"
        return f"<ShareStore {state} fingerprint={self.fingerprint}>"

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load_sealed(
        cls,
        fileobj: IO[bytes],
        provider: DataKeyProvider,
        *,
        progress: Progress | None = None,
        verify: Literal["lazy", "full"] = "lazy",
        memory_check: MemoryCheck | None = None,
        trust: BundleTrust | None = None,
    ) -> ShareStore:
        """Stream a sealed bundle into a new store (1 MiB reads, one chunk in clear at a time).

        Args:
            fileobj: the sealed bundle, opened for binary reading. If it is seekable, its size
                bounds the header's counts (a forged count is refused before anything else).
            provider: unwraps the bundle's data key.
            progress: called as ``progress(accounts_done, accounts_total)`` after every chunk.
            verify: ``"lazy"`` (default) or ``"full"``; see the class docstring.
            memory_check: called with the header's account count before the data key is
                unwrapped; raises to refuse a bundle that would not fit (as the enclave does).
            trust: which signers to accept (see :class:`SealedLoader`); None checks none.

        Cancellation:
            Synchronous and CPU-bound (about 2.3 s per million accounts on a 2-core machine).
            To load from a network stream, feed a :class:`SealedLoader` instead.

        Error handling:
            ``ShareFileError`` (format, integrity and record codes, records numbered from 1)
            or ``KeyWrapError``. On any error the partial arena is zeroed.
        """
        loader = SealedLoader(
            provider,
            verify=verify,
            progress=progress,
            total_bytes=input_size(fileobj),
            memory_check=memory_check,
            trust=trust,
        )
        try:
            while data := fileobj.read(READ_SIZE):
                loader.feed(data)
            return loader.finish()
        except BaseException:
            loader.abort()
            raise

    @classmethod
    def load_plaintext(cls, fileobj: IO[bytes], *, progress: Progress | None = None) -> ShareStore:
        """Load a plaintext JSON Lines file (development path; always fully verified).

        ``progress(done, 0)`` is called every 1000 records (the total is unknown).
        """
        t0 = time.perf_counter()
        store = cls(0)
        try:
            for rec in read_plaintext(fileobj):
                try:
                    store._add_record(rec)
                finally:
                    rec.zero()
                if progress is not None and store._loaded % 1000 == 0:
                    progress(store._loaded, 0)
        except BaseException:
            store.close()
            raise
        if progress is not None:
            progress(store._loaded, store._loaded)
        store.load_seconds = time.perf_counter() - t0
        return store

    def _grow(self, need: int, limit: int | None = None) -> None:
        """Make room for ``need`` slots (doubling, at least 1024, at most ``limit``)."""
        cap = max(need, 2 * self._capacity, 1024)
        if limit is not None:
            cap = max(need, min(cap, limit))
        if cap <= self._capacity:
            return
        arena = bytearray(32 * cap)
        arena[: len(self._arena)] = self._arena
        _sodium.memzero(self._arena)
        self._arena = arena
        extra = cap - self._capacity
        self._public += bytes(_PUB * extra)
        self._thresholds.frombytes(bytes(4 * extra))
        self._flags += bytes(extra)
        self._policy += bytes(extra)
        self._capacity = cap

    @property
    def _loaded(self) -> int:
        """Accounts held, both lanes."""
        return self._count + self._wide.count

    def _add_record(self, rec: ShareRecord) -> None:
        """Add a fully validated record (plaintext path); duplicates were refused upstream."""
        if rec.ciphersuite != CIPHERSUITE:
            self._add_wide_record(rec, scheme_named(rec.ciphersuite))
            return
        slot = self._count
        if slot == self._capacity:
            self._grow(slot + 1)
        if rec.account_id in self._index:  # pragma: no cover - the reader refuses duplicates
            raise InternalError("duplicate account reached ShareStore._add_record")
        self._arena[32 * slot : 32 * slot + 32] = rec.signing_share
        o = _PUB * slot
        self._public[o : o + 32] = rec.identifier
        self._public[o + 32 : o + 64] = rec.verifying_share
        self._public[o + 64 : o + 96] = rec.group_public_key
        self._thresholds[2 * slot] = rec.min_signers
        self._thresholds[2 * slot + 1] = rec.max_signers
        self._flags[slot] = VERIFIED
        self._policy[slot] = self._policy_slot(rec.policy.encode("utf-8"), None)
        self._index[rec.account_id] = slot
        self._count = slot + 1

    def _add_wide_record(self, rec: ShareRecord, scheme: Scheme) -> None:
        lane = self._wide
        if scheme.element_size != lane.element_size:  # pragma: no cover - two lanes suffice
            raise InternalError(f"no store lane for {scheme.name}")
        if rec.account_id in self._index:  # pragma: no cover - the reader refuses duplicates
            raise InternalError("duplicate account reached ShareStore._add_record")
        slot = lane.count
        if slot == lane.capacity:
            lane.grow(slot + 1)
        n = lane.element_size
        lane.arena[32 * slot : 32 * slot + 32] = rec.signing_share
        o = lane.stride * slot
        lane.public[o : o + 32] = rec.identifier
        lane.public[o + 32 : o + 32 + n] = rec.verifying_share
        lane.public[o + 32 + n : o + 32 + 2 * n] = rec.group_public_key
        lane.thresholds[2 * slot] = rec.min_signers
        lane.thresholds[2 * slot + 1] = rec.max_signers
        lane.flags[slot] = VERIFIED
        lane.policy[slot] = self._policy_slot(rec.policy.encode("utf-8"), None)
        lane.suite[slot] = scheme.code
        self._index[rec.account_id] = ~slot
        lane.count = slot + 1

    def _policy_slot(self, raw: bytes, record: int | None) -> int:
        """The index of policy ``raw`` (b"" = default), adding it (checked) if new."""
        found = self._policy_index.get(raw)
        if found is not None:
            return found
        name = raw.decode("utf-8", "replace")
        check_policy(name, record=record)
        if len(self._policy_names) >= MAX_POLICIES_PER_STORE:
            raise record_error(
                f"more than {MAX_POLICIES_PER_STORE} distinct policies",
                reason="bad_policy",
                record=record,
            )
        self._policy_index[raw] = len(self._policy_names)
        self._policy_names.append(name)
        return self._policy_index[raw]

    def policies(self) -> frozenset[str]:
        """The policy names the loaded accounts use (the enclave checks each is configured)."""
        self._check_open()
        used = set(self._policy[: self._count]) | set(self._wide.policy[: self._wide.count])
        return frozenset(self._policy_names[i] for i in used)

    def ciphersuites(self) -> dict[str, int]:
        """Accounts per ciphersuite name (only the suites present), in suite-code order."""
        self._check_open()
        wide = self._wide
        counts = {
            scheme.name: self._count
            if scheme is ED25519
            else wide.suite.count(scheme.code, 0, wide.count)
            for scheme in SCHEMES
        }
        return {name: n for name, n in counts.items() if n}

    def _ingest(self, pt: bytearray, *, full: bool, v2: bool = False) -> None:
        """Parse one decrypted chunk of ``binary-v1`` (``v2``: ``binary-v2``) records into the
        next slots.

        The hot loop of a sealed load: memoryview slices straight into the arena, no per-record
        objects other than the account id ``str`` and its slot ``int`` (which the index keeps).
        """
        index = self._index
        thresholds = self._thresholds
        flags = self._flags
        policy = self._policy
        policy_index = self._policy_index
        capacity = self._capacity
        slot = self._count
        pos, end = 0, len(pt)
        with (
            memoryview(pt) as mv,
            memoryview(self._arena) as arena,
            memoryview(self._public) as public,
        ):
            while pos < end:
                number = slot + 1
                alen = pt[pos]
                p = pos + 1 + alen
                pslot = 0
                if v2:
                    plen = pt[p] if p < end else 0
                    if p < end and plen:
                        raw = bytes(mv[p + 1 : p + 1 + plen])
                        found = policy_index.get(raw)
                        pslot = found if found is not None else self._policy_slot(raw, number)
                    p += 1 + plen
                stop = p + 132
                if alen == 0 or stop > end:
                    if alen == 0:
                        raise record_error(
                            "account_id is empty", reason="bad_account_id", record=number
                        )
                    raise record_error(
                        "record does not fit in its chunk", reason="bad_record", record=number
                    )
                if slot == capacity:
                    raise record_error(
                        f"more records than the {capacity} the header declares",
                        reason="count_mismatch",
                        record=number,
                    )
                try:
                    account_id = str(mv[pos + 1 : pos + 1 + alen], "utf-8")
                except UnicodeDecodeError:
                    raise record_error(
                        "account_id is not valid UTF-8", reason="bad_account_id", record=number
                    ) from None
                if not account_id.isprintable():
                    check_account_id(account_id, record=number)
                share = mv[p + 32 : p + 64]
                ident = int.from_bytes(mv[p : p + 32], "little")
                # Fast path for the secret share, with no Python int copy of it: a top byte
                # below 0x10 means share < 2**252 < L, and count() scans all 32 bytes (no early
                # exit) for the zero check. Anything else takes the libsodium path in
                # check_scalars, which raises the precise error.
                if (
                    ident == 0
                    or ident >= _L
                    or pt[p + 63] >= 0x10
                    or pt.count(0, p + 32, p + 64) == 32
                ):
                    check_scalars(mv[p : p + 32], share, record=number)
                mn, mx = _U16X2.unpack_from(pt, p + 128)
                if not 2 <= mn <= mx:
                    check_threshold(mn, mx, record=number)
                if full:
                    check_points(share, mv[p + 64 : p + 96], mv[p + 96 : p + 128], record=number)
                    flags[slot] = VERIFIED
                first = index.setdefault(account_id, slot)
                if first != slot:
                    raise record_error(
                        f"duplicate account_id (first seen at record {first + 1})",
                        reason="duplicate_account",
                        record=number,
                    )
                a = slot << 5
                arena[a : a + 32] = share
                o = slot * _PUB
                public[o : o + 32] = mv[p : p + 32]
                public[o + 32 : o + 96] = mv[p + 64 : p + 128]
                thresholds[2 * slot] = mn
                thresholds[2 * slot + 1] = mx
                policy[slot] = pslot
                slot += 1
                pos = stop
            self._count = slot

    def _ingest_v3(self, pt: bytearray, *, full: bool, limits: tuple[int, int]) -> None:
        """Parse one decrypted chunk of ``binary-v3`` records (a bundle with an account of a
        suite other than Ed25519) into the next slot of each record's lane.

        ``limits`` is how many accounts the (authenticated) header declares for the Ed25519
        lane and for the wide lane; a record beyond its lane's count is ``count_mismatch``.
        Every length is checked against the chunk before anything is read or allocated from
        it. A lane grows with the records found (doubling, never beyond its declared count,
        so a genuine bundle ends with arenas of exactly its size), never from the header
        alone.
        """
        ed_limit, wide_limit = limits
        index = self._index
        policy_index = self._policy_index
        wide = self._wide
        pos, end = 0, len(pt)
        with memoryview(pt) as mv:
            while pos < end:
                loaded = self._count + wide.count
                number = loaded + 1
                alen = pt[pos]
                p = pos + 1 + alen
                if alen == 0:
                    raise record_error(
                        "account_id is empty", reason="bad_account_id", record=number
                    )
                # u8 policy length, the policy, then the u8 suite code, all inside the chunk.
                if p >= end or p + 1 + pt[p] >= end:
                    raise record_error(
                        "record does not fit in its chunk", reason="bad_record", record=number
                    )
                plen = pt[p]
                scheme = scheme_coded(pt[p + 1 + plen], record=number)
                n = scheme.element_size
                q = p + 2 + plen  # the identifier
                stop = q + 68 + 2 * n
                if stop > end:
                    raise record_error(
                        "record does not fit in its chunk", reason="bad_record", record=number
                    )
                wide_record = scheme is not ED25519
                if (wide.count if wide_record else self._count) == (
                    wide_limit if wide_record else ed_limit
                ):
                    raise record_error(
                        f"more {scheme.name} records than the header declares",
                        reason="count_mismatch",
                        record=number,
                    )
                pslot = 0
                if plen:
                    raw = bytes(mv[p + 1 : p + 1 + plen])
                    found = policy_index.get(raw)
                    pslot = found if found is not None else self._policy_slot(raw, number)
                try:
                    account_id = str(mv[pos + 1 : pos + 1 + alen], "utf-8")
                except UnicodeDecodeError:
                    raise record_error(
                        "account_id is not valid UTF-8", reason="bad_account_id", record=number
                    ) from None
                if not account_id.isprintable():
                    check_account_id(account_id, record=number)
                share = mv[q + 32 : q + 64]
                if scheme is ED25519:
                    # As in _ingest: share < 2**252 < L when its top byte is below 0x10.
                    ident = int.from_bytes(mv[q : q + 32], "little")
                    slow = ident == 0 or ident >= _L or pt[q + 63] >= 0x10
                else:
                    # Big-endian: a top byte below 0xFF means share < n.
                    ident = int.from_bytes(mv[q : q + 32], "big")
                    slow = ident == 0 or ident >= _N or pt[q + 32] == 0xFF
                if slow or pt.count(0, q + 32, q + 64) == 32:
                    check_scalars(mv[q : q + 32], share, record=number, scheme=scheme)
                mn, mx = _U16X2.unpack_from(pt, q + 64 + 2 * n)
                if not 2 <= mn <= mx:
                    check_threshold(mn, mx, record=number)
                if full:
                    check_points(
                        share,
                        mv[q + 64 : q + 64 + n],
                        mv[q + 64 + n : q + 64 + 2 * n],
                        record=number,
                        scheme=scheme,
                    )
                if scheme is ED25519:
                    slot = self._count
                    key = slot
                else:
                    if n != wide.element_size:  # pragma: no cover - two lanes suffice
                        raise InternalError(f"no store lane for {scheme.name}")
                    slot = wide.count
                    key = ~slot
                first = index.setdefault(account_id, key)
                if first != key:
                    raise record_error(
                        "duplicate account_id", reason="duplicate_account", record=number
                    )
                if scheme is ED25519:
                    if slot == self._capacity:
                        self._grow(slot + 1, limit=ed_limit)
                    self._arena[slot << 5 : (slot << 5) + 32] = share
                    o = slot * _PUB
                    self._public[o : o + 32] = mv[q : q + 32]
                    self._public[o + 32 : o + 96] = mv[q + 64 : q + 128]
                    self._thresholds[2 * slot] = mn
                    self._thresholds[2 * slot + 1] = mx
                    self._policy[slot] = pslot
                    if full:
                        self._flags[slot] = VERIFIED
                    self._count = slot + 1
                else:
                    if slot == wide.capacity:
                        wide.grow(slot + 1, limit=wide_limit)
                    wide.arena[slot << 5 : (slot << 5) + 32] = share
                    o = slot * wide.stride
                    wide.public[o : o + 32] = mv[q : q + 32]
                    wide.public[o + 32 : o + 32 + 2 * n] = mv[q + 64 : q + 64 + 2 * n]
                    wide.thresholds[2 * slot] = mn
                    wide.thresholds[2 * slot + 1] = mx
                    wide.policy[slot] = pslot
                    wide.suite[slot] = scheme.code
                    if full:
                        wide.flags[slot] = VERIFIED
                    wide.count = slot + 1
                pos = stop

    def _single_lane(self) -> bool:
        """True while every account is in one lane, so a slot + 1 is its record number."""
        return self._count == 0 or self._wide.count == 0

    def _trim(self) -> None:
        """Shrink both lanes to their counts (a ``binary-v3`` load's lanes grow by doubling).
        Old arenas are zeroed."""
        count = self._count
        if self._capacity > count:
            arena = bytearray(32 * count)
            arena[:] = memoryview(self._arena)[: 32 * count]
            _sodium.memzero(self._arena)
            self._arena = arena
            del self._public[_PUB * count :]
            del self._thresholds[2 * count :]
            del self._flags[count:]
            del self._policy[count:]
            self._capacity = count
        if self._wide.capacity > self._wide.count:
            self._wide.resize(self._wide.count)

    # -- deltas (docs/key-lifecycle.md §1) ---------------------------------------------------

    def check_delta(self, delta: ShareStore, operation: str) -> None:
        """Refuse ``delta`` (a verified delta bundle's records, loaded into a store of their
        own) unless ``operation`` may apply it here; nothing is changed.

        ``create`` adds accounts that do not exist; ``refresh`` and ``repair`` replace
        existing accounts' shares, which must keep their ciphersuite, group key and
        thresholds. A replacing record's points are checked here (a lazy check would find a
        bad one only after the old share was gone).

        Error handling:
            ``ShareFileError``: ``delta_account_exists``, ``delta_account_mismatch``,
            ``bad_header`` (an unknown operation), ``bad_policy`` (more than
            :data:`MAX_POLICIES_PER_STORE` policies in all), or the point checks' codes.
        """
        self._check_open()
        delta._check_open()
        if operation not in ("create", "refresh", "repair"):
            raise ShareFileError(f"unknown delta operation {operation!r}", reason="bad_header")
        new_names = {delta._policy_names[i] for i in delta._used_policy_indices()}
        new_names.difference_update(self._policy_names)
        if len(self._policy_names) + len(new_names) > MAX_POLICIES_PER_STORE:
            raise ShareFileError(
                f"the delta would make more than {MAX_POLICIES_PER_STORE} distinct policies",
                reason="bad_policy",
            )
        index = self._index
        if operation == "create":
            for account_id in delta._index:
                if account_id in index:
                    raise ShareFileError(
                        f"a create delta names account {_shown(account_id)!r}, which exists",
                        reason="delta_account_exists",
                    )
            return
        for account_id in delta._index:
            if account_id not in index:
                raise ShareFileError(
                    f"a {operation} delta names account {_shown(account_id)!r}, which does "
                    "not exist",
                    reason="delta_account_mismatch",
                )
            old, new = self._public_view(account_id), delta._public_view(account_id)
            if old != new:
                raise ShareFileError(
                    f"a {operation} delta changes account {_shown(account_id)!r}'s "
                    f"{_first_difference(old, new)}",
                    reason="delta_account_mismatch",
                )
            delta.get(account_id)  # the point checks, now (raises on a bad record)

    def apply_delta(self, delta: ShareStore, operation: str) -> None:
        """Apply a verified delta: all of it or (on any refusal) nothing.

        ``create`` appends ``delta``'s accounts; ``refresh``/``repair`` write each record over
        its account's slot, the old share zeroed first. The new accounts and shares become
        visible to :meth:`get` together, once every check passed (:meth:`check_delta` runs
        first). ``delta`` is left as it was: the caller closes (zeroes) it. Slots keep the
        verification state they had in ``delta`` (a lazily loaded delta is checked at first
        use, as a lazily loaded base is).

        Error handling: what :meth:`check_delta` raises; nothing has changed then.
        """
        self.check_delta(delta, operation)
        # The delta's policy indices, translated to ours (bytes.translate on its policy bytes).
        table = bytearray(256)
        for i, name in enumerate(delta._policy_names):
            table[i] = self._policy_slot(name.encode("utf-8"), None)
        if operation == "create":
            self._append(delta, table)
        else:
            self._replace(delta, table)

    def _used_policy_indices(self) -> set[int]:
        return set(self._policy[: self._count]) | set(self._wide.policy[: self._wide.count])

    def _public_view(self, account_id: str) -> tuple[str, bytes, int, int]:
        """(suite, group key, min, max) of an account: what a refresh must keep."""
        slot = self._index[account_id]
        if slot >= 0:
            o = slot * _PUB
            return (
                ED25519.name,
                bytes(self._public[o + 64 : o + 96]),
                self._thresholds[2 * slot],
                self._thresholds[2 * slot + 1],
            )
        lane, w = self._wide, ~slot
        n = lane.element_size
        o = w * lane.stride + 32 + n
        return (
            SCHEMES[lane.suite[w]].name,
            bytes(lane.public[o : o + n]),
            lane.thresholds[2 * w],
            lane.thresholds[2 * w + 1],
        )

    def _append(self, delta: ShareStore, table: bytearray) -> None:
        """Copy every slot of ``delta`` after ours, lane by lane; the index last."""
        n, base = delta._count, self._count
        if n:
            need = base + n
            if need > self._capacity:
                # Grow by an eighth (not double): a million-account store takes many small
                # deltas without doubling its memory.
                cap = max(need, self._capacity + self._capacity // 8 + 1024)
                self._grow(cap, limit=cap)
            self._arena[32 * base : 32 * need] = memoryview(delta._arena)[: 32 * n]
            self._public[_PUB * base : _PUB * need] = memoryview(delta._public)[: _PUB * n]
            self._thresholds[2 * base : 2 * need] = delta._thresholds[: 2 * n]
            self._flags[base:need] = delta._flags[:n]
            self._policy[base:need] = delta._policy[:n].translate(table)
        wn, lane, wbase = delta._wide.count, self._wide, self._wide.count
        if wn:
            src = delta._wide
            need = wbase + wn
            if need > lane.capacity:
                cap = max(need, lane.capacity + lane.capacity // 8 + 1024)
                lane.grow(cap, limit=cap)
            st = lane.stride
            lane.arena[32 * wbase : 32 * need] = memoryview(src.arena)[: 32 * wn]
            lane.public[st * wbase : st * need] = memoryview(src.public)[: st * wn]
            lane.thresholds[2 * wbase : 2 * need] = src.thresholds[: 2 * wn]
            lane.flags[wbase:need] = src.flags[:wn]
            lane.policy[wbase:need] = src.policy[:wn].translate(table)
            lane.suite[wbase:need] = src.suite[:wn]
        self._count = base + n
        lane.count = wbase + wn
        index = self._index
        for account_id, slot in delta._index.items():
            index[account_id] = slot + base if slot >= 0 else ~(~slot + wbase)

    def _replace(self, delta: ShareStore, table: bytearray) -> None:
        """Write each of ``delta``'s records over its account's slot (same lane: the suite is
        the same), zeroing the old share first."""
        for account_id, src_slot in delta._index.items():
            slot = self._index[account_id]
            if slot >= 0:
                s = src_slot
                arena, public, stride = self._arena, self._public, _PUB
                src_arena, src_public = delta._arena, delta._public
                self._policy[slot] = table[delta._policy[s]]
                self._flags[slot] = delta._flags[s]
            else:
                slot, s = ~slot, ~src_slot
                lane, src = self._wide, delta._wide
                arena, public, stride = lane.arena, lane.public, lane.stride
                src_arena, src_public = src.arena, src.public
                lane.policy[slot] = table[src.policy[s]]
                lane.flags[slot] = src.flags[s]
            with memoryview(arena) as mv:
                _sodium.memzero(mv[32 * slot : 32 * slot + 32])
            arena[32 * slot : 32 * slot + 32] = memoryview(src_arena)[32 * s : 32 * s + 32]
            public[stride * slot : stride * (slot + 1)] = memoryview(src_public)[
                stride * s : stride * (s + 1)
            ]

    # -- access ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ShareFileError("the share store is closed", reason="closed")

    def __len__(self) -> int:
        self._check_open()
        return self._loaded

    @property
    def accounts(self) -> int:
        """Number of accounts held."""
        return len(self)

    def __contains__(self, account_id: object) -> bool:
        self._check_open()
        return account_id in self._index

    def __getitem__(self, account_id: str) -> AccountShare:
        share = self.get(account_id)
        if share is None:
            raise KeyError(account_id)
        return share

    def get(self, account_id: str) -> AccountShare | None:
        """The account's share view, or None if the account is unknown.

        Error handling:
            On first access to a slot loaded with ``verify="lazy"``, runs the suite's point
            checks and raises ``ShareFileError`` (``invalid_point`` or ``share_mismatch``, with
            the record number, or the account id in a store holding several suites) if they
            fail; ``reason="closed"`` after :meth:`close`.
        """
        self._check_open()
        slot = self._index.get(account_id)
        if slot is None:
            return None
        if slot < 0:
            return self._get_wide(account_id, ~slot)
        a = slot << 5
        o = slot * _PUB
        arena = memoryview(self._arena)[a : a + 32].toreadonly()
        pub = self._public
        vs = bytes(pub[o + 32 : o + 64])
        gk = bytes(pub[o + 64 : o + 96])
        if not self._flags[slot] & VERIFIED:
            self._verify(ED25519, arena, vs, gk, slot, account_id)
            self._flags[slot] |= VERIFIED
        return AccountShare(
            account_id=account_id,
            identifier=bytes(pub[o : o + 32]),
            signing_share=arena,
            verifying_share=vs,
            group_public_key=gk,
            min_signers=self._thresholds[2 * slot],
            max_signers=self._thresholds[2 * slot + 1],
            policy=self._policy_names[self._policy[slot]],
        )

    def _get_wide(self, account_id: str, slot: int) -> AccountShare:
        lane = self._wide
        n = lane.element_size
        scheme = SCHEMES[lane.suite[slot]]
        a = slot << 5
        o = slot * lane.stride
        arena = memoryview(lane.arena)[a : a + 32].toreadonly()
        pub = lane.public
        vs = bytes(pub[o + 32 : o + 32 + n])
        gk = bytes(pub[o + 32 + n : o + 32 + 2 * n])
        if not lane.flags[slot] & VERIFIED:
            self._verify(scheme, arena, vs, gk, slot, account_id)
            lane.flags[slot] |= VERIFIED
        return AccountShare(
            account_id=account_id,
            identifier=bytes(pub[o : o + 32]),
            signing_share=arena,
            verifying_share=vs,
            group_public_key=gk,
            min_signers=lane.thresholds[2 * slot],
            max_signers=lane.thresholds[2 * slot + 1],
            policy=self._policy_names[lane.policy[slot]],
            ciphersuite=scheme.name,
        )

    def _verify(
        self, scheme: Scheme, share: memoryview, vs: bytes, gk: bytes, slot: int, account_id: str
    ) -> None:
        """The lazy point check of one slot. The error names the record number while the
        store has one lane (slot + 1 is then the record's number), else the account."""
        if self._single_lane():
            check_points(share, vs, gk, record=slot + 1, scheme=scheme)
            return
        problem = scheme.point_problem(share, vs, gk)
        if problem is not None:
            shown = account_id if len(account_id) <= 64 else account_id[:61] + "..."
            raise ShareFileError(f"account {shown!r}: {problem[0]}", reason=problem[1])

    def is_verified(self, account_id: str) -> bool:
        """True if the account's points have been checked (always, after a full load)."""
        self._check_open()
        slot = self._index[account_id]
        if slot < 0:
            return bool(self._wide.flags[~slot] & VERIFIED)
        return bool(self._flags[slot] & VERIFIED)

    def nbytes(self) -> int:
        """Estimated bytes held by the store (buffers, index, keys and slot ints)."""
        self._check_open()
        n = (
            sys.getsizeof(self._arena)
            + sys.getsizeof(self._public)
            + sys.getsizeof(self._thresholds)
            + sys.getsizeof(self._flags)
            + sys.getsizeof(self._policy)
            + sys.getsizeof(self._index)
            + self._wide.buffer_bytes()
        )
        n += sum(sys.getsizeof(k) for k in self._index)
        # Slot ints in -5..256 are shared singletons; the rest are one object per account.
        n += sys.getsizeof(1 << 20) * (max(0, self._count - 257) + max(0, self._wide.count - 5))
        return n

    def __enter__(self) -> ShareStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Zero every lane's signing-share arena and drop the index. Idempotent."""
        _sodium.memzero(self._arena)
        _sodium.memzero(self._wide.arena)
        self._index.clear()
        self._closed = True


def _shown(account_id: str) -> str:
    return account_id if len(account_id) <= 64 else account_id[:61] + "..."


def _first_difference(old: tuple[str, bytes, int, int], new: tuple[str, bytes, int, int]) -> str:
    for name, a, b in zip(
        ("ciphersuite", "group key", "min_signers", "max_signers"), old, new, strict=True
    ):
        if a != b:
            return name
    return "public data"  # pragma: no cover - called only when they differ


class SealedLoader:
    """Incremental loading of a sealed bundle into a new :class:`ShareStore`, bytes in.

    The sans-io form of :meth:`ShareStore.load_sealed`: feed the bundle's bytes as they arrive
    (from a file, or from the parent over the boot channel), then :meth:`finish`. Each call to
    :meth:`feed` does at most the work for the bytes given, so a Trio caller can feed ~1 MiB
    at a time and stay responsive. Every decrypted chunk is zeroed right after it is parsed.
    The store grows with the records decrypted (never sized from the header's count alone),
    so memory follows the bytes actually received.

    Args:
        provider: unwraps the bundle's data key when the header arrives.
        unwrap: instead of ``provider``: called with the (not yet authenticated) header, returns
            the 32-byte data key, which the loader zeroes after use. The enclave uses this: its
            data key arrives as KMS ``CiphertextForRecipient``. A wrong key fails chunk 0.
        verify: ``"lazy"`` (default) or ``"full"``; see :class:`ShareStore`.
        progress: called as ``progress(accounts_done, accounts_total)`` after every chunk.
        total_bytes: the bundle's size, if known up front: a header whose counts cannot fit in
            it is refused (``truncated``) before the key is unwrapped.
        memory_check: called with the header's account count before the key is unwrapped;
            raises to refuse the bundle.
        trust: the bundle's kind and the signers accepted (:class:`BundleTrust`); None (tools
            that only read, tests) checks no signature. The enclave always passes one.

    Signature check: the signature record comes after the FINAL chunk, so it is checked in
    :meth:`finish`, before the store is returned. Until then nothing decrypted has left the
    loader (the store is private to it); if the check fails, the store is zeroed and nothing
    is loaded.

    Error handling:
        ``ShareFileError`` or ``KeyWrapError`` from :meth:`feed` or :meth:`finish` (or what
        ``memory_check`` raises; :class:`BundleTrust`'s reasons from :meth:`finish`). The
        loader aborts itself first (the partial store and every decrypted chunk are zeroed);
        :meth:`abort` is idempotent, so callers may still call it.
        After an error the loader is unusable.
    """

    def __init__(
        self,
        provider: DataKeyProvider | None = None,
        *,
        unwrap: Callable[[dict[str, Any]], bytearray] | None = None,
        verify: Literal["lazy", "full"] = "lazy",
        progress: Progress | None = None,
        total_bytes: int | None = None,
        memory_check: MemoryCheck | None = None,
        trust: BundleTrust | None = None,
    ) -> None:
        if verify not in ("lazy", "full"):
            raise ValueError("verify must be 'lazy' or 'full'")
        if (provider is None) == (unwrap is None):
            raise ValueError("give exactly one of provider and unwrap")
        if unwrap is None:
            assert provider is not None
            unwrap = functools.partial(unwrap_data_key, provider=provider)
        self._unwrap = unwrap
        self._full = verify == "full"
        self._progress = progress
        self._memory_check = memory_check
        self._trust = trust
        self._signer: bytes | None = None
        self._decoder = SealedDecoder(total_bytes=total_bytes)
        self._store: ShareStore | None = None
        self.header: dict[str, Any] | None = None
        self._fingerprint: str | None = None
        self._lane_limits = (0, 0)
        self._t0 = time.perf_counter()

    @property
    def accounts_loaded(self) -> int:
        return 0 if self._store is None else self._store._loaded

    def feed(self, data: bytes) -> None:
        """Process the next bytes of the bundle (an empty ``data`` is a no-op)."""
        if data:
            try:
                self._handle(self._decoder.receive_data(data))
            except BaseException:
                self.abort()
                raise

    def finish(self) -> ShareStore:
        """The end of the bundle: check it is complete and return the loaded store."""
        try:
            self._handle(self._decoder.receive_eof())
        except BaseException:
            self.abort()
            raise
        self._decoder.close()
        store = self._store
        if store is None or self._fingerprint is None:  # pragma: no cover - eof raises first
            raise InternalError("sealed load ended without a bundle")
        store._trim()
        store.fingerprint = self._fingerprint
        store.signer = self._signer
        store.load_seconds = time.perf_counter() - self._t0
        self._store = None
        return store

    def abort(self) -> None:
        """Zero everything loaded so far and the decoder's key state. Idempotent."""
        self._decoder.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    def _handle(self, events: list[Any]) -> None:
        i = 0
        try:
            while i < len(events):
                ev = events[i]
                i += 1
                if isinstance(ev, ChunkDecrypted):
                    try:
                        assert self.header is not None
                        if self._store is None:
                            self._store = ShareStore(0)
                        # Room for as many records as this chunk can hold, never more than
                        # the header declares (so an extra record is still count_mismatch).
                        store = self._store
                        record_format = self.header["record_format"]
                        if record_format == RECORD_FORMAT_V3:
                            store._ingest_v3(
                                ev.plaintext, full=self._full, limits=self._lane_limits
                            )
                        else:
                            need = min(
                                self.header["accounts"],
                                store._count + len(ev.plaintext) // MIN_RECORD_BYTES,
                            )
                            if need > store._capacity:
                                store._grow(need, limit=self.header["accounts"])
                            store._ingest(
                                ev.plaintext,
                                full=self._full,
                                v2=record_format == RECORD_FORMAT_V2,
                            )
                    finally:
                        _sodium.memzero(ev.plaintext)
                    if self._progress is not None:
                        assert self.header is not None
                        self._progress(self._store._loaded, self.header["accounts"])
                elif isinstance(ev, HeaderReceived):
                    self.header = ev.header
                    counts = header_suite_counts(ev.header)
                    ed = counts.get(ED25519.name, 0)
                    self._lane_limits = (ed, sum(counts.values()) - ed)
                    if self._trust is not None:
                        self._trust.check_kind(ev.header)
                    if self._memory_check is not None:
                        self._memory_check(int(ev.header["accounts"]))
                    key = self._unwrap(ev.header)
                    try:
                        self._decoder.set_data_key(key)
                    finally:
                        _sodium.memzero(key)
                    events.extend(self._decoder.receive_data(b""))
                elif isinstance(ev, EndOfBundle):
                    if self._store is None or self.header is None:  # pragma: no cover
                        raise InternalError("EndOfBundle before any chunk")
                    check_record_count(self.header, self._store._loaded, self._store.ciphersuites())
                    if self._trust is not None:
                        self._trust.check(self.header, ev.digest, ev.signature)
                    self._signer = None if ev.signature is None else ev.signature.public_key
                    self._fingerprint = ev.sha256_hex
        except BaseException:
            zero_events(events[i:])
            raise
