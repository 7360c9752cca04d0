"""Issue 14: the approval payload, approver keys, policies and the decision (sans-io)."""

from __future__ import annotations

import hashlib
import importlib
import struct
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from trio_sign.authz import (
    APPROVAL_DOMAIN,
    DEVELOPMENT_POLICIES,
    AccountRateLimiter,
    ApproverKey,
    ApproverKeyError,
    Authorizer,
    PolicyConfigError,
    PolicySet,
    approval_payload,
    approval_payload_for_digest,
    parse_policies,
)
from trio_sign.authz._keys import P256_N
from trio_sign.crypto._sodium import L

NOW_MS = 1_800_000_000_000
ACCOUNT = "acct-1"
SESSION = "sess-1"
MESSAGE = b"transfer 1 BTC to bc1q..."


@dataclass(frozen=True)
class A:
    """An approval as the service receives it (the protobuf message has the same fields)."""

    key_id: str
    signature: bytes
    expires_at_unix_ms: int


def test_public_api() -> None:
    module = importlib.import_module("trio_sign.authz")
    for name in module.__all__:
        assert hasattr(module, name)
    public = {a for a in vars(module) if not a.startswith("_")}
    submodules = {a for a in public if type(getattr(module, a)).__name__ == "module"}
    assert public - submodules - {"annotations"} <= set(module.__all__)


# -- the payload ---------------------------------------------------------------------------


def _by_hand(a: bytes, s: bytes, message: bytes, expires: int) -> bytes:
    """DESIGN §11 written out again, independently of the encoder."""
    return (
        b"trio-sign/approval/v1\x00"
        + struct.pack(">H", len(a))
        + a
        + struct.pack(">H", len(s))
        + s
        + hashlib.sha256(message).digest()
        + struct.pack(">q", expires)
    )


@given(
    st.text(max_size=300),
    st.text(max_size=300),
    st.binary(max_size=2000),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_payload_matches_the_contract(account: str, session: str, message: bytes, exp: int) -> None:
    try:
        a, s = account.encode(), session.encode()
    except UnicodeEncodeError:  # lone surrogates: not UTF-8, refused
        with pytest.raises(ValueError, match="UTF-8"):
            approval_payload(account, session, message, exp)
        return
    payload = approval_payload(account, session, message, exp)
    assert payload == _by_hand(a, s, message, exp)
    assert payload.startswith(APPROVAL_DOMAIN + b"\x00")
    assert len(payload) == len(APPROVAL_DOMAIN) + 1 + 2 + len(a) + 2 + len(s) + 32 + 8


@given(st.integers(min_value=0, max_value=3), st.sampled_from(["a", "é", "😀"]))
def test_payload_id_length_boundaries(delta: int, char: str) -> None:
    """65535 UTF-8 bytes fit in the u16 length; 65536 do not (multi-byte characters count
    as their bytes, not their characters)."""
    width = len(char.encode())
    n = 65535 // width - delta
    text = char * n
    payload = approval_payload(text, "s", b"", 0)
    assert payload[22:24] == len(text.encode()).to_bytes(2, "big")
    over = char * (65535 // width + 1)
    with pytest.raises(ValueError, match="65535"):
        approval_payload(over, "s", b"", 0)
    with pytest.raises(ValueError, match="session_id"):
        approval_payload("a", over, b"", 0)


def test_payload_edges() -> None:
    assert approval_payload("", "", b"", 0) == _by_hand(b"", b"", b"", 0)
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="int64"):
            approval_payload("a", "s", b"", bad)
    with pytest.raises(ValueError, match="int64"):
        approval_payload("a", "s", b"", True)
    with pytest.raises(ValueError, match="32 bytes"):
        approval_payload_for_digest("a", "s", b"\x00" * 31, 0)
    # The digest form and the message form agree.
    digest = hashlib.sha256(b"m").digest()
    assert approval_payload_for_digest("a", "s", digest, -1) == approval_payload("a", "s", b"m", -1)


# -- keys: an independent implementation signs -------------------------------------------


class Ed:
    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        self.private = ed25519.Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.type = "ed25519"

    def sign(self, payload: bytes) -> bytes:
        return self.private.sign(payload)


class P256:
    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.public = self.private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.type = "p256"

    def sign(self, payload: bytes) -> bytes:
        r, s = decode_dss_signature(self.private.sign(payload, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


Signer = Ed | P256


def approve(
    signer: Signer,
    *,
    account: str = ACCOUNT,
    session: str = SESSION,
    message: bytes = MESSAGE,
    expires: int = NOW_MS + 60_000,
) -> A:
    # The bytes are built by hand here (not by approval_payload): a second implementation.
    payload = _by_hand(account.encode(), session.encode(), message, expires)
    return A(signer.key_id, signer.sign(payload), expires)


def policy_set(signers: list[Signer], threshold: int, **extra: object) -> PolicySet:
    approvers = {s.key_id: {"type": s.type, "public_key": s.public.hex()} for s in signers}
    table: dict[str, object] = {"approvers": [s.key_id for s in signers], "threshold": threshold}
    table.update(extra)
    return parse_policies(approvers, {"default": table})


@pytest.fixture
def signers() -> list[Signer]:
    return [Ed("ops-1"), P256("ops-2"), Ed("risk-1")]


def make(ps: PolicySet, **kwargs: object) -> Authorizer:
    return Authorizer(ps, wall_clock_ms=lambda: NOW_MS, rate_key=b"k" * 16, **kwargs)  # type: ignore[arg-type]


def decide(auth: Authorizer, approvals: list[A], *, now: float = 0.0, **kw: object) -> str:
    args: dict[str, object] = {
        "account_id": ACCOUNT,
        "policy": "default",
        "session_id": SESSION,
        "message": MESSAGE,
    }
    args.update(kw)
    decision = auth.decide(approvals=approvals, now=now, **args)  # type: ignore[arg-type]
    assert decision.allowed == (decision.reason == "allowed")
    return decision.reason


def test_independent_approvals_verify(signers: list[Signer]) -> None:
    auth = make(policy_set(signers, 2))
    assert decide(auth, [approve(signers[0]), approve(signers[1])]) == "allowed"
    assert decide(auth, [approve(signers[1]), approve(signers[2])]) == "allowed"
    assert decide(auth, [approve(s) for s in signers]) == "allowed"


def test_decision_records_what_the_audit_needs(signers: list[Signer]) -> None:
    auth = make(policy_set(signers, 1))
    d = auth.decide(
        account_id=ACCOUNT,
        policy="default",
        session_id=SESSION,
        message=MESSAGE,
        approvals=[approve(signers[1])],
        now=0.0,
    )
    assert d.allowed
    assert d.approvers == ("ops-2",)
    assert d.policy == "default"
    assert d.message_sha256 == hashlib.sha256(MESSAGE).hexdigest()


def test_refusals(signers: list[Signer]) -> None:
    ed, p, risk = signers
    auth = make(policy_set(signers, 2))
    good = approve(ed)
    assert decide(auth, []) == "no_approvals"
    assert decide(auth, [good]) == "too_few_approvals"
    # wrong key: signed by a key that is not the one its key id names
    impostor = Ed("ops-1")
    assert decide(auth, [approve(impostor), approve(p)]) == "bad_signature"
    # an approval for another account, another session, another message
    assert decide(auth, [approve(ed, account="acct-2"), approve(p)]) == "bad_signature"
    assert decide(auth, [approve(ed), approve(p, session="sess-2")]) == "bad_signature"
    assert decide(auth, [approve(ed, message=b"other"), approve(p)]) == "bad_signature"
    # a forged expiry on a genuine signature
    forged = approve(ed)
    assert decide(
        auth, [A("ops-1", forged.signature, forged.expires_at_unix_ms + 1), approve(p)]
    ) == ("bad_signature")
    # expired (beyond the 30 s tolerance) and future-dated (beyond 600 s + 30 s)
    assert decide(auth, [approve(ed, expires=NOW_MS - 30_001), approve(p)]) == "expired"
    assert decide(auth, [approve(ed, expires=NOW_MS - 30_000), approve(p)]) == "allowed"
    assert decide(auth, [approve(ed, expires=NOW_MS + 630_001), approve(p)]) == "future_dated"
    assert decide(auth, [approve(ed, expires=NOW_MS + 630_000), approve(p)]) == "allowed"
    # the same approver twice does not make two
    assert decide(auth, [good, good]) == "duplicate_approver"
    assert decide(auth, [good, approve(ed, expires=NOW_MS + 1)]) == "duplicate_approver"
    # a key id that is not an approver of the policy
    assert decide(auth, [good, A("nobody", bytes(64), NOW_MS)]) == "unknown_approver"
    assert decide(auth, [good, A("\x00evil\n", bytes(64), NOW_MS)]) == "unknown_approver"
    # more approvals than approvers: refused before any verification
    assert decide(auth, [good, approve(p), approve(risk), good]) == "too_many_approvals"
    assert decide(auth, [good, approve(p)], message=bytes(70_000)) == "message_too_large"
    assert decide(auth, [good, approve(p)], policy="other") == "unknown_policy"


def test_malformed_signatures(signers: list[Signer]) -> None:
    ed, p, _risk = signers
    auth = make(policy_set(signers, 2))
    good_ed, good_p = approve(ed), approve(p)
    # Ed25519: S + L verifies under a lax verifier; it must be refused as non-canonical.
    s = int.from_bytes(good_ed.signature[32:], "little")
    lax = good_ed.signature[:32] + (s + L).to_bytes(32, "little")
    assert decide(auth, [A("ops-1", lax, good_ed.expires_at_unix_ms), good_p]) == (
        "malformed_signature"
    )
    assert decide(auth, [A("ops-1", good_ed.signature[:63], NOW_MS), good_p]) == (
        "malformed_signature"
    )
    # P-256: r or s zero, or >= n
    r, s2 = good_p.signature[:32], good_p.signature[32:]
    n = P256_N.to_bytes(32, "big")
    for sig in (bytes(32) + s2, r + bytes(32), n + s2, r + n, b"\xff" * 32 + s2):
        assert decide(auth, [good_ed, A("ops-2", sig, good_p.expires_at_unix_ms)]) == (
            "malformed_signature"
        )
    # s and n - s are both valid ECDSA; this verifier accepts both (no low-S rule in §11)
    high = (P256_N - int.from_bytes(s2, "big")).to_bytes(32, "big")
    assert decide(auth, [good_ed, A("ops-2", r + high, good_p.expires_at_unix_ms)]) == "allowed"


def test_rate_limit(signers: list[Signer], autojump_clock: object) -> None:
    ed = signers[0]
    auth = make(policy_set(signers, 1, rate_per_minute=3))
    ok = [approve(ed)]
    assert [decide(auth, ok, now=t) for t in (0.0, 0.1, 0.2)] == ["allowed"] * 3
    assert decide(auth, ok, now=0.3) == "rate_limited"
    assert decide(auth, ok, now=0.3, account_id="acct-2") == "bad_signature"  # not counted
    assert decide(auth, ok, now=20.0) == "allowed"  # one every 20 s after the burst
    assert decide(auth, ok, now=21.0) == "rate_limited"
    assert decide(auth, ok, now=100.0) == "allowed"
    # a refused request (bad approval) does not use the account's budget
    bad = [approve(ed, session="x")]
    auth2 = make(policy_set(signers, 1, rate_per_minute=1))
    for _ in range(5):
        assert decide(auth2, bad, now=0.0) == "bad_signature"
    assert decide(auth2, ok, now=0.0) == "allowed"


def test_rate_limiter_memory_is_fixed_and_fails_closed() -> None:
    limiter = AccountRateLimiter(2, buckets=4, rows=2, key=b"x" * 16)
    before = limiter.nbytes
    granted = {f"account-{i}": 0 for i in range(1000)}
    for _ in range(5):
        for account in granted:
            granted[account] += limiter.acquire(account, 0.0)
    assert limiter.nbytes == before == 2 * 4 * 8
    # 1000 accounts share 4 buckets per row: no account ever gets more than its rate, and
    # the sharing refuses some accounts early (fails closed).
    assert max(granted.values()) <= 2
    assert min(granted.values()) == 0
    alone = AccountRateLimiter(2, buckets=4, rows=2, key=b"x" * 16)
    assert [alone.acquire("a", 0.0) for _ in range(3)] == [True, True, False]
    big = AccountRateLimiter(60)
    assert big.nbytes == 2 * (1 << 16) * 8


def test_development_policy_needs_nothing() -> None:
    auth = Authorizer(DEVELOPMENT_POLICIES)
    assert decide(auth, []) == "allowed"
    assert decide(auth, [A("whoever", b"", 0)]) == "allowed"


def test_keys() -> None:
    with pytest.raises(ApproverKeyError, match="unknown key type"):
        ApproverKey.create("k", "rsa", b"")
    with pytest.raises(ApproverKeyError, match="Ed25519"):
        ApproverKey.create("k", "ed25519", bytes(32))  # the identity: not a valid point
    with pytest.raises(ApproverKeyError, match="P-256"):
        ApproverKey.create("k", "p256", b"\x02" + bytes(64))
    with pytest.raises(ApproverKeyError, match="not a point"):
        ApproverKey.create("k", "p256", b"\x04" + bytes(64))
    with pytest.raises(ApproverKeyError, match="key id"):
        ApproverKey.create("bad id", "ed25519", Ed("x").public)
    assert "public_key" in repr(ApproverKey.create("k", "ed25519", Ed("x").public))


def _cfg(**policy: object) -> tuple[dict[str, object], dict[str, object]]:
    key = Ed("a").public.hex()
    return (
        {"a": {"type": "ed25519", "public_key": key}},
        {"default": {"approvers": ["a"], "threshold": 1, **policy}},
    )


@pytest.mark.parametrize(
    ("approvers", "policies", "reason", "match"),
    [
        ({"a": {"type": "rsa", "public_key": "00"}}, {}, "unknown_key_type", "rsa"),
        ({"a": {"type": "ed25519", "public_key": "zz"}}, {}, "bad_approver", "64 hex"),
        ({"a": {"type": "p256"}}, {}, "bad_approver", "needs type and public_key"),
        ({"a": {"type": "ed25519", "public_key": "00" * 32, "x": 1}}, {}, "bad_approver", "x"),
        (*_cfg(approvers=["a", "b"]), "unknown_approver", "'b'"),
        (*_cfg(threshold=2), "impossible_threshold", "threshold 2 is impossible with 1"),
        (*_cfg(threshold=0), "impossible_threshold", "threshold 0 with approvers"),
        (*_cfg(threshold=-1), "impossible_threshold", "threshold -1"),
        (*_cfg(threshold=True), "bad_policy", "integer"),
        (*_cfg(max_message_bytes=65537), "bad_policy", "max_message_bytes"),
        (*_cfg(rate_per_minute=0), "bad_policy", "rate_per_minute"),
        (*_cfg(approvers=["a", "a"]), "bad_policy", "twice"),
        (*_cfg(colour="red"), "bad_policy", "colour"),
        ({}, {"default": {"threshold": 1}}, "bad_policy", "approvers must be a list"),
        ({}, {"bad name": {"approvers": [], "threshold": 1}}, "bad_policy", "name"),
    ],
)
def test_policy_config_refusals(
    approvers: dict[str, object], policies: dict[str, object], reason: str, match: str
) -> None:
    with pytest.raises(PolicyConfigError, match=match) as info:
        parse_policies(approvers, policies)
    assert info.value.reason == reason


def test_same_key_under_two_ids_is_refused() -> None:
    key = Ed("a").public.hex()
    approvers = {k: {"type": "ed25519", "public_key": key} for k in ("a", "b")}
    with pytest.raises(PolicyConfigError, match="same public key") as info:
        parse_policies(approvers, {})
    assert info.value.reason == "bad_approver"


def test_an_open_policy_is_written_out() -> None:
    ps = parse_policies({}, {"default": {"approvers": [], "threshold": 0}})
    assert ps.open_policies() == ["default"]
    assert not ps.development
    assert decide(make(ps), []) == "allowed"


def test_policy_set_unknown_names() -> None:
    ps = parse_policies(*_cfg())
    assert ps.unknown({"default"}) == []
    assert ps.unknown({"default", "vip", "create"}) == ["create", "vip"]
    # The reserved operation policies are never an account's, even when configured.
    reserved = parse_policies(
        _cfg()[0],
        {
            name: {"approvers": [], "threshold": 0}
            for name in ("default", "create", "refresh", "repair", "compact")
        },
    )
    assert reserved.unknown({"default", "refresh", "repair", "create", "compact"}) == [
        "compact",
        "create",
        "refresh",
        "repair",
    ]
