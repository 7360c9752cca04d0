"""The checked-in gRPC contract: descriptor matches DESIGN.md section 4, generated code is fresh."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .test_proto_dkg import DKG_EXPECTED, DKG_RPCS

# Imported dynamically: the generated .pyi is not mypy --strict clean (bare Mapping, subclassing
# an untyped Message without types-protobuf), and the generated files must stay byte-identical
# to protoc's output.
sign_service_pb2: Any = importlib.import_module("proto_min.sign_service_pb2")
_T: Any = importlib.import_module("google.protobuf.descriptor").FieldDescriptor

REPO = Path(__file__).resolve().parent.parent
# DESIGN.md section 4: message -> [(name, number, type, repeated, message type or None)].
EXPECTED: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "PingRequest": [("payload", 1, _T.TYPE_BYTES, False, None)],
    "PingResponse": [("payload", 1, _T.TYPE_BYTES, False, None)],
    "GetStatusRequest": [],
    "GetStatusResponse": [
        ("state", 1, _T.TYPE_STRING, False, None),
        ("accounts", 2, _T.TYPE_UINT64, False, None),
        ("shares_sha256", 3, _T.TYPE_STRING, False, None),
        ("preload_ms", 4, _T.TYPE_UINT64, False, None),
        ("sessions_open", 5, _T.TYPE_UINT32, False, None),
        ("sessions_max", 6, _T.TYPE_UINT32, False, None),
        ("memory_used_bytes", 7, _T.TYPE_UINT64, False, None),
        ("memory_limit_bytes", 8, _T.TYPE_UINT64, False, None),
        ("last_sse_probe", 9, _T.TYPE_STRING, False, None),
        ("version", 10, _T.TYPE_STRING, False, None),
        # version 2 (DESIGN §4): delta chain and the measured configuration (§9, §12)
        ("deltas", 11, _T.TYPE_UINT32, False, None),
        ("deltas_head", 12, _T.TYPE_STRING, False, None),
        ("config_sha256", 13, _T.TYPE_STRING, False, None),
    ],
    "GetAttestationRequest": [("nonce", 1, _T.TYPE_BYTES, False, None)],
    "GetAttestationResponse": [("document", 1, _T.TYPE_BYTES, False, None)],
    "GetAccountRequest": [("account_id", 1, _T.TYPE_STRING, False, None)],
    "GetAccountResponse": [
        ("account_id", 1, _T.TYPE_STRING, False, None),
        ("ciphersuite", 2, _T.TYPE_STRING, False, None),
        ("group_public_key", 3, _T.TYPE_BYTES, False, None),
        ("identifier", 4, _T.TYPE_BYTES, False, None),
        ("verifying_share", 5, _T.TYPE_BYTES, False, None),
        ("min_signers", 6, _T.TYPE_UINT32, False, None),
        ("max_signers", 7, _T.TYPE_UINT32, False, None),
    ],
    "CommitRequest": [
        ("account_id", 1, _T.TYPE_STRING, False, None),
        ("session_id", 2, _T.TYPE_STRING, False, None),
    ],
    "CommitResponse": [
        ("identifier", 1, _T.TYPE_BYTES, False, None),
        ("hiding", 2, _T.TYPE_BYTES, False, None),
        ("binding", 3, _T.TYPE_BYTES, False, None),
        ("expires_at_unix_ms", 4, _T.TYPE_INT64, False, None),
    ],
    "SigningCommitment": [
        ("identifier", 1, _T.TYPE_BYTES, False, None),
        ("hiding", 2, _T.TYPE_BYTES, False, None),
        ("binding", 3, _T.TYPE_BYTES, False, None),
    ],
    "SignRequest": [
        ("session_id", 1, _T.TYPE_STRING, False, None),
        ("message", 2, _T.TYPE_BYTES, False, None),
        ("commitments", 3, _T.TYPE_MESSAGE, True, "trio_sign.v1.SigningCommitment"),
        # version 2 (DESIGN §4, §11): approvals checked against the account's policy
        ("approvals", 4, _T.TYPE_MESSAGE, True, "trio_sign.v1.Approval"),
        # version 2 (DESIGN §4, §14): proto3 `optional`, so absent and empty differ
        ("taproot_merkle_root", 5, _T.TYPE_BYTES, False, None),
    ],
    "Approval": [
        ("key_id", 1, _T.TYPE_STRING, False, None),
        ("signature", 2, _T.TYPE_BYTES, False, None),
        ("expires_at_unix_ms", 3, _T.TYPE_INT64, False, None),
    ],
    "SignResponse": [
        ("identifier", 1, _T.TYPE_BYTES, False, None),
        ("signature_share", 2, _T.TYPE_BYTES, False, None),
    ],
    "AbortRequest": [("session_id", 1, _T.TYPE_STRING, False, None)],
    "AbortResponse": [],
}
EXPECTED.update(DKG_EXPECTED)
#: The contract's proto3 ``optional`` scalars (explicit presence): message -> field names.
OPTIONAL: dict[str, set[str]] = {"SignRequest": {"taproot_merkle_root"}}

EXPECTED_RPCS = {
    "Ping": ("PingRequest", "PingResponse"),
    "GetStatus": ("GetStatusRequest", "GetStatusResponse"),
    "GetAttestation": ("GetAttestationRequest", "GetAttestationResponse"),
    "GetAccount": ("GetAccountRequest", "GetAccountResponse"),
    "Commit": ("CommitRequest", "CommitResponse"),
    "Sign": ("SignRequest", "SignResponse"),
    "Abort": ("AbortRequest", "AbortResponse"),
}
EXPECTED_RPCS.update(DKG_RPCS)


def test_package_and_syntax() -> None:
    fd = sign_service_pb2.DESCRIPTOR
    assert fd.package == "trio_sign.v1"
    assert fd.name == "proto_min/sign_service.proto"
    assert set(fd.message_types_by_name) == set(EXPECTED)


@pytest.mark.parametrize("message", sorted(EXPECTED))
def test_message_fields(message: str) -> None:
    desc = sign_service_pb2.DESCRIPTOR.message_types_by_name[message]
    got = []
    for f in desc.fields:
        repeated = f.is_repeated
        sub = f.message_type.full_name if f.message_type is not None else None
        got.append((f.name, f.number, f.type, repeated, sub))
        if f.name in OPTIONAL.get(message, ()):
            # proto3 `optional`: explicit presence through protoc's synthetic oneof, which
            # stock clients see as a plain optional field (not a real oneof).
            assert f.has_presence
            assert f.containing_oneof is not None
            assert f.containing_oneof.name == "_" + f.name
            assert [x.name for x in f.containing_oneof.fields] == [f.name]
        else:
            # proto3 implicit presence everywhere else.
            assert f.has_presence == (f.type == _T.TYPE_MESSAGE and not repeated)
            assert f.containing_oneof is None
    assert got == EXPECTED[message]


def test_service_methods() -> None:
    service = sign_service_pb2.DESCRIPTOR.services_by_name["SignService"]
    assert service.full_name == "trio_sign.v1.SignService"
    got = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert got == {name: (i, o, False, False) for name, (i, o) in EXPECTED_RPCS.items()}


def test_round_trip() -> None:
    req = sign_service_pb2.SignRequest(
        session_id="s-1",
        message=b"msg",
        commitments=[sign_service_pb2.SigningCommitment(identifier=b"\x01" * 32)],
    )
    back = sign_service_pb2.SignRequest.FromString(req.SerializeToString())
    assert back == req


def test_taproot_merkle_root_presence_survives_the_wire() -> None:
    """Absent, empty and 32 bytes are three different requests on the wire (DESIGN §4)."""
    absent = sign_service_pb2.SignRequest(session_id="s")
    empty = sign_service_pb2.SignRequest(session_id="s", taproot_merkle_root=b"")
    root = sign_service_pb2.SignRequest(session_id="s", taproot_merkle_root=b"\x07" * 32)
    wires = [m.SerializeToString() for m in (absent, empty, root)]
    assert len(set(wires)) == 3
    back = [sign_service_pb2.SignRequest.FromString(w) for w in wires]
    assert [m.HasField("taproot_merkle_root") for m in back] == [False, True, True]
    assert [m.taproot_merkle_root for m in back] == [b"", b"", b"\x07" * 32]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the modules")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        [str(REPO / "scripts" / "gen-proto"), str(tmp_path)], check=True, env=env, timeout=60
    )
    for name in ("sign_service_pb2.py", "sign_service_pb2.pyi"):
        fresh = (tmp_path / name).read_bytes()
        checked_in = (REPO / "proto_min" / name).read_bytes()
        assert fresh == checked_in, f"proto_min/{name} is stale: run scripts/gen-proto"
