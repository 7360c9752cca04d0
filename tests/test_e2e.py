"""End to end on the local stack (local KMS, parent, enclave, mTLS ingress, gateway): the
enclave is killed mid-run; the parent alerts, the gateway's prober evicts the node, the
parent relaunches the enclave ([failure] restart), and signing resumes once re-admitted."""

from __future__ import annotations

import functools
import logging
import os
import signal
from pathlib import Path

import pytest
import trio

from trio_sign.cli._demo_full import local_stack
from trio_sign.gateway import (
    Coordinator,
    GatewayError,
    load_participant_files,
    run_prober,
)
from trio_sign.testing import generate_share_files

from .test_parent_supervisor import _enclave_pid


async def test_enclave_killed_mid_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_sign.gateway")
    gen = generate_share_files(tmp_path / "shares", 20)
    counterparts = load_participant_files([gen.participant_files[2]])
    work = tmp_path / "stack"
    # The relaunch waits 1 s, so the node is down for longer than the prober's 0.3 s eviction
    # threshold whatever the machine's speed (a ~0 s jittered restart once let the node recover
    # before it could be evicted).
    async with local_stack(
        work, gen.service_file, ready_timeout=60, restart=True, restart_backoff_s=1.0
    ) as stack:
        node = stack.gateway_node()
        await stack.nursery.start(node.run)
        await stack.nursery.start(
            functools.partial(
                run_prober,
                [node],
                interval_s=0.1,
                evict_after_s=0.3,
                send_probe=stack.hub.send_probe,
            )
        )
        coordinator = Coordinator([node], counterparts)
        accounts = [f"acct-{i:08d}" for i in range(20)]
        for i in range(5):
            await coordinator.sign_message(accounts[i], b"before the crash")

        first_pid = _enclave_pid(work / "run")
        os.kill(first_pid, signal.SIGKILL)

        with trio.fail_after(30):
            while not node.evicted:  # noqa: ASYNC110 - real processes and sockets
                await trio.sleep(0.05)
        assert stack.state.last_alert is not None
        assert "enclave_exited" in stack.state.last_alert
        with pytest.raises(GatewayError):  # the only node is out: refused, not hung
            await coordinator.sign_message(accounts[0], b"while it is down")

        with trio.fail_after(60):  # the parent relaunches; the prober re-admits
            while node.evicted or not stack.state.ready:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert _enclave_pid(work / "run") != first_pid
        for i in range(5):
            await coordinator.sign_message(accounts[i], b"after the restart")
    assert any(getattr(r, "alert", None) == "node_evicted" for r in caplog.records)
    assert any(getattr(r, "alert", None) == "node_readmitted" for r in caplog.records)


async def test_sse_stream_cut_reconnects_and_probe_recovers(tmp_path: Path) -> None:
    """The enclave's event stream (gateway → parent relay → enclave) is cut: the enclave
    reconnects through the relay with Last-Event-ID, the probe published while it was away is
    replayed and echoed in GetStatus, and events flow again."""
    gen = generate_share_files(tmp_path / "shares", 5, counterparts=False)
    async with local_stack(tmp_path / "stack", gen.service_file, ready_timeout=60) as stack:
        node = stack.gateway_node()
        await stack.nursery.start(node.run)
        hub = stack.hub

        async def echoed(nonce: str) -> None:
            with trio.fail_after(30):
                while (await node.get_status()).last_sse_probe != nonce:  # noqa: ASYNC110
                    await trio.sleep(0.05)

        with trio.fail_after(30):
            while hub.subscribers("node-1") != 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await echoed(hub.probe("node-1"))

        assert hub.disconnect("node-1") == 1
        missed = hub.probe("node-1")  # published while the stream is down
        await echoed(missed)  # replayed after the reconnect
        assert hub.subscribers("node-1") == 1
        await echoed(hub.probe("node-1"))  # and live events flow again
