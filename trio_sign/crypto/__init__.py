"""FROST(Ed25519, SHA-512) per RFC 9591 and the libsodium primitives under it."""

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

__all__ = [
    "CIPHERSUITE",
    "DealerOutput",
    "DealerShare",
    "SigningCommitment",
    "SigningNonces",
    "aggregate",
    "commit",
    "group_commitment",
    "identifier_from_bytes",
    "identifier_to_bytes",
    "sign",
    "trusted_dealer_keygen",
    "verify",
    "verify_signature_share",
]
