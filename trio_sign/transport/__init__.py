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
from ._tls_listener import ALPN_H2 as ALPN_H2
from ._tls_listener import ServerIdentity as ServerIdentity
from ._tls_listener import TlsListener as TlsListener
from ._tls_listener import TlsSettings as TlsSettings
from ._tls_listener import TlsStats as TlsStats
from ._tls_listener import self_signed_server_context as self_signed_server_context

__all__ = [
    "ALPN_H2",
    "VMADDR_CID_ANY",
    "Address",
    "ServerIdentity",
    "TlsListener",
    "TlsSettings",
    "TlsStats",
    "TransportError",
    "connect",
    "hypercorn_bind",
    "load_cert_chain",
    "open_listeners",
    "parse_address",
    "self_signed_server_context",
    "serve_asgi",
]
