"""What attested TLS in the enclave costs per session (issue 13, deliverable 2).

    .venv/bin/python scripts/tls_cost.py [--rounds N] [--calls N]

One process, one Trio loop, loopback TCP: the enclave's SignService behind the real
TlsListener (per-boot P-256 key, TLS 1.3, client certificates from a pinned CA) and, for the
baseline, the same service in h2c. Attestation documents come from the local NSM (ES384 over a
fresh leaf, as the NSM does). Measured, client and server CPU together (the loop runs both):

* a new connection, h2c: connect + Ping;
* a new attested connection: connect + TLS handshake + GetAttestation with a fresh nonce on the
  same connection + the client's check (``verify_attestation``, SPKI = peer certificate) + Ping;
  the same without the attestation, to split TLS from the attestation;
* steady state on a kept connection: Ping, h2c vs TLS (TLS adds AES-GCM over the bytes; a
  Commit or Sign moves a few hundred bytes, so its TLS share is this Ping's).
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import ssl
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proto_min import sign_service_pb2 as pb
from trio_sign.enclave import SessionPool, SignService
from trio_sign.nitro import LocalNsm, verify_attestation
from trio_sign.nitro._binding import NO_DELTAS, Binding, encode_binding
from trio_sign.rpc import GrpcServer, open_grpc_channel, serve_grpc
from trio_sign.shares import ShareStore
from trio_sign.testing import generate_share_files, make_ca, make_leaf
from trio_sign.transport import (
    TlsListener,
    connect,
    load_cert_chain,
    open_listeners,
    self_signed_server_context,
)

S = "/trio_sign.v1.SignService/"


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples) * 1000
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000
    return f"p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  (n={len(samples)})"


async def _timed(n: int, op: Callable[[], Awaitable[None]]) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await op()
        out.append(time.perf_counter() - start)
    return out


async def main(rounds: int, calls: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="tls-cost-"))
    gen = generate_share_files(work / "shares", 50)
    with gen.service_file.open("rb") as f:
        store = ShareStore.load_plaintext(f)
    ca = make_ca("bench gateway CA")
    cert, key = make_leaf(ca, "bench gateway", server=False)
    identity = self_signed_server_context(ca.pem)
    nsm = LocalNsm()
    binding = encode_binding(Binding(shares=bytes(32), deltas=NO_DELTAS, config=bytes(32)))

    async def attest(nonce: bytes) -> bytes:
        return await trio.to_thread.run_sync(
            lambda: nsm.attestation(user_data=binding, nonce=nonce, public_key=identity.spki_der)
        )

    pool = SessionPool(store.get)
    service = SignService(
        store, pool, attestor=attest, attestation_rate_per_s=1e6, attestation_burst=10**6
    )
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the attestation check proves the server instead
    client.set_alpn_protocols(["h2"])
    load_cert_chain(client, cert, key)

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_reaper)
        plain = await open_listeners("tcp://127.0.0.1:0")
        tls_plain = await open_listeners("tcp://127.0.0.1:0")
        tls = TlsListener(tls_plain, identity.context)
        await nursery.start(tls.run)
        servers: list[GrpcServer] = [
            await nursery.start(serve_grpc, plain, service.handlers()),
            await nursery.start(serve_grpc, [tls], service.handlers()),
        ]
        h2c_url = f"tcp://127.0.0.1:{plain[0].socket.getsockname()[1]}"
        tls_url = f"tcp://127.0.0.1:{tls_plain[0].socket.getsockname()[1]}"
        ping = pb.PingRequest(payload=b"x" * 16).SerializeToString()

        async def new_h2c() -> None:
            async with open_grpc_channel(await connect(h2c_url)) as ch:
                await ch.unary_unary(S + "Ping", ping)

        async def new_tls(*, attest_it: bool) -> None:
            stream = trio.SSLStream(await connect(tls_url), client, server_hostname="enclave")
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
            assert der
            spki = (
                x509.load_der_x509_certificate(der)
                .public_key()
                .public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            async with open_grpc_channel(stream) as ch:
                if attest_it:
                    nonce = secrets.token_bytes(32)
                    raw = await ch.unary_unary(
                        S + "GetAttestation",
                        pb.GetAttestationRequest(nonce=nonce).SerializeToString(),
                    )
                    document = pb.GetAttestationResponse.FromString(raw).document
                    verified = verify_attestation(
                        document, root_pem=nsm.root_pem, expected_nonce=nonce
                    )
                    assert verified.public_key == spki
                await ch.unary_unary(S + "Ping", ping)

        print(f"new connections ({rounds} each):")
        print(f"  h2c connect + Ping                          {_ms(await _timed(rounds, new_h2c))}")
        print(
            "  TLS connect + handshake + Ping              "
            f"{_ms(await _timed(rounds, lambda: new_tls(attest_it=False)))}"
        )
        print(
            "  TLS + GetAttestation + client check + Ping  "
            f"{_ms(await _timed(rounds, lambda: new_tls(attest_it=True)))}"
        )

        print(f"kept connection ({calls} calls each):")
        for name, url in (("h2c", h2c_url), ("TLS", tls_url)):
            if name == "TLS":
                stream: trio.abc.Stream = trio.SSLStream(
                    await connect(url), client, server_hostname="enclave"
                )
            else:
                stream = await connect(url)
            async with open_grpc_channel(stream) as ch:

                async def one_ping(ch: object = ch) -> None:
                    await ch.unary_unary(S + "Ping", ping)  # type: ignore[attr-defined]

                await _timed(50, one_ping)  # warm up
                print(f"  {name} Ping{' ' * 39}{_ms(await _timed(calls, one_ping))}")
        for server in servers:
            await server.aclose()
        await tls.aclose()
        nursery.cancel_scope.cancel()
    store.close()
    print(f"(spki sha256 {hashlib.sha256(identity.spki_der).hexdigest()[:16]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.calls)
