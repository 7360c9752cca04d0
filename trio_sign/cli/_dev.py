"""``trio-sign dev up --shares FILE``: keep the local stack running for people testing their
own Sign Gateway against it.

It generates a ceremony key in the work directory, seals FILE (a plaintext service share
file) through the local KMS signed by that key, writes the enclave's measured configuration
(enclave.toml: the development gateway CA, the ceremony key pinned in [bundles]
signing_keys, so the enclave runs the production signature check, and the approvers and
policy below), starts the parent, which
launches the enclave and verifies its attestation, and prints where to connect: gRPC over
attested TLS ending in the enclave (the parent's ingress is a byte pipe to it), the client
certificate to present, and the health endpoints.

The enclave's certificate is self-signed, made at boot: what vouches for it is its attestation
document, which binds the certificate's key. A client built on trio_sign.attested (or any
client that checks the binding, docs/attested-channel.md) verifies it on every connection
and needs nothing more. A stock gRPC client cannot check the binding itself; for it, dev up
opens one attested channel once the stack is ready, checks it (the key in the attestation is
the TLS certificate's, the bundle, this enclave.toml and the local PCRs are the pinned ones),
and writes the verified certificate to WORKDIR/enclave-cert.pem (printed as server_cert). Such
a client pins that certificate as its only root (grpcio: root_certificates, with
grpc.ssl_target_name_override set to the printed server_name): it trusts a node it verified
once, until the enclave restarts with a new key.

Events (SSE): by default a private event server is started and the enclave subscribes to it
through the parent's relay, which adds node-1's bearer token from the 0600 file printed as
``events_token``. To drive the enclave from your own gateway instead, give its events origin
with ``--gateway-url`` (``http://`` for a gateway on this machine, or ``https://``, with
``--gateway-ca`` for a private CA), this node's id at that gateway with ``--node-id``, and the
token that gateway expects for it with ``--events-token-file``: the enclave then subscribes to
``GATEWAY_URL/v1/enclaves/NODE_ID/events`` through the relay, and no private event server runs.

Approvals (DESIGN §11): the enclave.toml also pins three approver keys (ops-1 and ops-2
Ed25519, risk-1 P-256) with a 2-of-3 default policy, so every Sign needs two approvals. The
private keys are in WORKDIR/approvers/ (0600, printed as ``approvers``); ``gateway_toml`` is
a gateway.toml line (a dotted key: ``[approvers] keys``) that gives your gateway two of them
(``trio-sign gateway`` then approves every Sign it sends), and ``trio-sign approver approve``
makes one by hand.

Accounts by DKG (DESIGN §13, issue 16): at every ``dev up`` the delta identity key is made
once at genesis inside the local enclave (the parent's ``--genesis``, docs/runbook.md §7:
KMS seals its data key to the enclave's attestation; the sealed file, public data, is
WORKDIR/run/delta-identity.sealed.json), then pinned in the enclave.toml (``[bundles]
delta_identity_key``) and unsealed at every boot over the boot channel (``[identity]
sealed_file``). The enclave.toml also pins two DKG participant keys in ``[dkg] participants``
(p2 and p3, private keys in WORKDIR/participants/, 0600, printed as ``participants``) and a
2-of-3 ``[policies.create]`` over the same approvers; the parent stores delta bundles under
WORKDIR/run/deltas (``[deltas] location``). ``gateway_dkg`` is a gateway.toml line that gives
your gateway the participants, so its ``POST /v1/accounts`` creates accounts by DKG
(docs/gateway.md), with the enclave as one participant.

Ctrl-C (or SIGTERM) stops everything; the command exits 0 then. A port already in use or a
missing file is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

import trio

from .._errors import TrioSignError
from .._gc import configure_gc_for_serving
from .._profile import install_profile_toggle


def add_parser(sub: Any) -> None:
    dev = sub.add_parser("dev", help="development helpers")
    cmds = dev.add_subparsers(dest="dev_command", required=True, metavar="SUBCOMMAND")
    up = cmds.add_parser(
        "up",
        help="run the local stack (KMS, signed bundle, parent, enclave, attested TLS ending in "
        "the enclave) until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument(
        "--shares",
        type=Path,
        required=True,
        metavar="FILE",
        help="plaintext service share file (from `shares generate` or a ceremony)",
    )
    up.add_argument("--workdir", type=Path, default=Path("dev-stack"))
    up.add_argument(
        "--ingress",
        default=None,
        metavar="URL",
        help="where the parent's ingress (a byte pipe to the enclave's TLS port) listens"
        " (default a UNIX socket in workdir; e.g. tcp://127.0.0.1:50051)",
    )
    up.add_argument(
        "--ingress-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an [ingress] setting of the parent (parent.toml's key and TOML value), e.g. "
        "per_source_rate=inf; repeatable",
    )
    up.add_argument("--health", default="tcp://127.0.0.1:8080", metavar="URL")
    up.add_argument("--ready-timeout", type=float, default=300.0, metavar="SECONDS")
    up.add_argument(
        "--gateway-url",
        metavar="URL",
        help="events origin of your own gateway (e.g. http://127.0.0.1:8444): the enclave "
        "subscribes to URL/v1/enclaves/NODE_ID/events through the parent's relay instead of "
        "a private event server",
    )
    up.add_argument(
        "--node-id",
        default="node-1",
        metavar="ID",
        help="this node's id at the gateway (default node-1)",
    )
    up.add_argument(
        "--events-token-file",
        type=Path,
        metavar="FILE",
        help="with --gateway-url: a file holding the bearer token your gateway expects from "
        "this node (its [[node]] events_token); the relay adds it upstream",
    )
    up.add_argument(
        "--gateway-ca",
        type=Path,
        metavar="PEM",
        help="with an https:// --gateway-url: the CA that signed the gateway's certificate",
    )
    up.set_defaults(func=cmd_up)

    nsm = cmds.add_parser(
        "local-nsm",
        help="create the local NSM root and write its PCRs and a local KMS key policy",
        description="Local mode's stand-ins for what AWS provides. Creates DIR with the local "
        "NSM's root (local-nsm-root.key.pem, 0600, and local-nsm-root.pem: the root to pin in "
        "[attestation] root and to give `trio-sign kms-local --nsm-root`), unless it is there "
        "already; writes DIR/local.pcrs.json, the PCR0/1/2 a local enclave reports when it runs "
        "the measured configuration --enclave-config FILE (default: the built-in development "
        "one), in the format of enclave_image/build's trio-sign.pcrs.json, so "
        "`python -m trio_sign.ops` accepts it), and DIR/kms-policy.json, a key policy for "
        "`trio-sign kms-local --policy` that allows key creation and sealing and lets Decrypt "
        "through only with a Recipient attestation of those PCRs. Prints the PCRs.",
    )
    nsm.add_argument("--dir", type=Path, required=True, metavar="DIR")
    nsm.add_argument(
        "--enclave-config",
        type=Path,
        metavar="FILE",
        help="the enclave.toml the local enclave runs (parent.toml [enclave] config); its PCRs "
        "follow it (default: the built-in development configuration)",
    )
    nsm.set_defaults(func=cmd_local_nsm)

    pki = cmds.add_parser(
        "pki",
        help="write a development CA, a gateway client certificate and a server certificate",
        description="Writes DIR/ca.pem (the gateway CA: an enclave.toml's [gateway] "
        "client_ca_pem), DIR/gateway.pem and DIR/gateway.key (the client certificate a gateway "
        "presents; gateway.toml [tls]), and DIR/ingress.pem and DIR/ingress.key (a server "
        "certificate, server name localhost, for tools that need a CA-issued server: the "
        "parent's ingress takes none, TLS ends in the enclave); keys 0600. Development only: "
        "the CA key is not kept.",
    )
    pki.add_argument("--dir", type=Path, required=True, metavar="DIR")
    pki.add_argument("--days", type=int, default=7, help="validity (default 7)")
    pki.set_defaults(func=cmd_pki)


def _check_file(path: Path | None, flag: str) -> None:
    if path is not None and not path.is_file():
        raise TrioSignError(f"{flag} {path}: no such file")


def cmd_up(args: argparse.Namespace) -> int:
    from ..rpc import raise_open_file_limit
    from ._demo_full import local_stack
    from ._listen import check_port_free

    _check_file(args.shares, "--shares")
    if args.gateway_url is None and (args.events_token_file or args.gateway_ca):
        raise TrioSignError("--events-token-file and --gateway-ca need --gateway-url")
    _check_file(args.events_token_file, "--events-token-file")
    _check_file(args.gateway_ca, "--gateway-ca")
    check_port_free(args.health, "--health")
    check_port_free(args.ingress, "--ingress")
    ingress_options: dict[str, str] = {}
    for option in args.ingress_option:
        key, sep, value = option.partition("=")
        # one TOML value on its line of [ingress] (parse_parent_config checks it like any)
        if not sep or not key.strip().isidentifier() or not value.strip() or "\n" in value:
            raise TrioSignError(f"--ingress-option {option!r}: expected KEY=VALUE")
        ingress_options[key.strip()] = value.strip()
    raise_open_file_limit()  # the ingress holds two descriptors per forwarded connection
    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    ready = False

    async def run() -> None:
        nonlocal ready
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:  # also while the stack is still booting
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                async with local_stack(
                    work,
                    args.shares.resolve(),
                    ready_timeout=args.ready_timeout,
                    ingress_listen=args.ingress,
                    ingress_options=ingress_options,
                    health_listen=args.health,
                    gateway_url=args.gateway_url,
                    node_id=args.node_id,
                    events_token_file=(
                        args.events_token_file.resolve() if args.events_token_file else None
                    ),
                    gateway_ca=args.gateway_ca.resolve() if args.gateway_ca else None,
                ) as stack:
                    pinned = await pin_enclave_certificate(stack, work / ENCLAVE_CERT_FILE)
                    ready = True
                    _print_stack(stack, pinned)
                    await trio.sleep_forever()

    configure_gc_for_serving()  # as the enclave: rare, short full collections
    instruments = install_profile_toggle("dev-up")  # development: TRIO_SIGN_PROFILE_DIR
    trio.run(run, instruments=instruments)
    if not ready:  # stopped before it was up: say so (exit 130), after everything stopped
        raise KeyboardInterrupt
    return 0


#: Where ``dev up`` writes the enclave certificate it verified (for stock gRPC clients).
ENCLAVE_CERT_FILE = "enclave-cert.pem"
#: Bound on the one attested channel ``dev up`` opens once the stack is ready.
PIN_TIMEOUT_S = 30.0


async def pin_enclave_certificate(stack: Any, path: Path) -> tuple[Path, str]:
    """Verify the stack's enclave over one attested channel and write its TLS certificate to
    ``path`` (PEM): the pin for a stock client that cannot check the attestation binding.

    The channel (:func:`~trio_sign.attested.open_attested_channel`) proves the enclave's
    attestation binds the SPKI of the certificate it presented, and the pinned bundle, enclave.toml
    and PCRs. The certificate itself is read on a second connection with the same client
    context and accepted only if its SPKI is the one the attestation bound (the enclave has one
    key per boot; a relay with its own key is refused).

    Returns:
        ``(path, server name)``: the certificate file and the DNS name it carries (what a
        client sets as ``grpc.ssl_target_name_override``).

    Raises:
        TrioSignError: the check failed, or the second connection presented another key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from ..attested import (
        AttestedChannelError,
        make_attested_client_context,
        open_attested_channel,
        spki_of_certificate,
    )
    from ..transport import TransportError, connect

    context = make_attested_client_context(
        stack.pki.client_cert.read_bytes(), stack.pki.client_key.read_bytes()
    )
    try:
        with trio.fail_after(PIN_TIMEOUT_S):
            stream = await connect(stack.ingress_url)
            async with open_attested_channel(
                stream, policy=stack.channel_policy(), ssl_context=context
            ) as attested:
                verified_spki = attested.verified.peer_spki_der
            tls = trio.SSLStream(await connect(stack.ingress_url), context)
            try:
                await tls.do_handshake()
                der = tls.getpeercert(binary_form=True)
            finally:
                await trio.aclose_forcefully(tls)
    except (AttestedChannelError, TransportError, trio.BrokenResourceError) as exc:
        raise TrioSignError(f"the enclave's attested channel did not verify: {exc}") from exc
    except trio.TooSlowError:
        raise TrioSignError(
            f"the enclave's attested channel did not open within {PIN_TIMEOUT_S:g} s"
        ) from None
    if not der or spki_of_certificate(der) != verified_spki:
        raise TrioSignError(
            "the enclave presented another TLS key than the one its attestation bound"
        )
    certificate = x509.load_der_x509_certificate(der)
    names = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    await trio.Path(path).write_bytes(certificate.public_bytes(Encoding.PEM))
    return path, names[0]


def _print_stack(stack: Any, pinned: tuple[Path, str]) -> None:
    report = stack.state.report()
    pki = stack.pki
    cert_file, server_name = pinned
    token = (
        f"{stack.events_token_file}  (Authorization: Bearer)"
        if stack.events_token_file is not None
        else "none (the relay sends no token)"
    )
    print("local stack ready", flush=True)
    for key, value in (
        ("grpc", f"{stack.ingress_url}  (attested TLS ending in the enclave; TLS 1.3, h2)"),
        ("server_cert", f"{cert_file}  (verified by its attestation; pin as the only root)"),
        ("server_name", server_name),
        ("client_ca", pki.ca),
        ("client_cert", pki.client_cert),
        ("client_key", pki.client_key),
        ("health", f"{stack.health_url}/readyz"),
        ("events", f"{stack.events_url}/v1/enclaves/{stack.node_id}/events"),
        ("events_token", token),
        ("node_id", stack.node_id),
        ("accounts", report["accounts"]),
        ("shares_sha256", report["shares_sha256"]),
        ("bundle_signer", f"{stack.bundle_signer}  ({stack.ceremony_key_file})"),
        ("enclave_config", f"{stack.enclave_config}  (sha256 {stack.enclave_config_sha256})"),
        (
            "policy",
            f"default: {stack.policy_threshold} of {', '.join(stack.approver_key_files)}"
            " (every Sign needs that many approvals)",
        ),
        (
            "approvers",
            f"{stack.work / 'approvers'}  ("
            + ", ".join(
                f"{path.name} {stack.approver_types[key_id]}"
                for key_id, path in stack.approver_key_files.items()
            )
            + "; private keys, 0600)",
        ),
        (
            "gateway_toml",
            "approvers.keys = { "
            + ", ".join(
                f'{k} = "{stack.approver_key_files[k]}"' for k in stack.gateway_approver_ids
            )
            + " }",
        ),
        (
            "participants",
            ", ".join(f"{pid} {path}" for pid, path in stack.participant_key_files.items())
            + "  (DKG participant keys pinned in [dkg] participants; 0600)",
        ),
        (
            "gateway_dkg",
            "participants = { "
            + ", ".join(
                f'{pid} = {{ key_id = "{pid}", key_file = "{path}" }}'
                for pid, path in stack.participant_key_files.items()
            )
            + " }",
        ),
        (
            "dkg",
            f"create policy {stack.policy_threshold} of {', '.join(stack.approver_key_files)}; "
            f"delta identity key {stack.identity_public_key}; deltas in {stack.deltas_dir}",
        ),
    ):
        print(f"  {key:<14} {value}", flush=True)
    print("Ctrl-C stops everything.", flush=True)


def cmd_local_nsm(args: argparse.Namespace) -> int:
    import json

    from ..enclave._measured import load_measured_config
    from ..nitro import DEFAULT_LOCAL_PCRS, LocalNsm
    from ..nitro._local_nsm import ROOT_CERT_FILE, local_pcrs_for_config
    from ._demo_full import _policy_json

    directory: Path = args.dir
    if args.enclave_config is not None:
        load_measured_config(args.enclave_config)  # refused (exit 2, naming the key) if bad
        values = local_pcrs_for_config(args.enclave_config)
    else:
        values = dict(DEFAULT_LOCAL_PCRS)
    LocalNsm.from_dir(directory, create=True).close()
    pcrs = {f"PCR{i}": values[i].hex() for i in (0, 1, 2)}
    pcr_file = directory / "local.pcrs.json"
    pcr_file.write_text(json.dumps(pcrs, indent=2, sort_keys=True) + "\n")
    policy_file = directory / "kms-policy.json"
    policy_file.write_text(_policy_json(values) + "\n")
    print(f"root      {directory / ROOT_CERT_FILE}")
    print(f"pcrs      {pcr_file}")
    print(f"policy    {policy_file}")
    for name, value in pcrs.items():
        print(f"{name:<9} {value}")
    return 0


def cmd_pki(args: argparse.Namespace) -> int:
    from ..testing import make_dev_pki

    if args.days < 1:
        raise TrioSignError("--days must be at least 1")
    pki = make_dev_pki(args.dir, days=args.days)
    for key, value in (
        ("client_ca", pki.ca),
        ("server_cert", pki.server_cert),
        ("server_key", pki.server_key),
        ("client_cert", pki.client_cert),
        ("client_key", pki.client_key),
    ):
        print(f"{key:<12} {value}")
    return 0
