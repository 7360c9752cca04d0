"""A listen address's port, checked before a command starts anything; usage errors.

Some listeners (the hypercorn ones: KMS, gateway API and events, the parent's health server)
report a port in use as a bare ``OSError`` that does not say which address was refused. A
command with several listeners checks each TCP address it was given first, so the one-line
error names the address and the knob to change. The real bind still decides (another process
can take the port in between); :mod:`._main` reports that case too, without the address.
"""

from __future__ import annotations

import errno
import socket

from .._errors import TrioSignError


class UsageError(TrioSignError):
    """The command line asks for something impossible (exit 2, like an argparse error)."""

    exit_code = 2


#: What a bind refused with EADDRINUSE means, for the one-line error.
ADDRESS_IN_USE = (
    "address already in use (another process is listening there: stop it, or choose another "
    "listen address)"
)


def check_port_free(url: str | None, knob: str) -> None:
    """Raise :class:`TrioSignError` naming ``url`` and ``knob`` if ``url`` is a ``tcp://``
    address with a fixed port that another socket is listening on. Anything else (port 0,
    UNIX sockets, a URL the listener itself will refuse) is left to the listener."""
    from ..transport import TransportError, parse_address

    if url is None:
        return
    try:
        address = parse_address(url)
    except TransportError:
        return
    if address.scheme != "tcp" or not address.port:
        return
    try:
        infos = socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise TrioSignError(
                        f"cannot listen on {url} ({knob}): {ADDRESS_IN_USE}"
                    ) from None
