"""Address URLs to Trio streams and listeners: tcp://, unix://, vsock://."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

import trio_sign
import trio_sign.transport
from trio_sign.transport import (
    VMADDR_CID_ANY,
    Address,
    TransportError,
    connect,
    open_listeners,
    parse_address,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:50051", Address("tcp", host="127.0.0.1", port=50051)),
        ("tcp://localhost:1", Address("tcp", host="localhost", port=1)),
        ("tcp://[::1]:8080", Address("tcp", host="::1", port=8080)),
        ("tcp://:50051", Address("tcp", host="", port=50051)),
        ("TCP://0.0.0.0:0", Address("tcp", host="0.0.0.0", port=0)),
        ("unix:///run/trio-sign/grpc.sock", Address("unix", path="/run/trio-sign/grpc.sock")),
        ("vsock://16:50051", Address("vsock", cid=16, port=50051)),
        ("vsock://ANY:50051", Address("vsock", cid=VMADDR_CID_ANY, port=50051)),
        ("vsock://any:5000", Address("vsock", cid=VMADDR_CID_ANY, port=5000)),
    ],
)
def test_parse_address(url: str, expected: Address) -> None:
    assert parse_address(url) == expected


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("http://127.0.0.1:80", "scheme must be"),
        ("127.0.0.1:80", "scheme must be"),
        ("tcp://127.0.0.1", "a port is required"),
        ("tcp://127.0.0.1:99999", "invalid port"),
        ("tcp://127.0.0.1:80/path", "nothing else"),
        ("unix://relative/path", "absolute"),
        ("unix://", "absolute"),
        ("vsock://parent:50051", "CID must be a number or ANY"),
        ("vsock://16", "a port is required"),
        ("vsock://99999999999:1", "CID out of range"),
    ],
)
def test_parse_address_refuses(url: str, text: str) -> None:
    with pytest.raises(TransportError, match=text):
        parse_address(url)


def test_address_str_round_trips() -> None:
    for url in (
        "tcp://127.0.0.1:5",
        "tcp://[::1]:5",
        "unix:///x/y",
        "vsock://3:5",
        "vsock://ANY:5",
    ):
        assert str(parse_address(url)) == url


async def test_tcp_listen_connect_nodelay() -> None:
    listeners = await open_listeners("tcp://127.0.0.1:0")
    assert len(listeners) == 1
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        client = await connect(f"tcp://127.0.0.1:{port}")
        server = await listeners[0].accept()
        async with client, server:
            assert client.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await client.send_all(b"ping")
            assert await server.receive_some() == b"ping"


async def test_connect_refused_is_transport_error() -> None:
    listeners = await open_listeners("tcp://127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(TransportError, match=f"cannot connect to tcp://127.0.0.1:{port}"):
        await connect(f"tcp://127.0.0.1:{port}")


async def test_unix_listen_connect_and_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = await open_listeners(f"unix://{path}")
    await first[0].aclose()  # leaves the socket file behind, like a crashed process
    assert path.exists()
    (listener,) = await open_listeners(f"unix://{path}")
    async with listener:
        client = await connect(f"unix://{path}")
        server = await listener.accept()
        async with client, server:
            await server.send_all(b"hi")
            assert await client.receive_some() == b"hi"


async def test_unix_listener_admits_only_its_own_user(tmp_path: Path) -> None:
    """The parent's channels to a local enclave (deltas, status, logs) take whoever connects
    and a newer connection replaces the open one: the socket file is 0600, set before listen,
    so another user's process cannot connect at all (issue 11 review)."""
    old = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        (listener,) = await open_listeners(f"unix://{tmp_path}/channel.sock")
    finally:
        os.umask(old)
    try:
        assert os.stat(tmp_path / "channel.sock").st_mode & 0o777 == 0o600
    finally:
        await listener.aclose()


async def test_unix_refuses_to_steal_a_live_socket(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    (listener,) = await open_listeners(f"unix://{path}")
    async with listener:
        with pytest.raises(TransportError, match="another process is listening"):
            await open_listeners(f"unix://{path}")


async def test_unix_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(TransportError, match="non-socket file"):
        await open_listeners(f"unix://{path}")
    assert path.read_text() == "precious"


async def test_unix_connect_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        await connect(f"unix://{tmp_path / 'missing.sock'}")


@pytest.fixture
def vsock_loopback_port() -> int:
    """A vsock port usable on the local CID, or skip with the reason (probed with blocking
    stdlib sockets so the skip reason survives; pytest-trio drops reasons raised in async
    tests)."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        pytest.skip("this platform has no AF_VSOCK")
    port = 40000 + os.getpid() % 20000  # our URL form has no "any port" for vsock
    local_cid = getattr(socket, "VMADDR_CID_LOCAL", 1)
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        try:
            listener.bind((VMADDR_CID_ANY, port))
            listener.listen(1)
        except OSError as exc:
            pytest.skip(f"the kernel refuses to bind AF_VSOCK here: {exc}")
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect((local_cid, port))
            except OSError as exc:
                pytest.skip(
                    f"AF_VSOCK binds but has no loopback transport (vsock_loopback) here: {exc}"
                )
    return port


async def test_vsock_loopback(vsock_loopback_port: int) -> None:
    port = vsock_loopback_port
    (listener,) = await open_listeners(f"vsock://ANY:{port}")
    async with listener:
        local_cid = getattr(socket, "VMADDR_CID_LOCAL", 1)
        client = await connect(f"vsock://{local_cid}:{port}")
        server = await listener.accept()
        async with client, server:
            await client.send_all(b"over vsock")
            assert await server.receive_some() == b"over vsock"


async def test_vsock_connect_failure_is_transport_error() -> None:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("this platform has no AF_VSOCK")
    # CID 2 is the host; nothing listens on this port, or the kernel refuses vsock entirely.
    with trio.fail_after(10), pytest.raises(TransportError):
        await connect("vsock://2:1")


def test_public_api() -> None:
    assert sorted(trio_sign.transport.__all__) == [
        "ALPN_H2",
        "Address",
        "ServerIdentity",
        "TlsListener",
        "TlsSettings",
        "TlsStats",
        "TransportError",
        "VMADDR_CID_ANY",
        "connect",
        "hypercorn_bind",
        "load_cert_chain",
        "open_listeners",
        "parse_address",
        "self_signed_server_context",
        "serve_asgi",
    ]
    assert issubclass(TransportError, trio_sign.TrioSignError)
