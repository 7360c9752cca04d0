"""parent.toml: a full example parses; every kind of mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_sign.parent._config import ConfigError, load_parent_config, parse_parent_config

PCR = "ab" * 48

GOOD = f"""
[bundle]
source = "s3://bucket/service_key_shares.json.enc"
work_dir = "/run/trio-sign"

[kms]
mode = "local"
endpoint_url = "http://127.0.0.1:4599"

[enclave]
backend = "local"
nsm_dir = "nsm"
preload_timeout_s = 120

[ingress]
listen = "tcp://0.0.0.0:50051"
first_byte_timeout_s = 3
setups_per_batch = 8
per_source_rate = inf
per_source_burst = 50

[attestation]
root = "nsm/local-nsm-root.pem"
pcr0 = "{PCR}"
pcr1 = "{PCR}"
pcr2 = "{PCR}"
interval_s = 30

[failure]
restart = true
alert_command = ["/usr/local/bin/page", "--team", "custody"]

[relay]
allowlist = ["https://gateway.internal:8443/v1/enclaves/"]
ca = "certs/gateway-ca.pem"
"""


def test_full_example(tmp_path: Path) -> None:
    path = tmp_path / "parent.toml"
    path.write_text(GOOD)
    cfg = load_parent_config(path)
    assert cfg.bundle.source.startswith("s3://")
    assert cfg.kms.mode == "local"
    assert cfg.enclave.nsm_dir == tmp_path / "nsm"
    assert cfg.enclave.preload_timeout_s == 120.0
    assert cfg.ingress is not None
    assert cfg.ingress.listen == "tcp://0.0.0.0:50051"
    assert cfg.ingress.settings.first_byte_timeout_s == 3.0
    assert cfg.ingress.settings.setups_per_batch == 8
    assert cfg.ingress.settings.per_source_rate == float("inf")
    assert cfg.ingress.settings.per_source_burst == 50
    assert cfg.ingress.settings.per_source_max_wait_s == 1.0  # the default
    assert cfg.attestation is not None
    assert cfg.attestation.pcrs[0] == bytes.fromhex(PCR)
    assert 8 not in cfg.attestation.pcrs
    assert cfg.failure.alert_command == ("/usr/local/bin/page", "--team", "custody")
    assert cfg.relay_allowlist == ("https://gateway.internal:8443/v1/enclaves/",)
    assert cfg.relay_ca == tmp_path / "certs/gateway-ca.pem"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('mode = "local"', 'mode = "cloud"'), r"\[kms\] mode must be one of"),
        (
            lambda t: t.replace('endpoint_url = "http://127.0.0.1:4599"\n', ""),
            r"\[kms\] endpoint_url is required",
        ),
        (lambda t: t.replace('nsm_dir = "nsm"\n', ""), r"\[enclave\] nsm_dir is required"),
        (
            lambda t: t.replace("preload_timeout_s = 120", 'preload_timeout_s = "soon"'),
            r"\[enclave\] preload_timeout_s must be a float",
        ),
        (lambda t: t.replace(f'pcr2 = "{PCR}"\n', ""), r"\[attestation\] pcr2 is required"),
        (
            lambda t: t.replace(f'pcr1 = "{PCR}"', 'pcr1 = "zz"'),
            r"\[attestation\] pcr1 must be hex",
        ),
        (
            lambda t: t.replace("[attestation]", "[attestation]\nbogus = 1"),
            r"\[attestation\] has unknown key 'bogus'",
        ),
        (
            lambda t: t.replace("[bundle]\n", "[bundle]\nsourcee = 1\n"),
            r"\[bundle\] has unknown key 'sourcee'",
        ),
        (lambda t: t.split("[attestation]")[0], r"\[ingress\] needs \[attestation\]"),
        (lambda t: t.replace("[kms]", "[kms"), "not valid TOML"),
        (
            lambda t: t.replace("restart = true", "restart = 1"),
            r"\[failure\] restart must be a bool",
        ),
        (
            lambda t: t.replace("preload_timeout_s = 120", 'node_id = "node a"'),
            r"\[enclave\] node_id 'node a': use 1 to 128 letters",
        ),
        (
            lambda t: t.replace(
                "preload_timeout_s = 120", 'gateway_url = "https://other.internal:8443"'
            ),
            r"not covered by \[relay\] allowlist",
        ),
        (
            lambda t: t.replace(
                "preload_timeout_s = 120", 'gateway_url = "https://u:p@gateway.internal:8443"'
            ),
            r"\[enclave\] gateway_url: .*credentials",
        ),
        (
            lambda t: t.replace('allowlist = ["https://', 'allowlist = ["ftp://'),
            r"\[relay\] allowlist: .*scheme must be https",
        ),
    ],
)
def test_errors_name_the_key(edit: object, message: str) -> None:
    text = edit(GOOD)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        parse_parent_config(text)


def test_gateway_url_under_the_allowlist(tmp_path: Path) -> None:
    text = GOOD.replace(
        "preload_timeout_s = 120",
        'gateway_url = "https://gateway.internal:8443"\nnode_id = "node-a.eu_1"',
    )
    cfg = parse_parent_config(text)
    assert cfg.enclave.gateway_url == "https://gateway.internal:8443"
    assert cfg.enclave.node_id == "node-a.eu_1"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_parent_config(tmp_path / "nope.toml")


# -- [deltas] (issue 16) -----------------------------------------------------------------------


def test_deltas_defaults_and_locations(tmp_path: Path) -> None:
    assert parse_parent_config(GOOD).deltas is None
    cfg = parse_parent_config(GOOD + '\n[deltas]\nlocation = "s3://bucket/shard-1/"\n')
    assert cfg.deltas is not None
    assert cfg.deltas.location == "s3://bucket/shard-1/"
    assert cfg.deltas.directory is None
    assert (cfg.deltas.poll_interval_s, cfg.deltas.max_delta_bytes) == (1.0, 16 * 1024 * 1024)
    assert cfg.deltas.deltas_port == 7003
    path = tmp_path / "parent.toml"
    path.write_text(
        GOOD + '\n[deltas]\nlocation = "file://deltas"\npoll_interval_s = 0.5\n'
        "max_delta_bytes = 1024\ndeltas_port = 7100\n"
    )
    cfg = load_parent_config(path)
    assert cfg.deltas is not None
    assert cfg.deltas.directory == tmp_path / "deltas"  # relative to parent.toml
    assert cfg.deltas.location == f"file://{tmp_path / 'deltas'}"
    assert (cfg.deltas.poll_interval_s, cfg.deltas.max_delta_bytes) == (0.5, 1024)
    assert cfg.deltas.deltas_port == 7100
    absolute = parse_parent_config(GOOD + '\n[deltas]\nlocation = "file:///var/lib/d"\n')
    assert absolute.deltas is not None
    assert absolute.deltas.directory == Path("/var/lib/d")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("poll_interval_s = 1", r"\[deltas\] location is required"),
        ('location = "https://x/"', r"\[deltas\] location 'https://x/': expected file:///"),
        ('location = "file://"', r"\[deltas\] location \"file://\" names no directory"),
        ('location = "s3:///p/"', r"\[deltas\] location 's3:///p/': expected s3://bucket"),
        ('location = "s3://b/p"', r"\[deltas\] location 's3://b/p': the prefix must end in '/'"),
        ('location = "s3://b/"\npoll_interval_s = 0', r"\[deltas\] poll_interval_s must be > 0"),
        ('location = "s3://b/"\nmax_delta_bytes = 0', r"\[deltas\] max_delta_bytes must be >= 1"),
        ('location = "s3://b/"\nmax_delta_bytes = 1.5', r"\[deltas\] max_delta_bytes must be a"),
        ('location = "s3://b/"\ndeltas_port = 70000', r"\[deltas\] deltas_port must be"),
        ('location = "s3://b/"\nport = 1', r"\[deltas\] has unknown key 'port'"),
    ],
)
def test_deltas_errors_name_the_key(section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_parent_config(GOOD + f"\n[deltas]\n{section}\n")
