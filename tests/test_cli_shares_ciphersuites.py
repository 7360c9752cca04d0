"""``trio-sign shares generate --ciphersuite`` (repeatable, round-robin), then seal, inspect,
reencrypt and load a mixed bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trio_sign.cli import _shares as cli_shares
from trio_sign.cli import main
from trio_sign.crypto import ED25519, SCHEMES, SECP256K1_TR
from trio_sign.shares import DevKeyFile, ShareStore

ED = ED25519.name
TR = SECP256K1_TR.name


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["shares", "inspect", str(path), "--json"]) == 0
    info: dict[str, Any] = json.loads(capsys.readouterr().out)
    return info


def _load(path: Path, provider: DevKeyFile, verify: str) -> ShareStore:
    with path.open("rb") as f:
        return ShareStore.load_sealed(f, provider, verify=verify)  # type: ignore[arg-type]


def test_help_names_every_suite() -> None:
    assert tuple(s.name for s in SCHEMES) == cli_shares._SUITE_NAMES


def test_generate_seal_inspect_load_mixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "g"
    gen = ["shares", "generate", "--accounts", "9", "--out", str(out)]
    assert main([*gen, "--ciphersuite", TR, "--ciphersuite", ED]) == 0
    printed = capsys.readouterr().out
    assert f"{TR}: 5 accounts" in printed
    assert f"{ED}: 4 accounts" in printed
    service = out / "service_key_shares.json"

    info = _inspect(service, capsys)
    assert (info["ciphersuite"], info["ciphersuites"]) == (TR, {ED: 4, TR: 5})

    sealed, dev = tmp_path / "s.enc", tmp_path / "dev.key"
    assert (
        main(["shares", "seal", "--in", str(service), "--out", str(sealed), "--dev-key", str(dev)])
        == 0
    )
    info = _inspect(sealed, capsys)
    assert info["record_format"] == "binary-v3"
    assert (info["ciphersuite"], info["ciphersuites"]) == (TR, {ED: 4, TR: 5})
    assert info["accounts"] == 9
    assert "encrypted_data_key" not in info

    key = DevKeyFile.load(dev)
    stores = []
    for part in sorted(out.glob("participant-*_key_shares.json")):
        with part.open("rb") as f:
            stores.append(ShareStore.load_plaintext(f))
    for verify in ("lazy", "full"):
        store = _load(sealed, key, verify)
        assert store.ciphersuites() == {ED: 4, TR: 5}
        for n in range(9):
            account = f"acct-{n:08d}"
            share = store[account]
            assert share.ciphersuite == (TR, ED)[n % 2]
            # The counterparts hold the same account in the same suite and group key.
            for other in stores:
                theirs = other[account]
                assert theirs.ciphersuite == share.ciphersuite
                assert theirs.group_public_key == share.group_public_key
                assert theirs.identifier != share.identifier
        store.close()
    for other in stores:
        other.close()

    # reencrypt keeps the suites and the layout.
    new_dev, moved = tmp_path / "new.key", tmp_path / "moved.enc"
    DevKeyFile.create(new_dev).close()
    assert (
        main(
            [
                "shares",
                "reencrypt",
                "--in",
                str(sealed),
                "--out",
                str(moved),
                "--old-dev-key",
                str(dev),
                "--new-dev-key",
                str(new_dev),
            ]
        )
        == 0
    )
    info = _inspect(moved, capsys)
    assert (info["record_format"], info["ciphersuites"]) == ("binary-v3", {ED: 4, TR: 5})
    new_key = DevKeyFile.load(new_dev)
    store = _load(moved, new_key, "full")
    assert store.ciphersuites() == {ED: 4, TR: 5}
    store.close()
    key.close()
    new_key.close()


def test_generate_default_is_ed25519_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["shares", "generate", "--accounts", "3", "--out", str(tmp_path / "g")]) == 0
    service = tmp_path / "g" / "service_key_shares.json"
    lines = service.read_text().splitlines()
    assert json.loads(lines[0])["ciphersuite"] == ED
    assert all("ciphersuite" not in json.loads(x) for x in lines[1:])
    sealed = tmp_path / "s.enc"
    seal = ["shares", "seal", "--in", str(service), "--out", str(sealed)]
    assert main([*seal, "--dev-key", str(tmp_path / "dev.key")]) == 0
    info = _inspect(sealed, capsys)
    assert (info["record_format"], info["ciphersuite"]) == ("binary-v1", ED)
    assert "ciphersuites" not in info


def test_generate_unknown_suite_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "shares",
            "generate",
            "--accounts",
            "1",
            "--out",
            str(tmp_path / "g"),
            "--ciphersuite",
            "FROST-P256-SHA256-v1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "FROST-P256-SHA256-v1" in err
    assert ED in err  # names the known suites
    assert not (tmp_path / "g").exists()
