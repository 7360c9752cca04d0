"""gRPC over HTTP/2 for trio_sign: a sans-io core on ``h2`` and Trio server/client drivers.

Unary-unary only; message-agnostic (handlers get and return ``bytes``; `protobuf_handler`
adapts protobuf-typed handlers).
"""

from ._client import GrpcChannel as GrpcChannel
from ._client import open_grpc_channel as open_grpc_channel
from ._events import ConnectionTerminated as ConnectionTerminated
from ._events import Event as Event
from ._events import MessageReceived as MessageReceived
from ._events import Metadata as Metadata
from ._events import RequestReceived as RequestReceived
from ._events import ResponseReceived as ResponseReceived
from ._events import StreamEnded as StreamEnded
from ._events import StreamError as StreamError
from ._events import StreamReset as StreamReset
from ._events import TrailersReceived as TrailersReceived
from ._limits import LogThrottle as LogThrottle
from ._limits import RateLimitedLog as RateLimitedLog
from ._limits import ServerLimits as ServerLimits
from ._limits import connection_limit as connection_limit
from ._limits import raise_open_file_limit as raise_open_file_limit
from ._listen import BurstListener as BurstListener
from ._protocol import DEFAULT_MAX_RECEIVE_MESSAGE_SIZE as DEFAULT_MAX_RECEIVE_MESSAGE_SIZE
from ._protocol import GrpcClientConnection as GrpcClientConnection
from ._protocol import GrpcServerConnection as GrpcServerConnection
from ._server import CallContext as CallContext
from ._server import GrpcServer as GrpcServer
from ._server import ServerStats as ServerStats
from ._server import SupportsSerializeToString as SupportsSerializeToString
from ._server import UnaryHandler as UnaryHandler
from ._server import protobuf_handler as protobuf_handler
from ._server import serve_grpc as serve_grpc
from ._status import GrpcProtocolError as GrpcProtocolError
from ._status import RpcError as RpcError
from ._status import StatusCode as StatusCode

__all__ = [
    "DEFAULT_MAX_RECEIVE_MESSAGE_SIZE",
    "BurstListener",
    "CallContext",
    "ConnectionTerminated",
    "Event",
    "GrpcChannel",
    "GrpcClientConnection",
    "GrpcProtocolError",
    "GrpcServer",
    "GrpcServerConnection",
    "LogThrottle",
    "RateLimitedLog",
    "MessageReceived",
    "Metadata",
    "RequestReceived",
    "ResponseReceived",
    "RpcError",
    "ServerLimits",
    "ServerStats",
    "StatusCode",
    "StreamEnded",
    "StreamError",
    "StreamReset",
    "SupportsSerializeToString",
    "TrailersReceived",
    "UnaryHandler",
    "connection_limit",
    "open_grpc_channel",
    "protobuf_handler",
    "raise_open_file_limit",
    "serve_grpc",
]
