"""The gateway's approvals (issue 14, deliverable 5): approver key files, the automatic approver,
approvals on every ``Sign``, the caller's approvals passed through ``POST /v1/sign``, and the
``[approvers]`` section of gateway.toml.

The enclave here is a development enclave behind a test double of its check: an `EnclaveNode`
subclass that decides every ``Sign`` with ``trio_sign.authz.Authorizer`` under a 2-of-3 policy
(as the enclave's SignService does) and answers PERMISSION_DENIED with the reason before the
real ``Sign`` is sent; the pool is checked afterwards.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from proto_min import sign_service_pb2 as pb
from trio_sign.authz import Authorizer, approval_payload, parse_policies
from trio_sign.crypto._schemes import Commitment
from trio_sign.enclave import (
    EnclaveConfig,
    EnclaveHandle,
    parse_measured_config,
    serve_dev_enclave,
)
from trio_sign.gateway import (
    Approval,
    ApproverKeyFileError,
    ApproverSigningKey,
    Coordinator,
    EnclaveNode,
    EventHub,
    GatewayApi,
    GatewayApprover,
    GatewayConfigError,
    GatewayError,
    load_participant_files,
    parse_gateway_config,
    serve_gateway,
)
from trio_sign.rpc import RpcError, StatusCode
from trio_sign.shares import read_plaintext
from trio_sign.testing import generate_share_files
from trio_sign.transport import serve_asgi

from .test_gateway_service import API_TOKEN, gateway_toml, request

KEY_IDS = ("ops-1", "ops-2", "risk-1")
NOW_MS = 1_900_000_000_000


# -- key files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_a_key_file_round_trips_and_its_approvals_verify_in_the_enclaves_terms(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "ops-1.key"
    with ApproverSigningKey.generate(kind) as key:
        key.save(path, key_id="ops-1")
        public = key.public_key
    assert os.stat(path).st_mode & 0o777 == 0o600
    with ApproverSigningKey.load(path) as loaded:
        assert loaded.public_key == public
        assert loaded.type == kind
        assert "private" not in repr(loaded)
        assert json.loads(path.read_text())["private_key"] not in repr(loaded)
        approval = loaded.approve(
            "ops-1", account_id="acct-1", session_id="s-1", message=b"m", expires_at_unix_ms=7
        )
        verifier = loaded.verifier("ops-1")
    assert len(approval.signature) == 64
    payload = approval_payload("acct-1", "s-1", b"m", 7)
    assert verifier.check_signature(approval.signature, payload) is None
    # bound to account, session, message and expiry
    for other in (
        approval_payload("acct-2", "s-1", b"m", 7),
        approval_payload("acct-1", "s-2", b"m", 7),
        approval_payload("acct-1", "s-1", b"n", 7),
        approval_payload("acct-1", "s-1", b"m", 8),
    ):
        assert verifier.check_signature(approval.signature, other) == "bad_signature"


def test_a_key_file_others_may_read_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ops-1.key"
    with ApproverSigningKey.generate() as key:
        key.save(path, key_id="ops-1")
    os.chmod(path, 0o644)
    with pytest.raises(ApproverKeyFileError, match=r"ops-1.key is mode 0644.*chmod 600") as info:
        ApproverSigningKey.load(path)
    assert json.loads(path.read_text())["private_key"] not in str(info.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda o: o.update(public_key="00" * 32), "does not match its private key"),
        (lambda o: o.update(type="rsa"), "type must be one of"),
        (lambda o: o.update(private_key="zz" * 32), "private_key is not hex"),
        (lambda o: o.update(format="trio-sign/ceremony-key"), "not a trio-sign/approver-key"),
        (lambda o: o.pop("public_key"), "not a trio-sign/approver-key"),
    ],
)
def test_a_bad_key_file_is_refused(tmp_path: Path, edit: Any, message: str) -> None:
    path = tmp_path / "k.key"
    with ApproverSigningKey.generate() as key:
        key.save(path, key_id="ops-1")
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    os.chmod(path, 0o600)
    with pytest.raises(ApproverKeyFileError, match=message):
        ApproverSigningKey.load(path)


def test_save_refuses_to_overwrite_and_close_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    key = ApproverSigningKey.generate()
    key.save(path, key_id="ops-1")
    with pytest.raises(ApproverKeyFileError, match="refusing to overwrite"):
        key.save(path, key_id="ops-1")
    secret = key._ed25519
    key.close()
    assert secret is not None
    assert not any(secret)
    with pytest.raises(ApproverKeyFileError, match="closed"):
        key.sign(b"x")


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_keys_are_shared_with_the_approver_command_both_ways(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key from `trio-sign approver keygen` loads in the gateway (under its key id), and
    `trio-sign approver approve` signs with a key the gateway wrote; each verifies."""
    from trio_sign.cli._main import main

    made = tmp_path / "risk-1.key"
    assert main(["approver", "keygen", "--type", kind, "--out", str(made)]) == 0
    capsys.readouterr()
    with ApproverSigningKey.load(made, key_id="risk-1") as key:
        approval = key.approve(
            "risk-1", account_id="a", session_id="s", message=b"m", expires_at_unix_ms=9
        )
        verifier = key.verifier("risk-1")
    assert verifier.check_signature(approval.signature, approval_payload("a", "s", b"m", 9)) is None
    with pytest.raises(ApproverKeyFileError, match="is the key of 'risk-1', not 'ops-1'"):
        ApproverSigningKey.load(made, key_id="ops-1")
    ours = tmp_path / "ops-1.key"
    with ApproverSigningKey.generate(kind) as key:
        key.save(ours, key_id="ops-1")
        verifier = key.verifier("ops-1")
    (tmp_path / "m.bin").write_bytes(b"pay 3")
    argv = ["approver", "approve", "--key", str(ours), "--account", "acct-1", "--session", "s-9"]
    argv += ["--message-file", str(tmp_path / "m.bin"), "--expires-in", "60s"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    # what `approve` prints is what POST /v1/sign takes (its extra fields checked or ignored)
    parsed = Approval.from_json(printed, account_id="acct-1", session_id="s-9")
    assert parsed.key_id == "ops-1"
    payload = approval_payload("acct-1", "s-9", b"pay 3", parsed.expires_at_unix_ms)
    assert verifier.check_signature(parsed.signature, payload) is None
    with pytest.raises(ValueError, match="names session_id 's-9', not this request's 's-8'"):
        Approval.from_json(printed, account_id="acct-1", session_id="s-8")


# -- the approver and the enclave's decision ---------------------------------------------------


def make_keys(types: Sequence[str] = ("ed25519", "ed25519", "p256")) -> dict[str, Any]:
    return {k: ApproverSigningKey.generate(t) for k, t in zip(KEY_IDS, types, strict=True)}


def authorizer_for(keys: dict[str, ApproverSigningKey], *, now_ms: int = NOW_MS) -> Authorizer:
    """The enclave's decision under ``[policies.default]``: 2 of the three keys."""
    approvers = {
        k: {"type": key.type, "public_key": key.public_key.hex()} for k, key in keys.items()
    }
    policies = parse_policies(approvers, {"default": {"approvers": list(keys), "threshold": 2}})
    return Authorizer(policies, wall_clock_ms=lambda: now_ms)


def test_the_gateways_two_keys_satisfy_a_two_of_three_policy() -> None:
    keys = make_keys()
    authorizer = authorizer_for(keys)
    both = GatewayApprover(
        {k: keys[k] for k in ("ops-1", "risk-1")}, lifetime_s=60, wall_clock_ms=lambda: NOW_MS
    )
    approvals = both.approve("acct-1", "s-1", b"pay 5")
    assert [a.key_id for a in approvals] == ["ops-1", "risk-1"]
    assert {a.expires_at_unix_ms for a in approvals} == {NOW_MS + 60_000}
    decision = authorizer.decide(
        account_id="acct-1",
        policy="default",
        session_id="s-1",
        message=b"pay 5",
        approvals=[a.to_proto() for a in approvals],
        now=0.0,
    )
    assert decision.allowed, decision.detail
    one = GatewayApprover({"ops-1": keys["ops-1"]}, wall_clock_ms=lambda: NOW_MS)
    decision = authorizer.decide(
        account_id="acct-1",
        policy="default",
        session_id="s-1",
        message=b"pay 5",
        approvals=[a.to_proto() for a in one.approve("acct-1", "s-1", b"pay 5")],
        now=0.0,
    )
    assert (decision.allowed, decision.reason) == (False, "too_few_approvals")
    # the gateway's lifetime is the expiry: past it (and the tolerance) the enclave refuses
    late = authorizer_for(keys, now_ms=NOW_MS + 60_000 + 31_000)
    decision = late.decide(
        account_id="acct-1",
        policy="default",
        session_id="s-1",
        message=b"pay 5",
        approvals=[a.to_proto() for a in approvals],
        now=0.0,
    )
    assert decision.reason == "expired"


def test_the_approver_skips_keys_the_caller_brought_and_accounts_it_does_not_cover() -> None:
    keys = make_keys()
    approver = GatewayApprover(
        {k: keys[k] for k in ("ops-1", "ops-2")}, accounts=["acct-1*", "vault-?"]
    )
    assert [a.key_id for a in approver.approve("acct-10", "s", b"m", skip={"ops-1"})] == ["ops-2"]
    assert approver.approve("other", "s", b"m") == []
    assert [a.key_id for a in approver.approve("vault-7", "s", b"m")] == ["ops-1", "ops-2"]
    assert approver.approvals_made == 3
    assert "ops-1" in repr(approver)
    assert "private" not in repr(approver)
    approver.close()
    with pytest.raises(ApproverKeyFileError):
        approver.approve("acct-1", "s", b"m")


def test_approval_json_is_checked_field_by_field() -> None:
    good = Approval("ops-1", bytes(range(64)), NOW_MS)
    assert Approval.from_json(good.to_json()) == good
    for bad, message in (
        ({**good.to_json(), "extra": 1}, "an approval is"),
        ({**good.to_json(), "key_id": "bad id"}, "key_id"),
        ({**good.to_json(), "signature_hex": "00" * 63}, "128 hex digits"),
        ({**good.to_json(), "signature_hex": "zz" * 64}, "not hex"),
        ({**good.to_json(), "expires_at_unix_ms": "1"}, "int64"),
        ({**good.to_json(), "expires_at_unix_ms": 2**63}, "int64"),
    ):
        with pytest.raises(ValueError, match=message):
            Approval.from_json(bad)


# -- the coordinator against a development enclave with the check in front ---------------------


class CheckingNode(EnclaveNode):
    """The enclave's approval check in front of a development enclave's ``Sign``: refused
    requests never reach it (so the session keeps its nonces, as in the enclave)."""

    authorizer: Authorizer
    refusals: list[str]
    accounts: dict[str, str]

    async def sign(
        self,
        session_id: str,
        message: bytes,
        commitments: Sequence[Commitment],
        approvals: Sequence[pb.Approval] = (),
        *,
        taproot_merkle_root: bytes | None = None,
    ) -> pb.SignResponse:
        decision = self.authorizer.decide(
            account_id=self.accounts[session_id],
            policy="default",
            session_id=session_id,
            message=message,
            approvals=approvals,
            now=trio.current_time(),
        )
        if not decision.allowed:
            self.refusals.append(decision.reason)
            raise RpcError(
                StatusCode.PERMISSION_DENIED,
                f"not authorized ({decision.reason}): {decision.detail}",
            )
        return await super().sign(
            session_id, message, commitments, approvals, taproot_merkle_root=taproot_merkle_root
        )

    async def commit(self, account_id: str, session_id: str) -> pb.CommitResponse:
        self.accounts[session_id] = account_id
        return await super().commit(account_id, session_id)


@pytest.fixture(scope="module")
def shares(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return generate_share_files(tmp_path_factory.mktemp("shares"), 3)


@asynccontextmanager
async def checked_enclave(
    shares: Any, keys: dict[str, ApproverSigningKey]
) -> AsyncIterator[tuple[EnclaveHandle, CheckingNode]]:
    cfg = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0", dev=True, dev_plaintext_shares=shares.service_file
    )
    async with trio.open_nursery() as nursery:
        handle: EnclaveHandle = await nursery.start(serve_dev_enclave, cfg)
        node = CheckingNode("node-1", handle.addresses[0])
        node.authorizer = authorizer_for(keys, now_ms=NOW_MS)
        node.refusals = []
        node.accounts = {}
        await nursery.start(node.run)
        yield handle, node
        nursery.cancel_scope.cancel()


def group_keys(shares: Any) -> dict[str, bytes]:
    with shares.service_file.open("rb") as f:
        return {r.account_id: r.group_public_key for r in read_plaintext(f)}


async def test_the_coordinator_attaches_the_gateways_approvals(shares: Any) -> None:
    keys = make_keys()
    account, key = next(iter(group_keys(shares).items()))
    stores = load_participant_files([shares.participant_files[2]])
    async with checked_enclave(shares, keys) as (handle, node):
        # two keys of the 2-of-3 policy: every Sign is approved
        approver = GatewayApprover(
            {k: keys[k] for k in ("ops-1", "risk-1")}, wall_clock_ms=lambda: NOW_MS
        )
        coordinator = Coordinator([node], stores, approver=approver)
        for i in range(3):
            message = f"pay {i}".encode()
            nacl.signing.VerifyKey(key).verify(
                message, await coordinator.sign_message(account, message)
            )
        assert coordinator.approvals_sent == {"ops-1": 3, "risk-1": 3}
        assert node.refusals == []
        # one key is too few: PERMISSION_DENIED is not_authorized, the session is aborted
        short = Coordinator(
            [node],
            stores,
            approver=GatewayApprover({"ops-2": keys["ops-2"]}, wall_clock_ms=lambda: NOW_MS),
        )
        with pytest.raises(GatewayError) as info:
            await short.sign_message(account, b"pay 9")
        assert info.value.reason == "not_authorized"
        assert info.value.status is StatusCode.PERMISSION_DENIED
        assert "too_few_approvals" in str(info.value)
        assert "needs 2 of" in str(info.value)
        assert short.aborted_sessions == 1
        assert node.refusals == ["too_few_approvals"]
        # none at all
        bare = Coordinator([node], stores)
        with pytest.raises(GatewayError, match="no_approvals"):
            await bare.sign_message(account, b"pay 9")
        assert handle.service.pool.open_sessions == 0
    for store in stores:
        store.close()


async def test_a_callers_approval_completes_the_gateways_for_its_session(shares: Any) -> None:
    keys = make_keys()
    account, key = next(iter(group_keys(shares).items()))
    stores = load_participant_files([shares.participant_files[2]])
    async with checked_enclave(shares, keys) as (handle, node):
        approver = GatewayApprover({"ops-1": keys["ops-1"]}, wall_clock_ms=lambda: NOW_MS)
        coordinator = Coordinator([node], stores, approver=approver)
        session = "caller-chosen-" + secrets.token_hex(4)
        # an outside approver (P-256 here) approved this session, message and expiry
        outside = keys["risk-1"].approve(
            "risk-1",
            account_id=account,
            session_id=session,
            message=b"pay 7",
            expires_at_unix_ms=NOW_MS + 30_000,
        )
        signature = await coordinator.sign_message(
            account, b"pay 7", approvals=[outside], session_id=session
        )
        nacl.signing.VerifyKey(key).verify(b"pay 7", signature)
        assert coordinator.approvals_sent == {"risk-1": 1, "ops-1": 1}
        # the gateway does not add a second approval by a key the caller brought
        mine = keys["ops-1"].approve(
            "ops-1",
            account_id=account,
            session_id=session + "-2",
            message=b"pay 8",
            expires_at_unix_ms=NOW_MS + 30_000,
        )
        with pytest.raises(GatewayError, match="too_few_approvals"):
            await coordinator.sign_message(
                account, b"pay 8", approvals=[mine], session_id=session + "-2"
            )
        # an approval of another session does not transfer
        with pytest.raises(GatewayError, match="bad_signature"):
            await coordinator.sign_message(
                account, b"pay 7", approvals=[outside], session_id=session + "-3"
            )
        with pytest.raises(ValueError, match="session_id"):
            await coordinator.sign_message(account, b"pay 7", approvals=[outside])
        assert handle.service.pool.open_sessions == 0
    for store in stores:
        store.close()


async def test_the_sign_api_passes_the_callers_approvals_through(
    shares: Any, tmp_path: Path
) -> None:
    keys = make_keys()
    account, key = next(iter(group_keys(shares).items()))
    stores = load_participant_files([shares.participant_files[2]])
    async with checked_enclave(shares, keys) as (_handle, node), trio.open_nursery() as nursery:
        approver = GatewayApprover({"ops-1": keys["ops-1"]}, wall_clock_ms=lambda: NOW_MS)
        coordinator = Coordinator([node], stores, approver=approver)
        app = GatewayApi(coordinator, [node], EventHub(), api_token=API_TOKEN)
        urls = await nursery.start(
            functools.partial(serve_asgi, app, "tcp://127.0.0.1:0", logger=logging.getLogger())
        )
        api = urls[0]
        outside = keys["ops-2"].approve(
            "ops-2",
            account_id=account,
            session_id="s-api",
            message=b"pay 1",
            expires_at_unix_ms=NOW_MS + 30_000,
        )
        body = {
            "account_id": account,
            "message_hex": b"pay 1".hex(),
            "session_id": "s-api",
            "approvals": [outside.to_json()],
        }
        status, answer = await request(api, "POST", "/v1/sign", body)
        assert status == 200, answer
        nacl.signing.VerifyKey(key).verify(b"pay 1", bytes.fromhex(answer["signature_hex"]))
        # without the caller's, the gateway's one key is too few: 403 with the reason
        status, answer = await request(
            api, "POST", "/v1/sign", {"account_id": account, "message_hex": "00"}
        )
        assert status == 403
        assert answer["reason"] == "not_authorized"
        assert "too_few_approvals" in answer["error"]
        for bad, message in (
            ({**body, "session_id": None, "approvals": [outside.to_json()]}, "session_id"),
            ({**body, "approvals": [outside.to_json(), outside.to_json()]}, "same key_id"),
            ({**body, "approvals": [{"key_id": "ops-2"}]}, "an approval is"),
            ({**body, "approvals": "x"}, "approvals must be a list"),
            ({**body, "session_id": "x" * 129}, "session_id must be"),
        ):
            if bad.get("session_id") is None:
                bad.pop("session_id")
            status, answer = await request(api, "POST", "/v1/sign", bad)
            assert (status, message in answer["error"]) == (400, True), answer
        nursery.cancel_scope.cancel()
    for store in stores:
        store.close()


# -- gateway.toml [approvers] ------------------------------------------------------------------


def test_approvers_section_parses(tmp_path: Path) -> None:
    text = gateway_toml(tmp_path / "p.json", "tcp://127.0.0.1:1") + (
        '[approvers]\nkeys = { ops-1 = "a/ops-1.key", "ops.2" = "/abs/ops-2.key" }\n'
        'lifetime_s = 30\naccounts = ["acct-*"]\n'
    )
    config = parse_gateway_config(text, base=tmp_path)
    assert config.approver_keys == {
        "ops-1": tmp_path / "a/ops-1.key",
        "ops.2": Path("/abs/ops-2.key"),
    }
    assert (config.approval_lifetime_s, config.approval_accounts) == (30.0, ("acct-*",))
    plain = parse_gateway_config(gateway_toml(tmp_path / "p.json", "tcp://127.0.0.1:1"))
    assert plain.approver_keys == {}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("[approvers]\nlifetime_s = 30\n", r"\[approvers\] keys must be a table"),
        ("[approvers]\nkeys = { ops-1 = 3 }\n", r"\[approvers\] keys must be a table"),
        ('[approvers]\nkeys = { "bad id" = "k" }\n', "is not a key id"),
        ('[approvers]\nkeys = { a = "k" }\nlifetime_s = 0\n', "lifetime_s must be a positive"),
        ('[approvers]\nkeys = { a = "k" }\naccounts = []\n', "accounts must be a non-empty"),
        ('[approvers]\nkeys = { a = "k" }\nlifetme_s = 1\n', "unknown key 'lifetme_s'"),
    ],
)
def test_approvers_config_errors(tmp_path: Path, section: str, message: str) -> None:
    text = gateway_toml(tmp_path / "p.json", "tcp://127.0.0.1:1") + section
    with pytest.raises(GatewayConfigError, match=message):
        parse_gateway_config(text)


async def test_the_gateway_refuses_a_readable_key_file_at_start(
    tmp_path: Path, shares: Any
) -> None:
    with ApproverSigningKey.generate() as key:
        key.save(tmp_path / "ops-1.key", key_id="ops-1")
    os.chmod(tmp_path / "ops-1.key", 0o640)
    text = gateway_toml(
        shares.participant_files[2], "tcp://127.0.0.1:1", api=f'token = "{API_TOKEN}"'
    ) + ('[approvers]\nkeys = { ops-1 = "ops-1.key" }\n')
    config = parse_gateway_config(text, base=tmp_path)
    with pytest.raises(GatewayConfigError, match=r"\[approvers\] keys: .*mode 0640"):
        await serve_gateway(config)


async def test_the_gateway_process_signs_under_an_enforcing_enclave(
    tmp_path: Path, shares: Any
) -> None:
    """`serve_gateway` with `[approvers]` against a development enclave whose measured
    configuration has a 2-of-3 default policy (the enclave's own check, no double): the
    gateway's two keys sign; with one key, a caller's approval completes it through the API;
    without it the API answers 403 not_authorized with the enclave's reason."""
    keys = make_keys()
    for key_id, key in keys.items():
        key.save(tmp_path / f"{key_id}.key", key_id=key_id)
    measured = parse_measured_config(
        "".join(key.enclave_toml(k) for k, key in keys.items()).encode()
        + b'[policies.default]\napprovers = ["ops-1", "ops-2", "risk-1"]\nthreshold = 2\n'
    )
    cfg = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0",
        dev=True,
        dev_plaintext_shares=shares.service_file,
        measured=measured,
    )
    account, key = next(iter(group_keys(shares).items()))
    async with trio.open_nursery() as nursery:
        enclave: EnclaveHandle = await nursery.start(serve_dev_enclave, cfg)
        for held, status_without_caller in (
            ('ops-1 = "ops-1.key", risk-1 = "risk-1.key"', 200),
            ('ops-1 = "ops-1.key"', 403),
        ):
            text = (
                gateway_toml(
                    shares.participant_files[2], enclave.addresses[0], api=f'token = "{API_TOKEN}"'
                )
                + f"[approvers]\nkeys = {{ {held} }}\nlifetime_s = 30\n"
            )
            config = parse_gateway_config(text, base=tmp_path)
            async with trio.open_nursery() as inner:
                gateway = await inner.start(serve_gateway, config)
                api = gateway.api_urls[0]
                body: dict[str, Any] = {"account_id": account, "message_hex": b"pay 4".hex()}
                status, answer = await request(api, "POST", "/v1/sign", body)
                assert status == status_without_caller, answer
                if status == 403:
                    assert answer["reason"] == "not_authorized"
                    assert "too_few_approvals" in answer["error"]
                    outside = keys["ops-2"].approve(
                        "ops-2",
                        account_id=account,
                        session_id="s-outside",
                        message=b"pay 4",
                        expires_at_unix_ms=time.time_ns() // 1_000_000 + 30_000,
                    )
                    body |= {"session_id": "s-outside", "approvals": [outside.to_json()]}
                    status, answer = await request(api, "POST", "/v1/sign", body)
                    assert status == 200, answer
                signature = bytes.fromhex(answer["signature_hex"])
                nacl.signing.VerifyKey(key).verify(b"pay 4", signature)
                inner.cancel_scope.cancel()
        assert enclave.service.pool.open_sessions == 0
        nursery.cancel_scope.cancel()
