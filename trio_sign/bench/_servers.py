"""Server processes for ``scripts/bench --grpc``: ours, and grpcio ``aio`` with the same handlers.

Run as ``python -m trio_sign.bench._servers {ours,grpcio} SHARE_FILE``. The process prints one
JSON line ``{"port": N}`` on stdout once it accepts calls, serves until SIGTERM or SIGINT, then
stops, prints one JSON line ``{"gc": {...}}`` (garbage collections per generation and their
pauses, which is where tail latency goes) and exits 0.

* ``ours`` is the development enclave tree exactly as ``trio-sign enclave --dev`` draws it
  (:func:`trio_sign.enclave.serve_dev_enclave`: share load, pool reaper, ``serve_grpc``).
* ``grpcio`` is ``grpc.aio.server()`` on asyncio, serving the *same* ``SignService`` methods
  (same share store, same ``SessionPool`` with the same limits and TTL, same validation and
  status codes) through ``generic_handler``s with the protobuf (de)serializers. Only the
  transport differs.

Running the pool outside Trio: ``SessionPool``'s operations are synchronous; two things tie
it to Trio. ``trio.CapacityLimiter``'s non-blocking ``acquire_on_behalf_of_nowait`` and
``release_on_behalf_of`` work without a Trio run (they only touch the limiter's own sets), but
``trio.current_time()`` needs one. So this process (and only it) points the pool module's
``trio`` name at a stand-in whose ``current_time`` is ``time.monotonic`` and which forwards
everything else to the real module; and an asyncio task does the reaper's job
(``SessionPool.expire``). The handler code that runs is byte for byte the code ours runs; the
proper fix is an injectable clock in ``SessionPool`` (see the bench report), after which this
stand-in goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from proto_min import sign_service_pb2 as pb

from .._profile import install_profile_toggle
from ..enclave import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_TTL_S,
    EnclaveConfig,
    SessionPool,
    SignService,
    _pool,
    _service,
    configure_gc_for_serving,
    serve_dev_enclave,
)
from ..rpc import DEFAULT_MAX_RECEIVE_MESSAGE_SIZE, CallContext, RpcError
from ..shares import ShareStore

SERVICE_NAME = "trio_sign.v1.SignService"

#: How often the asyncio stand-in for ``SessionPool.run_reaper`` expires sessions.
REAP_INTERVAL_S = 0.1


def _announce(port: int) -> None:
    """Tell the bench our port; from here on GC pauses count (boot's are not serving)."""
    _GC_STATS.reset()
    print(json.dumps({"port": port}), flush=True)


class _GcStats:
    """Counts collections per generation and their pause times (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget what was counted so far (the explicit full collection before
        ``gc.freeze()`` at boot, say: it is not a pause any request sees)."""
        self._start = 0.0
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = time.perf_counter() - self._start
        gen = info["generation"]
        self.count[gen] += 1
        self.total_s[gen] += pause
        self.max_s[gen] = max(self.max_s[gen], pause)

    def report(self) -> dict[str, list[float]]:
        return {
            "collections": [float(c) for c in self.count],
            "total_ms": [t * 1000 for t in self.total_s],
            "max_ms": [m * 1000 for m in self.max_s],
        }


_GC_STATS = _GcStats()


# -- ours ------------------------------------------------------------------------------------


async def _serve_ours(shares: Path) -> None:
    config = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0",
        drain_grace_s=1.0,
        dev=True,
        dev_plaintext_shares=shares,
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve_dev_enclave, config)
            _announce(int(handle.addresses[0].rsplit(":", 1)[1]))
            async for _ in signals:
                await handle.drain()
                break


# -- grpcio aio --------------------------------------------------------------------------------


class _TrioWithMonotonicClock:
    """The ``trio`` module as ``SessionPool`` and ``SignService`` see it in the grpcio process:
    no Trio run here, so ``current_time`` is ``time.monotonic`` (any monotonic clock will do:
    the pool only compares its own deadlines, the authorization's rate limit its own times);
    every other name is the real module's."""

    current_time = staticmethod(time.monotonic)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def _grpcio_handler(grpc: Any, service: SignService) -> Any:
    """A generic handler serving ``service``'s methods; ``RpcError`` becomes ``context.abort``."""
    codes = {code.value[0]: code for code in grpc.StatusCode}
    Method = Callable[[Any, CallContext], Awaitable[Any]]
    table: dict[str, tuple[Any, Any, Method]] = {
        "Ping": (pb.PingRequest, pb.PingResponse, service.ping),
        "GetStatus": (pb.GetStatusRequest, pb.GetStatusResponse, service.get_status),
        "GetAccount": (pb.GetAccountRequest, pb.GetAccountResponse, service.get_account),
        "Commit": (pb.CommitRequest, pb.CommitResponse, service.commit),
        "Sign": (pb.SignRequest, pb.SignResponse, service.sign),
        "Abort": (pb.AbortRequest, pb.AbortResponse, service.abort),
    }

    def adapt(path: str, method: Method) -> Callable[[Any, Any], Awaitable[Any]]:
        async def handle(request: Any, context: Any) -> Any:
            # The SignService methods read nothing from the context; ours builds one per call
            # too (with the parsed grpc-timeout as deadline), so build one here as well.
            remaining = context.time_remaining()
            deadline = math.inf if remaining is None else time.monotonic() + remaining
            call = CallContext(path, (), "", deadline)
            try:
                return await method(request, call)
            except RpcError as exc:
                await context.abort(codes[int(exc.status)], exc.details)

        return handle

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            name: grpc.unary_unary_rpc_method_handler(
                adapt(f"/{SERVICE_NAME}/{name}", method),
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )
            for name, (req, resp, method) in table.items()
        },
    )


async def _serve_grpcio(shares: Path) -> None:
    import grpc  # test dependency; imported here so ``ours`` does not need it

    vars(_pool)["trio"] = _TrioWithMonotonicClock()
    # SignService reads the clock too: the rate limit of the Sign authorization (DESIGN §11)
    vars(_service)["trio"] = _TrioWithMonotonicClock()
    with shares.open("rb") as f:  # as serve_dev_enclave does (there in a worker thread)
        store = ShareStore.load_plaintext(f)
    try:
        frozen: set[str] = set()
        pool = SessionPool(
            store.get,
            max_sessions=DEFAULT_MAX_SESSIONS,
            session_ttl_s=DEFAULT_SESSION_TTL_S,
            is_frozen=frozen.__contains__,
        )
        service = SignService(store, pool, frozen=frozen)
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", DEFAULT_MAX_RECEIVE_MESSAGE_SIZE)]
        )
        server.add_generic_rpc_handlers((_grpcio_handler(grpc, service),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        _announce(port)
        reaper = asyncio.create_task(_reap(pool))
        await stop.wait()
        service.start_draining()
        await server.stop(1.0)
        reaper.cancel()
        pool.abort_all()
    finally:
        store.close()


async def _reap(pool: SessionPool) -> None:
    while True:
        await asyncio.sleep(REAP_INTERVAL_S)
        pool.expire(time.monotonic())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_sign.bench._servers")
    parser.add_argument("kind", choices=["ours", "grpcio"])
    parser.add_argument("shares", type=Path, help="plaintext service share file")
    args = parser.parse_args(argv)
    configure_gc_for_serving()  # both servers: what `trio-sign enclave` runs with
    stats = _GC_STATS
    gc.callbacks.append(stats)
    instruments = install_profile_toggle(f"bench-{args.kind}")  # development: TRIO_SIGN_PROFILE_DIR
    try:
        if args.kind == "ours":
            trio.run(functools.partial(_serve_ours, args.shares), instruments=instruments)
        else:
            asyncio.run(_serve_grpcio(args.shares))
    finally:
        gc.callbacks.remove(stats)
    print(json.dumps({"gc": stats.report()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
