"""What one connection costs the enclave's server side: TLS listener + gRPC server (issue 11).

    .venv/bin/python scripts/conn_cost.py [--connections N] [--concurrency C] [--profile]

A server process runs the enclave's `TlsListener` (its per-boot P-256 identity, client
certificates from a test CA, no handshake rate limit) in front of `serve_grpc`, on a UNIX socket;
a client process opens ``N`` connections, ``C`` at a time, and for each one completes the TLS
handshake and the HTTP/2 preface, waits 50 ms and leaves ("plain"), or after the preface sends a
burst of 2000 HEADERS + RST_STREAM pairs until the server cuts it ("rapid reset": what each
reconnect of a rapid-reset attacker costs once the server is on flood alert). Printed: the
server process's CPU per connection for each kind, measured by ``getrusage`` over the run (the
client's CPU is not counted). ``--profile`` adds pyinstrument's tree of the server over both
runs (it roughly doubles the CPU; read the proportions).

Measured on the 2-core EPYC (issue 11): plain 2.3 - 2.65 ms, rapid reset 4.1 - 4.9 ms per
connection, almost all of it user time. Under pyinstrument the rapid-reset run is about 30% h2
(``H2Connection.receive_data``), 30% the TLS handshake and 20% writing; but letting the
connection reset fewer streams before the cut (``max_resets_after_flood`` 2 instead of 8)
saves only about 0.15 ms, so the h2 share is mostly per-connection work (preface, SETTINGS,
GOAWAY), not the attacker's streams.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from trio_sign.rpc import CallContext, serve_grpc
from trio_sign.testing import _attacks as atk
from trio_sign.testing import make_ca, make_leaf
from trio_sign.transport import (
    TlsListener,
    TlsSettings,
    connect,
    load_cert_chain,
    open_listeners,
    self_signed_server_context,
)


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def _echo(data: bytes, context: CallContext) -> bytes:
    return data


async def _serve(work: Path) -> None:
    ca = make_ca("conn-cost CA")
    cert, key = make_leaf(ca, "conn-cost client", server=False)
    (work / "client.pem").write_bytes(cert)
    (work / "client.key").write_bytes(key)
    identity = self_signed_server_context(ca.pem)
    async with trio.open_nursery() as nursery:
        listeners = await open_listeners(f"unix://{work}/server.sock")
        tls = TlsListener(
            listeners, identity.context, settings=TlsSettings(max_handshake_rate=math.inf)
        )
        await nursery.start(tls.run)
        await nursery.start(functools.partial(serve_grpc, [tls], {"/a.B/Ping": _echo}))
        print("ready", flush=True)
        while True:  # one line per "cpu" request on stdin: the CPU used so far
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            user, system = _cpu()
            print(f"{user:.6f} {system:.6f} {tls.stats.handshakes}", flush=True)
        nursery.cancel_scope.cancel()


async def _clients(work: Path, count: int, concurrency: int, rapid_reset: bool) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    load_cert_chain(context, (work / "client.pem").read_bytes(), (work / "client.key").read_bytes())
    block = atk.request_header_block("/a.B/Ping", scheme="https")
    burst = b"".join(
        atk.frame(atk.HEADERS, atk.END_HEADERS, sid, block)
        + atk.frame(atk.RST_STREAM, 0, sid, (atk.CANCEL).to_bytes(4, "big"))
        for sid in range(1, 4000, 2)
    )
    limit = trio.Semaphore(concurrency)

    async def one() -> None:
        async with limit:
            stream = trio.SSLStream(
                await connect(f"unix://{work}/server.sock"), context, server_hostname="enclave"
            )
            try:
                await stream.do_handshake()
                await stream.send_all(
                    atk.CONNECTION_PREFACE + atk.settings_frame([]) + atk.SETTINGS_ACK
                )
                await stream.receive_some(65536)
                if rapid_reset:
                    await stream.send_all(burst)
                    while await stream.receive_some(65536):
                        pass
                else:
                    await trio.sleep(0.05)
            except trio.BrokenResourceError:
                pass  # cut by the server: what the rapid-reset run expects
            finally:
                await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        profiler = None
        if os.environ.get("CONN_COST_PROFILE"):
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
        trio.run(_serve, args.serve)
        if profiler is not None:
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False), file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(prefix="conn-cost-") as tmp:
        work = Path(tmp)
        env = dict(os.environ)
        if args.profile:
            env["CONN_COST_PROFILE"] = "1"
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(work)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if args.profile else None,
            text=True,
            env=env,
        )
        assert server.stdin is not None
        assert server.stdout is not None
        try:
            assert server.stdout.readline().strip() == "ready"

            def server_cpu() -> tuple[float, float, int]:
                assert server.stdin is not None
                assert server.stdout is not None
                server.stdin.write("cpu\n")
                server.stdin.flush()
                user, system, handshakes = server.stdout.readline().split()
                return float(user), float(system), int(handshakes)

            for kind, rapid in (("plain", False), ("rapid reset", True)):
                user0, system0, hs0 = server_cpu()
                start = time.perf_counter()
                trio.run(_clients, work, args.connections, args.concurrency, rapid)
                wall = time.perf_counter() - start
                time.sleep(0.3)  # let the server finish closing
                user1, system1, hs1 = server_cpu()
                n = max(1, hs1 - hs0)
                user, system = (user1 - user0) / n * 1000, (system1 - system0) / n * 1000
                print(
                    f"{kind:12} {hs1 - hs0} connections in {wall:.2f} s: server "
                    f"{user + system:.2f} ms CPU per connection ({user:.2f} user, "
                    f"{system:.2f} system)",
                    flush=True,
                )
        finally:
            _, err = server.communicate(timeout=30)  # EOF on its stdin ends the server
            if args.profile and err:
                print(err)


if __name__ == "__main__":
    main()
