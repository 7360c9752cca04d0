"""Address URLs (``tcp://``, ``unix://``, ``vsock://``) to Trio streams and listeners."""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

import trio

from .._errors import TrioSignError

#: ``vsock://ANY:PORT`` binds to every CID (VMADDR_CID_ANY).
VMADDR_CID_ANY: Final = getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF)
_BACKLOG: Final = 512


class TransportError(TrioSignError):
    """An address URL was refused, or a socket could not be opened, bound or connected."""


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address URL.

    Attributes:
        scheme: ``"tcp"``, ``"unix"`` or ``"vsock"``.
        host: TCP host (may be ``""`` for every interface), or None.
        port: TCP or vsock port, or None for UNIX sockets.
        path: UNIX socket path, or None.
        cid: vsock context id, or None.
    """

    scheme: Literal["tcp", "unix", "vsock"]
    host: str | None = None
    port: int | None = None
    path: str | None = None
    cid: int | None = None

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        if self.scheme == "vsock":
            cid = "ANY" if self.cid == VMADDR_CID_ANY else str(self.cid)
            return f"vsock://{cid}:{self.port}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(url: str) -> Address:
    """Parse ``tcp://host:port``, ``unix:///abs/path`` or ``vsock://CID:PORT`` (CID a number
    or ``ANY``).

    Raises:
        TransportError: the URL is not one of those forms.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise TransportError(f"address {url!r} is not a URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme == "unix":
        path = parts.path if not parts.netloc else None
        if not path or not path.startswith("/"):
            raise TransportError(f"address {url!r}: use unix:///absolute/path")
        return Address("unix", path=path)
    if scheme not in ("tcp", "vsock"):
        raise TransportError(
            f"address {url!r}: scheme must be tcp://, unix:// or vsock:// (got {scheme!r})"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TransportError(f"address {url!r}: expected {scheme}://HOST:PORT and nothing else")
    try:
        port = parts.port
    except ValueError as exc:
        raise TransportError(f"address {url!r}: invalid port") from exc
    if port is None:
        raise TransportError(f"address {url!r}: a port is required")
    if scheme == "tcp":
        return Address("tcp", host=parts.hostname or "", port=port)
    cid_text = parts.netloc.rsplit(":", 1)[0]
    if cid_text.upper() == "ANY":
        cid = VMADDR_CID_ANY
    elif cid_text.isdigit():
        cid = int(cid_text)
        if cid > 0xFFFFFFFF:
            raise TransportError(f"address {url!r}: CID out of range")
    else:
        raise TransportError(f"address {url!r}: the vsock CID must be a number or ANY")
    return Address("vsock", port=port, cid=cid)


def _vsock_family() -> int:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise TransportError("vsock:// needs AF_VSOCK, which this platform does not have")
    return int(family)


def _set_nodelay(sock: trio.socket.SocketType) -> None:
    # Small request/response messages: never wait for Nagle.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def open_listeners(url: str | Address) -> list[trio.SocketListener]:
    """Bind and listen on the address; return the listeners (several for a TCP host name that
    resolves to several addresses).

    A stale UNIX socket file at the path (nobody listening) is replaced; a live socket or any
    other kind of file is refused.

    Raises:
        TransportError: bad URL, or the kernel refused the socket, bind or listen.
    """
    address = parse_address(url) if isinstance(url, str) else url
    try:
        if address.scheme == "tcp":
            assert address.port is not None
            listeners = await trio.open_tcp_listeners(
                address.port, host=address.host or None, backlog=_BACKLOG
            )
            for listener in listeners:
                _set_nodelay(listener.socket)
            return listeners
        if address.scheme == "unix":
            assert address.path is not None
            _remove_stale_unix_socket(address.path)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = address.path
        else:
            sock = trio.socket.socket(_vsock_family(), socket.SOCK_STREAM)
            target = (address.cid, address.port)
        try:
            await sock.bind(target)
            if address.scheme == "unix":
                # Only this user may connect (before listen, so nobody gets in first): the
                # channels between the parent and a local enclave take whoever connects.
                os.chmod(str(target), 0o600)
            sock.listen(_BACKLOG)
        except BaseException:
            sock.close()
            raise
        return [trio.SocketListener(sock)]
    except OSError as exc:
        raise TransportError(f"cannot listen on {address}: {exc.strerror or exc}") from exc


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left behind by a dead process; refuse a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"cannot listen on unix://{path}: a non-socket file is in the way")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: stale
        except BlockingIOError:
            raise TransportError(
                f"cannot listen on unix://{path}: another process is listening there"
            ) from None
        else:
            raise TransportError(
                f"cannot listen on unix://{path}: another process is listening there"
            )
    os.unlink(path)


async def connect(url: str | Address) -> trio.SocketStream:
    """Connect to the address and return the stream (TCP_NODELAY set for TCP).

    Raises:
        TransportError: bad URL, or the connection failed.

    Cancellation: safe; a half-open socket is closed.
    """
    address = parse_address(url) if isinstance(url, str) else url
    try:
        if address.scheme == "tcp":
            assert address.port is not None
            stream = await trio.open_tcp_stream(address.host or "localhost", address.port)
            _set_nodelay(stream.socket)
            return stream
        if address.scheme == "unix":
            assert address.path is not None
            return await trio.open_unix_socket(address.path)
        sock = trio.socket.socket(_vsock_family(), socket.SOCK_STREAM)
        try:
            await sock.connect((address.cid, address.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0) or str(exc)
        raise TransportError(f"cannot connect to {address}: {reason}") from exc
