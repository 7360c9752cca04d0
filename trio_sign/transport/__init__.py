"""Transports chosen by address URL: ``tcp://host:port``, ``unix:///path``, ``vsock://CID:PORT``.

Everything above this package talks to ``trio.abc.Stream`` and ``trio.abc.Listener`` only.
"""

from ._address import VMADDR_CID_ANY as VMADDR_CID_ANY
from ._address import Address as Address
from ._address import TransportError as TransportError
from ._address import connect as connect
from ._address import open_listeners as open_listeners
from ._address import parse_address as parse_address
from ._asgi import hypercorn_bind as hypercorn_bind
from ._asgi import serve_asgi as serve_asgi
from ._tls import load_cert_chain as load_cert_chain

__all__ = [
    "VMADDR_CID_ANY",
    "Address",
    "TransportError",
    "connect",
    "hypercorn_bind",
    "load_cert_chain",
    "open_listeners",
    "parse_address",
    "serve_asgi",
]
