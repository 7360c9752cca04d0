"""Issue 14: Sign is authorized inside the enclave. Refusals are PERMISSION_DENIED naming what
is missing and leave the session's nonces alone (a correct retry still signs); every decision
is an audit record and a metric; the per-account rate limit; policies checked at preload."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from nacl.signing import SigningKey

from proto_min import sign_service_pb2 as pb
from trio_sign.authz import Authorizer, approval_payload
from trio_sign.crypto import SigningCommitment
from trio_sign.enclave import (
    EnclaveConfig,
    EnclaveExit,
    ExitCode,
    SessionPool,
    SignService,
    parse_measured_config,
    serve_dev_enclave,
)
from trio_sign.enclave._serve import check_account_policies
from trio_sign.rpc import CallContext, RpcError, StatusCode, open_grpc_channel
from trio_sign.shares import ShareStore, write_plaintext
from trio_sign.transport import connect

from .enclave_helpers import Account, Peer, make_accounts, sorted_commitments

S = "/trio_sign.v1.SignService/"
CTX = CallContext(method=S + "Sign", metadata=(), authority="test", deadline=math.inf)


class Approvers:
    """Two Ed25519 approvers (PyNaCl) and one P-256 (cryptography), and the enclave.toml
    lines that pin them under a 2-of-3 ``default`` policy."""

    def __init__(self) -> None:
        self.ed = {"ops-1": SigningKey.generate(), "ops-2": SigningKey.generate()}
        self.p256 = ec.generate_private_key(ec.SECP256R1())

    def toml(self, *, rate: int | None = None, threshold: int = 2) -> bytes:
        p256 = self.p256.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        lines = [
            f'[approvers.{k}]\ntype = "ed25519"\npublic_key = "{v.verify_key.encode().hex()}"\n'
            for k, v in self.ed.items()
        ]
        lines.append(f'[approvers.risk-1]\ntype = "p256"\npublic_key = "{p256.hex()}"\n')
        lines.append(
            '[policies.default]\napprovers = ["ops-1", "ops-2", "risk-1"]\n'
            f"threshold = {threshold}\n" + ("" if rate is None else f"rate_per_minute = {rate}\n")
        )
        return "\n".join(lines).encode()

    def approve(
        self, key_id: str, account: str, session: str, message: bytes, *, ttl_ms: int = 60_000
    ) -> pb.Approval:
        expires = int(time.time() * 1000) + ttl_ms
        payload = approval_payload(account, session, message, expires)
        if key_id == "risk-1":
            r, s = decode_dss_signature(self.p256.sign(payload, ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            signature = self.ed[key_id].sign(payload).signature
        return pb.Approval(key_id=key_id, signature=signature, expires_at_unix_ms=expires)


def _service(store: ShareStore, approvers: Approvers, **policy: Any) -> SignService:
    measured = parse_measured_config(approvers.toml(**policy), source="test enclave.toml")
    pool = SessionPool(store.get, session_ttl_s=600)
    return SignService(store, pool, authorizer=Authorizer(measured.policies))


async def _commit(service: SignService, acct: Account, session: str) -> tuple[Peer, list[Any]]:
    response = await service.commit(
        pb.CommitRequest(account_id=acct.account_id, session_id=session), CTX
    )
    peer = Peer(acct)
    ours = SigningCommitment(response.identifier, response.hiding, response.binding)
    return peer, sorted_commitments(ours, peer.commitment)


def _request(session: str, message: bytes, cs: list[Any], approvals: list[Any]) -> bytes:
    return pb.SignRequest(
        session_id=session,
        message=message,
        commitments=[
            pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding)
            for c in cs
        ],
        approvals=approvals,
    ).SerializeToString()


async def _sign(service: SignService, data: bytes) -> pb.SignResponse:
    return pb.SignResponse.FromString(await service.handlers()[S + "Sign"](data, CTX))


async def _refused(service: SignService, data: bytes) -> str:
    with pytest.raises(RpcError) as info:
        await _sign(service, data)
    assert info.value.status == StatusCode.PERMISSION_DENIED, info.value
    return info.value.details


async def test_refusals_keep_the_nonces_and_a_correct_retry_signs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, accounts = make_accounts(2)
    approvers = Approvers()
    service = _service(store, approvers)
    acct, other = accounts["acct-0"], accounts["acct-1"]
    msg = b"pay 5 to bob"
    peer, cs = await _commit(service, acct, "s1")
    a, s = acct.account_id, "s1"
    caplog.set_level(logging.INFO, logger="trio_sign.audit")

    details = await _refused(service, _request(s, msg, cs, []))
    assert details.startswith("not authorized (no_approvals)")
    assert "policy 'default' needs 2 of [ops-1, ops-2, risk-1]" in details
    one = approvers.approve("ops-1", a, s, msg)
    assert "(too_few_approvals)" in await _refused(service, _request(s, msg, cs, [one]))
    # the same approver twice is not two approvers
    assert "(duplicate_approver)" in await _refused(service, _request(s, msg, cs, [one, one]))
    # approvals for another account, another session, another message
    for bad in (
        approvers.approve("risk-1", other.account_id, s, msg),
        approvers.approve("risk-1", a, "s2", msg),
        approvers.approve("risk-1", a, s, b"pay 500 to mallory"),
    ):
        details = await _refused(service, _request(s, msg, cs, [one, bad]))
        assert details.startswith("not authorized (bad_signature)")
        assert "'risk-1'" in details
    expired = approvers.approve("ops-2", a, s, msg, ttl_ms=-31_000)
    assert "(expired)" in await _refused(service, _request(s, msg, cs, [one, expired]))
    later = approvers.approve("ops-2", a, s, msg, ttl_ms=700_000)
    assert "(future_dated)" in await _refused(service, _request(s, msg, cs, [one, later]))
    # nothing was consumed: the session still holds its slot and its nonces
    assert service.pool.open_sessions == 1
    assert service.pool.stats.signed == 0

    good = [one, approvers.approve("risk-1", a, s, msg)]
    signed = await _sign(service, _request(s, msg, cs, good))
    peer.complete_and_verify(msg, cs, signed.identifier, signed.signature_share)
    assert service.pool.stats.signed == 1
    assert service.pool.open_sessions == 0
    # a byte-identical retry of the signed request gets the same share
    again = await _sign(service, _request(s, msg, cs, good))
    assert again.signature_share == signed.signature_share

    records = [r for r in caplog.records if r.name == "trio_sign.audit"]
    assert len(records) == 9  # one per decision (the retry of a signed request is none)
    last = records[-1]
    assert last.__dict__["audit"] == "sign"
    assert last.__dict__["outcome"] == "allowed"
    assert last.__dict__["account_id"] == a
    assert last.__dict__["session_id"] == s
    assert last.__dict__["approvers"] == "ops-1,risk-1"
    assert last.__dict__["policy"] == "default"
    assert last.__dict__["message_sha256"] == hashlib.sha256(msg).hexdigest()
    assert records[0].__dict__["reason"] == "no_approvals"
    assert records[0].__dict__["outcome"] == "refused"
    # never key material: not the share, not a signature
    text = caplog.text + "".join(str(r.__dict__) for r in records)
    assert acct.service.signing_share.hex() not in text
    assert one.signature.hex() not in text

    rendered = service.metrics.render()
    assert 'trio_sign_authorizations_total{policy="default",outcome="allowed"} 1' in rendered
    assert 'trio_sign_authorizations_total{policy="default",outcome="bad_signature"} 3' in rendered
    assert 'trio_sign_signatures_total{outcome="refused",code="PERMISSION_DENIED"} 8' in rendered


async def test_rate_limit_per_account(autojump_clock: trio.testing.MockClock) -> None:
    store, accounts = make_accounts(2)
    approvers = Approvers()
    service = _service(store, approvers, rate=2, threshold=1)
    acct = accounts["acct-0"]
    msg = b"m"
    for session in ("r1", "r2"):
        peer, cs = await _commit(service, acct, session)
        ok = [approvers.approve("ops-1", acct.account_id, session, msg)]
        signed = await _sign(service, _request(session, msg, cs, ok))
        peer.complete_and_verify(msg, cs, signed.identifier, signed.signature_share)
    peer, cs = await _commit(service, acct, "r3")
    ok = [approvers.approve("ops-1", acct.account_id, "r3", msg)]
    details = await _refused(service, _request("r3", msg, cs, ok))
    assert details.startswith("not authorized (rate_limited)")
    assert "2 per minute" in details
    # another account has its own budget
    other = accounts["acct-1"]
    _peer2, cs2 = await _commit(service, other, "o1")
    ok2 = [approvers.approve("ops-1", other.account_id, "o1", msg)]
    await _sign(service, _request("o1", msg, cs2, ok2))
    # 30 s later (one interval) the refused session, still open, signs
    await trio.sleep(30)
    signed = await _sign(service, _request("r3", msg, cs, ok))
    peer.complete_and_verify(msg, cs, signed.identifier, signed.signature_share)
    assert 'outcome="rate_limited"} 1' in service.metrics.render()


def _plaintext(tmp_path: Path, accounts: dict[str, Account], policy: str | None = None) -> Path:
    path = tmp_path / "shares.json"
    records = [a.service for a in accounts.values()]
    if policy is not None:
        records = [dataclasses.replace(r, policy=policy) for r in records]
    with path.open("wb") as f:
        write_plaintext(f, records)
    return path


async def test_dev_enclave_over_grpc_with_a_measured_policy(tmp_path: Path) -> None:
    store, accounts = make_accounts(1)
    store.close()
    approvers = Approvers()
    config = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0",
        dev=True,
        dev_plaintext_shares=_plaintext(tmp_path, accounts, policy="treasury"),
        measured=parse_measured_config(approvers.toml().replace(b"default]", b"treasury]")),
        drain_grace_s=1.0,
    )
    acct = accounts["acct-0"]
    msg = b"over the wire"
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve_dev_enclave, config)
        async with open_grpc_channel(await connect(handle.addresses[0])) as ch:
            committed = pb.CommitResponse.FromString(
                await ch.unary_unary(
                    S + "Commit",
                    pb.CommitRequest(
                        account_id=acct.account_id, session_id="g"
                    ).SerializeToString(),
                )
            )
            peer = Peer(acct)
            cs = sorted_commitments(
                SigningCommitment(committed.identifier, committed.hiding, committed.binding),
                peer.commitment,
            )
            with pytest.raises(RpcError) as info:
                await ch.unary_unary(S + "Sign", _request("g", msg, cs, []))
            assert info.value.status == StatusCode.PERMISSION_DENIED
            assert "policy 'treasury' needs 2" in info.value.details
            good = [
                approvers.approve("ops-2", acct.account_id, "g", msg),
                approvers.approve("risk-1", acct.account_id, "g", msg),
            ]
            signed = pb.SignResponse.FromString(
                await ch.unary_unary(S + "Sign", _request("g", msg, cs, good))
            )
            peer.complete_and_verify(msg, cs, signed.identifier, signed.signature_share)
        await handle.drain()


async def test_an_unknown_policy_is_refused_at_preload(tmp_path: Path) -> None:
    store, accounts = make_accounts(1)
    store.close()
    approvers = Approvers()
    config = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0",
        dev=True,
        dev_plaintext_shares=_plaintext(tmp_path, accounts, policy="vip"),
        measured=parse_measured_config(approvers.toml()),
    )
    with pytest.raises(EnclaveExit) as info:
        await serve_dev_enclave(config)
    assert info.value.code == ExitCode.PRELOAD_FAILED
    assert info.value.reason == "unknown_policy"
    assert "vip" in str(info.value)
    assert "[policies.vip]" in str(info.value)


def test_outside_dev_there_is_no_default_policy() -> None:
    store, _ = make_accounts(1)
    no_policies = EnclaveConfig(measured=parse_measured_config(b"[limits]\nmax_sessions = 5\n"))
    with pytest.raises(EnclaveExit) as info:
        check_account_policies(no_policies, store)
    assert info.value.reason == "unknown_policy"
    assert "default" in str(info.value)
    # 'create' authorizes account creation; it is never an account's signing policy
    toml = b"[policies.create]\napprovers = []\nthreshold = 0\n"
    create_only = EnclaveConfig(measured=parse_measured_config(toml))
    with pytest.raises(EnclaveExit):
        check_account_policies(create_only, store)


def test_an_open_policy_is_announced(caplog: pytest.LogCaptureFixture) -> None:
    store, _ = make_accounts(1)
    toml = b"[policies.default]\napprovers = []\nthreshold = 0\n"
    config = EnclaveConfig(measured=parse_measured_config(toml))
    with caplog.at_level(logging.WARNING, logger="trio_sign.enclave"):
        check_account_policies(config, store)
    assert "NO AUTHORIZATION" in caplog.text
    assert "default" in caplog.text


async def test_dev_without_config_signs_without_approvals_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, accounts = make_accounts(1)
    store.close()
    config = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0",
        dev=True,
        dev_plaintext_shares=_plaintext(tmp_path, accounts),
        drain_grace_s=1.0,
    )
    acct = accounts["acct-0"]
    with caplog.at_level(logging.WARNING, logger="trio_sign.enclave"):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve_dev_enclave, config)
            service = handle.service
            peer, cs = await _commit(service, acct, "d")
            signed = await _sign(service, _request("d", b"x", cs, []))
            peer.complete_and_verify(b"x", cs, signed.identifier, signed.signature_share)
            await handle.drain()
    assert "NO AUTHORIZATION" in caplog.text
