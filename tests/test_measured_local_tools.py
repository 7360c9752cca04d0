"""``trio-sign dev local-nsm --enclave-config FILE``: the PCRs and the kms-local policy it
writes are those of the local enclave that runs FILE (DESIGN §9), and a bad FILE is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trio_sign.cli._main import main
from trio_sign.kms import KeyPolicy
from trio_sign.nitro import DEFAULT_LOCAL_PCRS
from trio_sign.nitro._local_nsm import local_pcrs_for_config


def _written(directory: Path) -> tuple[dict[str, str], KeyPolicy]:
    pcrs = json.loads((directory / "local.pcrs.json").read_text())
    policy = KeyPolicy.from_json((directory / "kms-policy.json").read_text())
    return pcrs, policy


def _allows(policy: KeyPolicy, pcrs: dict[int, bytes]) -> bool:
    context = {
        "kms:recipientattestation:imagesha384": pcrs[0].hex(),
        **{f"kms:recipientattestation:pcr{i}": pcrs[i].hex() for i in (1, 2)},
    }
    return policy.allows("kms:Decrypt", context)


def test_local_nsm_follows_the_enclave_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text("[limits]\nmax_sessions = 7\n")
    expected = local_pcrs_for_config(config)
    assert (
        main(["dev", "local-nsm", "--dir", str(tmp_path / "nsm"), "--enclave-config", str(config)])
        == 0
    )
    pcrs, policy = _written(tmp_path / "nsm")
    assert pcrs == {f"PCR{i}": expected[i].hex() for i in (0, 1, 2)}
    assert expected[2].hex() in capsys.readouterr().out
    assert _allows(policy, expected)
    # the development configuration's PCRs are another enclave: refused by this policy
    assert not _allows(policy, dict(DEFAULT_LOCAL_PCRS))
    # without --enclave-config: the development configuration's, as before
    assert main(["dev", "local-nsm", "--dir", str(tmp_path / "dev")]) == 0
    pcrs, policy = _written(tmp_path / "dev")
    assert pcrs == {f"PCR{i}": DEFAULT_LOCAL_PCRS[i].hex() for i in (0, 1, 2)}
    assert not _allows(policy, expected)


def test_local_nsm_refuses_a_bad_enclave_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text("[limits]\nmax_sesions = 7\n")
    assert (
        main(["dev", "local-nsm", "--dir", str(tmp_path / "nsm"), "--enclave-config", str(config)])
        == 2
    )
    assert "unknown key 'max_sesions' in [limits]" in capsys.readouterr().err
    assert not (tmp_path / "nsm" / "local.pcrs.json").exists()
