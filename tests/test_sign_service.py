"""SignService over gRPC: full sessions (our client and stock grpcio), every status code of
DESIGN §4, drain, and the ``trio-sign enclave --dev`` process under SIGTERM."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio
import trio.testing

from proto_min import sign_service_pb2 as pb
from trio_sign.crypto import SigningCommitment
from trio_sign.enclave import EnclaveConfig, SessionPool, SignService, serve_dev_enclave
from trio_sign.enclave._serve import EnclaveHandle
from trio_sign.rpc import GrpcChannel, GrpcServer, RpcError, StatusCode, open_grpc_channel
from trio_sign.shares import write_plaintext
from trio_sign.transport import connect

from .enclave_helpers import Account, Peer, make_accounts, sorted_commitments

grpc: Any = pytest.importorskip("grpc", reason="grpcio is a test dependency")

S = "/trio_sign.v1.SignService/"


async def call(ch: GrpcChannel, method: str, request: Any, response_type: Any) -> Any:
    return response_type.FromString(await ch.unary_unary(S + method, request.SerializeToString()))


def _share_file(tmp_path: Path, n: int) -> tuple[Path, dict[str, Account]]:
    store, accounts = make_accounts(n)
    store.close()
    path = tmp_path / "service_key_shares.json"
    with path.open("wb") as f:
        write_plaintext(f, [a.service for a in accounts.values()])
    return path, accounts


@asynccontextmanager
async def running_enclave(
    tmp_path: Path, n: int = 3, **config: Any
) -> AsyncIterator[tuple[EnclaveHandle, dict[str, Account], GrpcChannel]]:
    path, accounts = _share_file(tmp_path, n)
    config.setdefault("drain_grace_s", 1.0)  # a test may leave a session open: bound the wait
    cfg = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0", dev=True, dev_plaintext_shares=path, **config
    )
    async with trio.open_nursery() as nursery:
        handle: EnclaveHandle = await nursery.start(serve_dev_enclave, cfg)
        stream = await connect(handle.addresses[0])
        async with open_grpc_channel(stream) as ch:
            yield handle, accounts, ch
        await handle.drain()


def _commitment(c: Any) -> SigningCommitment:
    return SigningCommitment(bytes(c.identifier), bytes(c.hiding), bytes(c.binding))


def _to_pb(cs: list[SigningCommitment]) -> list[Any]:
    return [
        pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding)
        for c in cs
    ]


async def _expect(code: StatusCode, coro: Any) -> str:
    with pytest.raises(RpcError) as info:
        await coro
    assert info.value.status == code, info.value
    return str(info.value)


async def test_a_drain_lets_open_sessions_sign_then_stops(tmp_path: Path) -> None:
    """SIGTERM or the parent's drain: new sessions get UNAVAILABLE at once, but a session
    committed before the drain still signs over the same connection (no GOAWAY while sessions
    are open), and the drain ends as soon as it has, not at the end of the grace period."""
    async with running_enclave(tmp_path, drain_grace_s=30.0) as (handle, accounts, ch):
        acct = accounts["acct-1"]
        committed = await call(
            ch, "Commit", pb.CommitRequest(account_id="acct-1", session_id="s"), pb.CommitResponse
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle.drain)
            while handle.service.state != "draining":  # noqa: ASYNC110
                await trio.sleep(0.01)
            await _expect(
                StatusCode.UNAVAILABLE,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-2", session_id="t"),
                    pb.CommitResponse,
                ),
            )
            await trio.sleep(0.2)
            assert not handle._stop.is_set()  # still waiting for the open session
            peer = Peer(acct)
            commitments = sorted_commitments(_commitment(committed), peer.commitment)
            signed = await call(
                ch,
                "Sign",
                pb.SignRequest(session_id="s", message=b"m", commitments=_to_pb(commitments)),
                pb.SignResponse,
            )
            peer.complete_and_verify(b"m", commitments, signed.identifier, signed.signature_share)
            with trio.fail_after(5):  # far less than the 30 s grace
                await handle._stop.wait()


async def test_full_session_over_grpc(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as (_handle, accounts, ch):
        acct = accounts["acct-1"]
        info = await call(
            ch, "GetAccount", pb.GetAccountRequest(account_id="acct-1"), pb.GetAccountResponse
        )
        assert info.ciphersuite == "FROST-ED25519-SHA512-v1"
        assert info.group_public_key == acct.group_public_key
        assert info.identifier == acct.service.identifier
        assert info.verifying_share == acct.service.verifying_share
        assert (info.min_signers, info.max_signers) == (2, 3)

        committed = await call(
            ch,
            "Commit",
            pb.CommitRequest(account_id="acct-1", session_id="tx-1"),
            pb.CommitResponse,
        )
        assert committed.expires_at_unix_ms > 0
        peer = Peer(acct)
        commitments = sorted_commitments(_commitment(committed), peer.commitment)
        msg = b"transfer 5 to bob"
        signed = await call(
            ch,
            "Sign",
            pb.SignRequest(session_id="tx-1", message=msg, commitments=_to_pb(commitments)),
            pb.SignResponse,
        )
        assert signed.identifier == acct.service.identifier
        sig = peer.aggregate(
            msg,
            commitments,
            {
                signed.identifier: signed.signature_share,
                acct.peer.identifier: peer.sign(msg, commitments),
            },
        )
        nacl.signing.VerifyKey(acct.group_public_key).verify(msg, sig)

        status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
        assert status.state == "serving"
        assert status.accounts == 3
        assert status.sessions_open == 0
        assert status.sessions_max == 10_000
        assert status.memory_used_bytes > 0
        assert status.memory_limit_bytes >= status.memory_used_bytes
        assert status.version


async def test_status_codes(tmp_path: Path) -> None:
    async with running_enclave(tmp_path, max_sessions=2) as (handle, accounts, ch):
        secrets = [bytes(a.service.signing_share).hex() for a in accounts.values()]
        messages = []
        messages.append(
            await _expect(
                StatusCode.NOT_FOUND,
                call(
                    ch,
                    "GetAccount",
                    pb.GetAccountRequest(account_id="nobody"),
                    pb.GetAccountResponse,
                ),
            )
        )
        messages.append(
            await _expect(
                StatusCode.NOT_FOUND,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="nobody", session_id="x"),
                    pb.CommitResponse,
                ),
            )
        )
        messages.append(
            await _expect(
                StatusCode.NOT_FOUND,
                call(ch, "Sign", pb.SignRequest(session_id="never"), pb.SignResponse),
            )
        )
        messages.append(
            await _expect(
                StatusCode.NOT_FOUND,
                call(ch, "Abort", pb.AbortRequest(session_id="never"), pb.AbortResponse),
            )
        )
        messages.append(
            await _expect(
                StatusCode.INVALID_ARGUMENT,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-0", session_id=""),
                    pb.CommitResponse,
                ),
            )
        )
        messages.append(
            await _expect(
                StatusCode.INVALID_ARGUMENT,
                call(ch, "GetAccount", pb.GetAccountRequest(account_id=""), pb.GetAccountResponse),
            )
        )
        # a request that does not parse as the message type
        with pytest.raises(RpcError) as info:
            await ch.unary_unary(S + "Commit", b"\xff\xff\xff")
        assert info.value.status == StatusCode.INVALID_ARGUMENT

        c0 = await call(
            ch, "Commit", pb.CommitRequest(account_id="acct-0", session_id="s0"), pb.CommitResponse
        )
        messages.append(
            await _expect(
                StatusCode.ALREADY_EXISTS,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-1", session_id="s0"),
                    pb.CommitResponse,
                ),
            )
        )
        await call(
            ch, "Commit", pb.CommitRequest(account_id="acct-1", session_id="s1"), pb.CommitResponse
        )
        messages.append(
            await _expect(
                StatusCode.RESOURCE_EXHAUSTED,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-2", session_id="s2"),
                    pb.CommitResponse,
                ),
            )
        )

        peer = Peer(accounts["acct-0"])
        good = sorted_commitments(_commitment(c0), peer.commitment)
        forged = SigningCommitment(peer.commitment.identifier, bytes(32), peer.commitment.binding)
        messages.append(
            await _expect(
                StatusCode.INVALID_ARGUMENT,
                call(
                    ch,
                    "Sign",
                    pb.SignRequest(
                        session_id="s0",
                        message=b"m",
                        commitments=_to_pb(sorted_commitments(_commitment(c0), forged)),
                    ),
                    pb.SignResponse,
                ),
            )
        )
        messages.append(
            await _expect(
                StatusCode.INVALID_ARGUMENT,
                call(
                    ch,
                    "Sign",
                    pb.SignRequest(session_id="s0", message=b"m", commitments=_to_pb(good[::-1])),
                    pb.SignResponse,
                ),
            )
        )
        messages.append(
            await _expect(
                StatusCode.INVALID_ARGUMENT,
                call(
                    ch,
                    "Sign",
                    pb.SignRequest(
                        session_id="s0", message=b"m", commitments=_to_pb([good[0], good[0]])
                    ),
                    pb.SignResponse,
                ),
            )
        )
        first = await call(
            ch,
            "Sign",
            pb.SignRequest(session_id="s0", message=b"m", commitments=_to_pb(good)),
            pb.SignResponse,
        )
        again = await call(
            ch,
            "Sign",
            pb.SignRequest(session_id="s0", message=b"m", commitments=_to_pb(good)),
            pb.SignResponse,
        )
        assert again == first
        messages.append(
            await _expect(
                StatusCode.FAILED_PRECONDITION,
                call(
                    ch,
                    "Sign",
                    pb.SignRequest(session_id="s0", message=b"n", commitments=_to_pb(good)),
                    pb.SignResponse,
                ),
            )
        )

        handle.service.frozen.add("acct-2")
        messages.append(
            await _expect(
                StatusCode.FAILED_PRECONDITION,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-2", session_id="s3"),
                    pb.CommitResponse,
                ),
            )
        )
        handle.service.frozen.clear()

        await call(ch, "Abort", pb.AbortRequest(session_id="s1"), pb.AbortResponse)
        status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
        assert status.sessions_open == 0

        handle.service.start_draining()
        messages.append(
            await _expect(
                StatusCode.UNAVAILABLE,
                call(ch, "Ping", pb.PingRequest(payload=b"x"), pb.PingResponse),
            )
        )
        messages.append(
            await _expect(
                StatusCode.UNAVAILABLE,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-2", session_id="s4"),
                    pb.CommitResponse,
                ),
            )
        )
        messages.append(
            await _expect(
                StatusCode.UNAVAILABLE,
                call(
                    ch,
                    "GetAttestation",
                    pb.GetAttestationRequest(nonce=b"n"),
                    pb.GetAttestationResponse,
                ),
            )
        )
        status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
        assert status.state == "draining"
        for m in messages:
            assert m
            for s in secrets:
                assert s not in m


async def test_grpcio_client_full_session(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as (handle, accounts, _ch):
        target = handle.addresses[0].removeprefix("tcp://")
        acct = accounts["acct-2"]
        msg = b"grpcio says hello"

        def run_session() -> bytes:
            with grpc.insecure_channel(target) as channel:

                def stub(name: str, resp: Any) -> Any:
                    return channel.unary_unary(
                        S + name,
                        request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=resp.FromString,
                    )

                committed = stub("Commit", pb.CommitResponse)(
                    pb.CommitRequest(account_id="acct-2", session_id="g-1"), timeout=5
                )
                peer = Peer(acct)
                commitments = sorted_commitments(_commitment(committed), peer.commitment)
                signed = stub("Sign", pb.SignResponse)(
                    pb.SignRequest(session_id="g-1", message=msg, commitments=_to_pb(commitments)),
                    timeout=5,
                )
                with pytest.raises(grpc.RpcError) as info:
                    stub("Commit", pb.CommitResponse)(
                        pb.CommitRequest(account_id="nobody", session_id="g-2"), timeout=5
                    )
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                return peer.aggregate(
                    msg,
                    commitments,
                    {
                        signed.identifier: signed.signature_share,
                        acct.peer.identifier: peer.sign(msg, commitments),
                    },
                )

        sig = await trio.to_thread.run_sync(run_session)
        nacl.signing.VerifyKey(acct.group_public_key).verify(msg, sig)


async def test_client_cancellation_leaves_no_slot_after_ttl(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Calls cancelled mid-flight over memory streams: whatever Commit did on the server is
    undone by the TTL; nothing else is held."""
    store, _accounts = make_accounts(3)
    pool = SessionPool(store.get, session_ttl_s=5.0)
    service = SignService(store, pool)
    server = GrpcServer(service.handlers())
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        nursery.start_soon(server.serve_stream, server_stream)
        async with open_grpc_channel(client_stream) as ch:
            async with trio.open_nursery() as calls:
                for i in range(20):

                    async def one(i: int = i) -> None:
                        with trio.move_on_after(0 if i % 2 else 1):
                            await call(
                                ch,
                                "Commit",
                                pb.CommitRequest(account_id=f"acct-{i % 3}", session_id=f"c{i}"),
                                pb.CommitResponse,
                            )

                    calls.start_soon(one)
            assert ch.open_calls == 0
            await trio.sleep(5.0)
            status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
            assert status.sessions_open == 0
            assert pool.tracked_sessions == 0
        await server.aclose()
        nursery.cancel_scope.cancel()
    store.close()


def test_enclave_process_sigterm_drains(tmp_path: Path) -> None:
    path, _ = _share_file(tmp_path, 2)
    exe = Path(sys.executable).with_name("trio-sign")
    proc = subprocess.Popen(
        [
            str(exe),
            "enclave",
            "--dev",
            "--dev-plaintext-shares",
            str(path),
            "--grpc-listen",
            "tcp://127.0.0.1:0",
            "--drain-grace",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stderr is not None
        ready: dict[str, Any] = {}
        for line in proc.stderr:
            record = json.loads(line)
            if record["msg"] == "enclave ready":
                ready = record
                break
        assert ready["accounts"] == 2
        target = ready["grpc"].removeprefix("tcp://")
        with grpc.insecure_channel(target) as channel:
            ping = channel.unary_unary(
                S + "Ping",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.PingResponse.FromString,
            )
            assert ping(pb.PingRequest(payload=b"hi"), timeout=5).payload == b"hi"
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=10) == 0
        assert "draining" in rest
        assert "shares zeroed" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dev-plaintext-shares", "x.json"], "needs --dev"),
        (["--dev"], "--dev needs --dev-plaintext-shares"),
    ],
)
def test_enclave_refuses_bad_flags(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from trio_sign.cli import main

    assert main(["enclave", *args]) == 2  # USAGE, as documented (enclave/_exit.py)
    assert message in capsys.readouterr().err


def test_handler_table_covers_the_contract() -> None:
    store, _ = make_accounts(1)
    service = SignService(store, SessionPool(store.get))
    names = {m.removeprefix(S) for m in service.handlers()}
    assert names == {m.name for m in pb.DESCRIPTOR.services_by_name["SignService"].methods}
    store.close()


async def test_sse_events_reach_the_enclave(tmp_path: Path) -> None:
    """A gateway-like SSE server on loopback: probe, freeze, unfreeze and drain take effect."""
    send_events, receive_events = trio.open_memory_channel[bytes](10)
    requests: list[bytes] = []

    async def gateway(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        requests.append(head)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n\r\n: hello\n\n"
        )
        async for chunk in receive_events:
            await stream.send_all(chunk)

    async def until(predicate: Any) -> None:
        # Real sockets and threads are involved: poll, bounded.
        with trio.fail_after(5):
            while not predicate():  # noqa: ASYNC110
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, gateway, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with running_enclave(
            tmp_path, gateway_url=f"http://127.0.0.1:{port}", node_id="node-7"
        ) as (handle, _accounts, ch):
            assert handle.sse is not None
            await until(lambda: handle.sse is not None and handle.sse.connected)
            assert requests[0].startswith(b"GET /v1/enclaves/node-7/events HTTP/1.1\r\n")
            assert b"accept: text/event-stream" in requests[0].lower()

            await send_events.send(b'id: 1\nevent: probe\ndata: {"nonce": "n-42"}\n\n')
            await send_events.send(b'id: 2\nevent: freeze\ndata: {"account_id": "acct-0"}\n\n')
            await until(lambda: "acct-0" in handle.service.frozen)
            status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
            assert status.last_sse_probe == "n-42"
            await _expect(
                StatusCode.FAILED_PRECONDITION,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-0", session_id="f"),
                    pb.CommitResponse,
                ),
            )

            await send_events.send(b'event: unfreeze\ndata: {"account_id": "acct-0"}\n\n')
            await send_events.send(b"event: mystery\ndata: {}\n\n")  # logged and ignored
            await until(lambda: "acct-0" not in handle.service.frozen)
            await call(
                ch,
                "Commit",
                pb.CommitRequest(account_id="acct-0", session_id="f"),
                pb.CommitResponse,
            )

            await send_events.send(b"event: drain\ndata: {}\n\n")
            await until(lambda: handle.service.state == "draining")
            await _expect(
                StatusCode.UNAVAILABLE,
                call(
                    ch,
                    "Commit",
                    pb.CommitRequest(account_id="acct-1", session_id="g"),
                    pb.CommitResponse,
                ),
            )
        send_events.close()
        nursery.cancel_scope.cancel()
