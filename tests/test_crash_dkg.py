"""Process-level crash tests of account creation by DKG (issue 16, docs/key-lifecycle.md §6).

The real local stack, in processes: the local KMS (in this process), the parent supervisor as
its own process (``python -m trio_sign.cli parent``), which launches the enclave process (local
NSM, the delta identity key made at genesis and unsealed at boot, the ``[deltas]`` file store),
and the gateway's :class:`~trio_sign.gateway._dkg.DkgDriver` over attested TLS ending in the
enclave. ``TRIO_SIGN_TEST_CRASH_AT`` (docs/testing-crashes.md) makes the enclave, the parent,
or both die with ``os._exit(137)`` at one step of the delta store behind ``DkgRound3``; the
stack is then restarted (a new parent run over the same work dir and delta location) and the
gateway's crash rule runs (:meth:`DkgDriver.recover`: ``DkgRound3`` with the same dkg_id until
an answer or ``NOT_FOUND``). Afterwards every account a ``DkgRound3`` answered exists and
signs, the crashed DKG's account exists exactly when its delta reached the store, and no other
account exists (``GetAccount`` ``NOT_FOUND``, no delta names it).

Every case shares one world (ceremony base, keys, genesis, KMS); each has its own run and
delta directories. The test ends the parent processes it starts, by their pids; each
enclave dies with its parent (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sign.cli._demo import verify_independently
from trio_sign.crypto import scheme_by_name
from trio_sign.enclave import _deltas as enclave_deltas
from trio_sign.parent import _deltas as parent_deltas
from trio_sign.rpc import RpcError, StatusCode

from .test_compaction_stack import ED, World, world_of

CRASH_AT = "TRIO_SIGN_TEST_CRASH_AT"
BOOT_TIMEOUT_S = 120.0


@pytest.fixture(autouse=True)
def _local_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 (here and in the parent processes) talks to the local KMS only."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", CRASH_AT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# -- the hook is test-only and development-only ------------------------------------------------


def test_the_crash_points_are_ignored_outside_a_development_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """This process (pytest) is neither a ``--dev``/local-NSM enclave nor a local parent: the
    variable naming every step changes nothing (a production enclave's command line is the
    EIF's, so its parent cannot make it crash)."""
    steps = "enclave:before_seal,enclave:after_seal,enclave:after_store_sent,enclave:after_ack"
    monkeypatch.setenv(CRASH_AT, steps + ",parent:before_write,parent:after_write")
    for step in ("before_seal", "after_seal", "after_store_sent", "after_ack"):
        enclave_deltas.crash_point(step)
    parent_deltas.crash_point("before_write")
    parent_deltas.crash_point("after_write")
    # a production enclave's command line: the device NSM
    monkeypatch.setattr(sys, "argv", ["trio-sign", "enclave", "--nsm", "device"])
    enclave_deltas._development_process.cache_clear()
    try:
        enclave_deltas.crash_point("before_seal")
        # a parent whose enclave is launched by nitro-cli
        config = tmp_path / "parent.toml"
        config.write_text('[enclave]\nbackend = "nitro-cli"\n')
        monkeypatch.setattr(sys, "argv", ["trio-sign", "parent", "--config", str(config)])
        parent_deltas.crash_point("after_write")
    finally:
        enclave_deltas._development_process.cache_clear()


# -- the stack in processes --------------------------------------------------------------------


def parent_toml(w: World, run_dir: Path, deltas_dir: Path) -> str:
    pcrs = {i: w.pcrs[i].hex() for i in (0, 1, 2)}
    return f"""
[bundle]
source = "{w.base}"
work_dir = "{run_dir}"
[kms]
mode = "local"
endpoint_url = "{w.kms_url}"
[enclave]
backend = "local"
nsm_dir = "{w.nsm_dir}"
config = "{w.enclave_toml}"
preload_timeout_s = 120
[ingress]
listen = "unix://{run_dir}/ingress.sock"
[attestation]
root = "{w.nsm_dir / "local-nsm-root.pem"}"
pcr0 = "{pcrs[0]}"
pcr1 = "{pcrs[1]}"
pcr2 = "{pcrs[2]}"
interval_s = 30
[failure]
restart = false
[health]
listen = "unix://{run_dir}/health.sock"
[logs]
file = "{run_dir.parent / "enclave-logs.jsonl"}"
[deltas]
location = "file://{deltas_dir}"
poll_interval_s = 0.2
[identity]
sealed_file = "{w.identity_sealed}"
"""


@dataclass
class Parent:
    """One parent process (its enclave is its child, tethered to it)."""

    process: subprocess.Popen[bytes]
    health: Path  # the health server's UNIX socket
    stderr: Path

    def alive(self) -> bool:
        return self.process.poll() is None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=2)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _ready(health: Path) -> bool:
    """``GET /readyz`` on the parent's health socket. A UNIX socket in the case's run
    directory, not a TCP port: a port picked free here and bound later by the parent can be
    taken in between by any other process on the machine (the parent then exits at boot)."""
    connection = _UnixHTTPConnection(health)
    try:
        connection.request("GET", "/readyz")
        return bool(json.loads(connection.getresponse().read()).get("ready"))
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        connection.close()


@contextmanager
def parent_process(w: World, case_dir: Path, run: int, crash_at: str | None) -> Iterator[Parent]:
    """Start ``trio-sign parent`` over ``case_dir``'s run and delta directories; on the way
    out end it by its pid (SIGTERM, then SIGKILL), if it is still alive."""
    run_dir, deltas_dir = case_dir / "run", case_dir / "deltas"
    run_dir.mkdir(exist_ok=True)
    config = case_dir / "parent.toml"
    config.write_text(parent_toml(w, run_dir, deltas_dir))
    env = {k: v for k, v in os.environ.items() if k != CRASH_AT}
    if crash_at is not None:
        env[CRASH_AT] = crash_at
    stderr = case_dir / f"parent-{run}.stderr"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_sign.cli", "parent", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    parent = Parent(process, run_dir / "health.sock", stderr)
    try:
        yield parent
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_ready(parent: Parent) -> None:
    started = time.monotonic()
    while not await trio.to_thread.run_sync(_ready, parent.health):
        assert parent.alive(), parent.stderr.read_text()[-4000:]
        assert time.monotonic() - started < BOOT_TIMEOUT_S, "the stack did not become ready"
        await trio.sleep(0.1)


@dataclass
class Gateway:
    node: Any
    coordinator: Any
    driver: Any


@asynccontextmanager
async def gateway_on(
    w: World, case_dir: Path, dkg: Any, participants: Any
) -> AsyncIterator[Gateway]:
    """The gateway's node (attested TLS ending in the enclave, through the parent's ingress),
    its coordinator and its DKG driver (short give-up: the crash makes round 3 unanswerable)."""
    from trio_sign.attested import ChannelPolicy, make_attested_client_context
    from trio_sign.gateway import Coordinator, EnclaveNode, GatewayApprover, load_participant_files
    from trio_sign.gateway._dkg import DkgDriver, DkgSettings

    context = make_attested_client_context(
        w.pki.client_cert.read_bytes(), w.pki.client_key.read_bytes()
    )
    policy = ChannelPolicy(
        shares_sha256=bytes.fromhex(w.base_sha256),
        pcrs=w.pcrs,
        root_pem=w.root_pem,
        config_sha256=w.config_sha256,
    )
    node = EnclaveNode(
        "node-1", f"unix://{case_dir}/run/ingress.sock", ssl_context=context, attestation=policy
    )
    counterparts = await trio.to_thread.run_sync(load_participant_files, [w.counterpart_file])
    approver = await trio.to_thread.run_sync(
        GatewayApprover.load, {k: w.approver_files[k] for k in ("ops-1", "risk-1")}
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            coordinator = Coordinator([node], counterparts, approver=approver)
            coordinator.add_counterparts(dkg.stores.values())
            driver = DkgDriver(
                [node],
                participants,
                dkg,
                approver=approver,
                enclave_identity_key=bytes.fromhex(w.identity_public),
                on_created=coordinator.learned,
                settings=DkgSettings(
                    round_timeout_s=10.0,
                    round3_retry_base_s=0.1,
                    round3_retry_max_s=0.5,
                    round3_give_up_s=1.0,
                ),
            )
            yield Gateway(node, coordinator, driver)
            nursery.cancel_scope.cancel()
    finally:
        approver.close()


async def signs_with(gw: Gateway, account_id: str) -> None:
    message = f"transfer from {account_id}".encode()
    signed = await gw.coordinator.sign(account_id, message)
    assert verify_independently(
        scheme_by_name(ED), signed.group_public_key, message, signed.signature, None
    )


async def exists(gw: Gateway, account_id: str) -> bool:
    """``GetAccount`` finds it (else NOT_FOUND, nothing else)."""
    status = StatusCode.OK
    try:
        await gw.node.get_account(account_id)
    except RpcError as exc:
        status = exc.status
    assert status in (StatusCode.OK, StatusCode.NOT_FOUND), status
    return status == StatusCode.OK


def stored_dkgs(deltas_dir: Path) -> list[str]:
    """The dkg_id each stored delta's header names (public header only, no key)."""
    from trio_sign.shares import inspect_sealed

    found = []
    for path in sorted(deltas_dir.glob("delta-*.enc")):
        with path.open("rb") as f:
            header, _ = inspect_sealed(f)
        found.append(str(header.get("dkg_id")))
    return found


# -- the cases ---------------------------------------------------------------------------------

#: (case, TRIO_SIGN_TEST_CRASH_AT, whose death, the crashed DKG's delta reaches the store)
CASES = [
    ("enclave-before-seal", "enclave:before_seal", "enclave", False),
    ("enclave-after-seal", "enclave:after_seal", "enclave", False),
    ("enclave-after-store-sent", "enclave:after_store_sent", "enclave", True),
    ("enclave-after-ack", "enclave:after_ack", "enclave", True),
    ("parent-before-write", "parent:before_write", "parent", False),
    ("parent-after-write", "parent:after_write", "parent", True),
    ("both", "enclave:after_store_sent,parent:after_write", "both", True),
]


async def run_case(
    w: World, case_dir: Path, participants: Any, case: str, crash_at: str, dies: str, stored: bool
) -> None:
    from trio_sign.gateway._dkg import CreatedAccount, DkgFailed, DkgShares

    await trio.Path(case_dir).mkdir()
    dkg = DkgShares(case_dir / "dkg-journal.jsonl", [p.participant_id for p in participants])
    await trio.to_thread.run_sync(dkg.open)
    answered: list[str] = []
    try:
        # 1. a DKG whose delta store crashes the enclave, the parent, or both.
        with parent_process(w, case_dir, 1, crash_at) as parent:
            await wait_ready(parent)
            async with gateway_on(w, case_dir, dkg, participants) as gw:
                with pytest.raises(DkgFailed) as failed:
                    await gw.driver.create_account(f"{case}-crashed", ED, dkg_id=f"dkg-{case}")
                assert failed.value.reason == "no_healthy_node", failed.value
            # The parent died at its step (137), or gave up on its killed enclave
            # ([failure] restart = false).
            code = await trio.to_thread.run_sync(parent.process.wait, 30)
            if dies in ("parent", "both"):
                assert code == 137, parent.stderr.read_text()[-2000:]
            else:
                assert code == 1
                assert "enclave_killed" in parent.stderr.read_text()
        enclave_log = (case_dir / "run" / "enclave.stderr").read_text(errors="replace")
        if dies == "enclave":
            assert f"test crash at {crash_at}" in enclave_log, enclave_log[-2000:]
        elif dies == "both":
            # Two processes race here: the parent stores the delta as soon as its bytes arrive
            # and dies at after_write, which kills the enclave (pdeathsig); the enclave, after
            # its send, may not have run again by then, so its own crash line is not always
            # written. Either way it died after sending its delta and before any answer.
            assert '"msg":"delta stored"' not in enclave_log, enclave_log[-2000:]
        assert (f"dkg-{case}" in stored_dkgs(case_dir / "deltas")) is stored
        assert list(dkg.pending) == [f"dkg-{case}"]

        # 2. a new parent over the same work dir and delta location; the crash rule.
        with parent_process(w, case_dir, 2, None) as parent:
            await wait_ready(parent)
            async with gateway_on(w, case_dir, dkg, participants) as gw:
                (outcome,) = await gw.driver.recover()
                if stored:
                    assert isinstance(outcome, CreatedAccount), outcome
                    assert outcome.recovered
                    answered.append(f"{case}-crashed")
                else:
                    assert isinstance(outcome, DkgFailed), outcome
                    assert outcome.reason == "not_created"
                    assert not await exists(gw, f"{case}-crashed")
                assert dkg.pending == {}
                created = await gw.driver.create_account(f"{case}-after", ED)
                assert not created.recovered
                answered.append(f"{case}-after")
                for account_id in answered:
                    await signs_with(gw, account_id)

        # 3. once more from the store alone: exactly the reported accounts exist.
        with parent_process(w, case_dir, 3, None) as parent:
            await wait_ready(parent)
            async with gateway_on(w, case_dir, dkg, participants) as gw:
                for account_id in answered:
                    assert await exists(gw, account_id), account_id
                    await signs_with(gw, account_id)
                if not stored:
                    assert not await exists(gw, f"{case}-crashed")
                status = await gw.node.get_status()
                assert status.deltas == len(answered)
        dkgs = stored_dkgs(case_dir / "deltas")
        assert len(dkgs) == len(answered)
        assert (f"dkg-{case}" in dkgs) is stored
    finally:
        dkg.close()


async def test_kill_the_enclave_the_parent_or_both_at_every_step_of_a_dkg(
    tmp_path: Path,
) -> None:
    from trio_sign.gateway._dkg import load_local_participants

    timings: dict[str, float] = {}
    started = time.monotonic()
    async with world_of(tmp_path / "w") as w:
        timings["world"] = time.monotonic() - started
        entries = {pid: (pid, path) for pid, path in w.participant_files.items()}
        participants = await trio.to_thread.run_sync(load_local_participants, entries)
        try:
            for i, (case, crash_at, dies, stored) in enumerate(CASES):
                t = time.monotonic()
                # short: the run directory holds UNIX sockets (108-byte paths)
                case_dir = tmp_path / f"c{i}"
                try:
                    await run_case(w, case_dir, participants, case, crash_at, dies, stored)
                except BaseException as exc:
                    exc.add_note(f"crash case {case} ({crash_at}); its files are in {case_dir}")
                    raise
                timings[case] = time.monotonic() - t
        finally:
            for p in participants:
                p.close()
    print("crash test timings (s):", {k: round(v, 1) for k, v in timings.items()})
