"""The reference Sign Gateway's coordinator, end to end against real enclaves.

A development enclave (``serve_dev_enclave``) over loopback TCP, and the production enclave
(``serve_enclave`` with a LocalNsm, booted through the fake parent, TLS ending in it) behind
the real ingress, a byte pipe (``serve_ingress`` + a verified ``AttestationGate`` over the
enclave's public port), reached over the gateway's attested channel. Faults (a failing or
corrupted Sign) come from `EnclaveNode` subclasses that wrap the real calls; the enclave's
pool is checked afterwards.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proto_min import sign_service_pb2 as pb
from trio_sign import gateway
from trio_sign.attested import ChannelPolicy, make_attested_client_context
from trio_sign.crypto import SigningCommitment
from trio_sign.crypto._schemes import Commitment
from trio_sign.enclave import (
    EnclaveConfig,
    EnclaveHandle,
    parse_measured_config,
    serve_dev_enclave,
    serve_enclave,
)
from trio_sign.gateway import (
    ApproverSigningKey,
    Coordinator,
    CoordinatorSettings,
    EnclaveNode,
    GatewayApprover,
    GatewayError,
    NodeSettings,
    connect_tls,
    load_participant_files,
    make_client_ssl_context,
)
from trio_sign.nitro import LocalNsm
from trio_sign.parent import (
    AttestationGate,
    AttestationPolicy,
    make_server_ssl_context,
    serve_ingress,
)
from trio_sign.rpc import RpcError, StatusCode
from trio_sign.shares import ShareRecord, ShareStore, read_plaintext
from trio_sign.testing import generate_share_files
from trio_sign.transport import TransportError, connect

from .enclave_helpers import parent

N_ACCOUNTS = 6
#: The approvers of the production enclave's measured configuration (one P-256).
APPROVER_KEY_TYPES = {"ops-1": "ed25519", "ops-2": "ed25519", "risk-1": "p256"}


@dataclass(frozen=True)
class Shares:
    service: Path
    participants: dict[int, Path]

    def account_ids(self) -> list[str]:
        with self.service.open("rb") as f:
            return [r.account_id for r in read_plaintext(f)]

    def group_keys(self) -> dict[str, bytes]:
        with self.service.open("rb") as f:
            return {r.account_id: r.group_public_key for r in read_plaintext(f)}


@pytest.fixture(scope="module")
def shares(tmp_path_factory: pytest.TempPathFactory) -> Shares:
    report = generate_share_files(tmp_path_factory.mktemp("shares"), N_ACCOUNTS)
    return Shares(report.service_file, report.participant_files)


@asynccontextmanager
async def dev_enclave(shares: Shares, **config: Any) -> AsyncIterator[EnclaveHandle]:
    cfg = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0", dev=True, dev_plaintext_shares=shares.service, **config
    )
    async with trio.open_nursery() as nursery:
        handle: EnclaveHandle = await nursery.start(serve_dev_enclave, cfg)
        yield handle
        await handle.drain()


@asynccontextmanager
async def running(
    nodes: Sequence[EnclaveNode],
    stores: Sequence[ShareStore],
    settings: CoordinatorSettings | None = None,
    approver: GatewayApprover | None = None,
) -> AsyncIterator[Coordinator]:
    try:
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            yield Coordinator(
                nodes, stores, settings=settings or CoordinatorSettings(), approver=approver
            )
            nursery.cancel_scope.cancel()
    finally:
        for store in stores:
            store.close()


def verify(group_key: bytes, message: bytes, signature: bytes) -> None:
    assert len(signature) == 64
    nacl.signing.VerifyKey(group_key).verify(message, signature)


# -- the development enclave over TCP ---------------------------------------------------------


async def test_many_concurrent_signatures_through_a_dev_enclave(shares: Shares) -> None:
    keys = shares.group_keys()
    ids = sorted(keys)
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = EnclaveNode("enclave-0", handle.addresses[0])
        settings = CoordinatorSettings(max_concurrent_signatures=16)
        async with running([node], stores, settings) as coordinator:
            jobs = [(ids[i % len(ids)], b"transfer %d" % i) for i in range(64)]
            results: dict[int, bytes] = {}

            async def one(i: int, account_id: str, message: bytes) -> None:
                results[i] = await coordinator.sign_message(account_id, message)

            async with trio.open_nursery() as nursery:
                for i, (account_id, message) in enumerate(jobs):
                    nursery.start_soon(one, i, account_id, message)
            for i, (account_id, message) in enumerate(jobs):
                verify(keys[account_id], message, results[i])
            assert coordinator.signatures == 64
            assert coordinator.aborted_sessions == 0
            assert node.connects == 1  # one channel, kept open across calls
            assert handle.service.pool.open_sessions == 0


async def test_three_signers_with_two_counterparts(shares: Shares) -> None:
    keys = shares.group_keys()
    stores = load_participant_files([shares.participants[2], shares.participants[3]])
    async with (
        dev_enclave(shares) as handle,
        running([EnclaveNode("e", handle.addresses[0])], stores) as coordinator,
    ):
        account_id = next(iter(keys))
        verify(keys[account_id], b"m", await coordinator.sign_message(account_id, b"m"))


async def test_reconnects_after_the_channel_dies(shares: Shares) -> None:
    keys = shares.group_keys()
    account_id = next(iter(keys))
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = EnclaveNode("e", handle.addresses[0])
        async with running([node], stores) as coordinator:
            await coordinator.sign_message(account_id, b"one")
            await node.aclose()  # as if the connection had dropped
            verify(keys[account_id], b"two", await coordinator.sign_message(account_id, b"two"))
            assert node.connects == 2


async def test_unknown_account_and_no_node(shares: Shares, tmp_path: Path) -> None:
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = EnclaveNode("e", handle.addresses[0])
        nowhere = EnclaveNode("gone", f"unix://{tmp_path}/nobody.sock")
        async with running([node, nowhere], stores) as coordinator:
            with pytest.raises(GatewayError) as info:
                await coordinator.sign_message("no-such-account", b"m")
            assert info.value.reason == "unknown_account"

            account_id = shares.account_ids()[0]
            node.evicted = True
            with pytest.raises(GatewayError) as info:
                await coordinator.sign_message(account_id, b"m")
            assert info.value.reason == "no_healthy_node"
            assert info.value.status == StatusCode.UNAVAILABLE
            assert info.value.node_id == "gone"
            nowhere.evicted = True
            with pytest.raises(GatewayError) as info:
                await coordinator.sign_message(account_id, b"m")
            assert info.value.reason == "no_healthy_node"
            assert info.value.status is None

            # an unreachable node is skipped for a live one
            node.evicted = nowhere.evicted = False
            nowhere.in_flight = -1  # preferred by load, so it is tried first
            await coordinator.sign_message(account_id, b"m")
            assert coordinator.signatures == 1


async def test_participant_file_problems(shares: Shares, tmp_path: Path) -> None:
    account_id = shares.account_ids()[0]
    other = generate_share_files(tmp_path / "other", 1)
    strict = generate_share_files(tmp_path / "3of3", 1, min_signers=3, max_signers=3)
    idle = [EnclaveNode("e", f"unix://{tmp_path}/unused.sock")]  # never contacted
    cases = [
        ([shares.participants[2], other.participant_files[3]], "key_mismatch"),
        ([shares.participants[2], shares.participants[2]], "key_mismatch"),
        ([strict.participant_files[2]], "too_few_signers"),
    ]
    for files, reason in cases:
        async with running(idle, load_participant_files(files)) as coordinator:
            with pytest.raises(GatewayError) as info:
                await coordinator.sign_message(account_id, b"m")
            assert info.value.reason == reason, files
    with pytest.raises(ValueError, match="at least one"):
        Coordinator([], [])


async def test_enclave_refusals_and_unknown_accounts(shares: Shares, tmp_path: Path) -> None:
    more = generate_share_files(tmp_path / "more", N_ACCOUNTS + 1)  # one account the enclave lacks
    missing = f"acct-{N_ACCOUNTS:08d}"
    async with dev_enclave(shares) as handle:
        node = FlakySign("e", handle.addresses[0], mode="")
        async with running([node], load_participant_files([more.participant_files[2]])) as c:
            with pytest.raises(GatewayError) as info:
                await c.sign_message(missing, b"m")
            assert info.value.reason == "unknown_account"
            assert info.value.status == StatusCode.NOT_FOUND
        node = FlakySign("e", handle.addresses[0], mode="frozen")
        async with running([node], load_participant_files([shares.participants[2]])) as c:
            with pytest.raises(GatewayError) as info:
                await c.sign_message(shares.account_ids()[0], b"m")
            assert info.value.reason == "enclave_refused"
            assert info.value.status == StatusCode.FAILED_PRECONDITION
            assert "account is frozen" in str(info.value)
        assert handle.service.pool.open_sessions == 0


async def test_account_cache_is_bounded(shares: Shares) -> None:
    keys = shares.group_keys()
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = EnclaveNode("e", handle.addresses[0])
        settings = CoordinatorSettings(account_cache_size=2)
        async with running([node], stores, settings) as coordinator:
            for account_id in sorted(keys):
                signature = await coordinator.sign_message(account_id, b"m")
                verify(keys[account_id], b"m", signature)
            assert coordinator.cached_accounts == 2


# -- faults around Sign: abort, retry, a corrupted share ---------------------------------------


class FlakySign(EnclaveNode):
    """Fails Sign in a chosen way; everything else is the real call."""

    def __init__(self, *args: Any, mode: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.mode = mode
        self.sign_calls = 0
        self.sessions: list[str] = []
        self.hung = trio.Event()
        self.merkle_roots: list[bytes | None] = []

    async def sign(
        self,
        session_id: str,
        message: bytes,
        commitments: Sequence[Commitment],
        approvals: Sequence[pb.Approval] = (),
        *,
        taproot_merkle_root: bytes | None = None,
    ) -> pb.SignResponse:
        self.sign_calls += 1
        self.merkle_roots.append(taproot_merkle_root)
        self.sessions.append(session_id)
        if self.mode == "bad_point":
            bad = [
                c
                if c.identifier == commitments[0].identifier
                else SigningCommitment(c.identifier, b"\xff" * 32, c.binding)
                for c in commitments
            ]
            return await super().sign(
                session_id, message, bad, approvals, taproot_merkle_root=taproot_merkle_root
            )
        if self.mode == "always_unavailable":
            raise RpcError(StatusCode.UNAVAILABLE, "connection reset")
        if self.mode == "hang":
            self.hung.set()
            await trio.sleep_forever()
        if self.mode == "lost_reply" and self.sign_calls == 1:
            # consumed, reply "lost"
            await super().sign(
                session_id, message, commitments, approvals, taproot_merkle_root=taproot_merkle_root
            )
            raise RpcError(StatusCode.UNAVAILABLE, "connection reset")
        if self.mode == "not_sent" and self.sign_calls == 1:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded (client side)")
        reply = await super().sign(
            session_id, message, commitments, approvals, taproot_merkle_root=taproot_merkle_root
        )
        if self.mode == "flip":
            share = bytearray(reply.signature_share)
            share[0] ^= 1
            return pb.SignResponse(identifier=reply.identifier, signature_share=bytes(share))
        return reply

    async def commit(self, account_id: str, session_id: str) -> pb.CommitResponse:
        if self.mode == "frozen":
            raise RpcError(StatusCode.FAILED_PRECONDITION, "account is frozen")
        reply = await super().commit(account_id, session_id)
        if self.mode == "bad_commitment":
            reply.hiding = b"\xff" * 32  # not a valid point encoding
        return reply


async def test_sign_refused_after_commit_aborts_the_session(shares: Shares) -> None:
    account_id = shares.account_ids()[0]
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = FlakySign("e", handle.addresses[0], mode="bad_point")
        async with running([node], stores) as coordinator:
            with pytest.raises(GatewayError) as info:
                await coordinator.sign_message(account_id, b"m")
            assert info.value.reason == "enclave_refused"
            assert info.value.status == StatusCode.INVALID_ARGUMENT
            assert node.sign_calls == 1  # not retried: a new session would not help
            assert coordinator.aborted_sessions == 1
            pool = handle.service.pool
            assert pool.open_sessions == 0
            assert pool.tracked_sessions == 0


async def test_cancelled_signature_aborts_the_session(shares: Shares) -> None:
    account_id = shares.account_ids()[0]
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = FlakySign("e", handle.addresses[0], mode="hang")
        async with running([node], stores) as coordinator:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(coordinator.sign_message, account_id, b"m")
                with trio.fail_after(5):
                    await node.hung.wait()
                assert handle.service.pool.open_sessions == 1  # the slot is held
                nursery.cancel_scope.cancel()
            assert handle.service.pool.open_sessions == 0
            assert coordinator.limiter.borrowed_tokens == 0


async def test_unavailable_sign_gets_new_sessions_then_gives_up(shares: Shares) -> None:
    account_id = shares.account_ids()[0]
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = FlakySign("e", handle.addresses[0], mode="always_unavailable")
        async with running([node], stores) as coordinator:
            with pytest.raises(GatewayError) as info:
                await coordinator.sign_message(account_id, b"m")
            assert info.value.reason == "no_healthy_node"
            assert info.value.status == StatusCode.UNAVAILABLE
            settings = coordinator.settings
            sessions = settings.max_sessions_per_signature
            assert len(set(node.sessions)) == sessions
            assert node.sign_calls == sessions * (settings.sign_retries + 1)
            assert coordinator.aborted_sessions == sessions
            assert handle.service.pool.open_sessions == 0


async def test_bad_enclave_commitment_is_named_and_aborted(shares: Shares) -> None:
    account_id = shares.account_ids()[3]
    with shares.service.open("rb") as f:
        enclave_id = next(r.identifier for r in read_plaintext(f) if r.account_id == account_id)
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = FlakySign("e", handle.addresses[0], mode="bad_commitment")
        async with running([node], stores) as coordinator:
            with pytest.raises(GatewayError) as info:
                await coordinator.sign_message(account_id, b"m")
            assert info.value.reason == "bad_share"
            assert info.value.identifier == enclave_id
            assert node.sign_calls == 0  # refused before round two
            assert handle.service.pool.open_sessions == 0


@pytest.mark.parametrize("mode", ["lost_reply", "not_sent"])
async def test_sign_is_retried_byte_identically_on_the_same_session(
    shares: Shares, mode: str
) -> None:
    keys = shares.group_keys()
    account_id = shares.account_ids()[1]
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = FlakySign("e", handle.addresses[0], mode=mode)
        async with running([node], stores) as coordinator:
            signature = await coordinator.sign_message(account_id, b"retry me")
            verify(keys[account_id], b"retry me", signature)
            assert node.sign_calls == 2
            assert len(set(node.sessions)) == 1
            assert coordinator.aborted_sessions == 0


async def test_corrupted_enclave_share_is_named(shares: Shares) -> None:
    account_id = shares.account_ids()[2]
    with shares.service.open("rb") as f:
        enclave_id = next(r.identifier for r in read_plaintext(f) if r.account_id == account_id)
    stores = load_participant_files([shares.participants[2]])
    async with dev_enclave(shares) as handle:
        node = FlakySign("enclave-7", handle.addresses[0], mode="flip")
        async with running([node], stores) as coordinator:
            with pytest.raises(GatewayError) as info:
                await coordinator.sign_message(account_id, b"m")
    assert info.value.reason == "bad_share"
    assert info.value.identifier == enclave_id
    assert info.value.node_id == "enclave-7"
    assert enclave_id.hex() in str(info.value)
    assert "enclave node enclave-7" in str(info.value)
    assert handle.service.pool.open_sessions == 0


async def test_key_mismatch_between_enclave_and_participant_file(
    shares: Shares, tmp_path: Path
) -> None:
    other = generate_share_files(tmp_path / "other", N_ACCOUNTS)  # same ids, other keys
    stores = load_participant_files([other.participant_files[2]])
    async with (
        dev_enclave(shares) as handle,
        running([EnclaveNode("e", handle.addresses[0])], stores) as coordinator,
    ):
        with pytest.raises(GatewayError) as info:
            await coordinator.sign_message(shares.account_ids()[0], b"m")
        assert info.value.reason == "key_mismatch"
        assert handle.service.pool.open_sessions == 0


# -- the production enclave behind the real ingress (a byte pipe) --------------------------------


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("parent.local"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("gateway test CA", ca_key, None, None)
    server = _cert(
        "parent.local", server_key, ("gateway test CA", ca_key), ExtendedKeyUsageOID.SERVER_AUTH
    )
    client = _cert(
        "sign-gateway", client_key, ("gateway test CA", ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    pem = serialization.Encoding.PEM
    return Pki(
        ca.public_bytes(pem),
        server.public_bytes(pem),
        _key_pem(server_key),
        client.public_bytes(pem),
        _key_pem(client_key),
    )


def _records(shares: Shares) -> list[ShareRecord]:
    with shares.service.open("rb") as f:
        return list(read_plaintext(f))


class _Tee(trio.abc.Stream):
    """The ingress's stream to the enclave, recording what the pipe sends through it."""

    def __init__(self, inner: trio.abc.Stream, seen: bytearray) -> None:
        self._inner = inner
        self._seen = seen

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._seen += data
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_signs_through_the_byte_pipe_ingress_with_the_production_enclave(
    tmp_path: Path, shares: Shares, pki: Pki, nsm_dir: Path
) -> None:
    """The production enclave serves TLS itself (its per-boot certificate, client certificates
    from the gateway CA its measured configuration pins); the parent's ingress only pipes bytes
    to it once its gate verified the enclave over the public port. The gateway's node opens the
    attested channel through the pipe (the document binds the connection's key, the bundle,
    the configuration and the PCRs) and signs, with the approvals of the two approver keys it
    holds (the configuration's default policy is 2 of 3, DESIGN §11); what crossed the parent
    is ciphertext. A client without a certificate, and a node pinning another configuration,
    are sent nothing."""
    keys = shares.group_keys()
    nsm = LocalNsm.from_dir(nsm_dir)
    pcrs = {i: nsm.describe_pcr(i)[1] for i in (0, 1, 2)}
    approver_keys = {k: ApproverSigningKey.generate(t) for k, t in APPROVER_KEY_TYPES.items()}
    approver = GatewayApprover({k: approver_keys[k] for k in ("ops-1", "risk-1")})
    measured = parse_measured_config(
        b"[gateway]\nclient_ca_pem = '''\n"
        + pki.ca_pem
        + b"'''\n"
        + "".join(key.enclave_toml(k) for k, key in approver_keys.items()).encode()
        + b'[policies.default]\napprovers = ["ops-1", "ops-2", "risk-1"]\nthreshold = 2\n'
    )
    async with parent(tmp_path, _records(shares), nsm_dir) as fake, trio.open_nursery() as nursery:
        config = fake.config(
            measured=measured, tls=True, public_listen=f"unix://{fake.dir}/public.sock"
        )
        handle: EnclaveHandle = await nursery.start(
            functools.partial(serve_enclave, config, nsm=nsm)
        )
        enclave_url = str(handle.addresses[0])
        fingerprint = hashlib.sha256(fake.bundle.read_bytes()).digest()
        gate = AttestationGate(  # over the public port, as the parent does
            AttestationPolicy(root_pem=nsm.root_pem, pcrs=pcrs, shares_sha256=fingerprint.hex()),
            functools.partial(connect, handle.public_addresses[0]),
        )
        assert await gate.check()
        carried: list[bytearray] = []

        async def recording_connect() -> trio.abc.Stream:
            carried.append(bytearray())
            return _Tee(await connect(enclave_url), carried[-1])

        listeners = await nursery.start(
            functools.partial(
                serve_ingress,
                "tcp://127.0.0.1:0",
                enclave_url,
                gate,
                connect_enclave=recording_connect,
            )
        )
        ingress = f"tcp://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        policy = ChannelPolicy(
            shares_sha256=fingerprint,
            pcrs=pcrs,
            root_pem=nsm.root_pem,
            config_sha256=measured.sha256,
        )
        attested = make_attested_client_context(pki.client_cert_pem, pki.client_key_pem)
        node = EnclaveNode("enclave-0", ingress, ssl_context=attested, attestation=policy)
        # a client with no certificate: the enclave refuses it (TLS 1.3 reports the refusal on
        # the first read, so the attested channel fails as a connection failure)
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.verify_mode = ssl.CERT_NONE
        anonymous.minimum_version = ssl.TLSVersion.TLSv1_3
        anonymous.set_alpn_protocols(["h2"])
        no_cert = EnclaveNode(
            "no-cert",
            ingress,
            ssl_context=anonymous,
            attestation=policy,
            settings=NodeSettings(ping_timeout_s=5.0),
        )
        # a node pinning another enclave.toml: refused by the check (config_mismatch)
        other_config = ChannelPolicy(
            shares_sha256=fingerprint, pcrs=pcrs, root_pem=nsm.root_pem, config_sha256=bytes(32)
        )
        wrong = EnclaveNode(
            "wrong-config",
            ingress,
            ssl_context=attested,
            attestation=other_config,
            settings=NodeSettings(ping_timeout_s=5.0),
        )
        stores = load_participant_files([shares.participants[2]])
        async with running([node, no_cert, wrong], stores, approver=approver) as coordinator:
            with pytest.raises(RpcError) as refused:
                await no_cert.ping(b"x")
            assert refused.value.status == StatusCode.UNAVAILABLE
            assert no_cert.verified is None
            no_cert.evicted = True
            with pytest.raises(RpcError) as mismatch:
                await wrong.ping(b"x")
            assert mismatch.value.status == StatusCode.UNAVAILABLE
            assert wrong.attestation_failures == {"config_mismatch": 1}
            assert wrong.verified is None
            wrong.evicted = True

            assert (await node.ping(b"hello")).payload == b"hello"
            assert node.verified is not None
            assert node.verified.binding.config == measured.sha256
            assert node.verified.binding.shares == fingerprint
            assert handle.identity is not None
            assert node.verified.peer_spki_der == handle.identity.spki_der
            status = await node.get_status()
            assert status.state == "serving"
            assert status.accounts == N_ACCOUNTS
            ids = sorted(keys)
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = await coordinator.sign_message(ids[i % len(ids)], b"tx %d" % i)

            async with trio.open_nursery() as signing:
                for i in range(16):
                    signing.start_soon(one, i)
            for i in range(16):
                verify(keys[ids[i % len(ids)]], b"tx %d" % i, results[i])
            assert node.connects == 1
            assert node.attestations_verified == 1
            assert handle.service.pool.open_sessions == 0
            assert coordinator.approvals_sent == {"ops-1": 16, "risk-1": 16}
        approver.close()
        # the FROST sessions crossed the parent encrypted
        assert carried
        for seen in carried:
            assert b"tx 0" not in seen
            assert not any(account.encode() in seen for account in ids)
            assert b"GetAttestation" not in seen
        await handle.drain()
        nursery.cancel_scope.cancel()


async def test_connect_tls_refuses_a_server_without_h2(pki: Pki) -> None:
    """A TLS server that does not agree to h2 (say, an HTTPS endpoint) is not spoken to."""
    server_context = make_server_ssl_context(pki.server_cert_pem, pki.server_key_pem, pki.ca_pem)
    server_context.set_alpn_protocols(["http/1.1"])

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        try:
            await tls.do_handshake()
            await tls.receive_some(1)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(tls)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        url = f"tcp://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        context = make_client_ssl_context(pki.ca_pem, pki.client_cert_pem, pki.client_key_pem)
        with pytest.raises(TransportError, match="ALPN h2"):
            await connect_tls(url, context, server_hostname="parent.local")
        nursery.cancel_scope.cancel()


def test_client_context_settings(pki: Pki) -> None:
    context = make_client_ssl_context(pki.ca_pem, pki.client_cert_pem, pki.client_key_pem)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    with pytest.raises(ssl.SSLError):
        make_client_ssl_context(pki.ca_pem, pki.client_cert_pem, pki.server_key_pem)


def test_public_api() -> None:
    for name in gateway.__all__:
        assert hasattr(gateway, name), name
