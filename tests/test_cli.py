"""The trio-sign command line: generate, seal, inspect, demo, and its failure modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trio_sign.cli import main
from trio_sign.shares import DevKeyFile, ShareStore

from .forged_bundles import forged_bundle
from .share_helpers import make_record


def test_generate_seal_inspect_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shares"
    assert main(["shares", "generate", "--accounts", "25", "--out", str(out)]) == 0
    service = out / "service_key_shares.json"
    assert service.exists()
    assert (out / "participant-2_key_shares.json").exists()
    assert (out / "participant-3_key_shares.json").exists()
    assert oct(service.stat().st_mode & 0o777) == "0o600"
    lines = service.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "format": "trio-sign/key-shares",
        "version": 1,
        "ciphersuite": "FROST-ED25519-SHA512-v1",
    }
    assert len(lines) == 27
    assert json.loads(lines[-1]) == {"end": True, "accounts": 25}

    sealed = tmp_path / "service_key_shares.json.enc"
    key = tmp_path / "dev-key.json"
    args = ["shares", "seal", "--in", str(service), "--out", str(sealed), "--dev-key", str(key)]
    assert main(args) == 0
    seal_out = capsys.readouterr().out
    sha = seal_out.split("sha256 ")[1].split()[0]

    assert main(["shares", "inspect", str(sealed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["accounts"] == 25
    assert info["sha256"] == sha
    assert "encrypted_data_key" not in info
    text = json.dumps(info)
    for line in lines[1:-1]:
        assert json.loads(line)["signing_share"] not in text

    provider = DevKeyFile.load(key)
    with sealed.open("rb") as f:
        store = ShareStore.load_sealed(f, provider)
    assert len(store) == 25
    assert store.fingerprint == sha
    store.close()
    provider.close()


def test_generate_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shares", "generate", "--accounts", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["shares", "generate", "--accounts", "1", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trio-sign: error: ")
    assert "already exists; pass --force" in err
    assert len(err.strip().splitlines()) == 1


def test_seal_reports_bad_record_with_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["shares", "generate", "--accounts", "3", "--out", str(tmp_path)])
    service = tmp_path / "service_key_shares.json"
    lines = service.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["verifying_share"] = json.loads(lines[3])["verifying_share"]
    lines[2] = json.dumps(rec)
    service.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    sealed = tmp_path / "out.enc"
    code = main(
        [
            "shares",
            "seal",
            "--in",
            str(service),
            "--out",
            str(sealed),
            "--dev-key",
            str(tmp_path / "k.json"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "line 3" in err
    assert rec["signing_share"] not in err
    assert not sealed.exists()


def test_inspect_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shares", "inspect", str(tmp_path / "nope.enc")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_inspect_and_reencrypt_refuse_a_forged_account_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A header claiming 2**24 accounts over 3 records: one line naming both counts."""
    key_path = tmp_path / "dev.key"
    key = DevKeyFile.create(key_path)
    forged = tmp_path / "forged.enc"
    forged.write_bytes(
        forged_bundle(key, [make_record(f"acct-{i}") for i in range(3)], accounts=1 << 24)
    )
    key.close()
    size = forged.stat().st_size
    expected = (
        f"the header declares 16777216 accounts, but a {size}-byte bundle holds 3 at most "
        "(truncated, or a forged header)"
    )
    assert main(["shares", "inspect", str(forged)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert expected in err
    out = tmp_path / "out.enc"
    args = ["shares", "reencrypt", "--in", str(forged), "--out", str(out)]
    assert main([*args, "--old-dev-key", str(key_path), "--new-dev-key", str(key_path)]) == 1
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_host_memory_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_sign.cli import _shares
    from trio_sign.enclave import _memory

    monkeypatch.setattr(_memory, "read_memory_limit_bytes", lambda: 1000 * 1024 * 1024)
    monkeypatch.setattr(_memory, "read_rss_bytes", lambda: 100 * 1024 * 1024)
    _shares.host_memory_check(1000)  # 0.4 MB: fits
    with pytest.raises(_memory.MemoryLimitError, match="16777216 accounts need"):
        _shares.host_memory_check(1 << 24)  # ~6.4 GB over a 900 MB hard limit

    def unreadable() -> int:
        raise OSError("no /proc")

    monkeypatch.setattr(_memory, "read_rss_bytes", unreadable)
    _shares.host_memory_check(1 << 24)  # not checkable: not refused


def test_usage_error_exit_code() -> None:
    with pytest.raises(SystemExit) as info:
        main(["shares", "generate"])
    assert info.value.code == 2


def test_demo_small(tmp_path: Path) -> None:
    """The demo end to end as a user runs it: the console script in a child process."""
    exe = Path(sys.executable).with_name("trio-sign")
    proc = subprocess.run(
        [
            str(exe),
            "demo",
            "--accounts",
            "50",
            "--signatures",
            "40",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, proc.stderr
    report = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.startswith("  "))
    assert report["verified"].strip() == "40"
    assert report["failures"].strip() == "0"


def test_demo_full_stack(tmp_path: Path) -> None:
    """The whole system as `trio-sign demo --stack full` runs it: local KMS, a bundle signed by
    a ceremony key the enclave.toml pins, parent, enclave (in fresh namespaces where allowed),
    attested TLS ending in the enclave checked by the reference gateway; every signature
    verified, the enclave loaded the bundle under the production signature check, nothing
    logged at ERROR."""
    import hashlib

    exe = Path(sys.executable).with_name("trio-sign")
    proc = subprocess.run(
        [
            str(exe),
            "demo",
            "--stack",
            "full",
            "--accounts",
            "60",
            "--signatures",
            "80",
            "--concurrency",
            "8",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.startswith("  "))
    assert report["verified"].strip() == "80"
    assert report["failures"].strip() == "0"
    assert "matches" in report["fingerprint"]
    assert "attested TLS ending in the enclave" in proc.stdout
    assert "mTLS" not in proc.stdout
    # the gateway's check: the document bound this connection's key, the bundle, the config
    # and the PCRs (each pinned)
    assert report["attested_channel"].strip() == "verified (SPKI, shares, config, PCRs)"
    assert int(report["attested_connections"]) >= 1
    # the bundle is signed by the ceremony key, the one key the enclave's configuration pins
    work = tmp_path / "demo"
    signer = report["bundle_signer"].strip()
    assert Path(report["signing_key_file"].strip()) == work / "ceremony-key.json"
    enclave_toml = Path(report["enclave_config"].strip())
    assert f'signing_keys = ["{signer}"]' in enclave_toml.read_text()
    assert report["enclave_config_sha256"].strip() == (
        hashlib.sha256(enclave_toml.read_bytes()).hexdigest()
    )
    assert signer in report["bundle_signature"]
    sealed = work / "service_key_shares.json.enc"
    assert main(["shares", "inspect", str(sealed), "--signing-key", signer]) == 0
    # issue 14: the enclave.toml pins three approvers and a 2-of-3 default policy; the gateway
    # held two keys and approved every Sign; one Sign with one approval was refused, and its
    # session then signed (the refusal did not consume the nonces)
    toml = enclave_toml.read_text()
    assert "[approvers.ops-1]" in toml
    assert 'type = "p256"' in toml
    assert 'approvers = ["ops-1", "ops-2", "risk-1"]\nthreshold = 2' in toml
    assert report["policy"].startswith("default: 2 of ops-1 (ed25519), ops-2 (ed25519), risk-1")
    assert report["approved_by"].strip() == (
        "ops-1 (ed25519): 81 approvals, risk-1 (p256): 81 approvals"
    )
    assert report["refused"].strip() == (
        "PERMISSION_DENIED: not authorized (too_few_approvals): 1 approval(s) (ops-1); "
        "policy 'default' needs 2 of [ops-1, ops-2, risk-1]"
    )
    assert "signed with 2 approvals; signature verified" in report["then"]
    assert "was refused without consuming" in report["authorization"]
    for key_file in (work / "approvers").iterdir():
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert json.loads(key_file.read_text())["private_key"] not in proc.stdout + proc.stderr
    # ... so the enclave ran the production check, not the unsigned development fallback
    logs = proc.stderr + (work / "enclave-logs.jsonl").read_text()
    assert '"preload complete"' in logs
    assert "DEVELOPMENT: unsigned" not in logs
    errors = [line for line in proc.stderr.splitlines() if '"level":"ERROR"' in line]
    assert not errors, errors


def test_dev_up_serves_until_interrupted(tmp_path: Path) -> None:
    """`trio-sign dev up --shares F`: the stack comes up with a signed bundle, a stock grpcio
    client with the printed client certificate reaches the enclave over TLS ending in the
    enclave, pinning the enclave certificate dev up verified by its attestation (server_cert),
    and Ctrl-C stops it all."""
    import signal

    import grpc

    from proto_min import sign_service_pb2 as pb
    from trio_sign.testing import generate_share_files

    gen = generate_share_files(tmp_path / "shares", 5, counterparts=False)
    exe = Path(sys.executable).with_name("trio-sign")
    proc = subprocess.Popen(
        [
            str(exe),
            "dev",
            "up",
            "--shares",
            str(gen.service_file),
            "--workdir",
            str(tmp_path / "stack"),
            "--health",
            "tcp://127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info: dict[str, str] = {}
        for line in proc.stdout:
            if line.startswith("Ctrl-C"):
                break
            if line.startswith("  "):
                key, value = line.split(None, 1)
                info[key] = value.strip()
        assert info["accounts"] == "5"
        target = info["grpc"].split()[0]
        server_cert = Path(info["server_cert"].split()[0])
        assert server_cert == (tmp_path / "stack" / "enclave-cert.pem").resolve()
        # the bundle is signed by the ceremony key pinned in the stack's enclave.toml
        signer = info["bundle_signer"].split()[0]
        enclave_toml = Path(info["enclave_config"].split()[0]).read_text()
        assert f'signing_keys = ["{signer}"]' in enclave_toml
        credentials = grpc.ssl_channel_credentials(
            root_certificates=server_cert.read_bytes(),
            private_key=Path(info["client_key"]).read_bytes(),
            certificate_chain=Path(info["client_cert"]).read_bytes(),
        )
        name = [("grpc.ssl_target_name_override", info["server_name"])]
        with grpc.secure_channel(target, credentials, options=name) as channel:
            ping = channel.unary_unary(
                "/trio_sign.v1.SignService/GetStatus",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.GetStatusResponse.FromString,
            )
            status = ping(pb.GetStatusRequest(), timeout=10)
        assert status.state == "serving"
        assert status.accounts == 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
