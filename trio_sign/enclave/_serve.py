"""The enclave process's supervision tree (development mode for now).

``serve_dev_enclave`` draws the whole tree in one function, each service started with
``nursery.start`` so readiness reads top to bottom::

    serve_dev_enclave
    ├── load the plaintext share file (worker thread)  -> ShareStore
    ├── SessionPool.run_reaper                          (expires sessions, zeroes nonces)
    ├── run_sse_client (if gateway_url)                 (probe/abort/freeze/unfreeze/drain)
    └── serve_grpc on config.grpc_listen               (SignService handlers)

The production tree (NSM, attested KMS preload, status/log channels, SSE client) grows from
this one with the enclave-runtime work.
"""

from __future__ import annotations

import functools
import logging
import time
from urllib.parse import urlsplit

import trio

from .._errors import TrioSignError
from ..rpc import GrpcServer, serve_grpc
from ..shares import ShareStore
from ..sse import SseClientStatus, SseEventHandler, events_url, parse_events_url, run_sse_client
from ..transport import connect, open_listeners
from ._config import EnclaveConfig
from ._pool import SessionPool
from ._service import SignService

log = logging.getLogger("trio_sign.enclave")


class EnclaveHandle:
    """What ``nursery.start(serve_dev_enclave, ...)`` returns: the running service."""

    def __init__(
        self,
        service: SignService,
        server: GrpcServer,
        addresses: list[str],
        config: EnclaveConfig,
        sse: SseClientStatus | None,
    ) -> None:
        self.service = service
        self.server = server
        self.addresses = addresses
        self.sse = sse
        self._config = config
        self._stop = trio.Event()

    async def drain(self) -> None:
        """Stop taking sessions, let open calls finish within ``drain_grace_s``, then stop.

        Idempotent; returns once the gRPC server has closed every connection.
        """
        if self._stop.is_set():
            return
        log.info("draining", extra={"grace_s": self._config.drain_grace_s})
        self.service.start_draining()
        try:
            await self.server.drain(self._config.drain_grace_s)
        finally:
            self._stop.set()


def _listener_url(listener: trio.SocketListener, scheme: str) -> str:
    name = listener.socket.getsockname()
    if scheme == "tcp":
        host, port = name[0], name[1]
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    if scheme == "unix":
        return f"unix://{name}"
    return f"vsock://{name[0]}:{name[1]}"


async def serve_dev_enclave(
    config: EnclaveConfig,
    *,
    task_status: trio.TaskStatus[EnclaveHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the SignService from a plaintext share file (development only).

    Returns after :meth:`EnclaveHandle.drain`; the share store is zeroed on the way out,
    whatever the reason.

    Error handling:
        ``TrioSignError`` if the configuration is not a development one, the share file is
        refused (``ShareFileError`` with line and reason) or the address cannot be bound.
    """
    if not config.dev or config.dev_plaintext_shares is None:
        raise TrioSignError("--dev-plaintext-shares needs --dev (development only)")
    path = config.dev_plaintext_shares
    started = time.monotonic()

    def load() -> ShareStore:
        with path.open("rb") as f:
            return ShareStore.load_plaintext(f)

    store = await trio.to_thread.run_sync(load)
    try:
        log.info(
            "shares loaded",
            extra={"accounts": store.accounts, "load_ms": round(store.load_seconds * 1000)},
        )
        frozen: set[str] = set()
        pool = SessionPool(
            store.get,
            max_sessions=config.max_sessions,
            session_ttl_s=config.session_ttl_s,
            is_frozen=frozen.__contains__,
        )
        service = SignService(store, pool, frozen=frozen)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run_reaper)
            sse = await _start_sse(nursery, config, service)
            listeners = await open_listeners(config.grpc_listen)
            scheme = config.grpc_listen.split(":", 1)[0]
            addresses = [_listener_url(listener, scheme) for listener in listeners]
            server: GrpcServer = await nursery.start(
                functools.partial(
                    serve_grpc,
                    listeners,
                    service.handlers(),
                    max_receive_message_size=config.max_receive_message_size,
                )
            )
            handle = EnclaveHandle(service, server, addresses, config, sse)
            log.info(
                "enclave ready",
                extra={
                    "grpc": ",".join(addresses),
                    "accounts": store.accounts,
                    "mode": "dev",
                    "boot_ms": round((time.monotonic() - started) * 1000),
                },
            )
            task_status.started(handle)
            await handle._stop.wait()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
        log.info("enclave stopped; shares zeroed")


def _sse_via(config: EnclaveConfig, url: str) -> str:
    if config.sse_via is not None:
        return config.sse_via
    parse_events_url(url)  # validates
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"tcp://{parts.hostname}:{port}"


async def _start_sse(
    nursery: trio.Nursery, config: EnclaveConfig, service: SignService
) -> SseClientStatus | None:
    """Subscribe to the gateway's events; never blocks readiness on the gateway being up."""
    if config.gateway_url is None:
        return None
    url = events_url(config.gateway_url, config.node_id)
    via = _sse_via(config, url)
    status: SseClientStatus = await nursery.start(
        functools.partial(
            run_sse_client,
            url,
            connect=functools.partial(connect, via),
            on_event=SseEventHandler(service),
            keepalive_timeout_s=config.sse_keepalive_timeout_s,
        )
    )
    log.info("sse subscription started", extra={"url": url, "via": via})
    return status
