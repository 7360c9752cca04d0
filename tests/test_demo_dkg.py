"""The demo creates accounts by DKG (issue 16 deliverable 6): ``--create-accounts N``.

``create_accounts_by_dkg`` (the demo's step) against the enclave of the DKG tests (real
SignService and DkgRegistry on loopback, the real DeltaWriter and the parent's FileDeltaStore):
N accounts round-robin over the suites, each signed once and verified by the suite's own
verifier, and the report's lines. Then the whole stack (KMS, signed bundle, parent, enclave,
attested TLS, gateway) with the delta identity key made at genesis inside an enclave (the
parent's --genesis), pinned, and unsealed by the production enclave's boot over the boot
channel: the accounts are created by DKG there and signed with.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from trio_sign.cli import _demo
from trio_sign.cli._demo_full import create_accounts_by_dkg, run_full_stack
from trio_sign.crypto import scheme_by_name
from trio_sign.gateway import Coordinator, EnclaveNode

from .test_enclave_dkg import PARTICIPANT_KEYS, SUITES
from .test_gateway_dkg import approver, dev_enclave, signing_key


async def test_the_demo_step_creates_signs_and_reports(tmp_path: Path) -> None:
    files = {}
    for pid in ("p2", "p3"):
        files[pid] = tmp_path / f"{pid}.key"
        with signing_key(PARTICIPANT_KEYS[pid]) as key:
            key.save(files[pid], key_id=pid)
    async with dev_enclave(durable=tmp_path / "deltas") as enclave:
        stack: Any = SimpleNamespace(
            work=tmp_path,
            participant_key_files=files,
            identity_public_key=enclave.identity.public_key.hex(),
        )
        node = EnclaveNode("node-1", enclave.address)
        gate = approver("ops-1", "ops-2")
        coordinator = Coordinator([node], [], approver=gate)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                report = await create_accounts_by_dkg(
                    stack,
                    node,
                    coordinator,
                    gate,
                    [scheme_by_name(s) for s in SUITES],
                    6,
                    4,
                )
                nursery.cancel_scope.cancel()
        finally:
            gate.close()
    assert report["_failures"] == []
    assert report["dkg_accounts"].startswith("6 of 6 created by DKG (")
    for suite in SUITES:
        assert f"{suite}: 2" in report["dkg_accounts"]
    assert report["dkg_signed"] == "6 signed, 6 verified independently"
    assert report["dkg_accounts_per_second"] > 0
    assert "enclave side (DkgRound1..3) p50" in report["dkg_latency"]
    assert report["dkg_first_failure"] == ""
    assert len(list((tmp_path / "deltas").glob("delta-*.enc"))) == 6
    assert enclave.registry.open_count == 0


def test_the_full_stack_demo_creates_accounts_by_dkg(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
            "3",
            "--signatures",
            "3",
            "--concurrency",
            "2",
            "--ciphersuite",
            "all",
            "--workdir",
            str(work),
        ]
    )
    args.create_accounts = 3  # `--create-accounts 3` once the demo's parser has the flag
    report = trio.run(run_full_stack, args, work)
    assert report["failures"] == 0, report["first_failure"]
    assert report["dkg_accounts"].startswith("3 of 3 created by DKG")
    assert report["dkg_signed"] == "3 signed, 3 verified independently"
    assert "made at genesis inside the enclave" in report["delta_identity_key"]
