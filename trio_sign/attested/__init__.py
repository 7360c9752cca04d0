"""The attested channel to an enclave (DESIGN §10), for any client: the sans-io check of an
enclave's attestation against the connection it came on and the pins of its shard, and the Trio
function that opens TLS, asks for the attestation on that connection, checks it, and only then
hands over the gRPC channel. Reason codes: :data:`CHANNEL_REASONS` (docs/attested-channel.md).
"""

from ._client import ALPN_H2 as ALPN_H2
from ._client import GET_ATTESTATION as GET_ATTESTATION
from ._client import NONCE_BYTES as NONCE_BYTES
from ._client import AttestedChannel as AttestedChannel
from ._client import make_attested_client_context as make_attested_client_context
from ._client import open_attested_channel as open_attested_channel
from ._verify import CHANNEL_REASONS as CHANNEL_REASONS
from ._verify import CONNECTION_REASONS as CONNECTION_REASONS
from ._verify import REQUIRED_PCRS as REQUIRED_PCRS
from ._verify import AttestedChannelError as AttestedChannelError
from ._verify import ChannelPolicy as ChannelPolicy
from ._verify import VerifiedChannel as VerifiedChannel
from ._verify import spki_of_certificate as spki_of_certificate
from ._verify import verify_channel as verify_channel

__all__ = [
    "ALPN_H2",
    "AttestedChannel",
    "AttestedChannelError",
    "CHANNEL_REASONS",
    "CONNECTION_REASONS",
    "ChannelPolicy",
    "GET_ATTESTATION",
    "NONCE_BYTES",
    "REQUIRED_PCRS",
    "VerifiedChannel",
    "make_attested_client_context",
    "open_attested_channel",
    "spki_of_certificate",
    "verify_channel",
]
