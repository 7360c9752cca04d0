"""The parent (host) side: preload service and the development KMS stand-in."""

from ._attestation_gate import GATE_REASONS as GATE_REASONS
from ._attestation_gate import AttestationGate as AttestationGate
from ._attestation_gate import AttestationPolicy as AttestationPolicy
from ._attestation_gate import run_attestation_gate as run_attestation_gate
from ._channels import serve_log_connection as serve_log_connection
from ._channels import serve_status_connection as serve_status_connection
from ._dev_kms import DevRecipientKms as DevRecipientKms
from ._ingress import IngressSettings as IngressSettings
from ._ingress import make_server_ssl_context as make_server_ssl_context
from ._ingress import serve_ingress as serve_ingress
from ._launch import LaunchError as LaunchError
from ._launch import LocalLauncher as LocalLauncher
from ._launch import NitroCliLauncher as NitroCliLauncher
from ._launch import namespaces_available as namespaces_available
from ._preload import CHUNK_BYTES as CHUNK_BYTES
from ._preload import PreloadRefused as PreloadRefused
from ._preload import RecipientKms as RecipientKms
from ._preload import serve_preload as serve_preload

__all__ = [
    "CHUNK_BYTES",
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
    "make_server_ssl_context",
    "namespaces_available",
    "run_attestation_gate",
    "serve_ingress",
    "serve_log_connection",
    "serve_preload",
    "serve_status_connection",
]
