"""A per-account rate limit in fixed memory (sans-io: the caller passes the time).

The enclave may hold millions of accounts, and a rate limit must not grow a dict of every
account id that ever signed. :class:`AccountRateLimiter` is a GCRA (generic cell rate
algorithm: ``rate`` per minute, a burst of ``rate``) whose per-account state lives in a
count-min sketch: ``rows`` arrays of ``buckets`` theoretical arrival times, each account
hashed (BLAKE2b under a per-process random key, so nobody outside can aim two accounts at
the same bucket) to one bucket per row. An account's state is the minimum over its buckets.
Sharing a bucket can only make an account *more* limited (a bucket holds the latest arrival
time of every account in it), never less: the limit fails closed. Memory is
``rows * buckets * 8`` bytes (1 MiB by default), whatever the number of accounts.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from typing import Final

DEFAULT_BUCKETS: Final = 1 << 16
DEFAULT_ROWS: Final = 2


class AccountRateLimiter:
    """At most ``rate_per_minute`` acquisitions per account in any minute, up to
    ``rate_per_minute`` at once after a quiet minute.

    Args:
        rate_per_minute: the limit (>= 1).
        buckets: buckets per row (a power of two is not required).
        rows: independent hash rows (more rows, fewer false refusals).
        key: the hashing key (tests pin it; default 16 random bytes).
    """

    def __init__(
        self,
        rate_per_minute: int,
        *,
        buckets: int = DEFAULT_BUCKETS,
        rows: int = DEFAULT_ROWS,
        key: bytes | None = None,
    ) -> None:
        if rate_per_minute < 1:
            raise ValueError("rate_per_minute must be >= 1")
        if buckets < 1 or not 1 <= rows <= 8:
            raise ValueError("buckets must be >= 1 and rows in 1..8")
        self.rate_per_minute = rate_per_minute
        self._interval = 60.0 / rate_per_minute
        self._tolerance = 60.0 - self._interval  # a burst of rate_per_minute
        self._buckets = buckets
        self._rows = [array("d", bytes(8 * buckets)) for _ in range(rows)]
        self._key = os.urandom(16) if key is None else key
        self._started: float | None = None

    @property
    def nbytes(self) -> int:
        """The state's size in bytes (fixed)."""
        return sum(row.itemsize * len(row) for row in self._rows)

    def _slots(self, account_id: str) -> list[int]:
        digest = hashlib.blake2b(
            account_id.encode("utf-8", "surrogatepass"),
            key=self._key,
            digest_size=8 * len(self._rows),
        ).digest()
        return [
            int.from_bytes(digest[8 * i : 8 * i + 8], "little") % self._buckets
            for i in range(len(self._rows))
        ]

    def acquire(self, account_id: str, now: float) -> bool:
        """Take one for ``account_id`` at time ``now`` (seconds, any monotonic clock): True
        if within the limit (and counted), False if over it (and not counted)."""
        # Times are kept relative to the first call, so a zeroed bucket means "long ago".
        if self._started is None:
            self._started = now - 60.0
        t = now - self._started
        slots = self._slots(account_id)
        tat = min(row[i] for row, i in zip(self._rows, slots, strict=True))
        tat = max(tat, t)
        if tat - t > self._tolerance + 1e-9:
            return False
        new = tat + self._interval
        for row, i in zip(self._rows, slots, strict=True):
            if row[i] < new:
                row[i] = new
        return True
