"""``scripts/bench --hostile``: each attack of issue 11 while a legitimate client measures.

Two targets, each its own process tree started here and ended by pid:

* ``enclave``: the development enclave tree (``_servers ours``: what ``trio-sign enclave
  --dev`` serves), attacked over plain TCP h2c.
* ``stack``: the full local stack (``trio-sign dev up``: local KMS, signed bundle, parent,
  enclave), attacked through the parent's ingress, a byte pipe to the enclave's TLS port, with
  the development client certificate (and, for the pre-TLS attack, with bare TCP
  connections). The attacked processes are the parent and the enclave; RSS and CPU are their
  sums.

Throughout, a stock grpcio ``aio`` client process (``_hostile_child``; against the stack it
pins the enclave certificate ``dev up`` verified by its attestation) keeps an open-loop
Poisson load of Commit+Sign sessions. Per attack the report gives, for the sessions scheduled
while the attack ran (and at least ``MIN_WINDOW_S`` from its start), the success rate and the
p99 latency (failed sessions count with the time they took to fail); the recovery time (from
the attack's end until a session on a fresh connection succeeds); the peak RSS growth of the
attacked processes; and the CPU seconds they spent from the attack's start to recovery, less
what the legitimate load alone costs over the same time (measured before the attacks).
PASS/MISS is against the issue's targets.

The harness assumes the server may hang or die: every wait has a timeout, a target that does
not recover (or died) is reported as such and restarted before the next attack, and every
child process is ended by its pid (SIGTERM, then SIGKILL) on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from .._profile import ENV as PROFILE_ENV
from .._profile import SIGNAL as PROFILE_SIGNAL
from ..cli._demo_full import GATEWAY_APPROVERS
from ..rpc import raise_open_file_limit
from ..testing import _attacks as attacks
from ._e2e import _enclave_pid
from ._proc import cpu_seconds, rss_mib, sigterm_unwinds, stop_child

#: The issue's targets.
TARGET_SUCCESS = 0.99
TARGET_P99_MS = 250.0
TARGET_RECOVERY_S = 1.0
TARGET_RSS_MIB = 64.0
TARGET_CPU_S = 3.0

STOP_GRACE_S = 5.0
READY_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 2.0
PROBE_LIMIT_S = 20.0
SAMPLE_INTERVAL_S = 0.05
BASELINE_S = 3.0
#: Where the attacks connect from: another loopback address than the legitimate client's
#: 127.0.0.1, so that the parent's per-source admission sees two clients, as it would.
ATTACKER_ADDRESS = "127.0.0.2"
#: The legitimate sessions of an attack are those scheduled from its start until it ended,
#: and over at least this long: a flood the server cuts within milliseconds otherwise left
#: its row with no sessions at all (printed "-", counted as a miss).
MIN_WINDOW_S = 2.0


@dataclass(frozen=True)
class HostileOptions:
    """What ``scripts/bench --hostile`` runs."""

    duration_s: float = 10.0
    quick: bool = False
    targets: tuple[str, ...] = ("enclave", "stack")
    rate: float = 100.0
    accounts: int = 1000
    only: tuple[str, ...] = ()  # attack keys; empty: all
    profile_dir: Path | None = None  # profile the attacked processes (TRIO_SIGN_PROFILE_DIR)
    profile_s: float = 3.0  # ... over this long from each attack's start
    ingress_options: tuple[str, ...] = ()  # KEY=VALUE [ingress] settings of the stack's parent


# -- /proc ------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class _Sampler:
    """Peak of the summed RSS of ``pids``, sampled in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self.peak = sum(map(rss_mib, pids))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, sum(map(rss_mib, self._pids)))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


# -- child processes ----------------------------------------------------------------------------


class _Lines:
    """A child's stdout lines, read by a thread into a queue (so reads can time out)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            with contextlib.suppress(OSError, ValueError):
                for line in stdout:
                    self.queue.put(line)
            self.queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def get(self, timeout: float) -> str | None:
        """The next line, or None at EOF; raises ``queue.Empty`` on timeout."""
        return self.queue.get(timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Target:
    """A server under attack: started, checked and restarted by the bench."""

    name = ""
    description = ""
    tls = False

    def __init__(
        self,
        work: Path,
        shares: Path,
        log: IO[str],
        profile_dir: Path | None = None,
        ingress_options: tuple[str, ...] = (),
    ) -> None:
        self._work = work
        self._ingress_options = ingress_options
        self._shares = shares
        self._log = log
        self._env = dict(os.environ)
        if profile_dir is not None:
            self._env[PROFILE_ENV] = str(profile_dir.resolve())
        self._proc: subprocess.Popen[str] | None = None
        self.port = 0
        # the server's certificate to pin (or its CA), the client certificate and key
        self.tls_files: tuple[str, str, str] | None = None
        self.tls_server_name = "localhost"  # the name the server's certificate carries
        # approver key id -> key file: the legitimate client's approvals (DESIGN §11), where
        # the target's policy needs them
        self.approvers: dict[str, str] = {}

    def start(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [] if self._proc is None else [self._proc.pid]

    def process_names(self) -> list[str]:
        """Names of :meth:`pids`, in order."""
        return ["server"]

    def alive(self) -> bool:
        return bool(self.pids()) and all(map(_alive, self.pids()))

    def stop(self) -> None:
        if self._proc is not None:
            stop_child(self._proc, STOP_GRACE_S)
            self._proc = None

    def connect(self) -> attacks.Connect:
        """h2 connections (TLS to the enclave, through the stack's ingress pipe).

        The attacks do not check the enclave's attestation (the context trusts any server):
        they only need the client certificate the enclave requires to get past its handshake.
        """
        tcp = self.connect_tcp()
        if self.tls_files is None:
            return tcp
        from ..attested import make_attested_client_context

        _, cert, key = (Path(p).read_bytes() for p in self.tls_files)
        context = make_attested_client_context(cert, key)
        return attacks.tls_connector(tcp, context, self.tls_server_name)

    def connect_tcp(self) -> attacks.Connect:
        """The attacker's TCP connections: from another address than the legitimate
        client's, as one client apart from the others (the parent's ingress admits each
        address at its own rate)."""
        return attacks.tcp_connector("127.0.0.1", self.port, local_address=ATTACKER_ADDRESS)


class _EnclaveTarget(_Target):
    name = "enclave"
    description = "dev enclave, gRPC over TCP h2c"

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "trio_sign.bench._servers", "ours", str(self._shares)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=self._env,
        )
        lines = _Lines(self._proc)
        try:
            line = lines.get(READY_TIMEOUT_S)
        except queue.Empty:
            line = None
        if not line:
            self.stop()
            raise RuntimeError("dev enclave did not start; see the process log")
        self.port = int(json.loads(line)["port"])


class _StackTarget(_Target):
    name = "stack"
    description = "full local stack: parent ingress (TCP pipe) -> enclave's attested TLS"
    tls = True
    _enclave: int | None = None  # the enclave process's pid, once started
    _runs = 0  # starts so far (each in its own work directory)

    def start(self) -> None:
        self._runs += 1
        workdir = self._work / f"stack-{self._runs}"
        self.port = _free_port()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_sign.cli",
                "dev",
                "up",
                "--shares",
                str(self._shares),
                "--workdir",
                str(workdir),
                "--ingress",
                f"tcp://127.0.0.1:{self.port}",
                "--health",
                "tcp://127.0.0.1:0",
                *(f"--ingress-option={option}" for option in self._ingress_options),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=self._env,
        )
        lines = _Lines(self._proc)
        found: dict[str, str] = {}
        deadline = time.monotonic() + READY_TIMEOUT_S
        wanted = ("server_cert", "server_name", "client_cert", "client_key", "approvers")
        while not all(key in found for key in wanted):
            try:
                line = lines.get(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError("the local stack did not become ready; see the process log")
            parts = line.split()
            if len(parts) >= 2 and parts[0] in wanted:
                found[parts[0]] = parts[1]
        # a stock client pins the enclave certificate dev up verified by its attestation
        self.tls_files = (found["server_cert"], found["client_cert"], found["client_key"])
        self.tls_server_name = found["server_name"]
        # the stack's enclave.toml needs 2 of its 3 approvers: the client holds the gateway's two
        self.approvers = {k: str(Path(found["approvers"]) / f"{k}.key") for k in GATEWAY_APPROVERS}
        self._enclave = _enclave_pid((workdir / "run").resolve())

    def pids(self) -> list[int]:
        pids = super().pids()
        return pids + ([self._enclave] if pids and self._enclave else [])

    def process_names(self) -> list[str]:
        return ["dev up (parent, local KMS, event server)", "enclave"]

    def stop(self) -> None:
        super().stop()  # the parent stops the enclave on SIGTERM ...
        if self._enclave is not None and _alive(self._enclave):
            # ... but not if it had to be killed: end the enclave by its pid too.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._enclave, signal.SIGKILL)
        self._enclave = None


class _Legit:
    """The legitimate client process and the sessions it reports."""

    def __init__(self, target: _Target, peer_shares: Path, rate: float, log: IO[str]) -> None:
        args = [
            sys.executable,
            "-m",
            "trio_sign.bench._hostile_child",
            f"127.0.0.1:{target.port}",
            str(peer_shares),
            "--rate",
            str(rate),
            "--call-timeout",
            str(CALL_TIMEOUT_S),
            "--probe-limit",
            str(PROBE_LIMIT_S),
        ]
        if target.tls_files is not None:
            ca, cert, key = target.tls_files
            args += ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]
            args += ["--tls-server-name", target.tls_server_name]
        for key_id, path in target.approvers.items():
            args += ["--approver", f"{key_id}={path}"]
        self._proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        self._lines = _Lines(self._proc)
        self._lock = threading.Lock()
        self.sessions: list[dict[str, Any]] = []
        self._probes: queue.Queue[dict[str, Any]] = queue.Queue()
        self._probe_n = 0
        try:
            line = self._lines.get(60.0)
        except queue.Empty:
            line = None
        if not line or not json.loads(line).get("ready"):
            self.stop()
            raise RuntimeError("the legitimate client did not connect; see the process log")
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while (line := self._lines.queue.get()) is not None:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if "probe" in obj:
                self._probes.put(obj)
            else:
                with self._lock:
                    self.sessions.append(obj)

    def probe(self) -> float | None:
        """Seconds until a session on a fresh connection succeeded (None: it never did)."""
        self._probe_n += 1
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(f"probe {self._probe_n}\n")
            self._proc.stdin.flush()
        except OSError:
            return None
        deadline = time.monotonic() + PROBE_LIMIT_S + 5
        while True:
            try:
                reply = self._probes.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if reply["probe"] == str(self._probe_n):
                value = reply["recovery_s"]
                return None if value is None else float(value)

    def window(self, t0: float, t1: float) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.sessions if t0 <= s["t"] < t1]

    def stop(self) -> None:
        stop_child(self._proc, STOP_GRACE_S)


# -- attacks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attack:
    key: str
    label: str
    run: Callable[[_Target, HostileOptions], Callable[[], Awaitable[attacks.AttackStats]]]
    stack_only: bool = False


def _n(opts: HostileOptions, full: int, quick: int) -> int:
    return quick if opts.quick else full


def _attack_table() -> list[_Attack]:
    def scheme(t: _Target) -> str:
        return "https" if t.tls else "http"

    return [
        _Attack(
            "bare",
            "bare TCP x1030, reopened (pre-TLS)",
            lambda t, o: lambda: attacks.hold_bare_connections(t.connect_tcp(), 1030, o.duration_s),
            stack_only=True,
        ),
        _Attack(
            "stream-flood",
            "stream flood, SETTINGS never ACKed",
            lambda t, o: (
                lambda: attacks.stream_flood_no_settings_ack(
                    t.connect(), _n(o, 20_000, 5_000), duration_s=o.duration_s, scheme=scheme(t)
                )
            ),
        ),
        _Attack(
            "rapid-reset",
            "rapid reset, 8 connections",
            lambda t, o: (
                lambda: attacks.rapid_reset(
                    t.connect(),
                    8,
                    _n(o, 200_000, 50_000),
                    o.duration_s,
                    reconnect=True,
                    scheme=scheme(t),
                )
            ),
        ),
        _Attack(
            "rapid-reset-leave",
            "rapid reset, 8 conn, leave on GOAWAY",
            lambda t, o: (
                lambda: attacks.rapid_reset(
                    t.connect(),
                    8,
                    _n(o, 200_000, 50_000),
                    o.duration_s,
                    reconnect=True,
                    leave_on_goaway=True,
                    scheme=scheme(t),
                )
            ),
        ),
        _Attack(
            "partial",
            "partial messages, 20 x 8 MiB",
            lambda t, o: (
                lambda: attacks.partial_messages(
                    t.connect(), _n(o, 20, 10), 8 * 2**20, duration_s=o.duration_s, scheme=scheme(t)
                )
            ),
        ),
        _Attack(
            "zero-window",
            "zero window, Ping 512 KiB x200",
            lambda t, o: (
                lambda: attacks.zero_window(
                    t.connect(),
                    _n(o, 200, 50),
                    payload_bytes=512 * 1024,
                    duration_s=o.duration_s,
                    scheme=scheme(t),
                )
            ),
        ),
        _Attack(
            "idle",
            "idle connections x1500",
            lambda t, o: lambda: attacks.idle_connections(t.connect(), 1500, o.duration_s),
        ),
        _Attack(
            "ping-flood",
            "PING flood, never read",
            lambda t, o: (
                lambda: attacks.ping_flood(
                    t.connect(), _n(o, 1_100_000, 300_000), duration_s=o.duration_s
                )
            ),
        ),
        _Attack(
            "settings-flood",
            "SETTINGS flood, never read",
            lambda t, o: (
                lambda: attacks.settings_flood(
                    t.connect(), _n(o, 500_000, 100_000), duration_s=o.duration_s
                )
            ),
        ),
        _Attack(
            "huge-sign",
            "Sign with 2M empty commitments",
            lambda t, o: (
                lambda: attacks.huge_sign_request(
                    t.connect(), 2_000_000, duration_s=o.duration_s, scheme=scheme(t)
                )
            ),
        ),
    ]


ATTACK_KEYS = tuple(a.key for a in _attack_table())


@dataclass
class _Result:
    label: str
    sessions: int = 0
    success: float = float("nan")
    p99_ms: float = float("nan")
    recovery_s: float | None = None
    rss_mib: float = float("nan")
    cpu_s: float = float("nan")
    stats: attacks.AttackStats | None = None
    notes: list[str] = field(default_factory=list)
    baseline: bool = False

    def misses(self) -> list[str]:
        out = []
        if not self.success >= TARGET_SUCCESS:
            out.append("ok")
        if not self.p99_ms <= TARGET_P99_MS:
            out.append("p99")
        if self.recovery_s is None or self.recovery_s > TARGET_RECOVERY_S:
            out.append("recovery")
        if not self.rss_mib <= TARGET_RSS_MIB:
            out.append("rss")
        if not self.cpu_s <= TARGET_CPU_S:
            out.append("cpu")
        return out


def _p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]


def _legit_numbers(result: _Result, sessions: list[dict[str, Any]]) -> None:
    result.sessions = len(sessions)
    if sessions:
        result.success = sum(1 for s in sessions if s["ok"]) / len(sessions)
        result.p99_ms = _p99([float(s["lat"]) for s in sessions]) * 1000
        errors: dict[str, int] = {}
        fresh = 0
        for s in sessions:
            if not s["ok"]:
                errors[s["err"]] = errors.get(s["err"], 0) + 1
                fresh += bool(s.get("fresh"))
        if errors:
            result.notes.append(
                "legit errors "
                + ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
                + f" ({fresh} on a fresh connection)"
            )
        slow = [s for s in sessions if float(s["lat"]) * 1000 > TARGET_P99_MS]
        if slow:
            on_fresh = sum(1 for s in slow if s.get("fresh"))
            # When in the attack they were scheduled (second: count): a burst at its start
            # and a steady cost point to different causes.
            t0 = min(float(s["t"]) for s in sessions)
            by_s: dict[int, int] = {}
            for s in slow:
                second = int(float(s["t"]) - t0)
                by_s[second] = by_s.get(second, 0) + 1
            when = " ".join(f"{k}s:{v}" for k, v in sorted(by_s.items()))
            result.notes.append(
                f"{len(slow)} over {TARGET_P99_MS:g} ms ({on_fresh} fresh; by second {when})"
            )


async def _bounded(fn: Callable[[], Awaitable[attacks.AttackStats]], limit: float) -> Any:
    with trio.move_on_after(limit):
        return await fn()
    return None


class _Session:
    """One target and its legitimate client, restarted when the target does not recover."""

    def __init__(
        self, target: _Target, peer_shares: Path, opts: HostileOptions, log: IO[str]
    ) -> None:
        self.target = target
        self._peer = peer_shares
        self._opts = opts
        self._log = log
        self.legit: _Legit | None = None
        self.baseline_cpu_per_s = 0.0

    def start(self) -> None:
        self.target.start()
        self.legit = _Legit(self.target, self._peer, self._opts.rate, self._log)

    def stop(self) -> None:
        if self.legit is not None:
            self.legit.stop()
            self.legit = None
        self.target.stop()

    def restart(self) -> None:
        self.stop()
        self.start()
        time.sleep(1.0)

    def baseline(self) -> _Result:
        assert self.legit is not None
        time.sleep(1.0)  # warm-up
        pids = self.target.pids()
        each0 = [cpu_seconds(pid) for pid in pids]
        rss0 = sum(map(rss_mib, pids))
        sampler = _Sampler(pids)
        t0 = time.time()
        time.sleep(BASELINE_S)
        t1 = time.time()
        peak = sampler.stop()
        each = [(cpu_seconds(pid) - c0) / (t1 - t0) for pid, c0 in zip(pids, each0, strict=True)]
        self.baseline_cpu_per_s = sum(each)
        time.sleep(2 * CALL_TIMEOUT_S + 0.5)
        result = _Result("baseline (no attack)", baseline=True)
        _legit_numbers(result, self.legit.window(t0, t1))
        result.recovery_s = 0.0
        result.rss_mib = peak - rss0
        result.cpu_s = self.baseline_cpu_per_s * (t1 - t0)
        result.notes.append(f"legit load alone costs {self.baseline_cpu_per_s:.2f} CPU s/s")
        if len(pids) > 1:
            result.notes.append(f"by process: {self._by_process(each)}")
        return result

    def _by_process(self, cpu: list[float]) -> str:
        """``name 1.23, name 4.56``: a CPU figure per attacked process."""
        names = self.target.process_names()
        return ", ".join(f"{n} {c:.2f}" for n, c in zip(names, cpu, strict=False))

    def _profile(self, pids: list[int]) -> threading.Thread | None:
        """With ``profile_dir``: start each attacked process's profiler now and stop it
        ``profile_s`` later (SIGUSR1 both times; see ``trio_sign._profile``)."""
        if self._opts.profile_dir is None:
            return None

        def toggle() -> None:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, PROFILE_SIGNAL)

        toggle()
        timer = threading.Timer(self._opts.profile_s, toggle)
        timer.start()
        return timer

    def run(self, attack: _Attack) -> _Result:
        result = _Result(attack.label)
        if self.legit is None or not self.target.alive():
            result.notes.append("target was down before the attack; restarted")
            self.restart()
        assert self.legit is not None
        pids = self.target.pids()
        rss0 = sum(map(rss_mib, pids))
        each0 = [cpu_seconds(pid) for pid in pids]
        sampler = _Sampler(pids)
        fn = attack.run(self.target, self._opts)
        own0 = os.times()
        t0 = time.time()
        profiling = self._profile(pids)
        try:
            result.stats = trio.run(_bounded, fn, self._opts.duration_s + 30.0)
            if result.stats is None:
                result.notes.append("attack client overran its bound (cut)")
        except Exception as exc:  # the attack client failing is reported, the bench goes on
            result.notes.append(f"attack client failed: {type(exc).__name__}: {exc}")
        t1 = time.time()
        own1 = os.times()
        if profiling is not None:
            profiling.join()
        # The attack client runs in this process, on the same 2 cores as the servers and the
        # legit client: its CPU is what the servers and the legit client could not use.
        attacker_cpu = (own1.user - own0.user) + (own1.system - own0.system)
        result.notes.append(
            f"attack client CPU {attacker_cpu:.2f} s over {t1 - t0:.1f} s on this machine"
        )
        died = not self.target.alive()
        result.recovery_s = None if died else self.legit.probe()
        t2 = time.time()
        result.rss_mib = sampler.stop() - rss0
        each = [cpu_seconds(pid) - c0 for pid, c0 in zip(pids, each0, strict=True)]
        result.cpu_s = sum(each) - self.baseline_cpu_per_s * (t2 - t0)
        if len(pids) > 1:
            # Which server process spent it (legit load included): where to profile next.
            split = self._by_process(each)
            result.notes.append(f"server CPU s by process incl. legit load: {split}")
        window_end = max(t1, t0 + MIN_WINDOW_S)
        # Sessions scheduled before the window's end end by then + 2 call timeouts.
        settle = window_end + 2 * CALL_TIMEOUT_S + 0.5 - time.time()
        if settle > 0:
            time.sleep(settle)
        _legit_numbers(result, self.legit.window(t0, window_end))
        if died:
            result.notes.insert(0, "SERVER DIED; restarted")
            self.restart()
        elif result.recovery_s is None:
            result.notes.insert(0, f"SERVER UNRESPONSIVE ({PROBE_LIMIT_S:g} s); restarted")
            self.restart()
        return result


# -- report ---------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec)


def _row(r: _Result) -> str:
    misses = r.misses()
    verdict = "" if r.baseline else ("PASS" if not misses else "MISS " + ",".join(misses))
    reaction = r.stats.summary() if r.stats is not None else ""
    notes = "; ".join(([reaction] if reaction else []) + r.notes)
    return (
        f"  {r.label:<36}{_fmt(r.success * 100, '.1f'):>7}{_fmt(r.p99_ms, '.0f'):>8}"
        f"{_fmt(r.recovery_s, '.2f') if r.recovery_s is not None else 'never':>9}"
        f"{_fmt(r.rss_mib, '.1f'):>9}{_fmt(r.cpu_s, '.2f'):>8}  {verdict:<28}{notes}"
    )


def _header(target: _Target, opts: HostileOptions) -> None:
    print(
        f"\n  target {target.name}: {target.description}; attacks {opts.duration_s:g} s each"
        f" from {ATTACKER_ADDRESS}"
        + (f"; [ingress] {', '.join(opts.ingress_options)}" if opts.ingress_options else ""),
        flush=True,
    )
    print(
        f"  {'attack':<36}{'ok %':>7}{'p99 ms':>8}{'recov s':>9}{'RSS+MiB':>9}{'CPU s':>8}"
        f"  {'verdict':<28}attack / server reaction; notes",
        flush=True,
    )


def bench_hostile(opts: HostileOptions) -> dict[str, list[_Result]]:
    """Run every attack against every target and print the table; returns the results."""
    from ..testing import generate_share_files

    print(
        f"\nHostile peers (issue 11): each attack bounded to {opts.duration_s:g} s, loopback only, "
        f"while a grpcio aio client process keeps an open-loop Poisson load of {opts.rate:g} "
        f"Commit+Sign sessions/s (every 20th on a new connection; {CALL_TIMEOUT_S:g} s call "
        "timeout; failed sessions count in p99 with the time they took to fail)",
        flush=True,
    )
    print(
        f"  targets: ok >= {TARGET_SUCCESS:.0%}, p99 <= {TARGET_P99_MS:g} ms, recovery <= "
        f"{TARGET_RECOVERY_S:g} s (fresh connection), RSS growth <= {TARGET_RSS_MIB:g} MiB, "
        f"server CPU <= {TARGET_CPU_S:g} s (attack start to recovery, less the legit load's)",
        flush=True,
    )
    raise_open_file_limit()  # 1500 idle + 1030 bare connections; the servers inherit it
    table = _attack_table()
    if opts.only:
        table = [a for a in table if a.key in opts.only]
    results: dict[str, list[_Result]] = {}
    with sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="trio-sign-bench-hostile-") as tmp:
        work = Path(tmp)
        gen = generate_share_files(work / "shares", opts.accounts, force=True)
        peer = gen.participant_files[2]
        with (work / "processes.log").open("w") as log:
            for name in opts.targets:
                cls = _EnclaveTarget if name == "enclave" else _StackTarget
                target = cls(work, gen.service_file, log, opts.profile_dir, opts.ingress_options)
                session = _Session(target, peer, opts, log)
                rows: list[_Result] = []
                results[name] = rows
                try:
                    session.start()
                    _header(session.target, opts)
                    rows.append(session.baseline())
                    print(_row(rows[-1]), flush=True)
                    for attack in table:
                        if attack.stack_only and name != "stack":
                            continue
                        rows.append(session.run(attack))
                        print(_row(rows[-1]), flush=True)
                except BaseException:
                    log.flush()
                    tail = (work / "processes.log").read_text()[-3000:]
                    if tail:
                        print(f"  child process output (tail):\n{tail}", file=sys.stderr)
                    raise
                finally:
                    session.stop()
                    if opts.profile_dir is not None:  # the servers' logs beside their profiles
                        log.flush()
                        opts.profile_dir.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(work / "processes.log", opts.profile_dir / "processes.log")
                passed = sum(1 for r in rows if not r.baseline and not r.misses())
                total = sum(1 for r in rows if not r.baseline)
                print(f"  {name}: {passed}/{total} attacks within all targets", flush=True)
    return results
