"""The parent (host) side: preload service and the development KMS stand-in."""

from ._attestation_gate import GATE_REASONS as GATE_REASONS
from ._attestation_gate import AttestationGate as AttestationGate
from ._attestation_gate import AttestationPolicy as AttestationPolicy
from ._attestation_gate import run_attestation_gate as run_attestation_gate
from ._bundle_copy import BundleCopyError as BundleCopyError
from ._bundle_copy import copy_bundle as copy_bundle
from ._channels import HELLO_MAX_FRAME_BYTES as HELLO_MAX_FRAME_BYTES
from ._channels import HELLO_TIMEOUT_S as HELLO_TIMEOUT_S
from ._channels import ChannelGuard as ChannelGuard
from ._channels import StatusLink as StatusLink
from ._channels import serve_log_connection as serve_log_connection
from ._channels import serve_logs as serve_logs
from ._channels import serve_status as serve_status
from ._channels import serve_status_connection as serve_status_connection
from ._config import ConfigError as ConfigError
from ._config import ParentConfig as ParentConfig
from ._config import load_parent_config as load_parent_config
from ._config import parse_parent_config as parse_parent_config
from ._deltas import Deltas as Deltas
from ._deltas import DeltaStore as DeltaStore
from ._deltas import FileDeltaStore as FileDeltaStore
from ._deltas import S3DeltaStore as S3DeltaStore
from ._deltas import serve_deltas_connection as serve_deltas_connection
from ._dev_kms import DevRecipientKms as DevRecipientKms
from ._health import ParentState as ParentState
from ._health import serve_health as serve_health
from ._ingress import IngressSettings as IngressSettings
from ._ingress import make_server_ssl_context as make_server_ssl_context
from ._ingress import serve_ingress as serve_ingress
from ._launch import LaunchError as LaunchError
from ._launch import LocalLauncher as LocalLauncher
from ._launch import NitroCliLauncher as NitroCliLauncher
from ._launch import namespaces_available as namespaces_available
from ._logs import CloudWatchSink as CloudWatchSink
from ._logs import JsonLinesSink as JsonLinesSink
from ._logs import LogFileSink as LogFileSink
from ._logs import LogForwarder as LogForwarder
from ._logs import LogTail as LogTail
from ._logs import Redactor as Redactor
from ._preload import CHUNK_BYTES as CHUNK_BYTES
from ._preload import PreloadRefused as PreloadRefused
from ._preload import RecipientKms as RecipientKms
from ._preload import serve_genesis as serve_genesis
from ._preload import serve_preload as serve_preload
from ._relay import Allowlist as Allowlist
from ._relay import serve_sse_relay as serve_sse_relay
from ._supervisor import ParentExit as ParentExit
from ._supervisor import serve_parent as serve_parent

__all__ = [
    "CHUNK_BYTES",
    "BundleCopyError",
    "LogFileSink",
    "copy_bundle",
    "Allowlist",
    "CloudWatchSink",
    "ConfigError",
    "JsonLinesSink",
    "LogForwarder",
    "LogTail",
    "ParentConfig",
    "ParentExit",
    "ParentState",
    "Redactor",
    "ChannelGuard",
    "HELLO_MAX_FRAME_BYTES",
    "HELLO_TIMEOUT_S",
    "StatusLink",
    "GATE_REASONS",
    "AttestationGate",
    "AttestationPolicy",
    "DevRecipientKms",
    "IngressSettings",
    "LaunchError",
    "LocalLauncher",
    "NitroCliLauncher",
    "PreloadRefused",
    "RecipientKms",
    "load_parent_config",
    "make_server_ssl_context",
    "namespaces_available",
    "parse_parent_config",
    "run_attestation_gate",
    "serve_health",
    "serve_ingress",
    "serve_parent",
    "serve_sse_relay",
    "serve_log_connection",
    "serve_logs",
    "serve_status",
    "serve_preload",
    "serve_status_connection",
    "Deltas",
    "DeltaStore",
    "FileDeltaStore",
    "S3DeltaStore",
    "serve_deltas_connection",
    "serve_genesis",
]
