"""``scripts/bench``: print the numbers the issues ask for.

Sections (all by default, or pick with flags):
  --frost   microseconds per FROST round-1 / round-2 operation (2 and 3 signers), aggregate, verify
  --load    sealed-bundle preload time, RSS growth and peak for 10k and 100k accounts
            (add --big for 1M; generated bundles are cached under .bench-cache/)

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
    parser.add_argument("--load", action="store_true", help="sealed bundle preload")
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
    args = parser.parse_args(argv)
    everything = not (args.frost or args.load)
    print(f"machine: {_machine()}")
    if args.frost or everything:
        bench_frost()
    if args.load or everything:
        if args.sizes:
            sizes = [int(s) for s in args.sizes.split(",")]
        else:
            sizes = [10_000, 100_000] + ([1_000_000] if args.big else [])
        from ._load import bench_load

        bench_load(sizes, args.cache, verify=args.verify)
    return 0


if __name__ == "__main__":
    sys.exit(main())
