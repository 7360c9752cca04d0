"""open_attested_channel against a test-double enclave (TLS 1.3 with a self-signed P-256
certificate, a client certificate required, GetAttestation from a local NSM), and against the
dishonest parents of issue 13: one that terminates TLS with its own key and relays the nonce
to the real enclave, one that replays a stored document, an enclave serving an older bundle,
a debug-mode enclave. Each is refused with its reason, and nothing but GetAttestation is sent
before the check passes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing

from proto_min import sign_service_pb2 as pb
from trio_sign.attested import (
    CHANNEL_REASONS,
    AttestedChannelError,
    make_attested_client_context,
    open_attested_channel,
)
from trio_sign.nitro import LocalNsm

from .attested_helpers import (
    CONFIG,
    OLD_SHARES,
    SERVICE,
    SHARES,
    FakeEnclave,
    GatewayPki,
    TerminatingRelay,
    connect_pair,
    policy,
)


@pytest.fixture(scope="module")
def nsm() -> Iterator[LocalNsm]:
    local = LocalNsm()
    yield local
    local.close()


@pytest.fixture(scope="module")
def pki() -> GatewayPki:
    return GatewayPki.make()


@pytest.fixture
def enclave(nsm: LocalNsm, pki: GatewayPki) -> FakeEnclave:
    return FakeEnclave(nsm, pki.ca.pem)


async def _refused(
    stream: trio.abc.Stream, pki: GatewayPki, nsm: LocalNsm, **pins: bytes | None
) -> AttestedChannelError:
    with pytest.raises(AttestedChannelError) as info:
        async with open_attested_channel(
            stream,
            policy=policy(root_pem=nsm.root_pem, **pins),  # type: ignore[arg-type]
            client_cert_pem=pki.client_cert,
            client_key_pem=pki.client_key,
        ):
            pytest.fail("the block must not run for a refused channel")
    assert info.value.reason in CHANNEL_REASONS
    assert str(info.value).startswith(f"{info.value.reason}: ")
    assert "\n" not in str(info.value)
    return info.value


async def test_the_happy_path(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    stream = connect_pair(nursery, enclave.serve_tls)
    async with open_attested_channel(
        stream,
        policy=policy(root_pem=nsm.root_pem, config=CONFIG),
        client_cert_pem=pki.client_cert,
        client_key_pem=pki.client_key,
    ) as attested:
        assert enclave.calls == ["GetAttestation"]
        assert attested.verified.peer_spki_der == enclave.spki
        assert attested.verified.binding.shares == SHARES
        assert attested.verified.binding.config == CONFIG
        assert attested.verified.attestation.module_id == nsm.module_id
        assert SHARES.hex()[:16] in repr(attested.verified)
        raw = await attested.channel.unary_unary(
            SERVICE + "Ping", pb.PingRequest(payload=b"hi").SerializeToString()
        )
        assert pb.PingResponse.FromString(raw).payload == b"hi"
    assert enclave.calls == ["GetAttestation", "Ping"]
    # The enclave saw our client certificate on the connection (it requires one).
    assert enclave.client_certs == [pki.client_cert_der]


async def test_a_reused_context_offers_the_client_certificate_each_time(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    context = make_attested_client_context(pki.client_cert, pki.client_key)
    for _ in range(2):
        stream = connect_pair(nursery, enclave.serve_tls)
        async with open_attested_channel(
            stream, policy=policy(root_pem=nsm.root_pem), ssl_context=context
        ):
            pass
    assert enclave.client_certs == [pki.client_cert_der] * 2
    assert enclave.handshakes == 2


async def test_an_enclave_that_wants_a_client_certificate_the_client_lacks_is_unreachable(
    enclave: FakeEnclave, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    """The enclave checks the certificate against its pinned gateway CA: another CA's is
    refused (in TLS 1.3 the client learns it on its first read)."""
    stranger = GatewayPki.make()
    stream = connect_pair(nursery, enclave.serve_tls)
    error = await _refused(stream, stranger, nsm)
    assert error.reason in ("rpc_failed", "unreachable")
    assert error.connection_failure
    assert enclave.calls == []


async def test_a_relay_terminating_tls_with_its_own_key_is_refused(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    """The parent terminates TLS itself and relays GetAttestation, with our nonce, to the
    enclave's public port: the document is genuine and fresh, but binds the enclave's key."""
    relay = TerminatingRelay(enclave, nursery)
    stream = connect_pair(nursery, relay.serve_tls)
    error = await _refused(stream, pki, nsm)
    assert error.reason == "spki_mismatch"
    assert not error.connection_failure
    assert relay.calls == ["GetAttestation"]  # nothing else was sent to it
    assert enclave.calls == ["GetAttestation"]  # the relayed call got a real document


async def test_a_replayed_document_is_refused(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    # A document the enclave really made, bound to its real key, for an earlier nonce.
    enclave.replay = enclave.document(b"\x01" * 32)
    stream = connect_pair(nursery, enclave.serve_tls)
    assert (await _refused(stream, pki, nsm)).reason == "nonce_mismatch"
    # A parent that terminates TLS and answers a stored document fails the same way.
    relay = TerminatingRelay(enclave, nursery, stored=enclave.replay)
    stream = connect_pair(nursery, relay.serve_tls)
    assert (await _refused(stream, pki, nsm)).reason == "nonce_mismatch"
    assert relay.calls == ["GetAttestation"]


async def test_an_enclave_serving_an_older_bundle_is_refused(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    """A rollback: the parent booted the enclave with last month's bundle."""
    enclave.shares = OLD_SHARES
    stream = connect_pair(nursery, enclave.serve_tls)
    error = await _refused(stream, pki, nsm)
    assert error.reason == "shares_mismatch"
    assert OLD_SHARES.hex()[:16] in error.message
    assert enclave.calls == ["GetAttestation"]


async def test_another_measured_configuration_is_refused_when_pinned(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    stream = connect_pair(nursery, enclave.serve_tls)
    error = await _refused(stream, pki, nsm, config=bytes(32))
    assert error.reason == "config_mismatch"


async def test_a_debug_mode_enclave_is_refused(
    nsm: LocalNsm, pki: GatewayPki, nursery: trio.Nursery
) -> None:
    debug = LocalNsm(root_key=nsm._root.key, root_cert=nsm.root_certificate, debug=True)
    enclave = FakeEnclave(debug, pki.ca.pem)
    stream = connect_pair(nursery, enclave.serve_tls)
    assert (await _refused(stream, pki, nsm)).reason == "debug_mode"
    assert enclave.calls == ["GetAttestation"]


async def test_another_root_is_refused(
    enclave: FakeEnclave, pki: GatewayPki, nursery: trio.Nursery
) -> None:
    other = LocalNsm()
    stream = connect_pair(nursery, enclave.serve_tls)
    assert (await _refused(stream, pki, other)).reason == "chain_untrusted"


async def test_a_server_that_does_not_speak_tls_is_tls_failed(
    pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    async def plaintext(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    stream = connect_pair(nursery, plaintext)
    error = await _refused(stream, pki, nsm)
    assert error.reason == "tls_failed"
    assert error.connection_failure


async def test_an_enclave_answering_garbage_is_bad_response(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    async def garbage(request: bytes, context: object) -> bytes:
        return b"\xff\xff\xff"

    enclave.server = type(enclave.server)({SERVICE + "GetAttestation": garbage})
    stream = connect_pair(nursery, enclave.serve_tls)
    assert (await _refused(stream, pki, nsm)).reason == "bad_response"


async def test_cancelled_while_opening_closes_the_connection(
    enclave: FakeEnclave, pki: GatewayPki, nsm: LocalNsm, nursery: trio.Nursery
) -> None:
    """Cancellation mid-handshake or mid-call: nothing is left open, no error but Cancelled."""
    for delay in (0.0, 0.001, 0.01):
        stream = connect_pair(nursery, enclave.serve_tls)
        with trio.move_on_after(delay) as scope:
            async with open_attested_channel(
                stream,
                policy=policy(root_pem=nsm.root_pem),
                client_cert_pem=pki.client_cert,
                client_key_pem=pki.client_key,
            ):
                await trio.sleep_forever()
        assert scope.cancelled_caught


async def test_the_pem_pair_or_a_context_is_required(pki: GatewayPki, nsm: LocalNsm) -> None:
    context = make_attested_client_context(pki.client_cert, pki.client_key)
    pins = policy(root_pem=nsm.root_pem)
    stream, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="or ssl_context"):
        async with open_attested_channel(stream, policy=pins, client_cert_pem=pki.client_cert):
            pass
    with pytest.raises(ValueError, match="not both"):
        async with open_attested_channel(
            stream, policy=pins, ssl_context=context, client_key_pem=pki.client_key
        ):
            pass
