"""The decision hook: does this participant take part in a signing request?

A policy is anything with ``async decide(request) -> Decision``. Two come with the library:

* :class:`AutoPolicy`: an automatic rule from configuration: the accounts it signs for
  (``fnmatch`` patterns), the largest message, and a rate per account (a token bucket).
* :class:`CallbackPolicy`: an application's own ``async`` function, typically one that asks a
  person (a push notification, a ticket, a hardware button) and returns their answer.

The connection (:mod:`._client`) runs each decision in its own task under the request's
deadline, so a slow decision (a person who does not answer) never holds up another request;
a decision still pending at the deadline is declined ``expired``.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from . import _messages as m

log = logging.getLogger("trio_sign.participant")


@dataclass(frozen=True, slots=True)
class Decision:
    """``approve``, or not with a ``reason`` (one of the ``decline`` reasons) and a detail."""

    approve: bool
    reason: str = "rejected"
    detail: str = ""

    def __post_init__(self) -> None:
        if not self.approve and self.reason not in m.DECLINE_REASONS:
            raise ValueError(f"unknown decline reason {self.reason!r}")


APPROVE: Final = Decision(True)


class Policy(Protocol):
    async def decide(self, request: m.SignRequest) -> Decision: ...


class _TokenBucket:
    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate_per_s, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class AutoPolicy:
    """Approve a request when its account matches ``accounts``, its message is at most
    ``max_message_bytes``, and the account's rate allows it.

    Args:
        accounts: ``fnmatch`` patterns (``"*"``: every account); others are declined
            ``policy``.
        max_message_bytes: longer messages are declined ``policy``.
        rate_per_minute: requests per account per minute (a token bucket of that size, so a
            burst up to it is allowed); ``None`` for no limit.
        clock: seconds from a monotonic clock (tests pin it).
    """

    def __init__(
        self,
        *,
        accounts: Sequence[str] = ("*",),
        max_message_bytes: int = m.MAX_MESSAGE_BYTES,
        rate_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_tracked_accounts: int = 100_000,
    ) -> None:
        if rate_per_minute is not None and not rate_per_minute > 0:
            raise ValueError("rate_per_minute must be positive")
        self.accounts = tuple(accounts)
        self.max_message_bytes = max_message_bytes
        self.rate_per_minute = rate_per_minute
        self._clock = clock
        self._buckets: dict[str, _TokenBucket] = {}
        self._max_tracked = max_tracked_accounts

    def __repr__(self) -> str:
        return (
            f"AutoPolicy(accounts={list(self.accounts)!r}, max_message_bytes="
            f"{self.max_message_bytes}, rate_per_minute={self.rate_per_minute})"
        )

    def check(self, request: m.SignRequest) -> Decision:
        """The decision, synchronously."""
        if not any(fnmatch.fnmatchcase(request.account_id, p) for p in self.accounts):
            return Decision(False, "policy", "account not covered by this participant's policy")
        if len(request.message) > self.max_message_bytes:
            return Decision(False, "policy", f"message over {self.max_message_bytes} bytes")
        if self.rate_per_minute is not None:
            now = self._clock()
            bucket = self._buckets.get(request.account_id)
            if bucket is None:
                if len(self._buckets) >= self._max_tracked:
                    self._buckets.clear()  # bounded memory; a reset only forgives
                burst = max(1.0, self.rate_per_minute)
                bucket = self._buckets[request.account_id] = _TokenBucket(
                    self.rate_per_minute / 60.0, burst, now
                )
            if not bucket.take(now):
                return Decision(False, "policy", "rate limit for this account")
        return APPROVE

    async def decide(self, request: m.SignRequest) -> Decision:
        return self.check(request)

    async def decide_dkg(self, request: m.DkgRound1) -> Decision:
        """Take part in creating an account the ``accounts`` patterns cover."""
        if not any(fnmatch.fnmatchcase(request.account_id, p) for p in self.accounts):
            return Decision(False, "policy", "account not covered by this participant's policy")
        return APPROVE


class CallbackPolicy:
    """An application's decision function: ``async callback(request) -> bool | Decision``.

    ``True`` approves, ``False`` declines ``rejected``. An exception from the callback
    declines ``internal`` (and is logged with its type, never the request's message).
    Cancellation (the deadline) passes through.
    """

    def __init__(
        self,
        callback: Callable[[m.SignRequest], Awaitable[bool | Decision]],
        dkg_callback: Callable[[m.DkgRound1], Awaitable[bool | Decision]] | None = None,
    ) -> None:
        self._callback = callback
        self._dkg_callback = dkg_callback

    def __repr__(self) -> str:
        return f"CallbackPolicy({getattr(self._callback, '__qualname__', 'callback')})"

    async def decide_dkg(self, request: m.DkgRound1) -> Decision:
        """``dkg_callback``'s answer; without one, DKGs are declined ``policy``."""
        if self._dkg_callback is None:
            return Decision(False, "policy", "this participant takes no part in DKGs")
        try:
            answer = await self._dkg_callback(request)
        except Exception as exc:
            log.warning(
                "DKG decision callback failed (%s); declining request %s",
                type(exc).__name__,
                request.request_id,
            )
            return Decision(False, "internal", "the decision callback failed")
        if isinstance(answer, Decision):
            return answer
        return APPROVE if answer is True else Decision(False, "rejected", "declined by a person")

    async def decide(self, request: m.SignRequest) -> Decision:
        try:
            answer = await self._callback(request)
        except Exception as exc:
            log.warning(
                "decision callback failed (%s); declining request %s",
                type(exc).__name__,
                request.request_id,
            )
            return Decision(False, "internal", "the decision callback failed")
        if isinstance(answer, Decision):
            return answer
        return APPROVE if answer is True else Decision(False, "rejected", "declined by a person")
