"""``trio-sign demo``: the whole signing path on one machine, with a printed report.

``--stack local`` runs in one process: generate test shares, seal the service's file under a
development key, preload it from the sealed bundle into a ShareStore (Scheme A), then run
FROST sessions on random accounts between the service's shares and a counterpart's, aggregate,
and verify every signature with the suite's independent verifier. The default,
``--stack full`` (:mod:`trio_sign.cli._demo_full`), runs the whole attested path: local KMS, a
bundle signed by a ceremony key the enclave's measured configuration pins, the parent and the
enclave, and the reference gateway over attested TLS ending in the enclave, every Sign
approved under a 2-of-3 approver policy, and one request with too few approvals refused.

Ciphersuites (DESIGN §14): ``--ciphersuite NAME`` (repeatable, or ``all``) picks the suites
the accounts are dealt in, round-robin over the accounts (a mixed bundle when more than one);
the default is Ed25519 alone, so the numbers stay comparable with earlier runs. Every
signature is verified outside the FROST code path by the suite's own verifier
(:func:`verify_independently`): libsodium's Ed25519, libsecp256k1's BIP-340 verification
against the x-only output key for Taproot (tweaked with ``--taproot-merkle-root HEX`` when
given, which every Taproot signature then uses), and RFC 9591 verification for plain
secp256k1. The report counts accounts, signatures and verifications per suite.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nacl.exceptions
import nacl.signing

from .._progress import Progress
from ._listen import UsageError

if TYPE_CHECKING:
    from ..crypto import Scheme

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
    demo.add_argument(
        "--ciphersuite",
        action="append",
        choices=[*SUITE_NAMES, "all"],
        default=None,
        metavar="NAME",
        help="the accounts' ciphersuite; repeat it (or give 'all') for a mixed bundle, the "
        f"suites dealt round-robin; one of {', '.join(SUITE_NAMES)} (default: "
        f"{SUITE_NAMES[0]})",
    )
    demo.add_argument(
        "--taproot-merkle-root",
        default=None,
        metavar="HEX",
        help="sign every Taproot account with this BIP-341 merkle root (64 hex digits, or '' "
        "for the empty root); the signatures verify under the tweaked output key",
    )
    demo.add_argument(
        "--create-accounts",
        type=int,
        default=0,
        metavar="N",
        help="--stack full: also create N accounts by DKG through the gateway, sign with each "
        "and verify (report: dkg_*)",
    )
    demo.set_defaults(func=cmd_demo)


#: The ciphersuites' names (DESIGN §14), Ed25519 first (the default).
SUITE_NAMES: tuple[str, ...] = (
    "FROST-ED25519-SHA512-v1",
    "FROST-secp256k1-SHA256-v1",
    "FROST-secp256k1-SHA256-TR-v1",
)


def selected_suites(args: argparse.Namespace) -> tuple[Scheme, ...]:
    """The suites ``--ciphersuite`` names, in order and once each (``all``: every suite;
    none: Ed25519)."""
    from ..crypto import SCHEMES, scheme_by_name

    names: list[str] = args.ciphersuite or [SUITE_NAMES[0]]
    if "all" in names:
        return SCHEMES
    return tuple(scheme_by_name(n) for n in dict.fromkeys(names))


def merkle_root_arg(args: argparse.Namespace, suites: Sequence[Scheme]) -> bytes | None:
    """``--taproot-merkle-root`` as bytes (None if not given); `UsageError` if it is not hex
    of 0 or 32 bytes or no Taproot suite is selected."""
    text: str | None = args.taproot_merkle_root
    if text is None:
        return None
    if not any(s.taproot for s in suites):
        raise UsageError(
            "--taproot-merkle-root needs Taproot accounts: add --ciphersuite "
            f"{SUITE_NAMES[2]} (or all)"
        )
    try:
        root = bytes.fromhex(text)
    except ValueError:
        raise UsageError("--taproot-merkle-root is not hex") from None
    if len(root) not in (0, 32):
        raise UsageError(
            f"--taproot-merkle-root must be 64 hex digits or empty, not {len(root)} bytes"
        )
    return root


def verify_independently(
    scheme: Scheme, group_public_key: bytes, message: bytes, signature: bytes, root: bytes | None
) -> bool:
    """Check a final signature outside the FROST code that made it: libsodium's Ed25519
    (``nacl.signing``), libsecp256k1's BIP-340 verification under the suite's x-only output
    key (tweaked with ``root``), or RFC 9591 verification for plain secp256k1 (no standard
    verifier covers it). Never raises."""
    from ..crypto import ED25519, _secp256k1_tr

    if scheme is ED25519:
        try:
            nacl.signing.VerifyKey(group_public_key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError):
            return False
        return True
    if scheme.taproot:
        return _secp256k1_tr.verify(
            scheme.verifying_key(group_public_key, root), message, signature
        )
    return scheme.verify(group_public_key, message, signature)


def verifier_name(scheme: Scheme, root: bytes | None) -> str:
    """How :func:`verify_independently` checks ``scheme``'s signatures, for the report."""
    if not scheme.taproot:
        if scheme.name == SUITE_NAMES[0]:
            return "Ed25519 (RFC 8032) by libsodium under the group key"
        return "RFC 9591 (z·G == R + c·PK) under the group key"
    tweak = (
        "no merkle root" if root is None else f"tweaked with merkle root {root.hex() or '(empty)'}"
    )
    return f"BIP-340 by libsecp256k1 under the x-only output key ({tweak})"


@dataclass
class SuiteTally:
    """One suite's line in the report."""

    accounts: int = 0
    signatures: int = 0
    verified: int = 0

    def line(self, scheme: Scheme, root: bytes | None) -> str:
        return (
            f"{self.accounts:,} accounts, {self.signatures:,} signatures, {self.verified:,} "
            f"verified: {verifier_name(scheme, root)}"
        )


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def generate_shares(
    work: Path, accounts: int, suites: Sequence[Scheme], progress: Any = None
) -> Any:
    """``generate_share_files`` for the demo: ``accounts`` 2-of-3 accounts in ``suites``
    (round-robin), files replaced. Blocking."""
    from ..testing import generate_share_files

    return generate_share_files(
        work,
        accounts,
        force=True,
        progress=progress,
        ciphersuites=[s.name for s in suites],
    )


def suite_of_accounts(store: Any, ids: Sequence[str]) -> dict[str, Scheme]:
    """Each account's suite, as ``store`` (a counterpart's ShareStore) holds it."""
    from ..crypto import scheme_by_name

    return {a: scheme_by_name(store[a].ciphersuite) for a in ids}


def cmd_demo(args: argparse.Namespace) -> int:
    from ..shares import DevKeyFile, ShareStore, seal_file

    if args.accounts < 1 or args.signatures < 0 or args.concurrency < 1:
        raise UsageError("--accounts and --concurrency must be >= 1, --signatures >= 0")
    suites = selected_suites(args)
    root = merkle_root_arg(args, suites)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.stack == "full":
        return _full(args, work.resolve())
    rng = random.Random(args.seed)

    names = ", ".join(s.name for s in suites)
    print(f"[1/4] generating {args.accounts:,} accounts (2-of-3, {names}) into {work}/")
    progress = Progress("      generating")
    try:
        gen = generate_shares(work, args.accounts, suites, progress)
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
    suite_of = suite_of_accounts(peer, ids)
    tallies = {s.name: SuiteTally() for s in suites}
    for scheme in suite_of.values():
        tallies[scheme.name].accounts += 1
    latencies: list[float] = []
    failures = 0
    progress = Progress("      signing")
    start = time.perf_counter()
    try:
        for n in range(args.signatures):
            account_id = rng.choice(ids)
            message = f"demo transfer {n} from {account_id}".encode()
            scheme = suite_of[account_id]
            tweak = root if scheme.taproot else None
            t0 = time.perf_counter()
            mine = store[account_id]
            signature = _sign_locally(scheme, mine, peer[account_id], message, tweak)
            tally = tallies[scheme.name]
            tally.signatures += 1
            if verify_independently(scheme, mine.group_public_key, message, signature, tweak):
                tally.verified += 1
            else:
                failures += 1
            latencies.append(time.perf_counter() - t0)
            progress(n + 1, args.signatures)
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    latencies.sort()
    report: dict[str, Any] = {
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
    print(
        "trio-sign demo report (single process; FROST 2-of-3, every signature verified by its "
        "suite's own verifier)"
    )
    for key, value in report.items():
        print(f"  {key:<24} {value}")
    for scheme in suites:
        print(f"  {scheme.name:<29} {tallies[scheme.name].line(scheme, root)}")
    match = "fingerprint matches seal" if sealed.sha256 == store.fingerprint else "MISMATCH"
    print(f"  {'sealed bundle':<24} {match}")
    return 0 if failures == 0 else 1


def _sign_locally(
    scheme: Scheme, mine: Any, theirs: Any, message: bytes, root: bytes | None
) -> bytes:
    """Both rounds and the aggregate (every share checked) for two local shares."""
    n1 = scheme.commit(mine.identifier, mine.signing_share)
    n2 = scheme.commit(theirs.identifier, theirs.signing_share)
    try:
        commitments = sorted(
            [n1.commitment, n2.commitment],
            key=lambda c: scheme.identifier_from_bytes(c.identifier),
        )
        shares = {
            a.identifier: scheme.sign(
                nonces,
                signing_share=a.signing_share,
                group_public_key=a.group_public_key,
                message=message,
                commitments=commitments,
                min_signers=a.min_signers,
                max_signers=a.max_signers,
                merkle_root=root,
            )
            for a, nonces in ((mine, n1), (theirs, n2))
        }
        return scheme.aggregate(
            commitments=commitments,
            message=message,
            group_public_key=mine.group_public_key,
            signature_shares=shares,
            verifying_shares={
                mine.identifier: mine.verifying_share,
                theirs.identifier: theirs.verifying_share,
            },
            merkle_root=root,
        )
    finally:
        n1.zero()
        n2.zero()


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
    suite_lines: dict[str, str] = report.pop("ciphersuites", {})
    for key, value in report.items():
        if key == "first_failure" and not value:
            continue
        print(f"  {key:<24} {value}")
    for name, line in suite_lines.items():
        print(f"  {name:<29} {line}")
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
