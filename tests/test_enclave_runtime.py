"""The production enclave tree (serve_enclave) against a parent over UNIX sockets: attested
preload, PCR 16, audit, serving, drain, and every way boot can fail, with its exit code and
the status the parent sees. Also the real process as PID 1 under ``unshare``."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from proto_min import sign_service_pb2 as pb
from trio_sign.enclave import EnclaveExit, EnclaveState, ExitCode, SessionPool, serve_enclave
from trio_sign.enclave._serve import EnclaveHandle
from trio_sign.nitro import (
    EventsConfigMessage,
    LocalNsm,
    MetricsMessage,
    verify_attestation,
)
from trio_sign.nitro._binding import NO_DELTAS, decode_binding
from trio_sign.rpc import open_grpc_channel
from trio_sign.shares import ShareRecord
from trio_sign.testing import make_ca, make_leaf
from trio_sign.transport import TransportError, connect, load_cert_chain, open_listeners

from .enclave_helpers import (
    Account,
    FakeParent,
    Peer,
    make_accounts,
    parent,
    sorted_commitments,
)

S = "/trio_sign.v1.SignService/"


@pytest.fixture(scope="module")
def accounts() -> dict[str, Account]:
    store, accounts = make_accounts(12)
    store.close()
    return accounts


async def test_boot_serve_attest_drain(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path
) -> None:
    records = [a.service for a in accounts.values()]
    nsm = LocalNsm.from_dir(nsm_dir)
    async with parent(tmp_path, records, nsm_dir) as fake, trio.open_nursery() as nursery:
        handle: EnclaveHandle = await nursery.start(
            functools.partial(serve_enclave, fake.config(), nsm=nsm)
        )
        sha = hashlib.sha256(fake.bundle.read_bytes()).hexdigest()
        async with open_grpc_channel(await connect(handle.addresses[0])) as ch:
            status = pb.GetStatusResponse.FromString(await ch.unary_unary(S + "GetStatus", b""))
            assert status.state == "serving"
            assert status.accounts == len(records)
            assert status.shares_sha256 == sha

            # a full signing session
            acct = next(iter(accounts.values()))
            committed = pb.CommitResponse.FromString(
                await ch.unary_unary(
                    S + "Commit",
                    pb.CommitRequest(
                        account_id=acct.account_id, session_id="s"
                    ).SerializeToString(),
                )
            )
            from trio_sign.crypto import SigningCommitment

            mine = SigningCommitment(committed.identifier, committed.hiding, committed.binding)
            peer = Peer(acct)
            cs = sorted_commitments(mine, peer.commitment)
            signed = pb.SignResponse.FromString(
                await ch.unary_unary(
                    S + "Sign",
                    pb.SignRequest(
                        session_id="s",
                        message=b"m",
                        commitments=[
                            pb.SigningCommitment(
                                identifier=c.identifier, hiding=c.hiding, binding=c.binding
                            )
                            for c in cs
                        ],
                    ).SerializeToString(),
                )
            )
            peer.aggregate(
                b"m",
                cs,
                {
                    signed.identifier: signed.signature_share,
                    acct.peer.identifier: peer.sign(b"m", cs),
                },
            )

            # attestation binds the nonce, the shares fingerprint and PCR 16
            doc = pb.GetAttestationResponse.FromString(
                await ch.unary_unary(
                    S + "GetAttestation",
                    pb.GetAttestationRequest(nonce=b"n0nce").SerializeToString(),
                )
            ).document
            verified = verify_attestation(
                doc,
                root_pem=nsm.root_pem,
                expected_nonce=b"n0nce",
                expected_pcrs={16: hashlib.sha384(bytes(48) + bytes.fromhex(sha)).digest()},
            )
            bound = decode_binding(verified.user_data)
            assert bound.shares == bytes.fromhex(sha)
            assert bound.deltas == NO_DELTAS
            assert bound.config == fake.config().measured.sha256
            assert status.config_sha256 == bound.config.hex()
        locked, _ = nsm.describe_pcr(16)
        assert locked
        await handle.drain()
    states = [s.state for s in fake.states]
    assert states[0] == "booting"
    assert "preloading" in states
    serving = next(s for s in fake.states if s.state == "serving")
    assert serving.accounts == len(records)
    assert serving.sha256 == sha
    assert states[-1] == "exiting"
    assert fake.exits == [0]
    audit = [r for r in fake.logs if r.get("audit") == "boot"]
    assert len(audit) == 1
    assert audit[0]["shares_sha256"] == sha
    assert audit[0]["accounts"] == len(records)
    boot_doc = base64.b64decode(audit[0]["attestation_document_b64"])
    audit_bound = decode_binding(verify_attestation(boot_doc, root_pem=nsm.root_pem).user_data)
    assert audit_bound.shares == bytes.fromhex(sha)
    for line in fake.logs:  # nothing secret crossed to the parent
        for rec in records:
            assert bytes(rec.signing_share).hex() not in json.dumps(line)


async def _boot_failure(
    tmp_path: Path, records: list[ShareRecord], nsm_dir: Path, **kw: Any
) -> tuple[EnclaveExit, FakeParent]:
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k in ("preload_timeout_s", "memory_limit_bytes")}
    async with parent(tmp_path, records, nsm_dir, **kw) as fake:
        with pytest.raises(EnclaveExit) as info:
            await serve_enclave(fake.config(**cfg_kw), nsm=LocalNsm.from_dir(nsm_dir))
        assert not (fake.dir / "grpc.sock").exists()  # nothing was ever served
    # the last log lines (why it failed) are flushed to the parent before the process ends
    failed = [line for line in fake.logs if line["msg"] == "enclave failed"]
    assert [line["reason"] for line in failed] == [info.value.reason]
    return info.value, fake


async def test_tampered_bundle_is_never_served(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path
) -> None:
    records = [a.service for a in accounts.values()]
    exit_, fake = await _boot_failure(tmp_path, records, nsm_dir, tamper=True)
    assert exit_.code == ExitCode.PRELOAD_FAILED
    assert exit_.reason == "tampered"
    assert fake.states[-1].state == "failed"
    assert fake.states[-1].reason == "tampered"
    assert fake.exits == [3]


async def test_duplicate_accounts_fail_boot(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path
) -> None:
    records = [a.service for a in accounts.values()]
    exit_, fake = await _boot_failure(tmp_path, [*records, records[0]], nsm_dir)
    assert exit_.code == ExitCode.PRELOAD_FAILED
    assert exit_.reason == "duplicate_account"
    assert fake.exits == [3]


async def test_preload_timeout(tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path) -> None:
    records = [a.service for a in accounts.values()]
    exit_, fake = await _boot_failure(
        tmp_path, records, nsm_dir, boot_silent=True, preload_timeout_s=0.5
    )
    assert exit_.code == ExitCode.PRELOAD_TIMEOUT
    assert exit_.reason == "timeout"
    assert fake.states[-1].state == "failed"
    assert fake.exits == [4]


async def test_memory_limit_breach(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path
) -> None:
    records = [a.service for a in accounts.values()]
    # a limit far below what this process already uses: the bundle cannot fit
    exit_, fake = await _boot_failure(
        tmp_path, records, nsm_dir, memory_limit_bytes=16 * 1024 * 1024
    )
    assert exit_.code == ExitCode.MEMORY
    assert exit_.reason == "memory"
    assert fake.exits == [5]


async def test_a_failing_long_lived_task_tears_everything_down(
    tmp_path: Path,
    accounts: dict[str, Account],
    nsm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chaos: the session reaper raises after the enclave is serving: the whole tree goes,
    the status says failed/internal, exit code 1, and the gRPC socket is closed."""
    records = [a.service for a in accounts.values()]
    boom = trio.Event()
    original = SessionPool.run_reaper

    async def exploding_reaper(
        self: SessionPool, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as inner:
            await inner.start(functools.partial(original, self))
            task_status.started()
            await boom.wait()
            raise RuntimeError("reaper bug")

    monkeypatch.setattr(SessionPool, "run_reaper", exploding_reaper)
    caught: list[EnclaveExit] = []

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve_enclave(cfg, nsm=LocalNsm.from_dir(nsm_dir), task_status=task_status)
        except EnclaveExit as exc:
            caught.append(exc)

    async with parent(tmp_path, records, nsm_dir) as fake:
        cfg = fake.config()
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(run)
            handle.service.pool.commit(records[0].account_id, "open-session")
            boom.set()
    (exit_,) = caught
    assert exit_.code == ExitCode.INTERNAL
    assert fake.states[-1].state == "failed"
    assert fake.states[-1].reason == "internal"
    assert fake.exits == [1]
    with pytest.raises(TransportError, match=r"refused|No such file"):  # gone with the tree
        await connect(f"unix://{fake.dir}/grpc.sock")


async def _sign_once(
    ch: Any, acct: Account, message: bytes, approver: nacl.signing.SigningKey | None = None
) -> None:
    """A full FROST session over gRPC with the counterpart signing locally; verifies. With
    ``approver``, the first Sign carries no approval and is refused (PERMISSION_DENIED), then
    the same session signs with the approval of key ``ops-1`` (issue 14)."""
    from trio_sign.authz import approval_payload
    from trio_sign.crypto import SigningCommitment
    from trio_sign.rpc import RpcError, StatusCode

    committed = pb.CommitResponse.FromString(
        await ch.unary_unary(
            S + "Commit",
            pb.CommitRequest(account_id=acct.account_id, session_id="pid1").SerializeToString(),
        )
    )
    peer = Peer(acct)
    cs = sorted_commitments(
        SigningCommitment(committed.identifier, committed.hiding, committed.binding),
        peer.commitment,
    )
    request = pb.SignRequest(
        session_id="pid1",
        message=message,
        commitments=[
            pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding)
            for c in cs
        ],
    )
    if approver is not None:
        with pytest.raises(RpcError) as refused:
            await ch.unary_unary(S + "Sign", request.SerializeToString())
        assert refused.value.status == StatusCode.PERMISSION_DENIED
        assert "no_approvals" in refused.value.details
        expires = int(time.time() * 1000) + 60_000
        payload = approval_payload(acct.account_id, "pid1", message, expires)
        request.approvals.append(
            pb.Approval(
                key_id="ops-1",
                signature=approver.sign(payload).signature,
                expires_at_unix_ms=expires,
            )
        )
    signed = pb.SignResponse.FromString(
        await ch.unary_unary(S + "Sign", request.SerializeToString())
    )
    signature = peer.aggregate(
        message,
        cs,
        {signed.identifier: signed.signature_share, acct.peer.identifier: peer.sign(message, cs)},
    )
    nacl.signing.VerifyKey(acct.group_public_key).verify(message, signature)


def _only_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _unshare_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"the kernel refuses new PID namespaces here: {probe.stderr.strip()}"
    return None


async def test_enclave_process_as_pid1_under_unshare(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path
) -> None:
    """The real command in fresh PID and network namespaces (no network at all, PID 1),
    talking to the parent over UNIX sockets; SIGTERM drains and exits 0."""
    reason = _unshare_works()
    if reason is not None:
        pytest.skip(reason)
    records = [a.service for a in accounts.values()]
    exe = Path(sys.executable).with_name("trio-sign")
    async with parent(tmp_path, records, nsm_dir) as fake:
        cfg = fake.config()
        wrapped = True
        # the measured configuration pins this test's gateway CA: the production command
        # serves its gRPC port behind TLS 1.3 with client certificates from it
        ca = make_ca("pid1 test gateway CA", days=1)
        client_cert, client_key = make_leaf(ca, "gateway", server=False, days=1)
        enclave_toml = fake.dir / "enclave.toml"
        approver = nacl.signing.SigningKey.generate()
        enclave_toml.write_bytes(
            b"[gateway]\nclient_ca_pem = '''\n"
            + ca.pem
            + b"'''\n\n[approvers.ops-1]\ntype = 'ed25519'\npublic_key = '"
            + approver.verify_key.encode().hex().encode()
            + b"'\n\n[policies.default]\napprovers = ['ops-1']\nthreshold = 1\n"
        )
        cmd = [
            *["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"],
            str(exe),
            "enclave",
            "--config",
            str(enclave_toml),
            "--nsm",
            f"local:{nsm_dir}",
            "--grpc-listen",
            cfg.grpc_listen,
            "--public-listen",
            f"unix://{fake.dir}/enclave-public.sock",
            "--preload-address",
            cfg.preload_address,
            "--status-address",
            cfg.status_address,
            "--log-address",
            cfg.log_address,
            "--drain-grace",
            "1",
        ]
        stderr_path = fake.dir / "enclave.stderr"
        stderr_file = stderr_path.open("wb")
        proc = await trio.lowlevel.open_process(
            cmd, stderr=stderr_file, env={**os.environ, "PYTHONWARNINGS": "error"}
        )
        try:
            with trio.fail_after(30):
                while not any(s.state == "serving" for s in fake.states):  # noqa: ASYNC110
                    await trio.sleep(0.05)
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # the test pins nothing; attestation would
                context.set_alpn_protocols(["h2"])
                load_cert_chain(context, client_cert, client_key)
                tls = trio.SSLStream(await connect(cfg.grpc_listen), context)
                async with open_grpc_channel(tls) as ch:
                    assert await ch.unary_unary(
                        S + "Ping", pb.PingRequest(payload=b"pid1").SerializeToString(), timeout=5
                    )
                    await _sign_once(
                        ch, next(iter(accounts.values())), b"signed by PID 1", approver
                    )
                # the public port (h2c) answers GetStatus, naming the measured file
                async with open_grpc_channel(
                    await connect(f"unix://{fake.dir}/enclave-public.sock")
                ) as ch:
                    status = pb.GetStatusResponse.FromString(
                        await ch.unary_unary(S + "GetStatus", b"", timeout=5)
                    )
                    assert (
                        status.config_sha256
                        == hashlib.sha256(enclave_toml.read_bytes()).hexdigest()
                    )
                pid1 = [r for r in fake.logs if r.get("msg") == "enclave ready"]
                assert pid1
                # ``unshare --fork`` ignores SIGTERM while it waits for its child: signal the
                # enclave itself, by its own pid, and let unshare pass its exit status on.
                os.kill(_only_child(proc.pid) if wrapped else proc.pid, signal.SIGTERM)
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stderr_file.close()
    assert code == 0, stderr_path.read_text()
    assert fake.states[-1].state == "exiting"
    assert fake.exits == [0]


def _lying_kms(fake: FakeParent, how: str) -> Any:
    """A parent that asks KMS honestly, then misbehaves in the way ``how`` names."""
    import os as _os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from trio_sign.nitro import decode_attestation, encrypt_for_recipient

    honest = fake.kms

    async def kms(document: bytes, header: dict[str, Any]) -> bytes:
        envelope: bytes = await honest(document, header)
        data = fake.bundle.read_bytes()
        if how == "truncated":
            fake.bundle.write_bytes(data[: len(data) - 700])
        elif how == "corrupt":
            fake.bundle.write_bytes(b"NOTSEAL!" + data[8:])
        elif how == "wrong_key":
            public = serialization.load_der_public_key(
                decode_attestation(document).public_key or b""
            )
            assert isinstance(public, rsa.RSAPublicKey)
            envelope = encrypt_for_recipient(public, _os.urandom(32))
        elif how == "foreign_envelope":
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
            envelope = encrypt_for_recipient(other, _os.urandom(32))
        return envelope

    return kms


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncated", "truncated"),
        ("corrupt", "bad_magic"),
        ("wrong_key", "tampered"),
        ("foreign_envelope", "key_unwrap"),
    ],
)
async def test_every_preload_failure_ends_non_zero_with_reason(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path, how: str, reason: str
) -> None:
    records = [a.service for a in accounts.values()]
    async with parent(tmp_path, records, nsm_dir) as fake:
        fake.kms = _lying_kms(fake, how)
        with pytest.raises(EnclaveExit) as info:
            await serve_enclave(fake.config(), nsm=LocalNsm.from_dir(nsm_dir))
        assert not (fake.dir / "grpc.sock").exists()
    assert info.value.code == ExitCode.PRELOAD_FAILED
    assert info.value.reason == reason
    assert fake.states[-1].state == "failed"
    assert fake.states[-1].reason == reason
    assert fake.exits == [3]


async def test_sigterm_mid_session_drains_and_zeroes_nonces(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path
) -> None:
    """An open session when the drain starts: its nonces are zeroed on the way out, and the
    drain finishes within the grace deadline."""
    records = [a.service for a in accounts.values()]
    async with parent(tmp_path, records, nsm_dir) as fake:
        async with trio.open_nursery() as nursery:
            handle: EnclaveHandle = await nursery.start(
                functools.partial(serve_enclave, fake.config(), nsm=LocalNsm.from_dir(nsm_dir))
            )
            pool = handle.service.pool
            pool.commit(records[0].account_id, "open")
            nonces = pool._sessions["open"].nonces
            assert nonces is not None
            buffer = getattr(nonces, "_buf")  # noqa: B009 - the suite class is private
            assert buffer != bytearray(64)
            start = trio.current_time()
            await handle.drain()
            assert trio.current_time() - start < fake.config().drain_grace_s + 1
        assert buffer == bytearray(64)
        assert pool.open_sessions == 0
    assert fake.states[-1].state == "exiting"
    assert fake.exits == [0]


async def test_a_failing_memory_monitor_tears_everything_down(
    tmp_path: Path,
    accounts: dict[str, Account],
    nsm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chaos: the memory monitor raises while serving: teardown, failed/internal, exit 1."""
    import trio_sign.enclave._serve as serve_mod

    original = serve_mod.run_memory_monitor  # type: ignore[attr-defined]
    boom = trio.Event()

    async def exploding_monitor(
        *args: Any, task_status: Any = trio.TASK_STATUS_IGNORED, **kw: Any
    ) -> None:
        async with trio.open_nursery() as inner:
            await inner.start(functools.partial(original, *args, **kw))
            task_status.started()
            await boom.wait()
            raise RuntimeError("monitor bug")

    monkeypatch.setattr(serve_mod, "run_memory_monitor", exploding_monitor)
    records = [a.service for a in accounts.values()]
    caught: list[EnclaveExit] = []

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve_enclave(
                fake.config(), nsm=LocalNsm.from_dir(nsm_dir), task_status=task_status
            )
        except EnclaveExit as exc:
            caught.append(exc)

    async with parent(tmp_path, records, nsm_dir) as fake, trio.open_nursery() as nursery:
        await nursery.start(run)
        boom.set()
    (exit_,) = caught
    assert exit_.code == ExitCode.INTERNAL
    assert fake.states[-1].state == "failed"
    assert fake.exits == [1]


def test_loopback_is_brought_up_in_a_fresh_network_namespace() -> None:
    import subprocess
    import sys

    reason = _unshare_works()
    if reason is not None:
        pytest.skip(reason)
    code = "from trio_sign.enclave._pid1 import bring_up_loopback as up; print(up(), up())"
    out = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.split() == ["True", "False"]  # it was down; then it is up


@pytest.mark.parametrize(
    ("cli_url", "parent_node", "want"),
    [
        # no --gateway-url (the EIF's case): the parent's settings over the boot channel
        (None, "node-b", "http://127.0.0.1:9/v1/enclaves/node-b/events"),
        # --gateway-url is on the measured command line: it wins, the parent's are ignored
        ("http://127.0.0.1:7", "node-b", "http://127.0.0.1:7/v1/enclaves/enclave-0/events"),
        # the parent sends a node id the enclave refuses: no subscription, signing unaffected
        (None, "../admin", None),
    ],
    ids=["from-parent", "command-line-wins", "refused"],
)
async def test_events_settings_from_the_boot_channel(
    tmp_path: Path,
    accounts: dict[str, Account],
    nsm_dir: Path,
    cli_url: str | None,
    parent_node: str,
    want: str | None,
) -> None:
    records = [a.service for a in accounts.values()]
    async with parent(tmp_path, records, nsm_dir) as fake, trio.open_nursery() as nursery:
        fake.events = EventsConfigMessage(gateway_url="http://127.0.0.1:9", node_id=parent_node)
        handle: EnclaveHandle = await nursery.start(
            functools.partial(
                serve_enclave, fake.config(gateway_url=cli_url), nsm=LocalNsm.from_dir(nsm_dir)
            )
        )
        assert (handle.sse.url if handle.sse is not None else None) == want
        async with open_grpc_channel(await connect(handle.addresses[0])) as ch:
            status = pb.GetStatusResponse.FromString(await ch.unary_unary(S + "GetStatus", b""))
            assert status.state == "serving"
        await handle.drain()
    messages = [(line["level"], line["msg"]) for line in fake.logs]
    if cli_url is not None:
        assert (
            "WARNING",
            "ignoring the parent's events settings: --gateway-url was given",
        ) in messages
    if want is None:
        assert any(level == "ERROR" and "events settings" in msg for level, msg in messages)


async def test_drain_requested_by_the_parent_on_the_status_channel(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The parent's orderly stop (on Nitro there are no signals): ``drain`` on the status
    channel drains the enclave like SIGTERM, and serve_enclave returns by itself (exit 0)."""
    caplog.set_level(logging.INFO, "trio_sign")
    records = [a.service for a in accounts.values()]
    async with parent(tmp_path, records, nsm_dir) as fake:
        assert not await fake.status_link.request_drain()  # no enclave connected yet
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                handle: EnclaveHandle = await nursery.start(
                    functools.partial(serve_enclave, fake.config(), nsm=LocalNsm.from_dir(nsm_dir))
                )
                handle.service.pool.commit(records[0].account_id, "open")
                assert await fake.status_link.request_drain()
            # the nursery closed without anyone cancelling it: serve_enclave returned
        assert handle.service.state == "draining"
        assert handle.service.pool.open_sessions == 0  # nonces zeroed on the way out
    assert fake.states[-1].state == "exiting"  # "draining" may be coalesced away: it was quick
    assert fake.exits == [0]
    assert any(line["msg"] == "the parent asked for a drain" for line in fake.logs), [
        line["msg"] for line in fake.logs
    ]


async def test_a_busy_grpc_address_fails_boot_with_exit_7_and_says_why(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path
) -> None:
    """Issue 12 defect 5: the listener's failure is SERVICE_FAILED (reason ``listen``), named
    in one line, and the parent still hears ``failed``, ``exit(7)`` and the last log lines:
    the link outlives the services that failed."""
    records = [a.service for a in accounts.values()]
    async with parent(tmp_path, records, nsm_dir) as fake:
        cfg = fake.config()
        busy = await open_listeners(cfg.grpc_listen)  # someone else listens there
        try:
            with pytest.raises(EnclaveExit) as info:
                await serve_enclave(cfg, nsm=LocalNsm.from_dir(nsm_dir))
        finally:
            for listener in busy:
                await listener.aclose()
    assert info.value.code == ExitCode.SERVICE_FAILED
    assert info.value.reason == "listen"
    assert str(info.value).startswith(f"cannot listen on {cfg.grpc_listen}")
    assert "\n" not in str(info.value)
    assert fake.states[-1].state == "failed"
    assert fake.states[-1].reason == "listen"
    assert fake.exits == [7]
    failed = [line for line in fake.logs if line["msg"] == "enclave failed"]
    assert [line["reason"] for line in failed] == ["listen"]


async def test_the_lifecycle_follows_drain_undrain_and_the_metrics_fit_the_channel(
    tmp_path: Path, accounts: dict[str, Account], nsm_dir: Path
) -> None:
    """The tree wires the service to its ParentLink: the gateway's reversible drain and its
    undrain move the lifecycle (and the parent sees them), SIGTERM's drain is for good, and
    the service's metrics are what the link sends (a snapshot the channel accepts)."""
    records = [a.service for a in accounts.values()]
    async with parent(tmp_path, records, nsm_dir) as fake, trio.open_nursery() as nursery:
        handle: EnclaveHandle = await nursery.start(
            functools.partial(serve_enclave, fake.config(), nsm=LocalNsm.from_dir(nsm_dir))
        )
        link = handle.link
        assert link.state is EnclaveState.SERVING
        assert link.metrics_source == handle.service.metrics.snapshot
        handle.service.pool.commit(records[0].account_id, "s")
        MetricsMessage(snapshot=handle.service.metrics.snapshot()).to_frame()  # fits
        handle.service.start_draining(reversible=True)  # the gateway's SSE drain
        assert _state(handle) is EnclaveState.DRAINING
        await _until(lambda: fake.states[-1].state == "draining")
        assert handle.service.stop_draining()  # its undrain
        assert _state(handle) is EnclaveState.SERVING
        await _until(lambda: fake.states[-1].state == "serving")
        await handle.drain()  # SIGTERM: for good
        assert not handle.service.stop_draining()
    assert link.lifecycle.history == [
        EnclaveState.BOOTING,
        EnclaveState.PRELOADING,
        EnclaveState.SERVING,
        EnclaveState.DRAINING,
        EnclaveState.SERVING,
        EnclaveState.DRAINING,
        EnclaveState.EXITING,
        EnclaveState.EXITED,
    ]
    assert fake.states[-1].state == "exiting"
    assert fake.exits == [0]


def _state(handle: EnclaveHandle) -> EnclaveState:
    return handle.link.state  # a call: each assert reads it afresh (no narrowing)


async def _until(condition: Any) -> None:
    with trio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - the parent's reader runs on real sockets
            await trio.sleep(0.01)


async def test_a_dev_enclave_reporting_to_a_parent_gives_the_same_last_words(
    tmp_path: Path,
    accounts: dict[str, Account],
    nsm_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``serve_dev_enclave(report_to_parent=True)`` runs the same ParentLink: the parent sees
    preloading, serving, then (its ``drain``) exiting and exit 0."""
    caplog.set_level(logging.INFO, "trio_sign")
    from trio_sign.enclave import serve_dev_enclave
    from trio_sign.shares import write_plaintext

    records = [a.service for a in accounts.values()]
    shares = tmp_path / "service_key_shares.json"
    with shares.open("wb") as f:
        write_plaintext(f, records)
    async with parent(tmp_path, records, nsm_dir) as fake:
        cfg = fake.config(dev=True, dev_plaintext_shares=shares)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                handle: EnclaveHandle = await nursery.start(
                    functools.partial(serve_dev_enclave, cfg, report_to_parent=True)
                )
                assert handle.link.state is EnclaveState.SERVING
                await _until(lambda: fake.states[-1].state == "serving")
                assert await fake.status_link.request_drain()
            # serve_dev_enclave returned by itself after the parent's drain
    assert fake.states[-1].state == "exiting"
    assert fake.states[-1].accounts == len(records)
    assert fake.exits == [0]
    assert any(line["msg"] == "the parent asked for a drain" for line in fake.logs)


def test_an_internal_error_in_the_tree_is_exit_1() -> None:
    """A LifecycleError (an illegal move: a bug) anywhere in the tree ends it INTERNAL."""
    from trio_sign.enclave import EnclaveEvent, LifecycleError
    from trio_sign.enclave._lifecycle import EnclaveState as S
    from trio_sign.enclave._serve import _classify

    bug = LifecycleError(S.BOOTING, EnclaveEvent.DRAIN)
    outcome = _classify(ExceptionGroup("tree", [bug]))
    assert outcome is not None
    assert (outcome.code, outcome.reason) == (ExitCode.INTERNAL, "internal")
    assert "'drain' is not allowed in state 'booting'" in str(outcome)
