"""The enclave's signals (issue 12, defects 4 and 8): counters and latency move with real
Commit/Sign round trips through the gRPC server; refusals by reason, the server's own among
them; a small snapshot with bounded labels; GetStatus reports the enforced memory limit."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from proto_min import sign_service_pb2 as pb
from trio_sign import __version__
from trio_sign._metrics import render_snapshot
from trio_sign.crypto import SigningCommitment
from trio_sign.enclave import EnclaveHandle, SessionPool, SignService, serve_enclave
from trio_sign.enclave._memory import MemoryWatermark
from trio_sign.nitro import LocalNsm
from trio_sign.rpc import GrpcChannel, GrpcServer, RpcError, StatusCode, open_grpc_channel
from trio_sign.shares import ShareStore
from trio_sign.transport import connect

from .enclave_helpers import Account, Peer, make_accounts, parent, sorted_commitments

S = "/trio_sign.v1.SignService/"
MIB = 1024 * 1024


@pytest.fixture
def world() -> Iterator[tuple[ShareStore, dict[str, Account]]]:
    store, accounts = make_accounts(2)
    yield store, accounts
    store.close()


@asynccontextmanager
async def grpc_service(service: SignService) -> AsyncIterator[tuple[GrpcChannel, GrpcServer]]:
    server = GrpcServer(service.handlers())
    service.observe_server(server.stats)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_stream)
        async with open_grpc_channel(client_stream) as channel:
            yield channel, server
        await server.aclose()


async def call(ch: GrpcChannel, method: str, request: Any, response_type: Any) -> Any:
    return response_type.FromString(await ch.unary_unary(S + method, request.SerializeToString()))


def samples(snapshot: dict[str, Any], name: str) -> dict[tuple[str, ...], Any]:
    (family,) = [f for f in snapshot["families"] if f["name"] == name]
    return {
        tuple(s[0]): s[1:] if family["type"] == "histogram" else s[1] for s in family["samples"]
    }


async def sign_once(ch: GrpcChannel, account: Account, session_id: str) -> None:
    committed = await call(
        ch,
        "Commit",
        pb.CommitRequest(account_id=account.account_id, session_id=session_id),
        pb.CommitResponse,
    )
    peer = Peer(account)
    mine = SigningCommitment(
        bytes(committed.identifier), bytes(committed.hiding), bytes(committed.binding)
    )
    commitments = sorted_commitments(mine, peer.commitment)
    signed = await call(
        ch,
        "Sign",
        pb.SignRequest(
            session_id=session_id,
            message=b"pay 1",
            commitments=[
                pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding)
                for c in commitments
            ],
        ),
        pb.SignResponse,
    )
    peer.complete_and_verify(b"pay 1", commitments, signed.identifier, signed.signature_share)


async def test_a_signing_round_trip_moves_the_counters_and_the_latency(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    store, accounts = world
    pool = SessionPool(store.get, max_sessions=1)
    service = SignService(store, pool)
    async with grpc_service(service) as (ch, _server):
        await sign_once(ch, accounts["acct-0"], "s-1")
        await sign_once(ch, accounts["acct-1"], "s-2")
        # Refusals: an unknown account, a full pool, a frozen account, a bad Sign.
        with pytest.raises(RpcError):
            await call(
                ch, "Commit", pb.CommitRequest(account_id="nope", session_id="x"), pb.CommitResponse
            )
        await call(
            ch,
            "Commit",
            pb.CommitRequest(account_id="acct-0", session_id="sess-kept-7"),
            pb.CommitResponse,
        )
        with pytest.raises(RpcError):
            await call(
                ch,
                "Commit",
                pb.CommitRequest(account_id="acct-1", session_id="y"),
                pb.CommitResponse,
            )
        service.frozen.add("acct-1")
        with pytest.raises(RpcError):
            await call(
                ch,
                "Commit",
                pb.CommitRequest(account_id="acct-1", session_id="z"),
                pb.CommitResponse,
            )
        with pytest.raises(RpcError):
            await call(
                ch, "Sign", pb.SignRequest(session_id="sess-kept-7", message=b"m"), pb.SignResponse
            )
        await call(ch, "Abort", pb.AbortRequest(session_id="sess-kept-7"), pb.AbortResponse)
        await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
        snapshot = service.metrics.snapshot()

    assert samples(snapshot, "trio_sign_sessions_total") == {
        ("opened", "OK"): 3,
        ("refused", "NOT_FOUND"): 1,
        ("refused", "RESOURCE_EXHAUSTED"): 1,
        ("refused", "FAILED_PRECONDITION"): 1,
    }
    assert samples(snapshot, "trio_sign_signatures_total") == {
        ("signed", "OK"): 2,
        ("refused", "INVALID_ARGUMENT"): 1,
    }
    requests = samples(snapshot, "trio_sign_requests_total")
    assert requests[("Commit", "OK")] == 3
    assert requests[("Abort", "OK")] == 1
    assert requests[("GetStatus", "OK")] == 1
    latency = samples(snapshot, "trio_sign_request_duration_seconds")
    assert set(latency) == {("Commit",), ("Sign",)}
    buckets, total, count = latency[("Commit",)]
    assert count == 6
    assert buckets[-1] <= count
    assert 0 <= total < 60
    assert latency[("Sign",)][2] == 3
    assert samples(snapshot, "trio_sign_sessions_ended_total") == {
        ("signed",): 2,
        ("aborted",): 1,
        ("expired",): 0,
        ("shutdown",): 0,
        ("failed",): 0,
    }
    refusals = samples(snapshot, "trio_sign_refusals_total")
    assert refusals[("pool_full",)] == 1
    assert refusals[("account_frozen",)] == 1
    assert refusals[("draining",)] == 0
    assert samples(snapshot, "trio_sign_pool_sessions_open") == {(): 0}
    assert samples(snapshot, "trio_sign_pool_sessions_max") == {(): 1}
    assert samples(snapshot, "trio_sign_frozen_accounts") == {(): 1}
    assert samples(snapshot, "trio_sign_build_info") == {("enclave", __version__): 1}
    # Small and free of ids: no account or session id anywhere in it.
    wire = json.dumps(snapshot)
    assert len(wire) < 8192
    for secretish in ("acct-0", "acct-1", "s-1", "sess-kept-7", "nope"):
        assert secretish not in wire
    text = render_snapshot(json.loads(wire))
    assert 'trio_sign_signatures_total{outcome="signed",code="OK"} 2\n' in text
    assert 'trio_sign_request_duration_seconds_count{method="Sign"} 3\n' in text


async def test_pool_occupancy_and_the_servers_refusals_are_read_at_snapshot_time(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    store, _ = world
    pool = SessionPool(store.get, max_sessions=4)
    service = SignService(store, pool)
    async with grpc_service(service) as (ch, server):
        await call(
            ch, "Commit", pb.CommitRequest(account_id="acct-0", session_id="a"), pb.CommitResponse
        )
        await call(
            ch, "Commit", pb.CommitRequest(account_id="acct-1", session_id="b"), pb.CommitResponse
        )
        server.stats.floods += 2
        server.stats.connections_refused += 5
        snapshot = service.metrics.snapshot()
    assert samples(snapshot, "trio_sign_pool_sessions_open") == {(): 2}
    assert samples(snapshot, "trio_sign_pool_sessions_tracked") == {(): 2}
    refusals = samples(snapshot, "trio_sign_refusals_total")
    assert refusals[("flood",)] == 2
    assert refusals[("connection_limit",)] == 5
    assert refusals[("stream_refused",)] == 0


async def test_a_call_past_its_deadline_counts_as_deadline_exceeded(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    store, _ = world

    async def slow_attestor(nonce: bytes) -> bytes:
        await trio.sleep(10)
        return b"doc"

    service = SignService(store, SessionPool(store.get), attestor=slow_attestor)
    async with grpc_service(service) as (ch, _server):
        with pytest.raises(RpcError) as info:
            await ch.unary_unary(
                S + "GetAttestation", pb.GetAttestationRequest().SerializeToString(), timeout=1
            )
        assert info.value.status == StatusCode.DEADLINE_EXCEEDED
        await trio.testing.wait_all_tasks_blocked()
        requests = samples(service.metrics.snapshot(), "trio_sign_requests_total")
    assert requests == {("GetAttestation", "DEADLINE_EXCEEDED"): 1}


async def test_expired_sessions_are_counted(
    world: tuple[ShareStore, dict[str, Account]], autojump_clock: trio.testing.MockClock
) -> None:
    store, _ = world
    pool = SessionPool(store.get, session_ttl_s=5)
    service = SignService(store, pool)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        pool.commit("acct-0", "a")
        await trio.sleep(6)
        ended = samples(service.metrics.snapshot(), "trio_sign_sessions_ended_total")
        assert ended[("expired",)] == 1
        pool.commit("acct-1", "b")
        nursery.cancel_scope.cancel()
    assert samples(service.metrics.snapshot(), "trio_sign_sessions_ended_total")[("shutdown",)] == 1


async def test_get_status_reports_the_enforced_memory_limit(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    """Defect 8: with ``--memory-limit 512MiB`` GetStatus said the host's 25 GB. It now says
    what the watermark that refuses sessions uses: its limit and its last sample."""
    store, _ = world
    watermark = MemoryWatermark(512 * MIB, read_used=lambda: 100 * MIB)
    watermark.sample()
    service = SignService(store, SessionPool(store.get), memory=watermark)
    async with grpc_service(service) as (ch, _server):
        status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
    assert status.memory_limit_bytes == 512 * MIB
    assert status.memory_used_bytes == 100 * MIB


async def test_without_a_watermark_get_status_reads_the_same_limit_the_watermark_would(
    world: tuple[ShareStore, dict[str, Account]],
) -> None:
    from trio_sign.enclave._memory import read_memory_limit_bytes

    store, _ = world
    service = SignService(store, SessionPool(store.get))
    async with grpc_service(service) as (ch, _server):
        status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
    assert status.memory_limit_bytes == read_memory_limit_bytes()
    assert 0 < status.memory_used_bytes < math.inf


async def test_the_production_enclave_reports_its_memory_limit_and_server_refusals(
    tmp_path: Path, nsm_dir: Path
) -> None:
    """End to end through ``serve_enclave`` (local NSM, a fake parent): ``--memory-limit
    512MiB`` is what GetStatus says (defect 8), and the gRPC server's refusals reach the
    snapshot the parent is sent."""
    store, accounts = make_accounts(2)
    store.close()
    records = [a.service for a in accounts.values()]
    async with parent(tmp_path, records, nsm_dir) as fake, trio.open_nursery() as nursery:
        handle: EnclaveHandle = await nursery.start(
            functools.partial(
                serve_enclave,
                fake.config(memory_limit_bytes=512 * MIB),
                nsm=LocalNsm.from_dir(nsm_dir),
            )
        )
        async with open_grpc_channel(await connect(handle.addresses[0])) as ch:
            status = await call(ch, "GetStatus", pb.GetStatusRequest(), pb.GetStatusResponse)
        assert status.memory_limit_bytes == 512 * MIB
        assert 0 < status.memory_used_bytes < 512 * MIB
        handle.server.stats.floods += 1
        snapshot = handle.service.metrics.snapshot()
        assert samples(snapshot, "trio_sign_refusals_total")[("flood",)] == 1
        assert samples(snapshot, "trio_sign_requests_total")[("GetStatus", "OK")] == 1
        await handle.drain()
