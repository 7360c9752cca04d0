"""Reconnect delays: exponential back-off with "full jitter" (AWS architecture blog, 2015).

Shared by every reconnecting task (status and log channels, the SSE client, the parent's
enclave restarts) so they cannot drift apart.
"""

from __future__ import annotations

import random


def full_jitter_delay(rng: random.Random, *, base: float, maximum: float, failures: int) -> float:
    """``uniform(0, min(maximum, base * 2**failures))`` seconds."""
    return rng.uniform(0, min(maximum, base * 2.0 ** min(failures, 64)))
