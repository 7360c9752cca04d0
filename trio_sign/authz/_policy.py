"""Approvers and policies from the measured configuration (DESIGN §9, §11).

``enclave.toml``::

    [approvers.ops-1]                 # the key id approvals carry (Approval.key_id)
    type = "ed25519"                  # or "p256"
    public_key = "<hex>"              # 32 bytes (ed25519) or 65 bytes uncompressed SEC1 (p256)

    [policies.default]                # the policy of every account whose record names none
    approvers = ["ops-1", "ops-2", "risk-1"]
    threshold = 2                     # k of the n approvers above (1 <= k <= n); a policy
                                      # that needs no approvals says so: approvers = [],
                                      # threshold = 0 (measured, and logged loudly at boot)
    max_message_bytes = 1024          # optional; default and maximum 65536
    rate_per_minute = 60              # optional: Signs per account per minute (burst as many);
                                      # absent = no rate limit

A policy named ``create`` is reserved for account creation (DESIGN §13): it is parsed and
checked like the others, and an account record may not choose it for signing.

Refusals, each with its own reason (the enclave exits 2 with it): ``bad_approver`` (a key
id, type or public key that cannot be), ``unknown_key_type``, ``unknown_approver`` (a policy
names a key id missing from ``[approvers]``), ``impossible_threshold`` (``threshold`` not in
``1..len(approvers)``), ``bad_policy`` (any other shape problem).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from .._errors import TrioSignError
from ._keys import KEY_TYPES, PUBLIC_KEY_BYTES, ApproverKey, ApproverKeyError

#: The policy of an account whose record names none.
DEFAULT_POLICY: Final = "default"
#: The policy that authorizes account creation (DESIGN §13); not an account's signing policy.
CREATE_POLICY: Final = "create"
#: The reserved policies that authorize a refresh and a repair (docs/refresh-repair.md).
REFRESH_POLICY: Final = "refresh"
REPAIR_POLICY: Final = "repair"
#: The reserved policy that authorizes a compaction (docs/compaction.md).
COMPACT_POLICY: Final = "compact"
#: Policies that authorize operations, never an account's signing.
RESERVED_POLICIES: Final = frozenset({CREATE_POLICY, REFRESH_POLICY, REPAIR_POLICY, COMPACT_POLICY})
#: Policy names: they are metric labels and audit fields, so short printable ASCII.
POLICY_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The largest message any policy may allow (the service's own cap).
MAX_POLICY_MESSAGE_BYTES: Final = 64 * 1024
MAX_APPROVERS: Final = 256
MAX_POLICIES: Final = 64
MAX_RATE_PER_MINUTE: Final = 1_000_000


class PolicyConfigError(TrioSignError):
    """``[approvers]`` or ``[policies]`` was refused; ``reason`` is the stable code."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Policy:
    """One ``[policies.<name>]``.

    Attributes:
        name: the policy's name (accounts choose it in their record's ``policy`` field).
        approvers: the key ids that may approve, in the file's order.
        threshold: how many distinct approvers must approve; 0 (with no approvers): none,
            written out in the file (or the built-in development configuration's).
        max_message_bytes: the largest message a Sign under this policy may carry.
        rate_per_minute: Signs per account per minute, or None (no limit).
    """

    name: str
    approvers: tuple[str, ...]
    threshold: int
    max_message_bytes: int = MAX_POLICY_MESSAGE_BYTES
    rate_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every approver key and policy of one measured configuration.

    Attributes:
        approvers: key id -> key.
        policies: name -> policy.
        development: the built-in development set: ``default`` needs no approvals.
    """

    approvers: Mapping[str, ApproverKey] = field(default_factory=dict)
    policies: Mapping[str, Policy] = field(default_factory=dict)
    development: bool = False

    def __repr__(self) -> str:
        return (
            f"PolicySet(approvers={sorted(self.approvers)!r}, policies={sorted(self.policies)!r}"
            f"{', development' if self.development else ''})"
        )

    def open_policies(self) -> list[str]:
        """The policies that need no approvals (threshold 0), for the loud boot warning."""
        return sorted(name for name, p in self.policies.items() if p.threshold == 0)

    def unknown(self, names: set[str] | frozenset[str]) -> list[str]:
        """The names in ``names`` that no account may use: not a policy here, or a reserved
        one (``create``, ``refresh``, ``repair``, ``compact``)."""
        return sorted(n for n in names if n not in self.policies or n in RESERVED_POLICIES)


#: The built-in development configuration's policy: ``default``, no approvals needed.
DEVELOPMENT_POLICIES: Final = PolicySet(
    policies={DEFAULT_POLICY: Policy(DEFAULT_POLICY, (), 0)}, development=True
)


def check_policy_name(name: object) -> str | None:
    """Why ``name`` cannot be a policy name, or None."""
    if not isinstance(name, str) or not POLICY_NAME_PATTERN.fullmatch(name):
        return "must be 1..64 characters of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
    return None


def parse_policies(approvers: object, policies: object) -> PolicySet:
    """Build a :class:`PolicySet` from the ``approvers`` and ``policies`` TOML tables
    (``{}`` when absent).

    Raises:
        PolicyConfigError: what is wrong, naming the table and key, with its reason.
    """
    if not isinstance(approvers, dict):
        raise PolicyConfigError("[approvers] must be a table of tables", reason="bad_approver")
    if not isinstance(policies, dict):
        raise PolicyConfigError("[policies] must be a table of tables", reason="bad_policy")
    if len(approvers) > MAX_APPROVERS:
        raise PolicyConfigError(
            f"[approvers] has more than {MAX_APPROVERS} keys", reason="bad_approver"
        )
    if len(policies) > MAX_POLICIES:
        raise PolicyConfigError(
            f"[policies] has more than {MAX_POLICIES} policies", reason="bad_policy"
        )
    keys: dict[str, ApproverKey] = {}
    seen: dict[bytes, str] = {}
    for key_id, table in approvers.items():
        keys[key_id] = _approver(key_id, table)
        earlier = seen.setdefault(keys[key_id].public_key, key_id)
        if earlier != key_id:
            raise PolicyConfigError(
                f"[approvers.{key_id}] has the same public key as [approvers.{earlier}]"
                " (one key would count twice)",
                reason="bad_approver",
            )
    parsed: dict[str, Policy] = {}
    for name, table in policies.items():
        parsed[name] = _policy(name, table, keys)
    return PolicySet(approvers=keys, policies=parsed)


def _approver(key_id: str, table: object) -> ApproverKey:
    where = f"[approvers.{key_id}]"
    if not isinstance(table, dict):
        raise PolicyConfigError(f"{where} must be a table", reason="bad_approver")
    for k in table:
        if k not in ("type", "public_key"):
            raise PolicyConfigError(
                f"unknown key {k!r} in {where} (known: type, public_key)", reason="bad_approver"
            )
    kind = table.get("type")
    if kind is None or "public_key" not in table:
        raise PolicyConfigError(f"{where} needs type and public_key", reason="bad_approver")
    if kind not in KEY_TYPES:
        raise PolicyConfigError(
            f"{where} type {kind!r} is not a known key type (known: {', '.join(KEY_TYPES)})",
            reason="unknown_key_type",
        )
    raw = table["public_key"]
    size = PUBLIC_KEY_BYTES[kind]
    try:
        if not isinstance(raw, str) or len(raw) != 2 * size:
            raise ValueError
        public_key = bytes.fromhex(raw)
    except ValueError:
        raise PolicyConfigError(
            f"{where} public_key must be {2 * size} hex digits ({size} bytes, {kind})",
            reason="bad_approver",
        ) from None
    try:
        return ApproverKey.create(key_id, kind, public_key)
    except ApproverKeyError as exc:
        raise PolicyConfigError(f"{where}: {exc}", reason="bad_approver") from None


def _int(value: object, where: str, low: int, high: int, reason: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PolicyConfigError(f"{where} must be an integer in {low}..{high}", reason=reason)
    return value


def _policy(name: str, table: object, keys: Mapping[str, ApproverKey]) -> Policy:
    where = f"[policies.{name}]"
    problem = check_policy_name(name)
    if problem is not None:
        raise PolicyConfigError(f"{where}: the name {problem}", reason="bad_policy")
    if not isinstance(table, dict):
        raise PolicyConfigError(f"{where} must be a table", reason="bad_policy")
    known = ("approvers", "threshold", "max_message_bytes", "rate_per_minute")
    for k in table:
        if k not in known:
            raise PolicyConfigError(
                f"unknown key {k!r} in {where} (known: {', '.join(known)})", reason="bad_policy"
            )
    approvers = table.get("approvers")
    if not isinstance(approvers, list) or not all(isinstance(a, str) for a in approvers):
        raise PolicyConfigError(
            f"{where} approvers must be a list of key ids from [approvers]", reason="bad_policy"
        )
    for key_id in approvers:
        if key_id not in keys:
            raise PolicyConfigError(
                f"{where} names approver {key_id!r}, which is not in [approvers]",
                reason="unknown_approver",
            )
    if len(set(approvers)) != len(approvers):
        raise PolicyConfigError(f"{where} approvers lists a key twice", reason="bad_policy")
    if "threshold" not in table:
        raise PolicyConfigError(
            f"{where} needs threshold (k of the approvers)", reason="bad_policy"
        )
    threshold = table["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise PolicyConfigError(f"{where} threshold must be an integer", reason="bad_policy")
    if threshold == 0 and approvers:
        raise PolicyConfigError(
            f"{where} threshold 0 with approvers listed: give 1..{len(approvers)}, or"
            " approvers = [] for a policy that needs no approvals",
            reason="impossible_threshold",
        )
    if not 0 <= threshold <= len(approvers):
        raise PolicyConfigError(
            f"{where} threshold {threshold} is impossible with {len(approvers)} approvers"
            f" (need 1 <= threshold <= {len(approvers)})",
            reason="impossible_threshold",
        )
    max_message = _int(
        table.get("max_message_bytes", MAX_POLICY_MESSAGE_BYTES),
        f"{where} max_message_bytes",
        1,
        MAX_POLICY_MESSAGE_BYTES,
        "bad_policy",
    )
    rate = table.get("rate_per_minute")
    if rate is not None:
        rate = _int(rate, f"{where} rate_per_minute", 1, MAX_RATE_PER_MINUTE, "bad_policy")
    return Policy(name, tuple(approvers), threshold, max_message, rate)
