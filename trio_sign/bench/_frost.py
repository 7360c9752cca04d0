"""FROST operation timings for every ciphersuite, side by side (``scripts/bench --frost``).

What is timed, per suite (DESIGN §14), each call on its own with ``perf_counter_ns``:

* ``commit``: round 1 for one signer;
* ``sign``: round 2 for one signer of a 2-signer quorum (fresh nonces every time; the
  commitments are made outside the timer), and of a 3-signer quorum;
* ``sign_tweaked`` (Taproot only): round 2 with a 32-byte BIP-341 merkle root;
* ``aggregate``: the coordinator's aggregate of a 2-signer quorum *with* every share checked
  against its verifying share (what the gateway does);
* ``verify``: the suite's independent verifier of the final signature (libsodium for
  Ed25519, libsecp256k1's BIP-340 verification against the output key for Taproot, RFC 9591
  for plain secp256k1).

Side by side: the run is ``rounds`` rounds, and in each round every suite does a batch of
every operation in turn, so the machine's noise (this host is shared) lands on all of them
alike. Reported: the median and the 99th percentile over all the samples of an operation.
The issue's target is round 2 with 2 signers ≤ 300 µs for each secp256k1 suite (median).
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..crypto._schemes import ED25519, SCHEMES, Scheme

#: The issue's target for round 2 with 2 signers, per secp256k1 suite (µs, median).
ROUND2_TARGET_US = 300.0
#: The operations in table order.
OPERATIONS = ("commit", "sign", "sign_3", "sign_tweaked", "aggregate", "verify")
_HEADINGS = {
    "commit": "round 1",
    "sign": "round 2 (2)",
    "sign_3": "round 2 (3)",
    "sign_tweaked": "r2 tweaked",
    "aggregate": "aggregate",
    "verify": "verify",
}
_MESSAGE = b"\x42" * 32
_MERKLE_ROOT = hashlib.sha256(b"trio-sign bench tapleaf").digest()


@dataclass(frozen=True, slots=True)
class OpTiming:
    """One operation of one suite: all its samples, in microseconds."""

    samples_us: tuple[float, ...]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    @property
    def p99_us(self) -> float:
        ordered = sorted(self.samples_us)
        return ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]


@dataclass(slots=True)
class FrostBench:
    """The result of `bench_frost`: ``timings[suite][operation]``."""

    rounds: int
    iterations: int
    timings: dict[str, dict[str, OpTiming]] = field(default_factory=dict)
    #: Round-2 profiles (text) of the suites profiled: every one that missed its target.
    profiles: dict[str, str] = field(default_factory=dict)

    def target_met(self, suite: str) -> bool | None:
        """Round 2 (2 signers) median within the target; None for suites without one."""
        if suite == ED25519.name:
            return None
        return self.timings[suite]["sign"].median_us <= ROUND2_TARGET_US


class _Quorum:
    """A dealt 2-of-3 key and what each timed operation needs, prepared outside the timer."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        self.dealer = scheme.trusted_dealer_keygen(2, 3)
        self.gpk = self.dealer.group_public_key
        self.verifying = {s.identifier: s.verifying_share for s in self.dealer.shares}

    def close(self) -> None:
        for share in self.dealer.shares:
            share.zero()

    def round1(self, signers: int) -> tuple[list[Any], list[Any]]:
        quorum = self.dealer.shares[:signers]
        nonces = [self.scheme.commit(s.identifier, s.signing_share) for s in quorum]
        commitments = sorted(
            (n.commitment for n in nonces),
            key=lambda c: self.scheme.identifier_from_bytes(c.identifier),
        )
        return nonces, commitments

    def sign(
        self, nonces: Any, index: int, commitments: list[Any], merkle_root: bytes | None = None
    ) -> bytes:
        return self.scheme.sign(
            nonces,
            signing_share=self.dealer.shares[index].signing_share,
            group_public_key=self.gpk,
            message=_MESSAGE,
            commitments=commitments,
            merkle_root=merkle_root,
        )

    def signature_shares(
        self, merkle_root: bytes | None = None
    ) -> tuple[list[Any], dict[bytes, bytes]]:
        nonces, commitments = self.round1(2)
        shares = {
            self.dealer.shares[i].identifier: self.sign(n, i, commitments, merkle_root)
            for i, n in enumerate(nonces)
        }
        return commitments, shares


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1000


def _batch(q: _Quorum, op: str, iterations: int) -> list[float]:
    """``iterations`` samples of one operation (µs)."""
    scheme = q.scheme
    me = q.dealer.shares[0]
    out: list[float] = []
    if op == "commit":
        for _ in range(iterations):
            out.append(_timed(lambda: scheme.commit(me.identifier, me.signing_share)))
        return out
    if op in ("sign", "sign_3", "sign_tweaked"):
        signers = 3 if op == "sign_3" else 2
        root = _MERKLE_ROOT if op == "sign_tweaked" else None
        for _ in range(iterations):
            nonces, commitments = q.round1(signers)
            out.append(_timed(partial(q.sign, nonces[0], 0, commitments, root)))
            for n in nonces:
                n.zero()
        return out
    commitments, shares = q.signature_shares()
    if op == "aggregate":
        for _ in range(iterations):
            out.append(
                _timed(
                    lambda: scheme.aggregate(
                        commitments=commitments,
                        message=_MESSAGE,
                        group_public_key=q.gpk,
                        signature_shares=shares,
                        verifying_shares=q.verifying,
                    )
                )
            )
        return out
    assert op == "verify", op
    signature = scheme.aggregate(
        commitments=commitments, message=_MESSAGE, group_public_key=q.gpk, signature_shares=shares
    )
    assert scheme.verify(q.gpk, _MESSAGE, signature)
    for _ in range(iterations):
        out.append(_timed(lambda: scheme.verify(q.gpk, _MESSAGE, signature)))
    return out


def _operations(scheme: Scheme) -> list[str]:
    return [op for op in OPERATIONS if op != "sign_tweaked" or scheme.taproot]


def _fmt(timing: OpTiming | None) -> str:
    if timing is None:
        return f"{'-':>15}"
    return f"{timing.median_us:7.1f} /{timing.p99_us:6.0f}"


def bench_frost(
    iterations: int = 200,
    rounds: int = 5,
    schemes: tuple[Scheme, ...] = SCHEMES,
    *,
    profile: bool = False,
) -> FrostBench:
    """Time every FROST operation of every suite and print the table and the targets.

    Args:
        iterations: samples per operation per round.
        rounds: rounds; each round runs every suite's batches in turn.
        schemes: the suites to time (default: all three).
        profile: profile round 2 of every secp256k1 suite; without it, only of a suite that
            misses its target. The profile (cProfile, the functions with the most time of
            their own) says where the time goes.
    """
    result = FrostBench(rounds=rounds, iterations=iterations)
    samples: dict[str, dict[str, list[float]]] = {s.name: {} for s in schemes}
    quorums = [_Quorum(s) for s in schemes]
    try:
        for q in quorums:  # warm up (imports, caches) before anything is measured
            for op in _operations(q.scheme):
                _batch(q, op, 3)
        for _ in range(rounds):
            for q in quorums:
                for op in _operations(q.scheme):
                    samples[q.scheme.name].setdefault(op, []).extend(_batch(q, op, iterations))
    finally:
        for q in quorums:
            q.close()
    for name, ops in samples.items():
        result.timings[name] = {op: OpTiming(tuple(v)) for op, v in ops.items()}
    _print(result, schemes)
    for scheme in schemes:
        met = result.target_met(scheme.name)
        if met is not None and (profile or not met):
            result.profiles[scheme.name] = profile_round2(scheme)
            print(result.profiles[scheme.name])
    return result


def profile_round2(scheme: Scheme, iterations: int = 500, top: int = 10) -> str:
    """cProfile of ``iterations`` round-2 calls (2 signers, and with a merkle root for a
    Taproot suite), as text: the ``top`` functions by their own time."""
    q = _Quorum(scheme)
    try:
        prepared = [q.round1(2) for _ in range(iterations)]
        root = _MERKLE_ROOT if scheme.taproot else None
        profiler = cProfile.Profile()
        profiler.enable()
        for nonces, commitments in prepared:
            q.sign(nonces[0], 0, commitments, root)
        profiler.disable()
        for nonces, _ in prepared:
            for n in nonces:
                n.zero()
    finally:
        q.close()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    what = "with a merkle root" if root is not None else "2 signers"
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    # From the column headings on (pstats prints a preamble of totals and sort order first).
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    body = "\n".join("    " + line for line in lines[start:])
    return f"  profile of {scheme.name} round 2 ({what}, {iterations} calls, cProfile):\n{body}"


def _print(result: FrostBench, schemes: tuple[Scheme, ...]) -> None:
    n = result.rounds * result.iterations
    print(
        f"\nFROST microseconds per operation, median / p99 over {n} samples each "
        f"({result.rounds} rounds x {result.iterations}, the suites side by side)"
    )
    width = max(len(s.name) for s in schemes)
    print(f"  {'ciphersuite':<{width}}  " + "  ".join(f"{_HEADINGS[o]:>15}" for o in OPERATIONS))
    for scheme in schemes:
        row = result.timings[scheme.name]
        print(f"  {scheme.name:<{width}}  " + "  ".join(_fmt(row.get(o)) for o in OPERATIONS))
    print(
        "  round 2 (2): one signer of a 2-signer quorum; r2 tweaked: the same with a BIP-341 "
        "merkle root; aggregate checks every share against its verifying share"
    )
    print(
        f"  targets: round 2 with 2 signers <= {ROUND2_TARGET_US:.0f} us (median), "
        "per secp256k1 suite"
    )
    for scheme in schemes:
        met = result.target_met(scheme.name)
        if met is None:
            continue
        median = result.timings[scheme.name]["sign"].median_us
        tweaked = result.timings[scheme.name].get("sign_tweaked")
        extra = f"; with a merkle root {tweaked.median_us:.0f} us" if tweaked else ""
        print(f"    {scheme.name}: {'MET' if met else 'MISSED'} ({median:.0f} us{extra})")
