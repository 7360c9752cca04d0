"""The DKG part of the gRPC contract (docs/key-lifecycle.md §5): names, numbers and types.

``tests/test_proto.py`` checks the whole descriptor against its table; the DKG messages and
rpcs are listed here (:data:`DKG_EXPECTED`, :data:`DKG_RPCS`) so that table can take them in.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

sign_service_pb2: Any = importlib.import_module("proto_min.sign_service_pb2")
_T: Any = importlib.import_module("google.protobuf.descriptor").FieldDescriptor

_B, _S, _U32, _U64, _I64, _M = (
    _T.TYPE_BYTES,
    _T.TYPE_STRING,
    _T.TYPE_UINT32,
    _T.TYPE_UINT64,
    _T.TYPE_INT64,
    _T.TYPE_MESSAGE,
)
_P = "trio_sign.v1."

DKG_EXPECTED: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "DkgParticipant": [("identifier", 1, _B, False, None), ("key_id", 2, _S, False, None)],
    "DkgRound1Package": [
        ("identifier", 1, _B, False, None),
        ("commitment", 2, _B, True, None),
        ("proof_of_knowledge", 3, _B, False, None),
        ("encryption_key", 4, _B, False, None),
        ("key_id", 5, _S, False, None),
        ("signature", 6, _B, False, None),
    ],
    "DkgRound1Request": [
        ("dkg_id", 1, _S, False, None),
        ("account_id", 2, _S, False, None),
        ("ciphersuite", 3, _S, False, None),
        ("min_signers", 4, _U32, False, None),
        ("max_signers", 5, _U32, False, None),
        ("participants", 6, _M, True, _P + "DkgParticipant"),
        ("identifier", 7, _B, False, None),
        ("policy", 8, _S, False, None),
        ("approvals", 9, _M, True, _P + "Approval"),
        ("operation", 10, _S, False, None),
    ],
    "DkgRound1Response": [
        ("package", 1, _M, False, _P + "DkgRound1Package"),
        ("expires_at_unix_ms", 2, _I64, False, None),
    ],
    "DkgRound2Request": [
        ("dkg_id", 1, _S, False, None),
        ("packages", 2, _M, True, _P + "DkgRound1Package"),
    ],
    "DkgEncryptedShare": [
        ("sender", 1, _B, False, None),
        ("recipient", 2, _B, False, None),
        ("ciphertext", 3, _B, False, None),
    ],
    "DkgRound2Response": [("shares", 1, _M, True, _P + "DkgEncryptedShare")],
    "DkgRound3Request": [
        ("dkg_id", 1, _S, False, None),
        ("shares", 2, _M, True, _P + "DkgEncryptedShare"),
    ],
    "DkgVerifyingShare": [
        ("identifier", 1, _B, False, None),
        ("verifying_share", 2, _B, False, None),
    ],
    "DkgRound3Response": [
        ("account_id", 1, _S, False, None),
        ("ciphersuite", 2, _S, False, None),
        ("group_public_key", 3, _B, False, None),
        ("identifier", 4, _B, False, None),
        ("verifying_share", 5, _B, False, None),
        ("verifying_shares", 6, _M, True, _P + "DkgVerifyingShare"),
        ("delta_sequence", 7, _U64, False, None),
        ("deltas_head", 8, _S, False, None),
    ],
    # repair (docs/refresh-repair.md)
    "RepairKey": [
        ("identifier", 1, _B, False, None),
        ("encryption_key", 2, _B, False, None),
        ("key_id", 3, _S, False, None),
        ("signature", 4, _B, False, None),
    ],
    "RepairStep1Request": [
        ("repair_id", 1, _S, False, None),
        ("account_id", 2, _S, False, None),
        ("helpers", 3, _M, True, _P + "DkgParticipant"),
        ("participant", 4, _M, False, _P + "DkgParticipant"),
        ("keys", 5, _M, True, _P + "RepairKey"),
        ("approvals", 6, _M, True, _P + "Approval"),
    ],
    "RepairStep1Response": [
        ("key", 1, _M, False, _P + "RepairKey"),
        ("deltas", 2, _M, True, _P + "DkgEncryptedShare"),
        ("expires_at_unix_ms", 3, _I64, False, None),
    ],
    "RepairStep2Request": [
        ("repair_id", 1, _S, False, None),
        ("deltas", 2, _M, True, _P + "DkgEncryptedShare"),
    ],
    "RepairStep2Response": [("sigma", 1, _M, False, _P + "DkgEncryptedShare")],
    # Compaction (docs/compaction.md).
    "CompactRequest": [
        ("kms_key_id", 1, _S, False, None),
        ("approvals", 2, _M, True, _P + "Approval"),
        ("request_id", 3, _S, False, None),
    ],
    "CompactResponse": [
        ("sha256", 1, _S, False, None),
        ("accounts", 2, _U64, False, None),
        ("deltas", 3, _U32, False, None),
        ("object", 4, _S, False, None),
    ],
}

DKG_RPCS = {
    "DkgRound1": ("DkgRound1Request", "DkgRound1Response"),
    "DkgRound2": ("DkgRound2Request", "DkgRound2Response"),
    "DkgRound3": ("DkgRound3Request", "DkgRound3Response"),
    "RepairStep1": ("RepairStep1Request", "RepairStep1Response"),
    "RepairStep2": ("RepairStep2Request", "RepairStep2Response"),
    "Compact": ("CompactRequest", "CompactResponse"),
}


@pytest.mark.parametrize("message", sorted(DKG_EXPECTED))
def test_dkg_message_fields(message: str) -> None:
    desc = sign_service_pb2.DESCRIPTOR.message_types_by_name[message]
    got = [
        (
            f.name,
            f.number,
            f.type,
            f.is_repeated,
            None if f.message_type is None else f.message_type.full_name,
        )
        for f in desc.fields
    ]
    assert got == DKG_EXPECTED[message]
    for f in desc.fields:  # proto3 implicit presence: no optional scalars in the DKG messages
        assert f.containing_oneof is None


def test_dkg_rpcs() -> None:
    service = sign_service_pb2.DESCRIPTOR.services_by_name["SignService"]
    got = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    for name, types in DKG_RPCS.items():
        assert got[name] == types
    for name in DKG_RPCS:
        m = service.methods_by_name[name]
        assert not m.client_streaming
        assert not m.server_streaming
