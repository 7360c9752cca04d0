"""Child process for the preload benchmark: load one sealed bundle, print one JSON line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..shares import DevKeyFile, ShareStore


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    sealed, key, verify = sys.argv[1], sys.argv[2], sys.argv[3]
    provider = DevKeyFile.load(key)
    rss0 = _status_kib("VmRSS")
    start = time.perf_counter()
    with open(sealed, "rb") as f:
        store = ShareStore.load_sealed(f, provider, verify=verify)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    rss1 = _status_kib("VmRSS")
    hwm = _status_kib("VmHWM")
    n = len(store)
    store.close()
    print(
        json.dumps(
            {
                "accounts": n,
                "seconds": seconds,
                "accounts_per_second": n / seconds if seconds else 0.0,
                "rss_growth_mib": (rss1 - rss0) / 1024,
                "bytes_per_account": (rss1 - rss0) * 1024 / n if n else 0.0,
                "peak_over_steady_mib": (hwm - rss1) / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
