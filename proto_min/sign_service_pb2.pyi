from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("state", "accounts", "shares_sha256", "preload_ms", "sessions_open", "sessions_max", "memory_used_bytes", "memory_limit_bytes", "last_sse_probe", "version", "deltas", "deltas_head", "config_sha256")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    SHARES_SHA256_FIELD_NUMBER: _ClassVar[int]
    PRELOAD_MS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_MAX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_SSE_PROBE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    DELTAS_HEAD_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    state: str
    accounts: int
    shares_sha256: str
    preload_ms: int
    sessions_open: int
    sessions_max: int
    memory_used_bytes: int
    memory_limit_bytes: int
    last_sse_probe: str
    version: str
    deltas: int
    deltas_head: str
    config_sha256: str
    def __init__(self, state: _Optional[str] = ..., accounts: _Optional[int] = ..., shares_sha256: _Optional[str] = ..., preload_ms: _Optional[int] = ..., sessions_open: _Optional[int] = ..., sessions_max: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., last_sse_probe: _Optional[str] = ..., version: _Optional[str] = ..., deltas: _Optional[int] = ..., deltas_head: _Optional[str] = ..., config_sha256: _Optional[str] = ...) -> None: ...

class GetAttestationRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class GetAttestationResponse(_message.Message):
    __slots__ = ("document",)
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    def __init__(self, document: _Optional[bytes] = ...) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class GetAccountResponse(_message.Message):
    __slots__ = ("account_id", "ciphersuite", "group_public_key", "identifier", "verifying_share", "min_signers", "max_signers")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERSUITE_FIELD_NUMBER: _ClassVar[int]
    GROUP_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    VERIFYING_SHARE_FIELD_NUMBER: _ClassVar[int]
    MIN_SIGNERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIGNERS_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    ciphersuite: str
    group_public_key: bytes
    identifier: bytes
    verifying_share: bytes
    min_signers: int
    max_signers: int
    def __init__(self, account_id: _Optional[str] = ..., ciphersuite: _Optional[str] = ..., group_public_key: _Optional[bytes] = ..., identifier: _Optional[bytes] = ..., verifying_share: _Optional[bytes] = ..., min_signers: _Optional[int] = ..., max_signers: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("account_id", "session_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    session_id: str
    def __init__(self, account_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("identifier", "hiding", "binding", "expires_at_unix_ms")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    HIDING_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    identifier: bytes
    hiding: bytes
    binding: bytes
    expires_at_unix_ms: int
    def __init__(self, identifier: _Optional[bytes] = ..., hiding: _Optional[bytes] = ..., binding: _Optional[bytes] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class SigningCommitment(_message.Message):
    __slots__ = ("identifier", "hiding", "binding")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    HIDING_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    identifier: bytes
    hiding: bytes
    binding: bytes
    def __init__(self, identifier: _Optional[bytes] = ..., hiding: _Optional[bytes] = ..., binding: _Optional[bytes] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("key_id", "signature", "expires_at_unix_ms")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    signature: bytes
    expires_at_unix_ms: int
    def __init__(self, key_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("session_id", "message", "commitments", "approvals", "taproot_merkle_root")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    TAPROOT_MERKLE_ROOT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message: bytes
    commitments: _containers.RepeatedCompositeFieldContainer[SigningCommitment]
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    taproot_merkle_root: bytes
    def __init__(self, session_id: _Optional[str] = ..., message: _Optional[bytes] = ..., commitments: _Optional[_Iterable[_Union[SigningCommitment, _Mapping]]] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., taproot_merkle_root: _Optional[bytes] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("identifier", "signature_share")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_SHARE_FIELD_NUMBER: _ClassVar[int]
    identifier: bytes
    signature_share: bytes
    def __init__(self, identifier: _Optional[bytes] = ..., signature_share: _Optional[bytes] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DkgParticipant(_message.Message):
    __slots__ = ("identifier", "key_id")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    identifier: bytes
    key_id: str
    def __init__(self, identifier: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class DkgRound1Package(_message.Message):
    __slots__ = ("identifier", "commitment", "proof_of_knowledge", "encryption_key", "key_id", "signature")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    PROOF_OF_KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    identifier: bytes
    commitment: _containers.RepeatedScalarFieldContainer[bytes]
    proof_of_knowledge: bytes
    encryption_key: bytes
    key_id: str
    signature: bytes
    def __init__(self, identifier: _Optional[bytes] = ..., commitment: _Optional[_Iterable[bytes]] = ..., proof_of_knowledge: _Optional[bytes] = ..., encryption_key: _Optional[bytes] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class DkgRound1Request(_message.Message):
    __slots__ = ("dkg_id", "account_id", "ciphersuite", "min_signers", "max_signers", "participants", "identifier", "policy", "approvals", "operation")
    DKG_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERSUITE_FIELD_NUMBER: _ClassVar[int]
    MIN_SIGNERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIGNERS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    dkg_id: str
    account_id: str
    ciphersuite: str
    min_signers: int
    max_signers: int
    participants: _containers.RepeatedCompositeFieldContainer[DkgParticipant]
    identifier: bytes
    policy: str
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    operation: str
    def __init__(self, dkg_id: _Optional[str] = ..., account_id: _Optional[str] = ..., ciphersuite: _Optional[str] = ..., min_signers: _Optional[int] = ..., max_signers: _Optional[int] = ..., participants: _Optional[_Iterable[_Union[DkgParticipant, _Mapping]]] = ..., identifier: _Optional[bytes] = ..., policy: _Optional[str] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., operation: _Optional[str] = ...) -> None: ...

class DkgRound1Response(_message.Message):
    __slots__ = ("package", "expires_at_unix_ms")
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    package: DkgRound1Package
    expires_at_unix_ms: int
    def __init__(self, package: _Optional[_Union[DkgRound1Package, _Mapping]] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class DkgRound2Request(_message.Message):
    __slots__ = ("dkg_id", "packages")
    DKG_ID_FIELD_NUMBER: _ClassVar[int]
    PACKAGES_FIELD_NUMBER: _ClassVar[int]
    dkg_id: str
    packages: _containers.RepeatedCompositeFieldContainer[DkgRound1Package]
    def __init__(self, dkg_id: _Optional[str] = ..., packages: _Optional[_Iterable[_Union[DkgRound1Package, _Mapping]]] = ...) -> None: ...

class DkgEncryptedShare(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: bytes
    recipient: bytes
    ciphertext: bytes
    def __init__(self, sender: _Optional[bytes] = ..., recipient: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class DkgRound2Response(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[DkgEncryptedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[DkgEncryptedShare, _Mapping]]] = ...) -> None: ...

class DkgRound3Request(_message.Message):
    __slots__ = ("dkg_id", "shares")
    DKG_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    dkg_id: str
    shares: _containers.RepeatedCompositeFieldContainer[DkgEncryptedShare]
    def __init__(self, dkg_id: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[DkgEncryptedShare, _Mapping]]] = ...) -> None: ...

class DkgVerifyingShare(_message.Message):
    __slots__ = ("identifier", "verifying_share")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    VERIFYING_SHARE_FIELD_NUMBER: _ClassVar[int]
    identifier: bytes
    verifying_share: bytes
    def __init__(self, identifier: _Optional[bytes] = ..., verifying_share: _Optional[bytes] = ...) -> None: ...

class DkgRound3Response(_message.Message):
    __slots__ = ("account_id", "ciphersuite", "group_public_key", "identifier", "verifying_share", "verifying_shares", "delta_sequence", "deltas_head")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERSUITE_FIELD_NUMBER: _ClassVar[int]
    GROUP_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    VERIFYING_SHARE_FIELD_NUMBER: _ClassVar[int]
    VERIFYING_SHARES_FIELD_NUMBER: _ClassVar[int]
    DELTA_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DELTAS_HEAD_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    ciphersuite: str
    group_public_key: bytes
    identifier: bytes
    verifying_share: bytes
    verifying_shares: _containers.RepeatedCompositeFieldContainer[DkgVerifyingShare]
    delta_sequence: int
    deltas_head: str
    def __init__(self, account_id: _Optional[str] = ..., ciphersuite: _Optional[str] = ..., group_public_key: _Optional[bytes] = ..., identifier: _Optional[bytes] = ..., verifying_share: _Optional[bytes] = ..., verifying_shares: _Optional[_Iterable[_Union[DkgVerifyingShare, _Mapping]]] = ..., delta_sequence: _Optional[int] = ..., deltas_head: _Optional[str] = ...) -> None: ...

class RepairKey(_message.Message):
    __slots__ = ("identifier", "encryption_key", "key_id", "signature")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    identifier: bytes
    encryption_key: bytes
    key_id: str
    signature: bytes
    def __init__(self, identifier: _Optional[bytes] = ..., encryption_key: _Optional[bytes] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RepairStep1Request(_message.Message):
    __slots__ = ("repair_id", "account_id", "helpers", "participant", "keys", "approvals")
    REPAIR_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    HELPERS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    repair_id: str
    account_id: str
    helpers: _containers.RepeatedCompositeFieldContainer[DkgParticipant]
    participant: DkgParticipant
    keys: _containers.RepeatedCompositeFieldContainer[RepairKey]
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    def __init__(self, repair_id: _Optional[str] = ..., account_id: _Optional[str] = ..., helpers: _Optional[_Iterable[_Union[DkgParticipant, _Mapping]]] = ..., participant: _Optional[_Union[DkgParticipant, _Mapping]] = ..., keys: _Optional[_Iterable[_Union[RepairKey, _Mapping]]] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ...) -> None: ...

class RepairStep1Response(_message.Message):
    __slots__ = ("key", "deltas", "expires_at_unix_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    key: RepairKey
    deltas: _containers.RepeatedCompositeFieldContainer[DkgEncryptedShare]
    expires_at_unix_ms: int
    def __init__(self, key: _Optional[_Union[RepairKey, _Mapping]] = ..., deltas: _Optional[_Iterable[_Union[DkgEncryptedShare, _Mapping]]] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class RepairStep2Request(_message.Message):
    __slots__ = ("repair_id", "deltas")
    REPAIR_ID_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    repair_id: str
    deltas: _containers.RepeatedCompositeFieldContainer[DkgEncryptedShare]
    def __init__(self, repair_id: _Optional[str] = ..., deltas: _Optional[_Iterable[_Union[DkgEncryptedShare, _Mapping]]] = ...) -> None: ...

class RepairStep2Response(_message.Message):
    __slots__ = ("sigma",)
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    sigma: DkgEncryptedShare
    def __init__(self, sigma: _Optional[_Union[DkgEncryptedShare, _Mapping]] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ("kms_key_id", "approvals", "request_id")
    KMS_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    kms_key_id: str
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    request_id: str
    def __init__(self, kms_key_id: _Optional[str] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("sha256", "accounts", "deltas", "object")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    accounts: int
    deltas: int
    object: str
    def __init__(self, sha256: _Optional[str] = ..., accounts: _Optional[int] = ..., deltas: _Optional[int] = ..., object: _Optional[str] = ...) -> None: ...
