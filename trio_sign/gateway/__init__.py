"""The Sign Gateway's side of the service: the coordinator, the prober and the enclaves' event
streams (DESIGN §5)."""

from ._accounts import AccountRegistry as AccountRegistry
from ._accounts import AccountRegistryError as AccountRegistryError
from ._accounts import RegisteredAccount as RegisteredAccount
from ._accounts import RemoteHolder as RemoteHolder
from ._approvals import APPROVER_KEY_FORMAT as APPROVER_KEY_FORMAT
from ._approvals import DEFAULT_APPROVAL_LIFETIME_S as DEFAULT_APPROVAL_LIFETIME_S
from ._approvals import Approval as Approval
from ._approvals import ApproverKeyFileError as ApproverKeyFileError
from ._approvals import ApproverSigningKey as ApproverSigningKey
from ._approvals import GatewayApprover as GatewayApprover
from ._coordinator import GATEWAY_REASONS as GATEWAY_REASONS
from ._coordinator import MERKLE_ROOT_BYTES as MERKLE_ROOT_BYTES
from ._coordinator import Coordinator as Coordinator
from ._coordinator import CoordinatorSettings as CoordinatorSettings
from ._coordinator import GatewayError as GatewayError
from ._coordinator import Signature as Signature
from ._coordinator import load_participant_files as load_participant_files
from ._dkg import CreatedAccount as CreatedAccount
from ._dkg import DkgDriver as DkgDriver
from ._dkg import DkgFailed as DkgFailed
from ._dkg import DkgParticipant as DkgParticipant
from ._dkg import DkgSettings as DkgSettings
from ._dkg import DkgShares as DkgShares
from ._dkg import LocalParticipant as LocalParticipant
from ._events import DEFAULT_EVENTS_GRACEFUL_TIMEOUT_S as DEFAULT_EVENTS_GRACEFUL_TIMEOUT_S
from ._events import DEFAULT_EVENTS_KEEPALIVE_S as DEFAULT_EVENTS_KEEPALIVE_S
from ._events import DEFAULT_EVENTS_RETRY_MS as DEFAULT_EVENTS_RETRY_MS
from ._events import DEFAULT_MAX_SUBSCRIBERS as DEFAULT_MAX_SUBSCRIBERS
from ._events import DEFAULT_MAX_SUBSCRIBERS_PER_NODE as DEFAULT_MAX_SUBSCRIBERS_PER_NODE
from ._events import DEFAULT_REFUSAL_LOG_INTERVAL_S as DEFAULT_REFUSAL_LOG_INTERVAL_S
from ._events import DEFAULT_REPLAY_EVENTS as DEFAULT_REPLAY_EVENTS
from ._events import DEFAULT_SUBSCRIBER_QUEUE as DEFAULT_SUBSCRIBER_QUEUE
from ._events import EventHub as EventHub
from ._events import GatewayEventsApp as GatewayEventsApp
from ._events import HubEvent as HubEvent
from ._events import HubStats as HubStats
from ._events import NodeSubscriberLimitError as NodeSubscriberLimitError
from ._events import SubscriberLimitError as SubscriberLimitError
from ._events import Subscription as Subscription
from ._events import accepts_event_stream as accepts_event_stream
from ._events import serve_gateway_events as serve_gateway_events
from ._events import valid_bearer_token as valid_bearer_token
from ._events import valid_node_id as valid_node_id
from ._node import EnclaveNode as EnclaveNode
from ._node import NodeSettings as NodeSettings
from ._participants import HubSettings as HubSettings
from ._participants import ParticipantError as ParticipantError
from ._participants import ParticipantHub as ParticipantHub
from ._prober import ProbedNode as ProbedNode
from ._prober import SendProbe as SendProbe
from ._prober import run_prober as run_prober
from ._remote_dkg import RemoteDkgParticipant as RemoteDkgParticipant
from ._service import GatewayApi as GatewayApi
from ._service import GatewayConfig as GatewayConfig
from ._service import GatewayConfigError as GatewayConfigError
from ._service import GatewayHandle as GatewayHandle
from ._service import parse_gateway_config as parse_gateway_config
from ._service import serve_gateway as serve_gateway
from ._sse_format import KEEPALIVE_COMMENT as KEEPALIVE_COMMENT
from ._sse_format import format_comment as format_comment
from ._sse_format import format_event as format_event
from ._sse_format import format_id as format_id
from ._sse_format import format_retry as format_retry
from ._tls import ALPN_H2 as ALPN_H2
from ._tls import connect_tls as connect_tls
from ._tls import make_client_ssl_context as make_client_ssl_context

__all__ = [
    "CreatedAccount",
    "DkgDriver",
    "DkgFailed",
    "DkgParticipant",
    "DkgSettings",
    "DkgShares",
    "LocalParticipant",
    "ALPN_H2",
    "APPROVER_KEY_FORMAT",
    "DEFAULT_APPROVAL_LIFETIME_S",
    "DEFAULT_EVENTS_GRACEFUL_TIMEOUT_S",
    "DEFAULT_EVENTS_KEEPALIVE_S",
    "DEFAULT_EVENTS_RETRY_MS",
    "DEFAULT_MAX_SUBSCRIBERS",
    "DEFAULT_MAX_SUBSCRIBERS_PER_NODE",
    "DEFAULT_REFUSAL_LOG_INTERVAL_S",
    "DEFAULT_REPLAY_EVENTS",
    "DEFAULT_SUBSCRIBER_QUEUE",
    "GATEWAY_REASONS",
    "KEEPALIVE_COMMENT",
    "MERKLE_ROOT_BYTES",
    "Approval",
    "ApproverKeyFileError",
    "ApproverSigningKey",
    "Coordinator",
    "CoordinatorSettings",
    "EnclaveNode",
    "EventHub",
    "GatewayApi",
    "GatewayApprover",
    "GatewayConfig",
    "GatewayConfigError",
    "GatewayError",
    "GatewayEventsApp",
    "GatewayHandle",
    "HubEvent",
    "HubStats",
    "NodeSettings",
    "NodeSubscriberLimitError",
    "ProbedNode",
    "SendProbe",
    "Signature",
    "SubscriberLimitError",
    "Subscription",
    "accepts_event_stream",
    "connect_tls",
    "format_comment",
    "format_event",
    "format_id",
    "format_retry",
    "load_participant_files",
    "make_client_ssl_context",
    "parse_gateway_config",
    "run_prober",
    "serve_gateway",
    "serve_gateway_events",
    "valid_bearer_token",
    "valid_node_id",
    "AccountRegistry",
    "AccountRegistryError",
    "RegisteredAccount",
    "RemoteHolder",
    "HubSettings",
    "ParticipantError",
    "ParticipantHub",
    "RemoteDkgParticipant",
]
