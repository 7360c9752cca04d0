"""``trio-sign shares`` and bundle signatures: ceremony-key generate, seal and reencrypt with
--signing-key / --signing-kms-key-id, inspect showing and checking the signer."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import trio

from trio_sign.cli import main
from trio_sign.kms import KeyStore, LocalKms, serve_kms_local
from trio_sign.nitro import LocalNsm
from trio_sign.shares import BundleSignature, CeremonyKey, DevKeyFile, ShareStore

from .forged_bundles import unsigned, with_signature_record


def _inspect(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main(["shares", "inspect", str(path), "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


@pytest.fixture
def service(tmp_path: Path) -> Path:
    assert main(["shares", "generate", "--accounts", "7", "--out", str(tmp_path / "g")]) == 0
    return tmp_path / "g" / "service_key_shares.json"


def test_ceremony_key_seal_inspect(
    tmp_path: Path, service: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "ceremony.key"
    capsys.readouterr()
    assert main(["shares", "ceremony-key", "generate", "--out", str(key_file)]) == 0
    out = capsys.readouterr().out
    public = out.split("public key ")[1].split()[0]
    assert f'signing_keys = ["{public}"]' in out
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert CeremonyKey.load(key_file).public_key.hex() == public
    assert main(["shares", "ceremony-key", "public-key", str(key_file)]) == 0
    assert capsys.readouterr().out.strip() == public
    assert json.loads(key_file.read_text())["seed"] not in out  # the secret is never printed
    # a second generate over the file is refused
    assert main(["shares", "ceremony-key", "generate", "--out", str(key_file)]) == 1

    sealed = tmp_path / "signed.enc"
    dev = tmp_path / "dev.key"
    seal = ["shares", "seal", "--in", str(service), "--out", str(sealed), "--dev-key", str(dev)]
    assert main([*seal, "--signing-key", str(key_file)]) == 0
    out = capsys.readouterr().out
    assert f"signed by {public}" in out
    sha = out.split("sha256 ")[1].split()[0]

    code, info = _inspect(sealed, capsys)
    assert code == 0
    assert info["signer"] == public
    assert info["signature"] == "valid"
    assert info["kind"] == "base"
    assert info["sha256"] == sha
    code, info = _inspect(sealed, capsys, "--signing-key", public)
    assert code == 0
    assert info["signed_by_expected_key"] is True
    other = CeremonyKey.generate().public_key.hex()
    code, info = _inspect(sealed, capsys, "--signing-key", other)
    assert code == 1
    assert info["signed_by_expected_key"] is False
    assert main(["shares", "inspect", str(sealed), "--signing-key", "zz"]) == 2

    # a tampered signature shows as INVALID, and fails the check
    record = BundleSignature.decode(sealed.read_bytes()[-104:])
    bad = bytearray(record.signature)
    bad[0] ^= 1
    tampered = tmp_path / "tampered.enc"
    tampered.write_bytes(with_signature_record(sealed.read_bytes(), record.public_key, bytes(bad)))
    code, info = _inspect(tampered, capsys, "--signing-key", public)
    assert code == 1
    assert info["signature"] == "INVALID"
    assert info["sha256"] == sha  # the fingerprint does not cover the record
    # unsigned
    bare = tmp_path / "bare.enc"
    bare.write_bytes(unsigned(sealed.read_bytes()))
    code, info = _inspect(bare, capsys, "--signing-key", public)
    assert code == 1
    assert info["signature"] == "unsigned"
    assert info["signer"] is None

    # reencrypt re-signs with the key given (a new body, a new fingerprint), or leaves it
    # unsigned without one
    new_dev = tmp_path / "new-dev.key"
    DevKeyFile.create(new_dev).close()
    re = ["shares", "reencrypt", "--in", str(sealed), "--old-dev-key", str(dev)]
    assert main([*re, "--out", str(tmp_path / "re.enc"), "--new-dev-key", str(new_dev),
                 "--signing-key", str(key_file)]) == 0  # fmt: skip
    assert f"signed by {public}" in capsys.readouterr().out
    code, info = _inspect(tmp_path / "re.enc", capsys, "--signing-key", public)
    assert code == 0
    assert info["sha256"] != sha
    assert main([*re, "--out", str(tmp_path / "re2.enc"), "--new-dev-key", str(new_dev)]) == 0
    assert "unsigned" in capsys.readouterr().out
    assert _inspect(tmp_path / "re2.enc", capsys)[1]["signature"] == "unsigned"


@pytest.fixture
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("_aws_env")
async def test_seal_signs_with_a_kms_key(
    tmp_path: Path, service: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nsm = LocalNsm()
    store = KeyStore(tmp_path / "kms-keys.json")
    kms = LocalKms(store, root_pem=nsm.root_pem)
    key = store.create(key_spec="ECC_NIST_EDWARDS25519")
    sealed = tmp_path / "kms-signed.enc"
    dev = tmp_path / "dev.key"
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_kms_local, kms, "tcp://127.0.0.1:0")
            args = ["shares", "seal", "--in", str(service), "--out", str(sealed),
                    "--dev-key", str(dev), "--signing-kms-key-id", key.key_id,
                    "--kms-endpoint", url]  # fmt: skip
            capsys.readouterr()
            assert await trio.to_thread.run_sync(main, args) == 0
            out = capsys.readouterr().out
            pub = await trio.to_thread.run_sync(
                lambda: kms.handle("GetPublicKey", json.dumps({"KeyId": key.key_id}).encode())
            )
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    import base64

    public = base64.b64decode(pub[1]["PublicKey"])[-32:].hex()
    assert f"signed by {public}" in out
    code, info = _inspect(sealed, capsys, "--signing-key", public)
    assert code == 0
    assert info["signature"] == "valid"
    provider = DevKeyFile.load(dev)
    with sealed.open("rb") as f:
        loaded = ShareStore.load_sealed(f, provider)
    assert loaded.signer is not None
    assert loaded.signer.hex() == public
    loaded.close()
    provider.close()


def test_sign_adds_or_replaces_the_signature_and_keeps_the_fingerprint(
    tmp_path: Path, service: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = tmp_path / "plain.enc"
    seal = ["shares", "seal", "--in", str(service), "--out", str(sealed),
            "--dev-key", str(tmp_path / "dev.key")]  # fmt: skip
    assert main(seal) == 0
    sha = capsys.readouterr().out.split("sha256 ")[1].split()[0]
    keys = []
    for name in ("a.key", "b.key"):
        assert main(["shares", "ceremony-key", "generate", "--out", str(tmp_path / name)]) == 0
        keys.append(capsys.readouterr().out.split("public key ")[1].split()[0])
    a, b = tmp_path / "a.enc", tmp_path / "b.enc"
    assert main(["shares", "sign", "--in", str(sealed), "--out", str(a),
                 "--signing-key", str(tmp_path / "a.key")]) == 0  # fmt: skip
    assert f"sha256 {sha}" in capsys.readouterr().out
    assert main(["shares", "sign", "--in", str(a), "--out", str(b),
                 "--signing-key", str(tmp_path / "b.key")]) == 0  # fmt: skip
    capsys.readouterr()
    for path, key in ((a, keys[0]), (b, keys[1])):
        code, info = _inspect(path, capsys, "--signing-key", key)
        assert code == 0
        assert info["sha256"] == sha
    assert b.stat().st_size == a.stat().st_size == sealed.stat().st_size + 104
    # a signing option is required, and an existing output is not overwritten
    with pytest.raises(SystemExit):
        main(["shares", "sign", "--in", str(sealed), "--out", str(tmp_path / "c.enc")])
    assert main(["shares", "sign", "--in", str(a), "--out", str(b),
                 "--signing-key", str(tmp_path / "a.key")]) == 1  # fmt: skip
