"""FROST per RFC 9591 (and ZF's Taproot variant) and the primitives under it.

The Ed25519 names below are the original, unchanged API. For any ciphersuite, look the suite
up with :func:`scheme_by_name` (``"FROST-ED25519-SHA512-v1"``, ``"FROST-secp256k1-SHA256-v1"``,
``"FROST-secp256k1-SHA256-TR-v1"``) and use its methods: the same calls work for all three.
"""

from ._dkg import DkgError as DkgError
from ._frost import CIPHERSUITE as CIPHERSUITE
from ._frost import DealerOutput as DealerOutput
from ._frost import DealerShare as DealerShare
from ._frost import SigningCommitment as SigningCommitment
from ._frost import SigningNonces as SigningNonces
from ._frost import aggregate as aggregate
from ._frost import commit as commit
from ._frost import group_commitment as group_commitment
from ._frost import identifier_from_bytes as identifier_from_bytes
from ._frost import identifier_to_bytes as identifier_to_bytes
from ._frost import sign as sign
from ._frost import trusted_dealer_keygen as trusted_dealer_keygen
from ._frost import verify as verify
from ._frost import verify_signature_share as verify_signature_share
from ._schemes import ED25519 as ED25519
from ._schemes import SCHEMES as SCHEMES
from ._schemes import SECP256K1 as SECP256K1
from ._schemes import SECP256K1_TR as SECP256K1_TR
from ._schemes import Scheme as Scheme
from ._schemes import scheme_by_code as scheme_by_code
from ._schemes import scheme_by_name as scheme_by_name
from ._suite import Ciphersuite as Ciphersuite
from ._suite import suite_by_name as suite_by_name

__all__ = [
    "CIPHERSUITE",
    "ED25519",
    "SCHEMES",
    "SECP256K1",
    "SECP256K1_TR",
    "Ciphersuite",
    "DealerOutput",
    "DealerShare",
    "DkgError",
    "Scheme",
    "SigningCommitment",
    "SigningNonces",
    "aggregate",
    "commit",
    "group_commitment",
    "identifier_from_bytes",
    "identifier_to_bytes",
    "scheme_by_code",
    "scheme_by_name",
    "sign",
    "suite_by_name",
    "trusted_dealer_keygen",
    "verify",
    "verify_signature_share",
]
