"""Remote participants (DESIGN §15, docs/participants.md): the library a participant embeds.

The same code runs under asyncio and under Trio (anyio). :class:`ParticipantClient` keeps a
WebSocket to the gateway, authenticates with the participant's Ed25519 key, asks a
:class:`Policy` about each signing request, and answers with commitments, signature shares
and approvals from the shares in a :class:`SealedShareStore`; with contract version 2 it also
takes part in DKGs (:class:`DkgRound1` is what a policy's ``decide_dkg`` is asked), sealing
each new share durably before it answers. :class:`ParticipantSession` is
the sans-io protocol underneath; the ``_messages`` codec is shared with the gateway's endpoint.
"""

from ._client import ClientSettings as ClientSettings
from ._client import ParticipantClient as ParticipantClient
from ._client import ParticipantConnectionError as ParticipantConnectionError
from ._messages import DkgRound1 as DkgRound1
from ._messages import MessageError as MessageError
from ._messages import SignRequest as SignRequest
from ._messages import encode_message as encode_message
from ._messages import parse_message as parse_message
from ._policy import AutoPolicy as AutoPolicy
from ._policy import CallbackPolicy as CallbackPolicy
from ._policy import Decision as Decision
from ._policy import Policy as Policy
from ._session import ParticipantSession as ParticipantSession
from ._store import KmsKey as KmsKey
from ._store import ParticipantStoreError as ParticipantStoreError
from ._store import PassphraseKey as PassphraseKey
from ._store import SealedShareStore as SealedShareStore

__all__ = [
    "AutoPolicy",
    "CallbackPolicy",
    "ClientSettings",
    "Decision",
    "DkgRound1",
    "KmsKey",
    "MessageError",
    "ParticipantClient",
    "ParticipantConnectionError",
    "ParticipantSession",
    "ParticipantStoreError",
    "PassphraseKey",
    "Policy",
    "SealedShareStore",
    "SignRequest",
    "encode_message",
    "parse_message",
]
