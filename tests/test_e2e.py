"""End to end on the local stack (local KMS, signed bundle, parent, enclave, attested TLS ending
in the enclave, gateway): the enclave is killed mid-run; the parent alerts, the gateway's
prober evicts the node, the parent relaunches the enclave ([failure] restart), and signing
resumes once re-admitted (over a new attested channel: the new enclave has a new key)."""

from __future__ import annotations

import functools
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sign.cli._demo_full import local_stack
from trio_sign.gateway import (
    Coordinator,
    EnclaveNode,
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
        # the stack's enclave.toml needs 2 of its 3 approvers: without approvals, refused
        with pytest.raises(GatewayError) as unapproved:
            await Coordinator([node], counterparts).sign_message("acct-00000000", b"no")
        assert unapproved.value.reason == "not_authorized"
        assert "no_approvals" in str(unapproved.value)
        approver = stack.gateway_approver()
        coordinator = Coordinator([node], counterparts, approver=approver)
        accounts = [f"acct-{i:08d}" for i in range(20)]
        for i in range(5):
            await coordinator.sign_message(accounts[i], b"before the crash")

        assert node.verified is not None
        first_key = node.verified.peer_spki_der
        first_pid = _enclave_pid(work / "run")
        os.kill(first_pid, signal.SIGKILL)

        with trio.fail_after(30):
            while not node.evicted or stack.state.alerts.last is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert stack.state.alerts.last is not None
        assert stack.state.alerts.last[0] == "enclave_killed"  # kill -9: no last word
        with pytest.raises(GatewayError):  # the only node is out: refused, not hung
            await coordinator.sign_message(accounts[0], b"while it is down")

        with trio.fail_after(60):  # the parent relaunches; the prober re-admits
            while node.evicted or not stack.state.ready:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert _enclave_pid(work / "run") != first_pid
        for i in range(5):
            await coordinator.sign_message(accounts[i], b"after the restart")
        # the relaunched enclave made a new TLS key, and the gateway checked it anew
        assert node.verified is not None
        assert node.verified.peer_spki_der != first_key
        assert node.attestations_verified >= 2
        approver.close()
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


class _HeldNode(EnclaveNode):
    """Holds the first ``Sign`` it is asked for until ``release`` is set: a session committed
    before a drain and signed during it, deterministically."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holding = trio.Event()
        self.release = trio.Event()

    async def sign(self, *args: Any, **kwargs: Any) -> Any:
        if not self.holding.is_set():
            self.holding.set()
            await self.release.wait()
        return await super().sign(*args, **kwargs)


async def test_orderly_stop_under_load_loses_no_committed_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling restart as operators run it: the gateway keeps signing while the parent is
    told to stop. The enclave refuses new sessions (the gateway sees UNAVAILABLE), but a
    session committed before the drain still signs and verifies during it, and no Sign is
    ever refused; then the enclave exits 0."""
    caplog.set_level(logging.INFO, logger="trio_sign.gateway")
    gen = generate_share_files(tmp_path / "shares", 20)
    counterparts = load_participant_files([gen.participant_files[2]])
    accounts = [f"acct-{i:08d}" for i in range(20)]
    signed: list[int] = []
    refused: list[str] = []
    async with local_stack(tmp_path / "stack", gen.service_file, ready_timeout=60) as stack:
        node = stack.gateway_node(node_class=_HeldNode)
        await stack.nursery.start(node.run)
        approver = stack.gateway_approver()
        coordinator = Coordinator([node], counterparts, approver=approver)
        held: list[bytes] = []

        async def held_session() -> None:  # commits, then waits in Sign for the release
            held.append(await coordinator.sign_message(accounts[0], b"committed before"))

        async def client(k: int) -> None:
            for i in range(10_000):
                try:
                    await coordinator.sign_message(accounts[(k + i) % 20], b"rolling %d" % i)
                except GatewayError as exc:
                    refused.append(str(exc))
                    return
                signed.append(k)

        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                clients.start_soon(held_session)
                await node.holding.wait()
                for k in range(8):
                    clients.start_soon(client, k)
                while len(signed) < 40:  # noqa: ASYNC110 - real processes and sockets
                    await trio.sleep(0.01)
                stack.stop.set()
                while stack.state.enclave_state != "draining":  # noqa: ASYNC110
                    await trio.sleep(0.01)
                node.release.set()  # its Sign reaches the draining enclave
            while stack.state.enclave_state != "exited":  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert stack.state.enclave_exit_code == 0
        approver.close()
    assert len(held) == 1  # signed and verified by the coordinator during the drain
    assert len(refused) == 8  # every other client was eventually turned away, at Commit
    assert all("UNAVAILABLE" in r for r in refused), refused
    retried = [r for r in caplog.records if r.getMessage().startswith("Sign failed")]
    assert retried == []  # no Sign was ever refused: no committed session was lost
