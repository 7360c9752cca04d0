"""The demo's third party (issue 17 part 2, DESIGN §15): a participant process.

:func:`three_party` sets up and runs, beside the full stack of :mod:`._demo_full`:

* the participant's files in ``WORK/participant/``: ``participant.toml`` (its authentication
  key is the stack's DKG key ``p2``, pinned in the enclave's ``[dkg] participants``, so it can
  take part in DKGs; its approver key is ``ops-2`` of the enclave's ``[approvers]``), its
  sealed store (``trio-sign participant --seal-shares``, Argon2id under a fresh passphrase in
  ``passphrase.txt``, 0600), its log;
* the gateway's side: the participant endpoint (:class:`~trio_sign.gateway._participants.
  ParticipantHub` on loopback) and the public account registry (``WORK/accounts.jsonl``: for
  each dealt account the participant's identifier and verifying share, what an operator
  writes for imported accounts); a coordinator that holds **no share** and one approver key
  (``ops-1``), so every ``Sign`` needs the participant's approval (``ops-2``) and share;
* ``trio-sign participant --config participant.toml`` as a child process (ended at the end);
* the measurements: closed-loop throughput at concurrency C and an open-loop run (requests
  started on a fixed schedule whatever the answers, latency counted from the scheduled start,
  so queueing shows in p99), for three parties and for the two-party baseline, in one run.

The two-party baseline is the development path (``[dev] share_files``): the demo process's
coordinator holds participant 2's share file itself. It is there only to measure against.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

PARTICIPANT_ID = "p2"  # its auth key is the stack's DKG key p2 (enclave.toml [dkg] participants)
PARTICIPANT_APPROVER = "ops-2"  # an enclave.toml [approvers] key the gateway does not hold
THREE_PARTY_GATEWAY_APPROVERS: tuple[str, ...] = ("ops-1",)
PASSPHRASE_FILE = "passphrase.txt"  # in WORK/participant/, 0600, fresh every run


@dataclass
class Measured:
    """One configuration's numbers."""

    closed_signed: int = 0
    closed_seconds: float = 0.0
    closed_latencies: list[float] = field(default_factory=list)
    open_rate: float = 0.0
    open_latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @staticmethod
    def pct(values: Sequence[float], q: float) -> float:
        if not values:
            return 0.0
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3

    @property
    def per_second(self) -> float:
        return self.closed_signed / self.closed_seconds if self.closed_seconds else 0.0

    def line(self) -> str:
        return (
            f"{self.per_second:.1f} sessions/s closed-loop (p50 "
            f"{self.pct(self.closed_latencies, 0.5):.1f} ms, p99 "
            f"{self.pct(self.closed_latencies, 0.99):.1f} ms); open-loop at "
            f"{self.open_rate:.1f}/s: p50 {self.pct(self.open_latencies, 0.5):.1f} ms, p99 "
            f"{self.pct(self.open_latencies, 0.99):.1f} ms; {len(self.failures)} failures"
        )


def write_participant_files(
    work: Path, gateway_url: str, auth_key: Path, approver_key: Path
) -> Path:
    """``WORK/participant/participant.toml``; returns its path. Blocking file I/O."""
    directory = work / "participant"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "p2.store").unlink(missing_ok=True)
    passphrase = directory / PASSPHRASE_FILE
    passphrase.unlink(missing_ok=True)
    fd = os.open(passphrase, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_urlsafe(24) + "\n")
    config = directory / "participant.toml"
    config.write_text(
        f"""participant_id = "{PARTICIPANT_ID}"
gateway_url = "{gateway_url}"
gateway_id = "gateway"

[auth]
key_file = "{auth_key}"
key_id = "{PARTICIPANT_ID}"

[approver]
key_file = "{approver_key}"
key_id = "{PARTICIPANT_APPROVER}"

[store]
path = "p2.store"
passphrase_file = "{PASSPHRASE_FILE}"

[policy]
accounts = ["*"]

[connection]
reconnect_initial_s = 0.2
reconnect_max_s = 2.0
"""
    )
    return config


def write_registry(path: Path, participant_file: Path) -> Any:
    """The registry of the dealt (imported) accounts: the participant's public part of each.
    Blocking. Returns the opened registry."""
    from ..gateway._accounts import AccountRegistry, RegisteredAccount, RemoteHolder
    from ..shares import read_plaintext

    path.unlink(missing_ok=True)
    registry = AccountRegistry(path).open()
    with participant_file.open("rb") as f:
        for rec in read_plaintext(f):
            account = RegisteredAccount(
                rec.account_id,
                rec.ciphersuite,
                rec.group_public_key,
                rec.min_signers,
                rec.max_signers,
                (RemoteHolder(PARTICIPANT_ID, rec.identifier, rec.verifying_share),),
                rec.policy,
                "import",
            )
            rec.zero()
            registry.note(account)
    # one durable write of the whole file (JSON Lines), rather than an fsync per account
    with path.open("w", encoding="utf-8") as f:
        for account_id in registry:
            entry = registry.get(account_id)
            assert entry is not None
            f.write(json.dumps(entry.to_json(), separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return registry


async def measure(
    sign: Callable[[int], Awaitable[Any]],
    *,
    signatures: int,
    concurrency: int,
    open_rate: float | None,
    open_count: int,
) -> Measured:
    """Closed loop (``signatures`` at ``concurrency``), then open loop (``open_count``
    requests started every ``1/open_rate`` s; default rate: 70 % of the closed-loop one)."""
    out = Measured()
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < signatures:
            i = next_index
            next_index += 1
            start = time.perf_counter()
            try:
                await sign(i)
            except Exception as exc:  # counted and reported
                out.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            out.closed_latencies.append(time.perf_counter() - start)

    t0 = time.perf_counter()
    async with trio.open_nursery() as workers:
        for _ in range(concurrency):
            workers.start_soon(worker)
    out.closed_seconds = time.perf_counter() - t0
    out.closed_signed = len(out.closed_latencies)
    rate = open_rate if open_rate is not None else max(1.0, 0.7 * out.per_second)
    out.open_rate = rate
    limiter = trio.CapacityLimiter(max(64, concurrency * 8))  # bounded, far above the rate

    async def one(i: int, scheduled: float) -> None:
        async with limiter:
            try:
                await sign(signatures + i)
            except Exception as exc:
                out.failures.append(f"{type(exc).__name__}: {exc}")
                return
        out.open_latencies.append(time.perf_counter() - scheduled)

    start = time.perf_counter()
    async with trio.open_nursery() as n:
        for i in range(open_count):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await trio.sleep(delay)
            n.start_soon(one, i, scheduled)
    return out


@dataclass
class ThreeParty:
    """What the demo's report and DKG step need from the three-party setup."""

    hub: Any
    registry: Any
    coordinator: Any
    approver: Any
    participant_url: str
    participant_config: Path
    process: Any = None
    log_path: Path | None = None

    def close(self) -> None:
        self.approver.close()
        self.registry.close()


async def start_three_party(
    stack: Any, node: Any, gen: Any, concurrency: int, nursery: trio.Nursery
) -> ThreeParty:
    """Seal the participant's store, serve the endpoint, start the participant process and
    wait for it to authenticate; the coordinator that holds no share."""
    from ..gateway._approvals import ApproverSigningKey
    from ..gateway._coordinator import Coordinator, CoordinatorSettings
    from ..gateway._participants import HubSettings, ParticipantHub, ParticipantKey

    work: Path = stack.work
    auth_file = stack.participant_key_files[PARTICIPANT_ID]
    with await trio.to_thread.run_sync(
        functools.partial(ApproverSigningKey.load, auth_file, key_id=PARTICIPANT_ID)
    ) as auth:
        public = auth.public_key
    hub = ParticipantHub(
        {PARTICIPANT_ID: ParticipantKey(PARTICIPANT_ID, PARTICIPANT_ID, public)},
        HubSettings(gateway_id="gateway"),
    )
    port = await nursery.start(functools.partial(hub.serve, "127.0.0.1", 0))
    url = f"ws://127.0.0.1:{port}/v1/participants"
    config = await trio.to_thread.run_sync(
        write_participant_files,
        work,
        url,
        auth_file,
        stack.approver_key_files[PARTICIPANT_APPROVER],
    )
    env = dict(os.environ)
    cli = [sys.executable, "-m", "trio_sign.cli", "participant", "--config", str(config)]
    await trio.run_process(
        [*cli, "--seal-shares", str(gen.participant_files[2])], env=env, capture_stdout=True
    )
    registry = await trio.to_thread.run_sync(
        write_registry, work / "accounts.jsonl", gen.participant_files[2]
    )
    approver = await trio.to_thread.run_sync(stack.gateway_approver, THREE_PARTY_GATEWAY_APPROVERS)
    coordinator = Coordinator(
        [node],
        [],
        settings=CoordinatorSettings(max_concurrent_signatures=concurrency),
        approver=approver,
        participants=hub,
        registry=registry,
    )
    log_path = work / "participant" / "participant.log"
    log_file = log_path.open("wb")
    process = await nursery.start(
        functools.partial(
            trio.run_process, cli, env=env, stdout=log_file, stderr=log_file, check=False
        )
    )
    log_file.close()  # the child holds its own descriptor
    with trio.fail_after(60):
        await hub.wait_connected(PARTICIPANT_ID)
    return ThreeParty(hub, registry, coordinator, approver, url, config, process, log_path)


__all__ = ["Measured", "ThreeParty", "measure", "start_three_party"]
