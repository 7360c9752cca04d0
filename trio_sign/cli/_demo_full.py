"""``trio-sign demo --stack full``: the whole system on one machine.

Steps, each a real component talking over real sockets:

1. generate test shares (service + counterpart participants);
2. start the local KMS (the KMS JSON protocol over HTTP, with a key policy that pins the local
   NSM's PCRs for ``Decrypt`` with ``Recipient``), generate a ceremony signing key in the work
   directory, and seal the service's shares through KMS with boto3, signed by that key;
3. generate three approver keys (``approvers/``: ``ops-1`` and ``ops-2`` Ed25519, ``risk-1``
   P-256, files 0600) and write the enclave's measured configuration (``enclave.toml``: the
   development gateway CA its TLS port checks, the ceremony key pinned in ``[bundles]
   signing_keys``, so the enclave runs the production signature check, not the unsigned
   development fallback, and the three approvers with a 2-of-3 ``[policies.default]``, so
   every Sign needs two approvals, DESIGN §11);
4. start the gateway's SSE event server, with a fresh bearer token for the node (written
   0600 into the work directory; the parent's ``[relay] token_file`` points at it, so the
   relay adds it to the enclave's subscription);
5. start the parent supervisor, which launches the local enclave (fresh namespaces where the
   kernel allows), serves its attested preload through KMS, verifies its attestation and
   opens the ingress, a byte pipe to the enclave's TLS port;
6. the reference gateway, holding two of the approver keys (``ops-1`` and ``risk-1``), first
   sends one Sign with a single approval and shows it refused (PERMISSION_DENIED, with the
   enclave's reason), then signs that same session with both approvals (a refusal does not
   consume the nonces); then it signs M messages on random accounts at concurrency C over
   attested TLS ending in the enclave (each connection checked before use: the attestation's
   key is the TLS certificate's, the bundle, the configuration and the PCRs are the pinned
   ones; every Sign approved by its two keys, every signature verified), with the health
   prober and its SSE probes running;
7. three parties (:mod:`._demo_three`, issue 17): the participant endpoint, the public
   account registry and ``trio-sign participant`` as a child process (its shares sealed in
   its own store, approving as ``ops-2``); a coordinator that holds no share and one approver
   key signs M messages again (every Sign needs the participant's approval and share), then
   both configurations run open loop at the same rate; ``--create-accounts N`` creates its
   accounts by DKG among the enclave and the participant process;
8. report, and shut everything down (the parent terminates the enclave, the participant
   process is ended).

The accounts are dealt in the suites ``--ciphersuite`` names (round-robin; Ed25519 alone by
default). Every signature the gateway returns (which it verified already) is verified again
here by the suite's own verifier (:func:`~trio_sign.cli._demo.verify_independently`): a
Taproot signature as BIP-340 by libsecp256k1 under the x-only output key (tweaked with
``--taproot-merkle-root`` when given, which the gateway then sends the enclave as
``SignRequest.taproot_merkle_root``). The report counts them per suite.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import random
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .._progress import Progress

log = logging.getLogger("trio_sign.demo")


def _policy_json(pcrs: dict[int, bytes]) -> str:
    """A key policy like the one ``python -m trio_sign.ops render-key-policy`` renders."""
    conditions = {"kms:RecipientAttestation:ImageSha384": pcrs[0].hex()}
    conditions |= {f"kms:RecipientAttestation:PCR{i}": pcrs[i].hex() for i in (1, 2)}
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "KeyAdministrationAndSealing",
                    "Effect": "Allow",
                    "Principal": {"AWS": "demo"},
                    "Action": ["kms:CreateKey", "kms:DescribeKey", "kms:GenerateDataKey"],
                    "Resource": "*",
                },
                {
                    "Sid": "ParentDecryptOnlyForTheAttestedEnclave",
                    "Effect": "Allow",
                    "Principal": {"AWS": "demo"},
                    "Action": "kms:Decrypt",
                    "Resource": "*",
                    "Condition": {"StringEqualsIgnoreCase": conditions},
                },
            ],
        }
    )


#: The local stack's approvers (DESIGN §11): key id -> key type; its enclave.toml's
#: ``[policies.default]`` needs :data:`POLICY_THRESHOLD` of them.
APPROVERS: dict[str, str] = {"ops-1": "ed25519", "ops-2": "ed25519", "risk-1": "p256"}
POLICY_THRESHOLD = 2
#: The approver keys the stack's gateway holds (the third stays outside it).
GATEWAY_APPROVERS: tuple[str, ...] = ("ops-1", "risk-1")


#: The DKG participants the stack's gateway holds (issue 16): participant id = key id; the
#: enclave is identifier 1, these 2 and 3 (a new account is 2-of-3, like a dealt one).
DKG_PARTICIPANTS: tuple[str, ...] = ("p2", "p3")


def make_dkg_keys(work: Path) -> tuple[dict[str, Path], str]:
    """The DKG side of the stack's measured configuration: fresh Ed25519 keys for the
    gateway's participants (``participants/<id>.key``, the approver key format, 0600).
    Returns ``(participant key files, the enclave.toml text: [dkg] participants and a 2-of-3
    [policies.create])``. The delta identity key is made at genesis inside an enclave
    (:func:`identity_genesis`). Blocking file I/O."""
    from ..gateway import ApproverSigningKey

    directory = work / "participants"
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    pins: list[str] = []
    for pid in DKG_PARTICIPANTS:
        path = directory / f"{pid}.key"
        path.unlink(missing_ok=True)
        with ApproverSigningKey.generate("ed25519") as key:
            key.save(path, key_id=pid)
            pins.append(f'{pid} = "{key.public_key.hex()}"')
        files[pid] = path
    names = ", ".join(f'"{k}"' for k in APPROVERS)
    toml = (
        f"\n[policies.create]\napprovers = [{names}]\nthreshold = {POLICY_THRESHOLD}\n"
        "\n[dkg]\n[dkg.participants]\n" + "\n".join(pins) + "\n"
    )
    return files, toml


async def identity_genesis(
    work: Path, *, nsm_dir: Path, enclave_toml: Path, root_pem: bytes, kms_keys: Path
) -> tuple[Path, str]:
    """Genesis of the stack's delta identity key (docs/runbook.md §7), as an operator runs it:
    a local KMS with a key for it, and ``trio-sign parent --genesis`` (a
    :class:`~trio_sign.parent.ParentSupervisor` with ``genesis``) booting the local enclave
    with ``enclave_toml`` (the stack's configuration before the pin) once; the enclave makes
    the key, KMS seals its data key to the enclave's attestation, and the parent writes the
    sealed file into ``work/run``. The KMS's key store stays in ``kms_keys`` for the stack's
    KMS, which opens the sealed file at every boot. Returns ``(sealed file, public key hex)``."""
    from ..kms import make_kms_client
    from ..kms._server import KeyPolicy, LocalKms, serve_kms_local
    from ..kms._store import KeyStore
    from ..nitro._local_nsm import local_pcrs_for_config
    from ..parent import parse_parent_config
    from ..parent._supervisor import ParentSupervisor

    sealed_file = work / "run" / "delta-identity.sealed.json"
    sealed_file.unlink(missing_ok=True)  # a fresh stack, a fresh key (like its KMS key)
    store = KeyStore(kms_keys)
    try:
        pcrs = local_pcrs_for_config(enclave_toml)
        kms = LocalKms(store, root_pem=root_pem, policy=KeyPolicy.from_json(_policy_json(pcrs)))
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_kms_local, kms, "tcp://127.0.0.1:0")
            client = make_kms_client(url)
            created = await trio.to_thread.run_sync(lambda: client.create_key())
            key_id = created["KeyMetadata"]["KeyId"]
            config = parse_parent_config(
                f"""
[bundle]
source = "{enclave_toml}"
work_dir = "{work / "genesis"}"
[kms]
mode = "local"
endpoint_url = "{url}"
[enclave]
backend = "local"
nsm_dir = "{nsm_dir}"
config = "{enclave_toml}"
preload_timeout_s = 120
[health]
listen = "tcp://127.0.0.1:0"
[logs]
file = "{work / "enclave-logs.jsonl"}"
[identity]
sealed_file = "{sealed_file}"
kms_key_id = "{key_id}"
"""
            )
            supervisor = ParentSupervisor(config, genesis=True)
            await supervisor.run()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    if supervisor.genesis_sealed is None:  # pragma: no cover - run() raised instead
        raise RuntimeError("the identity key's genesis did not complete")
    return sealed_file, supervisor.genesis_sealed.public_key.hex()


def make_approver_keys(directory: Path) -> tuple[dict[str, Path], str]:
    """Fresh approver keys (:data:`APPROVERS`) in ``directory`` (files 0600, older ones
    replaced), and the ``enclave.toml`` text that pins them with a 2-of-3 ``default`` policy.
    Blocking file I/O."""
    from ..gateway import ApproverSigningKey

    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    tables: list[str] = []
    for key_id, kind in APPROVERS.items():
        path = directory / f"{key_id}.key"
        path.unlink(missing_ok=True)
        with ApproverSigningKey.generate(kind) as key:
            key.save(path, key_id=key_id)
            tables.append(key.enclave_toml(key_id))
        files[key_id] = path
    names = ", ".join(f'"{k}"' for k in APPROVERS)
    toml = "\n".join(tables) + (
        f"\n[policies.default]\napprovers = [{names}]\nthreshold = {POLICY_THRESHOLD}\n"
    )
    return files, toml


def _say(text: str) -> None:
    print(text, flush=True)


@dataclass
class LocalStack:
    """A running local stack (what :func:`local_stack` yields)."""

    work: Path
    kms_url: str
    events_url: str
    ingress_url: str
    health_url: str
    pki: Any
    hub: Any  # the private event server's EventHub; None with an external gateway
    state: Any
    sealed_sha256: str
    nursery: trio.Nursery
    stop: trio.Event
    boot_to_ready_s: float = 0.0
    events_token_file: Path | None = None  # the node's bearer token at the event server (0600)
    node_id: str = "node-1"
    enclave_config: Path | None = None  # the local enclave's measured enclave.toml
    pcrs: dict[int, bytes] | None = None  # the local PCRs of the enclave (from enclave_config)
    nsm_root_pem: bytes = b""
    enclave_config_sha256: str = ""  # SHA-256 of enclave_config's bytes (what the enclave binds)
    ceremony_key_file: Path | None = None  # the key that signed the bundle (0600)
    bundle_signer: str = ""  # its Ed25519 public key, hex (pinned in [bundles] signing_keys)
    approver_key_files: dict[str, Path] = field(default_factory=dict)  # key id -> file (0600)
    approver_types: dict[str, str] = field(default_factory=dict)  # key id -> ed25519 / p256
    policy_threshold: int = 0  # [policies.default]: this many of the approvers
    participant_key_files: dict[str, Path] = field(default_factory=dict)  # DKG, id -> (0600)
    identity_public_key: str = ""  # [bundles] delta_identity_key, hex
    identity_sealed_file: Path | None = None  # its sealed file ([identity] sealed_file)
    deltas_dir: Path | None = None  # the parent's [deltas] location

    @property
    def gateway_approver_ids(self) -> tuple[str, ...]:
        """The approver keys the stack's gateway holds (:data:`GATEWAY_APPROVERS`)."""
        return tuple(k for k in GATEWAY_APPROVERS if k in self.approver_key_files)

    def gateway_approver(self, key_ids: tuple[str, ...] | None = None) -> Any:
        """A :class:`~trio_sign.gateway.GatewayApprover` holding ``key_ids`` (default: the
        gateway's two); the caller closes it (the keys are zeroed). Blocking file I/O."""
        from ..gateway import GatewayApprover

        ids = self.gateway_approver_ids if key_ids is None else key_ids
        return GatewayApprover.load({k: self.approver_key_files[k] for k in ids})

    def gateway_node(self, node_id: str = "node-1", *, node_class: Any = None) -> Any:
        """An :class:`~trio_sign.gateway.EnclaveNode` (or ``node_class``, a subclass) for this
        stack's enclave: TLS through the parent's byte pipe to the enclave itself, with the
        development client certificate, attested on every connection (DESIGN §10: the local
        NSM root, the local PCRs, this bundle's fingerprint, this enclave.toml's SHA-256)."""
        from ..attested import make_attested_client_context
        from ..gateway import EnclaveNode

        ssl_context = make_attested_client_context(
            self.pki.client_cert.read_bytes(), self.pki.client_key.read_bytes()
        )
        policy = self.channel_policy()
        cls = EnclaveNode if node_class is None else node_class
        return cls(node_id, self.ingress_url, ssl_context=ssl_context, attestation=policy)

    def channel_policy(self) -> Any:
        """The :class:`~trio_sign.attested.ChannelPolicy` this stack's enclave must meet."""
        from ..attested import ChannelPolicy

        assert self.pcrs is not None
        return ChannelPolicy(
            shares_sha256=bytes.fromhex(self.sealed_sha256),
            pcrs=self.pcrs,
            root_pem=self.nsm_root_pem,
            config_sha256=bytes.fromhex(self.enclave_config_sha256),
        )


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600, also over an older file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text + "\n")


@asynccontextmanager
async def local_stack(
    work: Path,
    service_shares: Path,
    *,
    ready_timeout: float,
    ingress_listen: str | None = None,
    health_listen: str = "tcp://127.0.0.1:0",
    restart: bool = False,
    restart_backoff_s: float = 0.5,
    gateway_url: str | None = None,
    node_id: str = "node-1",
    events_token_file: Path | None = None,
    gateway_ca: Path | None = None,
    ingress_options: Mapping[str, str] | None = None,
) -> AsyncIterator[LocalStack]:
    """Start local KMS, seal ``service_shares`` through it, the gateway event server, and the
    parent (which launches the local enclave); yield once ``/readyz`` would say ready. On exit
    everything stops (the parent terminates the enclave). With ``restart``, a dead enclave is
    relaunched after ``restart_backoff_s`` (then jittered, doubling up to 2 s).

    With ``gateway_url`` (the events origin of a gateway running elsewhere, ``http://`` or
    ``https://``), no private event server is started: the enclave subscribes to
    ``{gateway_url}/v1/enclaves/{node_id}/events`` through the parent's relay, which adds the
    token in ``events_token_file`` (if given) and trusts ``gateway_ca`` (if given) for HTTPS.
    """
    from ..gateway import EventHub, serve_gateway_events
    from ..kms import KmsDataKeyProvider, make_kms_client
    from ..kms._server import KeyPolicy, LocalKms, serve_kms_local
    from ..kms._store import KeyStore
    from ..nitro import LocalNsm
    from ..nitro._local_nsm import local_pcrs_for_config
    from ..parent import parse_parent_config, serve_parent
    from ..shares import CeremonyKey, seal_file
    from ..testing import make_dev_pki

    work = Path(await trio.Path(work).resolve())  # UNIX socket URLs need absolute paths
    service_shares = Path(await trio.Path(service_shares).resolve())
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local-development")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local-development")
    nsm_dir = work / "nsm"
    await trio.to_thread.run_sync(lambda: LocalNsm.from_dir(nsm_dir, create=True).close())
    root_pem = (nsm_dir / "local-nsm-root.pem").read_bytes()
    pki = await trio.to_thread.run_sync(make_dev_pki, work / "pki")
    # The ceremony key that signs the bundle (DESIGN §12), fresh for every run like the KMS
    # key; the enclave only loads a bundle signed by a key its measured configuration pins.
    ceremony_key_file = work / "ceremony-key.json"
    ceremony_key_file.unlink(missing_ok=True)
    with CeremonyKey.generate() as ceremony_key:
        ceremony_key.save(ceremony_key_file)
        bundle_signer = ceremony_key.public_key.hex()
    # The approvers (DESIGN §11): three keys, a 2-of-3 default policy; the gateway holds two.
    approver_files, policies_toml = await trio.to_thread.run_sync(
        make_approver_keys, work / "approvers"
    )
    # Accounts created by DKG (DESIGN §13): the gateway's participant keys pinned in [dkg]
    # and the create policy.
    participant_files, dkg_toml = await trio.to_thread.run_sync(make_dkg_keys, work)
    # The local enclave's measured configuration (DESIGN §9): the development CA is the
    # gateway client CA its TLS port checks, the ceremony key is the one signing key a bundle
    # may carry (so the production check runs), the approvers and the policy every account
    # signs under, the DKG participants; the local PCRs follow this file.
    gateway_and_bundles = (
        f"[gateway]\nclient_ca_pem = '''\n{pki.ca.read_text()}'''\n\n"
        f'[bundles]\nsigning_keys = ["{bundle_signer}"]\n'
    )
    # The delta identity key that signs the enclave's deltas (DESIGN §12): created at genesis
    # inside an enclave running this configuration without the pin, sealed under KMS; then
    # pinned (the file below, whose PCRs the key policy names) and unsealed at every boot.
    (work / "kms-keys.json").unlink(missing_ok=True)
    genesis_toml = work / "enclave-genesis.toml"
    genesis_toml.write_text(gateway_and_bundles + "\n" + policies_toml + dkg_toml)
    _say("      genesis of the delta identity key inside an enclave (the parent's --genesis)")
    identity_sealed, identity_public = await identity_genesis(
        work,
        nsm_dir=nsm_dir,
        enclave_toml=genesis_toml,
        root_pem=root_pem,
        kms_keys=work / "kms-keys.json",
    )
    _say(f"      delta identity key {identity_public} (sealed in {identity_sealed})")
    enclave_toml = work / "enclave.toml"
    enclave_toml.write_text(
        gateway_and_bundles
        + f'delta_identity_key = "{identity_public}"\n\n'
        + policies_toml
        + dkg_toml
    )
    enclave_config_sha256 = hashlib.sha256(enclave_toml.read_bytes()).hexdigest()
    local_pcrs = local_pcrs_for_config(enclave_toml)
    async with trio.open_nursery() as nursery:
        _say(
            "      starting the local KMS and sealing the service's shares through it (boto3), "
            f"signed by the ceremony key {bundle_signer[:16]}…"
        )
        kms = LocalKms(  # the key store keeps the identity's key from the genesis
            KeyStore(work / "kms-keys.json"),
            root_pem=root_pem,
            policy=KeyPolicy.from_json(_policy_json(local_pcrs)),
        )
        kms_url = await nursery.start(serve_kms_local, kms, "tcp://127.0.0.1:0")
        client = make_kms_client(kms_url)
        created = await trio.to_thread.run_sync(lambda: client.create_key())
        key_id = created["KeyMetadata"]["KeyId"]
        sealed = work / "service_key_shares.json.enc"
        with await trio.to_thread.run_sync(CeremonyKey.load, ceremony_key_file) as signer:
            seal = await trio.to_thread.run_sync(
                functools.partial(
                    seal_file,
                    service_shares,
                    sealed,
                    KmsDataKeyProvider(client, key_id),
                    overwrite=True,
                    signer=signer,
                )
            )
        hub: EventHub | None = None
        if gateway_url is None:
            _say(
                f"      starting the gateway's SSE event server ({node_id} authenticates "
                "with a token)"
            )
            hub = EventHub()
            events_token = secrets.token_urlsafe(32)
            events_token_file = work / f"{node_id}-events.token"
            await trio.to_thread.run_sync(write_secret, events_token_file, events_token)
            binds = await nursery.start(
                functools.partial(
                    serve_gateway_events,
                    "tcp://127.0.0.1:0",
                    hub,
                    credentials={node_id: events_token},
                )
            )
            events_origin = binds[0].rstrip("/")
        else:
            events_origin = gateway_url.rstrip("/")
            _say(f"      the enclave will subscribe to the gateway at {events_origin} as {node_id}")
        relay_extra = "".join(
            f'{key} = "{value}"\n'
            for key, value in (("token_file", events_token_file), ("ca", gateway_ca))
            if value is not None
        )
        _say("      starting the parent; it launches the enclave and serves the attested preload")
        run_dir = work / "run"
        deltas_dir = run_dir / "deltas"
        ingress_url = ingress_listen or f"unix://{run_dir}/ingress.sock"
        # [ingress] keys as TOML values (checked by parse_parent_config like any parent.toml)
        ingress_extra = "".join(f"{k} = {v}\n" for k, v in (ingress_options or {}).items())
        pcrs = {i: local_pcrs[i].hex() for i in (0, 1, 2)}
        config = parse_parent_config(
            f"""
[bundle]
source = "{sealed}"
work_dir = "{run_dir}"
[kms]
mode = "local"
endpoint_url = "{kms_url}"
[enclave]
backend = "local"
nsm_dir = "{nsm_dir}"
config = "{enclave_toml}"
gateway_url = "{events_origin}"
node_id = "{node_id}"
preload_timeout_s = 300
[ingress]
listen = "{ingress_url}"
{ingress_extra}[attestation]
root = "{nsm_dir / "local-nsm-root.pem"}"
pcr0 = "{pcrs[0]}"
pcr1 = "{pcrs[1]}"
pcr2 = "{pcrs[2]}"
interval_s = 30
[relay]
allowlist = ["{events_origin}/v1/enclaves/"]
{relay_extra}[failure]
restart = {"true" if restart else "false"}
backoff_initial_s = {restart_backoff_s}
backoff_max_s = {max(2.0, restart_backoff_s)}
[health]
listen = "{health_listen}"
[logs]
file = "{work / "enclave-logs.jsonl"}"
[deltas]
location = "file://{deltas_dir}"
[identity]
sealed_file = "{identity_sealed}"
"""
        )
        started = time.monotonic()
        stop = trio.Event()  # set it for the parent's orderly stop (drain, then terminate)
        state, health = await nursery.start(functools.partial(serve_parent, config, stop=stop))
        with trio.fail_after(ready_timeout), Progress("      waiting for readiness") as waiting:
            while not state.ready:
                waiting.status(
                    f"enclave {state.enclave_state}, attestation "
                    f"{'verified' if state.attestation_verified else 'pending'} "
                    f"({time.monotonic() - started:4.1f} s)"
                )
                await trio.sleep(0.2)
        yield LocalStack(
            work=work,
            kms_url=kms_url,
            events_url=events_origin,
            ingress_url=ingress_url,
            health_url=health[0],
            pki=pki,
            hub=hub,
            state=state,
            sealed_sha256=seal.sha256,
            nursery=nursery,
            stop=stop,
            boot_to_ready_s=time.monotonic() - started,
            events_token_file=events_token_file,
            node_id=node_id,
            enclave_config=enclave_toml,
            pcrs=local_pcrs,
            nsm_root_pem=root_pem,
            enclave_config_sha256=enclave_config_sha256,
            ceremony_key_file=ceremony_key_file,
            bundle_signer=bundle_signer,
            approver_key_files=approver_files,
            approver_types=dict(APPROVERS),
            policy_threshold=POLICY_THRESHOLD,
            participant_key_files=participant_files,
            identity_public_key=identity_public,
            identity_sealed_file=identity_sealed,
            deltas_dir=deltas_dir,
        )
        _say("      shutting down (the parent terminates the enclave)")
        nursery.cancel_scope.cancel()


async def run_full_stack(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from ..gateway import (
        Coordinator,
        CoordinatorSettings,
        load_participant_files,
        run_prober,
    )
    from ._demo import (
        SuiteTally,
        generate_shares,
        merkle_root_arg,
        selected_suites,
        suite_of_accounts,
        verify_independently,
    )
    from ._demo_three import (
        PARTICIPANT_APPROVER,
        PARTICIPANT_ID,
        THREE_PARTY_GATEWAY_APPROVERS,
        Measured,
        measure,
        start_three_party,
    )

    n_accounts: int = args.accounts
    suites = selected_suites(args)
    root = merkle_root_arg(args, suites)
    names = ", ".join(s.name for s in suites)
    _say(f"[1/3] generating {n_accounts:,} accounts (2-of-3, {names}) into {work}/")
    gen = await trio.to_thread.run_sync(
        functools.partial(generate_shares, work / "shares", n_accounts, suites)
    )
    _say(
        "[2/3] starting the stack: local KMS, signed bundle, gateway events, parent, enclave "
        "(attested TLS ending in the enclave)"
    )
    async with local_stack(work, gen.service_file, ready_timeout=args.ready_timeout) as stack:
        report = stack.state.report()
        _say(
            f"      ready: {report['accounts']:,} accounts, shares "
            f"{report['shares_sha256'][:16]}…, preload {report['preload_ms']} ms; "
            f"health at {stack.health_url}"
        )
        _say(
            f"[3/3] signing {args.signatures:,} messages on random accounts through the gateway "
            f"(attested TLS ending in the enclave, concurrency {args.concurrency}), approved by "
            f"{', '.join(stack.gateway_approver_ids)} (policy: {stack.policy_threshold} of "
            f"{', '.join(stack.approver_key_files)}); first, one Sign with too few approvals"
        )
        node = stack.gateway_node(node_class=refused_first_node_class())
        await stack.nursery.start(node.run)
        await stack.nursery.start(
            functools.partial(
                run_prober,
                [node],
                interval_s=2.0,
                evict_after_s=10.0,
                send_probe=stack.hub.send_probe,
            )
        )
        counterparts = await trio.to_thread.run_sync(
            load_participant_files, [gen.participant_files[2]]
        )
        approver = await trio.to_thread.run_sync(stack.gateway_approver)
        try:
            coordinator = Coordinator(
                [node],
                counterparts,
                settings=CoordinatorSettings(max_concurrent_signatures=args.concurrency),
                approver=approver,
            )
            width = max(8, len(str(n_accounts)))
            ids = [f"acct-{i:0{width}d}" for i in range(n_accounts)]
            suite_of = suite_of_accounts(counterparts[0], ids)
            tallies = {s.name: SuiteTally() for s in suites}
            for scheme in suite_of.values():
                tallies[scheme.name].accounts += 1
            rng = random.Random(args.seed)
            first = ids[0]
            refusal = await refused_then_signed(
                coordinator,
                node,
                first,
                taproot_merkle_root=root if suite_of[first].taproot else None,
            )
            _say(f"      refused: {refusal['refused']}")
            _say(f"      then:    {refusal['then']}")
            latencies: list[float] = []
            failures: list[str] = []
            taproot_sample: dict[str, str] = {}  # one signature for the report, to check by hand
            next_index = 0
            progress = Progress("      signing")
            t0 = time.perf_counter()

            async def worker() -> None:
                nonlocal next_index
                while next_index < args.signatures:
                    i = next_index
                    next_index += 1
                    account = rng.choice(ids)
                    scheme = suite_of[account]
                    tweak = root if scheme.taproot else None
                    message = f"demo transfer {i}".encode()
                    start = time.perf_counter()
                    try:
                        signed = await coordinator.sign(account, message, taproot_merkle_root=tweak)
                    except Exception as exc:  # counted and reported, the run goes on
                        failures.append(f"{type(exc).__name__}: {exc}")
                        continue
                    elapsed_s = time.perf_counter() - start
                    tally = tallies[scheme.name]
                    tally.signatures += 1
                    ok = signed.ciphersuite == scheme.name and verify_independently(
                        scheme, signed.group_public_key, message, signed.signature, tweak
                    )
                    if not ok:
                        failures.append(
                            f"{scheme.name} signature for {account} did not verify independently"
                        )
                        continue
                    tally.verified += 1
                    if scheme.taproot and not taproot_sample:
                        taproot_sample.update(
                            account=account,
                            message_hex=message.hex(),
                            output_key_hex=signed.verifying_key.hex(),
                            signature_hex=signed.signature.hex(),
                        )
                    latencies.append(elapsed_s)
                    progress(len(latencies) + len(failures), args.signatures)

            with progress:
                async with trio.open_nursery() as workers:
                    for _ in range(args.concurrency):
                        workers.start_soon(worker)
            elapsed = time.perf_counter() - t0
            latencies.sort()

            def pct(q: float) -> float:
                if not latencies:
                    return 0.0
                return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] * 1e3

            # who approved the two-party run (before the measurements below add more)
            approvals = dict(coordinator.approvals_sent)
            two_party = Measured(
                closed_signed=len(latencies),
                closed_seconds=elapsed,
                closed_latencies=[x for x in latencies],
                failures=list(failures),
            )
            _say(
                "[+]   three parties: the gateway holds no share; participant "
                f"{PARTICIPANT_ID} (its own process, `trio-sign participant`) approves "
                f"({PARTICIPANT_APPROVER}) and signs with its sealed share; the gateway "
                f"approves with {', '.join(THREE_PARTY_GATEWAY_APPROVERS)}"
            )
            three = await start_three_party(stack, node, gen, args.concurrency, stack.nursery)
            try:

                def signer(coord: Any) -> Any:
                    async def sign(i: int) -> None:
                        account = rng.choice(ids)
                        scheme = suite_of[account]
                        tweak = root if scheme.taproot else None
                        message = f"demo transfer {i} ({'3' if coord is not coordinator else '2'}p)"
                        signed = await coord.sign(
                            account, message.encode(), taproot_merkle_root=tweak
                        )
                        if not verify_independently(
                            scheme,
                            signed.group_public_key,
                            message.encode(),
                            signed.signature,
                            tweak,
                        ):
                            raise RuntimeError(f"{account}: did not verify independently")

                    return sign

                open_n = max(10, min(args.signatures, 1000))
                with Progress("      three-party: closed loop, then open loop"):
                    three_m = await measure(
                        signer(three.coordinator),
                        signatures=args.signatures,
                        concurrency=args.concurrency,
                        open_rate=None,
                        open_count=open_n,
                    )
                with Progress("      two-party baseline: open loop at the same rate"):
                    two_open = await measure(
                        signer(coordinator),
                        signatures=0,
                        concurrency=args.concurrency,
                        open_rate=three_m.open_rate,
                        open_count=open_n,
                    )
                two_party.open_rate = two_open.open_rate
                two_party.open_latencies = two_open.open_latencies
                two_party.failures += two_open.failures
                failures += three_m.failures + two_open.failures
                three_party_report = {
                    "three_party": three_m.line(),
                    "two_party": two_party.line(),
                    "three_party_approved_by": ", ".join(
                        f"{k}: {n:,}" for k, n in three.coordinator.approvals_sent.items()
                    )
                    or "none",
                    "three_party_participant": f"{PARTICIPANT_ID} at {three.participant_url} "
                    f"(config {three.participant_config}, log {three.log_path}); the gateway "
                    "loaded no share file for it",
                }
                dkg: dict[str, Any] = {}
                create_n = int(args.create_accounts or 0)
                if create_n > 0:
                    _say(
                        f"[+]   creating {create_n:,} accounts by DKG among the enclave and "
                        f"participant {PARTICIPANT_ID} (the gateway coordinates, holds no "
                        f"share; {names}), then signing with each"
                    )
                    dkg = await create_accounts_by_dkg(
                        stack,
                        node,
                        three.coordinator,
                        approver,
                        suites,
                        create_n,
                        args.concurrency,
                        remote=three,
                    )
                    failures += dkg.pop("_failures")
            finally:
                three.close()
            channel = attested_channel_report(node, stack)
        finally:
            approver.close()  # the keys are zeroed

    return {
        "accounts": report["accounts"],
        "sealed_sha256": stack.sealed_sha256,
        "enclave_sha256": report["shares_sha256"],
        "preload_ms": report["preload_ms"],
        "signatures": args.signatures,
        "verified": len(latencies),
        "failures": len(failures),
        "first_failure": failures[0] if failures else "",
        "concurrency": args.concurrency,
        "sessions_per_second": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(pct(0.50), 2),
        "p99_ms": round(pct(0.99), 2),
        "mean_ms": round(statistics.fmean(latencies) * 1e3, 2) if latencies else 0.0,
        "bundle_signer": stack.bundle_signer,
        "signing_key_file": str(stack.ceremony_key_file),
        "enclave_config": str(stack.enclave_config),
        "enclave_config_sha256": stack.enclave_config_sha256,
        "delta_identity_key": (
            f"{stack.identity_public_key}: made at genesis inside the enclave, sealed under "
            f"KMS ({stack.identity_sealed_file}), pinned, unsealed at every boot"
        ),
        **channel,
        "policy": (
            f"default: {stack.policy_threshold} of "
            + ", ".join(f"{k} ({t})" for k, t in stack.approver_types.items())
            + " (enclave.toml [approvers], [policies])"
        ),
        "approved_by": ", ".join(
            f"{k} ({stack.approver_types.get(k, '?')}): {n:,} approvals"
            for k, n in approvals.items()
        )
        or "none",
        "approver_keys": str(stack.work / "approvers"),
        **refusal,
        **three_party_report,
        "ciphersuites": {s.name: tallies[s.name].line(s, root) for s in suites},
        **({"taproot_sample": json.dumps(taproot_sample)} if taproot_sample else {}),
        **dkg,
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def create_accounts_by_dkg(
    stack: LocalStack,
    node: Any,
    coordinator: Any,
    approver: Any,
    suites: Sequence[Any],
    count: int,
    concurrency: int,
    *,
    remote: Any = None,
) -> dict[str, Any]:
    """``--create-accounts N``: N accounts by DKG (round-robin over ``suites``) through the
    gateway's :class:`~trio_sign.gateway._dkg.DkgDriver` on ``node`` (the attested channel),
    with the stack's participant keys and the gateway's approvers under the ``create`` policy;
    then one signature per created account through ``coordinator`` (which learns their shares
    at once, no restart), each verified again by the suite's own verifier. Returns the
    report's ``dkg_*`` lines and ``_failures`` (failure lines, for the run's count).

    With ``remote`` (the three-party setup, :mod:`._demo_three`) the other participant is the
    participant process (a :class:`~trio_sign.gateway._remote_dkg.RemoteDkgParticipant`): the
    accounts are 2-of-2 between the enclave and it, its share sealed in its store before it
    answers, and only their public part lands here (the account registry)."""
    from ..gateway._dkg import DkgDriver, DkgFailed, DkgSettings, DkgShares
    from ..gateway._dkg import load_local_participants as load_participants
    from ._demo import SuiteTally, verify_independently

    journal = stack.work / "dkg-journal.jsonl"
    journal.unlink(missing_ok=True)  # a fresh stack: the enclave knows none of the old ones
    entries = {pid: (pid, path) for pid, path in stack.participant_key_files.items()}
    everyone: list[Any] = []
    registry = None
    if remote is not None:
        from ..gateway._remote_dkg import RemoteDkgParticipant
        from ._demo_three import PARTICIPANT_ID

        entries = {}
        everyone = [RemoteDkgParticipant(remote.hub, PARTICIPANT_ID, PARTICIPANT_ID)]
        registry = remote.registry
    participants = await trio.to_thread.run_sync(load_participants, entries)
    everyone = [*participants, *everyone]
    shares = DkgShares(journal, list(entries))
    await trio.to_thread.run_sync(shares.open)
    failures: list[str] = []
    tallies = {s.name: SuiteTally() for s in suites}
    created: list[Any] = []
    try:
        coordinator.add_counterparts(shares.stores.values())
        driver = DkgDriver(
            [node],
            everyone,
            shares,
            approver=approver,
            enclave_identity_key=bytes.fromhex(stack.identity_public_key),
            settings=DkgSettings(max_concurrent=min(concurrency, 8)),
            on_created=coordinator.learned,
            registry=registry,
        )
        next_index = 0
        progress = Progress("      creating")

        async def creator() -> None:
            nonlocal next_index
            while next_index < count:
                i = next_index
                next_index += 1
                suite = suites[i % len(suites)]
                try:
                    account = await driver.create_account(f"dkg-{i:06d}", suite.name)
                except DkgFailed as exc:
                    failures.append(f"DKG {exc.reason}: {exc}")
                else:
                    created.append(account)
                    tallies[suite.name].accounts += 1
                progress(len(created) + len(failures), count)

        t0 = time.perf_counter()
        with progress:
            async with trio.open_nursery() as workers:
                for _ in range(min(concurrency, 8)):
                    workers.start_soon(creator)
        elapsed = time.perf_counter() - t0
        by_name = {s.name: s for s in suites}
        for account in created:
            scheme = by_name[account.ciphersuite]
            message = f"first transfer from {account.account_id}".encode()
            try:
                signed = await coordinator.sign(account.account_id, message)
            except Exception as exc:  # counted and reported, the run goes on
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            tally = tallies[scheme.name]
            tally.signatures += 1
            if verify_independently(
                scheme, signed.group_public_key, message, signed.signature, None
            ):
                tally.verified += 1
            else:
                failures.append(f"{account.account_id}: signature did not verify independently")
    finally:
        for p in participants:
            p.close()
        shares.close()
    enclave_ms = [a.enclave_ms for a in created]
    total_ms = [a.total_ms for a in created]
    return {
        "dkg_accounts": f"{len(created):,} of {count:,} created by DKG ("
        + ", ".join(f"{n}: {t.accounts}" for n, t in tallies.items())
        + f"); journal {journal}",
        "dkg_latency": (
            f"enclave side (DkgRound1..3) p50 {_percentile(enclave_ms, 0.5):.1f} ms, p99 "
            f"{_percentile(enclave_ms, 0.99):.1f} ms; end to end p50 "
            f"{_percentile(total_ms, 0.5):.1f} ms, p99 {_percentile(total_ms, 0.99):.1f} ms"
        ),
        "dkg_accounts_per_second": round(len(created) / elapsed, 1) if elapsed else 0.0,
        "dkg_signed": f"{sum(t.signatures for t in tallies.values()):,} signed, "
        f"{sum(t.verified for t in tallies.values()):,} verified independently",
        "dkg_first_failure": failures[0] if failures else "",
        "_failures": failures,
    }


def refused_first_node_class() -> Any:
    """An :class:`~trio_sign.gateway.EnclaveNode` whose first ``Sign`` that carries more than
    one approval is first sent with only the first of them: the enclave must refuse it
    (PERMISSION_DENIED, its reason recorded in ``refusal``), and the real request then signs
    that same session (a refusal does not consume the nonces, DESIGN §11)."""
    from ..gateway import EnclaveNode
    from ..rpc import RpcError, StatusCode

    class RefusedFirst(EnclaveNode):
        refusal: str | None = None
        refused_session: str | None = None

        async def sign(
            self,
            session_id: str,
            message: bytes,
            commitments: Any,
            approvals: Any = (),
            *,
            taproot_merkle_root: bytes | None = None,
        ) -> Any:
            root = taproot_merkle_root
            if self.refused_session is None and len(approvals) > 1:
                self.refused_session = session_id
                try:
                    await super().sign(
                        session_id, message, commitments, approvals[:1], taproot_merkle_root=root
                    )
                except RpcError as exc:
                    if exc.status != StatusCode.PERMISSION_DENIED:
                        raise
                    self.refusal = str(exc)
                else:
                    self.refusal = "NOT REFUSED: the enclave signed with one approval"
            return await super().sign(
                session_id, message, commitments, approvals, taproot_merkle_root=root
            )

    return RefusedFirst


async def refused_then_signed(
    coordinator: Any, node: Any, account_id: str, *, taproot_merkle_root: bytes | None = None
) -> dict[str, str]:
    """One signature through ``node`` (a :func:`refused_first_node_class` node): its first
    Sign carries one approval and is refused, the same session then signs with two. Returns
    the report's ``refused`` and ``then`` lines."""
    message = b"demo: a transfer that one approver alone may not sign"
    try:
        await coordinator.sign_message(account_id, message, taproot_merkle_root=taproot_merkle_root)
    except Exception as exc:  # reported; the demo's exit status says it failed
        return {"refused": node.refusal or "NOT REFUSED", "then": f"FAILED: {exc}"}
    return {
        "refused": node.refusal or "NOT REFUSED: no Sign carried two approvals",
        "then": (
            f"the same session ({node.refused_session}) signed with "
            f"{len(coordinator.approver.key_ids)} approvals; signature verified"
        ),
    }


def attested_channel_report(node: Any, stack: LocalStack) -> dict[str, Any]:
    """What the gateway's check proved about ``node``'s current connection, for the report:
    ``attested_channel`` is ``verified`` only if the enclave's document bound this
    connection's TLS key, the sealed bundle, this stack's enclave.toml and the local PCRs
    (the policy pinned all of them; anything else was refused before any call was sent)."""
    verified = node.verified
    if verified is None:
        return {"attested_channel": "NOT VERIFIED", "attested_connections": 0}
    checks = {
        "SPKI": verified.attestation.public_key == verified.peer_spki_der,
        "shares": verified.binding.shares.hex() == stack.sealed_sha256,
        "config": verified.binding.config.hex() == stack.enclave_config_sha256,
        "PCRs": stack.pcrs is not None
        and all(verified.attestation.pcrs.get(i) == stack.pcrs[i] for i in (0, 1, 2)),
    }
    failed = [name for name, ok in checks.items() if not ok]
    return {
        "attested_channel": (
            "verified (" + ", ".join(checks) + ")" if not failed else f"MISMATCH {failed}"
        ),
        "attested_connections": node.attestations_verified,
        "enclave_spki_sha256": hashlib.sha256(verified.peer_spki_der).hexdigest(),
        "enclave_module_id": verified.attestation.module_id,
    }
