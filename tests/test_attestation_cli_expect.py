"""``trio-sign attestation verify --expect-spki FILE|HEX --expect-shares HEX`` on attested-channel
documents from a local NSM: the binding is printed, a match passes, a mismatch is one line with
its reason code."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trio_sign.attested import AttestedChannelError
from trio_sign.cli import _attestation
from trio_sign.nitro import LocalNsm
from trio_sign.nitro._binding import NO_DELTAS, Binding, encode_binding

from .attested_helpers import CONFIG, OLD_SHARES, SHARES, self_signed_p256

CERT_PEM, KEY_PEM, SPKI = self_signed_p256()


@pytest.fixture(scope="module")
def nsm() -> Iterator[LocalNsm]:
    local = LocalNsm()
    yield local
    local.close()


@pytest.fixture
def files(tmp_path: Path, nsm: LocalNsm) -> dict[str, Path]:
    binding = encode_binding(Binding(shares=SHARES, deltas=NO_DELTAS, config=CONFIG))
    out = {
        "doc": nsm.attestation(public_key=SPKI, user_data=binding, nonce=b"n" * 32),
        "plain": nsm.attestation(public_key=SPKI, user_data=SHARES),
        "root.pem": nsm.root_pem,
        "cert.pem": CERT_PEM,
        "cert.der": x509.load_pem_x509_certificate(CERT_PEM).public_bytes(
            serialization.Encoding.DER
        ),
        "key.pub": serialization.load_pem_private_key(KEY_PEM, None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "other.pem": self_signed_p256()[0],
        "junk": b"not a key",
    }
    paths = {}
    for name, data in out.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trio-sign")
    _attestation.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attestation", "verify", *argv])
    code: int = args.func(args)
    return code


def _base(files: dict[str, Path], doc: str = "doc") -> list[str]:
    return [str(files[doc]), "--root", str(files["root.pem"])]


@pytest.mark.parametrize("spki", ["cert.pem", "cert.der", "key.pub", "hex"])
def test_a_matching_spki_and_shares_pass(
    files: dict[str, Path], spki: str, capsys: pytest.CaptureFixture[str]
) -> None:
    given = SPKI.hex() if spki == "hex" else str(files[spki])
    argv = [*_base(files), "--expect-spki", given, "--expect-shares", SHARES.hex()]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("attestation document OK (signature; chain; validity at ")
    assert "; public_key; shares)\n" in out.splitlines()[0] + "\n"
    assert f"shares      {SHARES.hex()}\n" in out
    assert f"deltas      {NO_DELTAS.hex()}\n" in out
    assert f"config      {CONFIG.hex()}\n" in out


def test_json_shows_the_binding(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli([*_base(files), "--expect-shares", SHARES.hex(), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["binding"] == {
        "shares": SHARES.hex(),
        "deltas": NO_DELTAS.hex(),
        "config": CONFIG.hex(),
    }
    assert _cli([*_base(files, "plain"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["binding"] is None


@pytest.mark.parametrize(
    ("doc", "extra", "reason"),
    [
        ("doc", ["--expect-spki", "other.pem"], "spki_mismatch"),
        ("doc", ["--expect-spki", "hex-other"], "spki_mismatch"),
        ("doc", ["--expect-shares", OLD_SHARES.hex()], "shares_mismatch"),
        ("plain", ["--expect-shares", SHARES.hex()], "bad_binding"),
    ],
)
def test_a_mismatch_is_refused_with_its_reason(
    files: dict[str, Path], doc: str, extra: list[str], reason: str
) -> None:
    if extra[1] == "hex-other":
        extra = [extra[0], self_signed_p256()[2].hex()]
    elif extra[1].endswith(".pem"):
        extra = [extra[0], str(files[extra[1]])]
    with pytest.raises(AttestedChannelError) as info:
        _cli([*_base(files, doc), *extra])
    assert info.value.reason == reason
    assert "\n" not in str(info.value)


def test_a_document_without_public_key_fails_expect_spki(
    tmp_path: Path, files: dict[str, Path], nsm: LocalNsm
) -> None:
    bare = tmp_path / "bare"
    bare.write_bytes(nsm.attestation(user_data=SHARES))
    with pytest.raises(AttestedChannelError) as info:
        _cli([str(bare), "--root", str(files["root.pem"]), "--expect-spki", SPKI.hex()])
    assert info.value.reason == "spki_mismatch"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--expect-shares", "abcd"], "expected 64 hex digits"),
        (["--expect-shares", "zz"], "not hex"),
        (["--expect-spki", "00ff"], "neither a file nor a hex DER SubjectPublicKeyInfo"),
        (["--expect-spki", "JUNK"], "holds no certificate or public key"),
    ],
)
def test_bad_arguments_are_usage_errors(
    files: dict[str, Path], argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(files["junk"]) if a == "JUNK" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        _cli([*_base(files), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_line_exits_1_with_one_line(files: dict[str, Path]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_sign.cli",
            "attestation",
            "verify",
            *_base(files),
            "--expect-shares",
            OLD_SHARES.hex(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("trio-sign: error: shares_mismatch: the document binds shares")
