"""The load generator process for ``scripts/bench --grpc``: grpcio ``aio`` sessions, measured.

Run as ``python -m trio_sign.bench._loadgen TARGET PEER_SHARES --server-pid PID ...``; it prints
one JSON object per phase on stdout (see :func:`main` for the phases) and exits.

A session is what the gateway does per signature: ``Commit`` (fresh session id), then ``Sign``
with the service's commitment and the counterpart's (participant 2) sorted by identifier.
The counterpart's part is not the server's throughput, so each account's counterpart
commitment is computed once up front and reused; the server cannot tell and does identical
work. Every ``--verify-every``-th session (default 100) is real end to end instead: fresh
counterpart nonces, and after the phase (outside the timed window) the counterpart signs, the
two shares are aggregated and the signature is checked with ``nacl.signing.VerifyKey``, so a
broken server cannot post a good number.

Latency of a session is from its start (closed loop) or its *scheduled* arrival (open loop,
so that a stalled client or server cannot hide queueing: no coordinated omission) to the
``Sign`` response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nacl.signing

from proto_min import sign_service_pb2 as pb

from ..crypto import SigningCommitment, SigningNonces, aggregate, commit, sign
from ..shares import ShareRecord, read_plaintext
from ._proc import cpu_seconds

SERVICE = "/trio_sign.v1.SignService/"
CALL_TIMEOUT_S = 10.0
#: Open loop: sessions in flight beyond this are not started (counted as ``client_shed``).
MAX_OUTSTANDING = 20_000


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class _Peer:
    record: ShareRecord
    commitment: SigningCommitment  # reused by every unverified session of the account
    commitment_pb: Any


@dataclass
class _Sample:
    peer: _Peer
    message: bytes
    commitments: list[SigningCommitment]
    server_identifier: bytes
    server_share: bytes
    nonces: SigningNonces


@dataclass
class _Window:
    """What happened inside one phase's timed window."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[_Sample] = field(default_factory=list)


class LoadGenerator:
    def __init__(
        self, target: str, peers: list[_Peer], *, channels: int, tag: str, verify_every: int
    ) -> None:
        self._peers = peers
        self._verify_every = verify_every
        self._tag = tag
        self._next = 0
        # Separate subchannel pools so that N channels are N TCP connections.
        self._channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        self._commit = [
            ch.unary_unary(
                SERVICE + "Commit",
                request_serializer=pb.CommitRequest.SerializeToString,
                response_deserializer=pb.CommitResponse.FromString,
            )
            for ch in self._channels
        ]
        self._sign = [
            ch.unary_unary(
                SERVICE + "Sign",
                request_serializer=pb.SignRequest.SerializeToString,
                response_deserializer=pb.SignResponse.FromString,
            )
            for ch in self._channels
        ]

    async def ready(self) -> None:
        for ch in self._channels:
            await asyncio.wait_for(ch.channel_ready(), 10.0)

    async def aclose(self) -> None:
        for ch in self._channels:
            await ch.close()

    async def session(self) -> tuple[str | None, _Sample | None]:
        """One Commit + Sign: ``(None, sample)`` on success (sample only for the sessions
        picked for verification), ``(status code name, None)`` on failure."""
        i = self._next
        self._next += 1
        peer = self._peers[i % len(self._peers)]
        k = i % len(self._channels)
        session_id = f"{self._tag}-{i}"
        message = session_id.encode()
        nonces: SigningNonces | None = None
        peer_commitment, peer_pb = peer.commitment, peer.commitment_pb
        if i % self._verify_every == 0:
            nonces = commit(peer.record.identifier, peer.record.signing_share)
            peer_commitment = nonces.commitment
            peer_pb = pb.SigningCommitment(
                identifier=peer_commitment.identifier,
                hiding=peer_commitment.hiding,
                binding=peer_commitment.binding,
            )
        try:
            r = await self._commit[k](
                pb.CommitRequest(account_id=peer.record.account_id, session_id=session_id),
                timeout=CALL_TIMEOUT_S,
            )
            mine = pb.SigningCommitment(identifier=r.identifier, hiding=r.hiding, binding=r.binding)
            # Identifiers are little-endian scalars; the service is 1 and the peer 2.
            s = await self._sign[k](
                pb.SignRequest(session_id=session_id, message=message, commitments=[mine, peer_pb]),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, None
        if nonces is None:
            return None, None
        commitments = [
            SigningCommitment(bytes(r.identifier), bytes(r.hiding), bytes(r.binding)),
            peer_commitment,
        ]
        return None, _Sample(peer, message, commitments, s.identifier, s.signature_share, nonces)

    def _record(
        self, window: _Window, latency: float, error: str | None, sample: _Sample | None
    ) -> None:
        if error is not None:
            window.errors[error] += 1
            return
        window.latencies.append(latency)
        if sample is not None:
            window.samples.append(sample)

    async def closed_loop(self, concurrency: int, warmup_s: float, duration_s: float) -> _Window:
        """``concurrency`` sessions back to back for ``warmup_s + duration_s``; the sessions
        that end inside the last ``duration_s`` count."""
        window = _Window()
        t0 = time.perf_counter() + warmup_s
        t1 = t0 + duration_s

        async def worker() -> None:
            while True:
                begin = time.perf_counter()
                if begin >= t1:
                    return
                error, sample = await self.session()
                end = time.perf_counter()
                if t0 <= end <= t1:
                    self._record(window, end - begin, error, sample)
                if error is not None:
                    await asyncio.sleep(0.001)  # don't spin on a refusing server

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return window

    async def open_loop(self, rate: float, duration_s: float) -> tuple[_Window, float, int]:
        """Poisson arrivals at ``rate``/s for ``duration_s``; latency from scheduled arrival.

        Returns the window, the wall time until the last session ended, and how many arrivals
        were shed by the client because ``MAX_OUTSTANDING`` sessions were in flight.
        """
        window = _Window()
        rng = random.Random(1)
        tasks: set[asyncio.Task[None]] = set()
        shed = 0

        async def one(scheduled: float) -> None:
            error, sample = await self.session()
            self._record(window, time.perf_counter() - scheduled, error, sample)

        t0 = time.perf_counter()
        at = t0
        end = t0 + duration_s
        while True:
            at += rng.expovariate(rate)
            if at >= end:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= MAX_OUTSTANDING:
                shed += 1
                continue
            task = asyncio.create_task(one(at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=2 * CALL_TIMEOUT_S)
        return window, time.perf_counter() - t0, shed


def _verify(samples: list[_Sample]) -> tuple[int, int]:
    """Finish the sampled sessions as the counterpart would; (verified, failed)."""
    ok = bad = 0
    for sample in samples:
        rec = sample.peer.record
        try:
            peer_share = sign(
                sample.nonces,
                signing_share=rec.signing_share,
                group_public_key=rec.group_public_key,
                message=sample.message,
                commitments=sample.commitments,
            )
            signature = aggregate(
                commitments=sample.commitments,
                message=sample.message,
                group_public_key=rec.group_public_key,
                signature_shares={
                    sample.server_identifier: sample.server_share,
                    rec.identifier: peer_share,
                },
            )
            nacl.signing.VerifyKey(rec.group_public_key).verify(sample.message, signature)
        except Exception:  # any failure (bad share, bad signature) counts against the server
            bad += 1
        else:
            ok += 1
    return ok, bad


def _summary(window: _Window, seconds: float) -> dict[str, Any]:
    lat = sorted(window.latencies)
    verified, failed = _verify(window.samples)
    return {
        "sessions": len(lat),
        "sessions_per_s": len(lat) / seconds if seconds > 0 else 0.0,
        "p50_ms": _percentile(lat, 0.50) * 1000,
        "p99_ms": _percentile(lat, 0.99) * 1000,
        "p999_ms": _percentile(lat, 0.999) * 1000,
        "errors": dict(window.errors),
        "verified": verified,
        "verify_failed": failed,
    }


class _Cpu:
    """Server and client CPU seconds between two points in time."""

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self._server = cpu_seconds(server_pid, missing=float("nan"))
        self._client = time.process_time()

    def stop(self, sessions: int) -> dict[str, float]:
        server = cpu_seconds(self._pid, missing=float("nan")) - self._server
        client = time.process_time() - self._client
        per = max(sessions, 1)
        return {
            "server_cpu_s": server,
            "client_cpu_s": client,
            "server_cpu_us_per_session": server / per * 1e6,
            "client_cpu_us_per_session": client / per * 1e6,
        }


async def _loop_lag(out: list[float], period_s: float = 0.001) -> None:
    """How late this process's event loop wakes a 1 ms sleeper: if the client stalls, open-
    loop sessions scheduled meanwhile start late, and that lateness is in their latency."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(period_s)
        out.append(max(0.0, time.perf_counter() - before - period_s))


async def _timed_closed(
    gen: LoadGenerator, concurrency: int, warmup_s: float, duration_s: float, server_pid: int
) -> dict[str, Any]:
    cpu: list[_Cpu] = []

    async def start_cpu_at_window() -> None:
        await asyncio.sleep(warmup_s)
        cpu.append(_Cpu(server_pid))

    starter = asyncio.create_task(start_cpu_at_window())
    window = await gen.closed_loop(concurrency, warmup_s, duration_s)
    await starter
    result = {"phase": "closed", "concurrency": concurrency, **_summary(window, duration_s)}
    result.update(cpu[0].stop(result["sessions"]))
    return result


async def _run(args: argparse.Namespace) -> None:
    with args.peer_shares.open("rb") as f:
        records = list(read_plaintext(f))
    peers = []
    for rec in records[: args.accounts] if args.accounts else records:
        c = commit(rec.identifier, rec.signing_share).commitment
        peers.append(
            _Peer(
                rec,
                c,
                pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding),
            )
        )
    gen = LoadGenerator(
        args.target, peers, channels=args.channels, tag=args.tag, verify_every=args.verify_every
    )
    try:
        await gen.ready()
        capacity: dict[int, float] = {}
        for n in args.concurrency:
            result = await _timed_closed(gen, n, args.warmup, args.duration, args.server_pid)
            capacity[n] = result["sessions_per_s"]
            print(json.dumps(result), flush=True)
        if args.open_rate is not None or args.open_factor > 0:
            if args.open_rate is not None:
                rate = args.open_rate
            else:
                base = capacity.get(args.open_base) or max(capacity.values())
                rate = args.open_factor * base
            cpu = _Cpu(args.server_pid)
            lag: list[float] = []
            monitor = asyncio.create_task(_loop_lag(lag))
            window, seconds, shed = await gen.open_loop(rate, args.duration)
            monitor.cancel()
            lag.sort()
            result = {
                "phase": "open",
                "offered_per_s": rate,
                "shed": shed,
                **_summary(window, seconds),
                "client_loop_lag_p99_ms": _percentile(lag, 0.99) * 1000,
                "client_loop_lag_max_ms": (lag[-1] if lag else float("nan")) * 1000,
            }
            result.update(cpu.stop(result["sessions"]))
            print(json.dumps(result), flush=True)
    finally:
        await gen.aclose()
        for rec in records:
            rec.zero()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_sign.bench._loadgen")
    parser.add_argument("target", help="host:port of the SignService")
    parser.add_argument("peer_shares", type=Path, help="participant-2 plaintext share file")
    parser.add_argument("--server-pid", type=int, required=True, help="for its CPU time")
    parser.add_argument("--tag", default="bench", help="session id prefix (unique per run)")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument(
        "--verify-every", type=int, default=100, help="finish and verify every Nth session"
    )
    parser.add_argument("--accounts", type=int, default=0, help="use the first N (0: all)")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 64, 256]
    )
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--open-rate", type=float, default=None, help="sessions/s (fixed)")
    parser.add_argument(
        "--open-factor", type=float, default=0.5, help="else this x closed-loop capacity"
    )
    parser.add_argument("--open-base", type=int, default=64, help="at this concurrency")
    args = parser.parse_args(argv)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
