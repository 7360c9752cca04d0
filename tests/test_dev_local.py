"""``trio-sign dev local-nsm`` and ``dev pki``: what local mode needs from AWS, made locally,
and the local-mode walkthrough in docs/parent.md agreeing with them (issue 12, defect 6)."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from trio_sign.cli import main
from trio_sign.nitro import DEFAULT_LOCAL_PCRS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_local_nsm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trio_sign.kms import KeyPolicy
    from trio_sign.ops._policies import load_pcrs

    nsm = tmp_path / "nsm"
    assert main(["dev", "local-nsm", "--dir", str(nsm)]) == 0
    out = capsys.readouterr().out
    expected = {i: DEFAULT_LOCAL_PCRS[i].hex() for i in (0, 1, 2)}
    for i, value in expected.items():
        assert re.search(rf"^PCR{i} +{value}$", out, re.M), out
    assert _mode(nsm / "local-nsm-root.key.pem") == 0o600
    root = (nsm / "local-nsm-root.pem").read_bytes()
    assert b"PRIVATE KEY" not in root
    # the PCR file is what the ops tools take from enclave_image/build
    assert load_pcrs((nsm / "local.pcrs.json").read_text()) == expected
    # the kms-local policy: sealing allowed, Decrypt only with an attestation of these PCRs
    policy = KeyPolicy.from_json((nsm / "kms-policy.json").read_bytes())
    assert policy.allows("kms:GenerateDataKey", {})
    assert policy.allows("kms:CreateKey", {})
    assert not policy.allows("kms:Decrypt", {})
    attested = {"kms:recipientattestation:imagesha384": expected[0]} | {
        f"kms:recipientattestation:pcr{i}": expected[i] for i in (1, 2)
    }
    assert policy.allows("kms:Decrypt", attested)
    other = attested | {"kms:recipientattestation:pcr1": "00" * 48}
    assert not policy.allows("kms:Decrypt", other)
    # a second run keeps the root: the pins and the kms-local --nsm-root stay valid
    assert main(["dev", "local-nsm", "--dir", str(nsm)]) == 0
    assert (nsm / "local-nsm-root.pem").read_bytes() == root


def test_dev_pki_is_usable_by_an_enclave_and_a_gateway(tmp_path: Path) -> None:
    """The CA is what an enclave.toml pins as its gateway CA, the gateway certificate loads in
    the attested client context, and the server certificate still loads for tools."""
    from trio_sign.attested import make_attested_client_context
    from trio_sign.enclave import parse_measured_config
    from trio_sign.parent._ingress import make_server_ssl_context
    from trio_sign.transport import self_signed_server_context

    pki = tmp_path / "pki"
    assert main(["dev", "pki", "--dir", str(pki), "--days", "2"]) == 0
    assert _mode(pki / "ingress.key") == 0o600
    assert _mode(pki / "gateway.key") == 0o600
    ca = (pki / "ca.pem").read_bytes()
    measured = parse_measured_config(b'[gateway]\nclient_ca_pem = """\n' + ca + b'"""\n')
    assert measured.client_ca_pem is not None
    self_signed_server_context(measured.client_ca_pem)
    make_attested_client_context(
        (pki / "gateway.pem").read_bytes(), (pki / "gateway.key").read_bytes()
    )
    make_server_ssl_context(
        (pki / "ingress.pem").read_bytes(), (pki / "ingress.key").read_bytes(), ca
    )


def test_parent_md_local_config_pins_the_local_nsm(tmp_path: Path) -> None:
    """The walkthrough's parent.toml pins what `dev local-nsm` prints and what `kms-local`
    listens on by default."""
    from trio_sign.parent._config import parse_parent_config

    text = (DOCS / "parent.md").read_text().split("## Local mode", 1)[1]
    blocks = re.findall(r"^ *```toml\n(.*?)^ *```", text, flags=re.M | re.S)
    assert len(blocks) == 1
    config = parse_parent_config("\n".join(line.strip() for line in blocks[0].splitlines()))
    assert config.enclave.backend == "local"
    assert config.bundle.work_dir.is_absolute()  # the enclave's UNIX sockets live there
    assert config.attestation is not None
    assert config.attestation.root is not None
    assert config.attestation.root.name == "local-nsm-root.pem"
    pcrs = dict(config.attestation.pcrs)
    assert pcrs[0] == DEFAULT_LOCAL_PCRS[0]  # the installed package (a stand-in locally)
    assert pcrs[1] == DEFAULT_LOCAL_PCRS[1]
    assert len(pcrs[2]) == 48  # measures the reader's own enclave.toml: theirs differs
    assert config.enclave.config is not None
    assert config.enclave.config.name == "enclave.toml"
    assert config.ingress is not None
    assert config.kms.mode == "local"
    assert config.kms.endpoint_url == "http://127.0.0.1:4599"  # kms-local's default --listen
    assert "export AWS_ACCESS_KEY_ID=" in text  # boto3 needs credentials, even for kms-local


def test_demo_bad_numbers_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--accounts", "0"]) == 2
    assert capsys.readouterr().err == (
        "trio-sign: error: --accounts and --concurrency must be >= 1, --signatures >= 0\n"
    )


def test_local_pcr_file_format(tmp_path: Path) -> None:
    assert main(["dev", "local-nsm", "--dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "local.pcrs.json").read_text())
    assert sorted(data) == ["PCR0", "PCR1", "PCR2"]
