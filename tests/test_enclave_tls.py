"""The attested channel in the enclave (DESIGN §10): the full API behind TLS 1.3 with client
certificates from the measured CA, the public h2c port with three methods, GetAttestation
binding the SPKI of the certificate this very connection presented, and the TLS listener's
bounds (handshake deadline, handshakes in progress, the oldest evicted) in virtual time."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proto_min import sign_service_pb2 as pb
from trio_sign.enclave import serve_dev_enclave, serve_enclave
from trio_sign.enclave._measured import MeasuredConfig, parse_measured_config
from trio_sign.enclave._serve import EnclaveHandle
from trio_sign.nitro import LocalNsm, verify_attestation
from trio_sign.nitro._binding import NO_DELTAS, decode_binding
from trio_sign.rpc import RpcError, StatusCode, open_grpc_channel
from trio_sign.shares import write_plaintext
from trio_sign.testing import make_ca, make_leaf
from trio_sign.testing._pki import CertificateAuthority
from trio_sign.transport import (
    TlsListener,
    TlsSettings,
    connect,
    self_signed_server_context,
)

from .enclave_helpers import make_accounts, parent
from .share_helpers import make_record
from .test_metrics_enclave import samples

S = "/trio_sign.v1.SignService/"


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    measured: MeasuredConfig
    client: tuple[bytes, bytes]  # a gateway certificate from the pinned CA
    stranger: tuple[bytes, bytes]  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = make_ca("gateway client CA")
    other = make_ca("some other CA")
    text = f"[gateway]\nclient_ca_pem = '''\n{ca.pem.decode()}'''\n"
    # an open default policy, written out (issue 14): these tests are about TLS, not approvals
    text += "\n[policies.default]\napprovers = []\nthreshold = 0\n"
    return Pki(
        ca=ca,
        measured=parse_measured_config(text.encode(), source="test enclave.toml"),
        client=make_leaf(ca, "gateway-1", server=False),
        stranger=make_leaf(other, "intruder", server=False),
    )


def client_context(cert: tuple[bytes, bytes] | None, *, tls12: bool = False) -> ssl.SSLContext:
    """A gateway-like client: ALPN h2, our certificate; the server's self-signed certificate
    is checked by its SPKI against the attestation, not by a CA (so no CA check here)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        from trio_sign.transport import load_cert_chain

        load_cert_chain(context, cert[0], cert[1])
    return context


async def tls_connect(address: str, context: ssl.SSLContext) -> trio.SSLStream[trio.abc.Stream]:
    plain: trio.abc.Stream = await connect(address)
    tls = trio.SSLStream(plain, context, server_hostname="trio-sign-enclave")
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


def peer_spki(tls: trio.SSLStream[trio.abc.Stream]) -> bytes:
    der = tls.getpeercert(binary_form=True)
    assert der
    return (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.fixture
def shares(tmp_path: Path) -> Path:
    path = tmp_path / "shares.json"
    with path.open("wb") as f:
        write_plaintext(f, [make_record(f"acct-{i}") for i in range(2)])
    return path


@asynccontextmanager
async def dev_enclave(tmp_path: Path, shares: Path, pki: Pki) -> AsyncIterator[EnclaveHandle]:
    """``trio-sign enclave --dev --tls`` with a public port, on UNIX sockets."""
    from trio_sign.enclave._config import enclave_config

    config = enclave_config(
        pki.measured,
        grpc_listen=f"unix://{tmp_path}/grpc.sock",
        public_listen=f"unix://{tmp_path}/public.sock",
        tls=True,
        dev=True,
        dev_plaintext_shares=shares,
        drain_grace_s=0.5,
    )
    async with trio.open_nursery() as nursery:
        handle: EnclaveHandle = await nursery.start(serve_dev_enclave, config)
        yield handle
        await handle.drain()


async def _ping(stream: trio.abc.Stream) -> bytes:
    async with open_grpc_channel(stream) as channel:
        return await channel.unary_unary(
            S + "Ping", pb.PingRequest(payload=b"hi").SerializeToString(), timeout=5
        )


async def test_full_api_needs_a_certificate_from_the_pinned_ca(
    tmp_path: Path, shares: Path, pki: Pki
) -> None:
    async with dev_enclave(tmp_path, shares, pki) as handle:
        address = handle.addresses[0]
        assert handle.tls is not None
        # a gateway with a certificate from the CA in enclave.toml: served
        good = await tls_connect(address, client_context(pki.client))
        assert good.selected_alpn_protocol() == "h2"
        assert pb.PingResponse.FromString(await _ping(good)).payload == b"hi"
        # no client certificate: TLS 1.3 finishes the client's side, the server's alert
        # arrives on the first read, and nothing is served
        for cert in (None, pki.stranger):
            refused_before = handle.tls.stats.refused
            stream = await tls_connect(address, client_context(cert))
            with pytest.raises((RpcError, trio.BrokenResourceError, ExceptionGroup)):
                await _ping(stream)
            with trio.fail_after(5):
                while handle.tls.stats.refused == refused_before:  # noqa: ASYNC110
                    await trio.sleep(0.01)
        # TLS 1.2: refused in the handshake
        with pytest.raises(trio.BrokenResourceError):
            await tls_connect(address, client_context(pki.client, tls12=True))
        # plain h2c on the TLS port: never reaches the gRPC server
        with pytest.raises((RpcError, trio.BrokenResourceError, ExceptionGroup)):
            await _ping(await connect(address))
        assert handle.tls.stats.handshakes == 1
        assert handle.server.stats.connections_refused == 0
        # the TLS listener's refusals reach the enclave's metrics (issue 11)
        refusals = samples(handle.service.metrics.snapshot(), "trio_sign_refusals_total")
        assert refusals[("tls_refused",)] == handle.tls.stats.refused >= 3
        assert refusals[("tls_handshake_timeout",)] == 0


async def test_public_port_serves_only_three_methods(
    tmp_path: Path, shares: Path, pki: Pki
) -> None:
    async with dev_enclave(tmp_path, shares, pki) as handle:
        [public] = handle.public_addresses
        async with open_grpc_channel(await connect(public)) as channel:
            ping = await channel.unary_unary(
                S + "Ping", pb.PingRequest(payload=b"p").SerializeToString(), timeout=5
            )
            assert pb.PingResponse.FromString(ping).payload == b"p"
            status = pb.GetStatusResponse.FromString(
                await channel.unary_unary(S + "GetStatus", b"", timeout=5)
            )
            assert status.config_sha256 == pki.measured.sha256.hex()
            assert status.accounts == 2
            # GetAttestation is there (in --dev there is no NSM, so UNAVAILABLE, not
            # UNIMPLEMENTED)
            with pytest.raises(RpcError) as caught:
                await channel.unary_unary(S + "GetAttestation", b"", timeout=5)
            assert caught.value.status == StatusCode.UNAVAILABLE
            for method, request in (
                ("GetAccount", pb.GetAccountRequest(account_id="acct-0")),
                ("Commit", pb.CommitRequest(account_id="acct-0", session_id="s")),
                ("Sign", pb.SignRequest(session_id="s")),
                ("Abort", pb.AbortRequest(session_id="s")),
            ):
                with pytest.raises(RpcError) as caught:
                    await channel.unary_unary(S + method, request.SerializeToString(), timeout=5)
                assert caught.value.status == StatusCode.UNIMPLEMENTED, method
        # the same calls on the TLS port are served
        async with open_grpc_channel(
            await tls_connect(handle.addresses[0], client_context(pki.client))
        ) as channel:
            account = pb.GetAccountResponse.FromString(
                await channel.unary_unary(
                    S + "GetAccount",
                    pb.GetAccountRequest(account_id="acct-0").SerializeToString(),
                    timeout=5,
                )
            )
            assert account.account_id == "acct-0"


async def test_attestation_binds_the_tls_key_of_this_connection(
    tmp_path: Path, nsm_dir: Path, pki: Pki
) -> None:
    """Production tree (local NSM, parent double): GetAttestation asked on the TLS connection
    binds the SPKI of the certificate that connection presented, the shares fingerprint, no
    deltas and the measured configuration; the public port answers the same binding."""
    store, accounts = make_accounts(3)
    store.close()
    records = [a.service for a in accounts.values()]
    nsm = LocalNsm.from_dir(nsm_dir)
    async with parent(tmp_path, records, nsm_dir) as fake, trio.open_nursery() as nursery:
        config = fake.config(
            measured=pki.measured,
            tls=True,
            public_listen=f"unix://{fake.dir}/public.sock",
        )
        handle: EnclaveHandle = await nursery.start(
            functools.partial(serve_enclave, config, nsm=nsm)
        )
        sha = hashlib.sha256(fake.bundle.read_bytes()).digest()
        tls = await tls_connect(handle.addresses[0], client_context(pki.client))
        spki = peer_spki(tls)
        assert handle.identity is not None
        assert spki == handle.identity.spki_der
        async with open_grpc_channel(tls) as channel:
            raw = await channel.unary_unary(
                S + "GetAttestation",
                pb.GetAttestationRequest(nonce=b"fresh nonce").SerializeToString(),
                timeout=5,
            )
            document = pb.GetAttestationResponse.FromString(raw).document
        verified = verify_attestation(
            document, root_pem=nsm.root_pem, expected_nonce=b"fresh nonce"
        )
        assert verified.public_key == spki
        binding = decode_binding(verified.user_data)
        assert binding.shares == sha
        assert binding.deltas == NO_DELTAS
        assert binding.config == pki.measured.sha256
        async with open_grpc_channel(await connect(handle.public_addresses[0])) as channel:
            raw = await channel.unary_unary(
                S + "GetAttestation",
                pb.GetAttestationRequest(nonce=b"n2").SerializeToString(),
                timeout=5,
            )
        public_doc = verify_attestation(
            pb.GetAttestationResponse.FromString(raw).document,
            root_pem=nsm.root_pem,
            expected_nonce=b"n2",
        )
        assert public_doc.public_key == spki
        assert public_doc.user_data == verified.user_data
        await handle.drain()


async def test_production_tls_without_a_ca_is_a_usage_exit(tmp_path: Path, nsm_dir: Path) -> None:
    from trio_sign.enclave import EnclaveExit, ExitCode

    store, accounts = make_accounts(1)
    store.close()
    async with parent(tmp_path, [a.service for a in accounts.values()], nsm_dir) as fake:
        no_ca = parse_measured_config(b"[limits]\nmax_sessions = 5\n")
        config = fake.config(tls=True, measured=no_ca)
        with pytest.raises(BaseException) as caught:  # noqa: PT011 - unwrapped below
            await serve_enclave(config, nsm=LocalNsm.from_dir(nsm_dir))
        exc: BaseException = caught.value
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        assert isinstance(exc, EnclaveExit)
        assert exc.code == ExitCode.USAGE
        assert "[gateway] client_ca_pem" in str(exc)
    assert fake.exits == [2]


# -- TlsListener bounds, in virtual time -----------------------------------------------------


class _MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands out the server ends of memory stream pairs the test opens."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](100)

    def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self._send.send_nowait(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()


async def _closed(stream: trio.abc.Stream) -> bool:
    """Whether the server closed its end: the client reads EOF or a broken stream."""
    await trio.testing.wait_all_tasks_blocked()
    try:
        with trio.move_on_after(0.001) as scope:
            data = await stream.receive_some(1)
    except trio.BrokenResourceError:
        return True
    return not scope.cancelled_caught and data == b""


async def test_stalled_handshake_is_cut_at_the_deadline(
    autojump_clock: trio.testing.MockClock, pki: Pki
) -> None:
    identity = self_signed_server_context(pki.ca.pem)
    inner = _MemoryListener()
    listener = TlsListener([inner], identity.context, settings=TlsSettings(handshake_timeout_s=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        start = trio.current_time()
        client = inner.connect()  # says nothing
        await trio.sleep(4.9)
        assert listener.stats.timeouts == 0
        assert not await _closed(client)
        await trio.sleep(0.2)
        assert listener.stats.timeouts == 1
        assert await _closed(client)
        assert trio.current_time() - start == pytest.approx(5.1, abs=0.01)
        await listener.aclose()
        nursery.cancel_scope.cancel()


async def test_handshakes_in_progress_are_bounded_oldest_evicted(
    autojump_clock: trio.testing.MockClock, pki: Pki
) -> None:
    """At max_handshakes a waiting connection ends the oldest handshake in progress once that
    one is handshake_evict_age_s old, not before; a real client then completes."""
    identity = self_signed_server_context(pki.ca.pem)
    inner = _MemoryListener()
    settings = TlsSettings(handshake_timeout_s=30, max_handshakes=1, handshake_evict_age_s=1.0)
    listener = TlsListener([inner], identity.context, settings=settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        stalled = inner.connect()  # memory streams have no socket: in a handshake at once
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        late = inner.connect()
        await trio.sleep(0.5)
        assert listener.stats.handshakes_evicted == 0
        assert not await _closed(stalled)
        await trio.sleep(0.6)
        assert listener.stats.handshakes_evicted == 1
        assert await _closed(stalled)
        assert trio.current_time() - t0 == pytest.approx(1.1, abs=0.01)
        # the late one holds the slot now and completes a real handshake
        client = trio.SSLStream(late, client_context(pki.client), server_hostname="x")
        async with trio.open_nursery() as both:
            both.start_soon(client.do_handshake)
            served = await listener.accept()
            both.start_soon(served.do_handshake)
        assert served.selected_alpn_protocol() == "h2"
        assert listener.stats.handshakes == 1
        await trio.aclose_forcefully(served)
        await listener.aclose()
        nursery.cancel_scope.cancel()


async def test_silent_connections_are_bounded(
    autojump_clock: trio.testing.MockClock, pki: Pki
) -> None:
    """Beyond max_pending the oldest connection that has not started a handshake is closed.
    (Real sockets: a silent one waits for its first byte, holding no TLS state.)"""
    identity = self_signed_server_context(pki.ca.pem)
    settings = TlsSettings(max_pending=2, handshake_timeout_s=60)
    sockets = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = sockets[0].socket.getsockname()[1]
    listener = TlsListener(sockets, identity.context, settings=settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        with trio.fail_after(5):
            while listener.stats.pending_evicted == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert listener.stats.pending_evicted == 1
        for client in clients:
            await client.aclose()
        await listener.aclose()
        nursery.cancel_scope.cancel()


async def test_handshake_slots_go_to_the_newest_waiting_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under a burst, a connection that arrives later (a gateway reconnecting) gets the next
    free handshake slot instead of queueing behind the whole burst; each waiter gets one.
    (The parent's ingress did this before TLS moved into the enclave.)"""
    from trio_sign.transport._tls_listener import TlsStats, _Conn, _Slots

    settings = TlsSettings(max_handshakes=2, handshake_evict_age_s=100.0)
    slots = _Slots(settings, TlsStats(), lambda what: None)
    order: list[int] = []

    async def one(i: int) -> None:
        conn = _Conn()
        slots.start_pending(conn)
        try:
            with conn.scope:
                await slots.start_handshake(conn)
                order.append(i)
                await trio.sleep(1.0)  # the handshake
        finally:
            slots.end_pending(conn)
            slots.end_handshake(conn)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
            await trio.sleep(0.01)
    assert order == [0, 1, 5, 4, 3, 2]
    assert not slots.handshaking
    assert not slots.queue
    assert not slots.pending


async def test_handshake_starts_are_rate_limited_after_a_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A flood of clients with valid certificates (each full handshake costs ~2.3 ms of server
    CPU) gets at most ``max_handshake_rate`` handshakes per second after a burst of
    ``max_handshakes``, so the connections already serving keep most of the event loop; the
    newest waiting connection still goes first."""
    from trio_sign.transport._tls_listener import TlsStats, _Conn, _Slots

    settings = TlsSettings(max_handshakes=4, max_handshake_rate=10.0, handshake_timeout_s=60)
    stats = TlsStats()
    limited: list[str] = []
    slots = _Slots(settings, stats, limited.append)
    started: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        conn = _Conn()
        slots.start_pending(conn)
        try:
            with conn.scope:
                await slots.start_handshake(conn)
                started.append((i, trio.current_time()))
                await trio.sleep(0.001)  # a fast handshake: the rate, not the slots, binds
        finally:
            slots.end_pending(conn)
            slots.end_handshake(conn)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(24):
            nursery.start_soon(one, i)
            await trio.sleep(0.001)  # arrivals 1 ms apart, so "newest" is well defined
    times = [t - t0 for _, t in started]
    assert len(times) == 24
    # the burst of 4 starts on arrival, then one every 0.1 s: 20 more take about 2 s
    assert times[:4] == pytest.approx([0.0, 0.001, 0.002, 0.003], abs=1e-6)
    assert times[-1] == pytest.approx(2.003, abs=0.01)
    for earlier, later in itertools.pairwise(times[4:]):
        assert later - earlier == pytest.approx(0.1, abs=1e-6)
    # newest first among those that waited
    waited = [i for i, _ in started[4:]]
    assert waited == sorted(waited, reverse=True)
    assert stats.rate_limited == 20
    assert set(limited) == {"rate"}


def test_rate_limit_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="max_handshake_rate"):
        TlsSettings(max_handshake_rate=0)
    assert TlsSettings(max_handshake_rate=math.inf).max_handshake_rate == math.inf


def test_the_enclave_mints_no_session_tickets(pki: Pki) -> None:
    """Half of a TLS 1.3 server handshake's CPU (OpenSSL 3.0) is minting the two default
    session tickets: the enclave's context sends none (its clients re-attest on every
    connection, so resumption would buy nothing), and an attacker's handshakes cost less."""
    identity = self_signed_server_context(pki.ca.pem)
    sin, sout, cin, cout = (ssl.MemoryBIO() for _ in range(4))
    server = identity.context.wrap_bio(sin, sout, server_side=True)
    client = client_context(pki.client).wrap_bio(cin, cout, server_hostname="enclave")
    done = [False, False]
    for _ in range(10):
        for i, (side, into, out) in enumerate(((client, sin, cout), (server, cin, sout))):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            into.write(out.read())
        if all(done):
            break
    assert all(done)
    # Whatever the server sent after its handshake (NewSessionTicket messages) is processed
    # by a client read; none arrived, so the client holds no ticket to resume with.
    with pytest.raises(ssl.SSLWantReadError):
        client.read(1)
    assert client.session is not None
    assert not client.session.has_ticket
