"""``trio-sign dev up --gateway-url URL --node-id ID --events-token-file FILE``: the local stack
serves a gateway running elsewhere (issue 12, defect 6). Before, its enclave could only
subscribe to the stack's private event server, so an external gateway could not drain, probe
or abort it.

The test is the gateway's side: an event server in this process, and the real ``dev up``
console script in a child process that the test starts and stops.
"""

from __future__ import annotations

import functools
import resource
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import nacl.signing
import pytest
import trio

from trio_sign.attested import make_attested_client_context
from trio_sign.gateway import (
    Coordinator,
    EnclaveNode,
    EventHub,
    GatewayApprover,
    GatewayError,
    load_participant_files,
    parse_gateway_config,
    serve_gateway_events,
)
from trio_sign.shares import read_plaintext
from trio_sign.testing import GenerateReport, generate_share_files

EXE = str(Path(sys.executable).with_name("trio-sign"))
LOW_NOFILE = 512


def _low_open_file_limit() -> None:  # runs in the child before exec
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(LOW_NOFILE, hard), hard))


def _open_file_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


async def _read_until_ready(stdout: trio.abc.ReceiveStream) -> dict[str, str]:
    """The `key value` lines dev up prints, up to `Ctrl-C stops everything.`"""
    buffer = b""
    while b"Ctrl-C" not in buffer:
        chunk = await stdout.receive_some()
        assert chunk, f"dev up ended early: {buffer.decode()}"
        buffer += chunk
    info = {}
    for line in buffer.decode().splitlines():
        if line.startswith("  "):
            key, value = line.split(None, 1)
            info[key] = value.strip()
    return info


async def _external_gateway_signs_with_the_printed_approvers(
    info: dict[str, str], gen: GenerateReport, tmp_path: Path
) -> None:
    """Issue 14: dev up says where the approver keys are (0600) and what the policy is; the
    printed gateway.toml line gives an outside gateway two keys, which sign; without them the
    enclave refuses (PERMISSION_DENIED, no_approvals)."""
    assert info["policy"].startswith("default: 2 of ops-1, ops-2, risk-1")
    directory = Path(info["approvers"].split()[0])
    assert directory == tmp_path / "stack" / "approvers"
    assert "ops-1.key ed25519, ops-2.key ed25519, risk-1.key p256" in info["approvers"]
    for key_id in ("ops-1", "ops-2", "risk-1"):
        assert (directory / f"{key_id}.key").stat().st_mode & 0o777 == 0o600
    toml = f"""{info["gateway_toml"]}
[shares]
participant_files = ["{gen.participant_files[2]}"]
[dev]
skip_attestation = true
[[node]]
id = "node-7"
address = "tcp://127.0.0.1:1"
events_token = "{"x" * 32}"
"""
    config = parse_gateway_config(toml)
    assert sorted(config.approver_keys) == ["ops-1", "risk-1"]
    approver = await trio.to_thread.run_sync(GatewayApprover.load, config.approver_keys)
    context = make_attested_client_context(
        await trio.Path(info["client_cert"]).read_bytes(),
        await trio.Path(info["client_key"]).read_bytes(),
    )
    node = EnclaveNode("node-7", info["grpc"].split()[0], ssl_context=context)
    stores = load_participant_files([gen.participant_files[2]])
    with gen.service_file.open("rb") as f:
        record = next(iter(read_plaintext(f)))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            with pytest.raises(GatewayError, match="no_approvals"):
                await Coordinator([node], stores).sign_message(record.account_id, b"none")
            coordinator = Coordinator([node], stores, approver=approver)
            signature = await coordinator.sign_message(record.account_id, b"approved")
            nacl.signing.VerifyKey(record.group_public_key).verify(b"approved", signature)
            nursery.cancel_scope.cancel()
    finally:
        approver.close()
        for store in stores:
            store.close()


def _dkg_participants_are_pinned(info: dict[str, str], tmp_path: Path) -> None:
    """Issue 16: dev up's enclave.toml pins the delta identity key, the two DKG participant
    keys it printed (files 0600) and a create policy; the printed ``gateway_dkg`` line gives a
    gateway those participants; the parent stores deltas in the work directory."""
    from trio_sign.enclave._measured import load_measured_config
    from trio_sign.gateway import ApproverSigningKey

    work = tmp_path / "stack"
    measured = load_measured_config(work / "enclave.toml")
    assert measured.dkg is not None
    assert measured.delta_identity_key is not None
    assert measured.delta_identity_key.hex() in info["dkg"]
    assert "create" in measured.policies.policies
    config = parse_gateway_config(
        f"""{info["gateway_dkg"]}
[dev]
skip_attestation = true
[[node]]
id = "node-7"
address = "tcp://127.0.0.1:1"
events_token = "{"x" * 32}"
"""
    )
    assert sorted(config.local_participants) == ["p2", "p3"]
    for key_id, path in config.local_participants.values():
        assert path.stat().st_mode & 0o777 == 0o600
        with ApproverSigningKey.load(path, key_id=key_id) as key:
            assert measured.dkg.participants[key_id] == key.public_key
    assert str(work / "run" / "deltas") in info["dkg"]


async def test_dev_up_serves_an_external_gateway(tmp_path: Path) -> None:
    gen = generate_share_files(tmp_path / "shares", 5)
    token = secrets.token_urlsafe(32)
    token_file = tmp_path / "node-7-events.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    hub = EventHub()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(
                serve_gateway_events, "tcp://127.0.0.1:0", hub, credentials={"node-7": token}
            )
        )
        origin = binds[0].rstrip("/")
        proc: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                [
                    EXE,
                    "dev",
                    "up",
                    "--shares",
                    str(gen.service_file),
                    "--workdir",
                    str(tmp_path / "stack"),
                    "--health",
                    "tcp://127.0.0.1:0",
                    "--gateway-url",
                    origin,
                    "--node-id",
                    "node-7",
                    "--events-token-file",
                    str(token_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                preexec_fn=_low_open_file_limit,
                check=False,
            )
        )
        try:
            assert proc.stdout is not None
            with trio.fail_after(120):
                info = await _read_until_ready(proc.stdout)
            assert info["events"] == f"{origin}/v1/enclaves/node-7/events"
            assert info["node_id"] == "node-7"
            assert info["events_token"].split()[0] == str(token_file)
            assert info["accounts"] == "5"
            # the enclave subscribed to *this* gateway, through the relay, with node-7's token
            with trio.fail_after(30):
                while hub.subscribers("node-7") != 1:  # noqa: ASYNC110 - real processes
                    await trio.sleep(0.05)
            assert hub.stats.unauthorized == 0
            await _external_gateway_signs_with_the_printed_approvers(info, gen, tmp_path)
            _dkg_participants_are_pinned(info, tmp_path)
            # dev up raised its open-file limit (the ingress needs two per connection)
            if hard != resource.RLIM_INFINITY and hard > LOW_NOFILE:
                assert _open_file_limits(proc.pid) == (hard, hard)
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(60):
                assert await proc.wait() == 0
            with trio.fail_after(30):
                while hub.subscribers("node-7") != 0:  # noqa: ASYNC110 - real processes
                    await trio.sleep(0.05)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        nursery.cancel_scope.cancel()


def test_gateway_flags_need_gateway_url(tmp_path: Path) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("x")
    shares = tmp_path / "s.json"
    shares.write_text("")
    proc = subprocess.run(
        [EXE, "dev", "up", "--shares", str(shares), "--events-token-file", str(token_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "trio-sign: error: --events-token-file and --gateway-ca need --gateway-url"
    )
