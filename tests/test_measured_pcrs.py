"""A changed ``enclave.toml`` changes the local enclave's PCRs, and kms-local's key policy,
which pins them, refuses its preload (DESIGN §9): the production enclave tree with the local
NSM, a parent double serving the boot exchange, and the local KMS over boto3."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sign.enclave import EnclaveExit, ExitCode, serve_enclave
from trio_sign.enclave._measured import load_measured_config
from trio_sign.kms import KeyPolicy, KeyStore, KmsDataKeyProvider, LocalKms, serve_kms_local
from trio_sign.kms._client import KmsRecipientKms, make_kms_client
from trio_sign.nitro import LocalNsm
from trio_sign.nitro._local_nsm import local_pcrs_for_config
from trio_sign.shares import encode_bundle

from .enclave_helpers import make_accounts, parent


@pytest.fixture(autouse=True)
def _no_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials; nothing is read from ~/.aws or the instance metadata service."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _policy(pcrs: dict[int, bytes]) -> dict[str, Any]:
    """What ``python -m trio_sign.ops render-key-policy`` pins: PCR0 (ImageSha384), 1 and 2."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "sealer",
                "Effect": "Allow",
                "Principal": {"AWS": "*"},
                "Action": ["kms:GenerateDataKey", "kms:CreateKey", "kms:DescribeKey"],
                "Resource": "*",
            },
            {
                "Sid": "enclave",
                "Effect": "Allow",
                "Principal": {"AWS": "*"},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {
                    "StringEqualsIgnoreCase": {
                        "kms:RecipientAttestation:ImageSha384": pcrs[0].hex(),
                        "kms:RecipientAttestation:PCR1": pcrs[1].hex(),
                        "kms:RecipientAttestation:PCR2": pcrs[2].hex(),
                    }
                },
            },
        ],
    }


async def _boot(
    tmp_path: Path, enclave_toml: Path, pinned: Path
) -> tuple[EnclaveExit | None, list[BaseException]]:
    """Boot the production enclave with ``enclave_toml`` against kms-local pinning the local
    PCRs of ``pinned``: (None if it reached serving (then drained), else its exit; what the
    parent's side of the preload raised)."""
    nsm_dir = tmp_path / "nsm"
    root = LocalNsm.from_dir(nsm_dir, create=True)
    store, accounts = make_accounts(3)
    store.close()
    records = [a.service for a in accounts.values()]
    keys = KeyStore(tmp_path / "kms-keys.json")
    failure: EnclaveExit | None = None
    kms = LocalKms(
        keys, root_pem=root.root_pem, policy=KeyPolicy(_policy(local_pcrs_for_config(pinned)))
    )
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_kms_local, kms, "tcp://127.0.0.1:0")
            client = make_kms_client(
                url,
                region="us-east-1",
                aws_access_key_id="AKIDLOCALTEST",
                aws_secret_access_key="local-test-secret",
            )
            key_id = (await trio.to_thread.run_sync(client.create_key))["KeyMetadata"]["KeyId"]
            sealed = await trio.to_thread.run_sync(
                lambda: encode_bundle(records, KmsDataKeyProvider(client, key_id))
            )
            async with parent(tmp_path, records, nsm_dir) as fake:
                fake.bundle.write_bytes(sealed)
                fake.kms = KmsRecipientKms(client)
                config = dataclasses.replace(
                    fake.config(measured=load_measured_config(enclave_toml)),
                    nsm=f"local:{nsm_dir}",
                )
                try:
                    async with trio.open_nursery() as enclave:
                        handle = await enclave.start(functools.partial(serve_enclave, config))
                        await handle.drain()
                except BaseExceptionGroup as group:
                    matched, _rest = group.split(EnclaveExit)
                    if matched is None:
                        raise
                    leaf: BaseException = matched
                    while isinstance(leaf, BaseExceptionGroup):
                        leaf = leaf.exceptions[0]
                    assert isinstance(leaf, EnclaveExit)
                    failure = leaf
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        keys.close()
    return failure, fake.preload_errors


async def test_a_changed_enclave_toml_is_refused_by_the_pinned_key_policy(
    tmp_path: Path,
) -> None:
    pinned = tmp_path / "enclave.toml"
    # an open default policy, written out (issue 14): the test is about PCRs, not approvals
    open_default = "\n[policies.default]\napprovers = []\nthreshold = 0\n"
    pinned.write_text("[limits]\nmax_sessions = 100\n" + open_default)
    # the file the policy pins boots
    assert await _boot(tmp_path / "same", pinned, pinned) == (None, [])
    # one byte changed: other PCRs, and the policy refuses the Decrypt: the preload fails
    changed = tmp_path / "changed.toml"
    changed.write_text("[limits]\nmax_sessions = 101\n" + open_default)
    assert local_pcrs_for_config(changed)[2] != local_pcrs_for_config(pinned)[2]
    failure, refusals = await _boot(tmp_path / "changed", changed, pinned)
    assert failure is not None
    assert failure.code == ExitCode.PRELOAD_FAILED
    assert len(refusals) == 1
    assert "AccessDeniedException" in str(refusals[0])
