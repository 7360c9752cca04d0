"""Garbage-collector settings for the long-running servers (the enclave and the parent).

A full collection walks every live object and stops the event loop while it does: in the
parent (boto3, the local KMS and event server in ``dev up``, thousands of connections during a
flood) one took 165 ms in the first second of ``scripts/bench --hostile``'s idle-connection
attack, and every forwarded call waited for it. So both servers collect the young generation
less often, and move what they loaded to start serving into the permanent generation, which
full collections never walk again.
"""

from __future__ import annotations

import gc


def configure_gc_for_serving() -> None:
    """Process-wide GC settings for a server (its command calls it first).

    Per-request garbage (h2 frames, protobuf messages) is short-lived: collecting the young
    generation less often makes full collections, whose pauses scale with live objects, rare.
    Measured with ``scripts/bench --grpc`` (open-loop p99; CPU per session unchanged).
    """
    gc.set_threshold(20_000, 10, 10)


def freeze_long_lived() -> None:
    """Collect, then move everything alive now into the permanent generation (call once a
    server has loaded what it keeps: the enclave's share index, the parent's clients and
    configuration), so that full collections never walk it again. Garbage made later is
    collected as usual; calling it again (the parent, at each enclave restart) first thaws
    what an earlier call froze, so that what died since (the previous run's objects) is
    collected rather than kept in the permanent generation for good."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


__all__ = ["configure_gc_for_serving", "freeze_long_lived"]
