"""The participant's sans-io session in DKG (contract version 2): a whole DKG between two
participant sessions and a local stand-in for the enclave, frames in and out, no I/O; the
``dkg_done`` frame never leaves before the caller says the new share is stored; refusals."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.participant_helpers import Shares
from trio_sign.crypto._group import group_for
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._dkg import Ceremony, LocalParticipant
from trio_sign.participant import _messages as m
from trio_sign.participant import _session as s

NOW = 1_800_000_000_000
SUITE = "FROST-secp256k1-SHA256-TR-v1"


@pytest.fixture
def keys() -> Iterator[dict[str, ApproverSigningKey]]:
    out = {k: ApproverSigningKey.generate() for k in ("p2", "p3", "enclave", "approver")}
    yield out
    for k in out.values():
        k.close()


def session(
    keys: dict[str, ApproverSigningKey], pid: str, version: int = 2
) -> s.ParticipantSession:
    sess = s.ParticipantSession(
        participant_id=pid,
        key_id=pid,
        auth_key=keys[pid],
        shares=Shares([]),
        approver=keys["approver"],
        approver_key_id="approver",
        version=version,
    )
    sess.frames_to_send()
    sess.receive_frame(m.encode_message(m.Challenge(bytes(32), "gw", NOW + 9000)), NOW)
    sess.frames_to_send()
    sess.receive_frame(m.encode_message(m.Welcome(pid, 16, 65536)), NOW)
    return sess


def out(sess: s.ParticipantSession) -> list[m.Message]:
    return [m.parse_message(f, max_version=2) for f in sess.frames_to_send()]


def feed(sess: s.ParticipantSession, msg: m.Message, now: int = NOW) -> list[s.Event]:
    return sess.receive_frame(m.encode_message(msg), now)


def ids() -> list[bytes]:
    group = group_for(SUITE)
    return [group.identifier_to_bytes(i) for i in (1, 2, 3)]


def round1(pid: str, ident: bytes, rid: str = "r-1", **kw: Any) -> m.DkgRound1:
    e, p2, p3 = ids()
    fields: dict[str, Any] = {
        "request_id": rid,
        "dkg_id": "dkg-1",
        "account_id": "acct-new",
        "ciphersuite": SUITE,
        "min_signers": 2,
        "max_signers": 3,
        "policy": "default",
        "participants": (m.DkgMember(e, "enclave"), m.DkgMember(p2, "p2"), m.DkgMember(p3, "p3")),
        "enclave_identifier": e,
        "identifier": ident,
        "deadline_unix_ms": NOW + 60_000,
    } | kw
    return m.DkgRound1(**fields)


def test_a_whole_dkg_and_done_only_after_stored(keys: dict[str, ApproverSigningKey]) -> None:
    e, p2, p3 = ids()
    a, b = session(keys, "p2"), session(keys, "p3")
    enclave = LocalParticipant("enclave", "enclave", keys["enclave"])
    c = Ceremony(
        "dkg-1", "acct-new", SUITE, 2, 3, "default", ((e, "enclave"), (p2, "p2"), (p3, "p3")), e
    )
    packages: list[m.DkgPackageField] = [s.package_field(enclave.round1_now(c, e))]
    for sess, ident in ((a, p2), (b, p3)):
        (event,) = feed(sess, round1(sess.participant_id, ident))
        assert isinstance(event, s.DkgRequested)
        assert out(sess) == []  # nothing before the policy said yes
        assert sess.accept_dkg("r-1", NOW) == []
        (pkg,) = out(sess)
        assert isinstance(pkg, m.DkgPackage)
        assert pkg.package.key_id == sess.participant_id
        packages.append(pkg.package)
    shares: list[m.DkgShareField] = [
        s.share_field(x) for x in enclave.round2_now(c, [s.package_pb(p) for p in packages])
    ]
    for sess in (a, b):
        assert feed(sess, m.DkgRound2("r-1", tuple(packages))) == []
        (msg,) = out(sess)
        assert isinstance(msg, m.DkgShares)
        shares += msg.shares
    done = {}
    for sess, ident in ((a, p2), (b, p3)):
        mine = tuple(x for x in shares if x.recipient == ident)
        (ready,) = feed(sess, m.DkgRound3("r-1", mine))
        assert isinstance(ready, s.DkgKeyReady)
        assert ready.record.account_id == "acct-new"
        assert ready.record.identifier == ident
        assert "signing_share" not in repr(ready)
        assert out(sess) == []  # dkg_done waits for the store
        sess.dkg_stored("r-1")
        (msg,) = out(sess)
        assert isinstance(msg, m.DkgDone)
        done[sess.participant_id] = msg
        assert sess.in_flight == 0
        ready.record.zero()
    output = enclave.round3_now(c, [s.share_pb(x) for x in shares if x.recipient == e])
    assert done["p2"].group_public_key == done["p3"].group_public_key == output.group_public_key
    assert done["p2"].verifying_shares == done["p3"].verifying_shares
    assert output.record is not None
    output.record.zero()
    enclave.forget("dkg-1")
    with pytest.raises(s.SessionError):
        a.dkg_stored("r-1")


def test_refusals(keys: dict[str, ApproverSigningKey]) -> None:
    e, p2, p3 = ids()
    a = session(keys, "p2")
    # another participant's key named at our identifier
    feed(a, round1("p2", p3, rid="r-other"))
    (d,) = out(a)
    assert isinstance(d, m.Decline)
    assert (d.request_id, d.reason) == ("r-other", "bad_request")
    assert "does not name this participant's key 'p2'" in d.detail
    # expired on arrival
    feed(a, round1("p2", p2, rid="r-late", deadline_unix_ms=NOW))
    assert out(a)[0] == m.Decline("r-late", "expired", "the deadline had passed on arrival")
    # the enclave's identifier is not the enclave's entry
    feed(a, round1("p2", p2, rid="r-enc", enclave_identifier=p3))
    (d,) = out(a)
    assert isinstance(d, m.Decline)
    assert d.reason == "bad_request"
    # round 3 before round 2: an error, nothing else
    feed(a, round1("p2", p2, rid="r-1"))
    a.accept_dkg("r-1", NOW)
    out(a)
    feed(a, m.DkgRound3("r-1", (m.DkgShareField(e, p2, bytes(72)),)))
    (err,) = out(a)
    assert err == m.Error("unknown_request", "no DKG waiting for dkg_round3", "r-1")
    # a duplicate request id
    feed(a, round1("p2", p2, rid="r-1"))
    assert out(a) == [m.Error("duplicate_request", "request_id is in flight", "r-1")]
    # the gateway cancels: gone, secrets forgotten
    assert feed(a, m.Cancel("r-1")) == [s.RequestEnded("r-1", "cancelled")]
    assert a.in_flight == 0
    # past its deadline, the sweep declines it
    feed(a, round1("p2", p2, rid="r-2", deadline_unix_ms=NOW + 10))
    a.expire(NOW + 10)
    assert out(a) == [m.Decline("r-2", "expired", "the DKG's deadline passed")]


def test_a_version_1_connection_refuses_dkg(keys: dict[str, ApproverSigningKey]) -> None:
    _, p2, _ = ids()
    a = session(keys, "p2", version=1)
    (event,) = feed(a, round1("p2", p2))
    assert isinstance(event, s.CloseConnection)
    assert event.code == m.CLOSE_PROTOCOL_ERROR
    assert "reserved for DKG" in event.reason
