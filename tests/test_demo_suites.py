"""``trio-sign demo --ciphersuite``: the demo deals, seals and signs in the suites it is given
and verifies every signature with the suite's own verifier (Taproot: BIP-340 by libsecp256k1
under the output key), in one process and through the full stack."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from coincurve import PublicKeyXOnly

from trio_sign.cli import main
from trio_sign.cli._demo import merkle_root_arg, selected_suites
from trio_sign.crypto import ED25519, SCHEMES, SECP256K1, SECP256K1_TR

ROOT = hashlib.sha256(b"demo tapscript").digest()


def _report(stdout: str) -> dict[str, str]:
    return {
        k: v.strip()
        for k, v in (line.split(None, 1) for line in stdout.splitlines() if line.startswith("  "))
    }


def test_the_default_is_ed25519_alone() -> None:
    args = argparse.Namespace(ciphersuite=None, taproot_merkle_root=None)
    assert selected_suites(args) == (ED25519,)
    args.ciphersuite = ["all"]
    assert selected_suites(args) == SCHEMES
    args.ciphersuite = [SECP256K1_TR.name, SECP256K1.name, SECP256K1_TR.name]
    assert selected_suites(args) == (SECP256K1_TR, SECP256K1)
    assert merkle_root_arg(args, (SECP256K1_TR,)) is None
    args.taproot_merkle_root = ""
    assert merkle_root_arg(args, (SECP256K1_TR,)) == b""


def test_every_suite_in_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "demo",
            "--stack",
            "local",
            "--accounts",
            "9",
            "--signatures",
            "24",
            "--seed",
            "7",
            "--ciphersuite",
            "all",
            "--taproot-merkle-root",
            ROOT.hex(),
            "--workdir",
            str(tmp_path / "demo"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = _report(out)
    assert report["verified"] == "24"
    assert report["failures"] == "0"
    signed = 0
    for scheme in SCHEMES:
        line = report[scheme.name]
        assert line.startswith("3 accounts, ")  # round-robin over 9 accounts
        n = int(line.split(", ")[1].split()[0])
        assert f"{n} verified" in line
        signed += n
    assert signed == 24
    assert "libsodium" in report[ED25519.name]
    assert "RFC 9591" in report[SECP256K1.name]
    assert report[SECP256K1_TR.name].endswith(
        "BIP-340 by libsecp256k1 under the x-only output key "
        f"(tweaked with merkle root {ROOT.hex()})"
    )
    assert report["sealed"].endswith("fingerprint matches seal")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--taproot-merkle-root", "00" * 32], "needs Taproot accounts"),
        (["--ciphersuite", "all", "--taproot-merkle-root", "zz"], "is not hex"),
        (["--ciphersuite", SECP256K1_TR.name, "--taproot-merkle-root", "00"], "not 1 bytes"),
    ],
)
def test_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["demo", "--stack", "local", "--workdir", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "service_key_shares.json").exists()


def test_an_unknown_suite_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--ciphersuite", "FROST-P256-SHA256-v1"])
    assert info.value.code == 2
    assert "FROST-secp256k1-SHA256-TR-v1" in capsys.readouterr().err


def test_taproot_through_the_full_stack(tmp_path: Path) -> None:
    """`scripts/demo --ciphersuite FROST-secp256k1-SHA256-TR-v1 --taproot-merkle-root HEX`:
    KMS, a signed bundle of Taproot accounts, parent, enclave, attested TLS ending in it and
    the gateway; the enclave gets the merkle root with every Sign, and every signature is a
    BIP-340 signature under the tweaked output key. A few signatures keep it fast."""
    exe = Path(sys.executable).with_name("trio-sign")
    proc = subprocess.run(
        [
            str(exe),
            "demo",
            "--stack",
            "full",
            "--ciphersuite",
            SECP256K1_TR.name,
            "--taproot-merkle-root",
            ROOT.hex(),
            "--accounts",
            "4",
            "--signatures",
            "6",
            "--concurrency",
            "2",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(proc.stdout)
    assert report["verified"] == "6"
    assert report["failures"] == "0"
    assert report["attested_channel"] == "verified (SPKI, shares, config, PCRs)"
    assert report[SECP256K1_TR.name] == (
        "4 accounts, 6 signatures, 6 verified: BIP-340 by libsecp256k1 under the x-only output "
        f"key (tweaked with merkle root {ROOT.hex()})"
    )
    assert "signature verified" in report["then"]  # the refused-then-approved session
    # One of the signatures, checked here by libsecp256k1 under the output key the gateway
    # named, which is the group key tweaked with the root.
    sample = json.loads(report["taproot_sample"])
    shares = (tmp_path / "demo" / "shares" / "participant-2_key_shares.json").read_text()
    record = next(
        json.loads(line)
        for line in shares.splitlines()
        if json.loads(line).get("account_id") == sample["account"]
    )
    output_key = bytes.fromhex(sample["output_key_hex"])
    group_key = bytes.fromhex(record["group_public_key"])
    assert output_key == SECP256K1_TR.verifying_key(group_key, ROOT)
    assert output_key != SECP256K1_TR.verifying_key(group_key, None)
    assert PublicKeyXOnly(output_key).verify(
        bytes.fromhex(sample["signature_hex"]), bytes.fromhex(sample["message_hex"])
    )
    errors = [line for line in proc.stderr.splitlines() if '"level":"ERROR"' in line]
    assert not errors, errors
