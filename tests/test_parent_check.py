"""``trio-sign parent --check`` tries everything a start would, and a start refuses the same
configs the same way: exit 2 naming the key, one line, no enclave launched (issue 12 defect 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_sign.cli import main
from trio_sign.nitro import DEFAULT_LOCAL_PCRS
from trio_sign.testing import make_ca, make_leaf

GOOD_PCR = DEFAULT_LOCAL_PCRS[0].hex()


def write_config(tmp_path: Path, **edits: str) -> Path:
    """A config that passes --check (local mode, ingress with a real TLS pair), then edits:
    ``section.key=value`` replacements or additions (value as TOML)."""
    ca = make_ca("check test CA", days=1)
    server = make_leaf(ca, "parent.local", server=True, days=1)
    other = make_leaf(make_ca("another CA", days=1), "parent.local", server=True, days=1)
    files = {
        "ca.pem": ca.pem,
        "server.pem": server[0],
        "server.key": server[1],
        "other.key": other[1],
        "garbage.pem": b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END"
        b" CERTIFICATE-----\n",
        "bundle.enc": b"ciphertext",
        "enclave.toml": b"[gateway]\nclient_ca_pem = '''\n" + ca.pem + b"'''\n",
        "bad-enclave.toml": b"[limits]\nmax_sesions = 5\n",
        "dev.key": b"{}",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "nsm").mkdir(exist_ok=True)
    (tmp_path / "nsm" / "local-nsm-root.pem").write_bytes(ca.pem)
    sections: dict[str, dict[str, str]] = {
        "bundle": {"source": '"bundle.enc"', "work_dir": '"run"'},
        "kms": {"mode": '"dev-key"', "dev_key": '"dev.key"'},
        "enclave": {"backend": '"local"', "nsm_dir": '"nsm"', "config": '"enclave.toml"'},
        "ingress": {"listen": '"tcp://127.0.0.1:0"'},
        "attestation": {
            "root": '"nsm/local-nsm-root.pem"',
            "pcr0": f'"{GOOD_PCR}"',
            "pcr1": f'"{GOOD_PCR}"',
            "pcr2": f'"{GOOD_PCR}"',
        },
        "logs": {"file": '"enclave.jsonl"'},
        "health": {"listen": '"tcp://127.0.0.1:0"'},
    }
    for dotted, value in edits.items():
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = value
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())
        for name, table in sections.items()
    )
    path = tmp_path / "parent.toml"
    path.write_text(text)
    return path


def test_a_good_config_checks_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["parent", "--config", str(write_config(tmp_path)), "--check"]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith(": OK")
    assert "warning" not in captured.err


BAD = [
    ("attestation.pcr0", '"abcd"', "[attestation] pcr0 must be 48 bytes"),
    ("enclave.config", '"bad-enclave.toml"', "unknown key 'max_sesions' in [limits]"),
    ("enclave.config", '"missing.toml"', "[enclave] config"),
    ("ingress.listen", '"127.0.0.1:50051"', "[ingress] listen"),
    ("health.listen", '"tcp://127.0.0.1:99999"', "[health] listen"),
    ("enclave.preload_timeout_s", "-1", "[enclave] preload_timeout_s must be > 0"),
    ("logs.file", '"no/such/dir/enclave.jsonl"', "[logs] file"),
    ("enclave.grpc_port", "0", "[enclave] grpc_port"),
    ("failure.backoff_initial_s", "0", "[failure] backoff_initial_s"),
    ("bundle.source", '"s3://bucket-only"', "[bundle] source"),
    ("deltas.location", '"file://bundle.enc/deltas"', "[deltas] location"),
    ("deltas.location", '"ftp://host/deltas/"', "[deltas] location"),
]


@pytest.mark.parametrize(("key", "value", "named"), BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_check_and_start_refuse_the_same_configs_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, named: str
) -> None:
    """Each of these once said OK and then failed after an enclave was launched (or with a
    traceback and exit 1, relaunching with restart on)."""
    path = write_config(tmp_path, **{key: value})
    assert main(["parent", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert "Traceback" not in err

    assert main(["parent", "--config", str(path)]) == 2  # a real start: the same verdict
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trio-sign")]
    assert len(lines) == 1, err
    assert named in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "enclave.stderr").exists(), "an enclave was launched"


def test_ingress_tls_keys_are_ignored_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ingress is a byte pipe now (TLS ends in the enclave): an older parent.toml's TLS
    keys still parse, and the warning says where the client CA went."""
    path = write_config(
        tmp_path,
        **{
            "ingress.cert": '"server.pem"',
            "ingress.key": '"server.key"',
            "ingress.client_ca": '"ca.pem"',
            "ingress.max_handshakes": "64",
        },
    )
    assert main(["parent", "--config", str(path), "--check"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "ignored" in line]
    assert len(warned) == 1
    assert "[ingress] cert, client_ca, key, max_handshakes ignored" in warned[0]
    assert "enclave.toml" in warned[0]


def test_check_warns_about_a_health_listener_off_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, **{"health.listen": '"tcp://0.0.0.0:8080"'})
    assert main(["parent", "--config", str(path), "--check"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err
    assert "[health] listen tcp://0.0.0.0:8080 is not loopback" in err


def test_a_relative_work_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative [bundle] work_dir (with --config parent.toml, relative) passed --check and
    then failed at start (its unix:// socket URLs must be absolute)."""
    from trio_sign.parent._config import load_parent_config
    from trio_sign.parent._supervisor import _Addresses

    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load_parent_config(Path("parent.toml"))
    assert config.bundle.work_dir == (tmp_path / "run").absolute()
    assert _Addresses(config).listen["status"] == f"unix://{tmp_path.absolute()}/run/status.sock"


def test_a_deltas_directory_checks_ok_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, **{"deltas.location": '"file://deltas"'})
    assert main(["parent", "--config", str(path), "--check"]) == 0
    assert not (tmp_path / "deltas").exists()
    (tmp_path / "deltas").mkdir()
    assert main(["parent", "--config", str(path), "--check"]) == 0
    assert list((tmp_path / "deltas").iterdir()) == []  # the link probe cleaned up
    assert capsys.readouterr().out.rstrip().endswith(": OK")


def test_a_deltas_directory_without_hard_links_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from trio_sign.parent._config import load_parent_config, preflight

    (tmp_path / "deltas").mkdir()
    config = load_parent_config(write_config(tmp_path, **{"deltas.location": '"file://deltas"'}))

    def no_link(src: object, dst: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    problems, _ = preflight(config)
    assert len(problems) == 1
    assert problems[0].startswith(f"[deltas] location file://{tmp_path / 'deltas'}: ")
    assert "link(2)" in problems[0]
    assert list((tmp_path / "deltas").iterdir()) == []


def test_the_deltas_port_must_not_clash_on_nitro(tmp_path: Path) -> None:
    from trio_sign.parent._config import parse_parent_config, preflight

    (tmp_path / "app.eif").write_bytes(b"eif")
    path = write_config(
        tmp_path,
        **{
            "enclave.backend": '"nitro-cli"',
            "enclave.eif_path": '"app.eif"',
            "deltas.location": '"s3://bucket/deltas/"',
            "deltas.deltas_port": "5001",
        },
    )
    text = path.read_text().replace('config = "enclave.toml"\n', "")
    config = parse_parent_config(text.replace('nsm_dir = "nsm"\n', ""), base=tmp_path)
    problems, _ = preflight(config)
    assert problems == [
        "[deltas] deltas_port 5001 is taken by another enclave channel (5000-5003); use "
        "another (default 7003)"
    ]
