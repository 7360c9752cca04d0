"""``examples/asyncio_participant.py`` (a plain asyncio service embedding the participant
library, with an approval inbox a person works through) run for real: from its
participant.toml it opens the keys and the sealed store, connects to the gateway's endpoint
(contract version 2), approves account creation by DKG with the DKG tests' enclave, then signs
with the new accounts; its inbox saw every request. Its shares end up sealed in its store."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import trio

from tests.participant_helpers import GatewayThread
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import HubSettings, ParticipantHub, ParticipantKey
from trio_sign.participant import PassphraseKey, SealedShareStore

from .test_enclave_dkg import PARTICIPANT_KEYS, SUITES
from .test_gateway_dkg import signing_key
from .test_participant_dkg import gateway_side

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "asyncio_participant.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asyncio_participant_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_asyncio_example_creates_and_signs_through_a_real_gateway(tmp_path: Path) -> None:
    example = load_example()
    with signing_key(PARTICIPANT_KEYS["p2"]) as auth:
        auth.save(tmp_path / "p2-auth.key", key_id="p2")
        public = auth.public_key
    with ApproverSigningKey.generate() as approver:
        approver.save(tmp_path / "p2-approver.key", key_id="p2-approver")
    (tmp_path / "passphrase.txt").write_text("correct horse battery staple\n")
    (tmp_path / "passphrase.txt").chmod(0o600)
    SealedShareStore.create(
        tmp_path / "p2.store", "p2", [], PassphraseKey("correct horse battery staple")
    ).close()
    hub = ParticipantHub({"p2": ParticipantKey("p2", "p2", public)}, HubSettings(gateway_id="gw"))
    gw = GatewayThread(hub)
    gw.start()
    config = tmp_path / "participant.toml"
    config.write_text(
        f"""participant_id = "p2"
gateway_url = "{gw.url}"
gateway_id = "gw"
[auth]
key_file = "p2-auth.key"
key_id = "p2"
[approver]
key_file = "p2-approver.key"
key_id = "p2-approver"
[store]
path = "p2.store"
passphrase_file = "passphrase.txt"
"""
    )
    inbox = example.ApprovalInbox()
    result: dict[str, object] = {}
    try:

        async def main() -> None:
            stop = asyncio.Event()
            service = asyncio.create_task(example.run_service(config, stop, inbox=inbox))

            def gateway() -> None:
                def wait() -> None:
                    async def connected() -> None:
                        with trio.fail_after(30):
                            await hub.wait_connected("p2")

                    gw.call_blocking(connected)

                wait()
                result.update(gw.call_blocking(gateway_side, hub, tmp_path, tmp_path / "p2.store"))

            await asyncio.to_thread(gateway)
            stop.set()
            await service

        asyncio.run(main())
    finally:
        gw.stop()
    names = [f"remote-dkg-{i}" for i in range(len(SUITES))]
    assert result["created"] == names
    assert result["signed"] == len(SUITES)
    kinds = [(k, a) for k, a, ok in inbox.decided if ok]
    assert [a for k, a in kinds if k == "create"] == names
    assert [a for k, a in kinds if k == "sign"] == names
    with SealedShareStore.open(
        tmp_path / "p2.store", PassphraseKey("correct horse battery staple")
    ) as s:
        assert sorted(s.accounts()) == names
