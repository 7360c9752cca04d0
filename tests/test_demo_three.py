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
