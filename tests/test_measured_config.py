"""The measured configuration (``enclave.toml``, DESIGN §9): strict parsing that names what
it refuses, its SHA-256 in GetStatus and in the attestation binding, the limits it sets (and
the flags that win over them), and the local PCRs that follow the file."""

from __future__ import annotations

import contextlib
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proto_min import sign_service_pb2 as pb
from trio_sign.cli._main import build_parser
from trio_sign.enclave import EnclaveConfig, SessionPool, SignService
from trio_sign.enclave._config import enclave_config
from trio_sign.enclave._measured import (
    DEVELOPMENT_CONFIG,
    LIMITS,
    MeasuredConfigError,
    development_config,
    load_measured_config,
    parse_measured_config,
)
from trio_sign.nitro._local_nsm import (
    DEFAULT_LOCAL_PCRS,
    SOURCE_TREE_PCR0,
    local_pcrs,
    local_pcrs_for_config,
    package_files_digest,
)
from trio_sign.rpc import CallContext
from trio_sign.testing._pki import make_ca, make_leaf

from .enclave_helpers import make_accounts

ED25519_KEY = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"  # RFC 8032 #1
OTHER_KEY = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"  # RFC 8032 #2


@pytest.fixture(scope="module")
def ca_pem() -> str:
    return make_ca("test gateway CA").pem.decode()


def full_config(ca_pem: str) -> bytes:
    return (
        "[gateway]\n"
        f"client_ca_pem = '''\n{ca_pem}'''\n\n"
        "[bundles]\n"
        f'signing_keys = ["{ED25519_KEY}", "{OTHER_KEY}"]\n'
        f'delta_identity_key = "{OTHER_KEY}"\n\n'
        "[limits]\n"
        "max_sessions = 5\n"
        "session_ttl_s = 30\n"
        "drain_grace_s = 0\n"
        "max_sign_request_bytes = 300000\n"
        "max_connections = 50\n"
        "idle_timeout_s = 120.5\n"
        "tls_handshake_timeout_s = 3\n"
        "max_tls_handshakes = 8\n"
        "max_tls_handshake_rate = 75\n"
        "preload_timeout_s = 100\n"
        'verify_shares = "full"\n'
        "memory_alarm_fraction = 0.5\n"
        "memory_hard_fraction = 0.8\n"
        "approval_clock_tolerance_s = 10\n"
        "approval_max_lifetime_s = 120\n\n"
        "[approvers.ops-1]\n"
        'type = "ed25519"\n'
        f'public_key = "{ED25519_KEY}"\n\n'
        "[approvers.ops-2]\n"
        'type = "ed25519"\n'
        f'public_key = "{OTHER_KEY}"\n\n'
        "[policies.default]\n"
        'approvers = ["ops-1", "ops-2"]\n'
        "threshold = 2\n"
        "max_message_bytes = 1024\n"
        "rate_per_minute = 60\n"
    ).encode()


def test_a_full_file_parses(ca_pem: str) -> None:
    data = full_config(ca_pem)
    measured = parse_measured_config(data, source="x.toml")
    assert measured.sha256 == hashlib.sha256(data).digest()
    assert measured.client_ca_pem is not None
    assert "BEGIN CERTIFICATE" in measured.client_ca_pem
    assert measured.signing_keys == (bytes.fromhex(ED25519_KEY), bytes.fromhex(OTHER_KEY))
    assert measured.delta_identity_key == bytes.fromhex(OTHER_KEY)
    assert set(measured.limits) == set(LIMITS)  # the file above sets every limit
    assert not measured.development
    policy = measured.policies.policies["default"]
    assert policy.approvers == ("ops-1", "ops-2")
    assert (policy.threshold, policy.max_message_bytes, policy.rate_per_minute) == (2, 1024, 60)
    assert measured.policies.approvers["ops-2"].public_key == bytes.fromhex(OTHER_KEY)
    assert not measured.policies.development
    # no key material in the repr (the CA is public, but still not dumped)
    assert "BEGIN" not in repr(measured)


def test_the_hash_is_of_the_exact_bytes(ca_pem: str) -> None:
    data = full_config(ca_pem)
    a = parse_measured_config(data)
    b = parse_measured_config(data + b"\n# a comment changes the measurement too\n")
    assert a.limits == b.limits
    assert a.sha256 != b.sha256


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[gateway]\nclient_ca = 'x'\n", "unknown key 'client_ca' in [gateway]"),
        ("[bundles]\nsigning_key = []\n", "unknown key 'signing_key' in [bundles]"),
        ("[limits]\nmax_session = 1\n", "unknown key 'max_session' in [limits]"),
        ("[limits]\ngrpc_listen = 'tcp://0:1'\n", "unknown key 'grpc_listen' in [limits]"),
        ("[tls]\n", "unknown section [tls]"),
        ("top_level = 1\n", "unknown section [top_level]"),
        ("[policies.default]\napprovers = ['x']\nthreshold = 1\n", "not in [approvers]"),
        ("[dkg]\n", "[dkg] participants must be a table"),
        ("limits = 3\n", "limits must be a table"),
        ("[limits\n", "not valid TOML"),
        ("[limits]\nmax_sessions = true\n", "[limits] max_sessions must be an integer"),
        ("[limits]\nmax_sessions = 1.5\n", "[limits] max_sessions must be an integer"),
        ("[limits]\nmax_sessions = 0\n", "[limits] max_sessions must be in 1.."),
        ("[limits]\nsession_ttl_s = 0\n", "[limits] session_ttl_s must be > 0"),
        ("[limits]\nsession_ttl_s = 'long'\n", "[limits] session_ttl_s must be a number"),
        ("[limits]\nsession_ttl_s = inf\n", "[limits] session_ttl_s must be > 0"),
        ("[limits]\ndrain_grace_s = -1\n", "[limits] drain_grace_s must be >= 0"),
        ("[limits]\nverify_shares = 'some'\n", "[limits] verify_shares must be one of"),
        ("[limits]\nmemory_hard_fraction = 1.5\n", "memory_hard_fraction must be > 0 and <= 1"),
        (
            "[limits]\nmemory_alarm_fraction = 0.9\nmemory_hard_fraction = 0.8\n",
            "memory_alarm_fraction must be below memory_hard_fraction",
        ),
        ("[bundles]\nsigning_keys = 'ab'\n", "[bundles] signing_keys must be a list"),
        ("[bundles]\nsigning_keys = ['ab']\n", "signing_keys[0] must be 64 hex digits"),
        ("[bundles]\nsigning_keys = [7]\n", "signing_keys[0] must be 64 hex digits"),
        (f"[bundles]\nsigning_keys = ['{'zz' * 32}']\n", "signing_keys[0] must be 64 hex"),
        (
            # 32 bytes of hex that are not a point of the prime-order group (the identity)
            f"[bundles]\nsigning_keys = ['{'01' + '00' * 31}']\n",
            "signing_keys[0] is not a valid Ed25519 public key",
        ),
        (
            f"[bundles]\nsigning_keys = ['{ED25519_KEY}', '{ED25519_KEY}']\n",
            "signing_keys[1] repeats an earlier key",
        ),
        ("[bundles]\ndelta_identity_key = 'beef'\n", "delta_identity_key must be 64 hex"),
        ("[gateway]\nclient_ca_pem = 5\n", "client_ca_pem must be PEM text"),
        ("[gateway]\nclient_ca_pem = 'not a pem'\n", "client_ca_pem must be PEM text"),
        (
            "[gateway]\nclient_ca_pem = '''\n-----BEGIN CERTIFICATE-----\nAAAA\n"
            "-----END CERTIFICATE-----\n'''\n",
            "client_ca_pem is not a PEM certificate",
        ),
    ],
)
def test_refusals_name_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(MeasuredConfigError) as caught:
        parse_measured_config(text.encode(), source="enclave.toml")
    assert str(caught.value).startswith("enclave.toml: ")
    assert message in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_leaf_certificate_is_not_a_ca() -> None:
    leaf, _key = make_leaf(make_ca("test CA"), "a gateway", server=False)
    text = f"[gateway]\nclient_ca_pem = '''\n{leaf.decode()}'''\n"
    with pytest.raises(MeasuredConfigError, match="is not a CA"):
        parse_measured_config(text.encode())


def test_not_utf8_and_too_large() -> None:
    with pytest.raises(MeasuredConfigError, match="not UTF-8"):
        parse_measured_config(b"\xff\xfe")
    with pytest.raises(MeasuredConfigError, match="larger than"):
        parse_measured_config(b"#" * (1024 * 1024 + 1))


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(MeasuredConfigError, match=r"nope\.toml: cannot read"):
        load_measured_config(tmp_path / "nope.toml")


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_are_refused_cleanly(data: bytes) -> None:
    with contextlib.suppress(MeasuredConfigError):
        parse_measured_config(data)


def test_development_config() -> None:
    dev = development_config()
    assert dev.development
    # a placeholder CA whose key was discarded: the TLS port accepts no gateway
    assert dev.client_ca_pem is not None
    assert "placeholder" in dev.client_ca_pem or "BEGIN CERTIFICATE" in dev.client_ca_pem
    assert dev.sha256 == hashlib.sha256(DEVELOPMENT_CONFIG).digest()


# -- limits: the file, then the flags ------------------------------------------------------


def test_limits_apply_and_flags_win(ca_pem: str) -> None:
    measured = parse_measured_config(full_config(ca_pem))
    config = enclave_config(measured, limits={"max_sessions": None, "session_ttl_s": 9.0})
    assert config.measured is measured
    assert config.max_sessions == 5  # the file
    assert config.session_ttl_s == 9.0  # the flag
    assert config.drain_grace_s == 0.0
    assert config.max_sign_request_bytes == 300000
    assert config.grpc_limits.max_connections == 50
    assert config.grpc_limits.idle_timeout_s == 120.5
    assert config.tls_settings.handshake_timeout_s == 3.0
    assert config.tls_settings.max_handshakes == 8
    assert config.tls_settings.max_handshake_rate == 75.0
    assert config.preload_timeout_s == 100.0
    assert config.verify_shares == "full"
    assert (config.memory_alarm_fraction, config.memory_hard_fraction) == (0.5, 0.8)
    defaults = enclave_config(development_config())
    assert defaults.max_sessions == EnclaveConfig().max_sessions


def test_cli_reads_the_file_and_flags_win(tmp_path: Path, ca_pem: str) -> None:
    """The command's flags default to None, so a flag not given leaves the file's value."""
    args = build_parser().parse_args(["enclave", "--config", "x.toml", "--max-sessions", "7"])
    assert args.config == Path("x.toml")
    assert args.max_sessions == 7
    assert args.session_ttl is None
    assert args.preload_timeout is None
    assert args.verify_shares is None
    assert args.max_connections is None


def test_production_without_the_file_is_exit_2(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("trio-sign")
    done = subprocess.run(
        [str(exe), "enclave", "--config", str(tmp_path / "missing.toml"), "--nsm", "device"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "missing.toml: cannot read the measured configuration" in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_sessions = -1\n")
    done = subprocess.run(
        [str(exe), "enclave", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "[limits] max_sessions must be in 1.." in done.stderr


# -- GetStatus reports it ------------------------------------------------------------------


async def test_get_status_reports_config_sha256_and_no_deltas(ca_pem: str) -> None:
    measured = parse_measured_config(full_config(ca_pem))
    store, _ = make_accounts(1)
    try:
        pool = SessionPool(store.get)
        service = SignService(store, pool, config_sha256=measured.sha256)
        context = CallContext(method="GetStatus", metadata=(), authority="", deadline=math.inf)
        status = await service.get_status(pb.GetStatusRequest(), context)
        assert status.config_sha256 == measured.sha256.hex()
        assert status.deltas == 0
        assert status.deltas_head == "00" * 32
        await trio.lowlevel.checkpoint()
    finally:
        store.close()


# -- local PCRs follow the file ------------------------------------------------------------


def test_local_pcrs_follow_the_config_file(tmp_path: Path, ca_pem: str) -> None:
    a = tmp_path / "a.toml"
    a.write_bytes(full_config(ca_pem))
    b = tmp_path / "b.toml"
    b.write_bytes(full_config(ca_pem).replace(b"max_sessions = 5", b"max_sessions = 6"))
    pa, pb_ = local_pcrs_for_config(a), local_pcrs_for_config(b)
    assert set(pa) == {0, 1, 2}
    assert pa[0] == pb_[0]
    assert pa[1] == pb_[1]
    assert pa[2] != pb_[2]  # another file: another PCR2
    assert pa[2] == hashlib.sha384(pa[0] + hashlib.sha256(a.read_bytes()).digest()).digest()
    dev = dict(DEFAULT_LOCAL_PCRS)
    assert dev == local_pcrs(hashlib.sha256(DEVELOPMENT_CONFIG).digest())
    assert dev[0] == SOURCE_TREE_PCR0  # this is a source checkout


def test_installed_image_digest_covers_every_file(tmp_path: Path) -> None:
    """Off a source checkout PCR0 hashes the installed package: a byte changed anywhere, a
    file added or renamed, changes it; compiled caches do not."""
    pkg = tmp_path / "trio_sign"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    first = package_files_digest([pkg])
    assert package_files_digest([pkg]) == first
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"cache")
    assert package_files_digest([pkg]) == first
    (pkg / "sub" / "b.py").write_text("B = 3\n")
    assert package_files_digest([pkg]) != first
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    (pkg / "sub" / "b.py").rename(pkg / "sub" / "c.py")
    assert package_files_digest([pkg]) != first


# -- issue 14: approvers and policies --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[policies.default]\napprovers = ['nobody']\nthreshold = 1\n", "unknown_approver"),
        (
            f"[approvers.a]\ntype = 'ed25519'\npublic_key = '{ED25519_KEY}'\n"
            "[policies.default]\napprovers = ['a']\nthreshold = 2\n",
            "impossible_threshold",
        ),
        (f"[approvers.a]\ntype = 'rsa'\npublic_key = '{ED25519_KEY}'\n", "unknown_key_type"),
        ("[approvers.a]\ntype = 'p256'\npublic_key = '04'\n", "bad_approver"),
    ],
)
def test_policy_refusals_have_their_own_reason(text: str, reason: str) -> None:
    with pytest.raises(MeasuredConfigError) as caught:
        parse_measured_config(text.encode(), source="e.toml")
    assert caught.value.reason == reason
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith("e.toml: [")


def test_development_policy_is_open_and_a_file_has_no_default() -> None:
    dev = development_config()
    assert dev.policies.development
    assert dev.policies.policies["default"].threshold == 0
    # the development file says so in its measured bytes, and is the same read from a path
    assert b"NO AUTHORIZATION" in DEVELOPMENT_CONFIG
    assert parse_measured_config(DEVELOPMENT_CONFIG).policies.development
    # another file has no implicit default
    other = parse_measured_config(DEVELOPMENT_CONFIG.split(b"[policies.default]")[0])
    assert other.policies.policies == {}
    assert other.policies.unknown({"default"}) == ["default"]


def test_enclave_refuses_an_impossible_policy_at_boot(tmp_path: Path) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text("[policies.default]\napprovers = []\nthreshold = 1\n")
    shares = tmp_path / "none.json"
    shares.write_text("")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_sign.cli",
            "enclave",
            "--dev",
            "--config",
            str(config),
            "--dev-plaintext-shares",
            str(shares),
            "--grpc-listen",
            "tcp://127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "trio-sign: enclave failed (impossible_threshold):" in done.stderr
