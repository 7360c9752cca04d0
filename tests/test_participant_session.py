"""The participant's sans-io protocol: frames in, events and frames out, no I/O and no
clock but the ``now_ms`` each call is given."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.participant_helpers import SUITES, Account, Shares, deal, entries_of
from trio_sign.authz import ApproverKey, approval_payload
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.participant import _messages as m
from trio_sign.participant import _session as s

NOW = 1_800_000_000_000
GW = "gw-1"


@pytest.fixture
def keys() -> Iterator[tuple[ApproverSigningKey, ApproverSigningKey]]:
    auth, approver = ApproverSigningKey.generate(), ApproverSigningKey.generate()
    yield auth, approver
    auth.close()
    approver.close()


def new_session(keys: Any, accounts: list[Account], **kw: Any) -> s.ParticipantSession:
    auth, approver = keys
    return s.ParticipantSession(
        participant_id="ops-1",
        key_id="ops-1-auth",
        auth_key=auth,
        shares=Shares(a.records[1] for a in accounts),
        approver=approver,
        approver_key_id="approver-1",
        **kw,
    )


def frames(session: s.ParticipantSession) -> list[m.Message]:
    return [m.parse_message(f) for f in session.frames_to_send()]


def feed(session: s.ParticipantSession, message: m.Message, now: int = NOW) -> list[s.Event]:
    return session.receive_frame(m.encode_message(message), now)


def ready(keys: Any, accounts: list[Account], **kw: Any) -> s.ParticipantSession:
    session = new_session(keys, accounts, **kw)
    assert frames(session) == [m.Hello("ops-1", "ops-1-auth")]
    challenge = bytes(range(32))
    assert feed(session, m.Challenge(challenge, GW, NOW + 10_000)) == []
    (auth,) = frames(session)
    assert isinstance(auth, m.Auth)
    verifier = ApproverKey.create("ops-1-auth", "ed25519", keys[0].public_key)
    payload = m.auth_payload(challenge, GW, "ops-1", "ops-1-auth")
    assert verifier.check_signature(auth.signature, payload) is None
    assert session.state is s.State.AUTH
    welcome = m.Welcome("ops-1", 16, 65536)
    assert feed(session, welcome) == [s.Authenticated(welcome)]
    assert session.state.value == "ready"
    return session


def request(account: Account, rid: str = "r-1", **kw: Any) -> m.SignRequest:
    fields: dict[str, Any] = {
        "request_id": rid,
        "account_id": account.account_id,
        "session_id": "s-1",
        "ciphersuite": account.scheme.name,
        "message": b"pay",
        "deadline_unix_ms": NOW + 5000,
    } | kw
    return m.SignRequest(**fields)


def commit(session: s.ParticipantSession, account: Account, rid: str = "r-1", **kw: Any) -> Any:
    req = request(account, rid, **kw)
    events = feed(session, req)
    assert events == [s.SignRequested(req, account.records[1].identifier)]
    assert session.accept(rid, NOW) == []
    (c,) = frames(session)
    assert isinstance(c, m.Commitment)
    assert c.identifier == account.records[1].identifier
    return c


@pytest.mark.parametrize("suite", SUITES)
def test_full_signing_round(keys: Any, suite: str) -> None:
    account = deal("acct-1", suite)
    session = ready(keys, [account])
    c = commit(session, account)
    enclave = account.records[0]
    ours = account.scheme.commit(enclave.identifier, enclave.signing_share)
    theirs = account.scheme.commitment(c.identifier, c.hiding, c.binding)
    commitments = sorted(
        [ours.commitment, theirs], key=lambda x: account.scheme.identifier_from_bytes(x.identifier)
    )
    events = feed(session, m.SignRound2("r-1", tuple(entries_of(commitments)), enclave.identifier))
    assert events == [s.Signed("r-1")]
    (share,) = frames(session)
    assert isinstance(share, m.SignatureShare)
    assert account.scheme.verify_signature_share(
        identifier=c.identifier,
        verifying_share=account.records[1].verifying_share,
        signature_share=share.signature_share,
        commitments=commitments,
        group_public_key=account.group_public_key,
        message=b"pay",
    )
    approver = ApproverKey.create("approver-1", "ed25519", keys[1].public_key)
    assert share.approval.expires_at_unix_ms == NOW + s.DEFAULT_APPROVAL_LIFETIME_MS
    payload = approval_payload("acct-1", "s-1", b"pay", share.approval.expires_at_unix_ms)
    assert approver.check_signature(share.approval.signature, payload) is None
    assert session.in_flight == 0
    assert session.counts["signed"] == 1
    ours.zero()


def test_nonces_are_zeroed_on_every_way_out(keys: Any) -> None:
    account = deal("acct-1", SUITES[0])
    session = ready(keys, [account])

    def held(rid: str) -> Any:
        return session._requests[rid].nonces

    def zeroed(nonces: Any) -> bool:
        return not any(nonces._buf)

    commit(session, account, "a")
    commit(session, account, "b")
    commit(session, account, "c", deadline_unix_ms=NOW + 100)
    commit(session, account, "d")
    na, nb, nc, nd = held("a"), held("b"), held("c"), held("d")
    assert not zeroed(na)
    # cancelled by the gateway
    assert feed(session, m.Cancel("a")) == [s.RequestEnded("a", "cancelled")]
    assert zeroed(na)
    # a round two the participant refuses (its commitment changed)
    other = m.CommitmentEntry(account.records[0].identifier, b"\x02" * 32, b"\x03" * 32)
    bogus = m.CommitmentEntry(account.records[1].identifier, b"\x05" * 32, b"\x05" * 32)
    assert feed(session, m.SignRound2("b", (other, bogus), other.identifier)) == [
        s.Declined("b", "bad_request")
    ]
    assert zeroed(nb)
    # expired
    assert session.next_deadline_ms() == NOW + 100
    assert session.expire(NOW + 100) == [s.RequestEnded("c", "expired")]
    assert zeroed(nc)
    # (a committed request that expires sends nothing: the gateway gave up on it already)
    assert frames(session)[-1] == m.Decline(
        "b", "bad_request", "the commitment list lacks this participant's commitment, or changed it"
    )
    # the session closes
    session.close()
    assert zeroed(nd)
    assert session.in_flight == 0
    assert session.receive_frame("anything", NOW) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("unsorted", "not sorted"),
        ("missing", "lacks this participant's commitment"),
        ("enclave_is_us", "enclave_identifier"),
        ("enclave_absent", "enclave_identifier"),
        ("too_many", "signers for a 2-of-3"),
    ],
)
def test_round_two_checks(keys: Any, change: str, problem: str) -> None:
    account = deal("acct-1", SUITES[1])
    session = ready(keys, [account])
    c = commit(session, account)
    mine = c.entry()
    enclave = account.records[0]
    ours = account.scheme.commit(enclave.identifier, enclave.signing_share)
    (theirs_entry,) = entries_of([ours.commitment])
    third = m.CommitmentEntry(
        account.records[2].identifier, theirs_entry.hiding, theirs_entry.binding
    )
    lists = {
        "unsorted": ((mine, theirs_entry), enclave.identifier),
        "missing": ((theirs_entry, third), enclave.identifier),
        "enclave_is_us": ((theirs_entry, mine), mine.identifier),
        "enclave_absent": ((theirs_entry, mine), b"\x09" * 32),
        "too_many": (
            (
                theirs_entry,
                mine,
                third,
                m.CommitmentEntry(
                    b"\x00" * 31 + b"\x04", theirs_entry.hiding, theirs_entry.binding
                ),
            ),
            enclave.identifier,
        ),
    }
    entries, enclave_id = lists[change]
    events = feed(session, m.SignRound2("r-1", entries, enclave_id))
    assert events == [s.Declined("r-1", "bad_request")]
    (decline,) = frames(session)
    assert isinstance(decline, m.Decline)
    assert problem in decline.detail
    assert session.in_flight == 0
    ours.zero()


def test_requests_declined_before_any_decision(keys: Any) -> None:
    ed, tr = deal("acct-ed", SUITES[0]), deal("acct-tr", SUITES[2])
    session = ready(keys, [ed, tr], max_in_flight=2)
    cases = [
        (request(ed, "x1", account_id="acct-none"), "unknown_account"),
        (request(ed, "x2", ciphersuite=SUITES[1]), "bad_request"),
        (request(ed, "x3", taproot_merkle_root=b""), "bad_request"),
        (request(ed, "x4", deadline_unix_ms=NOW), "expired"),
    ]
    for req, reason in cases:
        assert feed(session, req) == [s.Declined(req.request_id, reason)]
        (decline,) = frames(session)
        assert isinstance(decline, m.Decline)
        assert decline.reason == reason
    # a Taproot request with a root is fine
    assert feed(session, request(tr, "t1", taproot_merkle_root=bytes(32)))[0] == s.SignRequested(
        request(tr, "t1", taproot_merkle_root=bytes(32)), tr.records[1].identifier
    )
    feed(session, request(ed, "e1"))
    assert feed(session, request(ed, "e2")) == [s.Declined("e2", "busy")]
    frames(session)
    # a duplicate id of a request in flight
    assert feed(session, request(ed, "e1")) == []
    assert frames(session) == [m.Error("duplicate_request", "request_id is in flight", "e1")]
    assert session.counts["declined"] == 5


def test_decision_after_the_deadline_declines_expired(keys: Any) -> None:
    account = deal("acct-1", SUITES[0])
    session = ready(keys, [account])
    feed(session, request(account, "r", deadline_unix_ms=NOW + 10))
    assert session.accept("r", NOW + 10) == [s.Declined("r", "expired")]
    assert session.in_flight == 0
    # deciding on something gone is a no-op
    assert session.accept("r", NOW) == []
    assert session.decline("r", "rejected") == []
    with pytest.raises(s.SessionError):
        session.decline("r", "nope")


def test_pending_request_expires_with_a_decline(keys: Any) -> None:
    account = deal("acct-1", SUITES[0])
    session = ready(keys, [account])
    feed(session, request(account, "r", deadline_unix_ms=NOW + 10))
    assert session.expire(NOW + 9) == []
    assert session.expire(NOW + 10) == [s.RequestEnded("r", "expired")]
    assert frames(session) == [m.Decline("r", "expired", "no decision before the deadline")]


def test_ping_error_and_unknown_round_two(keys: Any) -> None:
    session = ready(keys, [])
    assert feed(session, m.Ping(7)) == []
    assert frames(session) == [m.Pong(7)]
    assert feed(session, m.Pong(1)) == []
    err = m.Error("internal", "x")
    assert feed(session, err) == [s.RemoteError(err)]
    entry = m.CommitmentEntry(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)
    entry2 = m.CommitmentEntry(b"\x02" + b"\x00" * 31, b"\x02" * 32, b"\x03" * 32)
    assert feed(session, m.SignRound2("nope", (entry, entry2), entry.identifier)) == []
    assert frames(session) == [
        m.Error("unknown_request", "no committed request with this id", "nope")
    ]
    assert feed(session, m.Cancel("nope")) == []


@pytest.mark.parametrize(
    ("before", "message", "code"),
    [
        (False, m.SignRequest("r", "a", "s", SUITES[0], b"", NOW + 1), m.CLOSE_PROTOCOL_ERROR),
        (False, m.Welcome("ops-1", 1, 4096), m.CLOSE_PROTOCOL_ERROR),
        (False, m.Challenge(bytes(32), "another-gw", NOW), m.CLOSE_AUTH_FAILED),
        (True, m.Challenge(bytes(32), GW, NOW), m.CLOSE_PROTOCOL_ERROR),
        (True, m.Hello("x", "y"), m.CLOSE_PROTOCOL_ERROR),
        (True, m.Commitment("r", bytes(32), bytes(32), bytes(32)), m.CLOSE_PROTOCOL_ERROR),
        (True, m.Welcome("someone-else", 1, 4096), m.CLOSE_PROTOCOL_ERROR),
    ],
)
def test_protocol_violations_close(keys: Any, before: bool, message: m.Message, code: int) -> None:
    session = ready(keys, []) if before else new_session(keys, [], gateway_id=GW)
    session.frames_to_send()
    (event,) = feed(session, message)
    assert isinstance(event, s.CloseConnection)
    assert event.code == code
    assert session.state is s.State.CLOSED


def test_garbage_closes_with_the_codec_code(keys: Any) -> None:
    session = ready(keys, [])
    (event,) = session.receive_frame('{"type": "ping", "v": 9, "seq": 1}', NOW)
    assert event == s.CloseConnection(m.CLOSE_UNSUPPORTED_VERSION, event.reason)  # type: ignore[union-attr]


def test_auth_key_must_be_ed25519(keys: Any) -> None:
    with ApproverSigningKey.generate("p256") as p256, pytest.raises(ValueError, match="Ed25519"):
        s.ParticipantSession(
            participant_id="p",
            key_id="k",
            auth_key=p256,
            shares=Shares([]),
            approver=keys[1],
            approver_key_id="a",
        )


GATEWAY_FRAMES = st.one_of(
    st.builds(
        m.SignRequest,
        st.sampled_from(["r1", "r2", "r3", "r4"]),
        st.sampled_from(["acct-1", "acct-2"]),
        st.just("s"),
        st.sampled_from(SUITES),
        st.binary(max_size=8),
        st.integers(NOW - 5, NOW + 50),
        st.one_of(st.none(), st.just(b"")),
    ),
    st.builds(m.Cancel, st.sampled_from(["r1", "r2", "r3", "r4"])),
    st.builds(m.Ping, st.integers(0, 5)),
)
ACTIONS = st.lists(
    st.one_of(
        GATEWAY_FRAMES.map(lambda msg: ("frame", msg)),
        st.tuples(st.just("accept"), st.sampled_from(["r1", "r2", "r3", "r4"])),
        st.tuples(st.just("decline"), st.sampled_from(["r1", "r2", "r3", "r4"])),
        st.tuples(st.just("expire"), st.integers(0, 60)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ACTIONS)
def test_any_sequence_keeps_the_invariants(actions: list[tuple[str, Any]]) -> None:
    """Whatever the gateway sends and whatever is decided, in any order: no exception, at
    most max_in_flight held, every frame out is valid, and every nonce that left is zeroed."""
    accounts = [deal("acct-1", SUITES[0]), deal("acct-2", SUITES[2])]
    auth, approver = ApproverSigningKey.generate(), ApproverSigningKey.generate()
    try:
        session = ready((auth, approver), accounts, max_in_flight=3)
        seen: list[Any] = []
        for kind, arg in actions:
            if kind == "frame":
                feed(session, arg)
            elif kind == "accept":
                session.accept(arg, NOW)
            elif kind == "decline":
                session.decline(arg, "rejected")
            else:
                session.expire(NOW + arg)
            for entry in session._requests.values():
                if entry.nonces is not None and entry.nonces not in seen:
                    seen.append(entry.nonces)
            assert session.in_flight <= 3
            for frame in session.frames_to_send():
                m.parse_message(frame)
        live = [e.nonces for e in session._requests.values() if e.nonces is not None]
        for nonces in seen:
            if all(nonces is not x for x in live):
                assert not any(nonces._buf)
        session.close()
        for nonces in seen:
            assert not any(nonces._buf)
    finally:
        auth.close()
        approver.close()
