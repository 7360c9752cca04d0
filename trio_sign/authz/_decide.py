"""The authorization decision for one ``Sign`` (DESIGN §11). Sans-io: the caller gives the
request, the clocks, and gets a :class:`Decision`; nothing here logs or touches a secret.

Checks, cheapest first, the first failure deciding (each one a stable ``reason``):

==========================  ====================================================================
reason                      refused because
==========================  ====================================================================
``unknown_policy``          the account's policy is not in the measured configuration
``message_too_large``       the message is longer than the policy's ``max_message_bytes``
``no_approvals``            the policy needs approvals and the request carries none
``too_many_approvals``      more approvals than the policy has approvers (refused unverified)
``unknown_approver``        an approval's key id is not one of the policy's approvers
``duplicate_approver``      two approvals by the same key (one key never counts twice)
``too_few_approvals``       fewer distinct approvers than the policy's threshold
``expired``                 ``expires_at_unix_ms`` + tolerance is in the past
``future_dated``            ``expires_at_unix_ms`` is further ahead than the longest lifetime
                            plus the tolerance (an approval that would outlive any sensible use)
``malformed_signature``     not 64 bytes, a non-canonical Ed25519 ``S``, P-256 ``r``/``s`` zero
                            or ``>= n``
``bad_signature``           does not verify over this account, session, message and expiry
``rate_limited``            the account is over its policy's ``rate_per_minute``
==========================  ====================================================================

Every approval carried must be valid, not just ``threshold`` of them: a request that carries a
bad approval is refused, which keeps the reason exact. A policy with threshold 0 exists only
in the built-in development configuration; it ignores approvals.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from .._errors import TrioSignError
from ._keys import KEY_ID_PATTERN
from ._payload import INT64_MAX, INT64_MIN, approval_payload_for_digest
from ._policy import PolicySet
from ._ratelimit import AccountRateLimiter

#: Default clock tolerance: an approval is still accepted this long after it expired, and may
#: expire this much beyond the longest lifetime (clocks of approvers and enclave differ).
DEFAULT_CLOCK_TOLERANCE_S: Final = 30.0
#: Default longest lifetime of an approval, from now to its expiry.
DEFAULT_MAX_LIFETIME_S: Final = 600.0
#: Every refusal reason (bounded: they are metric labels).
REASONS: Final = (
    "unknown_policy",
    "message_too_large",
    "no_approvals",
    "too_many_approvals",
    "unknown_approver",
    "duplicate_approver",
    "too_few_approvals",
    "expired",
    "future_dated",
    "malformed_signature",
    "bad_signature",
    "rate_limited",
)


class ApprovalFields(Protocol):
    """What is read of an approval: the ``Approval`` protobuf message as received fits."""

    @property
    def key_id(self) -> str: ...

    @property
    def signature(self) -> bytes: ...

    @property
    def expires_at_unix_ms(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """One authorization decision (what the audit record says).

    Attributes:
        allowed: whether the Sign may go on.
        reason: ``"allowed"`` or one of :data:`REASONS`.
        detail: one line for the caller, naming what is missing (no key material).
        policy: the account's policy name.
        approvers: the key ids the request carried (ids that are not valid key ids as
            ``"<invalid>"``), in order.
        message_sha256: SHA-256 of the message, hex.
    """

    allowed: bool
    reason: str
    detail: str
    policy: str
    approvers: tuple[str, ...]
    message_sha256: str


class ApprovalDenied(TrioSignError):
    """A Sign was refused by its policy (PERMISSION_DENIED); ``decision`` says why."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.detail)
        self.decision = decision
        self.reason = decision.reason


def _safe_id(key_id: str) -> str:
    return key_id if KEY_ID_PATTERN.fullmatch(key_id) else "<invalid>"


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Authorizer:
    """Decides whether a Sign's approvals satisfy its account's policy.

    Args:
        policies: the measured configuration's approvers and policies.
        clock_tolerance_s: see :data:`DEFAULT_CLOCK_TOLERANCE_S`.
        max_lifetime_s: see :data:`DEFAULT_MAX_LIFETIME_S`.
        wall_clock_ms: Unix time in milliseconds (tests pin it).
        rate_key: the rate limiter's hashing key (tests pin it; default random).

    The rate limiters (one per policy with ``rate_per_minute``) are fixed-size
    (:class:`AccountRateLimiter`): no state grows with the number of accounts.
    """

    def __init__(
        self,
        policies: PolicySet,
        *,
        clock_tolerance_s: float = DEFAULT_CLOCK_TOLERANCE_S,
        max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
        wall_clock_ms: Callable[[], int] = _wall_clock_ms,
        rate_key: bytes | None = None,
    ) -> None:
        if clock_tolerance_s < 0 or max_lifetime_s <= 0:
            raise ValueError("clock_tolerance_s must be >= 0 and max_lifetime_s > 0")
        self.policies = policies
        self._tolerance_ms = round(clock_tolerance_s * 1000)
        self._max_lifetime_ms = round(max_lifetime_s * 1000)
        self._wall_clock_ms = wall_clock_ms
        self._limiters = {
            name: AccountRateLimiter(policy.rate_per_minute, key=rate_key)
            for name, policy in policies.policies.items()
            if policy.rate_per_minute is not None
        }

    def decide(
        self,
        *,
        account_id: str,
        policy: str,
        session_id: str,
        message: bytes,
        approvals: Sequence[ApprovalFields],
        now: float,
    ) -> Decision:
        """The decision for one Sign; ``now`` is the monotonic time for the rate limit (the
        Trio clock in the enclave). An allowed decision has counted against the rate limit.

        The work is bounded by the policy before any signature is verified: at most as many
        verifications as the policy has approvers.
        """
        digest = hashlib.sha256(message).digest()
        carried = tuple(_safe_id(a.key_id) for a in approvals[:64])

        def refuse(reason: str, detail: str) -> Decision:
            return Decision(False, reason, detail, policy, carried, digest.hex())

        rule = self.policies.policies.get(policy)
        if rule is None:
            return refuse("unknown_policy", f"the account's policy {policy!r} is not configured")
        if len(message) > rule.max_message_bytes:
            return refuse(
                "message_too_large",
                f"message is {len(message)} bytes; policy {policy!r} allows at most "
                f"{rule.max_message_bytes}",
            )
        needs = f"policy {policy!r} needs {rule.threshold} of [{', '.join(rule.approvers)}]"
        if rule.threshold > 0:
            if not approvals:
                return refuse("no_approvals", f"no approvals: {needs}")
            if len(approvals) > len(rule.approvers):
                return refuse(
                    "too_many_approvals",
                    f"{len(approvals)} approvals, but {needs} (at most one each)",
                )
            seen: set[str] = set()
            for a in approvals:
                if a.key_id not in rule.approvers:
                    return refuse(
                        "unknown_approver",
                        f"approval by {_safe_id(a.key_id)!r}, which is not an approver of "
                        f"policy {policy!r}",
                    )
                if a.key_id in seen:
                    return refuse(
                        "duplicate_approver",
                        f"two approvals by {a.key_id!r}: one key counts once; {needs}",
                    )
                seen.add(a.key_id)
            if len(seen) < rule.threshold:
                return refuse(
                    "too_few_approvals",
                    f"{len(seen)} approval(s) ({', '.join(sorted(seen))}); {needs}",
                )
            now_ms = self._wall_clock_ms()
            for a in approvals:
                expires = a.expires_at_unix_ms
                if expires + self._tolerance_ms < now_ms:
                    return refuse(
                        "expired",
                        f"the approval by {a.key_id!r} expired {now_ms - expires} ms ago",
                    )
                if expires > now_ms + self._max_lifetime_ms + self._tolerance_ms:
                    return refuse(
                        "future_dated",
                        f"the approval by {a.key_id!r} expires {expires - now_ms} ms from now, "
                        f"beyond the longest lifetime ({self._max_lifetime_ms} ms) and the "
                        f"clock tolerance ({self._tolerance_ms} ms)",
                    )
            for a in approvals:
                if not INT64_MIN <= a.expires_at_unix_ms <= INT64_MAX:  # pragma: no cover
                    return refuse("malformed_signature", "expires_at_unix_ms is not an int64")
                payload = approval_payload_for_digest(
                    account_id, session_id, digest, a.expires_at_unix_ms
                )
                problem = self.policies.approvers[a.key_id].check_signature(a.signature, payload)
                if problem == "malformed_signature":
                    return refuse(
                        problem,
                        f"the approval by {a.key_id!r} has a malformed signature (64 bytes; "
                        "Ed25519 S < L; P-256 0 < r, s < n)",
                    )
                if problem is not None:
                    return refuse(
                        "bad_signature",
                        f"the approval by {a.key_id!r} does not verify for this account, "
                        "session, message and expiry",
                    )
        limiter = self._limiters.get(policy)
        if limiter is not None and not limiter.acquire(account_id, now):
            return refuse(
                "rate_limited",
                f"account is over policy {policy!r}'s rate limit "
                f"({limiter.rate_per_minute} per minute); retry later",
            )
        return Decision(True, "allowed", "allowed", policy, carried, digest.hex())
