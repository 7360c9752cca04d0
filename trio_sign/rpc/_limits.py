"""Limits of the gRPC server under hostile load (DESIGN §16), and the sans-io pieces that
enforce them below ``h2``: a frame gate that sees every frame header before ``h2`` does, the
per-connection flood counters, and the server-wide receive budget.

Nothing here awaits or reads a clock of its own: the clock is injected (``trio.current_time``
in the server, a fake in tests).
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

#: Client connection preface (RFC 9113 §3.4).
PREFACE_LEN: Final = 24

_HEADERS: Final = 0x1
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PING: Final = 0x6
_CONTINUATION: Final = 0x9
_END_HEADERS: Final = 0x4
_FRAME_HEADER_LEN: Final = 9
DEFAULT_MAX_SEND_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every bound of the gRPC server, one named setting each (docs/operations.md lists them).

    Attributes:
        max_connections: connections served at once. At the limit a new connection evicts the
            connection that has been idle (no open call) longest, or is refused if every
            connection is busy. Clamped below the process's open-file limit.
        max_concurrent_streams: calls per connection, enforced from the first frame (before the
            peer acknowledges our SETTINGS); streams beyond it are refused (REFUSED_STREAM).
        max_receive_message_size: largest request message of a method without its own cap.
        max_connection_receive_bytes: incomplete request data one connection may hold; None:
            twice the largest message cap plus 64 KiB.
        max_server_receive_bytes: incomplete request data all connections together may hold.
        max_connection_send_bytes: response bytes one connection may have waiting (for the
            peer's flow-control window or for the socket); above it the connection takes no
            new calls and is not read until it drains.
        preface_timeout_s: a new connection must send the HTTP/2 preface and SETTINGS within this.
        idle_timeout_s: a connection with no open call for this long is closed (GOAWAY).
        request_timeout_s: a request must be complete (END_STREAM) this long after its headers.
        send_timeout_s: a connection with responses waiting that makes no sending progress for
            this long is closed (a peer that never reads, or advertises a zero window).
        flood_interval_s: the interval the three flood limits below count over.
        max_resets: streams the peer may reset, or that we refuse, per interval beyond the
            calls it completed in that interval (rapid reset, CVE-2023-44487).
        max_pings: PING frames per interval.
        max_settings: SETTINGS frames per interval.
        flood_alert_s: how long after the server cut any connection for a flood new
            connections are treated as an attacker's reconnects (`FloodGuard`): the three
            limits below apply to them.
        max_resets_after_flood: ``max_resets`` of a connection opened in that time: an
            attacker who reconnects does not start with a fresh budget.
        connections_per_s_after_flood: in that time new connections start at most this many
            per second, in arrival order (the others wait, holding only a descriptor):
            reconnecting cannot make flooding cheap.
        max_paced_wait_s: no new connection waits longer than this for its turn; beyond
            that many waiting, the rate above is not enforced (a burst of connections
            during a flood must not keep a client out for long).
        flood_linger_s: a connection cut for a flood stays open this long after its GOAWAY
            is flushed, not read, before it is closed (0: close at once). A client that
            floods and reconnects when its connection closes waits instead of reconnecting
            at once; through the full stack each reconnect costs the enclave a TLS handshake
            and the parent a forwarded connection.
        max_lingering: connections lingering after a flood cut at once; one more closes the
            longest lingering. They count toward ``max_connections``, and go first when a
            new connection needs room.
        setups_per_batch: connections that end after their peer left, per pass of the event
            loop; the others wait their turn (`BatchPacer`): a thousand clients leaving at
            once otherwise made passes of 60 ms that every call waited behind. (Connections
            start one per pass already: the listeners hand them out one per checkpoint.)
        log_interval_s: refusals of one kind are logged at most once per this.
    """

    max_connections: int = 1000
    max_concurrent_streams: int = 128
    max_receive_message_size: int = 4 * 1024 * 1024
    max_connection_receive_bytes: int | None = None
    max_server_receive_bytes: int = 32 * 1024 * 1024
    max_connection_send_bytes: int = DEFAULT_MAX_SEND_BYTES
    preface_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    request_timeout_s: float = 10.0
    send_timeout_s: float = 10.0
    flood_interval_s: float = 10.0
    max_resets: int = 500
    max_pings: int = 1000
    max_settings: int = 100
    flood_alert_s: float = 2.0
    max_resets_after_flood: int = 8
    connections_per_s_after_flood: float = 50.0
    max_paced_wait_s: float = 0.25
    flood_linger_s: float = 1.0
    max_lingering: int = 64
    setups_per_batch: int = 16
    log_interval_s: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "max_connections",
            "max_concurrent_streams",
            "max_server_receive_bytes",
            "max_connection_send_bytes",
            "max_resets",
            "max_pings",
            "max_settings",
            "max_resets_after_flood",
            "max_lingering",
            "setups_per_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_receive_message_size < 0:
            raise ValueError("max_receive_message_size must be >= 0")
        if not self.flood_linger_s >= 0:
            raise ValueError("flood_linger_s must be >= 0")
        for name in (
            "preface_timeout_s",
            "idle_timeout_s",
            "request_timeout_s",
            "send_timeout_s",
            "flood_interval_s",
            "flood_alert_s",
            "connections_per_s_after_flood",
            "max_paced_wait_s",
            "log_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


def connection_limit(wanted: int, *, reserve: int = 64) -> int:
    """``wanted``, lowered so that that many connections plus ``reserve`` descriptors fit the
    process's open-file limit (a server out of descriptors cannot even refuse politely)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - no rlimit
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - reserve))


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (servers start with 1024 on most
    systems); return the soft limit now in force."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (OSError, ValueError):  # pragma: no cover - not permitted
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return int(soft)


class ReceiveBudget:
    """Bytes of incomplete request messages held by all connections of one server."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def exhausted(self) -> bool:
        return self.used > self.limit


class FloodGuard:
    """What a whole server remembers of floods, so that reconnecting does not reset them.

    Each connection counts its own resets, PINGs and SETTINGS (`FloodCounter`), but an
    attacker whose connection is cut can open another at once with a fresh budget: the
    rapid-reset bench reconnected 3,226 times in 10 s, and what each new connection cost
    (setup, and reading up to ``max_resets`` frames) added up to 7 s of CPU. For
    ``flood_alert_s`` after any connection was cut for a flood (an attacker that keeps
    reconnecting keeps that going), new connections therefore get ``max_resets_after_flood``
    instead of ``max_resets`` and start at most ``connections_per_s_after_flood`` per second,
    in arrival order, none waiting more than ``max_paced_wait_s``. The peers cannot be told
    apart (behind the ingress every connection comes from the parent), so this is
    server-wide; a legitimate client's connections that are already open keep their budgets,
    and one it opens meanwhile waits its turn (one slot per attacking connection waiting)
    and needs no more than a few resets.
    """

    __slots__ = ("_clock", "_interval", "_last_cut", "_limits", "_next_start")

    def __init__(self, limits: ServerLimits, clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        self._interval = 1.0 / limits.connections_per_s_after_flood
        self._last_cut = -float("inf")
        self._next_start = -float("inf")

    def cut(self) -> None:
        """A connection was cut for a flood (`GrpcServer.stats` counts them: ``floods``)."""
        self._last_cut = self._clock()

    @property
    def alert(self) -> bool:
        """True while the last flood cut is less than ``flood_alert_s`` old."""
        return self._clock() - self._last_cut < self._limits.flood_alert_s

    def start_time(self) -> float:
        """When a connection that arrives now may start: now, or while `alert`, the next free
        slot (one per ``1 / connections_per_s_after_flood`` s, first come first served), or
        if that is more than ``max_paced_wait_s`` away, then (taking no slot)."""
        now = self._clock()
        if not self.alert:
            return now
        start = max(now, self._next_start)
        if start - now > self._limits.max_paced_wait_s:
            return now + self._limits.max_paced_wait_s
        self._next_start = start + self._interval
        return start

    def counter(self) -> FloodCounter:
        """The flood counter of a connection that starts now."""
        limits = self._limits
        max_resets = limits.max_resets_after_flood if self.alert else limits.max_resets
        return FloodCounter(limits, self._clock, max_resets=min(max_resets, limits.max_resets))


class FloodCounter:
    """Per-connection counts of resets, PINGs and SETTINGS over a fixed interval.

    ``tripped`` names the limit that was crossed (the connection is then closed with
    GOAWAY ENHANCE_YOUR_CALM); it stays set. ``max_resets`` overrides the limits' own
    (`FloodGuard` lowers it for connections opened just after a flood).
    """

    __slots__ = (
        "_clock",
        "_interval",
        "_max_pings",
        "_max_resets",
        "_max_settings",
        "_window_end",
        "completed",
        "pings",
        "resets",
        "settings",
        "tripped",
    )

    def __init__(
        self, limits: ServerLimits, clock: Callable[[], float], *, max_resets: int | None = None
    ) -> None:
        self._clock = clock
        self._interval = limits.flood_interval_s
        self._max_resets = limits.max_resets if max_resets is None else max_resets
        self._max_pings = limits.max_pings
        self._max_settings = limits.max_settings
        self._window_end = clock() + self._interval
        self.resets = self.pings = self.settings = self.completed = 0
        self.tripped: str | None = None

    def _roll(self) -> None:
        now = self._clock()
        if now >= self._window_end:
            self._window_end = now + self._interval
            self.resets = self.pings = self.settings = self.completed = 0

    def reset(self) -> bool:
        """A stream was reset by the peer or refused by us. True if that crossed the limit."""
        self._roll()
        self.resets += 1
        if self.resets > self._max_resets + self.completed:
            self.tripped = "too many stream resets"
        return self.tripped is not None

    def ping(self) -> bool:
        self._roll()
        self.pings += 1
        if self.pings > self._max_pings:
            self.tripped = "too many PINGs"
        return self.tripped is not None

    def setting(self) -> bool:
        self._roll()
        self.settings += 1
        if self.settings > self._max_settings:
            self.tripped = "too many SETTINGS"
        return self.tripped is not None

    def call_completed(self) -> None:
        """A call was answered: legitimate work that earns room for one more reset."""
        self._roll()
        self.completed += 1


class FrameGate:
    """Sees every inbound frame header before ``h2`` does and cuts the byte stream so that
    each chunk opens at most one new stream, at its end.

    ``h2`` processes a whole chunk before reporting its events, and counts open streams with
    a scan of all of them for every new one; fed a 300 KB burst of HEADERS frames in one
    piece it would create 20,000 streams (quadratic CPU) before we could refuse the first
    excess one. Cut after each stream-opening header block, the core refuses excess streams
    as they come, so h2 never holds more than the limit.

    It also counts PING, SETTINGS and RST_STREAM frames (`FloodCounter`); when a limit is
    crossed it stops passing bytes at that frame (``counter.tripped`` says why). Only frame
    headers are read; payloads pass through as slices of the input.
    """

    __slots__ = ("_counter", "_cut_after", "_highest", "_in_block", "_pending", "_preface", "_skip")

    def __init__(self, counter: FloodCounter) -> None:
        self._counter = counter
        self._preface = PREFACE_LEN
        self._skip = 0  # bytes of the current frame still to pass through
        self._cut_after = False  # cut once the current frame has passed
        self._in_block = False  # inside a new stream's header block (CONTINUATION follows)
        self._highest = 0
        self._pending = b""  # an incomplete frame header

    def feed(self, data: bytes) -> list[bytes]:
        """Chunks to hand to ``h2`` in order. Empty once the flood counter has tripped."""
        counter = self._counter
        if counter.tripped is not None:
            return []
        if self._pending:
            data, self._pending = self._pending + data, b""
        out: list[bytes] = []
        n = len(data)
        pos = start = 0
        if self._preface:
            pos = min(self._preface, n)
            self._preface -= pos
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                pos += step
                self._skip -= step
                if not self._skip and self._cut_after:
                    self._cut_after = False
                    out.append(data[start:pos])
                    start = pos
                continue
            if n - pos < _FRAME_HEADER_LEN:
                self._pending = data[pos:]
                break
            length = int.from_bytes(data[pos : pos + 3], "big")
            ftype = data[pos + 3]
            cut = tripped = False
            if ftype == _HEADERS:
                stream_id = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                if stream_id > self._highest and stream_id & 1:
                    self._highest = stream_id
                    if data[pos + 4] & _END_HEADERS:
                        cut = True
                    else:
                        self._in_block = True
            elif ftype == _CONTINUATION:
                if self._in_block and data[pos + 4] & _END_HEADERS:
                    self._in_block = False
                    cut = True
            elif ftype == _PING:
                tripped = counter.ping()
            elif ftype == _SETTINGS:
                tripped = counter.setting()
            elif ftype == _RST_STREAM:
                tripped = counter.reset()
            if tripped:
                if pos > start:
                    out.append(data[start:pos])
                self._pending = b""
                return out
            self._skip = _FRAME_HEADER_LEN + length
            self._cut_after = cut
        end = n - len(self._pending)
        if end > start:
            out.append(data if start == 0 and end == n else data[start:end])
        return out


class LogThrottle:
    """Lets one kind of log line through at most once per interval and counts the rest."""

    __slots__ = ("_clock", "_interval", "_next", "_suppressed")

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval = interval_s
        self._clock = clock
        self._next = -float("inf")
        self._suppressed = 0

    def allow(self) -> int | None:
        """None to stay quiet; else how many lines were held back since the last one."""
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self._interval
        held, self._suppressed = self._suppressed, 0
        return held


class RateLimitedLog:
    """Logs one kind of refusal at most once per interval; the record's ``suppressed`` field
    counts the lines held back since the previous one.

    A flood of refusals must not become a flood of log lines (1381 WARNING lines in 30 s was
    one of the attacks).
    """

    __slots__ = ("_level", "_logger", "_message", "_throttle")

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        interval_s: float,
        clock: Callable[[], float],
        level: int = logging.WARNING,
    ) -> None:
        self._logger = logger
        self._message = message
        self._level = level
        self._throttle = LogThrottle(interval_s, clock)

    def __call__(self, **extra: object) -> None:
        held = self._throttle.allow()
        if held is not None:
            self._logger.log(self._level, self._message, extra={**extra, "suppressed": held})
