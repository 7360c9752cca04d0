"""Issue 14: ``trio-sign approver keygen`` and ``approve``: keys (0600) whose printed lines the
enclave accepts, and approvals (JSON) that the enclave's decision accepts."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from proto_min import sign_service_pb2 as pb
from trio_sign.authz import Authorizer, approval_payload
from trio_sign.cli._approver import parse_duration_ms
from trio_sign.cli._main import main
from trio_sign.enclave import parse_measured_config


def _keygen(tmp_path: Path, kind: str, name: str, capsys: pytest.CaptureFixture[str]) -> str:
    out = tmp_path / f"{name}.key"
    assert main(["approver", "keygen", "--type", kind, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"key id: {name}" in printed
    document = json.loads(out.read_text())
    assert document["private_key"] not in printed  # the secret is never printed
    assert f"public key: {document['public_key']}" in printed
    return printed[printed.index("[approvers.") :]


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_keygen_then_approve_is_accepted_by_the_enclave(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _keygen(tmp_path, kind, "ops-1", capsys)
    toml = lines + '\n[policies.default]\napprovers = ["ops-1"]\nthreshold = 1\n'
    measured = parse_measured_config(toml.encode())
    assert measured.policies.approvers["ops-1"].type == kind
    message = tmp_path / "message.bin"
    message.write_bytes(b"\x00withdraw\xff")
    argv = ["approver", "approve", "--key", str(tmp_path / "ops-1.key"), "--account", "acct-é"]
    argv += ["--session", "s-1", "--message-file", str(message), "--expires-in", "2m"]
    assert main(argv) == 0
    approval = json.loads(capsys.readouterr().out)
    assert approval["key_id"] == "ops-1"
    assert approval["message_sha256"] == hashlib.sha256(message.read_bytes()).hexdigest()
    signature = bytes.fromhex(approval["signature_hex"])
    assert base64.b64decode(approval["signature_base64"]) == signature
    assert len(signature) == 64
    payload = approval_payload(
        "acct-é", "s-1", message.read_bytes(), approval["expires_at_unix_ms"]
    )
    assert approval["payload_hex"] == payload.hex()

    wire = pb.Approval(
        key_id=approval["key_id"],
        signature=signature,
        expires_at_unix_ms=approval["expires_at_unix_ms"],
    )
    decision = Authorizer(measured.policies).decide(
        account_id="acct-é",
        policy="default",
        session_id="s-1",
        message=message.read_bytes(),
        approvals=[wire],
        now=0.0,
    )
    assert decision.allowed, decision.detail
    lifetime = approval["expires_at_unix_ms"] - decision_time_ms()
    assert 100_000 < lifetime <= 120_000


def decision_time_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _keygen(tmp_path, "ed25519", "k", capsys)
    before = (tmp_path / "k.key").read_bytes()
    assert main(["approver", "keygen", "--out", str(tmp_path / "k.key")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "k.key").read_bytes() == before


def test_approve_refuses_a_key_readable_by_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen(tmp_path, "p256", "k", capsys)
    key = tmp_path / "k.key"
    os.chmod(key, 0o644)
    msg = tmp_path / "m"
    msg.write_bytes(b"x")
    argv = ["approver", "approve", "--key", str(key), "--account", "a", "--session", "s"]
    assert main([*argv, "--message-file", str(msg)]) == 2
    assert "chmod 600" in capsys.readouterr().err
    os.chmod(key, 0o600)
    key.write_text('{"format": "something else"}')
    assert main([*argv, "--message-file", str(msg)]) == 2
    assert "not a trio-sign approver key" in capsys.readouterr().err


def test_durations() -> None:
    assert parse_duration_ms("60s") == 60_000
    assert parse_duration_ms("500ms") == 500
    assert parse_duration_ms("5m") == 300_000
    assert parse_duration_ms("1h") == 3_600_000
    assert parse_duration_ms("90") == 90_000
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ms("soon")
