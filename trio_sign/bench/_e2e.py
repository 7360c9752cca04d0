"""``scripts/bench --e2e``: the full local stack (local KMS, a signed bundle, parent, enclave in
namespaces where allowed, attested TLS ending in the enclave, reference gateway) measured end
to end.

The load runs in this process as the reference gateway would: its FROST work (the
counterpart's commit and share, aggregation, verification, its side of TLS and the attested
channel's check), the parent's ingress (a byte pipe) and the load generator share one process,
and the enclave (which terminates TLS) has its own, on 2 cores. Numbers are for
the whole path, not for the enclave alone (``--grpc`` isolates the server).
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path
from typing import Any

import trio

from ..testing import generate_share_files
from ._proc import rss_mib


def _enclave_pid(run_dir: Path) -> int | None:
    needle = f"{run_dir}/enclave-grpc.sock".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        mine = b"trio_sign.cli" in cmdline and any(needle in p for p in cmdline)
        if mine and cmdline[0] != b"unshare":
            return int(proc.name)
    return None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3


def approval_cost(stack: Any, rounds: int = 500) -> dict[str, Any]:
    """The added cost per Sign of the approvals (DESIGN §11), measured in this process with the
    stack's own keys and enclave.toml policy: the gateway making its approvals (one Ed25519
    and one P-256 signature) and the enclave's decision (their verification), in µs. Blocking.
    """
    from ..authz import Authorizer
    from ..enclave._measured import load_measured_config

    approver = stack.gateway_approver()
    try:
        authorizer = Authorizer(load_measured_config(stack.enclave_config).policies)
        message = b"closed loop"
        t = time.perf_counter()
        made = [approver.approve("acct-1", f"s-{i}", message) for i in range(rounds)]
        make_us = (time.perf_counter() - t) / rounds * 1e6
        wire = [[a.to_proto() for a in approvals] for approvals in made]
        t = time.perf_counter()
        for i in range(rounds):
            decision = authorizer.decide(
                account_id="acct-1",
                policy="default",
                session_id=f"s-{i}",
                message=message,
                approvals=wire[i],
                now=float(i),
            )
            assert decision.allowed, decision.detail
        check_us = (time.perf_counter() - t) / rounds * 1e6
    finally:
        approver.close()
    kinds = " + ".join(stack.approver_types[k] for k in stack.gateway_approver_ids)
    return {"approval_kinds": kinds, "approve_us": make_us, "check_us": check_us}


async def _measure(n: int, cache: Path, duration_s: float) -> dict[str, Any]:
    from ..cli._demo_full import local_stack
    from ..gateway import (
        Coordinator,
        CoordinatorSettings,
        load_participant_files,
    )

    d = cache / f"e2e-{n}"
    service = d / "service_key_shares.json"
    participant = d / "participant-2_key_shares.json"
    if not (service.exists() and participant.exists()):
        print(f"  preparing {n:,} accounts with counterparts in {d} (cached) ...", flush=True)
        await trio.to_thread.run_sync(functools.partial(generate_share_files, d, n, force=True))
    counterparts = await trio.to_thread.run_sync(load_participant_files, [participant])
    out: dict[str, Any] = {"accounts": n}
    async with local_stack(d / "stack", service, ready_timeout=900) as stack:
        out["boot_to_ready_s"] = stack.boot_to_ready_s
        out["preload_ms"] = stack.state.report()["preload_ms"]
        node = stack.gateway_node()
        await stack.nursery.start(node.run)
        out |= await trio.to_thread.run_sync(approval_cost, stack)
        approver = await trio.to_thread.run_sync(stack.gateway_approver)
        coordinator = Coordinator(
            [node],
            counterparts,
            settings=CoordinatorSettings(max_concurrent_signatures=1024),
            approver=approver,
        )
        width = max(8, len(str(n)))
        rng = random.Random(7)

        def account() -> str:
            return f"acct-{rng.randrange(n):0{width}d}"

        for _ in range(50):  # warm up: connections, caches
            await coordinator.sign_message(account(), b"warm-up")

        for concurrency in (64, 256):
            latencies: list[float] = []
            failures = 0
            stop = trio.current_time() + duration_s

            async def worker(stop: float, latencies: list[float]) -> None:
                nonlocal failures
                while trio.current_time() < stop:
                    t = time.perf_counter()
                    try:
                        await coordinator.sign_message(account(), b"closed loop")
                    except Exception:
                        failures += 1
                        continue
                    latencies.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            async with trio.open_nursery() as workers:
                for _ in range(concurrency):
                    workers.start_soon(worker, stop, latencies)
            elapsed = time.perf_counter() - t0
            out[f"closed_{concurrency}_sps"] = len(latencies) / elapsed
            out[f"closed_{concurrency}_p50_ms"] = _pct(latencies, 0.5)
            out[f"closed_{concurrency}_p99_ms"] = _pct(latencies, 0.99)
            out[f"closed_{concurrency}_failures"] = failures

        rate = out["closed_64_sps"] / 2
        open_latencies: list[float] = []
        open_failures = 0
        arrivals = 0

        async def one(scheduled: float) -> None:
            nonlocal open_failures
            try:
                await coordinator.sign_message(account(), b"open loop")
            except Exception:
                open_failures += 1
                return
            open_latencies.append(time.perf_counter() - scheduled)

        t0 = time.perf_counter()
        async with trio.open_nursery() as arrivals_nursery:
            next_at = t0
            while next_at - t0 < duration_s:
                next_at += random.expovariate(rate)
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await trio.sleep(delay)
                arrivals += 1
                arrivals_nursery.start_soon(one, next_at)
        out["open_rate"] = rate
        out["open_achieved_sps"] = len(open_latencies) / (time.perf_counter() - t0)
        out["open_p50_ms"] = _pct(open_latencies, 0.5)
        out["open_p99_ms"] = _pct(open_latencies, 0.99)
        out["open_failures"] = open_failures
        out["attested_connections"] = node.attestations_verified
        pid = _enclave_pid(d / "stack" / "run")
        rss = rss_mib(pid) * 2**20 if pid else 0
        out["enclave_rss_mib"] = rss / 2**20
        out["enclave_bytes_per_account"] = rss / n if n else 0.0
        approver.close()
    return out


def bench_e2e(sizes: list[int], cache: Path, *, duration_s: float = 5.0) -> None:
    print(
        "\nFull stack (local KMS, signed bundle, parent, enclave, attested TLS ending in the "
        "enclave, reference gateway; gateway and load in this process)"
    )
    for n in sizes:
        r = trio.run(_measure, n, cache, duration_s)
        print(
            f"  {n:>9,} accounts: boot to ready {r['boot_to_ready_s']:5.2f} s "
            f"(preload {r['preload_ms']} ms); enclave RSS {r['enclave_rss_mib']:6.1f} MiB "
            f"({r['enclave_bytes_per_account']:,.0f} B/account incl. the runtime); "
            f"attested connections {r['attested_connections']}",
            flush=True,
        )
        for c in (64, 256):
            print(
                f"      closed loop {c:>3}: {r[f'closed_{c}_sps']:7.1f} signatures/s  "
                f"p50 {r[f'closed_{c}_p50_ms']:6.1f}  p99 {r[f'closed_{c}_p99_ms']:6.1f} ms  "
                f"failures {r[f'closed_{c}_failures']}",
                flush=True,
            )
        print(
            f"      approvals (2-of-3 policy; the gateway holds {r['approval_kinds']}): the "
            f"gateway makes them in {r['approve_us']:.0f} us, the enclave checks them in "
            f"{r['check_us']:.0f} us per Sign (in-process, one core)",
            flush=True,
        )
        print(
            f"      open loop at {r['open_rate']:.0f}/s (half the 64-concurrent capacity, "
            f"Poisson): achieved {r['open_achieved_sps']:.1f}/s  p50 {r['open_p50_ms']:.1f}  "
            f"p99 {r['open_p99_ms']:.1f} ms  failures {r['open_failures']}",
            flush=True,
        )
