"""Reconnect delays: exponential back-off with "full jitter" (AWS architecture blog, 2015).

Shared by every reconnecting task (status and log channels, the SSE client, the parent's
enclave restarts) so they cannot drift apart.
"""

from __future__ import annotations

import random


def full_jitter_delay(
    rng: random.Random, *, base: float, maximum: float, failures: int, at_least: float = 0.0
) -> float:
    """``uniform(at_least, min(maximum, base * 2**failures))`` seconds (``at_least`` is itself
    capped by that ceiling). The parent's enclave restarts pass ``at_least=base``: the first
    restart waits exactly ``base``, so a crash is never followed by an immediate relaunch that
    health checks could miss."""
    ceiling = min(maximum, base * 2.0 ** min(failures, 64))
    return rng.uniform(min(at_least, ceiling), ceiling)
