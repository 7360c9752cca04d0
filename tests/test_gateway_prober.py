"""The gateway's health prober: fake nodes (no sockets) on the autojump clock, exact virtual
times; and one real node against a development enclave."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from trio_sign.enclave import EnclaveConfig, EnclaveHandle, serve_dev_enclave
from trio_sign.gateway import EnclaveNode, EventHub, run_prober, serve_gateway_events
from trio_sign.rpc import RpcError, StatusCode
from trio_sign.testing import generate_share_files

from .relay_helpers import running_relay

INTERVAL = 5.0
TOKEN = "enclave-0-events-token-0123456789"
EVICT_AFTER = 30.0


class FakeNode:
    """A node as the prober sees it. ``sse`` is the node's subscription: when connected, a
    published probe nonce is echoed in GetStatus."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.healthy = True
        self.last_ok: float | None = None
        self.failing_since: float | None = None
        self._evicted = False
        self.evictions: list[float] = []
        self.readmissions: list[float] = []
        self.down = False
        self.hang = False
        self.sse = True
        self.state = "serving"
        self.last_sse_probe = ""
        self.pings = 0

    @property
    def evicted(self) -> bool:
        return self._evicted

    @evicted.setter
    def evicted(self, value: bool) -> None:
        if value != self._evicted:
            (self.evictions if value else self.readmissions).append(trio.current_time())
        self._evicted = value

    async def ping(self, payload: bytes = b"") -> Any:
        self.pings += 1
        if self.hang:
            await trio.sleep_forever()
        if self.down:
            raise RpcError(StatusCode.UNAVAILABLE, "connection refused")
        return SimpleNamespace(payload=payload)

    async def get_status(self) -> Any:
        if self.down:
            raise RpcError(StatusCode.UNAVAILABLE, "connection refused")
        return SimpleNamespace(state=self.state, last_sse_probe=self.last_sse_probe)


class FakeSse:
    """The SSE server's hook: delivers the probe to the node if its subscription is up."""

    def __init__(self, nodes: list[FakeNode]) -> None:
        self.nodes = {n.node_id: n for n in nodes}
        self.sent: list[tuple[str, str]] = []
        self.broken = False

    async def send_probe(self, node_id: str, nonce: str) -> None:
        if self.broken:
            raise RuntimeError("no subscriber")
        self.sent.append((node_id, nonce))
        node = self.nodes[node_id]
        if node.sse and not node.down:
            node.last_sse_probe = nonce


@asynccontextmanager
async def prober(nodes: list[FakeNode], sse: FakeSse | None) -> AsyncIterator[float]:
    """Run the prober; yield the virtual time of its first round."""
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(
            functools.partial(
                run_prober,
                nodes,
                interval_s=INTERVAL,
                evict_after_s=EVICT_AFTER,
                send_probe=None if sse is None else sse.send_probe,
            )
        )
        yield start
        nursery.cancel_scope.cancel()


def alerts(caplog: pytest.LogCaptureFixture, node_id: str) -> list[tuple[str, int]]:
    return [
        (r.__dict__["alert"], r.levelno)
        for r in caplog.records
        if "alert" in r.__dict__ and r.__dict__.get("node") == node_id
    ]


async def test_eviction_at_evict_after_and_readmission(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_sign.gateway.prober")
    node, other = FakeNode("a"), FakeNode("b")
    sse = FakeSse([node, other])
    async with prober([node, other], sse) as t0:
        assert node.healthy
        assert node.last_ok == t0
        await trio.sleep(12)  # t0+12: the node goes down; the next round (t0+15) sees it
        node.down = True
        await trio.sleep(4)
        assert not node.healthy
        assert node.failing_since == t0 + 15
        assert not node.evicted  # failing, still used
        await trio.sleep(30)  # t0+46
        assert node.evictions == [t0 + 15 + EVICT_AFTER]
        assert alerts(caplog, "a") == [("node_evicted", logging.ERROR)]

        node.down = False  # recovers at t0+46; the round at t0+50 passes...
        await trio.sleep(5)
        # ...but the nonce published while it was down was not echoed, so it passes at t0+55
        assert node.evicted
        await trio.sleep(5)
        assert node.readmissions == [t0 + 55]
        assert node.healthy
        assert node.failing_since is None
        assert node.last_ok == t0 + 55
        assert alerts(caplog, "a") == [
            ("node_evicted", logging.ERROR),
            ("node_readmitted", logging.INFO),
        ]
    # the other node was never disturbed
    assert other.evictions == []
    assert other.healthy
    assert alerts(caplog, "b") == []
    nonces = [n for who, n in sse.sent if who == "b"]
    assert len(nonces) == len(set(nonces)) >= 12  # a fresh nonce every round


async def test_sse_probe_never_echoed_evicts(autojump_clock: trio.testing.MockClock) -> None:
    node, other = FakeNode("deaf"), FakeNode("ok")
    node.sse = False  # pings fine, but its event stream is dead
    async with prober([node, other], FakeSse([node, other])) as t0:
        assert node.healthy  # round one has nothing to check yet
        await trio.sleep(EVICT_AFTER + INTERVAL + 1)
        assert not node.healthy
        assert node.failing_since == t0 + INTERVAL
        assert node.evictions == [t0 + INTERVAL + EVICT_AFTER]
        assert other.evictions == []
        node.sse = True  # resubscribed: the next nonce is echoed, the round after passes
        await trio.sleep(2 * INTERVAL)
        assert not node.evicted
        assert node.readmissions == [t0 + 9 * INTERVAL]  # nonce sent at t0+40, seen at t0+45


async def test_draining_node_and_broken_sse_hook_fail(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "trio_sign.gateway.prober")
    draining, unheard = FakeNode("draining"), FakeNode("unheard")
    draining.state = "draining"
    sse = FakeSse([draining, unheard])
    async with prober([draining, unheard], sse) as t0:
        # publishing fails from now on: the round at t0+5 still sees round one's nonce, the
        # one at t0+10 sees nothing new
        sse.broken = True
        await trio.sleep(EVICT_AFTER + 2 * INTERVAL + 1)
    assert draining.evictions == [t0 + INTERVAL + EVICT_AFTER]
    assert unheard.evictions == [t0 + 2 * INTERVAL + EVICT_AFTER]
    warnings = [r for r in caplog.records if r.msg == "cannot publish the SSE probe"]
    assert [r.levelno for r in warnings[:2]] == [logging.WARNING] * 2  # one per node
    assert len(warnings) > 2
    assert all(r.levelno == logging.DEBUG for r in warnings[2:])


async def test_hanging_node_times_out_without_delaying_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hung, fine = FakeNode("hung"), FakeNode("fine")
    hung.hang = True
    async with prober([hung, fine], None) as t0:
        # the first round ends when the hung ping times out (one interval)
        assert trio.current_time() == t0 + INTERVAL
        assert hung.failing_since == t0 + INTERVAL  # observed when the interval ran out
        await trio.sleep(EVICT_AFTER + 1)
    assert hung.evictions == [t0 + INTERVAL + EVICT_AFTER]
    assert fine.pings == hung.pings  # same cadence: one ping per round each


async def test_ping_only_without_sse_hook(autojump_clock: trio.testing.MockClock) -> None:
    node = FakeNode("n")
    node.sse = False  # irrelevant without a hook
    async with prober([node], None):
        await trio.sleep(EVICT_AFTER * 2)
    assert node.evictions == []
    assert node.healthy


async def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        await run_prober([], interval_s=0, evict_after_s=1)


# -- a real node: the prober against a development enclave --------------------------------------


@asynccontextmanager
async def dev_enclave(tmp_path: Path) -> AsyncIterator[EnclaveHandle]:
    report = generate_share_files(tmp_path, 2, counterparts=False)
    cfg = EnclaveConfig(
        grpc_listen="tcp://127.0.0.1:0", dev=True, dev_plaintext_shares=report.service_file
    )
    async with trio.open_nursery() as nursery:
        handle: EnclaveHandle = await nursery.start(serve_dev_enclave, cfg)
        yield handle
        await handle.drain()


async def test_real_node_is_evicted_when_its_enclave_drains(tmp_path: Path) -> None:
    async with dev_enclave(tmp_path) as handle, trio.open_nursery() as nursery:
        node = EnclaveNode("enclave-0", handle.addresses[0])
        await nursery.start(node.run)
        await nursery.start(
            functools.partial(run_prober, [node], interval_s=0.02, evict_after_s=0.06)
        )
        assert node.healthy
        assert not node.evicted
        assert node.last_ok is not None
        await handle.drain()  # Ping answers only while serving; then the server is gone
        with trio.fail_after(5):
            while not node.evicted:  # noqa: ASYNC110 - real sockets, real time
                await trio.sleep(0.01)
        assert node.failing_since is not None
        nursery.cancel_scope.cancel()


async def test_end_to_end_with_the_sse_server_and_a_subscribed_dev_enclave(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway's real SSE server publishes the probes; the dev enclave's real SSE client
    echoes them in GetStatus. When the event stream goes away, the node is evicted although
    Ping still answers."""
    caplog.set_level(logging.INFO, "trio_sign.gateway.prober")
    hub = EventHub()

    async def send_probe(node_id: str, nonce: str) -> None:
        hub.publish(node_id, "probe", {"nonce": nonce})

    report = generate_share_files(tmp_path, 1, counterparts=False)
    async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
        events_scope = trio.CancelScope()

        async def events(*, task_status: trio.TaskStatus[list[str]]) -> None:
            with events_scope:
                await serve_gateway_events(
                    "tcp://127.0.0.1:0",
                    hub,
                    credentials={"enclave-0": TOKEN},
                    retry_ms=10,
                    task_status=task_status,
                )

        binds: list[str] = await nursery.start(events)
        port = int(binds[0].rsplit(":", 1)[1])
        # The enclave subscribes through the parent's relay, which holds the node's token.
        relay_port = await stack.enter_async_context(running_relay(port, TOKEN))
        config = EnclaveConfig(
            grpc_listen="tcp://127.0.0.1:0",
            dev=True,
            dev_plaintext_shares=report.service_file,
            gateway_url=f"http://127.0.0.1:{port}",
            node_id="enclave-0",
            sse_via=f"tcp://127.0.0.1:{relay_port}",
        )
        handle: EnclaveHandle = await nursery.start(serve_dev_enclave, config)
        with trio.fail_after(5):
            while hub.subscribers("enclave-0") == 0:  # noqa: ASYNC110 - real sockets
                await trio.sleep(0.005)
        node = EnclaveNode("enclave-0", handle.addresses[0])
        await nursery.start(node.run)
        await nursery.start(
            functools.partial(
                run_prober, [node], interval_s=0.25, evict_after_s=1.0, send_probe=send_probe
            )
        )
        await trio.sleep(1.0)  # four rounds, each checking the previous round's nonce
        assert node.healthy
        assert not node.evicted
        assert handle.service.last_sse_probe != ""

        events_scope.cancel()  # the event stream is gone; gRPC is fine
        with trio.fail_after(5):
            while not node.evicted:  # noqa: ASYNC110 - real sockets, real time
                await trio.sleep(0.01)
        assert (await node.ping(b"still here")).payload == b"still here"
        evicted = [r for r in caplog.records if r.__dict__.get("alert") == "node_evicted"]
        assert [r.__dict__["reason"] for r in evicted] == ["sse_probe_not_echoed"]
        await handle.drain()
        nursery.cancel_scope.cancel()
