"""Compaction in the running stack (issue 16 deliverable 5, docs/compaction.md §5).

The real local stack: the local KMS (a key policy pinning the enclave's PCRs), the local NSM,
the delta identity key made at genesis inside an enclave, the parent supervisor launching the
enclave process and serving its attested preload, the gateway's attested TLS ending in the
enclave. Accounts are created by DKG (deltas), then ``Compact`` is called with the ``compact``
policy's approvals; the parent is restarted with ``[bundle] source`` = the new base (the same
``[deltas] location``, which still holds the deltas the base contains): the node serves every
account, the base's and the DKG-created ones, and signs with them; a delta created after the
compaction loads after a second restart.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from proto_min import sign_service_pb2 as pb
from trio_sign.cli._compact import compact_request
from trio_sign.cli._demo import generate_shares, verify_independently
from trio_sign.cli._demo_full import (
    _policy_json,
    identity_genesis,
    make_approver_keys,
    make_dkg_keys,
)
from trio_sign.crypto import scheme_by_name
from trio_sign.shares import inspect_sealed

ED = "FROST-ED25519-SHA512-v1"
BASE_ACCOUNTS = 3


@pytest.fixture(autouse=True)
def _local_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 talks to the local KMS only: fixed credentials, no profile or metadata lookups."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class World:
    """Everything the parent's runs share (files, keys, the KMS)."""

    work: Path
    nsm_dir: Path
    root_pem: bytes
    pki: Any
    enclave_toml: Path
    config_sha256: bytes
    pcrs: dict[int, bytes]
    kms_url: str
    compaction_arn: str
    base: Path
    base_sha256: str
    identity_sealed: Path
    identity_public: str
    approver_files: dict[str, Path]
    participant_files: dict[str, Path]
    counterpart_file: Path
    deltas_dir: Path


def parent_toml(w: World, source: Path) -> str:
    run_dir = w.work / "run"
    pcrs = {i: w.pcrs[i].hex() for i in (0, 1, 2)}
    return f"""
[bundle]
source = "{source}"
work_dir = "{run_dir}"
[kms]
mode = "local"
endpoint_url = "{w.kms_url}"
[enclave]
backend = "local"
nsm_dir = "{w.nsm_dir}"
config = "{w.enclave_toml}"
preload_timeout_s = 300
[ingress]
listen = "unix://{run_dir}/ingress.sock"
[attestation]
root = "{w.nsm_dir / "local-nsm-root.pem"}"
pcr0 = "{pcrs[0]}"
pcr1 = "{pcrs[1]}"
pcr2 = "{pcrs[2]}"
interval_s = 30
[failure]
restart = false
[health]
listen = "tcp://127.0.0.1:0"
[logs]
file = "{w.work / "enclave-logs.jsonl"}"
[deltas]
location = "file://{w.deltas_dir}"
[identity]
sealed_file = "{w.identity_sealed}"
"""


@asynccontextmanager
async def world_of(work: Path) -> AsyncIterator[World]:
    """The stack's files and keys, as the demo's local stack makes them, plus a KMS key pinned
    in ``[bundles] compaction_kms_keys`` and a 2-of-2 ``[policies.compact]``; the local KMS
    runs for the block."""
    from trio_sign.kms import KmsDataKeyProvider, make_kms_client
    from trio_sign.kms._server import KeyPolicy, LocalKms, serve_kms_local
    from trio_sign.kms._store import KeyStore
    from trio_sign.nitro import LocalNsm
    from trio_sign.nitro._local_nsm import local_pcrs_for_config
    from trio_sign.shares import CeremonyKey, seal_file
    from trio_sign.testing import make_dev_pki

    work = Path(await trio.Path(work).resolve())
    nsm_dir = work / "nsm"
    await trio.to_thread.run_sync(lambda: LocalNsm.from_dir(nsm_dir, create=True).close())
    root_pem = (nsm_dir / "local-nsm-root.pem").read_bytes()
    pki = await trio.to_thread.run_sync(make_dev_pki, work / "pki")
    gen = await trio.to_thread.run_sync(
        generate_shares, work / "shares", BASE_ACCOUNTS, [scheme_by_name(ED)]
    )
    ceremony_file = work / "ceremony-key.json"
    with CeremonyKey.generate() as ceremony:
        ceremony.save(ceremony_file)
        signer_hex = ceremony.public_key.hex()
    approver_files, policies_toml = await trio.to_thread.run_sync(
        make_approver_keys, work / "approvers"
    )
    participant_files, dkg_toml = await trio.to_thread.run_sync(make_dkg_keys, work)
    kms_keys = work / "kms-keys.json"
    keys = KeyStore(kms_keys)
    try:  # the key compaction seals under, pinned in the measured configuration
        compaction_arn = keys.arn_for(keys.create(description="compaction").key_id)
    finally:
        keys.close()
    head = (
        f"[gateway]\nclient_ca_pem = '''\n{pki.ca.read_text()}'''\n\n"
        f'[bundles]\nsigning_keys = ["{signer_hex}"]\n'
        f'compaction_kms_keys = ["{compaction_arn}"]\n'
    )
    rest = (
        "\n"
        + policies_toml
        + '\n[policies.compact]\napprovers = ["ops-1", "ops-2"]\nthreshold = 2\n'
        + dkg_toml
    )
    genesis_toml = work / "enclave-genesis.toml"
    genesis_toml.write_text(head + rest)
    identity_sealed, identity_public = await identity_genesis(
        work, nsm_dir=nsm_dir, enclave_toml=genesis_toml, root_pem=root_pem, kms_keys=kms_keys
    )
    enclave_toml = work / "enclave.toml"
    enclave_toml.write_text(head + f'delta_identity_key = "{identity_public}"\n' + rest)
    pcrs = local_pcrs_for_config(enclave_toml)
    async with trio.open_nursery() as nursery:
        kms = LocalKms(
            KeyStore(kms_keys), root_pem=root_pem, policy=KeyPolicy.from_json(_policy_json(pcrs))
        )
        kms_url = await nursery.start(serve_kms_local, kms, "tcp://127.0.0.1:0")
        client = make_kms_client(kms_url)
        created = await trio.to_thread.run_sync(lambda: client.create_key())
        base = work / "service_key_shares.json.enc"
        with CeremonyKey.load(ceremony_file) as signer:
            seal = await trio.to_thread.run_sync(
                functools.partial(
                    seal_file,
                    gen.service_file,
                    base,
                    KmsDataKeyProvider(client, created["KeyMetadata"]["KeyId"]),
                    overwrite=True,
                    signer=signer,
                )
            )
        yield World(
            work=work,
            nsm_dir=nsm_dir,
            root_pem=root_pem,
            pki=pki,
            enclave_toml=enclave_toml,
            config_sha256=hashlib.sha256(enclave_toml.read_bytes()).digest(),
            pcrs=pcrs,
            kms_url=kms_url,
            compaction_arn=compaction_arn,
            base=base,
            base_sha256=seal.sha256,
            identity_sealed=identity_sealed,
            identity_public=identity_public,
            approver_files=approver_files,
            participant_files=participant_files,
            counterpart_file=gen.participant_files[2],
            deltas_dir=work / "run" / "deltas",
        )
        nursery.cancel_scope.cancel()


@dataclass
class Running:
    """One parent run (and its enclave) with a gateway node and coordinator on it."""

    state: Any
    node: Any
    coordinator: Any


@asynccontextmanager
async def running(w: World, source: Path, sha256: str, dkg: Any) -> AsyncIterator[Running]:
    """The parent on ``source`` (its enclave launched, preloaded and attested: ready), and a
    gateway node over attested TLS pinned to ``sha256``; all of it stopped on the way out."""
    from trio_sign.attested import ChannelPolicy, make_attested_client_context
    from trio_sign.gateway import Coordinator, EnclaveNode, GatewayApprover, load_participant_files
    from trio_sign.parent import parse_parent_config, serve_parent

    config = parse_parent_config(parent_toml(w, source))
    async with trio.open_nursery() as nursery:
        state, _health = await nursery.start(functools.partial(serve_parent, config))
        started = time.monotonic()
        while not state.ready:
            assert time.monotonic() - started < 240, state.report()
            await trio.sleep(0.2)
        context = make_attested_client_context(
            w.pki.client_cert.read_bytes(), w.pki.client_key.read_bytes()
        )
        policy = ChannelPolicy(
            shares_sha256=bytes.fromhex(sha256),
            pcrs=w.pcrs,
            root_pem=w.root_pem,
            config_sha256=w.config_sha256,
        )
        node = EnclaveNode(
            "node-1",
            f"unix://{w.work}/run/ingress.sock",
            ssl_context=context,
            attestation=policy,
        )
        await nursery.start(node.run)
        counterparts = await trio.to_thread.run_sync(load_participant_files, [w.counterpart_file])
        approver = await trio.to_thread.run_sync(
            GatewayApprover.load, {k: w.approver_files[k] for k in ("ops-1", "risk-1")}
        )
        try:
            coordinator = Coordinator([node], counterparts, approver=approver)
            coordinator.add_counterparts(dkg.stores.values())
            yield Running(state, node, coordinator)
        finally:
            approver.close()
        nursery.cancel_scope.cancel()


async def create(w: World, run: Running, dkg: Any, participants: Any, account_id: str) -> str:
    """One account by DKG among the enclave and the gateway's participants (a delta)."""
    from trio_sign.gateway._dkg import DkgDriver

    driver = DkgDriver(
        [run.node],
        participants,
        dkg,
        approver=run.coordinator.approver,
        enclave_identity_key=bytes.fromhex(w.identity_public),
        on_created=run.coordinator.learned,
    )
    account = await driver.create_account(account_id, ED)
    assert account.account_id == account_id
    return account_id


async def signs_with(run: Running, accounts: list[str]) -> None:
    """Every account signs (the coordinator verifies each aggregate signature)."""
    for account_id in accounts:
        message = f"transfer from {account_id}".encode()
        signed = await run.coordinator.sign(account_id, message)
        assert verify_independently(
            scheme_by_name(ED), signed.group_public_key, message, signed.signature, None
        )


async def status(run: Running) -> pb.GetStatusResponse:
    answer: pb.GetStatusResponse = await run.node.get_status()
    return answer


async def test_a_compacted_base_boots_the_stack_with_every_account_and_the_chain_goes_on(
    tmp_path: Path,
) -> None:
    from trio_sign.gateway._dkg import DkgShares
    from trio_sign.gateway._dkg import load_local_participants as load_participants

    base_accounts = [f"acct-{i:08d}" for i in range(BASE_ACCOUNTS)]
    async with world_of(tmp_path / "w") as w:
        entries = {pid: (pid, path) for pid, path in w.participant_files.items()}
        participants = await trio.to_thread.run_sync(load_participants, entries)
        dkg = DkgShares(w.work / "dkg-journal.jsonl", list(entries))
        await trio.to_thread.run_sync(dkg.open)
        try:
            # 1. the ceremony's base, two accounts by DKG (deltas 1 and 2), then Compact.
            async with running(w, w.base, w.base_sha256, dkg) as run:
                created = [await create(w, run, dkg, participants, f"dkg-{i}") for i in (1, 2)]
                await signs_with(run, base_accounts + created)
                request = compact_request(
                    w.compaction_arn,
                    "compact-1",
                    [w.approver_files["ops-1"], w.approver_files["ops-2"]],
                    expires_in_ms=600_000,
                )
                compacted: pb.CompactResponse = await run.node._call(
                    "Compact", request, pb.CompactResponse, 240.0
                )
            assert compacted.accounts == BASE_ACCOUNTS + 2
            assert compacted.deltas == 2
            new_base = w.deltas_dir / f"base-{compacted.sha256}.enc"
            assert compacted.object == f"file://{new_base}"
            with new_base.open("rb") as f:
                header, _ = inspect_sealed(f)
            assert header["compacts"]["base"] == w.base_sha256
            assert header["kms_key_id"] == w.compaction_arn
            assert sorted(p.name for p in w.deltas_dir.glob("delta-*.enc")) == [
                "delta-00000001.enc",
                "delta-00000002.enc",
            ]

            # 2. [bundle] source = the new base, the same [deltas] location (which still
            # holds deltas 1 and 2: the enclave skips them); a delta after the compaction.
            async with running(w, new_base, compacted.sha256, dkg) as run:
                shown = await status(run)
                assert shown.accounts == BASE_ACCOUNTS + 2
                assert shown.deltas == 2
                await signs_with(run, base_accounts + created)
                created.append(await create(w, run, dkg, participants, "dkg-3"))
                await signs_with(run, ["dkg-3"])
            assert (w.deltas_dir / "delta-00000003.enc").exists()

            # 3. the second restart loads the delta made on the compacted base.
            async with running(w, new_base, compacted.sha256, dkg) as run:
                shown = await status(run)
                assert shown.accounts == BASE_ACCOUNTS + 3
                assert shown.deltas == 3
                await signs_with(run, base_accounts + created)
        finally:
            for p in participants:
                p.close()
            dkg.close()
