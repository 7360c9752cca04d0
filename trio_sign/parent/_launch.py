"""Launching the enclave: ``nitro-cli`` on AWS, or a local process standing in for it.

Both backends give the supervisor the same three things: start the enclave, wait until it is
gone, and terminate it. Everything else (preload, status, logs) happens over the channels,
whatever the backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from .._errors import TrioSignError

log = logging.getLogger("trio_sign.parent.launch")


class LaunchError(TrioSignError):
    """The enclave could not be started, described or terminated."""


class RunningEnclave(Protocol):
    """A started enclave."""

    @property
    def description(self) -> str: ...

    async def wait(self) -> int | None:
        """Return once the enclave is gone: its exit status if known, else None."""
        ...

    async def terminate(self, grace_s: float) -> None:
        """Stop it: politely first (SIGTERM / terminate-enclave), forcefully after ``grace_s``.
        Idempotent."""
        ...


class Launcher(Protocol):
    async def start(self) -> RunningEnclave: ...


# -- local ------------------------------------------------------------------------------------


def namespaces_available() -> str | None:
    """None if ``unshare --net --pid --fork --mount-proc`` works here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return probe.stderr.strip() or f"unshare exited {probe.returncode}"
    return None


def _die_with_parent() -> None:
    """``preexec_fn`` where setpriv(1) is missing: SIGKILL this child when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


#: prctl(2) option: the signal a process gets when its parent (the forking thread) dies.
PR_SET_PDEATHSIG = 1


@dataclass
class LocalEnclave:
    """An enclave process (possibly inside ``unshare``). Signals go to the enclave's own pid:
    ``unshare --fork`` ignores SIGTERM while it waits for its child."""

    process: subprocess.Popen[bytes]
    in_namespaces: bool

    @property
    def pid(self) -> int:
        if self.in_namespaces:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            if pids:
                return int(pids[0])
        return self.process.pid

    @property
    def description(self) -> str:
        where = "in fresh namespaces" if self.in_namespaces else "as a plain process"
        return f"local enclave pid {self.pid} ({where})"

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int | None:
        """Its exit status once it is gone (reaped here; a pidfd wakes us, no polling)."""
        if self.process.returncode is not None:
            return self.process.returncode
        try:
            fd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):  # no pidfd (old kernel): poll
            while self.process.poll() is None:  # noqa: ASYNC110 - nothing to wait on
                await trio.sleep(0.1)
            return self.process.returncode
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        return self.process.wait()

    async def terminate(self, grace_s: float) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with trio.move_on_after(grace_s) as scope, trio.CancelScope(shield=True):
            await self.wait()
        if scope.cancelled_caught and self.process.returncode is None:
            log.warning("enclave did not stop in time; killing it", extra={"grace_s": grace_s})
            with trio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.process.kill()
                await self.wait()


@dataclass
class LocalLauncher:
    """Runs ``trio-sign enclave`` as a local process, in fresh namespaces where the kernel
    allows (no network at all, PID 1), talking to us over UNIX sockets only.

    The enclave never outlives the parent: it is started with a parent-death signal
    (``setpriv --pdeathsig KILL``, or ``prctl`` where setpriv is missing) from the parent's
    main thread, and ``unshare --kill-child`` passes that on to the enclave inside. A parent
    killed with ``kill -9`` takes its enclave (and the shares it holds) with it.

    Args:
        enclave_args: the enclave's command-line arguments after ``trio-sign enclave``.
        use_namespaces: ``"auto"`` (use them if available), ``"always"`` or ``"never"``.
        log_path: where the enclave's own stderr goes (its logs also reach us on the channel).
        program: what to run (default ``python -m trio_sign.cli enclave``; tests substitute).
    """

    enclave_args: Sequence[str]
    use_namespaces: str = "auto"
    log_path: Path | None = None
    program: Sequence[str] = (sys.executable, "-m", "trio_sign.cli", "enclave")

    async def start(self) -> LocalEnclave:
        why_not = namespaces_available() if self.use_namespaces != "never" else "disabled"
        if self.use_namespaces == "always" and why_not is not None:
            raise LaunchError(f"fresh namespaces are required but unavailable: {why_not}")
        wrap = (
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
            if why_not is None
            else []
        )
        if why_not is not None and self.use_namespaces == "auto":
            log.warning("starting the local enclave without namespaces", extra={"why": why_not})
        tether = shutil.which("setpriv")
        cmd = [*wrap, *self.program, *self.enclave_args]
        if tether is not None:
            cmd = [tether, "--pdeathsig", "KILL", "--", *cmd]
        stderr: Any = subprocess.DEVNULL
        if self.log_path is not None:
            stderr = self.log_path.open("ab")
        try:
            # Forked here, on the parent's main thread, not in a worker thread: the death
            # signal follows the thread that forked, and trio's workers come and go.
            process = subprocess.Popen(  # noqa: ASYNC220 - fork/exec, deliberately here
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=None if tether is not None else _die_with_parent,
            )
        except OSError as exc:
            raise LaunchError(f"cannot start the local enclave: {exc}") from exc
        finally:
            if self.log_path is not None:
                stderr.close()
        enclave = LocalEnclave(process, in_namespaces=bool(wrap))
        log.info(
            "enclave started",
            extra={"backend": "local", "pid": process.pid, "namespaces": bool(wrap)},
        )
        return enclave


# -- nitro-cli --------------------------------------------------------------------------------


def _parse_json(output: bytes, what: str) -> Any:
    try:
        return json.loads(output)
    except ValueError as exc:
        raise LaunchError(f"nitro-cli {what} did not print JSON: {output[:200]!r}") from exc


@dataclass
class NitroEnclave:
    launcher: NitroCliLauncher
    enclave_id: str
    cid: int
    gone: bool = False  # wait() saw it leave RUNNING: nothing left to terminate

    @property
    def description(self) -> str:
        return f"Nitro enclave {self.enclave_id} (CID {self.cid})"

    async def wait(self) -> int | None:
        """Poll ``describe-enclaves`` until this enclave is no longer RUNNING/STARTING.

        A failing ``describe-enclaves`` (nitro-cli busy, killed, a transient error) is retried:
        a healthy enclave must not be torn down because its watcher hiccuped. Only
        ``describe_failures_max`` failures in a row raise :class:`LaunchError`.
        """
        failures = 0
        while True:
            await trio.sleep(self.launcher.poll_interval_s)
            try:
                states = await self.launcher.describe()
            except LaunchError as exc:
                failures += 1
                if failures >= self.launcher.describe_failures_max:
                    raise
                log.warning(
                    "nitro-cli describe-enclaves failed; retrying",
                    extra={"failures": failures, "error": str(exc)},
                )
                continue
            failures = 0
            mine = [e for e in states if e.get("EnclaveID") == self.enclave_id]
            if not mine or mine[0].get("State") not in ("RUNNING", "STARTING"):
                self.gone = True
                return None

    async def terminate(self, grace_s: float) -> None:
        if self.gone:
            return
        with trio.move_on_after(grace_s + 30), trio.CancelScope(shield=True):
            out = await self.launcher._run(
                ["terminate-enclave", "--enclave-id", self.enclave_id],
                "terminate-enclave",
                check=False,
            )
            if out is not None and not out.get("Terminated", False):
                log.warning(
                    "nitro-cli did not confirm termination", extra={"enclave_id": self.enclave_id}
                )


@dataclass
class NitroCliLauncher:
    """``nitro-cli run-enclave`` with CPU count, memory, EIF path and CID; ``describe-enclaves``
    to watch it; ``terminate-enclave`` to stop it. Every output is JSON, parsed and checked."""

    eif_path: Path
    cpu_count: int
    memory_mib: int
    cid: int
    debug_mode: bool = False
    nitro_cli: str = "nitro-cli"
    poll_interval_s: float = 2.0
    describe_failures_max: int = 5  # in a row, polls poll_interval_s apart

    async def _run(self, args: list[str], what: str, *, check: bool = True) -> Any:
        try:
            result = await trio.run_process(
                [self.nitro_cli, *args], capture_stdout=True, capture_stderr=True, check=False
            )
        except OSError as exc:
            raise LaunchError(f"cannot run {self.nitro_cli}: {exc}") from exc
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip()[:500]
            if check:
                raise LaunchError(f"nitro-cli {what} failed ({result.returncode}): {message}")
            log.warning("nitro-cli failed", extra={"what": what, "error": message})
            return None
        return _parse_json(result.stdout, what)

    async def describe(self) -> list[dict[str, Any]]:
        out = await self._run(["describe-enclaves"], "describe-enclaves")
        if not isinstance(out, list):
            raise LaunchError("nitro-cli describe-enclaves did not print a JSON list")
        return [e for e in out if isinstance(e, dict)]

    async def reconcile(self) -> list[str]:
        """Terminate enclaves a previous parent left at our CID (it died; they still hold the
        shares): an enclave never outlives its parent, and a new one cannot start on a CID in
        use. Returns the ids terminated."""
        left = [
            e
            for e in await self.describe()
            if e.get("EnclaveCID") == self.cid and e.get("State") in ("RUNNING", "STARTING")
        ]
        ended = []
        for e in left:
            enclave_id = str(e.get("EnclaveID"))
            log.warning(
                "terminating an enclave a previous parent left running",
                extra={"enclave_id": enclave_id, "cid": self.cid},
            )
            out = await self._run(
                ["terminate-enclave", "--enclave-id", enclave_id], "terminate-enclave"
            )
            if not isinstance(out, dict) or not out.get("Terminated", False):
                raise LaunchError(f"nitro-cli could not terminate the orphan enclave {enclave_id}")
            ended.append(enclave_id)
        return ended

    async def start(self) -> NitroEnclave:
        await self.reconcile()
        args = [
            "run-enclave",
            "--eif-path",
            str(self.eif_path),
            "--cpu-count",
            str(self.cpu_count),
            "--memory",
            str(self.memory_mib),
            "--enclave-cid",
            str(self.cid),
        ]
        if self.debug_mode:
            args.append("--debug-mode")
        out = await self._run(args, "run-enclave")
        if not isinstance(out, dict) or not isinstance(out.get("EnclaveID"), str):
            raise LaunchError(f"nitro-cli run-enclave gave no EnclaveID: {out!r}"[:300])
        cid = out.get("EnclaveCID", self.cid)
        if cid != self.cid:
            raise LaunchError(f"enclave started with CID {cid}, expected {self.cid}")
        log.info(
            "enclave started",
            extra={
                "backend": "nitro-cli",
                "enclave_id": out["EnclaveID"],
                "cid": cid,
                "memory_mib": out.get("MemoryMiB"),
            },
        )
        return NitroEnclave(self, out["EnclaveID"], int(cid))
