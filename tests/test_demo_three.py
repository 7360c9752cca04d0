"""The three-party full-stack demo (issue 17 part 2), small: the enclave through the parent
(attested TLS), the gateway's coordinator holding no share, and the participant as its own
process (``trio-sign participant``); the report gives who approved and the three-party
numbers next to the two-party ones, measured in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path

import trio

from trio_sign.cli import _demo
from trio_sign.cli._demo_full import run_full_stack
from trio_sign.participant import PassphraseKey, SealedShareStore


def test_the_three_party_demo_signs_with_the_participant_process(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    _demo.add_parser(parser.add_subparsers())
    work = tmp_path / "demo"
    work.mkdir()
    args = parser.parse_args(
        [
            "demo",
            "--stack",
            "full",
            "--accounts",
            "4",
            "--signatures",
            "12",
            "--concurrency",
            "2",
            "--workdir",
            str(work),
        ]
    )
    report = trio.run(run_full_stack, args, work)
    assert report["failures"] == 0, report["first_failure"]
    assert "sessions/s closed-loop" in report["three_party"]
    assert "open-loop at" in report["three_party"]
    assert report["three_party"].endswith("; 0 failures")
    assert report["two_party"].endswith("; 0 failures")
    # every three-party Sign carried the participant's approval and the gateway's one key
    approved = dict(part.split(": ") for part in report["three_party_approved_by"].split(", "))
    assert set(approved) == {"ops-1", "ops-2"}
    assert int(approved["ops-2"]) >= 12
    assert approved["ops-1"] == approved["ops-2"]
    assert "the gateway loaded no share file" in report["three_party_participant"]
    # the participant's shares are in its sealed store, not in any file the gateway read
    store = work / "participant" / "p2.store"
    assert store.stat().st_mode & 0o777 == 0o600
    passphrase = work / "participant" / "passphrase.txt"
    assert passphrase.stat().st_mode & 0o777 == 0o600
    key = PassphraseKey(passphrase.read_text().strip())
    with SealedShareStore.open(store, key) as opened:
        assert len(opened) == 4
    registry = (work / "accounts.jsonl").read_text()
    assert registry.count("\n") == 4
    assert "signing_share" not in registry
    log = (work / "participant" / "participant.log").read_text()
    assert "participant p2 ->" in log


async def test_the_demo_step_creates_accounts_with_the_participant(tmp_path: Path) -> None:
    """``create_accounts_by_dkg(..., remote=...)`` (what ``--create-accounts`` runs in the
    three-party demo) against the DKG tests' enclave with the real delta writer: 2-of-2
    accounts between the enclave and the participant, in the registry, signed."""
    import functools
    from types import SimpleNamespace
    from typing import Any

    from trio_sign.cli._demo_full import create_accounts_by_dkg
    from trio_sign.crypto import scheme_by_name
    from trio_sign.gateway import EnclaveNode
    from trio_sign.gateway._accounts import AccountRegistry
    from trio_sign.gateway._coordinator import Coordinator
    from trio_sign.gateway._participants import HubSettings, ParticipantHub, ParticipantKey
    from trio_sign.participant import AutoPolicy, ClientSettings, ParticipantClient, _store

    from .test_enclave_dkg import PARTICIPANT_KEYS, SUITES
    from .test_gateway_dkg import approver, dev_enclave, signing_key

    auth = signing_key(PARTICIPANT_KEYS["p2"])
    key = PassphraseKey("pw", opslimit=_store.MIN_OPSLIMIT, memlimit=_store.MIN_MEMLIMIT)
    store = SealedShareStore.create(tmp_path / "p2.store", "p2", [], key)
    hub = ParticipantHub({"p2": ParticipantKey("p2", "p2", auth.public_key)}, HubSettings())
    registry = AccountRegistry(tmp_path / "accounts.jsonl").open()
    gate = approver("ops-1", "ops-2")
    try:
        async with dev_enclave(durable=tmp_path / "deltas") as enclave:
            node = EnclaveNode("node-1", enclave.address)
            coordinator = Coordinator(
                [node], [], approver=gate, participants=hub, registry=registry
            )
            stack: Any = SimpleNamespace(
                work=tmp_path,
                participant_key_files={},
                identity_public_key=enclave.identity.public_key.hex(),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                port = await nursery.start(functools.partial(hub.serve, "127.0.0.1", 0))
                client = ParticipantClient(
                    ClientSettings(f"ws://127.0.0.1:{port}/v1/participants"),
                    participant_id="p2",
                    key_id="p2",
                    auth_key=auth,
                    approver=auth,
                    approver_key_id="p2",
                    shares=store,
                    policy=AutoPolicy(),
                )
                nursery.start_soon(client.run)
                with trio.fail_after(10):
                    await hub.wait_connected("p2")
                report = await create_accounts_by_dkg(
                    stack,
                    node,
                    coordinator,
                    gate,
                    [scheme_by_name(s) for s in SUITES],
                    3,
                    2,
                    remote=SimpleNamespace(hub=hub, registry=registry),
                )
                nursery.cancel_scope.cancel()
    finally:
        gate.close()
        registry.close()
        store.close()
        auth.close()
    assert report["_failures"] == []
    assert report["dkg_accounts"].startswith("3 of 3 created by DKG (")
    assert report["dkg_signed"] == "3 signed, 3 verified independently"
    assert len(list((tmp_path / "deltas").glob("delta-*.enc"))) == 3
    lines = (tmp_path / "accounts.jsonl").read_text().splitlines()
    assert len(lines) == 3
    fresh = PassphraseKey("pw")  # the store's close() zeroed the first key's passphrase
    with SealedShareStore.open(tmp_path / "p2.store", fresh) as reopened:
        assert len(reopened) == 3
