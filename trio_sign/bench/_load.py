"""Sealed-bundle preload: time, RSS growth and peak, each size in a fresh child process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {10_000: 0.5, 1_000_000: 20.0}


def _prepare(n: int, cache: Path) -> tuple[Path, Path]:
    from ..shares import DevKeyFile, seal_file
    from ..testing import generate_share_files

    d = cache / f"accounts-{n}"
    sealed = d / "service_key_shares.json.enc"
    key = d / "dev-kms-key.json"
    if sealed.exists() and key.exists():
        return sealed, key
    d.mkdir(parents=True, exist_ok=True)
    print(f"  preparing {n:,} accounts in {d} (cached for later runs) ...", flush=True)
    t = time.monotonic()
    gen = generate_share_files(d, n, counterparts=False, force=True)
    t_gen = time.monotonic() - t
    key.unlink(missing_ok=True)
    provider = DevKeyFile.create(key)
    t = time.monotonic()
    seal_file(gen.service_file, sealed, provider, overwrite=True)
    provider.close()
    print(
        f"    generated in {t_gen:.1f} s, sealed (with full validation) in "
        f"{time.monotonic() - t:.1f} s",
        flush=True,
    )
    gen.service_file.unlink()
    return sealed, key


def bench_load(sizes: list[int], cache: Path, *, verify: str = "lazy") -> list[dict[str, float]]:
    print(f"\nSealed bundle preload into ShareStore (verify={verify}; fresh process per size)")
    rows = []
    for n in sizes:
        sealed, key = _prepare(n, cache)
        out = subprocess.run(
            [sys.executable, "-m", "trio_sign.bench._load_child", str(sealed), str(key), verify],
            check=True,
            capture_output=True,
            text=True,
        )
        row: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        target = TARGETS.get(n)
        verdict = ""
        if target is not None:
            verdict = f"  target <= {target} s: {'MET' if row['seconds'] <= target else 'MISSED'}"
        print(
            f"  {n:>9,} accounts: load {row['seconds']:6.2f} s  "
            f"({row['accounts_per_second']:,.0f}/s)  RSS growth {row['rss_growth_mib']:7.1f} MiB "
            f"({row['bytes_per_account']:.0f} B/account)  peak over steady "
            f"{row['peak_over_steady_mib']:5.1f} MiB{verdict}",
            flush=True,
        )
    return rows
