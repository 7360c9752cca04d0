"""``trio-sign demo``: the whole signing path on one machine, with a printed report.

Today it runs in one process: generate test shares, seal the service's file under a
development key, preload it from the sealed bundle into a ShareStore (Scheme A), then run
FROST sessions on random accounts between the service's shares and a counterpart's, aggregate,
and verify every signature with libsodium's Ed25519 (``--stack local``). The default,
``--stack full`` (:mod:`trio_sign.cli._demo_full`), runs the whole attested path: local KMS, a
bundle signed by a ceremony key the enclave's measured configuration pins, the parent and the
enclave, and the reference gateway over attested TLS ending in the enclave, every Sign
approved under a 2-of-3 approver policy, and one request with too few approvals refused.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing

from .._progress import Progress
from ._listen import UsageError

log = logging.getLogger("trio_sign.demo")


def add_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="generate, seal, preload and sign on one machine; print a report",
    )
    demo.add_argument("--accounts", type=int, default=10_000, metavar="N")
    demo.add_argument("--signatures", type=int, default=10_000, metavar="M")
    demo.add_argument(
        "--workdir", type=Path, default=Path("demo-out"), help="where files go (default ./demo-out)"
    )
    demo.add_argument("--seed", type=int, default=None, help="seed for picking accounts")
    demo.add_argument(
        "--stack",
        choices=["local", "full"],
        default="full",
        help="full (default): local KMS, a signed bundle, parent, enclave (in fresh namespaces "
        "where allowed), attested TLS ending in the enclave and the reference gateway; local: "
        "everything in one process",
    )
    demo.add_argument(
        "--concurrency", type=int, default=16, help="full stack: signatures in flight"
    )
    demo.add_argument("--ready-timeout", type=float, default=180.0, metavar="SECONDS")
    demo.set_defaults(func=cmd_demo)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def cmd_demo(args: argparse.Namespace) -> int:
    from ..crypto import aggregate, commit, sign
    from ..shares import DevKeyFile, ShareStore, seal_file
    from ..testing import generate_share_files

    if args.accounts < 1 or args.signatures < 0 or args.concurrency < 1:
        raise UsageError("--accounts and --concurrency must be >= 1, --signatures >= 0")
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.stack == "full":
        return _full(args, work.resolve())
    rng = random.Random(args.seed)

    print(f"[1/4] generating {args.accounts:,} accounts (2-of-3) into {work}/")
    progress = Progress("      generating")
    try:
        gen = generate_share_files(work, args.accounts, force=True, progress=progress)
    finally:
        progress.close()

    print("[2/4] sealing the service's shares under a development key (KMS stand-in)")
    key_path = work / "dev-kms-key.json"
    key_path.unlink(missing_ok=True)
    provider = DevKeyFile.create(key_path)
    sealed_path = work / "service_key_shares.json.enc"
    progress = Progress("      sealing")
    try:
        sealed = seal_file(
            gen.service_file, sealed_path, provider, overwrite=True, progress=progress
        )
    finally:
        progress.close()

    print("[3/4] preloading every share from the sealed bundle (Scheme A)")
    progress = Progress("      loading")
    try:
        with sealed_path.open("rb") as f:
            store = ShareStore.load_sealed(f, provider, progress=progress)
    finally:
        progress.close()
        provider.close()
    with gen.participant_files[2].open("rb") as f:
        peer = ShareStore.load_plaintext(f)

    print(
        f"[4/4] signing {args.signatures:,} messages on random accounts (service + participant 2)"
    )
    ids = [f"acct-{n:0{max(8, len(str(args.accounts)))}d}" for n in range(args.accounts)]
    latencies: list[float] = []
    failures = 0
    progress = Progress("      signing")
    start = time.perf_counter()
    try:
        for n in range(args.signatures):
            account_id = rng.choice(ids)
            message = f"demo transfer {n} from {account_id}".encode()
            t0 = time.perf_counter()
            mine = store[account_id]
            theirs = peer[account_id]
            n1 = commit(mine.identifier, mine.signing_share)
            n2 = commit(theirs.identifier, theirs.signing_share)
            commitments = [n1.commitment, n2.commitment]
            shares = {
                a.identifier: sign(
                    nonces,
                    signing_share=a.signing_share,
                    group_public_key=a.group_public_key,
                    message=message,
                    commitments=commitments,
                    min_signers=a.min_signers,
                    max_signers=a.max_signers,
                )
                for a, nonces in ((mine, n1), (theirs, n2))
            }
            signature = aggregate(
                commitments=commitments,
                message=message,
                group_public_key=mine.group_public_key,
                signature_shares=shares,
                verifying_shares={
                    mine.identifier: mine.verifying_share,
                    theirs.identifier: theirs.verifying_share,
                },
            )
            try:
                nacl.signing.VerifyKey(mine.group_public_key).verify(message, signature)
            except nacl.exceptions.BadSignatureError:
                failures += 1
            latencies.append(time.perf_counter() - t0)
            progress(n + 1, args.signatures)
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    latencies.sort()
    report = {
        "accounts": len(store),
        "sealed_sha256": store.fingerprint,
        "preload_seconds": round(store.load_seconds, 3),
        "store_mib": round(store.nbytes() / 2**20, 2),
        "store_bytes_per_account": round(store.nbytes() / max(1, len(store))),
        "signatures": args.signatures,
        "verified": args.signatures - failures,
        "failures": failures,
        "sessions_per_second": round(args.signatures / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(_percentile(latencies, 0.50) * 1e3, 3),
        "p99_ms": round(_percentile(latencies, 0.99) * 1e3, 3),
        "mean_ms": round(statistics.fmean(latencies) * 1e3, 3) if latencies else 0.0,
    }
    store.close()
    peer.close()
    log.info("demo finished", extra=report)
    print()
    print("trio-sign demo report (single process; FROST 2-of-3, Ed25519-verified)")
    for key, value in report.items():
        print(f"  {key:<24} {value}")
    match = "fingerprint matches seal" if sealed.sha256 == store.fingerprint else "MISMATCH"
    print(f"  {'sealed bundle':<24} {match}")
    return 0 if failures == 0 else 1


def _full(args: argparse.Namespace, work: Path) -> int:
    import trio

    from ._demo_full import run_full_stack

    report = trio.run(run_full_stack, args, work)
    log.info("demo finished", extra=report)
    print()
    print(
        "trio-sign demo report (full stack: local KMS, signed bundle, parent, enclave, "
        "attested TLS ending in the enclave, gateway)"
    )
    for key, value in report.items():
        if key == "first_failure" and not value:
            continue
        print(f"  {key:<24} {value}")
    match = "matches" if report["sealed_sha256"] == report["enclave_sha256"] else "MISMATCH"
    print(f"  {'fingerprint':<24} sealed bundle {match} what the enclave loaded")
    print(
        f"  {'bundle_signature':<24} signed by {report['bundle_signer']}, the one key pinned in "
        "the enclave.toml [bundles] signing_keys: the enclave loaded it under the production "
        "signature check"
    )
    refused = report["refused"].startswith("PERMISSION_DENIED")
    print(
        f"  {'authorization':<24} every Sign carried the approvals the policy needs "
        "(approved_by); "
        + (
            "a Sign with too few was refused without consuming its session's nonces"
            if refused
            else "the Sign with too few approvals was NOT refused"
        )
    )
    attested = report["attested_channel"].startswith("verified")
    ok = report["failures"] == 0 and match == "matches" and attested and refused
    return 0 if ok else 1
