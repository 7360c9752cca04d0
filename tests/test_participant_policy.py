"""The decision hook (AutoPolicy, CallbackPolicy) and the package's public API."""

from __future__ import annotations

import importlib
import logging

import pytest

from trio_sign.participant import AutoPolicy, CallbackPolicy, Decision
from trio_sign.participant import _messages as m


def req(account: str = "acct-1", message: bytes = b"m") -> m.SignRequest:
    return m.SignRequest("r", account, "s", "FROST-ED25519-SHA512-v1", message, 1)


async def test_auto_policy_accounts_and_size() -> None:
    policy = AutoPolicy(accounts=["acct-*", "vip"], max_message_bytes=4)
    assert (await policy.decide(req("acct-7"))).approve
    assert (await policy.decide(req("vip"))).approve
    no = await policy.decide(req("other"))
    assert (no.approve, no.reason) == (False, "policy")
    big = await policy.decide(req("acct-1", b"12345"))
    assert (big.approve, big.reason) == (False, "policy")
    assert "over 4 bytes" in big.detail
    assert "acct-*" in repr(policy)


def test_auto_policy_rate_per_account() -> None:
    now = [0.0]
    policy = AutoPolicy(rate_per_minute=2, clock=lambda: now[0])
    assert [policy.check(req("a")).approve for _ in range(3)] == [True, True, False]
    assert policy.check(req("b")).approve  # another account has its own bucket
    now[0] = 29.0
    assert not policy.check(req("a")).approve
    now[0] = 30.0  # one token back every 30 s
    assert policy.check(req("a")).approve
    assert policy.check(req("a")).detail == "rate limit for this account"
    with pytest.raises(ValueError, match="positive"):
        AutoPolicy(rate_per_minute=0)


def test_auto_policy_tracks_a_bounded_number_of_accounts() -> None:
    policy = AutoPolicy(rate_per_minute=1, clock=lambda: 0.0, max_tracked_accounts=10)
    for i in range(25):
        assert policy.check(req(f"acct-{i}")).approve
    assert len(policy._buckets) <= 10


async def test_callback_policy(caplog: pytest.LogCaptureFixture) -> None:
    async def yes(r: m.SignRequest) -> bool:
        return True

    async def no(r: m.SignRequest) -> bool:
        return False

    async def custom(r: m.SignRequest) -> Decision:
        return Decision(False, "policy", "after hours")

    async def broken(r: m.SignRequest) -> bool:
        raise RuntimeError("secret message text")

    assert (await CallbackPolicy(yes).decide(req())).approve
    assert (await CallbackPolicy(no).decide(req())).reason == "rejected"
    assert (await CallbackPolicy(custom).decide(req())).detail == "after hours"
    with caplog.at_level(logging.WARNING, logger="trio_sign.participant"):
        decision = await CallbackPolicy(broken).decide(req())
    assert (decision.approve, decision.reason) == (False, "internal")
    assert "RuntimeError" in caplog.text
    assert "secret message text" not in caplog.text


def test_decision_reasons_are_the_contract_s() -> None:
    with pytest.raises(ValueError, match="unknown decline reason"):
        Decision(False, "because")
    assert Decision(True, "anything").approve


def test_public_api() -> None:
    module = importlib.import_module("trio_sign.participant")
    exported = module.__all__
    assert len(exported) == len(set(exported))
    for name in exported:
        assert hasattr(module, name)
    public = {a for a in vars(module) if not a.startswith("_")}
    submodules = {a for a in public if type(getattr(module, a)).__name__ == "module"}
    assert public - submodules <= set(exported)
