"""Per-source admission for the ingress: how fast one client address may open connections.

Behind the parent's pipe every connection reaches the enclave from the parent, so the enclave
cannot tell one client from another: its TLS handshake rate is server-wide, newest first, and a
single client that reconnects faster than that rate could keep gateways' *new* connections
waiting (docs/operations.md, "a known limit of newest-first"). The parent sees each client's
address; it lets each source start at most ``rate`` connections a second after a burst of
``burst`` (the generic cell rate algorithm), queueing a connection that comes early for at most
``max_wait_s`` and refusing it beyond. Sans-io: the clock is injected.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable

#: Sources remembered at once; the least recently seen is forgotten first (it then starts
#: over with a full burst: memory stays bounded whatever the number of addresses).
DEFAULT_MAX_SOURCES = 65536


def source_key(address: object) -> str | None:
    """The budget a peer address counts against: an IPv4 address, or an IPv6 /64 (one host
    usually holds a whole /64); None for what has no IP address (UNIX sockets, the local
    stand-ins), which is not limited."""
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return None
    try:
        ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class SourceBudget:
    """Connection starts per source: ``rate`` a second, ``burst`` at once.

    `reserve` answers when a connection from a source may start (now, or a moment later) or
    that it may not (it would wait more than ``max_wait_s``); a reserved start is spent even
    if the connection goes away meanwhile, so a source cannot get ahead by leaving early.
    """

    __slots__ = ("_clock", "_interval", "_max_sources", "_max_wait_s", "_tat", "_tolerance")

    def __init__(
        self,
        rate: float,
        burst: int,
        max_wait_s: float,
        clock: Callable[[], float],
        *,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if not max_wait_s >= 0:
            raise ValueError("max_wait_s must be >= 0")
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self._interval = 0.0 if math.isinf(rate) else 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._max_sources = max_sources
        # Source -> theoretical arrival time of its next start; least recently seen first.
        self._tat: dict[str, float] = {}

    @property
    def sources(self) -> int:
        """Sources remembered now (those with starts spent recently)."""
        return len(self._tat)

    def reserve(self, source: str | None) -> float | None:
        """When a connection from ``source`` arriving now may start, or None to refuse it.
        ``source`` None (no address) always starts now."""
        now = self._clock()
        if source is None or self._interval == 0.0:
            return now
        tat = max(self._tat.pop(source, now), now)
        start = max(now, tat - self._tolerance)
        if start - now > self._max_wait_s:
            self._tat[source] = tat  # refused: nothing spent, but seen last
            self._forget(now)
            return None
        self._tat[source] = tat + self._interval
        self._forget(now)
        return start

    def _forget(self, now: float) -> None:
        """Drop sources back at a full burst (nothing to remember), then the least recently
        seen beyond ``max_sources``."""
        tat = self._tat
        oldest = next(iter(tat), None)  # one look per call: O(1), and as fast as they come
        if oldest is not None and tat[oldest] <= now:
            del tat[oldest]
        while len(tat) > self._max_sources:
            del tat[next(iter(tat))]


__all__ = ["DEFAULT_MAX_SOURCES", "SourceBudget", "source_key"]
