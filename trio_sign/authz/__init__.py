"""Authorization inside the enclave (DESIGN §11): approval payloads, approver keys,
policies from the measured configuration, the fixed-memory rate limit and the decision.
Sans-io throughout; the enclave's SignService calls :meth:`Authorizer.decide`."""

from ._decide import DEFAULT_CLOCK_TOLERANCE_S as DEFAULT_CLOCK_TOLERANCE_S
from ._decide import DEFAULT_MAX_LIFETIME_S as DEFAULT_MAX_LIFETIME_S
from ._decide import REASONS as REASONS
from ._decide import ApprovalDenied as ApprovalDenied
from ._decide import ApprovalFields as ApprovalFields
from ._decide import Authorizer as Authorizer
from ._decide import Decision as Decision
from ._keys import KEY_TYPES as KEY_TYPES
from ._keys import ApproverKey as ApproverKey
from ._keys import ApproverKeyError as ApproverKeyError
from ._payload import APPROVAL_DOMAIN as APPROVAL_DOMAIN
from ._payload import approval_payload as approval_payload
from ._payload import approval_payload_for_digest as approval_payload_for_digest
from ._policy import COMPACT_POLICY as COMPACT_POLICY
from ._policy import CREATE_POLICY as CREATE_POLICY
from ._policy import DEFAULT_POLICY as DEFAULT_POLICY
from ._policy import DEVELOPMENT_POLICIES as DEVELOPMENT_POLICIES
from ._policy import REFRESH_POLICY as REFRESH_POLICY
from ._policy import REPAIR_POLICY as REPAIR_POLICY
from ._policy import RESERVED_POLICIES as RESERVED_POLICIES
from ._policy import Policy as Policy
from ._policy import PolicyConfigError as PolicyConfigError
from ._policy import PolicySet as PolicySet
from ._policy import check_policy_name as check_policy_name
from ._policy import parse_policies as parse_policies
from ._ratelimit import AccountRateLimiter as AccountRateLimiter

__all__ = [
    "APPROVAL_DOMAIN",
    "COMPACT_POLICY",
    "CREATE_POLICY",
    "REFRESH_POLICY",
    "REPAIR_POLICY",
    "RESERVED_POLICIES",
    "DEFAULT_CLOCK_TOLERANCE_S",
    "DEFAULT_MAX_LIFETIME_S",
    "DEFAULT_POLICY",
    "DEVELOPMENT_POLICIES",
    "KEY_TYPES",
    "REASONS",
    "AccountRateLimiter",
    "ApprovalDenied",
    "ApprovalFields",
    "ApproverKey",
    "ApproverKeyError",
    "Authorizer",
    "Decision",
    "Policy",
    "PolicyConfigError",
    "PolicySet",
    "approval_payload",
    "approval_payload_for_digest",
    "check_policy_name",
    "parse_policies",
]
