"""``enclave_image/``: the lock file matches pyproject, the Dockerfile pins everything it
installs and runs the production command, the build script fails clearly without its tools and
writes the PCRs, and the systemd units, sysusers, allocator and parent.toml example agree."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from trio_sign.cli._main import build_parser
from trio_sign.ops import allocator_yaml, enclave_memory_mib
from trio_sign.parent._config import parse_parent_config

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "enclave_image"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The EIF's platform: markers in the lock are evaluated for it.
TARGET: dict[str, str] = {
    **{str(k): str(v) for k, v in default_environment().items()},
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "python_version": "3.11",
    "implementation_name": "cpython",
}


def read_lock(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """``{canonical name: (version, [sha256 hex...])}``; every requirement line must be ``==``."""
    entries: dict[str, tuple[Version, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: option line {line!r} (no index options)"
        spec, *options = line.split()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", spec)
        assert match is not None, f"{path.name}: {spec!r} is not pinned with =="
        hashes = []
        for option in options:
            found = re.fullmatch(r"--hash=sha256:([0-9a-f]{64})", option)
            assert found is not None, f"{path.name}: unexpected {option!r}"
            hashes.append(found.group(1))
        name = canonicalize_name(match.group(1))
        assert name not in entries, f"{path.name}: {name} twice"
        assert hashes, f"{path.name}: {name} has no --hash=sha256:"
        entries[name] = (Version(match.group(2)), hashes)
    return entries


def test_lock_covers_runtime_dependencies() -> None:
    lock = read_lock(IMAGE / "requirements.lock")
    for text in PYPROJECT["project"]["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} (pyproject) is missing from requirements.lock"
        version = lock[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} vs {req}"
    # runtime only: nothing from the test or dev extras unless a runtime dependency needs it
    groups = PYPROJECT["project"]["optional-dependencies"].values()
    extras = {canonicalize_name(Requirement(t).name) for group in groups for t in group}
    assert not extras & set(lock), extras & set(lock)


def test_lock_is_closed_under_dependencies() -> None:
    """Installed with --no-deps, so every locked package's own requirements (for linux x86_64
    CPython 3.11) must be locked too. Checked where this venv has the locked version."""
    lock = read_lock(IMAGE / "requirements.lock")
    checked = 0
    for name, (version, _) in lock.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue
        checked += 1
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(TARGET | {"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in lock, f"{name} needs {req}, which requirements.lock lacks"
            assert req.specifier.contains(lock[dep][0], prereleases=True), f"{name}: {req}"
    if checked == 0:  # pragma: no cover - a venv resolved long after the lock was made
        pytest.skip("no locked version is installed here; pip check runs in the image build")


def test_build_lock_satisfies_build_system() -> None:
    lock = read_lock(IMAGE / "build-requirements.lock")
    for text in PYPROJECT["build-system"]["requires"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} (build-system) is missing from build-requirements.lock"
        assert req.specifier.contains(lock[name][0])


# -- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with continuation lines joined and comments dropped."""
    lines = [
        line
        for line in (IMAGE / "Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def shell_commands(instructions: list[tuple[str, str]]) -> list[str]:
    """Every simple command of every RUN (split on ``;``, ``&&``, ``||``)."""
    commands = []
    for word, rest in instructions:
        if word == "RUN":
            commands += [c.strip() for c in re.split(r";|&&|\|\|", rest) if c.strip()]
    return commands


def test_dockerfile_pins_everything() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms
    digests = set()
    for rest in froms:
        image = rest.split()[0]
        match = re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:([0-9a-f]{64})", image)
        assert match is not None, f"FROM {image} is not pinned by digest"
        digests.add(match.group(1))
    assert len(digests) == 1, "every stage builds on the same base"
    commands = shell_commands(instructions)
    installs = [c for c in commands if re.search(r"\bpip3? install\b", c)]
    assert len(installs) == 3
    for command in installs:
        if "--require-hashes" in command:
            assert "--no-deps" in command
            assert "--only-binary=:all:" in command
            assert re.search(r"-r /\S+\.lock\b", command)
        else:  # the project's own wheel, built in the first stage from the build context
            assert "--no-deps" in command, command
            assert "--no-index" in command, command
            assert re.search(r"/trio_sign-\*\.whl$", command), command
    wheels = [c for c in commands if re.search(r"\bpip3? wheel\b", c)]
    assert all("--no-index" in c and "--no-deps" in c for c in wheels)
    assert not any(re.search(r"\b(apt-get|apt|dnf|yum|apk)\b", c) for c in commands)
    assert not any(re.search(r"\b(curl|wget)\b", c) for c in commands)
    for word, rest in instructions:
        assert word != "ADD", "use COPY; ADD fetches URLs and unpacks archives"
        assert "latest" not in rest.lower(), f"{word} {rest}"
    text = (IMAGE / "Dockerfile").read_text()
    assert "syntax=" not in text  # a `# syntax=` line would pull an unpinned frontend image


def test_dockerfile_is_reproducible() -> None:
    instructions = dockerfile_instructions()
    stages = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    for start, end in zip(stages, [*stages[1:], len(instructions)], strict=True):
        stage = instructions[start:end]
        assert ("ARG", "SOURCE_DATE_EPOCH") in stage, "each stage declares SOURCE_DATE_EPOCH"
        env = " ".join(rest for word, rest in stage if word == "ENV")
        for setting in ("TZ=UTC", "PYTHONDONTWRITEBYTECODE=1", "PIP_NO_CACHE_DIR=1"):
            assert setting in env
    commands = shell_commands(instructions)
    assert any(re.search(r'touch -h -d "@\$\{SOURCE_DATE_EPOCH\}"', c) for c in commands)
    compiles = [c for c in commands if "compileall" in c]
    assert compiles
    for c in compiles:  # -f: existing timestamp-based .pyc files would otherwise be kept
        assert re.search(r"-f\b", c)
        assert "--invalidation-mode unchecked-hash /usr/local/lib/python3.11" in c
    assert any("rm -rf" in c and "/root/.cache" in c for c in commands)
    assert all("--no-cache-dir" in c for c in commands if re.search(r"\bpip3? (install|wheel)", c))
    # the final stage's last filesystem step normalises mtimes after everything else
    last_run = [c for w, c in instructions if w == "RUN"][-1]
    assert last_run.rstrip().endswith('touch -h -d "@${SOURCE_DATE_EPOCH}" {} +')


def test_dockerfile_copies_only_existing_context() -> None:
    ignore = (IMAGE / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in dockerfile_instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _target = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by the dockerignore"


def test_dockerfile_runs_the_production_enclave() -> None:
    cmds = [rest for word, rest in dockerfile_instructions() if word == "CMD"]
    assert len(cmds) == 1
    assert not any(word == "ENTRYPOINT" for word, _ in dockerfile_instructions())
    argv = json.loads(cmds[0])  # exec form: the AWS init execs it directly
    assert argv[:2] == ["/usr/local/bin/trio-sign", "enclave"]
    assert not any(a.startswith("--dev") for a in argv)
    args = build_parser().parse_args(argv[1:])
    assert args.dev is False
    assert args.dev_plaintext_shares is None
    assert args.nsm == "device"
    assert args.grpc_listen == "vsock://ANY:50051"
    assert (args.preload_address, args.status_address, args.log_address) == (
        "vsock://3:5000",
        "vsock://3:5001",
        "vsock://3:5002",
    )
    # the SSE relay; where to subscribe comes over the boot channel, never baked into PCR0
    assert args.sse_via == "vsock://3:5003"
    assert args.gateway_url is None
    # the measured configuration decides trust and limits (DESIGN §9): the file the image
    # installs, and no limit flag that would win over it
    assert args.config == Path("/etc/trio-sign/enclave.toml")
    assert args.public_listen == "vsock://ANY:50052"
    assert args.tls is False  # a --dev flag; TLS is always on without --dev
    for flag in ("max_sessions", "session_ttl", "preload_timeout", "verify_shares"):
        assert getattr(args, flag) is None, flag


def test_dockerfile_installs_the_measured_config() -> None:
    """enclave.toml is copied to where the command reads it, before the last RUN (which
    parses it with the enclave's strict parser and normalises its mtime)."""
    instructions = dockerfile_instructions()
    final = instructions[[w for w, _ in instructions].index("FROM", 1) :]
    copies = [rest for word, rest in final if word == "COPY"]
    assert "enclave_image/enclave.toml /etc/trio-sign/enclave.toml" in copies
    copy_at = final.index(("COPY", "enclave_image/enclave.toml /etc/trio-sign/enclave.toml"))
    runs = [i for i, (word, _) in enumerate(final) if word == "RUN"]
    assert runs
    assert runs[-1] > copy_at
    last_run = final[runs[-1]][1]
    assert "load_measured_config" in last_run
    assert "/etc/trio-sign/enclave.toml" in last_run
    assert "/etc/trio-sign -xdev -exec touch" in last_run


# -- build script ------------------------------------------------------------------------------

FAKE_PCRS = {"PCR0": "A0" * 48, "PCR1": "a1" * 48, "PCR2": "a2" * 48}


def _tool_dir(tmp_path: Path, *, docker: bool, nitro_cli: bool) -> Path:
    """A PATH with only what the script needs, plus stub docker / nitro-cli that log argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "mkdir", "cat", "sed", "git", "grep"):
        found = shutil.which(tool)
        if found is not None:
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "python3").symlink_to(sys.executable)
    log = tmp_path / "calls.log"
    if docker:
        stub = bin_dir / "docker"
        stub.write_text(f'#!/bin/bash\necho "docker $*" >> {log}\n')
        stub.chmod(0o755)
    if nitro_cli:
        stub = bin_dir / "nitro-cli"
        body = json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", **FAKE_PCRS}})
        stub.write_text(
            f'#!/bin/bash\necho "nitro-cli $*" >> {log}\n'
            "echo 'Start building the Enclave Image...'\n"
            f"echo '{body}'\n"
        )
        stub.chmod(0o755)
    return bin_dir


def _filled_config() -> str:
    """enclave_image/enclave.toml with its placeholder filled by a real CA."""
    import re

    from nacl.signing import SigningKey

    from trio_sign.testing import make_ca

    ca = make_ca("gateway client CA").pem.decode()
    text = (IMAGE / "enclave.toml").read_text()
    start = text.index('client_ca_pem = """') + len('client_ca_pem = """\n')
    end = text.index('"""', start)
    text = text[:start] + ca + text[end:]
    return re.sub(
        r'"REPLACE_APPROVER_\d[^"]*"',
        lambda _: f'"{SigningKey.generate().verify_key.encode().hex()}"',
        text,
    )


def _repo_copy(tmp_path: Path, config: str | None) -> Path:
    """A copy of enclave_image/ (with ``config`` as its enclave.toml) under a fake root."""
    root = tmp_path / "repo"
    shutil.copytree(IMAGE, root / "enclave_image", ignore=shutil.ignore_patterns("out"))
    if config is not None:
        (root / "enclave_image" / "enclave.toml").write_text(config)
    return root


def _run_build(
    tmp_path: Path, bin_dir: Path, image: Path = IMAGE
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bin_dir), "SOURCE_DATE_EPOCH": "1700000000", "HOME": str(tmp_path)}
    return subprocess.run(
        [str(bin_dir / "bash"), str(image / "build"), "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("docker", "nitro_cli", "message"),
    [
        (False, True, "docker is not installed"),
        (True, False, "nitro-cli is not installed"),
    ],
)
def test_build_fails_clearly_without_tools(
    tmp_path: Path, docker: bool, nitro_cli: bool, message: str
) -> None:
    result = _run_build(tmp_path, _tool_dir(tmp_path, docker=docker, nitro_cli=nitro_cli))
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "out" / "trio-sign.eif").exists()


def test_build_refuses_the_unedited_config(tmp_path: Path) -> None:
    """The repository's enclave.toml is a template: a build with its placeholder left fails
    before docker runs, naming the file and the key."""
    assert "REPLACE" in (IMAGE / "enclave.toml").read_text()
    result = _run_build(tmp_path, _tool_dir(tmp_path, docker=True, nitro_cli=True))
    assert result.returncode == 1
    assert "enclave.toml still has a REPLACE placeholder" in result.stderr
    assert "[gateway] client_ca_pem" in result.stderr
    calls = tmp_path / "calls.log"
    assert not calls.exists() or "docker build" not in calls.read_text()  # never built


def test_build_refuses_a_missing_config(tmp_path: Path) -> None:
    root = _repo_copy(tmp_path, None)
    (root / "enclave_image" / "enclave.toml").unlink()
    result = _run_build(
        tmp_path, _tool_dir(tmp_path, docker=True, nitro_cli=True), root / "enclave_image"
    )
    assert result.returncode == 1
    assert "enclave.toml is missing" in result.stderr


def test_enclave_toml_template_is_strict_once_filled() -> None:
    """The template names only keys the enclave accepts: filled in, it parses."""
    from trio_sign.enclave._measured import MeasuredConfigError, parse_measured_config

    with pytest.raises(MeasuredConfigError, match=r"\[gateway\] client_ca_pem"):
        parse_measured_config((IMAGE / "enclave.toml").read_bytes())
    measured = parse_measured_config(_filled_config().encode())
    assert measured.client_ca_pem is not None
    assert measured.limits["max_tls_handshakes"] == 64
    assert measured.policies.policies["default"].threshold == 2  # no open default in production


def test_build_writes_pcrs(tmp_path: Path) -> None:
    config = _filled_config()
    root = _repo_copy(tmp_path, config)
    IMAGE_COPY = root / "enclave_image"
    result = _run_build(tmp_path, _tool_dir(tmp_path, docker=True, nitro_cli=True), IMAGE_COPY)
    assert result.returncode == 0, result.stderr
    config_sha = (tmp_path / "out" / "trio-sign.config.sha256").read_text().strip()
    assert config_sha == hashlib.sha256(config.encode()).hexdigest()
    pcrs = json.loads((tmp_path / "out" / "trio-sign.pcrs.json").read_text())
    assert pcrs == {
        "HashAlgorithm": "Sha384 { ... }",
        **{k: v.lower() for k, v in FAKE_PCRS.items()},
    }
    calls = (tmp_path / "calls.log").read_text().splitlines()
    build = next(c for c in calls if c.startswith("docker build"))
    assert "--build-arg SOURCE_DATE_EPOCH=1700000000" in build
    assert "--tag trio-sign-enclave:eif-build" in build
    assert f"--file {IMAGE_COPY}/Dockerfile" in build
    assert build.endswith(str(root))
    nitro = next(c for c in calls if c.startswith("nitro-cli"))
    assert nitro == (
        "nitro-cli build-enclave --docker-uri trio-sign-enclave:eif-build "
        f"--output-file {tmp_path}/out/trio-sign.eif"
    )


# -- systemd, sysusers, allocator, parent.toml -------------------------------------------------


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((IMAGE / "systemd" / name).read_text().replace("\\\n", " "))
    return parser


def test_parent_unit() -> None:
    unit = read_unit("trio-sign-parent.service")
    u, s = unit["Unit"], unit["Service"]
    assert u["Requires"] == "nitro-enclaves-allocator.service"
    assert set(u["After"].split()) >= {"nitro-enclaves-allocator.service", "network-online.target"}
    assert int(u["StartLimitBurst"]) >= 1
    assert u["StartLimitIntervalSec"]
    argv = shlex.split(s["ExecStart"])
    assert argv[0].endswith("/trio-sign")
    assert argv[1:] == ["parent", "--config", "/etc/trio-sign/parent.toml"]
    assert build_parser().parse_args(argv[1:]).config == Path("/etc/trio-sign/parent.toml")
    assert s["Restart"] == "on-failure"
    assert s["RestartSec"]
    assert s["RestartPreventExitStatus"] == "2"  # bad configuration: restarting cannot help
    assert s["KillMode"] == "mixed"
    assert s["User"] not in ("root", "0")
    assert "ne" in s["SupplementaryGroups"].split()
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "trio-sign",
        "RuntimeDirectoryMode": "0700",
        "DevicePolicy": "closed",
        "DeviceAllow": "/dev/nitro_enclaves rw",
        "CapabilityBoundingSet": "",
    }.items():
        assert s[key] == value, key
    assert "/run/trio-sign" in s["ReadWritePaths"].split()
    assert re.fullmatch(r"\d+[KMG]", s["MemoryMax"])
    assert int(s["TasksMax"]) > 0
    assert int(s["LimitNOFILE"]) >= 4096
    assert "AF_VSOCK" in s["RestrictAddressFamilies"].split()
    sysusers = (IMAGE / "systemd" / "trio-sign.sysusers.conf").read_text().splitlines()
    assert f"m {s['User']} ne" in sysusers
    assert any(line.startswith(f"u {s['User']} ") for line in sysusers)


def test_kms_local_unit() -> None:
    unit = read_unit("trio-sign-kms-local.service")
    s = unit["Service"]
    argv = shlex.split(s["ExecStart"])
    args = build_parser().parse_args(argv[1:])
    assert args.listen.startswith("tcp://127.0.0.1:")
    assert args.policy is not None
    assert "development only" in unit["Unit"]["Description"]
    assert unit["Unit"]["Before"] == "trio-sign-parent.service"
    assert s["NoNewPrivileges"] == "yes"
    assert s["ProtectSystem"] == "strict"


def test_allocator_and_parent_example_agree() -> None:
    text = (IMAGE / "allocator.yaml").read_text()
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "---")):
            match = re.fullmatch(r"(\w+): (\d+)", line)
            assert match is not None, line
            values[match.group(1)] = match.group(2)
    memory, cpus = int(values["memory_mib"]), int(values["cpu_count"])
    # the reference deployment: 1M accounts, the default 10,000 sessions
    assert memory == enclave_memory_mib(1_000_000, max_sessions=10_000) == 1024
    assert text == allocator_yaml(memory, cpu_count=cpus, accounts=1_000_000, max_sessions=10_000)
    assert cpus % 2 == 0
    example = (IMAGE / "parent.toml.example").read_text()
    for i in (0, 1, 2):
        example = example.replace(f"REPLACE_PCR{i}", f"{i:02x}" * 48)
    config = parse_parent_config(example)
    assert config.enclave.backend == "nitro-cli"
    assert config.enclave.memory_mib <= memory
    assert config.enclave.cpu_count <= cpus
    assert config.bundle.work_dir == Path("/run/trio-sign")  # the unit's RuntimeDirectory
    assert config.log_file is not None
    assert config.log_file.parent == Path("/var/log/trio-sign")  # the unit's LogsDirectory
    assert config.kms.mode == "aws"
    assert config.attestation is not None
    assert config.attestation.allow_debug is False


@pytest.mark.skipif(os.environ.get("TRIO_SIGN_DOCKER_BUILD") != "1", reason="needs docker")
def test_docker_build_smoke() -> None:  # pragma: no cover - only where a docker engine runs
    subprocess.run(
        ["docker", "build", "-f", str(IMAGE / "Dockerfile"), "--build-arg",
         "SOURCE_DATE_EPOCH=1700000000", "-t", "trio-sign-enclave:test", str(ROOT)],
        check=True, timeout=1800,
    )  # fmt: skip
