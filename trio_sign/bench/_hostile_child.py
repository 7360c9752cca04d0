"""The legitimate client of ``scripts/bench --hostile``: a stock grpcio ``aio`` client process.

Run as ``python -m trio_sign.bench._hostile_child TARGET PEER_SHARES --rate R [--tls-ca ...]``.
It keeps an open-loop Poisson load of Commit+Sign sessions (as the gateway runs them; see
``_loadgen``) until its stdin closes, and prints one JSON line per finished session:
``{"t": scheduled arrival (time.time()), "lat": seconds from the scheduled arrival to the end,
"ok": bool, "err": status name or null}``. Every ``--fresh-every``-th session runs on a fresh
channel (a new connection, as a gateway reconnecting would), so an attack that keeps new
connections out shows. Calls time out after ``--call-timeout`` seconds. With ``--approver
KEY_ID=KEY_FILE`` (repeated) every Sign carries those keys' approvals, as the gateway's
(DESIGN §11; the local stack's policy needs two).

Commands on stdin, one per line:

* ``probe N``: from now, try one session on a fresh channel every ``PROBE_INTERVAL_S``
  (each attempt bounded by ``PROBE_ATTEMPT_S``) until one succeeds or ``--probe-limit``
  seconds pass; prints ``{"probe": N, "recovery_s": seconds or null}``.

Prints ``{"ready": true}`` once the first channel is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from proto_min import sign_service_pb2 as pb

from ..crypto import commit
from ..gateway import GatewayApprover
from ..shares import read_plaintext

SERVICE = "/trio_sign.v1.SignService/"
PROBE_INTERVAL_S = 0.05
PROBE_ATTEMPT_S = 1.0
#: Open loop: arrivals beyond this many sessions in flight are counted as failures.
MAX_OUTSTANDING = 5_000


class _Client:
    def __init__(self, args: argparse.Namespace, accounts: list[tuple[str, Any]]) -> None:
        self._target = args.target
        self._accounts = accounts
        self._next = 0
        self._credentials = None
        self._options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
        keys = dict(item.split("=", 1) for item in args.approver)
        self.approver = (
            GatewayApprover.load({k: Path(v) for k, v in keys.items()}) if keys else None
        )
        if args.tls_ca:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(args.tls_ca).read_bytes(),
                private_key=Path(args.tls_key).read_bytes(),
                certificate_chain=Path(args.tls_cert).read_bytes(),
            )
            self._options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        self.channel = self.open_channel()

    def open_channel(self) -> Any:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self._target, options=self._options)
        return grpc.aio.secure_channel(self._target, self._credentials, options=self._options)

    async def session(self, channel: Any, call_timeout_s: float) -> str | None:
        """One Commit + Sign; ``None`` on success, else the failure's name."""
        i = self._next
        self._next += 1
        account_id, peer = self._accounts[i % len(self._accounts)]
        session_id = f"hostile-{time.time_ns()}-{i}"
        commit_call = channel.unary_unary(
            SERVICE + "Commit",
            request_serializer=pb.CommitRequest.SerializeToString,
            response_deserializer=pb.CommitResponse.FromString,
        )
        sign_call = channel.unary_unary(
            SERVICE + "Sign",
            request_serializer=pb.SignRequest.SerializeToString,
            response_deserializer=pb.SignResponse.FromString,
        )
        try:
            r = await commit_call(
                pb.CommitRequest(account_id=account_id, session_id=session_id),
                timeout=call_timeout_s,
            )
            mine = pb.SigningCommitment(identifier=r.identifier, hiding=r.hiding, binding=r.binding)
            message = session_id.encode()
            approvals = (
                []
                if self.approver is None
                else [a.to_proto() for a in self.approver.approve(account_id, session_id, message)]
            )
            await sign_call(
                pb.SignRequest(
                    session_id=session_id,
                    message=message,
                    commitments=[mine, peer],
                    approvals=approvals,
                ),
                timeout=call_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        except Exception as exc:  # anything else the channel throws counts as a failure
            return type(exc).__name__
        return None


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _one(client: _Client, scheduled: float, fresh: bool, call_timeout_s: float) -> None:
    channel = client.open_channel() if fresh else client.channel
    try:
        err = await client.session(channel, call_timeout_s)
    finally:
        if fresh:
            await channel.close()
    _emit(
        {
            "t": scheduled,
            "lat": time.time() - scheduled,
            "ok": err is None,
            "err": err,
            "fresh": fresh,
        }
    )


async def _probe(client: _Client, n: str, limit: float) -> None:
    start = time.monotonic()
    recovery: float | None = None
    while time.monotonic() - start < limit:
        channel = client.open_channel()
        try:
            err = await client.session(channel, PROBE_ATTEMPT_S)
        finally:
            await channel.close()
        if err is None:
            recovery = time.monotonic() - start
            break
        await asyncio.sleep(PROBE_INTERVAL_S)
    _emit({"probe": n, "recovery_s": recovery})


async def _run(args: argparse.Namespace) -> None:
    with args.peer_shares.open("rb") as f:
        records = list(read_plaintext(f))
    accounts = []
    for rec in records[: args.accounts]:
        c = commit(rec.identifier, rec.signing_share).commitment
        accounts.append(
            (
                rec.account_id,
                pb.SigningCommitment(identifier=c.identifier, hiding=c.hiding, binding=c.binding),
            )
        )
    for rec in records:
        rec.zero()
    client = _Client(args, accounts)
    await asyncio.wait_for(client.channel.channel_ready(), 30.0)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def read_commands() -> None:  # a thread: stdin is a pipe from the bench
        for line in sys.stdin:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "probe":
                loop.call_soon_threadsafe(spawn, _probe(client, parts[1], args.probe_limit))
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_commands, daemon=True).start()
    _emit({"ready": True})
    rng = random.Random(11)
    at = time.time()
    i = 0
    while not stop.is_set():
        at += rng.expovariate(args.rate)
        delay = at - time.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
        i += 1
        if len(tasks) >= MAX_OUTSTANDING:
            _emit({"t": at, "lat": 0.0, "ok": False, "err": "client_shed", "fresh": False})
            continue
        spawn(_one(client, at, i % args.fresh_every == 0, args.call_timeout))
    for task in list(tasks):
        task.cancel()
    await client.channel.close()
    if client.approver is not None:
        client.approver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_sign.bench._hostile_child")
    parser.add_argument("target", help="host:port of the SignService (or the ingress)")
    parser.add_argument("peer_shares", type=Path, help="participant-2 plaintext share file")
    parser.add_argument("--rate", type=float, default=100.0, help="sessions/s (Poisson)")
    parser.add_argument("--accounts", type=int, default=200, help="use the first N accounts")
    parser.add_argument("--call-timeout", type=float, default=2.0, help="seconds per call")
    parser.add_argument("--fresh-every", type=int, default=20, help="new connection every N")
    parser.add_argument("--probe-limit", type=float, default=20.0, help="give up after (s)")
    parser.add_argument(
        "--tls-ca", default=None, help="the root to trust: a CA, or the pinned server certificate"
    )
    parser.add_argument(
        "--approver",
        action="append",
        default=[],
        metavar="KEY_ID=KEY_FILE",
        help="attach this approver key's approval to every Sign (repeat for more)",
    )
    parser.add_argument("--tls-cert", default=None)
    parser.add_argument("--tls-key", default=None)
    parser.add_argument(
        "--tls-server-name", default="localhost", help="the name the server certificate carries"
    )
    args = parser.parse_args(argv)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
