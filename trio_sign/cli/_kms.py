"""``trio-sign kms-local``: the local KMS stand-in (KMS JSON protocol over HTTP; development
and tests only, NOT for production: SigV4 is not verified and keys sit in a local file)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from .._errors import TrioSignError

log = logging.getLogger("trio_sign.cli")


def add_parser(sub: Any) -> None:
    kms = sub.add_parser(
        "kms-local",
        help="the local KMS stand-in for development (KMS JSON protocol, Recipient support)",
        description="Serve AWS KMS's JSON 1.1 protocol (CreateKey, DescribeKey, "
        "GenerateDataKey, Encrypt, Decrypt, with Recipient attestation) for boto3 clients "
        "given --endpoint-url / --kms-endpoint. Attestation documents are verified against "
        "--nsm-root and the optional key policy. Development only: any Authorization header "
        "is accepted (SigV4 is not checked) and the keys are kept in clear in --keys.",
    )
    kms.add_argument(
        "--listen",
        default="tcp://127.0.0.1:4599",
        metavar="URL",
        help="tcp://HOST:PORT (port 0 picks one) or unix:///PATH (default tcp://127.0.0.1:4599)",
    )
    kms.add_argument(
        "--keys",
        type=Path,
        required=True,
        metavar="FILE",
        help="the key file (JSON, mode 0600; created if missing)",
    )
    kms.add_argument(
        "--nsm-root",
        type=Path,
        required=True,
        metavar="PEM",
        help="attestation root to trust for Recipient requests (the local NSM's "
        "local-nsm-root.pem)",
    )
    kms.add_argument(
        "--policy",
        type=Path,
        metavar="POLICY.json",
        help="a KMS key policy document applied to every key (Allow/Deny statements with "
        "kms:RecipientAttestation:ImageSha384 / PCR<n> conditions); default: allow all",
    )
    kms.add_argument(
        "--create-key",
        action="store_true",
        help="create a new key at startup and print its id",
    )
    kms.set_defaults(func=cmd_kms_local)


def cmd_kms_local(args: argparse.Namespace) -> int:
    from ..kms import KeyPolicy, KeyStore, LocalKms, PolicyError, serve_kms_local
    from ._listen import check_port_free

    check_port_free(args.listen, "--listen")

    try:
        root_pem = args.nsm_root.read_bytes()
    except OSError as exc:
        raise TrioSignError(f"cannot read --nsm-root {args.nsm_root}: {exc.strerror}") from None
    policy = None
    if args.policy is not None:
        try:
            policy = KeyPolicy.from_json(args.policy.read_bytes())
        except OSError as exc:
            raise TrioSignError(f"cannot read --policy {args.policy}: {exc.strerror}") from None
        except PolicyError as exc:
            raise TrioSignError(f"--policy {args.policy}: {exc}") from None
    else:
        log.warning("kms-local runs without --policy: every request is allowed")
    store = KeyStore(args.keys)
    try:
        if args.create_key:
            key = store.create(description="created by trio-sign kms-local --create-key")
            print(f"key-id {key.key_id}")
            print(f"key-arn {key.arn}")
        kms = LocalKms(store, root_pem=root_pem, policy=policy)

        async def run() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    url = await nursery.start(serve_kms_local, kms, args.listen)
                    print(f"endpoint {url}", flush=True)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break

        trio.run(run)
    finally:
        store.close()
    sys.stdout.flush()
    return 0
