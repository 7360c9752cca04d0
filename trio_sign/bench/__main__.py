"""``scripts/bench``: print the numbers the issues ask for.

Sections (all by default, or pick with flags):
  --frost   microseconds per FROST operation for each ciphersuite, side by side (median and p99):
            round 1, round 2 (2 and 3 signers; Taproot also with a merkle root), aggregate with
            share verification, the independent verify; the round-2 target per secp256k1 suite,
            and a cProfile of round 2 for a suite that misses it (--frost-profile: always)
  --load    sealed-bundle preload time, RSS growth and peak for 10k and 100k accounts
            (add --big for 1M; generated bundles are cached under .bench-cache/)
  --grpc    SignService sessions/s at 1, 64 and 256 concurrent (closed loop) and p50/p99 at an
            open-loop Poisson load of half capacity, from a load generator process, against our
            server and a grpcio aio server running the same handlers; ratios, targets, and a
            py-spy profile of our server (if py-spy is installed). About 2 minutes.
  --hostile each attack of issue 11 (bounded, loopback only) against the dev enclave and the
            full local stack (attested TLS in the enclave through the parent's byte pipe)
            while a grpcio client keeps an open-loop load:
            its success rate, p99 and recovery, and the server's RSS growth and CPU, against
            the targets (not part of the default set; about 5 minutes, --hostile-quick ~2)

Every load is measured in a fresh child process so that RSS numbers are not polluted by the
generator. The machine is shared and noisy: FROST timings are the median of several batches.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from ._frost import bench_frost
from ._grpc import GrpcBenchOptions, bench_grpc


def _machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cpus, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--frost", action="store_true", help="FROST operation timings")
    parser.add_argument(
        "--frost-iterations", type=int, default=200, help="samples per FROST operation per round"
    )
    parser.add_argument(
        "--frost-rounds", type=int, default=5, help="rounds (every suite in turn in each round)"
    )
    parser.add_argument(
        "--frost-profile",
        action="store_true",
        help="profile round 2 of every secp256k1 suite (always done for one missing its target)",
    )
    parser.add_argument("--load", action="store_true", help="sealed bundle preload")
    parser.add_argument(
        "--boot",
        action="store_true",
        help="boot-to-ready of the enclave process (10k, 100k; 1M with --big)",
    )
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="the full local stack end to end (10k accounts; 100k with --big)",
    )
    parser.add_argument("--big", action="store_true", help="include 1M accounts in --load")
    parser.add_argument(
        "--sizes",
        type=str,
        default=None,
        help="comma-separated account counts for --load (overrides defaults)",
    )
    parser.add_argument(
        "--verify",
        choices=["lazy", "full"],
        default="lazy",
        help="ShareStore verification mode for --load (default lazy)",
    )
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--grpc", action="store_true", help="gRPC sessions: ours vs grpcio aio")
    grpc = GrpcBenchOptions()
    parser.add_argument(
        "--grpc-rounds", type=int, default=grpc.rounds, help="alternating rounds (medians)"
    )
    parser.add_argument(
        "--grpc-duration", type=float, default=grpc.duration_s, help="seconds per phase"
    )
    parser.add_argument(
        "--grpc-warmup", type=float, default=grpc.warmup_s, help="seconds before each window"
    )
    parser.add_argument(
        "--grpc-concurrency",
        type=str,
        default=",".join(map(str, grpc.concurrency)),
        help="comma-separated closed-loop concurrencies",
    )
    parser.add_argument("--grpc-accounts", type=int, default=grpc.accounts)
    parser.add_argument(
        "--grpc-channels", type=int, default=grpc.channels, help="client channels (connections)"
    )
    parser.add_argument(
        "--grpc-no-profile", action="store_true", help="skip the py-spy profile of our server"
    )
    parser.add_argument("--hostile", action="store_true", help="attacks while a client measures")
    parser.add_argument(
        "--hostile-quick",
        action="store_true",
        help="--hostile with 3 s attacks and smaller counts",
    )
    parser.add_argument(
        "--hostile-duration", type=float, default=None, help="seconds per attack (default 10)"
    )
    parser.add_argument(
        "--hostile-target",
        choices=["enclave", "stack", "both"],
        default="both",
        help="which server to attack",
    )
    parser.add_argument(
        "--hostile-attacks",
        type=str,
        default="",
        help="comma-separated subset of: bare, stream-flood, rapid-reset, rapid-reset-leave,"
        " partial, zero-window,"
        " idle, ping-flood, settings-flood, huge-sign",
    )
    parser.add_argument(
        "--hostile-rate", type=float, default=100.0, help="legitimate sessions/s (Poisson)"
    )
    parser.add_argument(
        "--hostile-profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="profile the attacked processes (pyinstrument, by SIGUSR1) over the first"
        " --hostile-profile-s of each attack; text reports go to DIR",
    )
    parser.add_argument(
        "--hostile-profile-s", type=float, default=3.0, help="seconds profiled per attack"
    )
    parser.add_argument(
        "--hostile-ingress-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an [ingress] setting for the stack's parent (dev up --ingress-option), e.g."
        " per_source_rate=inf to attack without per-source admission; repeatable",
    )
    args = parser.parse_args(argv)
    hostile = args.hostile or args.hostile_quick
    everything = not (args.e2e or args.boot or args.frost or args.load or args.grpc or hostile)
    print(f"machine: {_machine()}")
    if args.frost or everything:
        bench_frost(
            iterations=args.frost_iterations,
            rounds=args.frost_rounds,
            profile=args.frost_profile,
        )
    if args.load or everything:
        if args.sizes:
            sizes = [int(s) for s in args.sizes.split(",")]
        else:
            sizes = [10_000, 100_000] + ([1_000_000] if args.big else [])
        from ._load import bench_load

        bench_load(sizes, args.cache, verify=args.verify)
    if args.boot or everything:
        from ._boot import bench_boot

        boot_sizes = (
            [int(s) for s in args.sizes.split(",")]
            if args.sizes
            else ([10_000, 100_000] + ([1_000_000] if args.big else []))
        )
        bench_boot(boot_sizes, args.cache)
    if args.e2e or everything:
        from ._e2e import bench_e2e

        e2e_sizes = (
            [int(s) for s in args.sizes.split(",")]
            if args.sizes
            else ([10_000] + ([100_000] if args.big else []))
        )
        bench_e2e(e2e_sizes, args.cache)
    if args.grpc or everything:
        concurrency = tuple(int(n) for n in args.grpc_concurrency.split(",") if n)
        bench_grpc(
            GrpcBenchOptions(
                accounts=args.grpc_accounts,
                rounds=args.grpc_rounds,
                concurrency=concurrency,
                warmup_s=args.grpc_warmup,
                duration_s=args.grpc_duration,
                open_base=64 if 64 in concurrency else max(concurrency),
                channels=args.grpc_channels,
                profile=not args.grpc_no_profile,
            )
        )
    if hostile:
        from ._hostile import ATTACK_KEYS, HostileOptions, bench_hostile

        only = tuple(k for k in args.hostile_attacks.split(",") if k)
        unknown = set(only) - set(ATTACK_KEYS)
        if unknown:
            parser.error(f"unknown --hostile-attacks: {', '.join(sorted(unknown))}")
        duration = args.hostile_duration or (3.0 if args.hostile_quick else 10.0)
        bench_hostile(
            HostileOptions(
                duration_s=duration,
                quick=args.hostile_quick,
                targets=("enclave", "stack")
                if args.hostile_target == "both"
                else (args.hostile_target,),
                rate=args.hostile_rate,
                only=only,
                profile_dir=args.hostile_profile,
                profile_s=args.hostile_profile_s,
                ingress_options=tuple(args.hostile_ingress_option),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
