"""``trio-sign participant``: participant.toml, --seal-shares, --check, and a real process
that signs through the gateway's endpoint and stops on SIGTERM with exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.participant_helpers import SUITES, deal, sign_with_hub
from trio_sign.cli._main import main
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import HubSettings, ParticipantHub, ParticipantKey
from trio_sign.participant._config import ParticipantConfigError, parse_config
from trio_sign.shares import write_plaintext_file

PASS_ENV = "TRIO_SIGN_TEST_PARTICIPANT_PASSPHRASE"


def setup(tmp_path: Path, url: str = "ws://127.0.0.1:9/v1/participants") -> tuple[Path, Any]:
    auth = ApproverSigningKey.generate("ed25519")
    auth.save(tmp_path / "auth.key", key_id="ops-1-auth")
    approver = ApproverSigningKey.generate("p256")
    approver.save(tmp_path / "approver.key", key_id="ops-1")
    accounts = [deal(f"acct-{i}", SUITES[i]) for i in range(3)]
    for suite in SUITES:
        records = [a.records[1] for a in accounts if a.scheme.name == suite]
        write_plaintext_file(tmp_path / f"{suite}.jsonl", records, ciphersuite=suite)
    # one file with every suite: records name theirs
    write_plaintext_file(tmp_path / "shares.jsonl", [a.records[1] for a in accounts])
    (tmp_path / "participant.toml").write_text(
        f"""
participant_id = "ops-1"
gateway_url = "{url}"
gateway_id = "gw-cli"

[auth]
key_file = "auth.key"
key_id = "ops-1-auth"

[approver]
key_file = "approver.key"
key_id = "ops-1"

[store]
path = "ops-1.store"
passphrase_env = "{PASS_ENV}"

[policy]
accounts = ["acct-*"]
rate_per_minute = 600

[connection]
reconnect_initial_s = 0.05
reconnect_max_s = 0.5
"""
    )
    return tmp_path / "participant.toml", (auth, approver, accounts)


def test_seal_then_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config, (auth, approver, _) = setup(tmp_path)
    monkeypatch.setenv(PASS_ENV, "a long passphrase")
    assert (
        main(
            [
                "participant",
                "--config",
                str(config),
                "--seal-shares",
                str(tmp_path / "shares.jsonl"),
            ]
        )
        == 0
    )
    assert "sealed 3 account(s)" in capsys.readouterr().out
    assert main(["participant", "--config", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    assert "participant ops-1: 3 account(s)" in out
    monkeypatch.setenv(PASS_ENV, "another passphrase")
    assert main(["participant", "--config", str(config), "--check"]) == 2
    assert "wrong passphrase" in capsys.readouterr().err
    monkeypatch.delenv(PASS_ENV)
    assert main(["participant", "--config", str(config), "--check"]) == 2
    assert "is not set" in capsys.readouterr().err
    auth.close()
    approver.close()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "participant_id"),
        ('participant_id = "p"\ngateway_url = "http://x"', "ws://"),
        (
            'participant_id = "p"\ngateway_url = "ws://x/"\n[auth]\nkey_file="a"\nkey_id="k"\n[approver]\nkey_file="a"\nkey_id="k"\n[store]\npath="s"',
            "exactly one of",
        ),
        ('participant_id = "p"\ngateway_url = "ws://x/"\nbogus = 1', "unknown key"),
        (
            'participant_id = "p"\ngateway_url = "ws://x/"\n[auth]\nkey_file="a"\nkey_id="k"\nextra=1',
            r"\[auth\] has unknown",
        ),
        (
            'participant_id = "p"\ngateway_url = "ws://x/"\n[auth]\nkey_file="a"\nkey_id="k"\n[approver]\nkey_file="a"\nkey_id="k"\n[store]\npath="s"\npassphrase_env="X"\n[policy]\nmax_message_bytes=99999999',
            "max_message_bytes",
        ),
    ],
)
def test_config_errors(text: str, words: str) -> None:
    with pytest.raises(ParticipantConfigError, match=words):
        parse_config(text, base=Path("/"))


async def test_a_participant_process_signs_and_stops_on_sigterm(tmp_path: Path) -> None:
    hub = ParticipantHub({}, HubSettings(gateway_id="gw-cli"))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.serve, "127.0.0.1", 0)
        config, (auth, approver, accounts) = setup(
            tmp_path, f"ws://127.0.0.1:{port}/v1/participants"
        )
        # [participants.ops-1] of gateway.toml: the public half of the config's auth.key
        hub.keys["ops-1"] = ParticipantKey("ops-1", "ops-1-auth", auth.public_key)
        env = {**os.environ, PASS_ENV: "pw for the test", "PYTHONWARNINGS": "error"}
        exe = Path(sys.executable).with_name("trio-sign")
        sealed = await trio.run_process(
            [
                str(exe),
                "participant",
                "--config",
                str(config),
                "--seal-shares",
                str(tmp_path / "shares.jsonl"),
            ],
            env=env,
            capture_stdout=True,
        )
        assert b"sealed 3" in sealed.stdout
        proc = await trio.lowlevel.open_process(
            [str(exe), "participant", "--config", str(config), "--log-format", "json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            with trio.fail_after(30):
                await hub.wait_connected("ops-1")
            for account in accounts:
                _, share = await sign_with_hub(hub, "ops-1", account, b"from the cli")
                assert share.approval.key_id == "ops-1"
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                code = await proc.wait()
            assert code == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stderr is not None:
                await proc.stderr.aclose()
        nursery.cancel_scope.cancel()
    auth.close()
    approver.close()
