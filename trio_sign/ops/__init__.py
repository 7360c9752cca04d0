"""Operations helpers for deploying the enclave: KMS key and IAM policies rendered from the
EIF's PCRs, and enclave memory sizing for the Nitro allocator.

Command line: ``python -m trio_sign.ops --help`` (``render-key-policy``,
``render-parent-iam-policy``, ``enclave-memory``).
"""

from ._main import main as main
from ._memory import SizingError as SizingError
from ._memory import allocator_yaml as allocator_yaml
from ._memory import bundle_accounts as bundle_accounts
from ._memory import enclave_memory_mib as enclave_memory_mib
from ._policies import PolicyRenderError as PolicyRenderError
from ._policies import attestation_condition as attestation_condition
from ._policies import load_pcrs as load_pcrs
from ._policies import local_kms_policy as local_kms_policy
from ._policies import render_key_policy as render_key_policy
from ._policies import render_parent_iam_policy as render_parent_iam_policy

__all__ = [
    "PolicyRenderError",
    "SizingError",
    "allocator_yaml",
    "attestation_condition",
    "bundle_accounts",
    "enclave_memory_mib",
    "load_pcrs",
    "local_kms_policy",
    "main",
    "render_key_policy",
    "render_parent_iam_policy",
]
