"""Per-request work is bounded before it starts (DESIGN §16, issue 11 items 6, 7 and 10):
Sign checks the session, the list's length and every field's size before building or hashing
anything; ids are checked by length first; each method has a request-size cap; GetAttestation
is rate limited and bounded in concurrency."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from proto_min import sign_service_pb2 as pb
from trio_sign.crypto import SCHEMES, Scheme, SigningCommitment
from trio_sign.enclave import SessionPool, SignService
from trio_sign.enclave import _pool as pool_module
from trio_sign.enclave import _service as service_module
from trio_sign.rpc import (
    CallContext,
    GrpcChannel,
    GrpcServer,
    RpcError,
    StatusCode,
    open_grpc_channel,
)
from trio_sign.shares import ShareStore

from .enclave_helpers import Account, Peer, make_accounts, sorted_commitments

S = "/trio_sign.v1.SignService/"
HOSTILE_COUNT = 200_000


@dataclass
class Counts:
    commitments: int = 0
    digests: int = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    """Count commitment objects built and request digests computed, wherever they happen."""
    seen = Counts()
    real_digest = pool_module._request_digest

    def counting_commitment(identifier: bytes, hiding: bytes, binding: bytes) -> Any:
        seen.commitments += 1
        return SigningCommitment(identifier, hiding, binding)

    def counting_digest(message: bytes, commitments: Any, merkle_root: bytes | None) -> bytes:
        seen.digests += 1
        return real_digest(message, commitments, merkle_root)

    # The pool builds commitments through the account's suite (Scheme.commitment).
    for scheme in SCHEMES:
        real = type(scheme).commitment

        def counting_method(
            self: Scheme, identifier: bytes, hiding: bytes, binding: bytes, real: Any = real
        ) -> Any:
            seen.commitments += 1
            return real(self, identifier, hiding, binding)

        monkeypatch.setattr(type(scheme), "commitment", counting_method)
    monkeypatch.setattr(pool_module, "SigningCommitment", counting_commitment, raising=False)
    monkeypatch.setattr(service_module, "SigningCommitment", counting_commitment, raising=False)
    monkeypatch.setattr(pool_module, "_request_digest", counting_digest)
    return seen


@pytest.fixture
def world() -> Iterator[tuple[ShareStore, dict[str, Account]]]:
    store, accounts = make_accounts(2)
    yield store, accounts
    store.close()


def _context(method: str) -> CallContext:
    return CallContext(method=S + method, metadata=(), authority="test", deadline=math.inf)


async def _call(service: SignService, method: str, request: Any) -> bytes:
    """Through the method table, as the gRPC server calls it (parse, then the handler)."""
    handler = service.handlers()[S + method]
    return await handler(request.SerializeToString(), _context(method))


async def _expect(code: StatusCode, service: SignService, method: str, request: Any) -> str:
    with pytest.raises(RpcError) as info:
        await _call(service, method, request)
    assert info.value.status == code, info.value
    return info.value.details


def _pb(cs: list[SigningCommitment]) -> list[pb.SigningCommitment]:
    return [
        pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding)
        for c in cs
    ]


def _empty_commitments(n: int) -> list[pb.SigningCommitment]:
    return [pb.SigningCommitment()] * n


async def _commit(service: SignService, account_id: str, session_id: str) -> SigningCommitment:
    data = await _call(
        service, "Commit", pb.CommitRequest(account_id=account_id, session_id=session_id)
    )
    r = pb.CommitResponse.FromString(data)
    return SigningCommitment(r.identifier, r.hiding, r.binding)


async def _sign_and_verify(
    service: SignService, acct: Account, session_id: str, own: SigningCommitment
) -> None:
    peer = Peer(acct)
    commitments = sorted_commitments(own, peer.commitment)
    request = pb.SignRequest(session_id=session_id, message=b"m", commitments=_pb(commitments))
    signed = pb.SignResponse.FromString(await _call(service, "Sign", request))
    peer.complete_and_verify(b"m", commitments, signed.identifier, signed.signature_share)


# -- item 6: Sign is bounded by the account, not by the request ------------------------------


async def test_sign_to_an_unknown_session_builds_nothing(
    world: tuple[ShareStore, dict[str, Account]], counts: Counts
) -> None:
    store, _ = world
    service = SignService(store, SessionPool(store.get))
    request = pb.SignRequest(
        session_id="nope", message=b"m", commitments=_empty_commitments(HOSTILE_COUNT)
    )
    details = await _expect(StatusCode.NOT_FOUND, service, "Sign", request)
    assert details == "unknown or expired session_id"
    assert (counts.commitments, counts.digests) == (0, 0)


async def test_sign_with_too_many_commitments_keeps_the_session(
    world: tuple[ShareStore, dict[str, Account]], counts: Counts
) -> None:
    store, accounts = world
    pool = SessionPool(store.get)
    service = SignService(store, pool)
    own = await _commit(service, "acct-0", "s")
    nonces = pool._sessions["s"].nonces
    assert nonces is not None
    request = pb.SignRequest(
        session_id="s", message=b"m", commitments=_empty_commitments(HOSTILE_COUNT)
    )
    details = await _expect(StatusCode.INVALID_ARGUMENT, service, "Sign", request)
    assert details == f"too many signers: {HOSTILE_COUNT} commitments, at most 3 allowed"
    assert (counts.commitments, counts.digests) == (0, 0)
    assert not nonces.used
    assert pool.open_sessions == 1
    # Invalid input leaves the session usable (the pool's contract): a correct retry signs.
    await _sign_and_verify(service, accounts["acct-0"], "s", own)
    assert pool.open_sessions == 0
    # ... and only then were the two commitments built and the request hashed (which also
    # shows the counters see the pool's work).
    assert (counts.commitments, counts.digests) == (2, 1)


@pytest.mark.parametrize(
    ("fields", "details"),
    [
        ({"identifier": b""}, "commitment 1: identifier must be 32 bytes, got 0"),
        ({"hiding": bytes(33)}, "commitment 1: hiding must be 32 bytes, got 33"),
        ({"binding": bytes(31)}, "commitment 1: binding must be 32 bytes, got 31"),
    ],
)
async def test_sign_checks_field_sizes_before_building_commitments(
    world: tuple[ShareStore, dict[str, Account]],
    counts: Counts,
    fields: dict[str, bytes],
    details: str,
) -> None:
    store, accounts = world
    pool = SessionPool(store.get)
    service = SignService(store, pool)
    own = await _commit(service, "acct-0", "s")
    good = _pb([own])[0]
    bad = pb.SigningCommitment(
        identifier=fields.get("identifier", (2).to_bytes(32, "little")),
        hiding=fields.get("hiding", own.hiding),
        binding=fields.get("binding", own.binding),
    )
    request = pb.SignRequest(session_id="s", message=b"m", commitments=[good, bad])
    assert await _expect(StatusCode.INVALID_ARGUMENT, service, "Sign", request) == details
    assert (counts.commitments, counts.digests) == (0, 0)
    assert pool.open_sessions == 1
    await _sign_and_verify(service, accounts["acct-0"], "s", own)


async def test_too_few_commitments_are_refused_before_building(
    world: tuple[ShareStore, dict[str, Account]], counts: Counts
) -> None:
    store, _ = world
    service = SignService(store, SessionPool(store.get))
    own = await _commit(service, "acct-0", "s")
    request = pb.SignRequest(session_id="s", message=b"m", commitments=_pb([own]))
    details = await _expect(StatusCode.INVALID_ARGUMENT, service, "Sign", request)
    assert details == "too few signers: 1 commitments, at least 2 required"
    assert counts.commitments == 0


async def test_a_signed_session_refuses_an_oversized_request_without_hashing_it(
    world: tuple[ShareStore, dict[str, Account]], counts: Counts
) -> None:
    store, accounts = world
    service = SignService(store, SessionPool(store.get))
    own = await _commit(service, "acct-0", "s")
    peer = Peer(accounts["acct-0"])
    good = pb.SignRequest(
        session_id="s", message=b"m", commitments=_pb(sorted_commitments(own, peer.commitment))
    )
    first = await _call(service, "Sign", good)
    digests = counts.digests
    hostile = pb.SignRequest(
        session_id="s", message=b"m", commitments=_empty_commitments(HOSTILE_COUNT)
    )
    details = await _expect(StatusCode.FAILED_PRECONDITION, service, "Sign", hostile)
    assert "already signed a different request" in details
    assert counts.digests == digests
    assert await _call(service, "Sign", good) == first  # a byte-identical retry still answers


@pytest.mark.parametrize(
    ("method", "request_", "details"),
    [
        ("Sign", pb.SignRequest(session_id="s" * 1_000_000), "session_id must be 1..128 bytes"),
        ("Sign", pb.SignRequest(session_id=""), "session_id must be 1..128 bytes"),
        ("Abort", pb.AbortRequest(session_id="s" * 1_000_000), "session_id must be 1..128 bytes"),
        ("Abort", pb.AbortRequest(session_id="é" * 65), "session_id must be 1..128 bytes"),
        (
            "Commit",
            pb.CommitRequest(account_id="acct-0", session_id="s" * 1_000_000),
            "session_id must be 1..128 bytes",
        ),
        (
            "Commit",
            pb.CommitRequest(account_id="a" * 1_000_000, session_id="s"),
            "account_id must be 1..255 bytes",
        ),
        (
            "GetAccount",
            pb.GetAccountRequest(account_id="a" * 1_000_000),
            "account_id must be 1..255 bytes",
        ),
    ],
)
async def test_ids_are_bounded_before_lookup(
    world: tuple[ShareStore, dict[str, Account]], method: str, request_: Any, details: str
) -> None:
    store, _ = world
    service = SignService(store, SessionPool(store.get))
    assert await _expect(StatusCode.INVALID_ARGUMENT, service, method, request_) == details


# -- item 6: request-size caps per method ----------------------------------------------------


def test_receive_limits_cover_every_method(world: tuple[ShareStore, dict[str, Account]]) -> None:
    store, _ = world
    service = SignService(store, SessionPool(store.get))
    limits = service.receive_limits()
    assert limits.keys() == service.handlers().keys()
    assert limits[S + "Sign"] == 256 * 1024
    assert limits[S + "Ping"] == 64 * 1024
    for method in ("GetStatus", "GetAttestation", "GetAccount", "Commit", "Abort"):
        assert limits[S + method] == 4 * 1024
    # The largest valid request of each small method fits its cap.
    largest = {
        "GetAttestation": pb.GetAttestationRequest(nonce=bytes(512)),
        "GetAccount": pb.GetAccountRequest(account_id="é" * 127),
        "Commit": pb.CommitRequest(account_id="a" * 255, session_id="s" * 128),
        "Abort": pb.AbortRequest(session_id="s" * 128),
    }
    for method, request in largest.items():
        assert request.ByteSize() <= limits[S + method]
    # The default Sign cap holds the longest message with a large signer set.
    assert service_module.largest_sign_request_bytes(1000) <= limits[S + "Sign"]
    assert limits[S + "Sign"] > service_module.MAX_MESSAGE_BYTES


def test_sign_cap_is_configurable_and_checked(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    store, _ = world
    pool = SessionPool(store.get)
    service = SignService(store, pool, max_sign_request_bytes=1024 * 1024)
    assert service.receive_limits()[S + "Sign"] == 1024 * 1024
    smallest = service_module.largest_sign_request_bytes(2)
    assert smallest > service_module.MAX_MESSAGE_BYTES
    SignService(store, pool, max_sign_request_bytes=smallest)
    with pytest.raises(ValueError, match=r"max_sign_request_bytes .* must be at least") as info:
        SignService(store, pool, max_sign_request_bytes=service_module.MAX_MESSAGE_BYTES)
    assert "MAX_MESSAGE_BYTES (65536)" in str(info.value)


# -- item 7: an oversized field is INVALID_ARGUMENT, through the gRPC server -----------------


@asynccontextmanager
async def grpc_service(service: SignService) -> AsyncIterator[GrpcChannel]:
    server = GrpcServer(service.handlers())
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        async with open_grpc_channel(client_stream) as channel:
            yield channel
        await server.aclose()


async def test_a_field_over_64_kib_is_invalid_argument_and_logs_no_error(
    world: tuple[ShareStore, dict[str, Account]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store, accounts = world
    pool = SessionPool(store.get)
    service = SignService(store, pool)
    async with grpc_service(service) as ch:

        async def sign(request: pb.SignRequest) -> bytes:
            return await ch.unary_unary(S + "Sign", request.SerializeToString())

        committed = pb.CommitResponse.FromString(
            await ch.unary_unary(
                S + "Commit",
                pb.CommitRequest(account_id="acct-0", session_id="s").SerializeToString(),
            )
        )
        own = SigningCommitment(committed.identifier, committed.hiding, committed.binding)
        peer = Peer(accounts["acct-0"])
        huge = SigningCommitment(peer.commitment.identifier, bytes(70_000), bytes(32))
        for session_id, code, details in [
            ("s", StatusCode.INVALID_ARGUMENT, "hiding must be 32 bytes, got 70000"),
            ("unknown", StatusCode.NOT_FOUND, "unknown or expired session_id"),
        ]:
            request = pb.SignRequest(
                session_id=session_id,
                message=b"m",
                commitments=_pb(sorted_commitments(own, huge)),
            )
            with pytest.raises(RpcError) as info:
                await sign(request)
            assert info.value.status == code, info.value
            assert details in info.value.details
        assert pool.open_sessions == 1
        good = pb.SignRequest(
            session_id="s", message=b"m", commitments=_pb(sorted_commitments(own, peer.commitment))
        )
        assert pb.SignResponse.FromString(await sign(good)).identifier == own.identifier
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_request_digest_takes_any_field_size() -> None:
    c = SigningCommitment(bytes(32), bytes(70_000), bytes(32))
    digest = pool_module._request_digest(b"m", [c], None)
    assert len(digest) == 32
    # Moving bytes between fields, or between the message and a field, changes the digest.
    moved = SigningCommitment(bytes(33), bytes(69_999), bytes(32))
    assert pool_module._request_digest(b"m", [moved], None) != digest
    assert pool_module._request_digest(b"", [SigningCommitment(b"m", b"", b"")], None) != (
        pool_module._request_digest(b"m", [SigningCommitment(b"", b"", b"")], None)
    )


def test_request_digest_covers_the_merkle_roots_presence_and_value() -> None:
    """No root, an empty root and each 32-byte root sign differently: four digests."""
    c = SigningCommitment(bytes(32), bytes(33), bytes(33))
    roots: list[bytes | None] = [None, b"", bytes(32), b"\x01" * 32]
    digests = {pool_module._request_digest(b"m", [c], root) for root in roots}
    assert len(digests) == len(roots)
    # The root is framed too: its bytes cannot pass for the message's or a commitment's.
    assert pool_module._request_digest(b"m" + bytes(32), [c], b"") != (
        pool_module._request_digest(b"m", [c], bytes(32))
    )


# -- item 10: GetAttestation is rate limited and bounded in concurrency ----------------------


class FakeAttestor:
    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.release: trio.Event | None = None

    async def __call__(self, nonce: bytes) -> bytes:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.release is not None:
                await self.release.wait()
            return b"doc:" + nonce
        finally:
            self.in_flight -= 1


async def _attest(service: SignService, nonce: bytes = b"n") -> bytes:
    data = await _call(service, "GetAttestation", pb.GetAttestationRequest(nonce=nonce))
    return bytes(pb.GetAttestationResponse.FromString(data).document)


async def test_get_attestation_is_rate_limited(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    store, _ = world
    attestor = FakeAttestor()
    service = SignService(store, SessionPool(store.get), attestor=attestor)
    request = pb.GetAttestationRequest(nonce=b"n")
    for _ in range(40):  # the default burst
        assert await _attest(service) == b"doc:n"
    details = await _expect(StatusCode.RESOURCE_EXHAUSTED, service, "GetAttestation", request)
    assert details == "attestation rate limit exceeded; retry later"
    assert attestor.calls == 40
    await trio.sleep(1.01)  # 20 tokens a second
    for _ in range(20):
        await _attest(service)
    await _expect(StatusCode.RESOURCE_EXHAUSTED, service, "GetAttestation", request)
    await trio.sleep(3600)  # refills up to the burst, no further
    for _ in range(40):
        await _attest(service)
    await _expect(StatusCode.RESOURCE_EXHAUSTED, service, "GetAttestation", request)
    assert attestor.calls == 100
    assert service.attestations_refused == 3
    # Malformed input is refused before it costs a token.
    await _expect(
        StatusCode.INVALID_ARGUMENT,
        service,
        "GetAttestation",
        pb.GetAttestationRequest(nonce=bytes(513)),
    )
    assert service.attestations_refused == 3


async def test_attestation_rate_is_configurable(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    store, _ = world
    service = SignService(
        store,
        SessionPool(store.get),
        attestor=FakeAttestor(),
        attestation_rate_per_s=2.0,
        attestation_burst=1,
    )
    await _attest(service)
    request = pb.GetAttestationRequest(nonce=b"n")
    await _expect(StatusCode.RESOURCE_EXHAUSTED, service, "GetAttestation", request)
    await trio.sleep(0.51)
    await _attest(service)
    for kwargs in (
        {"attestation_rate_per_s": 0.0},
        {"attestation_burst": 0},
        {"max_concurrent_attestations": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SignService(store, SessionPool(store.get), **kwargs)


async def test_attestations_run_at_most_four_at_once(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    store, _ = world
    attestor = FakeAttestor()
    attestor.release = trio.Event()
    service = SignService(store, SessionPool(store.get), attestor=attestor)
    documents: list[bytes] = []

    async def one(i: int) -> None:
        documents.append(await _attest(service, b"%d" % i))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        assert (attestor.calls, attestor.in_flight) == (4, 4)
        attestor.release.set()
    assert sorted(documents) == sorted(b"doc:%d" % i for i in range(10))
    assert attestor.most_in_flight == 4
    assert attestor.in_flight == 0


async def test_a_cancelled_attestation_frees_its_turn(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    store, _ = world
    attestor = FakeAttestor()
    attestor.release = trio.Event()
    service = SignService(
        store, SessionPool(store.get), attestor=attestor, max_concurrent_attestations=1
    )
    with trio.move_on_after(1):
        await _attest(service)
    assert attestor.in_flight == 0
    attestor.release.set()
    assert await _attest(service, b"x") == b"doc:x"
