"""Every ciphersuite through the enclave (issue 15; DESIGN §4, §14).

One SignService serves an Ed25519, a secp256k1 and a Taproot account side by side, over a real
gRPC server on loopback driven by a stock grpcio client. The other signers of each quorum sign
locally with the suite's :class:`~trio_sign.crypto.Scheme`; the aggregate is checked with the
suite's independent verifier (Taproot also as BIP-340 by libsecp256k1 against the output key).
Then the traps: dealt Taproot keys and group commitments with odd Y, ``taproot_merkle_root``
absent, empty and 32 bytes, a root for a suite that has none, elements of another suite's size,
an invalid secp256k1 point, and retries that differ only in their root. Every refusal leaves
the session's nonces untouched, and the same session then signs.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from coincurve import PublicKeyXOnly

from proto_min import sign_service_pb2 as pb
from trio_sign.crypto import ED25519, SECP256K1, SECP256K1_TR, Scheme
from trio_sign.crypto import _secp256k1 as k1
from trio_sign.crypto import _secp256k1_tr as tr
from trio_sign.enclave import PoolError, PoolErrorKind, SessionPool, SignService
from trio_sign.enclave._service import largest_sign_request_bytes
from trio_sign.rpc import serve_grpc
from trio_sign.shares import AccountShare, ShareRecord, ShareStore, write_plaintext
from trio_sign.transport import open_listeners

grpc: Any = pytest.importorskip("grpc", reason="grpcio is a test dependency")

S = "/trio_sign.v1.SignService/"
SUITES = {"ed25519": ED25519, "secp256k1": SECP256K1, "taproot": SECP256K1_TR}
ROOT = bytes(range(32))
OTHER_ROOT = bytes(range(1, 33))
RESPONSES: dict[str, Any] = {
    "GetAccount": pb.GetAccountResponse,
    "Commit": pb.CommitResponse,
    "Sign": pb.SignResponse,
    "Abort": pb.AbortResponse,
}


# -- accounts ----------------------------------------------------------------------------------


@dataclass
class Dealt:
    """One account's dealt key: every participant's share (test material only)."""

    scheme: Scheme
    account_id: str
    group_public_key: bytes
    shares: dict[bytes, bytearray]
    verifying: dict[bytes, bytes]
    min_signers: int
    max_signers: int

    @property
    def service_identifier(self) -> bytes:
        return self.scheme.identifier_to_bytes(1)

    def record(self) -> ShareRecord:
        """The service's share (identifier 1), as the share file carries it."""
        i = self.service_identifier
        return ShareRecord(
            self.account_id,
            i,
            bytearray(self.shares[i]),
            self.verifying[i],
            self.group_public_key,
            self.min_signers,
            self.max_signers,
            ciphersuite=self.scheme.name,
        )

    def others(self) -> list[bytes]:
        """The other participants of a minimal quorum with the service."""
        ids = [self.scheme.identifier_to_bytes(x) for x in range(2, self.max_signers + 1)]
        return ids[-(self.min_signers - 1) :]


def deal(
    scheme: Scheme, account_id: str, *, t: int = 2, n: int = 3, odd_key: bool | None = None
) -> Dealt:
    """A fresh dealt key; ``odd_key`` (secp256k1 suites) draws until the key's Y has that
    parity (a dealt key is stored as dealt: odd Y stays odd)."""
    while True:
        out = scheme.trusted_dealer_keygen(t, n)
        if odd_key is None or (out.group_public_key[0] == 3) == odd_key:
            break
    return Dealt(
        scheme,
        account_id,
        out.group_public_key,
        {s.identifier: s.signing_share for s in out.shares},
        {s.identifier: s.verifying_share for s in out.shares},
        t,
        n,
    )


def load_store(dealts: Sequence[Dealt]) -> ShareStore:
    """The service's shares of every account, through the plaintext share file and its loader
    (every record fully checked, whatever its suite)."""
    buf = io.BytesIO()
    write_plaintext(buf, [d.record() for d in dealts])
    buf.seek(0)
    return ShareStore.load_plaintext(buf)


# -- the other signers -------------------------------------------------------------------------


class Quorum:
    """The participants other than the service, signing locally with the suite's facade."""

    def __init__(self, dealt: Dealt, signers: Sequence[bytes] | None = None) -> None:
        self.dealt = dealt
        scheme = dealt.scheme
        self.nonces = {
            i: scheme.commit(i, dealt.shares[i])
            for i in (dealt.others() if signers is None else signers)
        }

    def commitments(self, own: Any) -> list[Any]:
        """Every commitment of the session, sorted by identifier (RFC 9591)."""
        order = self.dealt.scheme.identifier_from_bytes
        every = [own, *(n.commitment for n in self.nonces.values())]
        return sorted(every, key=lambda c: order(c.identifier))

    def sign(
        self, message: bytes, commitments: list[Any], merkle_root: bytes | None
    ) -> dict[bytes, bytes]:
        d = self.dealt
        return {
            i: d.scheme.sign(
                nonces,
                signing_share=d.shares[i],
                group_public_key=d.group_public_key,
                message=message,
                commitments=commitments,
                merkle_root=merkle_root,
            )
            for i, nonces in self.nonces.items()
        }


def sign_request(
    session_id: str, message: bytes, commitments: Sequence[Any], merkle_root: bytes | None
) -> Any:
    """A SignRequest; the root field is set only when given (absent is not empty)."""
    request = pb.SignRequest(
        session_id=session_id,
        message=message,
        commitments=[
            pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding)
            for c in commitments
        ],
    )
    if merkle_root is not None:
        request.taproot_merkle_root = merkle_root
    return request


def check_signature(
    dealt: Dealt, message: bytes, signature: bytes, merkle_root: bytes | None
) -> None:
    """The suite's independent verifier accepts it; a Taproot signature is also a valid
    BIP-340 signature (libsecp256k1) under the (tweaked) x-only output key, and under no other
    choice of root."""
    scheme, gpk = dealt.scheme, dealt.group_public_key
    assert len(signature) == scheme.signature_size
    assert scheme.verify(gpk, message, signature, merkle_root)
    if scheme.taproot:
        key = scheme.verifying_key(gpk, merkle_root)
        assert PublicKeyXOnly(key).verify(signature, message)
        for other in (None, b"", ROOT, OTHER_ROOT):
            if other != merkle_root:
                assert not scheme.verify(gpk, message, signature, other)


# -- the server and a stock client -------------------------------------------------------------


@dataclass
class Enclave:
    service: SignService
    client: Client

    @property
    def pool(self) -> SessionPool:
        return self.service.pool

    def nonces(self, session_id: str) -> bytes:
        """A copy of an open session's nonce buffer (to show it is untouched or zeroed)."""
        session = self.pool._sessions[session_id]
        assert session.nonces is not None
        buf: bytearray = session.nonces._buf  # type: ignore[attr-defined]
        return bytes(buf)


class Client:
    """grpcio's synchronous stubs, each call run in a worker thread."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    async def call(self, method: str, request: Any) -> Any:
        stub = self._channel.unary_unary(
            S + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=RESPONSES[method].FromString,
        )
        return await trio.to_thread.run_sync(functools.partial(stub, request, timeout=10))

    async def refused(self, code: str, method: str, request: Any) -> str:
        """Call, expect the status ``code`` (a ``grpc.StatusCode`` name); return the details."""
        with pytest.raises(grpc.RpcError) as info:
            await self.call(method, request)
        assert info.value.code() == getattr(grpc.StatusCode, code), info.value
        details: str = info.value.details()
        return details


@asynccontextmanager
async def enclave(dealts: Sequence[Dealt], **pool_options: Any) -> AsyncIterator[Enclave]:
    store = load_store(dealts)
    pool = SessionPool(store.get, **pool_options)
    service = SignService(store, pool)
    listeners = await open_listeners("tcp://127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run_reaper)
            server = await nursery.start(
                functools.partial(
                    serve_grpc,
                    listeners,
                    service.handlers(),
                    method_limits=service.receive_limits(),
                )
            )
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            try:
                yield Enclave(service, Client(channel))
            finally:
                await trio.to_thread.run_sync(channel.close)
                await server.aclose()
                nursery.cancel_scope.cancel()
    finally:
        store.close()


async def commit(e: Enclave, dealt: Dealt, session_id: str) -> Any:
    """Commit over gRPC; returns the service's commitment as the suite's object."""
    got = await e.client.call(
        "Commit", pb.CommitRequest(account_id=dealt.account_id, session_id=session_id)
    )
    size = dealt.scheme.element_size
    assert got.identifier == dealt.service_identifier
    assert len(got.hiding) == len(got.binding) == size
    return dealt.scheme.commitment(got.identifier, got.hiding, got.binding)


async def sign_session(
    e: Enclave,
    dealt: Dealt,
    session_id: str,
    message: bytes,
    *,
    merkle_root: bytes | None = None,
    quorum: Quorum | None = None,
    own: Any = None,
) -> tuple[bytes, list[Any]]:
    """A whole session (Commit unless ``own`` is given, Sign, local shares, aggregate with
    every share checked, independent verification). Returns the signature and the list."""
    if own is None:
        own = await commit(e, dealt, session_id)
    quorum = quorum if quorum is not None else Quorum(dealt)
    commitments = quorum.commitments(own)
    signed = await e.client.call(
        "Sign", sign_request(session_id, message, commitments, merkle_root)
    )
    assert signed.identifier == dealt.service_identifier
    shares = {signed.identifier: signed.signature_share}
    shares.update(quorum.sign(message, commitments, merkle_root))
    signature = dealt.scheme.aggregate(
        commitments=commitments,
        message=message,
        group_public_key=dealt.group_public_key,
        signature_shares=shares,
        verifying_shares={i: dealt.verifying[i] for i in shares},
        merkle_root=merkle_root,
    )
    check_signature(dealt, message, signature, merkle_root)
    return signature, commitments


def taproot_group_commitment_is_odd(
    dealt: Dealt, message: bytes, commitments: list[Any], merkle_root: bytes | None
) -> bool:
    """Whether the session's group commitment R has odd Y (the signers must then negate)."""
    key = tr.tweak_key(dealt.group_public_key, merkle_root).group_public_key
    parsed = k1._parse(commitments, key, message, suite=tr.SUITE)
    return parsed.group_commitment[0] == 3


# -- every suite, end to end -------------------------------------------------------------------


async def test_get_account_names_each_accounts_suite() -> None:
    dealts = [deal(s, f"{name}-1") for name, s in SUITES.items()]
    async with enclave(dealts) as e:
        for d in dealts:
            got = await e.client.call("GetAccount", pb.GetAccountRequest(account_id=d.account_id))
            assert got.ciphersuite == d.scheme.name
            assert got.group_public_key == d.group_public_key
            assert len(got.group_public_key) == d.scheme.element_size
            assert got.identifier == d.service_identifier
            assert got.verifying_share == d.verifying[d.service_identifier]
            assert (got.min_signers, got.max_signers) == (2, 3)


CASES = [
    ("ed25519", None),
    ("secp256k1", None),
    ("taproot", None),
    ("taproot", b""),
    ("taproot", ROOT),
]


@pytest.mark.parametrize(
    ("suite", "merkle_root"), CASES, ids=["ed25519", "secp256k1", "tr", "tr-empty", "tr-root"]
)
async def test_every_suite_signs_through_grpcio(suite: str, merkle_root: bytes | None) -> None:
    """2-of-3 and 3-of-5 quorums on one server holding every suite; each aggregate verifies
    with the suite's own verifier."""
    scheme = SUITES[suite]
    dealts = [deal(s, f"{name}-1") for name, s in SUITES.items()]
    wide = deal(scheme, f"{suite}-wide", t=3, n=5)
    async with enclave([*dealts, wide]) as e:
        for d in (dealts[list(SUITES).index(suite)], wide):
            for k in range(2):
                await sign_session(
                    e, d, f"{d.account_id}-{k}", b"pay %d" % k, merkle_root=merkle_root
                )
        assert e.pool.open_sessions == 0
        assert e.pool.stats.signed == 4


@pytest.mark.parametrize("merkle_root", [None, b"", ROOT], ids=["no-root", "empty", "root"])
@pytest.mark.parametrize("odd_key", [False, True], ids=["even-key", "odd-key"])
async def test_taproot_odd_y_keys_and_group_commitments(
    odd_key: bool, merkle_root: bytes | None
) -> None:
    """ZF's signing vectors all have an even-Y key and would pass a server that skips the
    even-Y step: here the dealt key has the parity asked for, and sessions run until the group
    commitment has had odd Y and even Y; every one verifies as BIP-340."""
    dealt = deal(SECP256K1_TR, "tr-parity", odd_key=odd_key)
    assert (dealt.group_public_key[0] == 3) is odd_key
    seen: set[bool] = set()
    async with enclave([dealt]) as e:
        for k in range(64):  # each parity is a coin flip: 2**-63 to miss one
            message = b"parity %d" % k
            _sig, commitments = await sign_session(
                e, dealt, f"s-{k}", message, merkle_root=merkle_root
            )
            seen.add(taproot_group_commitment_is_odd(dealt, message, commitments, merkle_root))
            if seen == {False, True}:
                break
    assert seen == {False, True}


async def test_empty_merkle_root_is_not_an_absent_one() -> None:
    """Over the wire too: the field set to b"" tweaks (TapTweak over P.x alone), unset does
    not, so the two signatures verify under different output keys."""
    dealt = deal(SECP256K1_TR, "tr-empty")
    async with enclave([dealt]) as e:
        untweaked, _ = await sign_session(e, dealt, "none", b"m", merkle_root=None)
        tweaked, _ = await sign_session(e, dealt, "empty", b"m", merkle_root=b"")
    gpk = dealt.group_public_key
    assert SECP256K1_TR.verifying_key(gpk, None) != SECP256K1_TR.verifying_key(gpk, b"")
    assert not PublicKeyXOnly(SECP256K1_TR.verifying_key(gpk, None)).verify(tweaked, b"m")
    assert not PublicKeyXOnly(SECP256K1_TR.verifying_key(gpk, b"")).verify(untweaked, b"m")


# -- refusals that leave the session usable ----------------------------------------------------


@pytest.mark.parametrize("merkle_root", [b"", ROOT], ids=["empty", "root"])
@pytest.mark.parametrize("suite", ["ed25519", "secp256k1"])
async def test_a_merkle_root_for_a_suite_without_one_is_refused(
    suite: str, merkle_root: bytes
) -> None:
    dealt = deal(SUITES[suite], f"{suite}-1")
    async with enclave([dealt]) as e:
        own = await commit(e, dealt, "s")
        before = e.nonces("s")
        quorum = Quorum(dealt)
        request = sign_request("s", b"m", quorum.commitments(own), merkle_root)
        details = await e.client.refused("INVALID_ARGUMENT", "Sign", request)
        assert "taproot_merkle_root" in details
        assert dealt.scheme.name in details
        assert e.nonces("s") == before != bytes(len(before))  # untouched, not consumed
        assert e.pool.open_sessions == 1
        # The same session, asked correctly, signs.
        await sign_session(e, dealt, "s", b"m", quorum=quorum, own=own)


@pytest.mark.parametrize("size", [1, 31, 33, 64])
async def test_a_taproot_merkle_root_must_be_empty_or_32_bytes(size: int) -> None:
    dealt = deal(SECP256K1_TR, "tr-1")
    async with enclave([dealt]) as e:
        own = await commit(e, dealt, "s")
        before = e.nonces("s")
        quorum = Quorum(dealt)
        request = sign_request("s", b"m", quorum.commitments(own), bytes(size))
        details = await e.client.refused("INVALID_ARGUMENT", "Sign", request)
        assert details == f"taproot_merkle_root must be empty or 32 bytes, got {size}"
        assert e.nonces("s") == before
        await sign_session(e, dealt, "s", b"m", merkle_root=ROOT, quorum=quorum, own=own)


@dataclass(frozen=True)
class Altered:
    identifier: bytes
    hiding: bytes
    binding: bytes


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The identifier of every commitment object any suite builds (``Scheme.commitment``)."""
    seen: list[bytes] = []
    for scheme in SUITES.values():
        real = type(scheme).commitment

        def counting(
            self: Scheme, identifier: bytes, hiding: bytes, binding: bytes, real: Any = real
        ) -> Any:
            seen.append(identifier)
            return real(self, identifier, hiding, binding)

        monkeypatch.setattr(type(scheme), "commitment", counting)
    return seen


@pytest.mark.parametrize("suite", list(SUITES))
async def test_elements_of_another_suites_size_are_refused(suite: str, built: list[bytes]) -> None:
    """A 33-byte element to an Ed25519 account and a 32-byte one to a secp256k1 account (an
    Ed25519 commitment, or a compressed point without its prefix) are refused by length,
    before any object is built; the session then signs."""
    dealt = deal(SUITES[suite], f"{suite}-1")
    size = dealt.scheme.element_size
    wrong = 32 if size == 33 else 33
    async with enclave([dealt]) as e:
        own = await commit(e, dealt, "s")
        before = e.nonces("s")
        quorum = Quorum(dealt)
        commitments = quorum.commitments(own)
        for index, c in enumerate(commitments):
            if c.identifier == dealt.service_identifier:
                continue
            resized = (c.hiding + b"\x02")[:wrong] if wrong > size else c.hiding[1:]
            bad = list(commitments)
            bad[index] = Altered(c.identifier, resized, c.binding)
            built.clear()
            details = await e.client.refused(
                "INVALID_ARGUMENT", "Sign", sign_request("s", b"m", bad, None)
            )
            assert details == f"commitment {index}: hiding must be {size} bytes, got {wrong}"
            bad[index] = Altered(c.identifier + b"\x00", c.hiding, c.binding)
            details = await e.client.refused(
                "INVALID_ARGUMENT", "Sign", sign_request("s", b"m", bad, None)
            )
            assert details == f"commitment {index}: identifier must be 32 bytes, got 33"
            assert built == []  # refused by length: the pool built nothing
        assert e.nonces("s") == before
        await sign_session(e, dealt, "s", b"m", quorum=quorum, own=own)


@pytest.mark.parametrize("suite", ["secp256k1", "taproot"])
async def test_an_invalid_secp256k1_point_is_refused(suite: str, vectors_dir: Path) -> None:
    """ZF's invalid element (33 bytes, so it passes the length check) as a peer's hiding or
    binding commitment: INVALID_ARGUMENT naming the commitment, nonces untouched."""
    path = vectors_dir / "frost/zcash_frost/frost-secp256k1/elements.json"
    invalid = bytes.fromhex(json.loads(path.read_text())["elements"]["invalid_element"])
    assert len(invalid) == 33
    dealt = deal(SUITES[suite], f"{suite}-1")
    async with enclave([dealt]) as e:
        own = await commit(e, dealt, "s")
        before = e.nonces("s")
        quorum = Quorum(dealt)
        commitments = quorum.commitments(own)
        peer = next(i for i, c in enumerate(commitments) if c.identifier != own.identifier)
        c = commitments[peer]
        for field in ("hiding", "binding"):
            bad = list(commitments)
            bad[peer] = Altered(
                c.identifier,
                invalid if field == "hiding" else c.hiding,
                invalid if field == "binding" else c.binding,
            )
            details = await e.client.refused(
                "INVALID_ARGUMENT", "Sign", sign_request("s", b"m", bad, None)
            )
            ident = dealt.scheme.identifier_from_bytes(c.identifier)
            assert details.startswith(f"{field} commitment of identifier {ident} is not"), details
            assert e.nonces("s") == before
        await sign_session(e, dealt, "s", b"m", quorum=quorum, own=own)


# -- retries -----------------------------------------------------------------------------------


async def test_retries_differ_by_merkle_root() -> None:
    """A byte-identical retry returns the same share; the same request with another root, or
    with the root added, dropped or emptied, is another request for a used session."""
    dealt = deal(SECP256K1_TR, "tr-1")
    ed = deal(ED25519, "ed-1")
    variants: list[bytes | None] = [None, b"", ROOT, OTHER_ROOT]
    async with enclave([dealt, ed]) as e:
        for k, root in enumerate(variants):
            sid = f"s-{k}"
            own = await commit(e, dealt, sid)
            quorum = Quorum(dealt)
            _signature, commitments = await sign_session(
                e, dealt, sid, b"m", merkle_root=root, quorum=quorum, own=own
            )
            first = sign_request(sid, b"m", commitments, root)
            again = await e.client.call("Sign", first)
            assert again.identifier == dealt.service_identifier
            for other in variants:
                if other == root:
                    continue
                details = await e.client.refused(
                    "FAILED_PRECONDITION", "Sign", sign_request(sid, b"m", commitments, other)
                )
                assert "already signed a different request" in details
            # Still the first share, and a Commit retry still gives the 33-byte commitment.
            assert (await e.client.call("Sign", first)).signature_share == again.signature_share
            assert await commit(e, dealt, sid) == own
        assert e.pool.stats.signed == len(variants)

        # An Ed25519 session signed without a root: the same request with one is another one.
        _sig, commitments = await sign_session(e, ed, "ed-s", b"m")
        for other in (b"", ROOT):
            await e.client.refused(
                "FAILED_PRECONDITION", "Sign", sign_request("ed-s", b"m", commitments, other)
            )
        await e.client.call("Sign", sign_request("ed-s", b"m", commitments, None))


async def test_a_retry_returns_the_share_that_verifies() -> None:
    """The share a retry returns is the one the aggregate needs (it was not signed again)."""
    dealt = deal(SECP256K1_TR, "tr-1", odd_key=True)
    async with enclave([dealt]) as e:
        own = await commit(e, dealt, "s")
        quorum = Quorum(dealt)
        commitments = quorum.commitments(own)
        request = sign_request("s", b"m", commitments, ROOT)
        first = await e.client.call("Sign", request)
        retried = await e.client.call("Sign", request)
        assert retried.signature_share == first.signature_share
        shares = {retried.identifier: retried.signature_share}
        shares.update(quorum.sign(b"m", commitments, ROOT))
        signature = SECP256K1_TR.aggregate(
            commitments=commitments,
            message=b"m",
            group_public_key=dealt.group_public_key,
            signature_shares=shares,
            verifying_shares={i: dealt.verifying[i] for i in shares},
            merkle_root=ROOT,
        )
        check_signature(dealt, b"m", signature, ROOT)


# -- the pool's guarantees, for every suite ----------------------------------------------------


def account_share(dealt: Dealt) -> AccountShare:
    i = dealt.service_identifier
    return AccountShare(
        dealt.account_id,
        i,
        memoryview(dealt.shares[i]).toreadonly(),
        dealt.verifying[i],
        dealt.group_public_key,
        dealt.min_signers,
        dealt.max_signers,
        ciphersuite=dealt.scheme.name,
    )


def _expect(kind: PoolErrorKind) -> pytest.RaisesExc[PoolError]:
    return pytest.raises(PoolError, check=lambda e: e.kind is kind)


@pytest.mark.parametrize("suite", list(SUITES))
async def test_nonces_are_zeroed_on_abort_and_expiry(
    suite: str, autojump_clock: trio.testing.MockClock
) -> None:
    dealt = deal(SUITES[suite], "a")
    accounts = {"a": account_share(dealt)}
    pool = SessionPool(accounts.get, session_ttl_s=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        pool.commit("a", "aborted")
        session = pool._sessions["aborted"]
        assert session.nonces is not None
        aborted = session.nonces._buf  # type: ignore[attr-defined]
        assert len(aborted) == 64
        assert any(aborted)
        pool.abort("aborted")
        assert aborted == bytearray(64)
        start = trio.current_time()
        result = pool.commit("a", "expires")
        assert len(result.commitment.hiding) == dealt.scheme.element_size
        session = pool._sessions["expires"]
        assert session.nonces is not None
        expiring = session.nonces._buf  # type: ignore[attr-defined]
        await trio.sleep(5.0)
        await trio.testing.wait_all_tasks_blocked()  # the reaper's turn at the same instant
        assert trio.current_time() - start == 5.0
        assert expiring == bytearray(64)
        assert pool.open_sessions == 0
        assert pool.stats.expired == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("suite", ["secp256k1", "taproot"])
async def test_bounds_then_authorize_then_the_secret(suite: str) -> None:
    """A bad merkle root or element size is refused before ``authorize`` runs; a refusal by
    ``authorize`` leaves the nonces untouched; then the session signs."""
    dealt = deal(SUITES[suite], "a")
    accounts = {"a": account_share(dealt)}
    pool = SessionPool(accounts.get)
    result = pool.commit("a", "s")
    quorum = Quorum(dealt)
    commitments = quorum.commitments(result.commitment)
    asked: list[str] = []

    def refuse(account: AccountShare) -> None:
        asked.append(account.ciphersuite)
        raise PoolError(PoolErrorKind.FAILED_PRECONDITION, "not approved")

    bad_root = b"" if suite == "secp256k1" else bytes(5)
    with _expect(PoolErrorKind.INVALID_ARGUMENT):
        pool.sign("s", b"m", commitments, merkle_root=bad_root, authorize=refuse)
    short = [Altered(c.identifier, c.hiding[1:], c.binding) for c in commitments]
    with _expect(PoolErrorKind.INVALID_ARGUMENT):
        pool.sign("s", b"m", short, authorize=refuse)
    assert asked == []
    with _expect(PoolErrorKind.FAILED_PRECONDITION):
        pool.sign("s", b"m", commitments, authorize=refuse)
    assert asked == [dealt.scheme.name]
    nonces = pool._sessions["s"].nonces
    assert nonces is not None
    assert not nonces.used
    root = ROOT if dealt.scheme.taproot else None
    ident, share = pool.sign("s", b"m", commitments, merkle_root=root, authorize=lambda a: None)
    assert nonces.used
    shares = {ident: share, **quorum.sign(b"m", commitments, root)}
    signature = dealt.scheme.aggregate(
        commitments=commitments,
        message=b"m",
        group_public_key=dealt.group_public_key,
        signature_shares=shares,
        verifying_shares={i: dealt.verifying[i] for i in shares},
        merkle_root=root,
    )
    check_signature(dealt, b"m", signature, root)
    # A Commit retry after Sign gives back the suite's own commitment.
    assert pool.commit("a", "s").commitment == result.commitment


def test_the_default_sign_cap_holds_the_largest_suite() -> None:
    """1000 signers with 33-byte points and a 32-byte merkle root fit the default cap."""
    store = load_store([deal(ED25519, "a")])
    try:
        service = SignService(store, SessionPool(store.get))
        cap = service.receive_limits()[S + "Sign"]
    finally:
        store.close()
    largest = largest_sign_request_bytes(1000)
    assert largest <= cap
    secp = pb.SigningCommitment(identifier=bytes(32), hiding=bytes(33), binding=bytes(33))
    request = pb.SignRequest(
        session_id="s" * 128,
        message=bytes(64 * 1024),
        commitments=[secp] * 1000,
        taproot_merkle_root=bytes(32),
    )
    assert request.ByteSize() == largest
